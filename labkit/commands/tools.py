"""``labkit doctor`` and ``labkit bench``: is this host ready, and how fast is it."""

from __future__ import annotations

import argparse
import json
import os
from typing import Any

from labkit.commands.common import err, number, progress_lines
from labkit.image import build as image
from labkit.settings import Settings


def cmd_doctor(args: argparse.Namespace, settings: Settings) -> int:
    if args.capacity:
        from labkit.tools.capacity import capacity
        print(capacity().text())
        return 0
    from labkit.tools.doctor import report, run_checks
    text, ok = report(run_checks(settings=settings))
    print(text)
    return 0 if ok else 1


def cmd_bench(args: argparse.Namespace, settings: Settings) -> int:
    if args.concurrent:
        return bench_concurrent(args, settings)
    if args.reliability:
        return cmd_reliability(args, settings)
    stray = [f for f, v in (("--cold", args.cold), ("--warm", args.warm), ("--cycles", args.cycles),
                            ("--out", args.out), ("--budget", args.budget), ("--parallel", args.parallel != 1)) if v]
    if stray:
        err(f"{stray[0]} counts failures: it goes with --reliability")
        return 2
    from labkit.tools import bench
    kernels = list(image.KERNELS) if args.kernel == "all" else [args.kernel]
    grade = tuple(args.grade or ()) or (tuple(bench.bench_class.default_grade_set()) if args.grade == [] else ())
    missing = [g for g in grade if not os.path.isfile(g)]
    if missing:
        err(f"--grade: no such notebook: {missing[0]}")
        return 2
    extras = bench.Extras(learners=args.learners, matrix_ratio=args.matrix_ratio, grade=grade,
                           first_run=args.first_run)
    say = progress_lines(args.json)
    results = [bench.run(k, runs=args.runs, matrix=not args.no_matrix, progress=say, extras=extras)
               for k in kernels]
    if args.json:
        print(json.dumps(results[0] if len(results) == 1 else {r["kernel"]: r for r in results}, indent=2))
    else:
        print("\n\n".join(bench.format_report(r) for r in results))
    return 0


def bench_concurrent(args: argparse.Namespace, settings: Settings) -> int:
    """``--concurrent N ...``: its own table (the other figures are not measured)."""
    from labkit.tools import bench_concurrent as conc
    if args.kernel == "all":
        err("--concurrent: give one --kernel (the class starts one kernel's guests)")
        return 2
    result = conc.run(args.kernel, args.concurrent, progress_lines(args.json), settings)
    print(json.dumps(result, indent=2) if args.json else conc.format_report(result))
    return 0 if all(row["failed"] == 0 for row in result["concurrent"]) else 1


def cmd_reliability(args: argparse.Namespace, settings: Settings) -> int:
    """``labkit bench --reliability``: failures per kind and kernel (bench_reliability)."""
    from pathlib import Path

    from labkit.tools import bench_reliability as rel
    from labkit.tools.reliability_count import format_report
    if not (args.cold or args.warm or args.cycles) and not args.out:
        err("--reliability: give --cold N, --warm N and/or --cycles N (or --out FILE to print what it holds)")
        return 2
    kernels = list(image.KERNELS) if args.kernel == "all" else [args.kernel]
    plan = rel.Plan(kernels=kernels, cold=args.cold, warm=args.warm, cycles=args.cycles,
                    parallel=args.parallel, budget_s=args.budget)
    summary = rel.measure(plan, settings, Path(args.out) if args.out else None, progress_lines(args.json))
    print(json.dumps(summary, indent=2) if args.json else format_report(summary))
    return 0


def add_doctor(sub: Any) -> None:
    d = sub.add_parser("doctor", help="check that this host can run the lab")
    d.add_argument("--capacity", action="store_true",
                   help="how many learners this host holds at once (cores, memory, measured cost per learner)")
    d.set_defaults(func=cmd_doctor)


