"""Lab-layer logic without a guest: parsers, validation, and that bad input
never reaches the guest (the fake records every command)."""

import json
import shlex

import pytest

from labkit.errors import ConfigError, LabError
from labkit.testing.fakes import FakeVM
from labkit.lab import (KPROBE, PROBE_PATH, SHORT_CASES, Lab, PinResult, check_mount_options, compare_matrices,
                        explain_mount,
                        log_after_marker, matrices_on_two_kernels, parse_ndctl, parse_sections,
                        refusal_lines)

NDCTL = json.dumps([
    {"dev": "region1", "size": 536870912, "namespaces": [
        {"dev": "namespace1.0", "mode": "fsdax", "map": "dev", "size": 520093696, "uuid": "x",
         "sector_size": 512, "align": 2097152, "blockdev": "pmem1"}]},
    {"dev": "region0", "size": 536870912, "namespaces": [
        {"dev": "namespace0.0", "mode": "raw", "size": 536870912, "sector_size": 512, "blockdev": "pmem0"}]},
    {"dev": "region2", "size": 536870912, "namespaces": [
        {"dev": "namespace2.0", "mode": "devdax", "map": "dev", "size": 520093696, "align": 2097152,
         "daxregion": {"id": 2, "size": 520093696, "align": 2097152,
                       "devices": [{"chardev": "dax2.0", "size": 520093696}]}}]},
])


def test_parse_ndctl_sorted_with_facts():
    nss = parse_ndctl(NDCTL)
    assert [n.dev for n in nss] == ["namespace0.0", "namespace1.0", "namespace2.0"]
    assert nss[0].mode == "raw" and nss[0].blockdev == "pmem0"
    assert nss[1].align == 2097152 and nss[1].map == "dev"
    assert nss[2].chardev == "dax2.0"
    assert parse_ndctl("") == []


def test_sections_and_marker():
    out = "junk\n@@m1 out\n{\"ok\": true}\n@@m1 rc\n0\n@@m1 log\n"
    assert parse_sections(out, "m1") == {"out": '{"ok": true}', "rc": "0", "log": ""}
    dmesg = "[1] old\n[2] labkit-mark abc\n[3] rxe: Unable to pin\n\n"
    assert log_after_marker(dmesg, "labkit-mark abc") == ["[3] rxe: Unable to pin"]


def test_refusals_only_nonzero():
    trace = ("p-1 [000] 1.0: labkit_cvf: (__get_user_pages+0x1/0x2 <- check_vma_flags) ret=0\n"
             "p-1 [000] 1.1: labkit_cvf: (__get_user_pages+0x1/0x2 <- check_vma_flags) ret=-95\n")
    assert refusal_lines(trace) == [trace.splitlines()[1].strip()]


@pytest.mark.parametrize("opts", ["dax;reboot", "dax,$(id)", "dax|x", "dax\nx", "x-mount.mkdir", "dax=maybe",
                                  "a" * 300, "dax,,`id`", "user_xattr"])
def test_bad_mount_options(opts):
    with pytest.raises(ConfigError):
        check_mount_options(opts)


def test_good_mount_options():
    assert check_mount_options("dax=always,noatime") == "dax=always,noatime"


@pytest.mark.parametrize("call", [
    lambda lab: lab.mount("btrfs", "/dev/pmem0"),
    lambda lab: lab.mount("xfs", "/dev/sda; reboot"),
    lambda lab: lab.mount("xfs", "/dev/pmem0", mountpoint="/mnt/../etc"),
    lambda lab: lab.mount("xfs", "/dev/pmem0", options="dax;reboot"),
    lambda lab: lab.pin("dma", "anon"),
    lambda lab: lab.pin("rdma", "hugetlb"),
    lambda lab: lab.pin("rdma", "anon", mapping="shared;x"),
    lambda lab: lab.pin("rdma", "anon", size=-4096),
    lambda lab: lab.pin("rdma", "anon", size=4097),
    lambda lab: lab.pin("rdma", "anon", size=2**40),
    lambda lab: lab.pin("rdma", "anon", hold=-1),
    lambda lab: lab.set_mode("namespace0.0; reboot", "fsdax"),
    lambda lab: lab.set_mode("namespace0.0", "turbo"),
    lambda lab: lab.mkfs("ntfs", "/dev/pmem0"),
    lambda lab: lab.truncate_wait("zfs"),
])
def test_bad_input_is_refused_before_the_guest(call):
    vm = FakeVM()
    with pytest.raises(ConfigError) as e:
        call(Lab(vm))
    assert vm.ssh.commands == []
    assert len(str(e.value)) > 20 and ("hint:" in str(e.value) or "use " in str(e.value) or "choose" in str(e.value)), \
        str(e.value)        # says what was wrong and what to do


