"""What ``labkit bench --reliability`` counts: how a trial ended (``classify``),
the trials of a results file (``load``/``save``, so chunks add up), and the
summary and report per kernel and kind. Pure: no guest here (the runner is
``bench_reliability``)."""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from labkit.errors import (
    ChannelError,
    ConfigError,
    GuestDied,
    GuestHung,
    GuestPanic,
    GuestTimeout,
    LaunchError,
)

KINDS = ("cold", "warm", "kprobe", "module")
# Every way a trial ends; all but "ok" are failures ("int3_boot_recovered" one that labkit recovered from).
OUTCOMES = {
    "ok": "ok",
    "int3_boot_recovered": "int3 oops in early boot, booted again (recovered)",
    "int3_boot": "int3 oops in early boot, not recovered",
    "int3_running": "int3 oops outside early boot",
    "ssh_timeout": "SSH timeout",
    "qemu_died": "QEMU died",
    "other": "other",
}
RECOVERED = frozenset({"int3_boot_recovered"})
INT3 = "Oops: int3"
# The line boot.py shows when it boots again after an int3 in early boot.
RETRY_NOTE = re.compile(r"^labkit: .*int3.*booting again")
# The first console line of a kernel error, for "other".
ERROR_LINE = re.compile(r"(Oops|BUG:|Kernel panic|general protection fault|WARNING:|Call Trace)")
# What makes a trial that otherwise worked a failure (a WARN alone does not).
FATAL_LINE = re.compile(r"(Oops|BUG:|Kernel panic|general protection fault)")


@dataclass
class Trial:
    """One trial as it ended; one line of the results file."""

    kernel: str
    kind: str                 # KINDS
    outcome: str              # OUTCOMES
    detail: str = ""          # for a failure: the first console line of the error, or the error's first line
    seconds: float = 0.0
    when: str = ""

    @property
    def failed(self) -> bool:
        return self.outcome != "ok"


# -- classification (pure) --------------------------------------------------------

def first_error_line(console: str, pattern: re.Pattern[str] = ERROR_LINE) -> str:
    """The first console line that reports a kernel error, or ''."""
    for line in console.splitlines():
        if pattern.search(line):
            return line.strip()[:200]
    return ""


def classify(kind: str, exc: BaseException | None, console: str, retried: bool = False,
             output: str = "", booting: bool = False) -> tuple[str, str]:
    """How a trial of ``kind`` ended: ``(outcome, detail)``.

    ``exc`` is what the trial raised (None: it ran to the end), ``console``
    the guest's console output during the trial, ``retried`` whether the boot
    said it booted again after an int3, ``output`` a failed cycle command's
    output, ``booting`` whether ``exc`` came from the start itself."""
    text = console + "\n" + _carried(exc)
    if exc is None and not output:
        if retried:
            return "int3_boot_recovered", ""
        if INT3 in text:               # the guest survived it (the oops killed a process)
            return "int3_running", _line_with(text, INT3)
        err = first_error_line(console, FATAL_LINE)
        return ("other", err) if err else ("ok", "")
    if INT3 in text:
        # after its one retry a cold boot that still dies on int3 died in early boot; a restored
        # (warm) kernel or a cycle's is a running kernel
        early = kind == "cold" and booting and isinstance(exc, (GuestPanic, LaunchError))
        return ("int3_boot" if early else "int3_running"), _line_with(text, INT3)
    if exc is None:
        return "other", first_error_line(console) or (output.strip().splitlines() or ["?"])[0][:200]
    if isinstance(exc, GuestPanic):
        return "other", first_error_line(text) or first_line(exc)
    if isinstance(exc, GuestDied) or (isinstance(exc, LaunchError) and _qemu_gone(exc)):
        return "qemu_died", first_error_line(text) or first_line(exc)
    if isinstance(exc, ChannelError) or (isinstance(exc, GuestTimeout) and _over_ssh(exc)):
        return "ssh_timeout", first_line(exc)
    return "other", first_error_line(text) or first_line(exc)


def _carried(exc: BaseException | None) -> str:
    return "\n".join(str(getattr(exc, a, "") or "") for a in ("console_tail", "output")) if exc else ""


def _over_ssh(exc: GuestTimeout) -> bool:
    """An SSH connect, a guest command or a guest that stopped answering (not the console's boot wait)."""
    return isinstance(exc, GuestHung) or any(w in str(exc) for w in ("SSH", "guest command"))


def _qemu_gone(exc: LaunchError) -> bool:
    return any(w in str(exc) for w in ("QEMU exited", "QEMU closed", "exited or crashed"))


def first_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0][:200]}"


def _line_with(text: str, needle: str) -> str:
    return next((ln.strip()[:200] for ln in text.splitlines() if needle in ln), needle)


# -- the results: a file of trials, added up ------------------------------------------

def load(path: Path | None) -> list[Trial]:
    """The trials in a results file (none if it does not exist)."""
    if path is None or not path.exists():
        return []
    try:
        data = json.loads(path.read_text())
        return [Trial(**t) for t in data["trials"]]
    except (ValueError, KeyError, TypeError) as exc:
        raise ConfigError(f"{path} is not a results file of `labkit bench --reliability`: {exc}",
                       hint="give another --out file, or remove this one") from exc


