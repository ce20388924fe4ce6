#!/usr/bin/env python3
"""Grade a class on a Slurm cluster: one array task per submission, then the gradebook.

    deploy/slurm/submit-grading.py --out /shared/grades/hw3 /shared/submissions/hw3/*

writes OUT/manifest.txt (one submission directory per line, the order of the array's task ids),
submits grade-array.sbatch as an array job (each task: `labkit course grade SUB --out OUT` in a
fresh VM) and gradebook.sbatch with ``--dependency=afterany`` on it (`labkit course gradebook OUT
-o OUT/grades.csv`), and prints both job ids. OUT and the submissions must be on a filesystem
every node sees.

Per-task resources: ``--mem``, ``--cpus``, ``--time``. ``--kvm`` requests the ``kvm`` GRES (one
unit of a counted, shared resource; see slurm.conf.example) so tasks land on nodes with a working
/dev/kvm; without it the tasks run under TCG, which is slower but correct. ``--task-command`` and
``--merge-command`` replace the default commands (split like a shell would, run without one).

Standard library only, so it runs with any python3 on a login node.
"""

from __future__ import annotations

import argparse
import shlex
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_TASK = "labkit course grade {submission} --out {out}"
DEFAULT_MERGE = "labkit course gradebook {out} -o {out}/grades.csv"


def array_argv(n: int, manifest: Path, out: Path, task: list[str], *, mem: str, cpus: int, time: str,
               kvm: bool, parallel: int | None, partition: str | None) -> list[str]:
    """The sbatch command line of the grading array (pure: tested by list equality)."""
    throttle = f"%{parallel}" if parallel else ""
    argv = ["sbatch", "--parsable", f"--array=0-{n - 1}{throttle}", f"--mem={mem}",
            f"--cpus-per-task={cpus}", f"--time={time}", f"--output={out}/logs/grade-%A_%a.out"]
    if kvm:
        argv.append("--gres=kvm:1")
    if partition:
        argv.append(f"--partition={partition}")
    return [*argv, str(HERE / "grade-array.sbatch"), str(manifest), str(out), "--", *task]


def merge_argv(array_job: str, out: Path, merge: list[str], partition: str | None) -> list[str]:
    """The sbatch command line of the gradebook job, started when every array task has ended."""
    argv = ["sbatch", "--parsable", f"--dependency=afterany:{array_job}", f"--output={out}/logs/gradebook-%j.out"]
    if partition:
        argv.append(f"--partition={partition}")
    return [*argv, str(HERE / "gradebook.sbatch"), str(out), "--", *merge]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("submissions", nargs="+", type=Path, help="one directory per student")
    p.add_argument("--out", type=Path, required=True, help="where each student's JSON and grades.csv go")
    p.add_argument("--mem", default="3G", help="memory per task (default 3G: the VM plus the grader)")
    p.add_argument("--cpus", type=int, default=1, help="CPUs per task (default 1)")
    p.add_argument("--time", default="00:20:00", help="walltime per task (default 20 minutes)")
    p.add_argument("--kvm", action="store_true", help="request the kvm GRES (nodes with a working /dev/kvm)")
    p.add_argument("--parallel", type=int, default=None, help="at most this many tasks at once")
    p.add_argument("--partition", default=None)
    p.add_argument("--task-command", default=DEFAULT_TASK, help=f"default: {DEFAULT_TASK!r}")
    p.add_argument("--merge-command", default=DEFAULT_MERGE, help=f"default: {DEFAULT_MERGE!r}")
    return p.parse_args(argv)


def check_submissions(subs: list[Path]) -> list[Path]:
    """Absolute, existing, distinct, one per line of the manifest."""
    resolved = [s.resolve() for s in subs]
    for s in resolved:
        if not s.is_dir():
            raise SystemExit(f"submit-grading: {s} is not a directory (give one directory per student)")
        if "\n" in str(s):
            raise SystemExit(f"submit-grading: {s!r} has a newline in its name; rename it")
    names = [s.name for s in resolved]
    dups = sorted({n for n in names if names.count(n) > 1})
    if dups:
        raise SystemExit(f"submit-grading: two submissions are named {', '.join(dups)}; each student's "
                         "results file is named after the directory")
    return resolved


def submit(argv: list[str]) -> str:
    r = subprocess.run(argv, capture_output=True, text=True, timeout=60)
    if r.returncode:
        raise SystemExit(f"submit-grading: {shlex.join(argv)} failed: {r.stderr.strip()}")
    return r.stdout.strip().split(";")[0]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    subs = check_submissions(args.submissions)
    out = args.out.resolve()
    (out / "logs").mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.txt"
    manifest.write_text("".join(f"{s}\n" for s in subs))
    array = submit(array_argv(len(subs), manifest, out, shlex.split(args.task_command), mem=args.mem,
                              cpus=args.cpus, time=args.time, kvm=args.kvm, parallel=args.parallel,
                              partition=args.partition))
    merge = submit(merge_argv(array, out, shlex.split(args.merge_command), args.partition))
    print(f"array {array}\ngradebook {merge}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