def test_unknown_choice_names_the_valid_ones():
    with pytest.raises(ConfigError) as e:
        Lab(FakeVM()).pin("rdma", "hugetlb")
    assert "anon" in str(e.value) and "devdax" in str(e.value)


def test_mkfs_refuses_to_erase_existing_filesystem():
    vm = FakeVM([(r"blkid", "xfs\n", 0)])
    with pytest.raises(ConfigError, match="already holds a xfs"):
        Lab(vm).mkfs("xfs", "/dev/pmem0")
    assert not any("mkfs" in c for c in vm.ssh.commands)


def test_explanations():
    assert "-b 4096" in explain_mount(["EXT4-fs (pmem1): unsupported blocksize for DAX"])
    assert "fsdax" in explain_mount(["EXT4-fs (pmem0): DAX unsupported by block device."])


@pytest.mark.parametrize("cases, says", [
    ([("rdma", "hugetlb", "shared")], "memory kind"),
    ([("rdma", "anon", "shared"), ("dma", "anon", "shared")], "pin mechanism"),
    ([("rdma", "anon", "both")], "mapping"),
    ([("rdma", "anon")], "triple"),
    (["rdma"], "triple"),
    ([], "no matrix cases"),
])
def test_matrix_cases_checked_before_the_guest_is_touched(cases, says):
    vm = FakeVM()
    with pytest.raises(ConfigError) as e:
        Lab(vm).matrix(cases=cases)
    assert says in str(e.value)
    assert vm.ssh.commands == []


def test_short_cases_are_valid_triples():
    assert len(SHORT_CASES) == len(set(SHORT_CASES)) == 13
    assert ('rdma', 'pagecache', 'shared') in SHORT_CASES      # notebook 06 compares the page-cache column
    assert {c[2] for c in SHORT_CASES} == {"shared"}


def pin(mech, mem, ok, errno=None, errname=None, vmpin=None, foll=None, trace=()):
    return PinResult(mech, mem, "shared", ok, errno, errname, vmpin, foll, [], list(trace))


def test_pin_summary_says_answer_counters_and_where_refused():
    ok = pin("rdma", "anon", True, vmpin=1024, foll=0).summary()
    assert ok.split() == ["rdma", "anon", "ok", "VmPin", "+1024", "kB", "nr_foll_pin_acquired", "+0"]
    no = pin("v4l2", "fsdax-xfs", False, 95, "EOPNOTSUPP",
             trace=[f"{KPROBE}: (check_vma_flags+0x0/0x90) <- __get_user_pages"]).summary()
    assert no.split()[:8] == ["v4l2", "fsdax-xfs", "EOPNOTSUPP", "(95)", "VmPin", "-", "nr_foll_pin_acquired", "-"]
    assert no.endswith("refused in: (check_vma_flags+0x0/0x90) <- __get_user_pages")
    assert pin("odirect", "devdax", False, 14, None).summary().split()[2:4] == ["errno", "(14)"]


def matrix(kernel, pins, warned=()):
    return {"kernel": kernel, "mounts": [{"fs": fs, "experimental_warning": True} for fs in warned],
            "pins": [{"mechanism": p.mechanism, "memory": p.memory, "mapping": p.mapping, "ok": p.ok,
                      "errno": p.errno, "errname": p.errname, "foll_pin_delta": p.foll_pin_delta} for p in pins]}


