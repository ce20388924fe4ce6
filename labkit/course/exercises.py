"""The course's exercises: what each asks, its kind, difficulty, points,
staged hints, and the check that judges a learner's answer.

Kinds (points are counted per kind in the instructor report):

* ``value``      – a measured value; auto-checked against the live guest.
* ``code``       – code the learner writes; it runs in the guest and the
  *kernel's answer* is judged, not the text.
* ``prediction`` – written down before a measurement; completion is recorded,
  correctness is not graded.
* ``explain``    – free text; recorded for manual grading with the rubric in
  ``instructor/rubrics.md`` (outside the package).

Every exercise also says who judges it (``judged_by``, required; the
per-category point table in docs/instructor.md is computed from it by
tests/test_points.py, which fails when the table drifts or the course's
ratios are not met):

* ``live``       – the live kernel judges: code the learner writes, an effect
  the learner produces in the guest, or a value the learner must design the
  measurement for (no cell prints it: ``shown_by`` names the words a cell that
  printed it would contain, and the test scans the released notebooks).
* ``copyable``   – a value a cell prints or the prose names.
* ``completion`` – a prediction: a point for a well-formed one.
* ``manual``     – an explanation graded by hand (no autograded points).

Feedback says right or wrong and, when wrong, the first hint. It never shows
the expected value or the live measurement (the notebook cells show those to
a learner who measures). Checks receive a :class:`Live` that measures lazily
and caches, so a notebook is graded with a handful of guest round trips and a
blank answer never touches the guest.

The reference solutions are not here: they live in the instructor sources
(instructor/source/, between ### BEGIN SOLUTION and ### END SOLUTION; see
labkit.course.release), which the tests read through tests/course_solutions.py.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from labkit.course.answers import (
    _as_set,
    _bool_answer,
    _errno_matches,
    _int,
    _name,
    _text,
    probed_function,
)
from labkit.course.buffer_exercise import check_buffer, run_learner_buffer
from labkit.course.fence_exercise import check_fence_probe, run_fence_probe
from labkit.course.predictions import (
    FORM_FILESYSTEMS,
    FORM_ODP,
    FORM_V4L2,
    FORM_YES_NO,
    Form,
    form_outcomes,
    well_formed,
)
from labkit.course.probe_exercise import (
    check_probe,
    run_learner_probe,
)
from labkit.course.truncate_exercise import check_hold, run_learner_hold
from labkit.errors import ConfigError
from labkit.lab.guest.vocab import MECHANISMS, MEMORY_KINDS

Result = tuple[bool, str]
EXERCISE_KINDS = ("value", "code", "prediction", "explain")
JUDGED_BY = ("live", "copyable", "completion", "manual")
DIFFICULTIES = ("intro", "core", "stretch")
RIGHT = "right"


@dataclass(frozen=True)
class Exercise:
    """One exercise: ``id`` is the tag of its notebook cell."""

    id: str
    notebook: str            # the notebook's number prefix, "00" ... "09"
    points: int              # auto-graded points (0 for explain: those are graded by hand)
    title: str
    check: Callable[[Any, Live], Result]
    kind: str = "value"
    difficulty: str = "core"
    hints: tuple[str, ...] = ()
    needs: tuple[tuple[str, str], ...] = ()     # (mechanism, memory) pins the check looks at
    guest: bool = True                          # False: graded from the answer alone
    manual_points: int = 0                      # explain: points an instructor awards with the rubric
    judged_by: str = ""                         # JUDGED_BY: required (see the module's docstring)
    # A live value's answer is printed by no cell: a released notebook's code cell containing every
    # word of one of these groups would print it (tests/test_points.py scans them).
    shown_by: tuple[tuple[str, ...], ...] = ()

    def __post_init__(self) -> None:
        if self.judged_by not in JUDGED_BY:
            raise ConfigError(f"exercise {self.id}: judged_by must be one of {', '.join(JUDGED_BY)}, "
                              f"not {self.judged_by!r}",
                              hint="say who judges it: the live kernel, a copy of a shown value, "
                                   "completion of a prediction, or an instructor by hand")

    def feedback(self, ok: bool, why: str = "") -> str:
        """What a learner sees: right/wrong, and when wrong a reason that
        gives nothing away plus the first hint."""
        if ok:
            return RIGHT
        hint = f" Hint 1/{len(self.hints)}: {self.hints[0]}" if self.hints else ""
        return f"not right{': ' + why if why else ''}.{hint} (more: labkit.course.hint({self.id!r}))"


@dataclass
class Live:
    """Lazy, cached measurements on the running lab guest for the checks."""

    lab: Any
    wanted: set[tuple[str, str]] = field(default_factory=set)
    _cache: dict[str, Any] = field(default_factory=dict)
    source_loader: Callable[[Any], Any] = field(default=None)  # type: ignore[assignment]
    fence_runner: Callable[[Any, str], Any] = field(default=run_fence_probe)    # the seam for ex8.2's unit tests

    def __post_init__(self) -> None:
        if self.source_loader is None:
            from labkit.course.source import for_lab
            self.source_loader = for_lab

    def _once(self, key: str, fn: Callable[[], Any]) -> Any:
        if key not in self._cache:
            self._cache[key] = fn()
        return self._cache[key]

    def mounts(self) -> list:
        """Fresh DAX mounts of both filesystems (the kernel log of each mount)."""
        return self._once("mounts", self.lab.prepare_mounts)

    def ready(self) -> None:
        def setup() -> bool:
            self.mounts()
            self.lab.setup_rdma()
            self.lab.setup_vivid()
            return True
        self._once("ready", setup)

    def pin(self, mechanism: str, memory: str, mapping: str = "shared"):
        """The live result of one pin attempt; every shared-mapping attempt the
        graded checks need is measured in one batch the first time any is asked for."""
        key = f"pin:{mechanism}:{memory}:{mapping}"
        if key not in self._cache:
            self.ready()
            cases = sorted({(m, k, "shared") for m, k in self.wanted} | {(mechanism, memory, mapping)})
            cases = [c for c in cases if f"pin:{c[0]}:{c[1]}:{c[2]}" not in self._cache]
            for (mech, mem, mp), res in zip(cases, self.lab.pin_many(cases)):
                self._cache[f"pin:{mech}:{mem}:{mp}"] = res
        return self._cache[key]

    def truncate(self, fs: str, hold: float = 3.0):
        self.ready()
        return self._once(f"truncate:{fs}:{hold}", lambda: self.lab.truncate_wait(fs, hold=hold))

    def revoke(self, memory: str, kind: str, op: str = "write"):
        """An MR of ``kind`` over ``memory``, revoked around an RDMA ``op`` (labkit.lab.odp)."""
        self.ready()
        return self._once(f"revoke:{memory}:{kind}:{op}", lambda: self.lab.odp_revoke(memory, kind=kind, op=op))

    def sh(self, script: str) -> str:
        return self._once(f"sh:{script}", lambda: self.lab.sh(script).stdout.strip())

    def namespaces(self) -> list:
        return self._once("namespaces", lambda: (self.lab.prepare_pmem(), self.lab.namespaces())[1])

    def source(self):
        """The running kernel's own source (labkit.course.source), fetched once
        per kernel; ``source_loader`` is the seam the unit tests replace."""
        return self._once("source", lambda: self.source_loader(self.lab))

    def learner_probe(self, definition: str):
        """Run a learner's kretprobe definition around one refused and one
        allowed registration (see :func:`judge_probe`)."""
        self.ready()
        return self._once(f"probe:{definition}", lambda: run_learner_probe(self.lab, definition))

    def fence_probe(self, definition: str):
        """A learner's kretprobe around the second fence, on a 7.3 guest
        (see :mod:`labkit.course.fence_exercise`)."""
        return self._once(f"fence:{definition}", lambda: self.fence_runner(self.lab, definition))

    def shrink(self, fs: str, op: str):
        """Truncate or hole punch of a mapped fs-dax file while a page is referenced."""
        self.ready()
        return self._once(f"shrink:{fs}:{op}", lambda: self.lab.truncate_wait(fs, op=op))

    def learner_buffer(self, source: str):
        """Run a learner's ``buffer(path, size)`` in the guest and register
        what it returns (see :mod:`labkit.course.buffer_exercise`)."""
        self.ready()
        return self._once(f"buffer:{source}", lambda: run_learner_buffer(self.lab, source))

    def learner_hold(self, source: str):
        """Run a learner's ``hold(m)`` in the guest around a truncate of the
        mapped fs-dax file (see :mod:`labkit.course.truncate_exercise`)."""
        self.ready()
        return self._once(f"hold:{source}", lambda: run_learner_hold(self.lab, source))


# -- checks: values ----------------------------------------------------------------


def check_chardev_mode(answer: Any, live: Live) -> Result:
    modes = {ns.mode for ns in live.namespaces() if ns.chardev}
    return isinstance(answer, str) and _text(answer) in modes, ""


def check_experimental(answer: Any, live: Live) -> Result:
    got = _as_set(answer)
    if got is None:
        return False, "give a list of filesystem names, [] for none"
    return got == {m.fs for m in live.mounts() if m.experimental_warning}, ""


def check_refusing_function(answer: Any, live: Live) -> Result:
    res = live.pin("rdma", "fsdax-xfs")
    refusers = {probed_function(t) for t in res.trace} - {None}
    name = _name(answer)
    return bool(name) and not res.ok and name in refusers, ""


# the fs-dax test of check_vma_flags() in every kernel the lab boots
FSDAX_TEST = r"FOLL_LONGTERM\)\s*&&\s*vma_is_fsdax\(vma\)"


def check_refusing_line(answer: Any, live: Live) -> Result:
    """The line number (in the running kernel's file) of the return the
    kretprobe caught: the fs-dax test's return, or the test itself. Another line
    returning the same errno is wrong - that is the point of the exercise."""
    got = _int(answer)
    res = live.pin("rdma", "fsdax-xfs")
    seen = [(probed_function(t), re.search(r"ret=(-?\d+)", t)) for t in res.trace]
    hits = [(fn, int(m.group(1))) for fn, m in seen if fn and m]
    if got is None or res.ok or not hits:
        return False, ""
    fn, ret = hits[0]
    listing = live.source().function(fn)
    right = set()
    for n in listing.matching(FSDAX_TEST):
        if n + 1 in listing.returning(ret):
            right |= {n, n + 1}
    return got in right, ""


# The four mechanisms notebook 05 classifies (rdma-odp, notebook 09's, pins nothing).
CLASSIFIED = tuple(m for m in MECHANISMS if m != "rdma-odp")


# The order of the four steps, from the kernel's history (labkit.course.facts).
HISTORY_ORDER = ("get_user_pages_longterm", "foll_longterm", "foll_pin", "check_vma_flags")


def check_history(answer: Any, live: Live) -> Result:
    if not isinstance(answer, (list, tuple)) or len(answer) != len(HISTORY_ORDER):
        return False, "give a list of the four names, oldest first"
    return tuple(_name(a) for a in answer) == HISTORY_ORDER, ""


LAB_MOUNTS = ("/mnt/fsdax-xfs", "/mnt/fsdax-ext4", "/mnt/raw-try")


def check_capstone_mount(answer: Any, live: Live) -> Result:
    mp = str(answer).strip().rstrip("/") if isinstance(answer, str) else ""
    if not re.fullmatch(r"/mnt/[a-zA-Z0-9_-]{1,48}", mp):
        return False, "give a mount point under /mnt"
    if mp in LAB_MOUNTS:
        return False, "that is one of the lab's own mounts, not a second one of yours"
    try:
        info = live.lab.mount_info(mp)
    except ConfigError:
        return False, "give a mount point under /mnt"
    if not info.is_mountpoint:
        return False, "nothing is mounted there in the guest right now"
    return info.fs == "xfs" and info.dax_active, ""


def check_capstone_vmpin(answer: Any, live: Live) -> Result:
    got = _int(answer)
    if got is None:
        return False, "give a whole number of kB"
    live.ready()        # soft-RoCE on this guest, whatever other checks ran before (or did not)
    res = live._once("pin4m", lambda: live.lab.pin("rdma", "anon", size=4 * 2**20))
    return got == res.vmpin_kb_delta, ""


# -- checks: values the learner designs the measurement for ----------------------------

def _bytes(answer: Any) -> int | None:
    """A size in bytes: 2097152, "2097152", "2M", "2 MiB", "2048k"."""
    got = _int(answer)
    if got is None and isinstance(answer, str):
        m = re.fullmatch(r"\s*(\d+)\s*(k|kb|kib|m|mb|mib)\s*", answer.lower())
        got = int(m.group(1)) * (1024 if m.group(2).startswith("k") else 2**20) if m else None
    return got


def check_nproc(answer: Any, live: Live) -> Result:
    got = _int(answer)
    if got is None:
        return False, "give a whole number"
    return got == _int(live.sh("nproc")), ""


def check_devdax_align(answer: Any, live: Live) -> Result:
    got = _bytes(answer)
    if got is None:
        return False, "give a number of bytes"
    ns = next((n for n in live.namespaces() if n.mode == "devdax"), None)
    return ns is not None and ns.align is not None and got == int(ns.align), ""


def check_pmd_size(answer: Any, live: Live) -> Result:
    got = _bytes(answer)
    if got is None:
        return False, "give a number of bytes"
    return got == _int(live.sh("cat /sys/kernel/mm/transparent_hugepage/hpage_pmd_size")), ""


def check_rdma_pagecache_private(answer: Any, live: Live) -> Result:
    return _errno_matches(answer, live.pin("rdma", "pagecache", "private"))


DEVDAX_SIZE = 6 * 2**20      # a multiple of the device-dax alignment, and no size a cell registers


def check_devdax_vmpin(answer: Any, live: Live) -> Result:
    """VmPin (kB) of an RDMA registration of 6 MiB of device-dax memory."""
    got = _int(answer)
    if got is None:
        return False, "give a whole number of kB"
    live.ready()
    res = live._once("pin-devdax-6m", lambda: live.lab.pin("rdma", "devdax", size=DEVDAX_SIZE))
    return got == res.vmpin_kb_delta, ""


def check_v4l2_pagecache_pages(answer: Any, live: Live) -> Result:
    got = _int(answer)
    return got is not None and got == (live.pin("v4l2", "pagecache").foll_pin_delta or 0), ""


def check_v4l2_pagecache_vmpin(answer: Any, live: Live) -> Result:
    got = _int(answer)
    return got is not None and got == (live.pin("v4l2", "pagecache").vmpin_kb_delta or 0), ""


def check_v4l2_ext4(answer: Any, live: Live) -> Result:
    return _errno_matches(answer, live.pin("v4l2", "fsdax-ext4"))


def check_private_fsdax(answer: Any, live: Live) -> Result:
    """The four mechanisms on a MAP_PRIVATE mapping of the fs-dax XFS file,
    pages never written: "ok" or the errno, per mechanism."""
    if not isinstance(answer, dict) or set(answer) != set(CLASSIFIED):
        return False, "give a dict with exactly the four mechanisms as keys"
    for mech in CLASSIFIED:
        ok, _ = _errno_matches(answer[mech], live.pin(mech, "fsdax-xfs", "private"))
        if not ok:
            return False, ""
    return True, ""


def check_odirect_ext4_follpin(answer: Any, live: Live) -> Result:
    got = _bool_answer(answer)
    if got is None:
        return False, "answer True or False"
    return got == bool(live.pin("odirect", "fsdax-ext4").foll_pin_delta), ""


HOLDS_SHOWN = (1.0, 3.0)        # the holds the notebooks' cells use (06 and the matrix)


def check_truncate_hold(answer: Any, live: Live) -> Result:
    """A measurement the learner designs: (hold, seconds) for a hold of their
    own; the judge truncates with the same hold and compares the wait."""
    if not isinstance(answer, (list, tuple)) or len(answer) != 2 or \
            not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in answer):
        return False, "give a pair (hold, seconds) of numbers"
    hold, seconds = float(answer[0]), float(answer[1])
    if not 1.5 <= hold <= 8.0 or hold in HOLDS_SHOWN:
        return False, "choose a hold of your own between 1.5 and 8 seconds (not one a cell used)"
    tw = live.truncate("xfs", hold=hold)
    return tw.blocked and abs(seconds - tw.seconds) <= max(0.75, 0.2 * tw.seconds), ""


def check_truncate_caller_ext4(answer: Any, live: Live) -> Result:
    """The function that called ext4's layout-breaking function on the
    truncating thread's stack (the frame after the outermost break-layouts one)."""
    name = _name(answer)
    if not name:
        return False, ""
    # A stack is one sample of a sleeping thread: up to three samples, each the live kernel's own
    # (the second fresh run of the fresh-clone suite saw one sample disagree with the learner's).
    for attempt in range(3):
        where = live.truncate("ext4").where if attempt == 0 else live.lab.truncate_wait("ext4").where
        frames = [w.split("+")[0].lower() for w in where]
        breaking = [i for i, f in enumerate(frames) if "break" in f and "layout" in f]
        if breaking and breaking[-1] + 1 < len(frames) and name == frames[breaking[-1] + 1]:
            return True, ""
    return False, ""


def check_iouring_ext4_private(answer: Any, live: Live) -> Result:
    return _errno_matches(answer, live.pin("io_uring", "fsdax-ext4", "private"))


def check_iouring_pagecache(answer: Any, live: Live) -> Result:
    return _errno_matches(answer, live.pin("io_uring", "pagecache"))


def check_odirect_ext4_private(answer: Any, live: Live) -> Result:
    got = _bool_answer(answer)
    if got is None:
        return False, "answer True or False"
    return got == live.pin("odirect", "fsdax-ext4", "private").ok, ""


def _status(answer: Any) -> str:
    return _text(answer).removeprefix("ibv_wc_") if isinstance(answer, str) else ""


def check_pinned_pagecache_write(answer: Any, live: Live) -> Result:
    """A pinned MR over a page-cache file, the file truncated, an RDMA WRITE
    after: the completion's status (or the registration's errno)."""
    return _write_after_revoke(answer, live.revoke("pagecache", "pinned", "write"))


def _write_after_revoke(answer: Any, rv: Any) -> Result:
    """The status of the RDMA WRITE after a revocation, or the registration's errno if it was refused."""
    if not rv.registered:
        return _errno_matches(answer, type("R", (), {"ok": False, "errno": rv.errno})())
    after = rv.after.status_name if rv.after else "no completion"
    return bool(_status(answer)) and _status(answer) == _status(after), ""


def check_pinned_anon_read(answer: Any, live: Live) -> Result:
    got = _bool_answer(answer)
    if got is None:
        return False, "answer True or False"
    rv = live.revoke("anon", "pinned", "read")
    return got == bool(rv.registered and rv.after is not None and rv.after.ok), ""


# -- checks: predictions and explanations ---------------------------------------------

def prediction(form: Form) -> Callable[[Any, Live], Result]:
    """Completion only, for a well-formed prediction of ``form`` (never for being right)."""
    def check(answer: Any, live: Live) -> Result:
        return well_formed(form, answer)
    check.__name__ = "check_prediction"
    return check


def check_explain(answer: Any, live: Live) -> Result:
    """Recorded for the instructor: a few words at least; graded by hand."""
    ok = isinstance(answer, str) and len(answer.split()) >= 5
    return ok, "" if ok else "write a few sentences"


# -- the exercise list ---------------------------------------------------------------

def _hints(*h: str) -> tuple[str, ...]:
    return h


# -- notebook 06: the hole punch; notebook 08: the taint ------------------------------

def check_punch_ext4(answer: Any, live: Live) -> Result:
    """A function on the hole-punching process's stack that breaks the layouts or
    waits for the page, on ext4 (the notebook's cell shows XFS only)."""
    name = _name(answer)
    if not name:
        return False, "give a function name"
    tw = live.shrink("ext4", "punch")
    frames = [w.split("+")[0].lower() for w in tw.where]
    waits = "layout" in name or ("wait" in name and "dax" in name)
    return tw.blocked and name in frames and waits, ""


def check_taint_bits(answer: Any, live: Live) -> Result:
    """The bits of /proc/sys/kernel/tainted that loading the unsigned, out-of-tree
    module sets: the kernel ABI's O and E (Documentation/admin-guide/tainted-kernels.rst)."""
    from labkit.lab.counterfactual import TAINT_FLAGS
    if not isinstance(answer, (list, tuple, set)) or not all(isinstance(b, int) and not isinstance(b, bool)
                                                              for b in answer):
        return False, "give a list of bit numbers, e.g. [3, 5]"
    want = {bit for bit, (letter, _) in TAINT_FLAGS.items() if letter in ("O", "E")}
    return set(answer) == want, ""


def check_counterfactual_target(answer: Any, live: Live) -> Result:
    name = _text(answer).removesuffix("()") if isinstance(answer, str) else ""
    return name == "check_vma_flags", ""


def _pin_shown(mech: str, memory: str, mapping: str = "shared") -> tuple[tuple[str, ...], ...]:
    """The words of a code cell that measures this pin (its memory kind spelled out or via a vocabulary name)."""
    return ((mech, memory) if mapping == "shared" else (mech, memory, mapping),)


LIVE, COPY, DONE, HAND = "live", "copyable", "completion", "manual"

EXERCISES: tuple[Exercise, ...] = (
    Exercise("ex0.1", "00", 1, "how many CPUs the guest has", check_nproc, difficulty="intro", judged_by=LIVE,
             shown_by=(("nproc",), ("cpuinfo",), ("cpu_count",)),
             hints=_hints("no cell printed it: ask the guest yourself, the way the cell above asked for its release",
                          "a Linux system counts the processors it may use for you: which coreutils command?")),
    Exercise("ex1.1", "01", 1, "the namespace mode with a character device", check_chardev_mode, difficulty="intro",
             judged_by=COPY,
             hints=_hints("which mode has no block device and no filesystem?", "look at the device names ndctl shows")),
    Exercise("ex1.2", "01", 1, "the alignment of the devdax namespace", check_devdax_align, difficulty="intro",
             judged_by=LIVE, shown_by=(("align",),),
             hints=_hints("the cells printed some of each namespace's fields, not all: lab.namespaces() has more",
                          "a device-dax mapping must be sized and placed at this boundary; bytes")),
    Exercise("ex1.3", "01", 0, "why raw mode cannot do DAX", check_explain, kind="explain", manual_points=2,
             guest=False, judged_by=HAND, hints=_hints("what does every page the kernel hands to a device need?")),
    Exercise("ex2.0", "02", 1, "prediction: which filesystems warn", prediction(FORM_FILESYSTEMS),
             kind="prediction", guest=False, judged_by=DONE),
    Exercise("ex2.1", "02", 1, "which filesystems print the EXPERIMENTAL warning", check_experimental,
             judged_by=COPY, hints=_hints("the kernel log of your own mounts answers it", "a list, possibly empty")),
    Exercise("ex2.2", "02", 1, "the largest page a DAX mapping can use", check_pmd_size, difficulty="intro",
             judged_by=LIVE, shown_by=(("hpage_pmd_size",),),
             hints=_hints("one page-table entry one level above the PTE maps a whole huge page",
                          "the kernel publishes the size of a PMD-mapped transparent huge page in sysfs")),
    Exercise("ex3.0", "03", 1, "prediction: RDMA on five memory kinds",
             prediction(form_outcomes(MEMORY_KINDS, "anon")), kind="prediction", guest=False, judged_by=DONE),
    Exercise("ex3.1", "03", 1, "RDMA on a private mapping of a page-cache file", check_rdma_pagecache_private,
             judged_by=LIVE, shown_by=_pin_shown("rdma", "pagecache", "private"),
             hints=_hints("the table measured MAP_SHARED mappings only: lab.pin takes a mapping too",
                          "\"ok\" if it registered, else the errno's name or number")),
    Exercise("ex3.2", "03", 1, "VmPin of a 6 MiB device-dax registration", check_devdax_vmpin,
             judged_by=LIVE, shown_by=(("6 * 2**20",), ("6291456",), ("size=6",)),
             hints=_hints("the table registered 2 MiB of each kind: lab.pin takes a size too",
                          "a device-dax mapping's size is a multiple of its alignment (notebook 1)")),
    Exercise("ex3.3", "03", 1, "the kernel function that refuses", check_refusing_function, judged_by=COPY,
             needs=(("rdma", "fsdax-xfs"),),
             hints=_hints("the traced line names the function whose return was probed",
                          "just the function's name, not its caller")),
    Exercise("ex3.4", "03", 4, "write a kretprobe that catches the refusal", check_probe, kind="code",
             difficulty="stretch", judged_by=LIVE,
             hints=_hints("a return probe is  r FUNCTION $retval:s32  (Documentation/trace/kprobetrace.rst)",
                          "which function returns -EOPNOTSUPP when the VMA is fs-dax?",
                          "a return probe sees the errno in the function that decides it or in any caller that "
                          "passes it up: the decision is about the whole mapping, made before any page is taken")),
    Exercise("ex3.5", "03", 0, "why EOPNOTSUPP and not EPERM", check_explain, kind="explain", manual_points=3,
             guest=False, judged_by=HAND,
             hints=_hints("is the caller forbidden something, or is the operation unsupported "
                          "for this kind of memory?")),
    Exercise("ex3.6", "03", 1, "the line of the kernel's source that refused", check_refusing_line,
             needs=(("rdma", "fsdax-xfs"),), judged_by=COPY,
             hints=_hints("the marked lines return the errno the kretprobe saw; more than one may",
                          "which marked line follows a test of FOLL_LONGTERM and fs-dax?",
                          "give the line number printed at the left of the listing")),
    Exercise("ex3.7", "03", 0, "why gup-fast must fall back for DAX", check_explain, kind="explain",
             manual_points=3, guest=False, judged_by=HAND,
             hints=_hints("what can the lockless fast path see of a page, and what can it not see of the VMA?")),
    Exercise("ex3.8", "03", 3, "a buffer on the fs-dax file that RDMA may pin", check_buffer, kind="code",
             difficulty="stretch", judged_by=LIVE,
             hints=_hints("the registration above was of a MAP_SHARED mapping: which pages does the device get?",
                          "mmap flags: MAP_SHARED or MAP_PRIVATE (mmap.ACCESS_WRITE or mmap.ACCESS_COPY)",
                          "after a write to a private mapping, whose page is it: the file's or the process's? "
                          "The device must be given only pages of the second kind")),
    Exercise("ex3.9", "03", 0, "why a written private mapping may be pinned", check_explain, kind="explain",
             manual_points=3, guest=False, judged_by=HAND,
             hints=_hints("after copy-on-write, who owns the pages the device would get: the file or the process?")),
    Exercise("ex4.0", "04", 1, "prediction: pages pinned by one buffer", prediction(FORM_V4L2), kind="prediction",
             guest=False, judged_by=DONE),
    Exercise("ex4.1", "04", 1, "pages pinned by one USERPTR buffer in the page cache", check_v4l2_pagecache_pages,
             needs=(("v4l2", "pagecache"),), judged_by=LIVE, shown_by=_pin_shown("v4l2", "pagecache"),
             hints=_hints("measure it: the table had no page-cache row", "nr_foll_pin_acquired counts pages; "
                          "a refused pin pins nothing")),
    Exercise("ex4.2", "04", 1, "VmPin change for V4L2 in the page cache", check_v4l2_pagecache_vmpin,
             needs=(("v4l2", "pagecache"),), judged_by=LIVE, shown_by=_pin_shown("v4l2", "pagecache"),
             hints=_hints("VmPin is accounted by the driver that pins, not by GUP", "the same measurement as 4.1")),
    Exercise("ex4.3", "04", 1, "V4L2 USERPTR on fs-dax ext4: the errno", check_v4l2_ext4,
             needs=(("v4l2", "fsdax-ext4"),), judged_by=LIVE, shown_by=_pin_shown("v4l2", "fsdax-ext4"),
             hints=_hints("the table measured the XFS file only: measure the ext4 one", "a name or a number")),
    Exercise("ex5.0", "05", 1, "prediction: transient pins on fs-dax",
             prediction(form_outcomes(tuple(f"{m} {k}" for m in ("odirect", "io_uring")
                                            for k in ("anon", "fsdax-xfs", "devdax")), "odirect anon")),
             kind="prediction", guest=False, judged_by=DONE),
    Exercise("ex5.1", "05", 2, "four mechanisms on a private fs-dax mapping", check_private_fsdax, judged_by=LIVE,
             shown_by=tuple((m, "fsdax-xfs", "private") for m in CLASSIFIED),
             hints=_hints("does the kernel decide by the kind of mapping or by the kind of pin? Measure with "
                          "mapping=\"private\"", "all four keys: rdma, v4l2, odirect, io_uring; \"ok\" or an errno")),
    Exercise("ex5.2", "05", 1, "does O_DIRECT into fs-dax ext4 use FOLL_PIN", check_odirect_ext4_follpin,
             needs=(("odirect", "fsdax-ext4"),), judged_by=LIVE, shown_by=_pin_shown("odirect", "fsdax-ext4"),
             hints=_hints("the table measured the XFS file: measure the ext4 one and read nr_foll_pin_acquired",)),
    Exercise("ex5.3", "05", 0, "why a transient pin is acceptable", check_explain, kind="explain", manual_points=3,
             guest=False, judged_by=HAND, hints=_hints("who decides when it ends, and how long can that take?")),
    Exercise("ex6.0", "06", 1, "prediction: does truncate wait", prediction(FORM_YES_NO), kind="prediction",
             guest=False, judged_by=DONE),
    Exercise("ex6.1", "06", 1, "how long truncate waits for a hold of your choice", check_truncate_hold,
             judged_by=LIVE, shown_by=(),
             hints=_hints("lab.truncate_wait takes the hold, in seconds", "give (hold, seconds waited) as measured")),
    Exercise("ex6.2", "06", 1, "the history in order", check_history, difficulty="core", guest=False,
             judged_by=COPY,
             hints=_hints("the history table above", "oldest first: a function, a flag, a new kind of pin, "
                                                      "then where the check lives")),
    Exercise("ex6.3", "06", 0, "why device-dax is exempt", check_explain, kind="explain", manual_points=3,
             guest=False, judged_by=HAND, hints=_hints("what operation makes a filesystem wait for a page?")),
    Exercise("ex6.4", "06", 0, "the deliberate -stable regression", check_explain, kind="explain",
             manual_points=3, guest=False, judged_by=HAND,
             hints=_hints("what did tagging the patches for -stable break, on purpose, and for whom?")),
    Exercise("ex6.5", "06", 3, "make truncate wait, then let it finish", check_hold, kind="code",
             difficulty="stretch", judged_by=LIVE,
             hints=_hints("an RDMA registration (register_mr) of fs-dax is refused since v4.15 (5f1d43de5416): "
                          "which other reference to a page lasts until you drop it?",
                          "the demonstration above held a page without pinning it: how, according to the prose? "
                          "Which of the helpers your code is given takes the same kind of reference?",
                          "what holds the references must be able to let them go on request: the function you "
                          "return undoes what hold took")),
    Exercise("ex6.6", "06", 2, "where a hole punch waits (ext4)", check_punch_ext4, difficulty="stretch",
             judged_by=LIVE, shown_by=(("truncate_wait", "ext4", "punch"),),
             hints=_hints("the cell above measured XFS; measure the other filesystem yourself",
                          "lab.truncate_wait(fs, op=...) returns where the process slept",
                          "the frame that breaks the layouts or waits for the DAX page, not the system call")),
    Exercise("ex7.1", "07", 2, "a DAX mount of your own", check_capstone_mount, difficulty="stretch", judged_by=LIVE,
             hints=_hints("lab.mount(fs, device, mountpoint, options=...)", "a new mount point, with DAX on")),
    Exercise("ex7.2", "07", 1, "io_uring on a private fs-dax ext4 mapping", check_iouring_ext4_private,
             judged_by=LIVE, shown_by=_pin_shown("io_uring", "fsdax-ext4", "private"),
             hints=_hints("measure it: lab.pin(mechanism, memory, mapping)", "\"ok\" or the errno")),
    Exercise("ex7.3", "07", 1, "io_uring fixed buffers in the page cache", check_iouring_pagecache,
             needs=(("io_uring", "pagecache"),), judged_by=LIVE, shown_by=_pin_shown("io_uring", "pagecache"),
             hints=_hints("measure io_uring on the page-cache file itself", "\"ok\" or the errno")),
    Exercise("ex7.4", "07", 2, "VmPin of a 4 MiB registration", check_capstone_vmpin, difficulty="stretch",
             judged_by=LIVE, shown_by=(("4 * 2**20",), ("4194304",), ("size=4",)), hints=_hints("read VmPin while the registration is held, then release it",)),
    Exercise("ex7.5", "07", 1, "who asked ext4 to break the layouts", check_truncate_caller_ext4, judged_by=LIVE,
             shown_by=(("truncate_wait", "ext4"),),
             hints=_hints("run the truncate demonstration on ext4 and read the whole stack",
                          "the frame right after (outside) the layout-breaking one")),
    Exercise("ex7.6", "07", 1, "O_DIRECT into a private fs-dax ext4 mapping", check_odirect_ext4_private,
             judged_by=LIVE, shown_by=_pin_shown("odirect", "fsdax-ext4", "private"),
             hints=_hints("measure it: lab.pin('odirect', ..., mapping=...)", "True if it succeeded")),
    Exercise("ex8.1", "08", 1, "the function whose answer module 1 changes", check_counterfactual_target,
             guest=False, judged_by=COPY,
             hints=_hints("the module's kretprobe names it", "the function that refuses in notebook 3")),
    Exercise("ex8.2", "08", 3, "a kretprobe that shows the second fence (7.3)", check_fence_probe, kind="code",
             difficulty="stretch", judged_by=LIVE,
             hints=_hints("the table of the fence trace says which function answers something other than a "
                          "page count, each round",
                          "a return probe is  r FUNCTION $retval:s32; probe the step after the pages are pinned",
                          "which step decides that fs-dax folios must move, and what does it answer when it "
                          "cannot move them?")),
    Exercise("ex8.3", "08", 1, "the taint bits module 1 sets", check_taint_bits, guest=False, judged_by=COPY,
             hints=_hints("the value printed after the load is a sum of powers of two",
                          "bit n is 2**n; Documentation/admin-guide/tainted-kernels.rst lists the letters")),
    Exercise("ex9.0", "09", 1, "prediction: does truncate wait under an ODP MR", prediction(FORM_ODP),
             kind="prediction", guest=False, judged_by=DONE),
    Exercise("ex9.1", "09", 1, "a pinned MR over the page cache, truncated", check_pinned_pagecache_write,
             judged_by=LIVE, shown_by=(("odp_revoke", "pagecache"),),
             hints=_hints("lab.odp_revoke takes the memory kind and the MR kind",
                          "the completion's status name of the WRITE after (or the errno if it did not register)")),
    Exercise("ex9.2", "09", 1, "an RDMA READ through a pinned MR after MADV_DONTNEED", check_pinned_anon_read,
             judged_by=LIVE, shown_by=(("odp_revoke", "read"),),
             hints=_hints("lab.odp_revoke takes the RDMA operation too", "True if the READ completed successfully")),
    Exercise("ex9.3", "09", 0, "why truncate need not wait for an ODP MR", check_explain, kind="explain",
             manual_points=3, guest=False, judged_by=HAND,
             hints=_hints("what does the kernel do to the device's mapping instead of waiting, and what did "
                          "the next RDMA WRITE get?")),
)


# -- notebook 10: where the rule lived before v5.11 (issue 23) ---------------------------------
# One code exercise, judged on a 5.10 guest by exercise 3.4's judge (check_probe): this notebook's
# lab VM when it runs 5.10, else its "before511" companion (labkit.lab.companion), which the
# grader starts next to the lab VM (COMPANIONS) and the notebook attaches to.

def live_before_511(live: Live) -> Live:
    """``live`` when its guest runs the kernel before v5.11, else a Live on the companion."""
    from labkit.lab.companion import BEFORE_511, attach

    def make() -> Live:
        if live.sh("uname -r").startswith(BEFORE_511 + "."):
            return live
        from labkit.lab.lab import Lab
        return Live(Lab(attach("before511", live.lab.vm)), source_loader=live.source_loader)
    return live._once("before511", make)


def check_probe_before_511(answer: Any, live: Live) -> Result:
    """ex10.1: the learner's kretprobe must catch the fs-dax refusal of a reg_mr on 5.10,
    where check_vma_flags() has no fs-dax test (and no symbol to probe)."""
    from labkit.course.probe_exercise import parse_probe
    if parse_probe(answer) is None:
        return False, "write one return probe line:  r FUNCTION $retval:s32"
    return check_probe(answer, live_before_511(live))


# The kernel whose soft-RoCE does on-demand paging (rxe ODP, v6.15): notebook 09's
# ODP exercises are judged there, on the notebook's own guest or its "odp" companion.
ODP_KERNEL = "7.3"


def live_with_odp(live: Live) -> Live:
    """``live`` when its guest runs ODP_KERNEL, else a Live on the notebook's 7.3 companion."""
    def make() -> Live:
        if live.sh("uname -r").startswith(ODP_KERNEL + "."):
            return live
        from labkit.lab.companion import companion
        from labkit.lab.lab import Lab
        from labkit.machine import vm as machine
        vm = live.lab.vm
        peer = companion("odp", vm.name, vm.describe()["kernel"], ODP_KERNEL)
        return Live(Lab(machine.connect(name=peer.name, kernel=peer.kernel)), source_loader=live.source_loader)
    return live._once("odp-kernel", make)


def check_odp_ext4_truncated(answer: Any, live: Live) -> Result:
    """ex9.4: an ODP MR over the fs-dax ext4 file on the ODP kernel, the file
    truncated under it, an RDMA WRITE after: that WRITE's completion status
    (or the registration's errno)."""
    if not str(answer or "").strip():
        return False, "give the completion's status name (IBV_WC_...) or the errno's name"
    return _write_after_revoke(answer, live_with_odp(live).revoke("fsdax-ext4", "odp", "write"))


EXERCISES = EXERCISES + (
    Exercise("ex9.4", "09", 2, "an ODP MR over the ext4 DAX file, truncated (7.3)", check_odp_ext4_truncated,
             judged_by=LIVE, shown_by=(("odp_revoke", "fsdax-ext4"),), difficulty="core",
             hints=_hints("the story measured XFS; measure the other filesystem's DAX file on the guest whose "
                          "device can do ODP (its caps bit 0)",
                          "the revocation runs the same steps; the WRITE after the truncate is the one asked for")),
    Exercise("ex10.1", "10", 3, "a kretprobe that catches the refusal on 5.10", check_probe_before_511,
             kind="code", difficulty="stretch", judged_by=LIVE,
             hints=_hints("on 5.10 the function that refuses since v5.11 has no fs-dax test (and no symbol to "
                          "probe): look for the GUP function that sets the errno after the pin",
                          "labkit source FUNCTION --kernel 5.10 --mark-return -95 marks the lines that "
                          "return the errno; /proc/kallsyms says which functions can be probed")),
)

BY_ID = {e.id: e for e in EXERCISES}


def for_notebook(number: str) -> list[Exercise]:
    """The exercises of notebook ``number`` ("00" ... "09"), in order."""
    return [e for e in EXERCISES if e.notebook == number]


# The companion VMs (kinds of labkit.lab.companion) a notebook's cells attach to or
# start next to its lab VM; the summative grader starts them outside its sandbox.
COMPANIONS: dict[str, tuple[str, ...]] = {"06": ("matrix",), "08": ("fences",), "09": ("odp",), "10": ("before511",)}


def companions_for(number: str) -> tuple[str, ...]:
    """The companion kinds notebook ``number`` needs (none for most notebooks)."""
    return COMPANIONS.get(number, ())


_revealed: dict[str, int] = {}


def hint(exercise_id: str) -> str:
    """The next hint of an exercise (staged: each call reveals one more)."""
    ex = BY_ID[exercise_id]
    if not ex.hints:
        return f"{exercise_id}: no hints for this one"
    n = min(_revealed.get(exercise_id, 0) + 1, len(ex.hints))
    _revealed[exercise_id] = n
    return "\n".join(f"{exercise_id} hint {i + 1}/{len(ex.hints)}: {h}" for i, h in enumerate(ex.hints[:n]))


def points_by_kind(notebook: str | None = None) -> dict[str, int]:
    """Auto points per kind (explain: the manual points), for the instructor report."""
    out = {k: 0 for k in EXERCISE_KINDS}
    for e in EXERCISES:
        if notebook is None or e.notebook == notebook:
            out[e.kind] += e.manual_points if e.kind == "explain" else e.points
    return out
