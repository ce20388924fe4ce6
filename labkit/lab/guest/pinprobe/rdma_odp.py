"""The ``rdma-odp`` mechanism: ibv_reg_mr with IBV_ACCESS_ON_DEMAND. The
device maps pages when it touches them and the kernel may invalidate those
mappings (MMU notifiers) instead of waiting: no page is pinned, nothing is
accounted in VmPin. Whether the device can do it at all is in its
``odp_caps.general_caps``, reported with every result."""

from __future__ import annotations

import argparse
from typing import Any

from .args import memory_args, rdma_device_arg
from .rdma import cmd_rdma
from .registry import Command


def cmd_rdma_odp(args: Any) -> dict[str, Any]:
    args.odp = True
    return cmd_rdma(args)


def _arguments(sp: argparse.ArgumentParser) -> None:
    memory_args(sp)
    rdma_device_arg(sp)
    sp.add_argument("--hold", type=float, default=0.0, help="seconds to keep the MR")


COMMANDS = (Command("rdma-odp", "ibv_reg_mr with IBV_ACCESS_ON_DEMAND (no pin)", _arguments, cmd_rdma_odp,
                    pins=True),)
