"""Adversarial answers for every auto-checked exercise: each check fails on a
blank, on substrings of the right answer, on the lab's own values and on the
right errno for the wrong memory kind, and passes on every correct form (a
name or a number, ENOTSUP as well as EOPNOTSUPP, a computed value as well as
a typed one). The guest is a fake that answers like the 6.1 lab guest; no
feedback may contain the expected value."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import buffer_fake
import hold_fake
import pytest

from labkit.course.answers import errno_number
from labkit.course.exercises import BY_ID, EXERCISE_KINDS, EXERCISES, Live, points_by_kind
from labkit.course.fence_exercise import FenceProbeRun
from labkit.course.judge import check_answer
from labkit.course.probe_exercise import parse_probe, probe_values
from labkit.course.source import KernelSource
from labkit.lab import MountResult, Namespace, PinResult, TruncateWait
from labkit.lab.odp import RdmaOp, RevokeResult
from labkit.lab.results import MountInfo

RELEASE = "6.1.0-56-amd64"
TRACE = "python3-123 [000] d.... 1.0: labkit_cvf: (__get_user_pages+0x1a/0x500 <- check_vma_flags) ret=-95"


def pin(mech, mem, ok, errno=None, foll=0, vmpin=0, trace=(), mapping="shared"):
    return PinResult(mech, mem, mapping, ok, errno, {95: "EOPNOTSUPP", 14: "EFAULT"}.get(errno), vmpin, foll,
                     [], list(trace))


PINS = {
    ("rdma", "anon"): pin("rdma", "anon", True, vmpin=2048, foll=512),
    ("rdma", "pagecache"): pin("rdma", "pagecache", True, vmpin=2048, foll=512),
    ("rdma", "fsdax-xfs"): pin("rdma", "fsdax-xfs", False, 95, trace=[TRACE]),
    ("rdma", "fsdax-ext4"): pin("rdma", "fsdax-ext4", False, 95, trace=[TRACE]),
    ("rdma", "devdax"): pin("rdma", "devdax", True, vmpin=2048),
    ("v4l2", "anon"): pin("v4l2", "anon", True, foll=113),
    ("v4l2", "fsdax-xfs"): pin("v4l2", "fsdax-xfs", False, 95, trace=[TRACE]),
    ("odirect", "anon"): pin("odirect", "anon", True),
    ("odirect", "fsdax-xfs"): pin("odirect", "fsdax-xfs", True),
    ("odirect", "fsdax-ext4"): pin("odirect", "fsdax-ext4", True),
    ("io_uring", "anon"): pin("io_uring", "anon", True, foll=512),
    ("io_uring", "fsdax-xfs"): pin("io_uring", "fsdax-xfs", False, 95, trace=[TRACE]),
    ("io_uring", "fsdax-ext4"): pin("io_uring", "fsdax-ext4", False, 95, trace=[TRACE]),
    ("io_uring", "devdax"): pin("io_uring", "devdax", False, 14),      # a different refusal, different errno
    # 6.1's answer to an ODP registration: EINVAL, and the device reports no ODP (caps 0)
    ("rdma-odp", "anon"): PinResult("rdma-odp", "anon", "shared", False, 22, "EINVAL", 0, 0, [], [], device_odp=0),
    ("v4l2", "pagecache"): pin("v4l2", "pagecache", True, foll=113),
    ("v4l2", "fsdax-ext4"): pin("v4l2", "fsdax-ext4", False, 95, trace=[TRACE]),
    ("io_uring", "pagecache"): pin("io_uring", "pagecache", True, foll=512),
}
# MAP_PRIVATE mappings, never written: the fs-dax VMA is refused for long-term pins all the same (6.1)
PRIVATE = {
    ("rdma", "pagecache"): pin("rdma", "pagecache", True, vmpin=2048, foll=512, mapping="private"),
    ("rdma", "fsdax-xfs"): pin("rdma", "fsdax-xfs", False, 95, trace=[TRACE], mapping="private"),
    ("v4l2", "fsdax-xfs"): pin("v4l2", "fsdax-xfs", False, 95, trace=[TRACE], mapping="private"),
    ("odirect", "fsdax-xfs"): pin("odirect", "fsdax-xfs", True, mapping="private"),
    ("io_uring", "fsdax-xfs"): pin("io_uring", "fsdax-xfs", False, 95, trace=[TRACE], mapping="private"),
    ("io_uring", "fsdax-ext4"): pin("io_uring", "fsdax-ext4", False, 95, trace=[TRACE], mapping="private"),
    ("odirect", "fsdax-ext4"): pin("odirect", "fsdax-ext4", True, mapping="private"),
}


def _case(mech, mem, mapping="shared"):
    return PRIVATE[(mech, mem)] if mapping == "private" else PINS[(mech, mem)]


def revoke(memory, kind, op):
    """6.1's answers: a pinned MR keeps its pages, so the op after the revocation completes."""
    done = RdmaOp(op, 0, "IBV_WC_SUCCESS", 0.001)
    return RevokeResult(memory, "shared", kind, True, None, None, 0, 2048, "truncate", 0.01, False, [], None,
                        done, done, None)
