"""Lab-layer logic without a guest: parsers, validation, and that bad input
never reaches the guest (the fake records every command)."""

import json

import pytest

from labkit.errors import ConfigError
from labkit.testing.fakes import FakeVM
from labkit.lab import (KPROBE, SHORT_CASES, Lab, PinResult, check_mount_options, compare_matrices, explain_mount,
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
    assert str(e.value)


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
    assert len(SHORT_CASES) == len(set(SHORT_CASES)) == 12
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
    ({"other_kernel": "5.10"}, "5.10"),
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
