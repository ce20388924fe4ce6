"""``SlurmSpawner`` for a class on a Slurm cluster: batchspawner's, reaching
each learner's server at the address Slurm itself has for the node.

batchspawner reads the node a job runs on from ``squeue`` and connects there
by that name. Node names often do not resolve from the hub (a login node
outside the cluster's DNS, several ``slurmd`` on one machine), and a fixed
``state_exechost_exp`` sends every server to one address. Slurm knows where
each node is: its ``NodeAddr`` (``scontrol show node``), which is what this
spawner uses; the node name when Slurm gives no address.

It is the only module that imports batchspawner.
"""

from __future__ import annotations

import re
import subprocess

from batchspawner import SlurmSpawner as _SlurmSpawner

_NODE_ADDR = re.compile(r"(?:^|\s)NodeAddr=(\S+)")


def parse_node_addr(scontrol_output: str) -> str | None:
    """The NodeAddr in ``scontrol show node -o NAME``'s output, or None."""
    m = _NODE_ADDR.search(scontrol_output)
    return m.group(1) if m and m.group(1) not in ("(null)", "") else None


def node_address(node: str, timeout: float = 10.0) -> str:
    """Where ``node`` is reached: its NodeAddr, else its name."""
    r = subprocess.run(["scontrol", "show", "node", "-o", node], capture_output=True, text=True,
                       timeout=timeout, check=False)
    return (parse_node_addr(r.stdout) if r.returncode == 0 else None) or node


class SlurmSpawner(_SlurmSpawner):
    """batchspawner's SlurmSpawner; the server's address is its node's NodeAddr."""

    def state_gethost(self) -> str:
        node = str(super().state_gethost())
        try:
            # A short blocking call, once per spawn (batchspawner calls this synchronously).
            addr = node_address(node)
        except (OSError, subprocess.SubprocessError) as exc:
            self.log.warning("scontrol show node %s failed (%s); connecting by the node's name", node, exc)
            return node
        self.log.info("server of %s runs on node %s, reached at %s", self.user.name, node, addr)
        return addr