def test_compare_matrices_marks_only_rows_that_differ():
    a = matrix("6.1.0-x", [pin("rdma", "fsdax-xfs", False, 95, "EOPNOTSUPP"),
                           pin("v4l2", "anon", True, foll=4),
                           pin("odirect", "devdax", True, foll=1)], warned=("xfs", "ext4"))
    b = matrix("6.12.0-y", [pin("rdma", "fsdax-xfs", False, 95, "EOPNOTSUPP"),
                            pin("v4l2", "anon", True, foll=0)])
    lines = compare_matrices(a, b).splitlines()
    assert lines[0] == "6.1.0-x: EXPERIMENTAL warning from xfs, ext4"
    assert lines[1] == "6.12.0-y: EXPERIMENTAL warning from no filesystem"
    rows = {tuple(line.split()[:2]): line for line in lines[3:]}
    assert "differs" not in rows[("rdma", "fsdax-xfs")]
    assert rows[("rdma", "fsdax-xfs")].count("EOPNOTSUPP (95)") == 2
    assert rows[("v4l2", "anon")].endswith("<- differs")        # foll_pin went from +4 to +0
    assert rows[("odirect", "devdax")].endswith("| not measured")


@pytest.mark.parametrize("kw, says", [
    ({"other_kernel": "6.1"}, "must differ"),
    ({"other_kernel": "4.19"}, "4.19"),
    ({"cases": [("rdma", "hugetlb", "shared")]}, "memory kind"),
])
def test_two_kernel_comparison_checks_before_starting_anything(kw, says, monkeypatch):
    import labkit.machine.vm
    monkeypatch.setattr(labkit.machine.vm, "connect", lambda **_: pytest.fail("a VM was started"))
    vm = FakeVM(kernel="6.1")
    with pytest.raises(ConfigError) as e:
        matrices_on_two_kernels(Lab(vm), **kw)
    assert says in str(e.value)
    assert vm.ssh.commands == []


# -- issue 11 item 5: the lab never measures the wrong memory -------------------

def test_mount_refuses_another_filesystems_mount_point():
    """ext4 on /mnt/fsdax-xfs would make every later "fsdax-xfs" row come from ext4."""
    vm = FakeVM()
    with pytest.raises(ConfigError, match="fsdax-xfs") as e:
        Lab(vm).mount("ext4", "/dev/pmem1", "/mnt/fsdax-xfs")
    assert "xfs" in str(e.value) and vm.ssh.commands == []


def _helper_args(vm: FakeVM, sub: str) -> list[str]:
    import shlex
    for cmd in vm.ssh.commands:
        words = shlex.split(cmd)
        if PROBE_PATH in words and sub in words:
            return words[words.index(PROBE_PATH) + 1:]
    raise AssertionError(f"no {sub} helper command in {vm.ssh.commands}")


def test_fsdax_pins_and_truncate_tell_the_helper_which_dax_mount_to_expect():
    vm = FakeVM([(r"ndctl list", NDCTL, 0)])
    lab = Lab(vm)
    with pytest.raises(LabError):      # the fake helper answers nothing
        lab.pin("rdma", "fsdax-ext4")
    args = _helper_args(vm, "rdma")
    assert args[args.index("--path") + 1] == "/mnt/fsdax-ext4/pin-rdma.dat"
    assert args[args.index("--dax-fs") + 1] == "ext4" and args[args.index("--dax-device") + 1] == "/dev/pmem1"
    with pytest.raises(LabError):
        lab.truncate_wait("xfs")
    args = _helper_args(vm, "truncate-wait")
    assert args[args.index("--dax-fs") + 1] == "xfs"
    assert "--dax-device" not in args      # namespace0.0 is raw here: no fsdax device to expect


# -- issue 11 item 10: pin_many and roles give the lab's clear error ------------

@pytest.mark.parametrize("cases, says", [
    ([("rdma", "anon")], "triple"),
    (["rdma"], "triple"),
    ("rdma", "list of"),
    (42, "list of"),
    ([("rdma", "hugetlb", "shared")], "memory kind"),
    ([("rdma", "anon", "shared"), None], "triple"),
])
def test_pin_many_checks_cases_before_the_guest_is_touched(cases, says):
    vm = FakeVM()
    with pytest.raises(ConfigError) as e:
        Lab(vm).pin_many(cases)
    assert says in str(e.value)
    assert vm.ssh.commands == []


