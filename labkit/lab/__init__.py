"""The lab layer: persistent memory, DAX mounts, long-term pins and their
refusals, measured on a live guest through a machine's command channel.

``from labkit.lab import Lab`` is what the notebooks use. The parts:
``guest.vocab`` (names, shared with the guest), ``validate``, ``pmem`` (namespaces), ``mounts``, ``probes``
(pins), ``tracing`` (kprobe and kernel log), ``matrix``, ``observe`` (live
models), ``protocols`` (what the lab needs from a machine) and ``guest/``
(the helper that runs inside the guest).
"""

from labkit.lab.guest.vocab import (
                                 ALL_CASES,
                                 FILESYSTEMS,
                                 MAPPINGS,
                                 MECHANISMS,
                                 MEMORY_KINDS,
                                 MOUNT_ROOT,
                                 NS_MODES,
                                 SHORT_CASES,
                                 errname,
                                 result_cell,
)
from labkit.lab.helper import PROBE_PATH
from labkit.lab.lab import Lab
from labkit.lab.matrix import MatrixResult, compare_matrices, matrices_on_two_kernels
from labkit.lab.mounts import EXPERIMENTAL, explain_mount
from labkit.lab.pmem import Namespace, explain_ndctl, parse_ndctl
from labkit.lab.protocols import ControlledMachine, Machine, Shell, Stream
from labkit.lab.results import KPROBE, MountInfo, MountResult, Observation, PinResult, TruncateWait
from labkit.lab.tracing import log_after_marker, parse_sections, refusal_lines
from labkit.lab.validate import (
                                 ALLOWED_MOUNT_OPTIONS,
                                 BLOCK_SIZES,
                                 MAX_PIN_BYTES,
                                 check_cases,
                                 check_mount_options,
                                 check_mountpoint,
                                 check_seconds,
                                 check_size,
                                 check_text,
                                 choose,
)

__all__ = [
                                 "ALLOWED_MOUNT_OPTIONS",
                                 "ALL_CASES",
                                 "BLOCK_SIZES",
                                 "EXPERIMENTAL",
                                 "FILESYSTEMS",
                                 "KPROBE",
                                 "MAPPINGS",
                                 "MAX_PIN_BYTES",
                                 "MECHANISMS",
                                 "MEMORY_KINDS",
                                 "MOUNT_ROOT",
                                 "NS_MODES",
                                 "PROBE_PATH",
                                 "SHORT_CASES",
                                 "ControlledMachine",
                                 "Lab",
                                 "Machine",
                                 "MatrixResult",
                                 "MountInfo",
                                 "MountResult",
                                 "Namespace",
                                 "Observation",
                                 "PinResult",
                                 "Shell",
                                 "Stream",
                                 "TruncateWait",
                                 "check_cases",
                                 "check_mount_options",
                                 "check_mountpoint",
                                 "check_seconds",
                                 "check_size",
                                 "check_text",
                                 "choose",
                                 "compare_matrices",
                                 "errname",
                                 "explain_mount",
                                 "explain_ndctl",
                                 "log_after_marker",
                                 "matrices_on_two_kernels",
                                 "parse_ndctl",
                                 "parse_sections",
                                 "refusal_lines",
                                 "result_cell",
]
