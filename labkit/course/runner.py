"""Running one submitted notebook for ``labkit course grade``: nbclient and a
Jupyter kernel in the sandbox (:mod:`labkit.course.sandbox`), as a uid leased
for this notebook alone (:mod:`labkit.course.uids`), against the notebook's
own guest, for the cells' share of ``--timeout`` (the rest is kept for the
checks, which :mod:`labkit.course.summative` runs afterwards on a fresh guest).
"""

from __future__ import annotations

import atexit
import contextlib
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

# What the grader keeps of a notebook's outputs (a cell that prints without
# end used to grow the grader, which holds every output in memory), and the
# largest single kernel message it reads at all.
OUTPUT_CAP = 16 * 2**20
MESSAGE_CAP = 64 * 2**20
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
            limits: sandbox.KernelLimits, disable_userns: bool, rootless: bool = False) -> Run:
    """Run ``nb`` (in place) in the sandbox until it ends or its share of the
    time is up; the cgroup is killed and the uid released on the way out
    (``rootless``: the grader's own uid, see sandbox_mode)."""
    lease = contextlib.nullcontext(os.geteuid()) if rootless else uids.leased()
    with lease as uid, sandbox.run_dir_mount(tmp / "run", uid, limits):
        log.debug("%s: sandbox uid %d", label, uid)
        sb = _sandbox(uid, vm, others, state_root, tmp, limits, nb, disable_userns, rootless)
        run = Run(grading.prepare_for_execution(nb), uid)
        with sandbox.cgroup(f"{os.getpid()}-{uid}", limits) as group:   # killed on the way out
            dirs = tuple(group.dirs()) if group is not None else ()
            run.reason, dropped = _run_kernel(nb, dataclasses.replace(sb, cgroups=dirs), group, tmp, budget)
    run.cell_errors = grading.cell_errors(nb)
    if dropped:
        run.cell_errors.append(f"the notebook's outputs passed {OUTPUT_CAP // 2**20} MiB; {dropped // 2**20} MiB "
                               "more were not kept by the grader")
    return run


def _sandbox(uid: int, vm: Any, others: list[Any], state_root: Path, tmp: Path, limits: sandbox.KernelLimits,
             nb: Any, disable_userns: bool, rootless: bool = False) -> sandbox.Sandbox:
    run_dir = tmp / "run"             # made by sandbox.run_dir_mount
    sandbox.make_vm_view(vm.state_dir, tmp / "vmview", uid, rootless)
    companions = []
    for other in others:         # exposed exactly like the main guest
        sandbox.make_vm_view(other.state_dir, tmp / f"vmview-{other.name}", uid, rootless)
        companions.append(sandbox.Companion(other.name, other.state_dir, tmp / f"vmview-{other.name}",
                                            other.record.ssh_port))
    return sandbox.Sandbox(uid=uid, run_dir=run_dir, vm_state=vm.state_dir, vm_view=tmp / "vmview",
                           state_root=state_root, vm_name=vm.name, ssh_port=vm.record.ssh_port, limits=limits,
                           kernel_source=kernel_source(vm, nb), companions=tuple(companions),
                           disable_userns=disable_userns, rootless=rootless)


