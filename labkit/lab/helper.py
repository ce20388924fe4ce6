"""The host side of the guest helper: upload the pinprobe zipapp on first use,
build its argument lists, and read its one-JSON-object answers."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from typing import Any

from labkit.command import CommandResult
from labkit.errors import LabError
from labkit.lab.guest import bundle
from labkit.lab.guest import files as guest_files
from labkit.lab.protocols import Machine

log = logging.getLogger(__name__)

PROBE_DIR = "/run/labkit"
PROBE_PATH = f"{PROBE_DIR}/pinprobe.pyz"


def last_json(text: str) -> dict[str, Any] | None:
    """The last line of ``text`` that is a JSON object (the helper's answer)."""
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                data = json.loads(line)
            except ValueError:
                return None
            return data if isinstance(data, dict) else None
    return None


def answer(r: CommandResult, what: str) -> dict[str, Any]:
    """The helper's JSON answer in ``r``, or a LabError saying why ``what`` failed."""
    data = last_json(r.stdout)
    if data is None or "error" in data:
        reason = (data or {}).get("error") or (r.stderr or r.stdout).strip()[-1000:] or f"exit status {r.rc}"
        raise LabError(f"{what} failed: {reason}")
    return data


class GuestHelper:
    """The pinprobe zipapp in one guest, uploaded once."""

    def __init__(self, vm: Machine) -> None:
        self.vm = vm
        self._uploaded = False

    def ensure(self) -> None:
        if self._uploaded:
            return
        data = bundle.build()
        log.debug("uploading the guest helper (%d bytes) to %s", len(data), PROBE_PATH)
        self.vm.run(["mkdir", "-p", PROBE_DIR], check=True)
        self.vm.ssh.upload(data, PROBE_PATH, mode=0o755)
        # compiled by the guest's Python, once: every later call imports them instead
        # of compiling the helper again (guest/precompile.py says why and how much)
        r = self.vm.run(["python3", "-c", guest_files.precompile_source(), PROBE_PATH], timeout=60)
        if r.rc != 0:
            log.warning("the guest helper stays uncompiled (slower, still correct): %s",
                        (r.stderr or r.stdout).strip()[-500:])
        self._uploaded = True

    def argv(self, *args: str) -> list[str]:
        """The guest command line of helper subcommand ``args`` (uploads first)."""
        self.ensure()
        return ["python3", PROBE_PATH, *args]

    def call(self, args: Sequence[str], what: str, timeout: float = 60.0,
             stdin: str | None = None) -> dict[str, Any]:
        """Run a helper subcommand and return its JSON answer."""
        r = self.vm.run(self.argv(*args), timeout=timeout, stdin=stdin)
        return answer(r, what)
