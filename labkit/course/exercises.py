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
from labkit.course.probe_exercise import (
    check_probe,
    run_learner_probe,
)
from labkit.course.truncate_exercise import check_hold, run_learner_hold
from labkit.errors import ConfigError
from labkit.lab.guest.vocab import MECHANISMS, MEMORY_KINDS, PMEM_ROLES

Result = tuple[bool, str]
EXERCISE_KINDS = ("value", "code", "prediction", "explain")
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

    def truncate(self, fs: str):
        self.ready()
        return self._once(f"truncate:{fs}", lambda: self.lab.truncate_wait(fs))

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

def check_release(answer: Any, live: Live) -> Result:
    return isinstance(answer, str) and answer.strip() == live.sh("uname -r"), ""


def check_chardev_mode(answer: Any, live: Live) -> Result:
    modes = {ns.mode for ns in live.namespaces() if ns.chardev}
    return isinstance(answer, str) and _text(answer) in modes, ""


def check_fsdax_size(answer: Any, live: Live) -> Result:
    got = _int(answer) if not isinstance(answer, float) else int(answer)
    if got is None:
        return False, "give a whole number of MiB"
    ns = next(n for n in live.namespaces() if n.mode == "fsdax")
    return abs(got - ns.size / 2**20) <= 1, ""


def check_experimental(answer: Any, live: Live) -> Result:
    got = _as_set(answer)
    if got is None:
        return False, "give a list of filesystem names, [] for none"
    return got == {m.fs for m in live.mounts() if m.experimental_warning}, ""


def check_block_size(answer: Any, live: Live) -> Result:
    got = _int(answer)
    if got is None and isinstance(answer, str):
        m = re.fullmatch(r"\s*(\d+)\s*(k|kb|kib)\s*", answer.lower())
        got = int(m.group(1)) * 1024 if m else None
    return got == int(live.sh("getconf PAGESIZE")), ""


def check_rdma_fsdax_errno(answer: Any, live: Live) -> Result:
    return _errno_matches(answer, live.pin("rdma", "fsdax-xfs"))


def check_rdma_kinds(answer: Any, live: Live) -> Result:
    got = _as_set(answer)
    if got is None:
        return False, "give a list of memory kinds"
    return got == {k for k in MEMORY_KINDS if live.pin("rdma", k).ok}, ""


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


def check_v4l2_pages(answer: Any, live: Live) -> Result:
    got = _int(answer)
    return got is not None and got == live.pin("v4l2", "anon").foll_pin_delta, ""


def check_v4l2_vmpin(answer: Any, live: Live) -> Result:
    got = _int(answer)
    return got is not None and got == live.pin("v4l2", "anon").vmpin_kb_delta, ""


def check_v4l2_fsdax(answer: Any, live: Live) -> Result:
    return _errno_matches(answer, live.pin("v4l2", "fsdax-xfs"))




# The four mechanisms notebook 05 classifies (rdma-odp, notebook 09's, pins nothing).
CLASSIFIED = tuple(m for m in MECHANISMS if m != "rdma-odp")


def check_classify(answer: Any, live: Live) -> Result:
    if not isinstance(answer, dict) or set(answer) != set(CLASSIFIED):
        return False, "give a dict with exactly the four mechanisms as keys"
    for mech in CLASSIFIED:
        refused = not live.pin(mech, "fsdax-xfs").ok and live.pin(mech, "anon").ok
        truth = "long-term" if refused else "transient"
        if _text(answer[mech]).replace("_", "-").replace(" ", "-") != truth:
            return False, ""
    return True, ""


def check_odirect_follpin(answer: Any, live: Live) -> Result:
    got = _bool_answer(answer)
    if got is None:
        return False, "answer True or False"
    return got == bool(live.pin("odirect", "fsdax-xfs").foll_pin_delta), ""


def _where_matches(answer: Any, tw) -> Result:
    """A function on the truncating thread's stack that breaks the layouts
    (exact name, not a substring)."""
    name = _name(answer)
    frames = [w.split("+")[0].lower() for w in tw.where]
    return tw.blocked and name in frames and "break" in name and "layout" in name, ""


def check_truncate_xfs(answer: Any, live: Live) -> Result:
    return _where_matches(answer, live.truncate("xfs"))


def check_truncate_ext4(answer: Any, live: Live) -> Result:
    return _where_matches(answer, live.truncate("ext4"))


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


