"""Running one submitted notebook for ``labkit course grade``: nbclient and a
Jupyter kernel in the sandbox (:mod:`labkit.course.sandbox`), as a uid leased
for this notebook alone (:mod:`labkit.course.uids`), against the notebook's
own guest, for the cells' share of ``--timeout`` (the rest is kept for the
checks, which :mod:`labkit.course.summative` runs afterwards on a fresh guest).
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from labkit.course import grading, sandbox, uids
from labkit.timeout import Deadline

log = logging.getLogger(__name__)

# The share of --timeout kept for the checks (at least JUDGE_MIN_S, at most
# JUDGE_MAX_S, at most half): the notebook's cells get the rest, the checks
# whatever is left when the cells end.
JUDGE_SHARE, JUDGE_MIN_S, JUDGE_MAX_S = 0.25, 20.0, 180.0


def judge_reserve(timeout: float) -> float:
    """Seconds of ``timeout`` kept for the checks."""
    return min(JUDGE_MAX_S, max(JUDGE_MIN_S, JUDGE_SHARE * timeout), timeout / 2)


@dataclass(frozen=True)
class Budget:
    """The notebook's ``--timeout`` and the deadline it started."""

    timeout: float
    deadline: Deadline

    @property
    def cells_s(self) -> float:
        """Seconds the cells may still run (never below 5 s: the kernel has to start)."""
        return max(5.0, self.deadline.remaining - judge_reserve(self.timeout))


@dataclass
class Run:
    """What running the notebook gave: the marker of its hidden record cells,
    the uid it ran as, why it stopped early ("" if it ran to the end), the
    errors its cells raised."""

    marker: str
    uid: int
    reason: str = ""
    cell_errors: list[str] = field(default_factory=list)


def execute(label: str, nb: Any, vm: Any, others: list[Any], state_root: Path, tmp: Path, budget: Budget,
            limits: sandbox.Limits, disable_userns: bool) -> Run:
    """Run ``nb`` (in place) in the sandbox until it ends or its share of the
    time is up; the cgroup is killed and the uid released on the way out."""
    with uids.leased() as uid:
        log.debug("%s: sandbox uid %d", label, uid)
        sb = _sandbox(uid, vm, others, state_root, tmp, limits, nb, disable_userns)
        run = Run(grading.prepare_for_execution(nb), uid)
        with sandbox.cgroups(f"{os.getpid()}-{uid}", limits) as groups:   # killed on the way out
            run.reason = _run_kernel(nb, dataclasses.replace(sb, cgroups=groups), tmp, budget)
    run.cell_errors = grading.cell_errors(nb)
    return run


def _sandbox(uid: int, vm: Any, others: list[Any], state_root: Path, tmp: Path, limits: sandbox.Limits,
             nb: Any, disable_userns: bool) -> sandbox.Sandbox:
    run_dir = tmp / "run"
    run_dir.mkdir(mode=0o700)
    os.chown(run_dir, uid, uid)
    sandbox.make_vm_view(vm.state_dir, tmp / "vmview", uid)
    companions = []
    for other in others:         # exposed exactly like the main guest
        sandbox.make_vm_view(other.state_dir, tmp / f"vmview-{other.name}", uid)
        companions.append(sandbox.Companion(other.name, other.state_dir, tmp / f"vmview-{other.name}",
                                            other.record.ssh_port))
    return sandbox.Sandbox(uid=uid, run_dir=run_dir, vm_state=vm.state_dir, vm_view=tmp / "vmview",
                           state_root=state_root, vm_name=vm.name, ssh_port=vm.record.ssh_port, limits=limits,
                           kernel_source=kernel_source(vm, nb), companions=tuple(companions),
                           disable_userns=disable_userns)


def _run_kernel(nb: Any, sb: sandbox.Sandbox, tmp: Path, budget: Budget) -> str:
    """Execute ``nb`` with a kernel of this sandbox; why it stopped early, or ""."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import AsyncKernelManager
    from jupyter_core.utils import run_sync
    from nbclient import NotebookClient
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    name = sandbox.write_kernelspec(sb, tmp / "kernels", sandbox.require_bwrap())
    # The async manager: with a blocking client nbclient's waits block its event loop, so a
    # kernel killed at the time limit was never noticed (the grader hung on the iopub channel).
    km = AsyncKernelManager(kernel_name=name, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp / "kernels")]),
                            transport="ipc", ip=str(sb.run_dir / "k"), connection_file=str(sb.run_dir / "kernel.json"))
    km.write_connection_file()
    os.chown(sb.run_dir / "kernel.json", sb.uid, sb.uid)
    cells_s = budget.cells_s
    limit = f"the time limit ({cells_s:.0f} s for the cells, of --timeout {budget.timeout:.0f} s with the checks)"
    expired = threading.Event()

    def time_is_up() -> None:
        expired.set()
        sandbox.kill_cgroups(sb.cgroups)
    timer = threading.Timer(cells_s, time_is_up)
    client = NotebookClient(nb, km=km, timeout=int(cells_s) + 1, startup_timeout=120, allow_errors=True,
                            kernel_name=name, resources={"metadata": {"path": str(sb.run_dir)}})
    try:
        with sandbox.ssh_gate(sb):
            timer.start()
            client.execute()
        return ""
    except CellTimeoutError:
        return f"a cell ran past {limit}; graded as far as it got"
    except DeadKernelError:
        return (f"stopped at {limit}; graded as far as it got" if expired.is_set() else
                "the notebook's kernel died (killed by a limit of the sandbox, or it exited); graded as far as "
                "it got")
    except Exception as exc:      # noqa: BLE001 - nbclient/zmq failures must not stop the other notebooks
        return f"the notebook could not be run to the end ({type(exc).__name__}: {str(exc)[:200]})"
    finally:
        timer.cancel()
        atexit.unregister(client._cleanup_kernel)     # nbclient's own exit hook; we shut the kernel down here
        if km.has_kernel:
            run_sync(km.shutdown_kernel)(now=True)


def kernel_source(vm: Any, nb: Any) -> Path | None:
    """The guest kernel's source files, fetched by the grader (the sandbox has no
    network) when the notebook reads them (labkit.course.source); else None."""
    sources = [c.get("source") for c in nb.cells if c.get("cell_type") == "code"]
    if not any(isinstance(t, str) and ("labkit.course import source" in t or "course.source" in t) for t in sources):
        return None
    from labkit.image import build, kernelsrc
    img = build.load_image(vm.kernel, verify=False)
    return kernelsrc.fetch(vm.kernel, img.manifest)