@pytest.mark.parametrize("roles", [{"devdax": "str"}, {"devdax": None}, "roles", {"hugetlb": None}])
def test_pin_roles_must_be_what_prepare_pmem_returned(roles):
    vm = FakeVM()
    with pytest.raises(ConfigError) as e:
        Lab(vm).pin("rdma", "devdax", roles=roles)
    assert "prepare_pmem" in str(e.value) or "pmem role" in str(e.value)
    assert vm.ssh.commands == []


# -- typed results -------------------------------------------------------------

def test_matrix_result_is_typed_and_keeps_the_json_shape():
    import json as _json

    from labkit.lab import MatrixResult, MountResult, TruncateWait
    p = pin("rdma", "anon", True, vmpin=2048, foll=0)
    m = MatrixResult(kernel="6.1.0-x", accel="tcg",
                     mounts=[MountResult("xfs", "/dev/pmem0", "/mnt/fsdax-xfs", "dax", True, True, True, ["l"])],
                     pins=[p], truncate_wait=TruncateWait("xfs", True, 1.0, ["xfs_break_dax_layouts"], True),
                     seconds=3.0)
    d = _json.loads(_json.dumps(m.to_dict()))
    assert list(d) == ["kernel", "accel", "mounts", "pins", "truncate_wait", "seconds"]
    assert list(d["mounts"][0]) == ["fs", "dax_active", "experimental_warning", "kernel_log", "ok", "options",
                                    "error"]
    assert list(d["pins"][0]) == ["mechanism", "memory", "mapping", "ok", "errno", "errname", "vmpin_kb_delta",
                                  "foll_pin_delta", "kernel_log", "trace", "device_odp", "why"]
    assert list(d["truncate_wait"]) == ["fs", "blocked", "seconds", "where", "completed"]
    assert m["pins"][0]["vmpin_kb_delta"] == 2048 and m.pins[0] is p and dict(m) == d
    assert "differs" not in compare_matrices(m, d)


def test_observation_collects_output_log_and_refusals():
    from labkit.lab import Observation

    class MarkerVM(FakeVM):
        def run(self, cmd, timeout=60.0, check=False, stdin=None):
            r = super().run(cmd, timeout=timeout, check=check, stdin=stdin)
            if "@@" not in r.command:
                return r
            m = list(cmd)[4]      # sh -c SCRIPT sh MARKER argv...
            out = (f"@@{m} out\nhello\n@@{m} err\n@@{m} rc\n3\n@@{m} log\n[1] old\n[2] labkit-mark {m}\n"
                   f"[3] rxe: Unable to pin\n@@{m} trace\n p: ({KPROBE}) check_vma_flags ret=-95\n")
            return type(r)(r.command, 0, out, "", 0.1)

    vm = MarkerVM()
    obs = Lab(vm).observe(["echo", "$(id)"])
    assert isinstance(obs, Observation) and obs.result.rc == 3 and obs.result.stdout == "hello"
    assert obs.kernel_log == ["[3] rxe: Unable to pin"] and obs.trace and "ret=-95" in obs.trace[0]
    assert "'$(id)'" in vm.ssh.commands[-1]       # the argument list is quoted, never pasted into the script


def test_fake_vm_keeps_the_real_vms_contract():
    from labkit.lab import ControlledMachine
    from labkit.machine.vm import VMState
    vm = FakeVM()
    assert isinstance(vm, ControlledMachine)
    assert vm.status() is VMState.RUNNING
    vm.reset(pmem=False, timeout=5.0)
    assert vm.calls == ["reset", "start"] and vm.status() is VMState.RUNNING


# -- issue 22 items 6, 7: one row per mechanism, one companion runner -------------------

@pytest.mark.parametrize("mechanism, tail", [
    ("rdma", ["--size", "2097152", "--hold", "0.0"]),
    ("rdma-odp", ["--size", "2097152", "--hold", "0.0"]),
    ("v4l2", []),
    ("odirect", ["--size", "2097152", "--target", "/root/odirect-src.dat"]),
    ("io_uring", ["--size", "2097152"]),
])
def test_each_mechanisms_row_gives_the_arguments_its_guest_command_takes(mechanism, tail):
    vm = FakeVM()
    argv = Lab(vm).probes.probe_argv((mechanism, "anon", "shared"), 2 * 2**20, 0.0, None)
    assert argv == [mechanism, "--memory", "anon", "--mapping", "shared", *tail]
    assert vm.ssh.commands == []


