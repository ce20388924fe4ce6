"""The course's auto-checked exercises: what each asks, its points, and the
check that grades a learner's answer.

A check compares the learner's answer with what the *live* guest does now
(it measures again; nothing here remembers an errno or a pin count), except
for questions about kernel history, whose key is the kernel's git history.
Checks receive a :class:`Live` object that measures lazily and caches, so a
whole notebook is graded with a handful of guest round trips, and a blank
answer never touches the guest.

The reference solutions are not here: they live with the tests
(tests/course_solutions.py), so the package a learner imports does not hand
them the answers.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

Result = tuple[bool, str]


@dataclass(frozen=True)
class Exercise:
    """One auto-checked exercise: ``id`` is the tag of its notebook cell."""

    id: str
    notebook: str            # the notebook's number prefix, "00" ... "07"
    points: int
    title: str
    check: Callable[[Any, Live], Result]
    needs: tuple[tuple[str, str], ...] = ()     # (mechanism, memory) pins the check looks at
    guest: bool = True                          # False: graded from the answer alone


@dataclass
class Live:
    """Lazy, cached measurements on the running lab guest for the checks."""

    lab: Any
    wanted: set[tuple[str, str]] = field(default_factory=set)
    _cache: dict[str, Any] = field(default_factory=dict)

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

    def pin(self, mechanism: str, memory: str):
        """The live result of one pin attempt; every attempt the graded checks
        need is measured in one batch the first time any is asked for."""
        key = f"pin:{mechanism}:{memory}"
        if key not in self._cache:
            self.ready()
            cases = sorted(self.wanted | {(mechanism, memory)})
            cases = [c for c in cases if f"pin:{c[0]}:{c[1]}" not in self._cache]
            for (mech, mem), res in zip(cases, self.lab.pin_many([(m, k, "shared") for m, k in cases])):
                self._cache[f"pin:{mech}:{mem}"] = res
        return self._cache[key]

    def truncate(self, fs: str):
        self.ready()
        return self._once(f"truncate:{fs}", lambda: self.lab.truncate_wait(fs))

    def sh(self, script: str) -> str:
        return self._once(f"sh:{script}", lambda: self.lab.sh(script).stdout.strip())

    def namespaces(self) -> list:
        return self._once("namespaces", lambda: (self.lab.prepare_pmem(), self.lab.namespaces())[1])


# -- answer helpers ----------------------------------------------------------

def _text(value: Any) -> str:
    return str(value).strip().lower()


def _errno_matches(answer: Any, res) -> Result:
    """An errno answer may be the name (EOPNOTSUPP), the number (95) or 'ok'."""
    live = "ok" if res.ok else f"{res.errname} ({res.errno})"
    if res.ok:
        good = _text(answer) in ("ok", "0", "none", "success")
    elif isinstance(answer, int) and not isinstance(answer, bool):
        good = abs(answer) == res.errno
    else:
        good = _text(answer).lstrip("-") in (str(res.errname).lower(), str(res.errno))
    return good, f"you said {answer!r}; the live kernel answered {live}"


def _as_set(value: Any) -> set[str]:
    if isinstance(value, str):
        value = [v for v in value.replace(",", " ").split()]
    if not isinstance(value, (list, tuple, set, frozenset)):
        return {"<not a list>"}
    return {_text(v) for v in value}


def _int(value: Any) -> int | None:
    try:
        return int(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        return None


# -- the checks --------------------------------------------------------------

def check_release(answer: Any, live: Live) -> Result:
    release = live.sh("uname -r")
    return _text(answer) == release.lower(), f"you said {answer!r}; the guest reports {release!r}"


def check_chardev_mode(answer: Any, live: Live) -> Result:
    modes = sorted({ns.mode for ns in live.namespaces() if ns.chardev})
    return _text(answer) in modes, f"you said {answer!r}; the namespaces with a character device are in mode {modes}"


def check_fsdax_size(answer: Any, live: Live) -> Result:
    ns = live.namespaces()[0]
    mib = ns.size / 2**20
    got = _int(answer)
    good = got is not None and abs(got - mib) <= 1
    return good, (f"you said {answer!r} MiB; ndctl reports {ns.dev} ({ns.mode}) as {ns.size} bytes = {mib:.1f} MiB"
                  + ("" if good else " (an integer number of MiB, within 1)"))


def check_experimental(answer: Any, live: Live) -> Result:
    warned = {m.fs for m in live.mounts() if m.experimental_warning}
    got = _as_set(answer)
    return got == warned, (f"you said {sorted(got)}; mounting both again just now, the EXPERIMENTAL warning came "
                           f"from {sorted(warned) or 'no filesystem'}")


def check_block_size(answer: Any, live: Live) -> Result:
    page = int(live.sh("getconf PAGESIZE"))
    return _int(answer) == page, f"you said {answer!r}; ext4 DAX needs the page size, which is {page} bytes here"


def check_rdma_fsdax_errno(answer: Any, live: Live) -> Result:
    return _errno_matches(answer, live.pin("rdma", "fsdax-xfs"))


def check_rdma_kinds(answer: Any, live: Live) -> Result:
    from labkit.lab.core import MEMORY_KINDS
    ok = {k for k in MEMORY_KINDS if live.pin("rdma", k).ok}
    got = _as_set(answer)
    return got == ok, f"you said {sorted(got)}; ibv_reg_mr just succeeded on {sorted(ok)}"


def check_refusing_function(answer: Any, live: Live) -> Result:
    res = live.pin("rdma", "fsdax-xfs")
    name = _text(answer).strip("() ")
    traced = " ".join(res.trace)
    good = bool(name) and not res.ok and bool(res.trace) and name in traced.lower() and name != "labkit_cvf"
    return good, (f"you said {answer!r}; the kretprobe traced: {res.trace[0] if res.trace else 'no refusal'}")


def check_v4l2_pages(answer: Any, live: Live) -> Result:
    res = live.pin("v4l2", "anon")
    return _int(answer) == res.foll_pin_delta, \
        f"you said {answer!r}; nr_foll_pin_acquired rose by {res.foll_pin_delta} for one USERPTR QBUF just now"


def check_v4l2_vmpin(answer: Any, live: Live) -> Result:
    res = live.pin("v4l2", "anon")
    return _int(answer) == res.vmpin_kb_delta, \
        f"you said {answer!r} kB; VmPin of the process changed by {res.vmpin_kb_delta} kB just now"


def check_v4l2_fsdax(answer: Any, live: Live) -> Result:
    return _errno_matches(answer, live.pin("v4l2", "fsdax-xfs"))


MECHANISM_NAMES = ("rdma", "v4l2", "odirect", "io_uring")


def check_classify(answer: Any, live: Live) -> Result:
    if not isinstance(answer, dict):
        return False, "give a dict such as {'rdma': 'long-term', ...} with all four mechanisms"
    wrong, evidence = [], []
    for mech in MECHANISM_NAMES:
        refused = not live.pin(mech, "fsdax-xfs").ok and live.pin(mech, "anon").ok
        truth = "long-term" if refused else "transient"
        evidence.append(f"{mech}: {'refused on fs-dax' if refused else 'allowed on fs-dax'}")
        if _text(answer.get(mech, "")).replace("_", "-").replace(" ", "-") != truth:
            wrong.append(mech)
    msg = "; ".join(evidence)
    return not wrong, (f"all four right ({msg})" if not wrong else f"not right for {', '.join(wrong)} ({msg})")


def check_odirect_follpin(answer: Any, live: Live) -> Result:
    res = live.pin("odirect", "fsdax-xfs")
    used = bool(res.foll_pin_delta)
    if not isinstance(answer, bool):
        return False, "answer True or False"
    return answer == used, (f"you said {answer}; nr_foll_pin_acquired changed by {res.foll_pin_delta} during an "
                            f"O_DIRECT read into fs-dax memory just now")


def _where_matches(answer: Any, tw) -> Result:
    name = _text(answer).strip("() ")
    good = tw.blocked and bool(name) and name in [w.lower() for w in tw.where] and "break" in name
    where = tw.where[0] if tw.where else "?"
    return good, (f"you said {answer!r}; truncate on {tw.fs} " +
                  (f"waited {tw.seconds:.1f} s in {where} (called from {', '.join(tw.where[1:3])})" if tw.blocked
                   else "did not block just now"))


def check_truncate_xfs(answer: Any, live: Live) -> Result:
    return _where_matches(answer, live.truncate("xfs"))


def check_truncate_ext4(answer: Any, live: Live) -> Result:
    return _where_matches(answer, live.truncate("ext4"))


# Kernel history, from the kernel's git history (not a live measurement).
HISTORY = {"get_user_pages_longterm": "4.15", "FOLL_LONGTERM": "5.2", "FOLL_PIN": "5.6", "check_vma_flags": "5.11"}


def check_history(answer: Any, live: Live) -> Result:
    if not isinstance(answer, dict):
        return False, "give a dict such as {'FOLL_PIN': '5.x', ...} for all four names"
    wrong = [k for k, v in HISTORY.items() if str(answer.get(k, "")).strip().lstrip("v") != v]
    return not wrong, ("all four versions right" if not wrong else
                       f"not right for {', '.join(wrong)} (hint: the notebook's history section)")


def check_capstone_mount(answer: Any, live: Live) -> Result:
    mp = str(answer).strip()
    import re
    if not re.match(r"^/mnt/[a-zA-Z0-9_-]+$", mp):
        return False, f"{answer!r} is not a mount point under /mnt"
    line = live.lab.sh(f"grep ' {mp} ' /proc/mounts || true").stdout.strip()
    if not line:
        return False, f"nothing is mounted on {mp} in the guest right now"
    fs = line.split()[2]
    dax = live.lab._dax_active(mp)
    good = fs == "xfs" and dax
    return good, f"{mp} holds {fs} and a new file there is {'DAX' if dax else 'not DAX'} (statx STATX_ATTR_DAX)"


def check_pmem_longterm_kind(answer: Any, live: Live) -> Result:
    from labkit.lab.core import MEMORY_KINDS
    kind = _text(answer)
    if kind not in MEMORY_KINDS or kind in ("anon", "pagecache"):
        return False, f"{answer!r} is not persistent memory; choose among fsdax-xfs, fsdax-ext4, devdax"
    res = live.pin("rdma", kind)
    return res.ok, f"ibv_reg_mr on {kind}: " + ("ok" if res.ok else f"{res.errname} ({res.errno})")


def check_iouring_ext4(answer: Any, live: Live) -> Result:
    return _errno_matches(answer, live.pin("io_uring", "fsdax-ext4"))


def check_capstone_vmpin(answer: Any, live: Live) -> Result:
    res = live._once("pin4m", lambda: live.lab.pin("rdma", "anon", size=4 * 2**20))
    return _int(answer) == res.vmpin_kb_delta, \
        f"you said {answer!r} kB; a 4 MiB registration raised VmPin by {res.vmpin_kb_delta} kB just now"


def check_odirect_ext4(answer: Any, live: Live) -> Result:
    res = live.pin("odirect", "fsdax-ext4")
    if not isinstance(answer, bool):
        return False, "answer True or False"
    return answer == res.ok, (f"you said {answer}; the O_DIRECT read into fs-dax (ext4) memory: "
                              + ("ok" if res.ok else f"{res.errname} ({res.errno})"))


def check_counterfactual_target(answer: Any, live: Live) -> Result:
    name = _text(answer).removesuffix("()")
    return name == "check_vma_flags", ("right: the module's kretprobe changes check_vma_flags()'s -EOPNOTSUPP"
                                       if name == "check_vma_flags" else
                                       f"{answer!r} is not it (hint: the module's source, struct kretprobe)")


EXERCISES: tuple[Exercise, ...] = (
    Exercise("ex0.1", "00", 1, "the guest's kernel release", check_release),
    Exercise("ex1.1", "01", 1, "the namespace mode with a character device", check_chardev_mode),
    Exercise("ex1.2", "01", 2, "usable size of the fsdax namespace", check_fsdax_size),
    Exercise("ex2.1", "02", 2, "which filesystems print the EXPERIMENTAL warning", check_experimental),
    Exercise("ex2.2", "02", 1, "the block size ext4 needs for DAX", check_block_size),
    Exercise("ex3.1", "03", 2, "RDMA on fs-dax: the errno", check_rdma_fsdax_errno, (("rdma", "fsdax-xfs"),)),
    Exercise("ex3.2", "03", 2, "memory kinds RDMA can register", check_rdma_kinds,
             tuple(("rdma", k) for k in ("anon", "pagecache", "fsdax-xfs", "fsdax-ext4", "devdax"))),
    Exercise("ex3.3", "03", 1, "the kernel function that refuses", check_refusing_function, (("rdma", "fsdax-xfs"),)),
    Exercise("ex4.1", "04", 2, "pages pinned by one USERPTR buffer", check_v4l2_pages, (("v4l2", "anon"),)),
    Exercise("ex4.2", "04", 1, "VmPin change for V4L2", check_v4l2_vmpin, (("v4l2", "anon"),)),
    Exercise("ex4.3", "04", 1, "V4L2 USERPTR on fs-dax: the errno", check_v4l2_fsdax, (("v4l2", "fsdax-xfs"),)),
    Exercise("ex5.1", "05", 2, "long-term or transient", check_classify,
             tuple((m, k) for m in MECHANISM_NAMES for k in ("anon", "fsdax-xfs"))),
    Exercise("ex5.2", "05", 1, "does O_DIRECT use FOLL_PIN here", check_odirect_follpin, (("odirect", "fsdax-xfs"),)),
    Exercise("ex6.1", "06", 2, "where truncate waits (xfs)", check_truncate_xfs),
    Exercise("ex6.2", "06", 2, "the history in versions", check_history, guest=False),
    Exercise("ex7.1", "07", 2, "a DAX mount of your own", check_capstone_mount),
    Exercise("ex7.2", "07", 2, "persistent memory that may be pinned long-term", check_pmem_longterm_kind,
             (("rdma", "devdax"),)),
    Exercise("ex7.3", "07", 2, "io_uring fixed buffers on fs-dax (ext4)", check_iouring_ext4,
             (("io_uring", "fsdax-ext4"),)),
    Exercise("ex7.4", "07", 2, "VmPin of a 4 MiB registration", check_capstone_vmpin),
    Exercise("ex7.5", "07", 2, "where truncate waits (ext4)", check_truncate_ext4),
    Exercise("ex7.6", "07", 2, "O_DIRECT into fs-dax (ext4)", check_odirect_ext4, (("odirect", "fsdax-ext4"),)),
    Exercise("ex8.1", "08", 1, "the function whose answer module 1 changes", check_counterfactual_target,
             guest=False),
)

BY_ID = {e.id: e for e in EXERCISES}


def for_notebook(number: str) -> list[Exercise]:
    """The exercises of notebook ``number`` ("00" ... "07"), in order."""
    return [e for e in EXERCISES if e.notebook == number]
