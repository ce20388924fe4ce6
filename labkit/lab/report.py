"""Text reports of lab results for the command line (the dashboards draw
their own): one kernel's matrix as a readable table."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from labkit.lab.guest.vocab import result_cell
from labkit.lab.results import traced_function


def format_matrix(m: Mapping[str, Any]) -> str:
    """The matrix as a readable table."""
    lines = [f"kernel {m['kernel']}   accelerator {m['accel']}   measured in {m['seconds']} s", "",
             "DAX mounts"]
    for mt in m["mounts"]:
        warn = "yes" if mt["experimental_warning"] else "no"
        lines.append(f"  {mt['fs']:5s} -o {mt['options']:10s} mounted={'yes' if mt['ok'] else 'NO'}  "
                     f"dax_active={'yes' if mt['dax_active'] else 'no'}  EXPERIMENTAL warning={warn}")
        for ln in mt["kernel_log"]:
            lines.append(f"        {ln}")
    lines += ["", "Pins (ok, or the errno the kernel returned)",
              f"  {'mechanism':9s} {'memory':11s} {'mapping':8s} {'result':14s} {'VmPin kB':>9s} "
              f"{'foll_pin':>9s}  refusal traced"]
    for p in m["pins"]:
        res = result_cell(p["ok"], p["errno"], p["errname"])
        vp = "-" if p["vmpin_kb_delta"] is None else f"{p['vmpin_kb_delta']:+d}"
        fp = "-" if p["foll_pin_delta"] is None else f"{p['foll_pin_delta']:+d}"
        fn = traced_function(p["trace"][0]) if p["trace"] else ""
        tr = p["trace"][0].split(fn, 1)[-1].strip(" )") if fn else ""
        lines.append(f"  {p['mechanism']:9s} {p['memory']:11s} {p['mapping']:8s} {res:14s} {vp:>9s} {fp:>9s}  "
                     + (f"<- {fn} {tr}" if fn else ""))
        for ln in p["kernel_log"]:
            lines.append(f"        {ln}")
    tw = m["truncate_wait"]
    lines += ["", f"truncate of a mapped fs-dax file ({tw['fs']}) while a page is referenced: "
              + (f"blocked for {tw['seconds']:.1f} s in {', '.join(tw['where']) or '?'}" if tw["blocked"]
                 else f"not blocked (took {tw['seconds']} s)")]
    return "\n".join(lines)
