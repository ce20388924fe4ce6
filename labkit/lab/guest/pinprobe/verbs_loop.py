"""Two reliable-connected queue pairs on one RDMA device, connected to each
other (a loopback), so a probe can post a real RDMA WRITE or READ against one
of its own memory regions and report the completion status the device gives.

Two QPs rather than one QP connected to itself: when the responding side
fails, the requester then gets the responder's answer (e.g. a remote access
error) instead of only seeing its work flushed when the shared QP enters the
error state. rxe (soft-RoCE) delivers packets addressed to its own GID
through its loopback path; nothing leaves the guest. pyverbs is imported only
here.
"""

from __future__ import annotations

import ctypes
import mmap
import time
from typing import Any

from .common import MAP_FAILED, PAGE, SetupError, libc

# enum ibv_wc_status (infiniband/verbs.h): names for the statuses a learner looks up.
WC_STATUS = ("SUCCESS", "LOC_LEN_ERR", "LOC_QP_OP_ERR", "LOC_EEC_OP_ERR", "LOC_PROT_ERR", "WR_FLUSH_ERR",
             "MW_BIND_ERR", "BAD_RESP_ERR", "LOC_ACCESS_ERR", "REM_INV_REQ_ERR", "REM_ACCESS_ERR",
             "REM_OP_ERR", "RETRY_EXC_ERR", "RNR_RETRY_EXC_ERR", "LOC_RDD_VIOL_ERR", "REM_INV_RD_REQ_ERR",
             "REM_ABORT_ERR", "INV_EECN_ERR", "INV_EEC_STATE_ERR", "FATAL_ERR", "RESP_TIMEOUT_ERR",
             "GENERAL_ERR", "TM_ERR", "TM_RNDV_INCOMPLETE")
PATTERN = 0xC3          # what the local buffer holds, so a WRITE is recognisable where it lands


def wc_status_name(status: int) -> str:
    return "IBV_WC_" + WC_STATUS[status] if 0 <= status < len(WC_STATUS) else f"status {status}"


def _gid_index(ctx: Any, port: int) -> int:
    """The first non-zero GID of the port (rxe: the interface's addresses)."""
    for i in range(16):
        try:
            gid = str(ctx.query_gid(port, i))
        except Exception:  # noqa: BLE001  (pyverbs raises its own errors for unused entries)
            continue
        if gid.replace(":", "").strip("0"):
            return i
    raise SetupError("the RDMA port has no GID (is the netdev up with an address?)")


class Loopback:
    """A requester QP and a responder QP connected to each other, one CQ, and
    a one-page local buffer (pinned MR) the requester reads from / writes to."""

    def __init__(self, ctx: Any, pd: Any, port: int = 1) -> None:
        import pyverbs.enums as e
        from pyverbs.addr import AHAttr, GlobalRoute
        from pyverbs.cq import CQ
        from pyverbs.mr import MR
        from pyverbs.qp import QP, QPAttr, QPCap, QPInitAttr
        self.e = e
        self.addr = libc.mmap(None, PAGE, mmap.PROT_READ | mmap.PROT_WRITE,
                              mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)
        if self.addr in (None, MAP_FAILED):
            raise SetupError("cannot map the local buffer")
        ctypes.memset(self.addr, PATTERN, PAGE)
        self.cq = CQ(ctx, 16)
        self.local = MR(pd, PAGE, e.IBV_ACCESS_LOCAL_WRITE, address=self.addr)
        cap = QPCap(max_send_wr=4, max_recv_wr=4, max_send_sge=1, max_recv_sge=1)
        self.qp, self.peer = (QP(pd, QPInitAttr(qp_type=e.IBV_QPT_RC, scq=self.cq, rcq=self.cq, cap=cap))
                              for _ in range(2))
        self.gid_index = _gid_index(ctx, port)
        gr = GlobalRoute(dgid=ctx.query_gid(port, self.gid_index), sgid_index=self.gid_index)
        for qp, other in ((self.qp, self.peer), (self.peer, self.qp)):
            attr = QPAttr(port_num=port)
            attr.ah_attr = AHAttr(gr=gr, is_global=1, port_num=port)
            attr.path_mtu = e.IBV_MTU_1024
            attr.dest_qp_num = other.qp_num
            attr.rq_psn = attr.sq_psn = 0
            attr.max_dest_rd_atomic = attr.max_rd_atomic = 1
            # short timeouts and few retries: every completion below arrives within seconds
            attr.min_rnr_timer, attr.timeout, attr.retry_cnt, attr.rnr_retry = 1, 14, 1, 1
            attr.qp_access_flags = (e.IBV_ACCESS_LOCAL_WRITE | e.IBV_ACCESS_REMOTE_WRITE
                                    | e.IBV_ACCESS_REMOTE_READ)
            qp.to_rts(attr)

    def rdma(self, op: str, mr: Any, remote_addr: int, length: int, timeout: float = 10.0) -> dict[str, Any]:
        """Post one RDMA ``op`` ("write" or "read") of ``length`` bytes between
        the local page and ``remote_addr`` in ``mr``; its completion, measured."""
        from pyverbs.wr import SGE, SendWR
        e = self.e
        opcode = e.IBV_WR_RDMA_WRITE if op == "write" else e.IBV_WR_RDMA_READ
        wr = SendWR(opcode=opcode, num_sge=1, sg=[SGE(self.addr, min(length, PAGE), self.local.lkey)])
        wr.set_wr_rdma(mr.rkey, remote_addr)
        t0 = time.monotonic()
        self.qp.post_send(wr)
        # Bounded poll: rxe completes loopback work in microseconds to milliseconds.
        while time.monotonic() - t0 < timeout:
            n, wcs = self.cq.poll()
            if n:
                wc = wcs[0]
                return {"op": op, "status": int(wc.status), "status_name": wc_status_name(int(wc.status)),
                        "vendor_err": int(wc.vendor_err), "seconds": round(time.monotonic() - t0, 4)}
            time.sleep(0.001)
        return {"op": op, "status": None, "status_name": "no completion", "vendor_err": None,
                "seconds": round(time.monotonic() - t0, 4)}

    def close(self) -> None:
        for obj in (self.qp, self.peer, self.local, self.cq):
            try:
                obj.close()
            except Exception:  # noqa: BLE001  (best effort: the context close frees the rest)
                pass
        libc.munmap(self.addr, PAGE)