def check_pmem_longterm_kind(answer: Any, live: Live) -> Result:
    kind = _text(answer) if isinstance(answer, str) else ""
    if kind not in PMEM_ROLES:      # the persistent-memory kinds
        return False, "choose among " + ", ".join(PMEM_ROLES)
    return live.pin("rdma", kind).ok, ""


def check_iouring_ext4(answer: Any, live: Live) -> Result:
    return _errno_matches(answer, live.pin("io_uring", "fsdax-ext4"))


def check_capstone_vmpin(answer: Any, live: Live) -> Result:
    got = _int(answer)
    if got is None:
        return False, "give a whole number of kB"
    live.ready()        # soft-RoCE on this guest, whatever other checks ran before (or did not)
    res = live._once("pin4m", lambda: live.lab.pin("rdma", "anon", size=4 * 2**20))
    return got == res.vmpin_kb_delta, ""


def check_odirect_ext4(answer: Any, live: Live) -> Result:
    got = _bool_answer(answer)
    if got is None:
        return False, "answer True or False"
    return got == live.pin("odirect", "fsdax-ext4").ok, ""


def check_odp_anon(answer: Any, live: Live) -> Result:
    return _errno_matches(answer, live.pin("rdma-odp", "anon"))


def check_odp_caps(answer: Any, live: Live) -> Result:
    got = _int(answer) if not (isinstance(answer, str) and answer.strip().lower().startswith("0x")) \
        else int(answer.strip(), 16)
    if got is None:
        return False, "give a number (the general_caps bit mask)"
    caps = live.pin("rdma-odp", "anon").device_odp
    return caps is not None and got == caps, ""


# -- checks: predictions and explanations ---------------------------------------------

def check_prediction(answer: Any, live: Live) -> Result:
    """Completion only: any non-empty prediction counts."""
    filled = (isinstance(answer, str) and len(answer.strip()) >= 2) or \
        (isinstance(answer, (dict, list, tuple)) and bool(answer)) or isinstance(answer, (int, float))
    return bool(filled), "" if filled else "write your prediction down"


def check_explain(answer: Any, live: Live) -> Result:
    """Recorded for the instructor: a few words at least; graded by hand."""
    ok = isinstance(answer, str) and len(answer.split()) >= 5
    return ok, "" if ok else "write a few sentences"


# -- the exercise list ---------------------------------------------------------------

def _hints(*h: str) -> tuple[str, ...]:
    return h


def check_counterfactual_target(answer: Any, live: Live) -> Result:
    name = _text(answer).removesuffix("()") if isinstance(answer, str) else ""
    return name == "check_vma_flags", ""


