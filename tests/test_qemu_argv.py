"""The QEMU command line is a pure function of the config: tested by equality."""

from pathlib import Path

import pytest

from labkit.machine.config import Nvdimm, VMConfig, check_name
from labkit.errors import ConfigError
from labkit.machine.argv import build_qemu_argv, kernel_arg, kernel_cmdline, qemu_opt


def cfg(**kw) -> VMConfig:
    base = dict(name="t", state_dir=Path("/s"), kernel_image=Path("/i/vmlinuz"), initrd=Path("/i/initrd.img"),
                ssh_port=2222, ssh_pubkey="AAAAKEY", nvdimms=(Nvdimm(512), Nvdimm(512)))
    base.update(kw)
    return VMConfig(**base)


def test_full_argv_tcg():
    assert build_qemu_argv(cfg()) == [
        "qemu-system-x86_64", "-name", "labkit-t", "-nodefaults", "-no-user-config", "-display", "none",
        "-no-reboot",
        "-machine", "pc,nvdimm=on", "-accel", "tcg,thread=multi", "-cpu", "max", "-smp", "2",
        "-m", "1024M,slots=4,maxmem=8G",
        "-kernel", "/i/vmlinuz", "-initrd", "/i/initrd.img", "-append",
        "console=ttyS0 root=/dev/vda rw panic=-1 loglevel=4 tsc=reliable no_timer_check nokaslr "
        "mitigations=off",
        "-drive", "file=/s/root.qcow2,if=none,id=root,format=qcow2,discard=unmap",
        "-device", "virtio-blk-pci,drive=root",
        "-object", "memory-backend-file,id=pmem0,share=on,mem-path=/s/pmem0.img,size=512M,align=2M",
        "-device", "nvdimm,id=nvdimm0,memdev=pmem0",
        "-object", "memory-backend-file,id=pmem1,share=on,mem-path=/s/pmem1.img,size=512M,align=2M",
        "-device", "nvdimm,id=nvdimm1,memdev=pmem1",
        "-device", "virtio-balloon-pci,id=balloon0,free-page-reporting=on",
        "-fw_cfg", "name=opt/org.labkit/sshkey,string=ssh-ed25519 AAAAKEY labkit-host",
        "-netdev", "user,id=net0,restrict=on,hostfwd=tcp:127.0.0.1:2222-:22",
        "-device", "virtio-net-pci,netdev=net0",
        "-chardev", "socket,id=console,path=/s/console.sock,server=on,wait=off,logfile=/s/console.log",
        "-serial", "chardev:console",
        "-chardev", "socket,id=qmp,path=/s/qmp.sock,server=on,wait=off",
        "-mon", "chardev=qmp,mode=control",
        "-chardev", "socket,id=watch,path=/s/watch.sock,server=on,wait=off",
        "-mon", "chardev=watch,mode=control",
        "-pidfile", "/s/qemu.pid",
    ]


def test_free_page_reporting_can_be_left_out():
    argv = build_qemu_argv(cfg(free_page_reporting=False))
    assert not any("virtio-balloon" in a for a in argv)


def test_kvm_uses_host_cpu():
    argv = build_qemu_argv(cfg(accel="kvm"))
    i = argv.index("-accel")
    assert argv[i:i + 4] == ["-accel", "kvm", "-cpu", "host"]


def test_user_args_come_last():
    assert build_qemu_argv(cfg(extra_args=("-S",)))[-1] == "-S"


def test_commas_in_paths_are_doubled():
    argv = build_qemu_argv(cfg(state_dir=Path("/a,b")))
    assert "file=/a,,b/root.qcow2,if=none,id=root,format=qcow2,discard=unmap" in argv
    assert qemu_opt("x,y,,z") == "x,,y,,,,z"


def test_ssh_forward_is_loopback_only_and_restricted():
    net = build_qemu_argv(cfg())[build_qemu_argv(cfg()).index("-netdev") + 1]
    assert "restrict=on" in net.split(",")
    assert "hostfwd=tcp:127.0.0.1:2222-:22" in net.split(",")


@pytest.mark.parametrize("value", ['a b', 'a"b', "a'b", "a\nb"])
def test_kernel_args_refuse_spaces_and_quotes(value):
    with pytest.raises(ConfigError):
        kernel_arg("x", value)


def test_cmdline_extra_is_checked():
    assert kernel_cmdline(cfg(cmdline_extra=("foo=bar",))).endswith("foo=bar")
    with pytest.raises(ConfigError):
        kernel_cmdline(cfg(cmdline_extra=("foo=b r",)))


@pytest.mark.parametrize("name", ["", "A", "../x", "a b", "x;rm", "a" * 33, "-x", "é"])
def test_bad_vm_names(name):
    with pytest.raises(ConfigError) as e:
        check_name(name)
    assert "invalid VM name" in str(e.value)


@pytest.mark.parametrize("kw", [dict(accel="hvf"), dict(memory_mb=10), dict(smp=0),
                                dict(nvdimms=(Nvdimm(),) * 5), dict(maxmem_gb=1), dict(ssh_port=70000)])
def test_bad_configs(kw):
    with pytest.raises(ConfigError):
        cfg(**kw)


@pytest.mark.parametrize("size", [0, -5, 100, 513, 10**9])
def test_bad_nvdimm_sizes(size):
    with pytest.raises(ConfigError):
        Nvdimm(size)


def test_ssh_key_travels_in_fw_cfg_not_the_kernel_cmdline():
    argv = build_qemu_argv(cfg())
    assert "AAAAKEY" not in argv[argv.index("-append") + 1]
    assert argv[argv.index("-fw_cfg") + 1].startswith("name=opt/org.labkit/sshkey,string=ssh-ed25519 AAAAKEY")
    assert "-fw_cfg" not in build_qemu_argv(cfg(ssh_pubkey=""))


def test_the_tcg_cache_is_capped_by_default_and_env_or_caller_can_size_it(tmp_path):
    """QEMU's own 1 GiB translation cache filled to 984 MB in a course-long VM;
    labkit passes 128 MiB unless told otherwise (LABKIT_TCG_CACHE_MB, or the caller)."""
    from labkit.errors import ConfigError
    from labkit.machine.vm import VM
    from labkit.settings import DEFAULT_TCG_CACHE_MB, Settings
    assert Settings.from_env({}).tcg_cache_mb == DEFAULT_TCG_CACHE_MB == 128
    assert "tcg,thread=multi,tb-size=128" in build_qemu_argv(cfg(tcg_cache_mb=Settings.from_env({}).tcg_cache_mb))
    big = Settings.from_env({"LABKIT_TCG_CACHE_MB": "1024"})
    assert big.tcg_cache_mb == 1024
    def vm(**kw):
        return VM("t", persistent=True, state_dir=tmp_path, settings=big, **kw)
    assert vm().tcg_cache_mb == 1024 and vm(tcg_cache_mb=64).tcg_cache_mb == 64
    with pytest.raises(ConfigError, match="not a number of MiB"):
        Settings.from_env({"LABKIT_TCG_CACHE_MB": "lots"})