def add_bench(sub: Any) -> None:
    bn = sub.add_parser("bench", help="measure cold boot, warm start, reset, SSH, the matrix and memory",
                        description="Runs, one after the other on this machine: a cold boot to SSH-ready, a "
                                    "warm start (snapshot restore) to SSH-ready, a reset, SSH round trips, the "
                                    "full pin matrix on the warm guest, and QEMU's resident memory. Prints "
                                    "ratios of figures from the same run first (warm start over its floor, reset "
                                    "over warm start), then medians and min-max over --runs with the machine "
                                    "and date.")
    bn.add_argument("--kernel", choices=list(image.KERNELS) + ["all"], default=image.DEFAULT_KERNEL,
                    help="kernel variant (default %(default)s)")
    bn.add_argument("--runs", type=number(int, 1, 50, flag="--runs"), default=3,
                    help="repetitions (default %(default)s)")
    bn.add_argument("--json", action="store_true",
                    help="one JSON object: cold_boot_s, warm_start_s, warm_floor_s, reset_s, ssh_rtt_ms, matrix_s, "
                         "qemu_rss_mb, accel (medians), the ratios warm_over_floor, reset_over_warm, "
                         "cold_warm_ratio, plus min/max/raw, machine and date (docs/performance.md)")
    bn.add_argument("--no-matrix", action="store_true", help="skip the pin matrix (much quicker)")
    bn.add_argument("--learners", type=number(int, 0, 20, flag="--learners", hint="use 1..20, or 0 to skip"),
                    default=0, metavar="N",
                    help="N learners' VMs from one snapshot, each running the pin matrix, then one more: "
                         "learner_marginal_mb (its cost in summed PSS), its USS and PSS")
    bn.add_argument("--matrix-ratio", action="store_true",
                    help="matrix_all_over_one: the matrix on every kernel (2 at a time) over one kernel's")
    bn.add_argument("--grade", nargs="*", metavar="NOTEBOOK",
                    help="grade_per_core_hour: grade these notebooks (default: notebooks 01 and 02) as "
                         "submissions with `labkit check`, from the CPU time of the grader and its guest")
    bn.add_argument("--first-run", action="store_true",
                    help="first_run_s: a fresh clone of this repository in a scratch directory, set up like "
                         "`make lab` (no pip cache) to a working first cell of notebook 00; with the download "
                         "size and the disk used (several minutes)")
    bn.add_argument("--concurrent", nargs="+", metavar="N",
                    type=number(int, 1, 32, flag="--concurrent", hint="use 1..32 learners"),
                    help="only this: N learners' guests warm-started at the same instant (each N in turn, "
                         "e.g. --concurrent 1 2 4 8), each then running the first cells (attach, pmem, DAX "
                         "mounts, one pin): time to ready p50/p95/max, failures by kind, the start queue, host "
                         "CPU and memory, p95(N)/p95(1); exit 1 if any start failed")
    rel = bn.add_argument_group("reliability (--reliability: counts failures instead of timing)")
    rel.add_argument("--reliability", action="store_true",
                     help="count failures by kind (int3 oops in early boot recovered or not, int3 in a running "
                          "guest, SSH timeout, QEMU died, other) over cold boots, warm starts and kprobe/module "
                          "cycles in running guests; rates per kernel (docs/performance.md, 'Boot reliability')")
    rel.add_argument("--cold", type=number(int, 0, 10000, flag="--cold"), default=0, metavar="N",
                     help="cold boots per kernel")
    rel.add_argument("--warm", type=number(int, 0, 10000, flag="--warm"), default=0, metavar="N",
                     help="warm starts per kernel")
    rel.add_argument("--cycles", type=number(int, 0, 10000, flag="--cycles"), default=0, metavar="N",
                     help="kprobe and module load/unload cycles (alternating) per kernel, in running guests")
    rel.add_argument("--parallel", type=number(int, 1, 8, flag="--parallel"), default=1, metavar="N",
                     help="guests at a time (default %(default)s)")
    rel.add_argument("--out", metavar="FILE",
                     help="add each trial to this JSON file as it ends and report everything in it, so a long "
                          "measurement runs in chunks that add up")
    rel.add_argument("--budget", type=number(float, above=0, flag="--budget"), metavar="SECONDS",
                     help="start no new trial after this many seconds (a chunk that fits a time slot)")
    bn.set_defaults(func=cmd_bench)

