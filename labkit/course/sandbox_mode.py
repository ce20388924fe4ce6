"""Which sandbox ``labkit course grade`` can make on this host: as root, a
throwaway uid per kernel (:mod:`labkit.course.sandbox`); without root, where
the host lets users make user namespaces, one unprivileged bwrap per kernel
as the grader's own uid (``Sandbox.rootless``); else an error that names
what is missing (the sysctl, or root).
"""

from __future__ import annotations

import functools
import os
import subprocess
from pathlib import Path

from labkit.course.sandbox import SandboxError

# Without root the grader cannot give a submission a uid of its own (setuid
# needs CAP_SETUID on the host), nor make cgroups or a tmpfs. It runs each
# submission in one unprivileged bwrap, as the grader's own uid, with a user,
# PID, network, IPC and UTS namespace of its own. What stands in for the
# throwaway uid: the submission sees only its own run directory and guest
# view (the grader's home, the other submissions and the output are not
# mounted), its own PID namespace (it cannot see or signal the grader, the
# guests' QEMUs or another submission, though they run as the same uid), no
# capabilities, no further user namespaces (``--disable-userns``), and
# RLIMIT_NPROC counted inside its user namespace (only its own processes).
# It lacks the memory and CPU cgroup (rlimits only) and the tmpfs size caps.
ROOTLESS = "userns"
ROOT = "root"

_USERNS_SYSCTLS = (
    ("/proc/sys/kernel/unprivileged_userns_clone", "0", "sysctl -w kernel.unprivileged_userns_clone=1"),
    ("/proc/sys/user/max_user_namespaces", "0", "sysctl -w user.max_user_namespaces=15000"),
    ("/proc/sys/kernel/apparmor_restrict_unprivileged_userns", "1",
     "sysctl -w kernel.apparmor_restrict_unprivileged_userns=0 (or an AppArmor profile for bwrap)"),
)


def grading_mode(bwrap: str = "bwrap") -> str:
    """``ROOT`` when the grader runs as root (a throwaway uid per
    submission, cgroups), ``ROOTLESS`` when this host lets an unprivileged
    user make user namespaces (checked by running bwrap), else a SandboxError
    that names the sysctl to change or says to run as root."""
    if os.geteuid() == 0:
        return ROOT
    problem = rootless_problem(bwrap)
    if problem:
        raise SandboxError(f"labkit course grade cannot sandbox submissions without root on this host: {problem}",
                           hint="run it as root (sudo), or let unprivileged users make user namespaces: "
                                + _userns_fix())
    return ROOTLESS


def _userns_fix() -> str:
    fixes = [fix for path, bad, fix in _USERNS_SYSCTLS if _read(path) == bad]
    return "; ".join(fixes) or "check that bwrap --unshare-user true works for this user"


def _read(path: str) -> str:
    try:
        return Path(path).read_text().strip()
    except OSError:
        return ""


@functools.lru_cache(maxsize=4)
def rootless_problem(bwrap: str = "bwrap") -> str:
    """"" when this (unprivileged) user can run the rootless sandbox's bwrap
    here: the sysctls allow user namespaces and a real ``bwrap --unshare-user
    --unshare-pid true`` works; else why not."""
    for path, bad, fix in _USERNS_SYSCTLS:
        if _read(path) == bad:
            return f"{path} is {bad} ({fix} allows it)"
    argv = [bwrap, "--unshare-user", "--unshare-pid", "--unshare-net", "--die-with-parent", "--ro-bind", "/", "/",
            "--proc", "/proc", "--dev", "/dev", "--", "true"]
    try:
        r = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"the bwrap probe did not run ({exc})"
    if r.returncode != 0:
        return f"bwrap --unshare-user failed: {(r.stderr or r.stdout).strip()[:200]}"
    return ""