def test_only_a_holdable_mechanism_is_held():
    vm = FakeVM()
    with pytest.raises(ConfigError, match="holdable pin mechanism"):
        Lab(vm).hold_pin("v4l2")
    assert vm.ssh.commands == []


def _peer():
    from labkit.lab.companion import companion
    return companion("matrix", "lab", "6.1", "6.12")


def test_the_companion_runner_measures_both_and_hands_back_the_vm(monkeypatch):
    import labkit.machine.vm
    from labkit.lab.companion import beside
    other = FakeVM(kernel="6.12")
    monkeypatch.setattr(labkit.machine.vm, "connect", lambda name, kernel, **_: other)
    assert beside(_peer(), lambda: "here", lambda vm: ("there", vm.kernel)) == ("here", ("there", "6.12"), other)


def test_a_companion_still_booting_at_the_timeout_is_killed_and_its_thread_joined(monkeypatch):
    """What ``pool.shutdown(wait=False)`` left behind: a thread still booting a VM after the error."""
    import threading

    import labkit.machine.vm
    from labkit.errors import GuestTimeout
    from labkit.lab import companion as comp
    killed = threading.Event()
    booting = []

    def slow_connect(name, kernel, **_):     # a boot that ends only when its QEMU is killed
        booting.append(threading.current_thread())
        assert killed.wait(30), "the companion was never killed"
        raise LabError("QEMU was killed during the boot")

    class Handle:                             # the VM handle _cancel makes for the companion's state dir
        def __init__(self, name, kernel, persistent):
            assert (name, kernel, persistent) == ("lab-other", "6.12", True)

        def kill(self):
            killed.set()
            return True

    monkeypatch.setattr(labkit.machine.vm, "connect", slow_connect)
    monkeypatch.setattr(labkit.machine.vm, "VM", Handle)
    monkeypatch.delenv("LABKIT_MANAGED_VMS", raising=False)
    with pytest.raises(GuestTimeout, match="lab-other"):
        comp.beside(_peer(), lambda: "here", lambda vm: pytest.fail("measured a VM that never booted"),
                    timeout=0.5)
    assert killed.is_set() and booting and not booting[0].is_alive()


def test_a_failure_here_cancels_the_companion_too(monkeypatch):
    import threading

    import labkit.machine.vm
    from labkit.lab import companion as comp
    other, started = FakeVM(kernel="6.12"), threading.Event()
    stopped = []
    other.stop = lambda *a, **k: stopped.append(True)
    other.kill = lambda: False
    monkeypatch.setattr(labkit.machine.vm, "connect", lambda name, kernel, **_: other)
    monkeypatch.setattr(labkit.machine.vm, "VM", lambda *a, **k: other)    # kill() of a thread still running
    monkeypatch.delenv("LABKIT_MANAGED_VMS", raising=False)

    def there(vm):
        started.set()
        return "there"

    def here():
        assert started.wait(10)
        raise LabError("the measurement here failed")
    with pytest.raises(LabError, match="here failed"):
        comp.beside(_peer(), here, there)
    assert stopped == [True]
    assert not [t for t in threading.enumerate() if t.name.startswith("labkit-companion")]


# -- issue 23: the refusal's function per kernel, 5.10's XFS, the guest on Python 3.9 --

@pytest.mark.parametrize("release, functions", [
    ("5.10.0-46-amd64", ("__gup_longterm_locked", "get_vaddr_frames")),
    ("6.1.0-57-amd64", ("check_vma_flags",)),
    ("6.12.38+deb12-amd64", ("check_vma_flags",)),
    ("7.3.4+deb13-amd64", ("check_vma_flags",)),
    ("5.4.0-1-amd64", ("__gup_longterm_locked", "get_vaddr_frames")),
])
def test_the_functions_traced_come_from_the_release(release, functions):
    from labkit.lab.tracing import refusing_functions
    assert refusing_functions(release) == functions