EXERCISES: tuple[Exercise, ...] = (
    Exercise("ex0.1", "00", 1, "the guest's kernel release", check_release, difficulty="intro",
             hints=_hints("the guest reports it itself: run uname -r in it",
                          "exactly as printed, including the Debian suffix")),
    Exercise("ex1.1", "01", 1, "the namespace mode with a character device", check_chardev_mode, difficulty="intro",
             hints=_hints("which mode has no block device and no filesystem?", "look at the device names ndctl shows")),
    Exercise("ex1.2", "01", 1, "usable size of the fsdax namespace", check_fsdax_size, difficulty="intro",
             hints=_hints("not the DIMM's size: the namespace's, as ndctl reports it", "bytes / 2**20")),
    Exercise("ex1.3", "01", 0, "why raw mode cannot do DAX", check_explain, kind="explain", manual_points=2,
             guest=False, hints=_hints("what does every page the kernel hands to a device need?")),
    Exercise("ex2.0", "02", 1, "prediction: which filesystems warn", check_prediction, kind="prediction",
             guest=False),
    Exercise("ex2.1", "02", 1, "which filesystems print the EXPERIMENTAL warning", check_experimental,
             hints=_hints("the kernel log of your own mounts answers it", "a list, possibly empty")),
    Exercise("ex2.2", "02", 1, "the block size ext4 needs for DAX", check_block_size, difficulty="intro",
             hints=_hints("a DAX mapping maps one file block per page-table entry", "getconf PAGESIZE")),
    Exercise("ex3.0", "03", 1, "prediction: RDMA on five memory kinds", check_prediction, kind="prediction",
             guest=False),
    Exercise("ex3.1", "03", 1, "RDMA on fs-dax: the errno", check_rdma_fsdax_errno,
             needs=(("rdma", "fsdax-xfs"),),
             hints=_hints("look at the fs-dax XFS row of the table", "a name like EPERM or its number")),
    Exercise("ex3.2", "03", 1, "memory kinds RDMA can register", check_rdma_kinds,
             needs=tuple(("rdma", k) for k in MEMORY_KINDS),
             hints=_hints("every kind whose registration returned ok", "device-dax is persistent memory too")),
    Exercise("ex3.3", "03", 1, "the kernel function that refuses", check_refusing_function, needs=(("rdma", "fsdax-xfs"),),
             hints=_hints("the traced line names the function whose return was probed",
                          "just the function's name, not its caller")),
    Exercise("ex3.4", "03", 4, "write a kretprobe that catches the refusal", check_probe, kind="code",
             difficulty="stretch",
             hints=_hints("a return probe is  r FUNCTION $retval:s32  (Documentation/trace/kprobetrace.rst)",
                          "which function returns -EOPNOTSUPP when the VMA is fs-dax?",
                          "probe check_vma_flags, or a caller that returns its error")),
    Exercise("ex3.5", "03", 0, "why EOPNOTSUPP and not EPERM", check_explain, kind="explain", manual_points=3,
             guest=False, hints=_hints("is the caller forbidden something, or is the operation unsupported "
                                       "for this kind of memory?")),
    Exercise("ex3.6", "03", 2, "the line of the kernel's source that refused", check_refusing_line,
             needs=(("rdma", "fsdax-xfs"),),
             hints=_hints("the marked lines return the errno the kretprobe saw; more than one may",
                          "which marked line follows a test of FOLL_LONGTERM and fs-dax?",
                          "give the line number printed at the left of the listing")),
    Exercise("ex3.7", "03", 0, "why gup-fast must fall back for DAX", check_explain, kind="explain",
             manual_points=3, guest=False,
             hints=_hints("what can the lockless fast path see of a page, and what can it not see of the VMA?")),
    Exercise("ex3.8", "03", 3, "a buffer on the fs-dax file that RDMA may pin", check_buffer, kind="code",
             difficulty="stretch",
             hints=_hints("the registration above was of a MAP_SHARED mapping: which pages does the device get?",
                          "mmap flags: MAP_SHARED or MAP_PRIVATE (mmap.ACCESS_WRITE or mmap.ACCESS_COPY)",
                          "after a write to a private mapping, whose page is it? Touch every page before you return")),
    Exercise("ex3.9", "03", 0, "why a written private mapping may be pinned", check_explain, kind="explain",
             manual_points=3, guest=False,
             hints=_hints("after copy-on-write, who owns the pages the device would get: the file or the process?")),
    Exercise("ex4.0", "04", 1, "prediction: pages pinned by one buffer", check_prediction, kind="prediction",
             guest=False),
    Exercise("ex4.1", "04", 1, "pages pinned by one USERPTR buffer", check_v4l2_pages, needs=(("v4l2", "anon"),),
             hints=_hints("nr_foll_pin_acquired counts pages", "a partly used page is pinned whole")),
    Exercise("ex4.2", "04", 1, "VmPin change for V4L2", check_v4l2_vmpin, needs=(("v4l2", "anon"),),
             hints=_hints("VmPin is accounted by the driver, not by GUP", "read the VmPin column")),
    Exercise("ex4.3", "04", 1, "V4L2 USERPTR on fs-dax: the errno", check_v4l2_fsdax, needs=(("v4l2", "fsdax-xfs"),),
             hints=_hints("the fs-dax row of the V4L2 table", "a name or a number")),
    Exercise("ex5.0", "05", 1, "prediction: transient pins on fs-dax", check_prediction, kind="prediction",
             guest=False),
    Exercise("ex5.1", "05", 2, "long-term or transient", check_classify,
             needs=tuple((m, k) for m in CLASSIFIED for k in ("anon", "fsdax-xfs")),
             hints=_hints("refused on fs-dax but allowed on anonymous memory means the caller asked for FOLL_LONGTERM",
                          "all four keys: rdma, v4l2, odirect, io_uring")),
    Exercise("ex5.2", "05", 1, "does O_DIRECT use FOLL_PIN here", check_odirect_follpin, needs=(("odirect", "fsdax-xfs"),),
             hints=_hints("did the nr_foll_pin_acquired column move for O_DIRECT?",)),
    Exercise("ex5.3", "05", 0, "why a transient pin is acceptable", check_explain, kind="explain", manual_points=3,
             guest=False, hints=_hints("who decides when it ends, and how long can that take?")),
    Exercise("ex6.0", "06", 1, "prediction: does truncate wait", check_prediction, kind="prediction", guest=False),
    Exercise("ex6.1", "06", 1, "where truncate waits (xfs)", check_truncate_xfs,
             hints=_hints("read the waiting thread's stack", "the XFS function that breaks the layouts")),
    Exercise("ex6.2", "06", 2, "the history in order", check_history, difficulty="core", guest=False,
             hints=_hints("the history table above", "oldest first: a function, a flag, a new kind of pin, "
                                                      "then where the check lives")),
    Exercise("ex6.3", "06", 0, "why device-dax is exempt", check_explain, kind="explain", manual_points=3,
             guest=False, hints=_hints("what operation makes a filesystem wait for a page?")),
    Exercise("ex6.4", "06", 0, "the deliberate -stable regression", check_explain, kind="explain",
             manual_points=3, guest=False,
             hints=_hints("what did tagging the patches for -stable break, on purpose, and for whom?")),
    Exercise("ex6.5", "06", 3, "make truncate wait, then let it finish", check_hold, kind="code",
             difficulty="stretch",
             hints=_hints("an RDMA registration (register_mr) of fs-dax is refused since v4.15 (5f1d43de5416): "
                          "which other reference to a page lasts until you drop it?",
                          "the measurement above held the page with a pipe: vmsplice(w, m, length) into os.pipe()",
                          "a pipe drops its page references when it is read empty or closed; return a function "
                          "that does that")),
    Exercise("ex7.1", "07", 2, "a DAX mount of your own", check_capstone_mount, difficulty="stretch",
             hints=_hints("lab.mount(fs, device, mountpoint, options=...)", "a new mount point, with DAX on")),
    Exercise("ex7.2", "07", 1, "persistent memory that may be pinned long-term", check_pmem_longterm_kind,
             needs=(("rdma", "devdax"),), hints=_hints("try the registration on each persistent kind",)),
    Exercise("ex7.3", "07", 1, "io_uring fixed buffers on fs-dax (ext4)", check_iouring_ext4,
             needs=(("io_uring", "fsdax-ext4"),), hints=_hints("measure io_uring on fsdax-ext4 itself",)),
    Exercise("ex7.4", "07", 2, "VmPin of a 4 MiB registration", check_capstone_vmpin, difficulty="stretch",
             hints=_hints("read VmPin while the registration is held, then release it",)),
    Exercise("ex7.5", "07", 1, "where truncate waits (ext4)", check_truncate_ext4,
             hints=_hints("run the truncate demonstration on ext4 and read the stack",)),
    Exercise("ex7.6", "07", 1, "O_DIRECT into fs-dax (ext4)", check_odirect_ext4, needs=(("odirect", "fsdax-ext4"),),
             hints=_hints("measure it: lab.pin('odirect', ...)",)),
    Exercise("ex8.1", "08", 1, "the function whose answer module 1 changes", check_counterfactual_target,
             guest=False, hints=_hints("the module's kretprobe names it", "the function that refuses in notebook 3")),
    Exercise("ex9.0", "09", 1, "prediction: does truncate wait under an ODP MR", check_prediction,
             kind="prediction", guest=False),
    Exercise("ex9.1", "09", 1, "an ODP registration of anonymous memory, on this guest", check_odp_anon,
             needs=(("rdma-odp", "anon"),),
             hints=_hints("the rdma-odp anon row measured on this notebook's own guest, not the other one",
                          "\"ok\" if it registered, else the errno's name or number")),
    Exercise("ex9.2", "09", 1, "the device's ODP capability bits, on this guest", check_odp_caps,
             needs=(("rdma-odp", "anon"),),
             hints=_hints("every RDMA result carries it: PinResult.device_odp",
                          "odp_caps.general_caps as an int; bit 0 is IBV_ODP_SUPPORT")),
    Exercise("ex9.3", "09", 0, "why truncate need not wait for an ODP MR", check_explain, kind="explain",
             manual_points=3, guest=False,
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


EXERCISES = EXERCISES + (
    Exercise("ex10.1", "10", 3, "a kretprobe that catches the refusal on 5.10", check_probe_before_511,
             kind="code", difficulty="stretch",
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
COMPANIONS: dict[str, tuple[str, ...]] = {"06": ("matrix",), "09": ("odp",), "10": ("before511",)}


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