def save(path: Path, trials: Sequence[Trial]) -> None:
    """Write the trials atomically (an interrupted chunk never leaves half a file)."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps({"version": 1, "trials": [asdict(t) for t in trials]}, indent=0))
    os.replace(tmp, path)


def upper_bound(failures: int, trials: int) -> float:
    """The 95 % upper bound of a failure rate (Wilson score interval: 0 of 200 gives 1.9 %)."""
    if trials == 0:
        return 1.0
    z, p = 1.96, failures / trials
    centre = p + z * z / (2 * trials)
    margin = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials))
    return min(1.0, (centre + margin) / (1 + z * z / trials))


def summarize(trials: Iterable[Trial]) -> dict[str, Any]:
    """Per kernel and kind: trials, failures by outcome, recovered, rates, mean seconds."""
    out: dict[str, dict[str, Any]] = {}
    for t in trials:
        row = out.setdefault(t.kernel, {}).setdefault(t.kind, {
            "trials": 0, "failures": 0, "recovered": 0, "by_outcome": {}, "details": {}, "seconds": 0.0})
        row["trials"] += 1
        row["seconds"] += t.seconds
        if t.failed:
            row["failures"] += 1
            row["recovered"] += t.outcome in RECOVERED
            row["by_outcome"][t.outcome] = row["by_outcome"].get(t.outcome, 0) + 1
            if t.detail:
                row["details"].setdefault(t.outcome, [])
                if t.detail not in row["details"][t.outcome] and len(row["details"][t.outcome]) < 3:
                    row["details"][t.outcome].append(t.detail)
    for kinds in out.values():
        for row in kinds.values():
            n = row["trials"]
            row["mean_s"] = round(row.pop("seconds") / n, 2)
            row["failure_rate"] = round(row["failures"] / n, 4)
            unrecovered = row["failures"] - row["recovered"]
            row["unrecovered_rate"] = round(unrecovered / n, 4)
            row["unrecovered_upper95"] = round(upper_bound(unrecovered, n), 4)
    return {"kernels": out, "totals": _totals(out)}


def _totals(out: dict[str, dict[str, Any]]) -> dict[str, Any]:
    tot: dict[str, Any] = {}
    for kinds in out.values():
        for kind, row in kinds.items():
            t = tot.setdefault(kind, {"trials": 0, "failures": 0, "recovered": 0, "by_outcome": {}})
            for k in ("trials", "failures", "recovered"):
                t[k] += row[k]
            for o, n in row["by_outcome"].items():
                t["by_outcome"][o] = t["by_outcome"].get(o, 0) + n
    return tot


def _version(kernel: str) -> tuple[int, ...]:
    """'6.12' after '6.1' and before '7.3' (not as text)."""
    return tuple(int(p) if p.isdigit() else 0 for p in kernel.split("."))


def format_report(summary: dict[str, Any], accel: str = "") -> str:
    """The table: one line per kernel and kind, then the totals, with rates."""
    cols = [o for o in OUTCOMES if o != "ok"]
    short = {"int3_boot_recovered": "i3boot+rec", "int3_boot": "i3boot", "int3_running": "i3run",
             "ssh_timeout": "ssh", "qemu_died": "qemu", "other": "other"}
    head = f"  {'kernel':7s} {'kind':7s} {'trials':>6s} " + " ".join(f"{short[c]:>10s}" for c in cols)
    lines = [f"labkit bench --reliability{' (' + accel + ')' if accel else ''}: failures per kind", "", head]
    def in_order(kinds: dict[str, Any]) -> list[tuple[str, Any]]:
        return sorted(kinds.items(), key=lambda kv: KINDS.index(kv[0]) if kv[0] in KINDS else len(KINDS))
    rows = [(k, kind, row) for k, kinds in sorted(summary["kernels"].items(), key=lambda kv: _version(kv[0]))
            for kind, row in in_order(kinds)]
    rows += [("all", kind, row) for kind, row in in_order(summary["totals"])]
    for kernel, kind, row in rows:
        cells = " ".join(f"{row['by_outcome'].get(c, 0):>10d}" for c in cols)
        lines.append(f"  {kernel:7s} {kind:7s} {row['trials']:>6d} {cells}")
    lines += ["", "Rates (failures / trials; unrecovered with its 95 % upper bound):"]
    for kernel, kind, row in rows:
        if kernel == "all":
            continue
        n, unrec = row["trials"], row["failures"] - row["recovered"]
        lines.append(f"  {kernel:7s} {kind:7s} {row['failures']}/{n} failed ({100 * row['failure_rate']:.1f} %), "
                     f"{row['recovered']} recovered, {unrec} unrecovered "
                     f"(<= {100 * upper_bound(unrec, n):.1f} %), {row['mean_s']:.1f} s each")
        for outcome, details in row.get("details", {}).items():
            lines += [f"      {outcome}: {d}" for d in details]
    lines += ["", "  columns: " + "; ".join(f"{short[c]} = {OUTCOMES[c]}" for c in cols)]
    return "\n".join(lines)