STACK = ["xfs_break_dax_layouts+0x80/0x120", "xfs_break_layouts+0x50/0x90", "xfs_vn_setattr+0x60/0x100"]
EXT4_STACK = ["ext4_break_layouts+0x90/0x120", "ext4_setattr+0x2a0/0x9a0", "notify_change+0x1f0/0x4a0"]
EXT4_PUNCH_STACK = ["ext4_break_layouts+0x90/0x120", "ext4_punch_hole+0x1a0/0x4a0", "ext4_fallocate+0x2a/0x60",
                    "vfs_fallocate+0x13a/0x340"]


@dataclass
class _R:
    stdout: str
    rc: int = 0
    stderr: str = ""


@dataclass
class FakeLab(buffer_fake.FakeHelperHost):
    """Answers like the lab's Lab on a 6.1 guest; records what it was asked."""

    mounted: dict = field(default_factory=lambda: {"/mnt/fsdax-xfs": "xfs", "/mnt/capstone": "xfs",
                                                    "/mnt/plain": "xfs"})
    kprobes: list = field(default_factory=list)
    trace: str = ""

    def sh(self, script, check=True, timeout=60):
        if script == "uname -r":
            return _R(RELEASE + "\n")
        if script == "getconf PAGESIZE":
            return _R("4096\n")
        if script == "nproc":
            return _R("2\n")
        if script == "cat /sys/kernel/mm/transparent_hugepage/hpage_pmd_size":
            return _R("2097152\n")
        if script.startswith("grep ' "):
            mp = script.split("'")[1].strip()
            fs = self.mounted.get(mp)
            return _R(f"/dev/pmem0 {mp} {fs} rw 0 0" if fs else "")
        return _R("")

    def run(self, argv, timeout=60, check=False, stdin=None):
        """The guest commands the code exercises send (argument lists, like the real VM's run)."""
        if "learner-hold" in argv:        # exercise 6.5: the real judge, on the host, 6.1-like truncate and pins
            return hold_fake.run_fake_guest(stdin)
        if "learner-buffer" in argv:      # exercise 3.8: the real judge, on the host, a 6.1-like registration
            return buffer_fake.run_fake_guest(stdin)
        if argv[:2] == ["sh", "-c"] and argv[3] == "install":
            self.kprobes.append(argv[4])
            return _R("", rc=0 if "nonexistent_fn" not in argv[4] else 1)
        if argv == ["cat", "/sys/kernel/tracing/trace"]:
            return _R(self.trace)
        return _R("")

    def mount_info(self, mp):
        """Like Lab.mount_info: the mount holding ``mp`` (the root fs when nothing is mounted there)."""
        fs = self.mounted.get(mp)
        if fs is None:
            return MountInfo(mp, "/", "ext4", "/dev/vda", "rw", False)
        return MountInfo(mp, mp, fs, "/dev/pmem0", "rw", mp != "/mnt/plain")

    def prepare_pmem(self):
        return {}

    def namespaces(self):
        return [Namespace("namespace0.0", "region0", "fsdax", 520093696, blockdev="pmem0", map="dev"),
                Namespace("namespace1.0", "region1", "fsdax", 520093696, blockdev="pmem1", map="dev"),
                Namespace("namespace2.0", "region2", "devdax", 520093696, align=2097152, chardev="dax2.0",
                          map="dev")]

    def prepare_mounts(self):
        return [MountResult("xfs", "/dev/pmem0", "/mnt/fsdax-xfs", "dax", True, True, True, []),
                MountResult("ext4", "/dev/pmem1", "/mnt/fsdax-ext4", "dax", True, True, False, [])]

    def setup_rdma(self):
        return "rxe0"

    def setup_vivid(self):
        return None

    def pin_many(self, cases):
        return [_case(m, k, mp) for m, k, mp in cases]

    def pin(self, mech, mem, mapping="shared", size=2 * 2**20, **_):
        if size != 2 * 2**20:
            return pin(mech, mem, True, vmpin=size // 1024)
        if mapping == "private":
            return PRIVATE[(mech, mem)]
        if self.kprobes:       # the learner's probe fires on the refusal only, like check_vma_flags would
            symbol = self.kprobes[-1].split()[1]
            fires = symbol in ("check_vma_flags", "__get_user_pages") and not PINS[(mech, mem)].ok
            ret = "-95" if fires else "0"
            kind = "s32" if ":s32" in self.kprobes[-1] else "x64"
            if kind == "x64" and fires:
                ret = hex(2**64 - 95)
            self.trace = (f"p-1 [0] 1.0: ex_probe: (x+0x1/0x2 <- {symbol}) v0={ret}"
                          if symbol not in ("do_nothing",) else "")
        return PINS[(mech, mem)]

    def truncate_wait(self, fs, hold=3.0, op="truncate", **_):
        if op == "punch":
            return TruncateWait(fs, True, round(hold + 0.1, 1), EXT4_PUNCH_STACK if fs == "ext4" else STACK, True,
                                op="punch")
        return TruncateWait(fs, True, round(hold + 0.1, 1), STACK if fs == "xfs" else EXT4_STACK, True)

    def odp_revoke(self, memory, kind="odp", op="write"):
        return revoke(memory, kind, op)


# check_vma_flags as 6.12 and 7.3 have it: two lines return -EOPNOTSUPP, only one is the fs-dax test's
GUP_C = """\
#include <linux/mm.h>

static int check_vma_flags(struct vm_area_struct *vma, unsigned long gup_flags)
{
\tvm_flags_t vm_flags = vma->vm_flags;

\tif (vm_flags & (VM_IO | VM_PFNMAP))
\t\treturn -EFAULT;
\tif ((gup_flags & FOLL_LONGTERM) && vma_is_fsdax(vma))
\t\treturn -EOPNOTSUPP;

\tif ((gup_flags & FOLL_SPLIT_PMD) && is_vm_hugetlb_page(vma))
\t\treturn -EOPNOTSUPP;
\treturn 0;
}
"""


def _fake_source(lab):
    root = Path(tempfile.mkdtemp(prefix="labkit-src-"))
    (root / "mm").mkdir()
    (root / "mm" / "gup.c").write_text(GUP_C)
    return KernelSource(root, RELEASE)


# What each function returns on 7.3 while GUP goes round (module 1 loaded), and during an anonymous
# registration, as the kernel's own counters (labkit.lab.counterfactual.fences) measured it.
LOOP_RETURNS = {"migrate_longterm_unpinnable_folios": -11, "check_vma_flags": 0, "__get_user_pages": 512,
                "collect_longterm_unpinnable_folios": 512, "__gup_longterm_locked": -4}
ANON_RETURNS = {"check_vma_flags": 0, "__get_user_pages": 512, "__gup_longterm_locked": 512}


def _fake_fence(lab, definition):
    """Like fence_exercise.run_fence_probe on a 7.3 guest: the learner's probe sees what its function returns."""
    parsed = parse_probe(definition)
    if parsed is None or parsed[0] == "nonexistent_fn":
        return FenceProbeRun(False, "the kernel did not accept that probe (is the function probe-able?)")
    fn = parsed[0]
    looped = [LOOP_RETURNS[fn]] * 40 if fn in LOOP_RETURNS else []
    return FenceProbeRun(True, "", True, {-11}, looped, [ANON_RETURNS[fn]] if fn in ANON_RETURNS else [])


@dataclass
class FakeLab510(FakeLab):
    """Answers like the 5.10 guest for a learner's kretprobe: the reg_mr of fs-dax memory is refused
    in __gup_longterm_locked (check_dax_vmas after the pin); check_vma_flags has no symbol to probe."""

    def sh(self, script, check=True, timeout=60):
        return _R("5.10.0-46-amd64\n") if script == "uname -r" else super().sh(script, check, timeout)

    def run(self, argv, timeout=60, check=False, stdin=None):
        if argv[:2] == ["sh", "-c"] and argv[3] == "install" and " check_vma_flags " in argv[4]:
            return _R("", rc=1)
        return super().run(argv, timeout, check, stdin)

    def pin(self, mech, mem, size=2 * 2**20, **_):
        if self.kprobes:
            symbol = self.kprobes[-1].split()[1]
            fires = symbol == "__gup_longterm_locked" and not PINS[(mech, mem)].ok
            self.trace = f"p-1 [0] 1.0: ex_probe: (x+0x1/0x2 <- {symbol}) v0={'-95' if fires else '512'}"
        return PINS[(mech, mem)]


@dataclass
class FakeLab73(FakeLab):
    """Answers like the 7.3 guest, whose soft-RoCE does ODP: an ODP MR over the ext4 DAX file
    survives the truncate, and the WRITE after it is answered by the device (a remote access error
    once the pages are gone)."""

    def sh(self, script, check=True, timeout=60):
        return _R("7.3.0-1-amd64\n") if script == "uname -r" else super().sh(script, check, timeout)

    def odp_revoke(self, memory, kind="odp", op="write"):
        after = RdmaOp(op, 10, "IBV_WC_REM_ACCESS_ERR", 0.001)
        return RevokeResult(memory, "shared", kind, True, None, None, 1, 0, "truncate", 0.01, False, [], 1,
                            RdmaOp(op, 0, "IBV_WC_SUCCESS", 0.001), after, None)


def live(ex_id=""):
    lab = FakeLab510() if ex_id == "ex10.1" else FakeLab73() if ex_id == "ex9.4" else FakeLab()
    return Live(lab, source_loader=_fake_source, fence_runner=_fake_fence)


# exercise id -> (answers that must pass, answers that must fail)
CASES = {
    "ex0.1": ([2, "2", " 2\n", 2.0], ["", 1, 4, "two", RELEASE, "2 CPUs", True, None]),
    "ex1.1": (["devdax", "DevDax", " devdax "], ["", "dax", "fsdax", "raw", "/dev/dax2.0", ["devdax"]]),
    "ex1.2": ([2097152, "2097152", "2M", "2 MiB", "2048k"], ["", 4096, 2, 520093696, "2 MB?", 0, True]),
    "ex2.1": ([["xfs"], "xfs", ("XFS",), {"xfs"}], ["", [], ["ext4"], ["xfs", "ext4"], "x", [1], {"xfs": 1}]),
    "ex2.2": ([2097152, "2097152", "2M", "2 MiB", 2 * 2**20], ["", 4096, 1024, "2", 1048576, "huge", True]),
    "ex3.1": (["ok", "OK", " ok ", "success", 0],
              ["", "EOPNOTSUPP", "ENOTSUP", 95, "EFAULT", 14, "fails", "yes", True, None]),
    "ex3.2": ([6144, "6144", 6144.0], ["", 2048, 4096, 6, 6291456, "6 MiB", True]),
    "ex3.3": (["check_vma_flags", "check_vma_flags()", "mm/gup.c:check_vma_flags", "CHECK_VMA_FLAGS"],
              ["", "check", "vma", "check_vma", "labkit_cvf", "__get_user_pages", "gup", "flags"]),
    "ex3.4": (["r check_vma_flags $retval:s32", "r:myprobe check_vma_flags ret=$retval:s32",
               "r check_vma_flags $retval", "r:grp/ev __get_user_pages rc=$retval:s64"],
              ["", "p check_vma_flags", "check_vma_flags", "r do_nothing $retval", "r ib_umem_get $retval:s32",
               "r nonexistent_fn $retval", "r check_vma_flags $retval; echo 1 > /proc/sys/kernel/panic",
               "r check_vma_flags $arg1", "r check_vma_flags\n$retval"]),
    "ex3.8": (buffer_fake.RIGHT, buffer_fake.WRONG),
    "ex6.5": (hold_fake.RIGHT, hold_fake.WRONG),
    "ex3.6": ([10, "10", 9, 10.0], ["", 13, 12, 3, 8, 0, -95, "line 10", True, [10]]),
    "ex4.1": ([113, "113", 460800 // 4096 + 1], ["", 112, 460800 / 4096, 512, 0, "113 pages"]),
    "ex4.2": ([0, "0"], ["", 2048, 460, None, False]),
    "ex4.3": (["EOPNOTSUPP", "ENOTSUP", 95], ["", "EFAULT", "ok", "EOPNOTSUP", 22]),
    "ex5.1": ([{"rdma": "EOPNOTSUPP", "v4l2": 95, "odirect": "ok", "io_uring": "ENOTSUP"}],
              ["", {"rdma": "EOPNOTSUPP"}, {"rdma": "ok", "v4l2": "ok", "odirect": "ok", "io_uring": "ok"},
               {"rdma": "EOPNOTSUPP", "v4l2": "EOPNOTSUPP", "odirect": "EOPNOTSUPP", "io_uring": "EOPNOTSUPP"},
               {"rdma": "long-term", "v4l2": "long-term", "odirect": "transient", "io_uring": "long-term"},
               {"rdma": 95, "v4l2": 95, "odirect": "ok", "io_uring": 95, "extra": "x"}, "rdma EOPNOTSUPP"]),
    "ex5.2": ([False], ["", "False", 0, None, True]),
    "ex6.1": ([(5.0, 5.1), [2, 2.3], (7.5, 7.0)],
              ["", (3.0, 3.1), (1.0, 1.1), (5.0, 3.0), (5.0, 9.0), (20, 20.1), (5.0,), "5 s", (True, 1.1),
               "xfs_break_dax_layouts"]),
    "ex6.2": ([["get_user_pages_longterm", "FOLL_LONGTERM", "FOLL_PIN", "check_vma_flags"],
               ("get_user_pages_longterm()", "foll_longterm", "FOLL_PIN", "check_vma_flags()")],
              ["", {"get_user_pages_longterm": "4.15"}, ["FOLL_LONGTERM", "get_user_pages_longterm", "FOLL_PIN",
                                                         "check_vma_flags"], ["get_user_pages_longterm"]]),
    "ex7.1": (["/mnt/capstone", "/mnt/capstone/"], ["", "/mnt/fsdax-xfs", "/mnt/fsdax-ext4", "/mnt", "/mnt/plain",
                                                   "/mnt/nothere", "/mnt/capstone; rm -rf /", "capstone"]),
    "ex7.2": (["EOPNOTSUPP", "ENOTSUP", 95, "95"], ["", "EFAULT", 14, "ok", "EOPNOTSUP"]),
    "ex7.3": (["ok", "OK", "success"], ["", "EFAULT", 14, "EOPNOTSUPP", 95, True]),
    "ex7.4": ([4096, "4096"], ["", 2048, 4, 4194304, "4 MiB"]),
    "ex7.5": (["ext4_setattr", "ext4_setattr()"], ["", "ext4_break_layouts", "notify_change", "setattr",
                                                   "xfs_vn_setattr", "ext4"]),
    "ex7.6": ([True], ["", "True", 1, False]),
    "ex8.1": (["check_vma_flags", "check_vma_flags()", " Check_VMA_Flags "],
              ["", "vma_flags", "check_vma", "dax_layout_busy_page", "get_user_pages_longterm", 0, ["check_vma_flags"]]),
    "ex6.6": (["ext4_break_layouts", "EXT4_BREAK_LAYOUTS", "ext4_break_layouts()"],
              ["", "ext4_punch_hole", "ext4_fallocate", "vfs_fallocate", "xfs_break_dax_layouts", "break", "layouts"]),
    "ex8.2": (["r migrate_longterm_unpinnable_folios $retval:s32", "r:g/e migrate_longterm_unpinnable_folios $retval"],
              ["", "r check_vma_flags $retval:s32", "r __get_user_pages $retval:s64", "r nonexistent_fn $retval",
               "r __gup_longterm_locked $retval:s32", "p migrate_longterm_unpinnable_folios",
               "r collect_longterm_unpinnable_folios $retval", "migrate_longterm_unpinnable_folios"]),
    "ex8.3": ([[12, 13], (13, 12), {12, 13}], ["", [12], [13], [12, 13, 0], "12 13", 12288, ["O", "E"], [True]]),
    "ex9.1": (["IBV_WC_SUCCESS", "SUCCESS", "ibv_wc_success"],
              ["", "ok", "IBV_WC_REM_ACCESS_ERR", "EOPNOTSUPP", 95, True, "no completion"]),
    "ex9.2": ([True], ["", "True", 1, False, None]),
    # judged on the 7.3 guest (FakeLab73): the status of the WRITE after the truncate
    "ex9.4": (["IBV_WC_REM_ACCESS_ERR", "rem_access_err", " ibv_wc_rem_access_err "],
              ["", "IBV_WC_SUCCESS", "ok", "EINVAL", 22, True, "no completion"]),
    # judged on the 5.10 guest (FakeLab510): the refusal returns from __gup_longterm_locked
    "ex10.1": (["r __gup_longterm_locked $retval:s32", "r:mine __gup_longterm_locked ret=$retval:s64"],
               ["", "r check_vma_flags $retval:s32", "r __get_user_pages $retval:s32", "__gup_longterm_locked",
                "p __gup_longterm_locked", "r do_nothing $retval", "r get_vaddr_frames $retval:s32"]),
}
PREDICTIONS = [e.id for e in EXERCISES if e.kind == "prediction"]
EXPLAINS = [e.id for e in EXERCISES if e.kind == "explain"]


def test_every_auto_checked_exercise_has_adversarial_cases():
    assert set(CASES) == {e.id for e in EXERCISES if e.kind in ("value", "code")}


@pytest.mark.parametrize("ex_id", sorted(CASES))
def test_correct_forms_pass(ex_id):
    ex = BY_ID[ex_id]
    for answer in CASES[ex_id][0]:
        r = check_answer(ex, answer, live(ex_id))
        assert r.passed and r.points == ex.points and r.message == "right", (answer, r)


@pytest.mark.parametrize("ex_id", sorted(CASES))
def test_wrong_answers_fail_without_giving_the_answer_away(ex_id):
    ex = BY_ID[ex_id]
    secrets = [str(a) for a in CASES[ex_id][0]] + ["2048", "113", "95", RELEASE, "check_vma_flags",
                                                  "break_dax_layouts", "ext4_break_layouts", "/mnt/capstone"]
    if ex_id == "ex6.5":    # the errno the kernel gave the learner's own register_mr is shown as it happened
        secrets.remove("95")
    # the answer-format sentence (shown for a malformed answer, whatever the truth) may list the options
    shape = check_answer(ex, object(), live(ex_id)).message.lower()
    for answer in CASES[ex_id][1]:
        r = check_answer(ex, answer, live(ex_id))
        assert not r.passed and r.points == 0, (answer, r)
        assert "not right" in r.message
        for s in secrets:
            if s and s.lower() not in str(answer).lower() and s.lower() not in shape:
                assert s.lower() not in r.message.lower(), (answer, s, r.message)


# exercise id -> well-formed predictions of what it asks, right or wrong
WELL_FORMED = {
    "ex2.0": (["xfs"], [], ["xfs", "ext4"], "both", "xfs only", "none"),
    "ex3.0": ({"anon": "ok", "pagecache": "ok", "fsdax-xfs": "EPERM", "fsdax-ext4": 1, "devdax": "fails"},
              {k: "ok" for k in ("anon", "pagecache", "fsdax-xfs", "fsdax-ext4", "devdax")}),
    "ex4.0": ({"pages": 512, "vmpin_kb": 2048, "fsdax-xfs": "ok", "devdax": "EFAULT"},
              {"pages": "113", "vmpin_kb": 0, "fsdax-xfs": "fails", "devdax": "ok"}),
    "ex5.0": ({f"{m} {k}": "ok" for m in ("odirect", "io_uring") for k in ("anon", "fsdax-xfs", "devdax")},
              {f"{m} {k}": "EPERM" for m in ("odirect", "io_uring") for k in ("anon", "fsdax-xfs", "devdax")}),
    "ex6.0": (True, False, "yes", "no", {"truncate blocked while the page was held": "yes", "seconds": 9}),
    "ex9.0": (True, "no", {"fsdax-xfs": "ok"}, {"fsdax-xfs": "EOPNOTSUPP", "anon": "fails"}),
}
NONSENSE = ("wrong-answer", "", " ", [], {}, "I expect both to fail", None, "...", {"x": "wrong-answer"}, 113)


def test_every_prediction_has_its_forms():
    assert set(WELL_FORMED) == set(PREDICTIONS)


@pytest.mark.parametrize("ex_id", PREDICTIONS)
def test_predictions_count_well_formed_completion_not_correctness(ex_id):
    ex = BY_ID[ex_id]
    for answer in WELL_FORMED[ex_id]:
        assert check_answer(ex, answer, None).passed, answer
    for answer in NONSENSE:
        if answer in WELL_FORMED[ex_id]:       # [] is a prediction for "which filesystems": none
            continue
        r = check_answer(ex, answer, None)
        assert not r.passed and r.points == 0, answer
        assert "write your prediction as" in r.message, r.message     # says the form expected


@pytest.mark.parametrize("ex_id", EXPLAINS)
def test_explanations_are_recorded_for_manual_grading(ex_id):
    ex = BY_ID[ex_id]
    assert ex.points == 0 and ex.manual_points > 0
    r = check_answer(ex, "Because the filesystem must be able to reuse its blocks.", None)
    assert r.passed and r.max == 0 and "graded by hand" in r.message
    assert not check_answer(ex, "dunno", None).passed


def test_every_exercise_has_kind_difficulty_and_hints():
    for e in EXERCISES:
        assert e.kind in EXERCISE_KINDS and e.difficulty in ("intro", "core", "stretch")
        assert e.kind in ("prediction",) or e.hints, e.id


# What a last hint must not hand over: the function to probe, the exact action, the call.
GIVEAWAYS = {"ex3.4": ("check_vma_flags", "__get_user_pages"), "ex3.8": ("touch every page", "m[off]"),
             "ex6.5": ("vmsplice(", "os.pipe()", "os.close")}


def test_the_last_hint_points_at_the_idea_not_the_line():
    for ex_id, words in GIVEAWAYS.items():
        last = BY_ID[ex_id].hints[-1].lower()
        assert not any(w.lower() in last for w in words), (ex_id, last)


def test_staged_hints():
    from labkit.course import hint
    first = hint("ex3.4")
    second = hint("ex3.4")
    assert first.count("hint") == 1 and second.count("hint") == 2 and second.startswith(first)


def test_errno_aliases():
    assert errno_number("ENOTSUP") == errno_number("EOPNOTSUPP") == 95
    assert errno_number("EOPNOTSU") is None and errno_number(True) is None and errno_number("eOpNoTsUpP") is None


def test_probe_parser_admits_only_return_probes_of_retval():
    assert parse_probe("r check_vma_flags $retval:s32") == ("check_vma_flags", ["v0=$retval:s32"])
    for bad in ("p:x check_vma_flags", "r check_vma_flags $retval > /etc/x", "r check_vma_flags '$retval'",
                "-:kprobes/labkit_cvf", "r check_vma_flags +0(%di):string", 42, None):
        assert parse_probe(bad) is None, bad


def test_probe_values_read_every_print_type():
    line = "x-1 [0] 1.0: ex_probe: (__get_user_pages+0x1/0x2 <- check_vma_flags) v0={}"
    for text in ("-95", "4294967201", "0xffffffffffffffa1", "0xffffffa1"):
        assert probe_values(line.format(text)) == [-95], text


def test_points_by_kind_cover_every_notebook():
    total = points_by_kind()
    assert total["code"] >= 4 and total["explain"] > 0 and total["prediction"] > 0
    assert sum(points_by_kind(f"{n:02d}")["value"] for n in range(10)) == total["value"]


# -- forgeries of the code exercises' judges -------------------------------------------------------
# What a determined student would try against the judges of 3.8 and 6.5 (issue 28): each is learner
# code, each must fail for its own reason. The judge runs the learner's code in a process of its own as
# an unprivileged uid of its own and reads the verdict from the kernel, outside that process (labkit/lab/guest/pinprobe/
# learner_proc.py); the fd 1/2 forgeries are judged here on the host too (tests/buffer_fake.py,
# hold_fake.py: the real guest-side judge, the kernel's DAX answers modelled), all of them live below.

FORGED_HOLD = ('{"blocked": true, "layout_wait": true, "completed": true, "seconds_after_release": 0.1, '
               '"where": ["xfs_break_dax_layouts"], "stage": "done", "exception": null}')
FORGED_BUFFER = ('{"ok": true, "problem": null, "backed_by_file": true, "shared": false, "mr_seen": true, '
                 '"vmpin_kb_delta": 2048, "foll_pin_acquired_delta": 512}')


def _report_and_exit(fn: str, fd: int, line: str) -> str:
    """Learner code that writes a judge's report line to ``fd`` itself and leaves at once."""
    return f"import os\ndef {fn}:\n    os.write({fd}, {line.encode()!r} + b'\\n')\n    os._exit(0)\n"


FIND_TRUNCATE = '''
import ctypes, os, signal, threading, time
GOT, DONE = [], threading.Event()
libc = ctypes.CDLL(None, use_errno=True)
def find():
    end = time.time() + 5
    while time.time() < end:
        for p in os.listdir("/proc"):
            try:
                if p.isdigit() and open(f"/proc/{p}/comm").read().strip() == "truncate":
                    return int(p)
            except OSError:
                pass
        time.sleep(0.005)
'''
# As root a learner could also slow the judge's truncate down before it reaches the filesystem (here: a
# script bind-mounted over the truncate command, which sleeps first); the stop and the trace below then
# catch it every time, not only when they win a race with a truncate that has nothing to wait for.
SLOWED = '''
import shutil, subprocess
REAL, SCRIPT = "/tmp/labkit-truncate.real", "/tmp/labkit-truncate.sh"
def slow(seconds):
    if os.geteuid() != 0:
        return                              # unprivileged: no mount (the forgeries then race, and lose)
    shutil.copy("/usr/bin/truncate", REAL)
    with open(SCRIPT, "w") as f:
        f.write(f"#!/bin/sh\\nsleep {seconds}\\nexec {REAL} \\"$@\\"\\n")
    os.chmod(SCRIPT, 0o755)
    subprocess.run(["mount", "--bind", SCRIPT, "/usr/bin/truncate"], check=True, timeout=10)
def unslow():
    if os.geteuid() == 0:
        subprocess.run(["umount", "/usr/bin/truncate"], timeout=10)
'''
DELAY_TRUNCATE = FIND_TRUNCATE + SLOWED + '''
def hold(m):
    slow(3)                                 # the truncate "waits" 3 s, holding nothing of the file
    return unslow
'''
STOP_TRUNCATE = FIND_TRUNCATE + SLOWED + '''
def stop():
    pid = find()
    try:
        os.kill(pid, signal.SIGSTOP)       # the truncate "waits" while stopped
        GOT.append(pid)
    except (OSError, TypeError) as e:
        GOT.append(e)
def hold(m):
    slow(0.5)
    threading.Thread(target=stop, daemon=True).start()
    return lambda: (unslow(), [os.kill(p, signal.SIGCONT) for p in GOT if isinstance(p, int)])
'''
PTRACE_TRUNCATE = FIND_TRUNCATE + SLOWED + '''
def trace():
    pid = find()
    if pid and libc.ptrace(16, pid, None, None) == 0:      # PTRACE_ATTACH: the truncate stops, traced
        DONE.wait(10)
        libc.ptrace(17, pid, None, None)                   # PTRACE_DETACH, from the tracing thread
def hold(m):
    slow(0.5)
    t = threading.Thread(target=trace, daemon=True)
    t.start()
    return lambda: (unslow(), DONE.set(), t.join(5))
'''
KILL_JUDGE = "import os, signal\ndef hold(m):\n    os.kill(os.getppid(), signal.SIGKILL)\n    return lambda: None\n"
KILL_JUDGE_BUFFER = ("import os, signal\ndef buffer(path, size):\n    os.kill(os.getppid(), signal.SIGKILL)\n"
                     "    return None\n")
EDIT_FILES = '''
import os
def hold(m):
    with open(f"/tmp/labkit-verdict-{os.getpid()}.json", "w") as f:     # nothing the judge reads
        f.write('{"blocked": true, "completed": true}')
    with open("/run/labkit/pinprobe.pyz", "ab") as f:        # the judge's own code
        f.write(b"#")
    return lambda: None
'''
EDIT_FILES_BUFFER = EDIT_FILES.replace("def hold(m):", "def buffer(path, size):")
REPORT_THEN_EXIT_IN_RELEASE = f'''
import os
def hold(m):
    r, w = os.pipe()
    vmsplice(w, m, 4096)             # real references: the truncate waits for them
    def release():
        os.write(1, {FORGED_HOLD.encode()!r} + b"\\n")
        os._exit(0)                  # ... and they die with the process, not by the release
    return release
'''
FORGED_MESSAGE_BUFFER = '''
import ctypes, json, mmap, os
def buffer(path, size):
    with open(path, "r+b") as f:
        m = mmap.mmap(f.fileno(), size)
    addr = ctypes.addressof(ctypes.c_char.from_buffer(m))
    for fd in os.listdir("/proc/self/fd"):                   # the judge's message pipe is one of these
        try:
            os.write(int(fd), (json.dumps({"stage": "registered", "addr": addr}) + "\\n").encode())
        except OSError:
            pass
    return m
'''
ANON_REGISTERED_BUFFER = '''
import mmap
from pyverbs.device import Context, get_device_list
from pyverbs.enums import IBV_ACCESS_LOCAL_WRITE
from pyverbs.mr import MR
from pyverbs.pd import PD
KEEP = []
def buffer(path, size):
    ctx = Context(name=get_device_list()[0].name.decode())
    pd = PD(ctx)
    KEEP.append((ctx, pd, MR(pd, size, IBV_ACCESS_LOCAL_WRITE)))    # a region of anonymous memory, pinned
    with open(path, "r+b") as f:
        return mmap.mmap(f.fileno(), size)                           # ... and the file's shared mapping
'''
NOT_REGISTERED = "no RDMA registration of your buffer was seen"
ENDED_HOLD = "your code ended the process before the truncate could be watched"
ENDED_BUFFER = "your code ended the process before the buffer could be registered"

# (exercise, learner code, the user the guest judge runs it as, what the feedback must say)
FORGERIES = {
    "buffer-fd1-exit": ("ex3.8", _report_and_exit("buffer(path, size)", 1, FORGED_BUFFER), "sandbox", ENDED_BUFFER),
    "buffer-fd2-exit": ("ex3.8", _report_and_exit("buffer(path, size)", 2, FORGED_BUFFER), "sandbox", ENDED_BUFFER),
    "buffer-forged-message": ("ex3.8", FORGED_MESSAGE_BUFFER, "sandbox", NOT_REGISTERED),
    # a region of the learner's process, pinned, but not over the file: the judge's probe on the pin says so
    "buffer-anon-region-beside": ("ex3.8", ANON_REGISTERED_BUFFER, "sandbox", NOT_REGISTERED),
    "buffer-kill-judge": ("ex3.8", KILL_JUDGE_BUFFER, "sandbox", "raised on line 3: PermissionError"),
    "buffer-edit-files": ("ex3.8", EDIT_FILES_BUFFER, "sandbox", "raised on line 6: PermissionError"),
    "hold-fd1-exit": ("ex6.5", _report_and_exit("hold(m)", 1, FORGED_HOLD), "sandbox", ENDED_HOLD),
    "hold-fd2-exit": ("ex6.5", _report_and_exit("hold(m)", 2, FORGED_HOLD), "sandbox", ENDED_HOLD),
    "hold-report-exit-in-release": ("ex6.5", REPORT_THEN_EXIT_IN_RELEASE, "sandbox",
                                    "process ended while the truncate was being watched"),
    "hold-kill-judge": ("ex6.5", KILL_JUDGE, "sandbox", "raised on line 3: PermissionError"),
    "hold-edit-files": ("ex6.5", EDIT_FILES, "sandbox", "raised on line 6: PermissionError"),
    # unprivileged, the kernel refuses the signal and the trace (EPERM): nothing holds the truncate up
    "hold-stop-truncate": ("ex6.5", STOP_TRUNCATE, "sandbox", "truncate did not wait"),
    "hold-ptrace-truncate": ("ex6.5", PTRACE_TRUNCATE, "sandbox", "truncate did not wait"),
    # as root they hold it up (a delay, not a wait for the pages): the truncate's stack and state say so
    "hold-delay-truncate-as-root": ("ex6.5", DELAY_TRUNCATE, "root",
                                    "not waiting for the file's pages (it slept in "),
    "hold-stop-truncate-as-root": ("ex6.5", STOP_TRUNCATE, "root", "not waiting for the file's pages (it was stopped)"),
    "hold-ptrace-truncate-as-root": ("ex6.5", PTRACE_TRUNCATE, "root",
                                     "not waiting for the file's pages (it was traced)"),
}
ON_THE_HOST = ["buffer-fd1-exit", "buffer-fd2-exit", "hold-fd1-exit", "hold-fd2-exit", "hold-report-exit-in-release"]


@pytest.mark.parametrize("name", ON_THE_HOST)
def test_a_report_written_by_the_learners_process_is_no_verdict(name):
    """The forgeries of issue 28 that are safe to run on the host (no signal, no file of ours), through
    the real guest-side judge with the kernel's DAX answers modelled."""
    ex_id, source, _, reason = FORGERIES[name]
    r = check_answer(BY_ID[ex_id], source, live())
    assert not r.passed and r.points == 0 and reason in r.message, (name, r.message)


def _guest_verdict(lab, ex_id: str, source: str, user: str):
    """Judge ``source`` on the live guest with the learner's code run as ``user``, the way the check does."""
    from labkit.course import buffer_exercise, learner_code, truncate_exercise
    if ex_id == "ex3.8":
        data = learner_code.run_in_guest(lab, "learner-buffer", buffer_exercise.MEMORY, "ex3-8", source, 20.0,
                                         "--learner-user", user)
        run = buffer_exercise.from_report(data)
        return buffer_exercise.check_buffer(source, _Canned(learner_buffer=run)), run.raw
    data = learner_code.run_in_guest(lab, "learner-hold", truncate_exercise.MEMORY, "ex6-5", source, 20.0,
                                     "--hold", str(truncate_exercise.HOLD_S), "--after", "4",
                                     "--learner-user", user, wait=20.0 + truncate_exercise.HOLD_S + 4 + 60)
    run = truncate_exercise.from_report(data)
    return truncate_exercise.check_hold(source, _Canned(learner_hold=run)), run.raw


class _Canned:
    """A Live whose code-exercise runs were made already."""

    def __init__(self, **runs) -> None:
        for name, run in runs.items():
            setattr(self, name, lambda source, run=run: run)


@pytest.mark.integration
@pytest.mark.parametrize("kernel", ["6.1"])
def test_every_forgery_of_the_code_judges_fails_on_the_live_guest_for_its_own_reason(kernel, pool):
    """Every row of FORGERIES, on the run's shared guest: the judge reads the kernel, the learner's
    process cannot signal, trace or edit the judge, and what it prints is never read."""
    from labkit.lab import Lab
    lab = Lab(pool.get(kernel))
    Live(lab).ready()                      # pmem, mounts, RDMA: what the code exercises use
    failures = {}
    try:
        _forge_all(lab, failures)
    finally:
        lab.vm.run(["sh", "-c", "for i in 1 2 3 4 5; do umount /usr/bin/truncate 2>/dev/null; done; "
                    "rm -f /tmp/labkit-verdict-*.json /tmp/labkit-truncate.real /tmp/labkit-truncate.sh; exit 0"],
                   timeout=30)
    assert not failures, failures
    left = lab.vm.run(["sh", "-c", "ps -eo uid=,pid= | awk '$1 >= 61000 && $1 < 62000'; pgrep -x truncate; exit 0"],
                      timeout=30).stdout.split()
    assert left == [], left                # the judge leaves no process of the learner's, nor a truncate


def _forge_all(lab, failures: dict) -> None:
    for name, (ex_id, source, user, reason) in FORGERIES.items():
        (ok, why), raw = _guest_verdict(lab, ex_id, source, user)
        if ok or reason not in why:
            failures[name] = (ok, why, {k: raw.get(k) for k in (
                "umem", "umem_error", "mr_seen", "backed_by_file", "shared", "ok", "errname", "message", "problem", "where",
                "blocked", "layout_wait", "stopped", "traced", "learner_exited", "exception", "error") if k in raw})