def _run_kernel(nb: Any, sb: sandbox.Sandbox, group: Any, tmp: Path, budget: Budget) -> tuple[str, int]:
    """Execute ``nb`` with a kernel of this sandbox: why it stopped early (or ""),
    and the bytes of output it sent past OUTPUT_CAP."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_core.utils import run_sync
    from nbclient.exceptions import CellTimeoutError, DeadKernelError
    name = sandbox.write_kernelspec(sb, tmp / "kernels", sandbox.require_bwrap())
    # The async manager: with a blocking client nbclient's waits block its event loop, so a
    # kernel killed at the time limit was never noticed (the grader hung on the iopub channel).
    km = _manager()(kernel_name=name, kernel_spec_manager=KernelSpecManager(kernel_dirs=[str(tmp / "kernels")]),
                    transport="ipc", ip=str(sb.run_dir / "k"), connection_file=str(sb.run_dir / "kernel.json"))
    km.write_connection_file()
    os.chown(sb.run_dir / "kernel.json", sb.uid, sb.uid)
    cells_s = budget.cells_s
    limit = f"the time limit ({cells_s:.0f} s for the cells, of --timeout {budget.timeout:.0f} s with the checks)"
    expired = threading.Event()

    def time_is_up() -> None:
        expired.set()
        sandbox.kill(group)
    timer = threading.Timer(cells_s, time_is_up)
    client = capped_client(nb, km=km, timeout=int(cells_s) + 1, startup_timeout=120, allow_errors=True,
                           kernel_name=name, resources={"metadata": {"path": str(sb.run_dir)}},
                           store_widget_state=False)
    reason = ""
    try:
        with sandbox.ssh_gate(sb):
            timer.start()
            client.execute()
    except CellTimeoutError:
        reason = f"a cell ran past {limit}; graded as far as it got"
    except DeadKernelError:
        reason = (f"stopped at {limit}; graded as far as it got" if expired.is_set() else
                  "the notebook's kernel died (killed by a limit of the sandbox, or it exited); graded as far as "
                  "it got")
    except Exception as exc:      # noqa: BLE001 - nbclient/zmq failures must not stop the other notebooks
        reason = f"the notebook could not be run to the end ({type(exc).__name__}: {str(exc)[:200]})"
    finally:
        timer.cancel()
        atexit.unregister(client._cleanup_kernel)     # nbclient's own exit hook; we shut the kernel down here
        if km.has_kernel:
            run_sync(km.shutdown_kernel)(now=True)
    return reason, client.dropped


def _manager() -> type:
    """AsyncKernelManager whose clients read no kernel message over MESSAGE_CAP
    (ZeroMQ drops it and the connection; the cells still run, but outputs sent
    around it, answers included, can be lost: measured with a 100 MiB print)."""
    import zmq
    import zmq.asyncio
    from jupyter_client.manager import AsyncKernelManager

    class CappedManager(AsyncKernelManager):
        def client(self, **kwargs: Any) -> Any:
            ctx = zmq.asyncio.Context()
            ctx.setsockopt(zmq.MAXMSGSIZE, MESSAGE_CAP)
            kc = super().client(context=ctx, **kwargs)
            kc._created_context = True            # the client destroys it when it is done
            return kc
    return CappedManager


def capped_client(nb: Any, **kwargs: Any) -> Any:
    """An nbclient NotebookClient that keeps at most OUTPUT_CAP of the
    notebook's outputs (and comm traffic): past it, outputs are dropped and a
    note says so (``.dropped``); the answers' payloads (small by
    construction: ``record()`` bounds them) are always kept, stripped to the
    payload, as are the messages that drive execution (status, execute_input)."""
    from nbclient import NotebookClient

    class CappedClient(NotebookClient):
        kept = 0
        dropped = 0

        def process_message(self, msg: dict[str, Any], cell: Any, cell_index: int) -> Any:
            kind = msg.get("msg_type")
            if kind in ("status", "execute_input", "clear_output"):
                return super().process_message(msg, cell, cell_index)
            size = _message_size(msg)
            if self.kept + size <= OUTPUT_CAP:
                self.kept += size
                return super().process_message(msg, cell, cell_index)
            room = OUTPUT_CAP - self.kept
            if kind == "stream" and room > 0:     # what fits of it is kept
                content = dict(msg["content"], text=str(msg["content"].get("text", ""))[:room])
                super().process_message(dict(msg, content=content), cell, cell_index)
                self.kept, size = OUTPUT_CAP, size - room
            if not self.dropped:
                log.info("outputs of a notebook passed %d MiB; the rest are dropped", OUTPUT_CAP // 2**20)
                cell.setdefault("outputs", []).append(_note())
            self.dropped += size
            payload = _payload_only(msg)
            return super().process_message(payload, cell, cell_index) if payload else None
    return CappedClient(nb, **kwargs)


def _message_size(msg: dict[str, Any]) -> int:
    import json
    content = msg.get("content") or {}
    extra = sum(len(b) for b in msg.get("buffers") or [])
    if msg.get("msg_type") == "stream":
        return extra + len(str(content.get("text", "")))
    try:
        return extra + len(json.dumps(content, default=str))
    except (TypeError, ValueError, RecursionError):
        return extra + OUTPUT_CAP


def _payload_only(msg: dict[str, Any]) -> dict[str, Any] | None:
    """``msg`` reduced to a labkit answer payload it carries, or None."""
    import json
    content = msg.get("content") or {}
    data = content.get("data") if isinstance(content, dict) else None
    if msg.get("msg_type") not in ("display_data", "execute_result") or not isinstance(data, dict) \
            or grading.MIME not in data:
        return None
    payload = data[grading.MIME]
    if len(json.dumps(payload, default=str)) > 4 * grading.MAX_CHARS:
        return None
    return dict(msg, content=dict(content, data={grading.MIME: payload}, metadata={}, transient={}))


def _note() -> Any:
    import nbformat
    return nbformat.v4.new_output("stream", name="stderr",
                                  text=f"[labkit course grade: this notebook's outputs passed "
                                       f"{OUTPUT_CAP // 2**20} MiB; the rest were not kept]\n")


def kernel_source(vm: Any, nb: Any) -> Path | None:
    """The guest kernel's source files, fetched by the grader (the sandbox has no
    network) when the notebook reads them (labkit.course.source); else None."""
    sources = [c.get("source") for c in nb.cells if c.get("cell_type") == "code"]
    if not any(isinstance(t, str) and ("labkit.course import source" in t or "course.source" in t) for t in sources):
        return None
    from labkit.image import build, kernelsrc
    img = build.load_image(vm.kernel, verify=False)
    return kernelsrc.fetch(vm.kernel, img.manifest)
