"""What ``labkit course grade`` takes from a submission directory, and how.

A submission is a directory named after the student id; its course notebooks
are the regular files named ``NN-title.ipynb``. What a determined student
could put there instead is refused for that notebook alone, with a message
that says what to submit (the rest of the class is graded):

* two files for one course notebook number (``00-welcome.ipynb`` and
  ``00-copy.ipynb``): both are refused, never graded twice;
* a symbolic link (it was followed: a link to the instructor's source
  notebook was graded as the student's), a hard link, a FIFO, a device or a
  directory under a notebook's name;
* a file larger than ``MAX_BYTES``.

A notebook's bytes are read once (``read``: no link followed, never blocking
on a FIFO swapped in after the listing); the recorded sha256 is of those very
bytes, and the notebook graded is parsed from them.
"""

from __future__ import annotations

import os
import re
import stat
from dataclasses import dataclass
from pathlib import Path

from labkit.errors import ConfigError, LabError

STUDENT_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._@+-]{0,63}")
NOTEBOOK_RE = re.compile(r"\d\d-[A-Za-z0-9._-]+\.ipynb")
MAX_BYTES = 32 * 2**20        # a saved course notebook with its outputs is well under 5 MiB


class Refused(LabError):
    """A submitted file that is not graded, and why (the student's feedback)."""

    def __init__(self, problem: str) -> None:
        super().__init__(problem)
        self.problem = problem


@dataclass(frozen=True)
class Entry:
    """One course notebook of one student: the file to grade, or why none is."""

    student: str
    number: str                 # the course notebook number, from the file name
    path: Path                  # the file (the first one, when several were refused)
    refused: str = ""           # "" when it is graded

    @property
    def name(self) -> str:
        return self.path.name


def _kind(st: os.stat_result) -> str:
    if stat.S_ISLNK(st.st_mode):
        return "a symbolic link"
    if stat.S_ISDIR(st.st_mode):
        return "a directory"
    if stat.S_ISFIFO(st.st_mode):
        return "a FIFO"
    if stat.S_ISSOCK(st.st_mode):
        return "a socket"
    if stat.S_ISCHR(st.st_mode) or stat.S_ISBLK(st.st_mode):
        return "a device"
    if not stat.S_ISREG(st.st_mode):
        return "not a regular file"
    if st.st_nlink > 1:
        return "a hard link (the same file as another one)"
    if st.st_size > MAX_BYTES:
        return f"{st.st_size // 2**20} MiB, more than the {MAX_BYTES // 2**20} MiB a notebook may have"
    return ""


def problem(path: Path) -> str:
    """Why ``path`` cannot be graded as it is ("" when it can); links are not followed."""
    try:
        st = os.lstat(path)
    except OSError as exc:
        return f"cannot be read ({exc.strerror})"
    kind = _kind(st)
    return f"{path.name} is {kind}: submit the notebook itself, as a regular file" if kind else ""


def _student(d: Path, seen: set[str]) -> str:
    if not d.is_dir():
        raise ConfigError(f"{d}: not a submission directory",
                          hint="give one directory per student, named after the student id, "
                               "holding that student's notebooks (alice/03-rdma-long-term-pins.ipynb)")
    student = d.resolve().name
    if not STUDENT_RE.fullmatch(student):
        raise ConfigError(f"{d}: {student!r} is not a usable student id",
                          hint="name the directory after the student id: letters, digits, . _ @ + -")
    if student in seen:
        raise ConfigError(f"{d}: student {student!r} given twice", hint="give each submission once")
    seen.add(student)
    return student


def entries(dirs: list[str | os.PathLike]) -> list[Entry]:
    """Every course notebook of every submission directory, in order, each
    with the reason it is refused ("" to grade it); checked before any guest
    starts. An unusable directory is a ConfigError for the whole run (the
    instructor's input, not a student's file)."""
    out: list[Entry] = []
    seen: set[str] = set()
    for d in map(Path, dirs):
        student = _student(d, seen)
        by_number: dict[str, list[Path]] = {}
        for p in sorted(d.iterdir()):
            if NOTEBOOK_RE.fullmatch(p.name):
                by_number.setdefault(p.name[:2], []).append(p)
        if not by_number:
            raise ConfigError(f"{d}: no course notebooks (NN-title.ipynb) in it",
                              hint="the submission holds the student's notebooks, e.g. 00-welcome.ipynb")
        for number, paths in sorted(by_number.items()):
            if len(paths) > 1:
                names = ", ".join(p.name for p in paths)
                out.append(Entry(student, number, paths[0],
                                 f"{len(paths)} files for notebook {number} ({names}): submit exactly one "
                                 f"file per notebook; none of them was graded"))
            else:
                out.append(Entry(student, number, paths[0], problem(paths[0])))
    return out


def read(path: Path) -> bytes:
    """The file's bytes, read once through one descriptor: no link followed,
    no blocking on a FIFO, at most MAX_BYTES; Refused otherwise."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOCTTY)
    except OSError as exc:
        kind = "a symbolic link" if os.path.islink(path) else f"unreadable ({exc.strerror})"
        raise Refused(f"{path.name} is {kind}: submit the notebook itself, as a regular file") from None
    try:
        kind = _kind(os.fstat(fd))
        if kind:
            raise Refused(f"{path.name} is {kind}: submit the notebook itself, as a regular file")
        chunks, size = [], 0
        while chunk := os.read(fd, 1 << 20):
            chunks.append(chunk)
            size += len(chunk)
            if size > MAX_BYTES:
                raise Refused(f"{path.name} grew past {MAX_BYTES // 2**20} MiB while it was read")
        return b"".join(chunks)
    finally:
        os.close(fd)