def test_every_lab_kernel_has_a_refusal_site_and_an_unknown_release_is_an_error():
    from labkit import image
    from labkit.lab.tracing import Tracer, refusing_functions
    for k in image.KERNELS:
        assert refusing_functions(f"{k}.0-1-amd64"), k
    vm = FakeVM(rules=[(r"^uname -r$", "4.9.0-1-amd64\n", 0)])
    with pytest.raises(LabError, match="no known refusal site for kernel 4.9") as e:
        Tracer(vm).ensure_kprobe()
    assert "REFUSAL_SITES" in e.value.hint


def test_the_tracer_probes_each_function_under_its_own_name():
    from labkit.lab.tracing import Tracer
    vm = FakeVM(kernel="5.10")
    t = Tracer(vm)
    t.ensure_kprobe()
    t.ensure_kprobe()                       # once per guest
    probes = [c for c in vm.ssh.commands if "kprobe_events" in c]
    assert len(probes) == 1 and probes[0].endswith(
        "sh labkit_cvf __gup_longterm_locked labkit_cvf_1 get_vaddr_frames")
    assert t.functions == ("__gup_longterm_locked", "get_vaddr_frames")


def test_refusals_of_every_probe_are_kept_and_page_counts_are_not():
    from labkit.lab.results import traced_function
    trace = ("p-1 [000] 1.0: labkit_cvf: (internal_get_user_pages_fast+0x274/0xde0 <- __gup_longterm_locked) ret=512\n"
             "p-1 [000] 1.1: labkit_cvf: (internal_get_user_pages_fast+0x274/0xde0 <- __gup_longterm_locked) ret=-95\n"
             "p-1 [000] 1.2: labkit_cvf_1: (vb2_create_framevec+0x52/0xa0 [videobuf2_memops] <- get_vaddr_frames) "
             "ret=-95\n")
    lines = refusal_lines(trace)
    assert [traced_function(ln) for ln in lines] == ["__gup_longterm_locked", "get_vaddr_frames"]


@pytest.mark.parametrize("kernel, argv", [
    ("5.10", ["mkfs.xfs", "-q", "-f", "-m", "reflink=0", "/dev/pmem0"]),   # "DAX and reflink cannot be used together!"
    ("6.1", ["mkfs.xfs", "-q", "-f", "/dev/pmem0"]),
])
def test_xfs_is_made_without_reflink_where_the_kernel_refuses_dax_on_it(kernel, argv):
    vm = FakeVM(kernel=kernel)
    Lab(vm).mkfs("xfs", "/dev/pmem0", force=True)
    assert shlex.join(argv) in vm.ssh.commands


def test_the_guest_helper_parses_as_python_3_9():
    """bullseye (the 5.10 image) has Python 3.9: no 3.10+ grammar in the guest package, and no
    ``X | Y`` of types evaluated at run time (annotations are strings there: ``from __future__``)."""
    import ast
    from pathlib import Path

    import labkit.lab.guest as guest
    root = Path(guest.__file__).parent
    for path in sorted(root.rglob("*.py")):
        src = path.read_text()
        tree = ast.parse(src, filename=str(path), feature_version=(3, 9))
        annotations = {id(n) for node in ast.walk(tree) for a in (getattr(node, "annotation", None),
                                                                   getattr(node, "returns", None))
                       if a is not None for n in ast.walk(a)}
        uses_union = any(isinstance(n, ast.BinOp) and isinstance(n.op, ast.BitOr) for n in ast.walk(tree)
                         if id(n) in annotations)
        assert not uses_union or "from __future__ import annotations" in src, path
        for node in ast.walk(tree):
            if isinstance(node, ast.Call):
                kws = {k.arg for k in node.keywords}
                name = ast.unparse(node.func)
                assert not (name.endswith("dataclass") and kws & {"slots", "kw_only"}), (path, node.lineno)
                assert not (name == "zip" and "strict" in kws), (path, node.lineno)
            if isinstance(node, ast.BinOp) and isinstance(node.op, ast.BitOr) and id(node) not in annotations:
                sides = (node.left, node.right)
                assert not any(isinstance(s, ast.Constant) and s.value is None for s in sides), (path, node.lineno)
