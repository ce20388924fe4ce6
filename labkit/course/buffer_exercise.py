"""Exercise 3.8, a code exercise the kernel judges: the learner writes
``def buffer(path, size)`` returning an ``mmap.mmap`` over the fs-dax file at
``path`` that RDMA registration will accept. The source reaches the guest on
the helper's stdin (never as shell text); the guest helper
(``pinprobe learner-buffer``) runs it there in a process of its own as
an unprivileged uid of its own, which registers what it returned with ibv_reg_mr; the judge reads
that process from outside (its /proc/<pid>/maps, its VmPin, the FOLL_PIN
counters, the RDMA regions the kernel lists for its pid) and believes
nothing it prints. The check judges the kernel's answer; the feedback says why an attempt failed
without naming the mapping that passes."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from labkit.course import learner_code

if TYPE_CHECKING:
    from labkit.course.exercises import Live

Result = tuple[bool, str]

MEMORY = "fsdax-xfs"          # the fs-dax file the learner's buffer must map
TIME_UP = learner_code.TIME_UP


@dataclass
class BufferRun:
    """What the guest reported for one run of the learner's ``buffer``."""

    problem: str | None                 # None: a writable mapping was registered (or refused)
    ok: bool = False                    # ibv_reg_mr succeeded
    errname: str | None = None
    backed_by_file: bool = False
    shared: bool = False
    vmpin_kb_delta: int | None = None
    foll_pin_delta: int | None = None
    learner_exited: bool = False          # the learner's process ended before it said it had registered
    exception: str | None = None
    line: int | None = None
    raw: dict[str, Any] = field(default_factory=dict)

    def summary(self) -> str:
        """One line for the notebook: what the kernel did with the learner's buffer."""
        if self.exception:
            where = f" (line {self.line})" if self.line else ""
            return f"your code raised{where}: {self.exception}"
        if self.problem:
            return f"not registered: {self.problem.replace('_', ' ')}"
        kind = ("shared" if self.shared else "private") + (" mapping of the file" if self.backed_by_file
                                                          else " mapping, not of the file")
        verdict = "registered" if self.ok else f"refused ({self.errname})"
        return f"{kind}: {verdict}; VmPin {self.vmpin_kb_delta:+} kB" if self.ok and self.vmpin_kb_delta \
            is not None else f"{kind}: {verdict}"


def source_problem(answer: Any) -> str | None:
    """Why ``answer`` cannot be run at all (checked on the host, no guest
    needed), or None. Only compiled here, never executed."""
    return learner_code.source_problem(answer, "buffer(path, size)")


def from_report(data: dict[str, Any] | None) -> BufferRun:
    """The guest helper's JSON answer as a BufferRun."""
    if not data or "error" in data:
        return BufferRun("no_answer", exception=(data or {}).get("error") or "the process ended without an answer")
    return BufferRun(
        data.get("problem"), bool(data.get("ok")), data.get("errname"), bool(data.get("backed_by_file")),
        bool(data.get("shared")), data.get("vmpin_kb_delta"), data.get("foll_pin_acquired_delta"),
        bool(data.get("learner_exited")), data.get("exception"), data.get("line"), data)


def run_learner_buffer(lab: Any, source: str, timeout: float = 20.0) -> BufferRun:
    """Run the learner's ``buffer`` in the guest on the lab's fs-dax XFS file
    and register what it returns (the lab's RDMA device must be set up)."""
    return from_report(learner_code.run_in_guest(lab, "learner-buffer", MEMORY, "ex3-8", source, timeout))


PROBLEMS = {
    "not_mmap": "buffer() must return an mmap.mmap object",
    "too_small": "the mapping is shorter than size bytes",
    "read_only": "RDMA registers the buffer for writing: the mapping must be writable",
    "no_answer": "your code ended the process before the buffer could be registered",
}


def check_buffer(answer: Any, live: Live) -> Result:
    """Right when the learner's buffer is a mapping of the fs-dax file, the
    kernel registered it and pages were pinned."""
    problem = source_problem(answer)
    if problem:
        return False, problem
    run = live.learner_buffer(answer)
    if run.exception == TIME_UP:
        return False, "your code did not return within the time limit"
    if run.exception and run.problem != "no_answer":
        where = f" on line {run.line}" if run.line else ""
        return False, f"your code raised{where}: {run.exception}"
    if run.problem:
        return False, PROBLEMS.get(run.problem, run.problem)
    if not run.backed_by_file:
        return False, "the buffer is not a mapping of the file at path (look at /proc/self/maps)"
    if not run.ok and not run.errname:
        return False, ("no RDMA registration of your buffer was seen in your process: the kernel never "
                       "registered it")
    if not run.ok:
        if run.shared:
            return False, ("the kernel refused to register it: in a shared mapping the pages are still the "
                           "file's, which the filesystem may need back")
        # measured on 6.1, 6.12 and 7.3: a private mapping with pages never written (untouched, or only
        # read) is refused like a shared one; the slow path sees the fs-dax VMA for those pages
        return False, "the kernel refused to register it: until a page of a private mapping is written, it is " \
                      "still the file's page"
    if not (run.vmpin_kb_delta or run.foll_pin_delta):
        return False, "it registered, but no page was pinned"
    return True, ""


def try_buffer(lab: Any, answer: Any) -> str:
    """Run the learner's ``buffer`` in the guest the way the check does and
    say what the kernel did with it (for the notebook; grading is ``labkit check``)."""
    if answer is Ellipsis:
        return "write your code into answer first"
    problem = source_problem(answer)
    return problem if problem else run_learner_buffer(lab, answer).summary()
