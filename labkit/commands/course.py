"""``labkit check``, ``labkit source`` and the instructor's ``labkit course ...``."""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from labkit.commands.common import err, positive, progress_lines
from labkit.errors import ConfigError
from labkit.image import build as image
from labkit.settings import Settings

CHECK_EPILOG = """\
A notebook saved with outputs (run in JupyterLab) is graded from the answers recorded in
its outputs; it is never re-run or modified. A notebook without outputs is first executed
headless (nbclient) in memory against the running lab VM (LABKIT_VM, default 'default').
Checks compare answers with what the live guest does now.

exit status: 0 every check passed, 1 some check failed, 2 bad input or lab error"""


def cmd_check(args: argparse.Namespace, settings: Settings) -> int:
    from labkit.course import grading
    notebooks = args.notebooks or grading.default_notebooks()
    if not notebooks:
        err("no notebooks to check: give notebook paths, e.g. labkit check notebooks/03-rdma-pins.ipynb")
        return 2
    results = grading.grade(list(notebooks), progress=progress_lines(args.json))
    print(grading.dumps(results) if args.json else grading.report(results))
    return 0 if all(c.passed for r in results for c in r.checks) else 1


def cmd_source(args: argparse.Namespace, settings: Settings) -> int:
    from labkit.course import source
    if not args.function and not args.grep:
        raise ConfigError("give a function name or --grep REGEX",
                          hint="e.g. labkit source check_vma_flags --mark-return -95")
    if args.grep:
        try:
            re.compile(args.grep)
        except re.error as exc:
            raise ConfigError(f"--grep {args.grep!r} is not a regular expression ({exc})",
                              hint="e.g. --grep FOLL_LONGTERM") from exc
    src = source.for_kernel(args.kernel, progress=lambda s: print(s, file=sys.stderr))
    if args.grep:
        for path, n, fn, text in src.grep(args.grep):
            print(f"{path}:{n}: {fn + '(): ' if fn else ''}{text}")
        return 0
    listing = src.function(args.function)
    mark = listing.returning(args.mark_return) if args.mark_return is not None else []
    print(f"{listing.path}:{listing.start}-{listing.end} (Linux {src.release})")
    print(listing.text(mark))
    return 0


def cmd_course_grade(args: argparse.Namespace, settings: Settings) -> int:
    from labkit.course import gradebook, summative
    jobs = args.jobs or summative.default_jobs()
    opts = summative.Options(timeout=args.timeout, kernel=args.kernel)
    # each student's file and the CSV are written as their notebooks are graded
    results = summative.grade_all(args.submissions, opts, jobs, progress=progress_lines(args.quiet), out=args.out)
    for student, grades in results.items():
        path = gradebook.student_path(args.out, student)
        print(f"{student}: {sum(g.score for g in grades)}/{sum(g.max for g in grades)}  ({path})")
    print(f"CSV: {args.out / 'grades.csv'}")
    return 0


def cmd_course_gradebook(args: argparse.Namespace, settings: Settings) -> int:
    from labkit.course import gradebook
    n = gradebook.merge(args.dirs, args.output)
    print(f"{n} students -> {args.output}")
    return 0


def cmd_course_release(args: argparse.Namespace, settings: Settings) -> int:
    from labkit.course import release
    written = release.release(out_dir=args.out or settings.notebooks_dir, src=args.source)
    for path in written:
        print(path)
    print(f"{len(written)} student notebooks written (solutions and hidden checks stripped, nbgrader metadata kept)",
          file=sys.stderr)
    return 0


def add_check(sub: Any) -> None:
    ck = sub.add_parser("check", help="grade the exercises of course notebooks against the live guest",
                        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=CHECK_EPILOG)
    ck.add_argument("notebooks", nargs="*", metavar="NOTEBOOK", help="notebook files (default: all of notebooks/)")
    ck.add_argument("--json", action="store_true", help="machine-readable results (for an LMS or nbgrader)")
    ck.set_defaults(func=cmd_check)


def add_source(sub: Any) -> None:
    sr = sub.add_parser("source", help="show a function of the guest kernel's own source (Debian linux-source)",
                        description="Prints a function from the exact source of a guest image's kernel (Debian's "
                                    "linux-source package of that version, fetched once, about 150 MB; only the "
                                    "files the course reads are kept). --mark-return -95 marks the lines that "
                                    "return that value, e.g. the ones a kretprobe that saw ret=-95 could have "
                                    "caught.")
    sr.add_argument("function", nargs="?", help="a C function name, e.g. check_vma_flags")
    sr.add_argument("--kernel", choices=list(image.KERNELS), default=image.DEFAULT_KERNEL, help="default %(default)s")
    sr.add_argument("--grep", metavar="REGEX", help="instead: list the lines matching REGEX and their functions")
    sr.add_argument("--mark-return", type=int, metavar="N", help="mark the lines returning N (e.g. -95)")
    sr.set_defaults(func=cmd_source)


def add_course(sub: Any) -> None:
    course = sub.add_parser("course", help="instructor tools: release the student notebooks, summative "
                                           "grading, the gradebook")
    cs = course.add_subparsers(dest="sub", required=True, metavar="ACTION")
    g = cs.add_parser("grade", help="re-execute submissions in fresh sandboxed guests and grade them",
                      description="Each SUBMISSION is a directory named after the student id holding that "
                                  "student's notebooks. Every notebook is run from the top in a fresh throwaway "
                                  "guest by a sandboxed kernel (docs/grading.md), graded on its own, and written "
                                  "to OUT/<student>.json and OUT/grades.csv. Needs bubblewrap, and root or "
                                  "unprivileged user namespaces (docs/grading.md).")
    g.add_argument("submissions", nargs="+", metavar="SUBMISSION")
    g.add_argument("--out", type=Path, default=Path("grades"), help="output directory (default %(default)s)")
    g.add_argument("--jobs", type=positive(int), default=None,
                   help="notebooks graded at a time (default: one per core, as free memory allows)")
    g.add_argument("--timeout", type=positive(float), default=900.0,
                   help="seconds per notebook, run and checks (default %(default)s)")
    g.add_argument("--kernel", choices=list(image.KERNELS), default=None,
                   help=f"guest kernel variant (default {image.DEFAULT_KERNEL})")
    g.add_argument("--quiet", action="store_true", help="no progress lines")
    g.set_defaults(func=cmd_course_grade)
    b = cs.add_parser("gradebook", help="merge per-student grade files into one CSV")
    b.add_argument("dirs", nargs="+", metavar="DIR", help="--out directories (or JSON files) of course grade")
    b.add_argument("-o", "--output", type=Path, required=True, help="the CSV to write")
    b.set_defaults(func=cmd_course_gradebook)
    rel = cs.add_parser("release", help="write the student notebooks from instructor/source (nbgrader's "
                                        "preprocessors strip solutions and hidden checks)")
    rel.add_argument("--out", type=Path, default=None, metavar="DIR", help="where to write them (default: notebooks/)")
    rel.add_argument("--source", type=Path, default=None, metavar="DIR",
                     help="the instructor sources (default: instructor/source/)")
    rel.set_defaults(func=cmd_course_release)
