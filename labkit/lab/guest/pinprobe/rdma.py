"""RDMA memory registration (ibv_reg_mr through pyverbs): a long-term pin,
accounted in VmPin. pyverbs is imported only here, and only when used."""

from __future__ import annotations

import os
import time
from typing import Any

from .buffer import Buffer
from .common import SetupError, base_result, emit, log, set_error
from .hold import hold_until_released
from .measure import Meter


def _pyverbs() -> Any:
    try:
        import pyverbs.device as pdev
        import pyverbs.enums as penums
        import pyverbs.pyverbs_error as perr
        from pyverbs.mr import MR
        from pyverbs.pd import PD
    except ImportError as e:
        raise SetupError(f"pyverbs not importable (install python3-pyverbs): {e}") from e
    return pdev, penums, perr, MR, PD


def _open_device(name: str | None) -> tuple[str, Any, Any]:
    """The RDMA device (first one by default), its context and a protection domain."""
    pdev, _, perr, _, PD = _pyverbs()
    if name is None:
        try:
            devs = pdev.get_device_list()
        except perr.PyverbsError as e:
            raise SetupError(f"cannot list RDMA devices: {e}") from e
        if not devs:
            raise SetupError("no RDMA device (e.g. modprobe rdma_rxe && rdma link add rxe0 type rxe netdev eth0)")
        raw = devs[0].name
        name = raw.decode() if isinstance(raw, bytes) else str(raw)
    try:
        ctx = pdev.Context(name=name)
        return name, ctx, PD(ctx)
    except perr.PyverbsError as e:
        raise SetupError(f"cannot open RDMA device {name}: {e}") from e


def _register(pd: Any, buf: Buffer, r: dict[str, Any]) -> Any:
    """ibv_reg_mr over the buffer; the MR, or None with the kernel's answer in ``r``."""
    _, penums, perr, MR, _ = _pyverbs()
    access = penums.IBV_ACCESS_LOCAL_WRITE | penums.IBV_ACCESS_REMOTE_WRITE | penums.IBV_ACCESS_REMOTE_READ
    try:
        return MR(pd, buf.size, access, address=buf.addr)
    except perr.PyverbsRDMAError as e:
        set_error(r, e.error_code if e.error_code not in (None, -1) else None, str(e))
    except perr.PyverbsError as e:
        set_error(r, None, str(e))
    return None


def _hold_for_host(r: dict[str, Any], mr: Any, meter: Meter, t_pinned: float) -> None:
    """Long-running mode for the dashboard: report now, keep the MR until told to stop."""
    r.update(meter.fields())
    r.update(held_seconds=None, pid=os.getpid(), holding=True, kernel=os.uname().release)
    emit(r)
    hold_until_released(-1)
    mr.close()
    meter.released()
    log(f"deregistered after {time.monotonic() - t_pinned:.1f}s; VmPin now {meter.vm2} kB")


def cmd_rdma(args: Any) -> dict[str, Any]:
    name, ctx, pd = _open_device(args.device)
    buf = Buffer(args.memory, args.size, args.mapping, args.path, args.dax_fs, args.dax_device)
    r = base_result("rdma", buf, device=name, vmpin_kb_released=None)
    meter = Meter()
    try:
        mr = _register(pd, buf, r)
        meter.held()
        if mr is None:
            r.update(meter.fields())
            r["vmpin_kb_released"] = None
            return r
        r.update(ok=True, message="registered", lkey=mr.lkey, rkey=mr.rkey)
        t_pinned = time.monotonic()
        if args.hold is not None and args.hold < 0:
            _hold_for_host(r, mr, meter, t_pinned)
            return {}  # already emitted
        hold_until_released(args.hold or 0)
        mr.close()  # ibv_dereg_mr: unpins and un-accounts VmPin
        r["held_seconds"] = round(time.monotonic() - t_pinned, 3)
        meter.released()
        r.update(meter.fields())
        return r
    finally:
        buf.close()
        pd.close()
        ctx.close()
