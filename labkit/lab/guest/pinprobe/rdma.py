"""RDMA memory registration (ibv_reg_mr through pyverbs): a long-term pin,
accounted in VmPin; or, with IBV_ACCESS_ON_DEMAND (mechanism ``rdma-odp``), a
registration that pins nothing and lets the kernel revoke the device's
mappings. Every result carries the device's ODP capabilities
(ibv_query_device_ex), so an ODP refusal can be told apart from the fs-dax
rule. pyverbs is imported only here (and in verbs_loop), only when used."""

from __future__ import annotations

import argparse
import os
import time
from typing import Any

from .args import memory_args, rdma_device_arg
from .buffer import Buffer
from .common import SetupError, base_result, emit, log, set_error
from .hold import hold_until_released
from .measure import Meter
from .registry import Command


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


def device_odp(ctx: Any) -> dict[str, Any]:
    """The device's on-demand-paging capabilities: ``odp_caps.general_caps``
    (bit 0: IBV_ODP_SUPPORT) and the RC transport's (bit 2: WRITE, bit 3: READ)."""
    try:
        caps = ctx.query_device_ex().odp_caps
    except Exception as e:  # noqa: BLE001  (a device without the extended query: reported, not fatal)
        return {"odp_general_caps": None, "odp_rc_caps": None, "odp_caps_error": str(e)}
    rc = getattr(caps, "rc_odp_caps", None)
    if rc is None:
        rc = getattr(getattr(caps, "per_transport_caps", None), "rc_odp_caps", None)
    return {"odp_general_caps": int(caps.general_caps), "odp_rc_caps": None if rc is None else int(rc)}


def _register(pd: Any, buf: Buffer, r: dict[str, Any], odp: bool = False) -> Any:
    """ibv_reg_mr over the buffer (``odp``: with IBV_ACCESS_ON_DEMAND); the MR,
    or None with the kernel's answer in ``r``."""
    _, penums, perr, MR, _ = _pyverbs()
    access = penums.IBV_ACCESS_LOCAL_WRITE | penums.IBV_ACCESS_REMOTE_WRITE | penums.IBV_ACCESS_REMOTE_READ
    if odp:
        access |= penums.IBV_ACCESS_ON_DEMAND
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
    odp = bool(getattr(args, "odp", False))
    name, ctx, pd = _open_device(args.device)
    try:
        buf = Buffer(args.memory, args.size, args.mapping, args.path, args.dax_fs, args.dax_device,
                     touch=getattr(args, "touch", "write"))
    except BaseException:
        pd.close()
        ctx.close()
        raise
    r = base_result("rdma-odp" if odp else "rdma", buf, device=name, vmpin_kb_released=None, **device_odp(ctx))
    meter = Meter()
    try:
        mr = _register(pd, buf, r, odp)
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


def _arguments(sp: argparse.ArgumentParser) -> None:
    memory_args(sp)
    rdma_device_arg(sp)
    sp.add_argument("--hold", type=float, default=0.0,
                    help="seconds to keep the MR; -1 = print, then hold until stdin EOF/SIGTERM")


COMMANDS = (Command("rdma", "ibv_reg_mr via pyverbs", _arguments, cmd_rdma, pins=True),)
