"""The ``rdma-odp`` mechanism: ibv_reg_mr with IBV_ACCESS_ON_DEMAND. The
device maps pages when it touches them and the kernel may invalidate those
mappings (MMU notifiers) instead of waiting: no page is pinned, nothing is
accounted in VmPin. Whether the device can do it at all is in its
``odp_caps.general_caps``, reported with every result."""

from __future__ import annotations

from typing import Any

from .rdma import cmd_rdma


def cmd_rdma_odp(args: Any) -> dict[str, Any]:
    args.odp = True
    return cmd_rdma(args)
