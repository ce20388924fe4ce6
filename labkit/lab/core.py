"""The lab's subject: persistent memory, DAX mounts, long-term pins and their
refusals, observed on the live guest.

Everything here *measures*: results come from the guest's own tools (ndctl,
/proc/mounts, statx, dmesg, tracefs, /proc/PID/status, /proc/vmstat) and from
``pinprobe.py``, a guest-side helper uploaded on first use. Nothing is
pre-recorded; the learner sees what the running kernel did.

Every value that reaches the guest is either checked against a closed set of
choices or quoted with ``shlex.quote``.
"""

from __future__ import annotations

import json
import re
import shlex
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from labkit.errors import CommandFailed, ConfigError, LabError
from labkit.machine.channels.ssh import CommandResult

FILESYSTEMS = ("xfs", "ext4")
MEMORY_KINDS = ("anon", "pagecache", "fsdax-xfs", "fsdax-ext4", "devdax")
MECHANISMS = ("rdma", "v4l2", "odirect", "io_uring")
MAPPINGS = ("shared", "private")
NS_MODES = ("fsdax", "devdax", "raw", "sector")
MOUNT_OPTION_RE = re.compile(r"^[a-z0-9_]+(=[a-z0-9_]+)?$")
ALLOWED_MOUNT_OPTIONS = {"dax", "dax=always", "dax=inode", "dax=never", "ro", "rw", "noatime",
                         "relatime", "sync", "nodiscard"}
MOUNT_ROOT = "/mnt"
PROBE_PATH = "/run/labkit/pinprobe.py"
KPROBE = "labkit_cvf"
MAX_PIN_BYTES = 64 * 2**20
EXPERIMENTAL = "DAX enabled. Warning: EXPERIMENTAL"
# A few pin attempts that tell the story (long-term vs transient, fs-dax vs
# device-dax) for comparing kernels quickly; ``Lab.matrix(cases=SHORT_CASES)``.
SHORT_CASES = [(mech, mem, "shared") for mech in ("rdma", "v4l2", "io_uring", "odirect")
               for mem in ("anon", "fsdax-xfs", "devdax")]


def check_cases(cases) -> list[tuple[str, str, str]]:
    """``cases`` as a list of valid (mechanism, memory, mapping) triples, else a ConfigError."""
    out = []
    for case in cases:
        if not isinstance(case, (tuple, list)) or len(case) != 3:
            raise ConfigError(f"each matrix case must be a (mechanism, memory, mapping) triple, "
                              f"not {case!r}; e.g. ('rdma', 'fsdax-xfs', 'shared')")
        mech, mem, mapping = case
        out.append((choose(mech, MECHANISMS, "pin mechanism"), choose(mem, MEMORY_KINDS, "memory kind"),
                    choose(mapping, MAPPINGS, "mapping")))
    if not out:
        raise ConfigError("no matrix cases given; pass None for all of them, or e.g. labkit.lab.SHORT_CASES")
    return out


def choose(value: str, choices: tuple[str, ...], what: str) -> str:
    """``value`` if it is one of ``choices``, else a ConfigError listing them."""
    if not isinstance(value, str) or value not in choices:
        raise ConfigError(f"unknown {what} {value!r}", hint=f"choose one of: {', '.join(choices)}")
    return value


def check_mount_options(options: str) -> str:
    """Mount options from a closed vocabulary (no shell or mount-helper tricks)."""
    if not isinstance(options, str) or len(options) > 200:
        raise ConfigError("mount options must be a short string such as 'dax' or 'dax=always'",
                          hint="use a comma-separated list of: " + ", ".join(sorted(ALLOWED_MOUNT_OPTIONS)))
    for opt in filter(None, options.split(",")):
        if not MOUNT_OPTION_RE.match(opt) or opt not in ALLOWED_MOUNT_OPTIONS:
            raise ConfigError(f"mount option {opt!r} is not allowed",
                              hint="use a comma-separated list of: " + ", ".join(sorted(ALLOWED_MOUNT_OPTIONS)))
    return options


def check_text(value: object, pattern: str, what: str, hint: str, max_len: int = 64) -> str:
    """``value`` if it is a short str matching ``pattern`` in full (``re.match``
    with ``$`` would let a trailing newline through), else a ConfigError."""
    if not isinstance(value, str) or len(value) > max_len or not re.fullmatch(pattern, value):
        shown = value if not isinstance(value, str) or len(value) <= 80 else value[:77] + "..."
        raise ConfigError(f"invalid {what} {shown!r}", hint=hint)
    return value


def check_seconds(value: object, what: str, limit: float) -> float:
    """A number of seconds in 0..limit (no strings, NaN or infinities)."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= limit:
        raise ConfigError(f"{what} {value!r} s is out of range", hint=f"use a number of seconds in 0..{limit:g}")
    return float(value)


MOUNTPOINT_RE = r"/mnt/[a-zA-Z0-9_-]{1,48}"
DEVICE_RE = r"/dev/(pmem\d{1,3}|dax\d{1,3}\.\d{1,3})"
NAMESPACE_RE = r"namespace\d{1,3}\.\d{1,3}"
BLOCK_SIZES = (1024, 2048, 4096)


def check_mountpoint(mp: object) -> str:
    return check_text(mp, MOUNTPOINT_RE, "mount point", "use /mnt/NAME (1-48 letters, digits, - and _)")


def check_size(size: int, limit: int = MAX_PIN_BYTES) -> int:
    if not isinstance(size, int) or isinstance(size, bool) or size <= 0 or size % 4096 or size > limit:
        raise ConfigError(f"size {size!r} does not fit",
                          hint=f"use a positive multiple of 4096 bytes up to {limit // 2**20} MiB")
    return size


@dataclass(frozen=True)
class Namespace:
    """One NVDIMM namespace as ndctl reports it (the facts a learner needs)."""

    dev: str
    region: str
    mode: str
    size: int
    align: int | None = None
    blockdev: str | None = None
    chardev: str | None = None
    map: str | None = None

    @classmethod
    def from_ndctl(cls, region: str, d: dict) -> Namespace:
        chardev = d.get("chardev")
        if not chardev and d.get("daxregion", {}).get("devices"):
            chardev = d["daxregion"]["devices"][0].get("chardev")
        return cls(dev=d.get("dev", ""), region=region, mode=d.get("mode", "?"), size=int(d.get("size", 0)),
                   align=d.get("align"), blockdev=d.get("blockdev"), chardev=chardev, map=d.get("map"))


def parse_ndctl(text: str) -> list[Namespace]:
    """``ndctl list -RNv`` JSON (a region object, or a list of them) -> namespaces."""
    text = text.strip()
    if not text:
        return []
    data = json.loads(text)
    regions = data if isinstance(data, list) else data.get("regions", [data])
    out = []
    for r in regions:
        for ns in r.get("namespaces", []):
            out.append(Namespace.from_ndctl(r.get("dev", "?"), ns))
    return sorted(out, key=lambda n: n.dev)


@dataclass
class MountResult:
    """What a DAX mount really did."""

    fs: str
    device: str
    mountpoint: str
    options: str
    ok: bool
    dax_active: bool
    experimental_warning: bool
    kernel_log: list[str]
    error: str = ""
    proc_mounts: str = ""


@dataclass
class PinResult:
    """One pin attempt: the kernel's answer and what it did to the counters."""

    mechanism: str
    memory: str
    mapping: str
    ok: bool
    errno: int | None
    errname: str | None
    vmpin_kb_delta: int | None
    foll_pin_delta: int | None
    kernel_log: list[str]
    trace: list[str]
    detail: dict = field(default_factory=dict)

    def summary(self) -> str:
        """One line for a learner: the kernel's answer and what it did to the counters."""
        res = "ok" if self.ok else f"{self.errname or 'errno'} ({self.errno})"
        vp = "-" if self.vmpin_kb_delta is None else f"{self.vmpin_kb_delta:+d} kB"
        fp = "-" if self.foll_pin_delta is None else f"{self.foll_pin_delta:+d}"
        why = f"   refused in: {self.trace[0].split(KPROBE + ':', 1)[-1].strip()}" if self.trace else ""
        return (f"{self.mechanism:8s} {self.memory:10s} {res:16s} VmPin {vp:>9s}  "
                f"nr_foll_pin_acquired {fp:>5s}{why}")


@dataclass
class TruncateWait:
    fs: str
    blocked: bool
    seconds: float | None
    where: list[str]
    completed: bool
    detail: dict = field(default_factory=dict)


def parse_sections(text: str, marker: str) -> dict[str, str]:
    """Split output framed by '@@<marker> NAME' lines into sections."""
    out: dict[str, str] = {}
    name = None
    buf: list[str] = []
    for line in text.splitlines():
        if line.startswith(f"@@{marker} "):
            if name is not None:
                out[name] = "\n".join(buf)
            name, buf = line.split(" ", 1)[1].strip(), []
        elif name is not None:
            buf.append(line)
    if name is not None:
        out[name] = "\n".join(buf)
    return out


def log_after_marker(dmesg: str, marker: str) -> list[str]:
    lines = dmesg.splitlines()
    for i in range(len(lines) - 1, -1, -1):
        if marker in lines[i]:
            return [ln for ln in lines[i + 1:] if ln.strip()]
    return [ln for ln in lines if ln.strip()][-20:]


def refusal_lines(trace: str) -> list[str]:
    """kretprobe lines of check_vma_flags that returned an error."""
    return [ln.strip() for ln in trace.splitlines()
            if "check_vma_flags" in ln and not re.search(r"ret=0\b", ln)]


class Lab:
    """The lab layer over a running ``VM``."""

    def __init__(self, vm) -> None:
        self.vm = vm
        self._probe_uploaded = False
        self._kprobe = False
        self._roles: dict[str, Namespace] = {}

    # -- plumbing ----------------------------------------------------------
    def sh(self, script: str, timeout: float = 60.0, check: bool = True) -> CommandResult:
        return self.vm.run(["sh", "-c", script], timeout=timeout, check=check)

    def observe(self, script: str, timeout: float = 60.0) -> tuple[CommandResult, str, list[str], list[str]]:
        """Run ``script`` and collect the kernel log lines and check_vma_flags
        refusals it caused (one SSH round trip)."""
        self._ensure_kprobe()
        m = uuid.uuid4().hex[:12]
        wrapped = (f"echo 'labkit-mark {m}' > /dev/kmsg; : > /sys/kernel/tracing/trace\n"
                   f"echo '@@{m} out'; ( {script} ) 2>/tmp/labkit-{m}.err; rc=$?\n"
                   f"echo '@@{m} err'; cat /tmp/labkit-{m}.err; rm -f /tmp/labkit-{m}.err\n"
                   f"echo '@@{m} rc'; echo $rc\n"
                   f"echo '@@{m} log'; dmesg\n"
                   f"echo '@@{m} trace'; cat /sys/kernel/tracing/trace\n")
        r = self.vm.run(["sh", "-c", wrapped], timeout=timeout)
        sec = parse_sections(r.stdout, m)
        rc = int(sec.get("rc", "-1").strip() or -1)
        result = CommandResult(script, rc, sec.get("out", ""), sec.get("err", ""), r.seconds)
        return result, m, log_after_marker(sec.get("log", ""), f"labkit-mark {m}"), \
            refusal_lines(sec.get("trace", ""))

    def _ensure_kprobe(self) -> None:
        if self._kprobe:
            return
        self.sh(f"cd /sys/kernel/tracing && if ! grep -q {KPROBE} kprobe_events; then "
                f"echo 'r:{KPROBE} check_vma_flags ret=$retval:s32' >> kprobe_events; fi && "
                f"echo 1 > events/kprobes/{KPROBE}/enable && echo 1 > tracing_on")
        self._kprobe = True

    def _ensure_probe(self) -> None:
        if self._probe_uploaded:
            return
        src = Path(__file__).parent / "guest" / "pinprobe.py"
        self.vm.run(["mkdir", "-p", "/run/labkit"], check=True)
        self.vm.ssh.upload(src.read_bytes(), PROBE_PATH, mode=0o755)
        self._probe_uploaded = True

    # -- persistent memory -------------------------------------------------
    def namespaces(self) -> list[Namespace]:
        return parse_ndctl(self.sh("ndctl list -RNv 2>/dev/null || true").stdout)

    def set_mode(self, namespace: str, mode: str) -> Namespace:
        """Reconfigure a namespace (its data is lost, as with ndctl)."""
        choose(mode, NS_MODES, "namespace mode")
        check_text(namespace, NAMESPACE_RE, "namespace name", "names look like namespace0.0")
        r = self.sh(f"ndctl create-namespace -f -e {shlex.quote(namespace)} -m {mode}", check=False)
        if r.rc != 0:
            raise CommandFailed(r.command, r.rc, r.stdout, explain_ndctl(r.stderr))
        return Namespace.from_ndctl("?", json.loads(r.stdout))

    def prepare_pmem(self) -> dict[str, Namespace]:
        """Region 0 -> fsdax (XFS), region 1 -> fsdax (ext4), region 2 -> devdax.
        Only namespaces in the wrong mode are converted, so data survives."""
        want = {"fsdax-xfs": "fsdax", "fsdax-ext4": "fsdax", "devdax": "devdax"}
        nss = self.namespaces()
        for _ in range(5):      # ndctl can briefly list nothing while a region is still settling
            if len(nss) >= 3:
                break
            time.sleep(1.0)
            nss = self.namespaces()
        if len(nss) < 3:
            raise LabError(f"the guest has {len(nss)} NVDIMM namespaces; the lab needs 3 "
                           "(start the VM with three NVDIMMs, the default)")
        roles = {}
        converted = False
        for (role, mode), ns in zip(want.items(), nss[:3]):
            if ns.mode != mode:
                ns = self.set_mode(ns.dev, mode)
                converted = True
            roles[role] = ns
        fresh = {n.dev: n for n in self.namespaces()} if converted else {}
        self._roles = {role: fresh.get(ns.dev, ns) for role, ns in roles.items()}
        return self._roles

    # -- filesystems -------------------------------------------------------
    def mkfs(self, fs: str, device: str, block_size: int | None = 4096, force: bool = False) -> CommandResult:
        """Make a filesystem. Refuses to overwrite one that exists unless ``force``."""
        choose(fs, FILESYSTEMS, "filesystem")
        self._check_device(device)
        if block_size is not None and (isinstance(block_size, bool) or block_size not in BLOCK_SIZES):
            raise ConfigError(f"block size {block_size!r} is not supported",
                              hint="use 4096 (what DAX needs), 2048 or 1024, or None for mkfs's choice")
        if not force:
            have = self.sh(f"blkid -o value -s TYPE {shlex.quote(device)} || true").stdout.strip()
            if have:
                raise ConfigError(f"{device} already holds a {have} filesystem",
                                  hint="pass force=True to erase it")
        if fs == "ext4":
            bs = f"-b {int(block_size)} " if block_size else ""
            return self.sh(f"mkfs.ext4 -q -F {bs}{shlex.quote(device)}", check=True)
        return self.sh(f"mkfs.xfs -q -f {shlex.quote(device)}", check=True)

    @staticmethod
    def _check_device(device: str) -> None:
        check_text(device, DEVICE_RE, "device", "use /dev/pmemN (fsdax) or /dev/daxN.M")

    def mount(self, fs: str, device: str, mountpoint: str | None = None, options: str = "dax") -> MountResult:
        choose(fs, FILESYSTEMS, "filesystem")
        self._check_device(device)
        check_mount_options(options)
        mp = check_mountpoint(f"{MOUNT_ROOT}/fsdax-{fs}" if mountpoint is None else mountpoint)
        q = shlex.quote
        script = (f"mkdir -p {q(mp)} && mountpoint -q {q(mp)} && umount {q(mp)}; "
                  f"mount -t {fs} -o {q(options)} {q(device)} {q(mp)}")
        r, _, log, _ = self.observe(script)
        mounts = self.sh(f"grep {shlex.quote(' ' + mp + ' ')} /proc/mounts || true").stdout.strip()
        return MountResult(fs=fs, device=device, mountpoint=mp, options=options, ok=r.rc == 0,
                           dax_active=self._dax_active(mp) if r.rc == 0 else False,
                           experimental_warning=any(EXPERIMENTAL in ln for ln in log),
                           kernel_log=log, error=(r.stderr.strip() + explain_mount(log)) if r.rc else "",
                           proc_mounts=mounts)

    def _dax_active(self, mountpoint: str) -> bool:
        """The effective DAX state of a new file on the mount (statx STATX_ATTR_DAX)."""
        code = ("import ctypes,os,sys\n"
                "p=sys.argv[1]+'/.labkit-daxcheck'\nopen(p,'w').close()\n"
                "buf=ctypes.create_string_buffer(256)\nlibc=ctypes.CDLL(None,use_errno=True)\n"
                "r=libc.statx(-100,p.encode(),0,0xfff,buf)\nos.unlink(p)\n"
                "attrs=int.from_bytes(buf.raw[8:16],'little')\n"
                "print('1' if r==0 and attrs & 0x200000 else '0')\n")
        r = self.vm.run(["python3", "-c", code, mountpoint])
        return r.stdout.strip() == "1"

    def umount(self, mountpoint: str) -> None:
        check_mountpoint(mountpoint)
        self.sh(f"umount {shlex.quote(mountpoint)}", check=False)

    def prepare_mounts(self, options: str = "dax") -> list[MountResult]:
        """Both fs-dax namespaces formatted (only if empty) and mounted with ``options``."""
        roles = self.prepare_pmem()
        results = []
        for fs in FILESYSTEMS:
            dev = "/dev/" + roles[f"fsdax-{fs}"].blockdev
            have = self.sh(f"blkid -o value -s TYPE {dev} || true").stdout.strip()
            if have != fs:
                self.mkfs(fs, dev, force=True)
            self.sh(f"umount {MOUNT_ROOT}/fsdax-{fs} 2>/dev/null; true")
            results.append(self.mount(fs, dev, options=options))
        return results

    # -- pin mechanisms ----------------------------------------------------
    def setup_rdma(self) -> str:
        """Soft-RoCE on the guest NIC; returns the RDMA device name."""
        r = self.sh("modprobe rdma_rxe && (test -e /sys/class/infiniband/rxe0 || "
                    "rdma link add rxe0 type rxe netdev eth0) && rdma link show rxe0/1", check=False)
        if r.rc != 0:
            raise LabError("soft-RoCE (rdma_rxe) could not be set up on eth0: " + (r.stderr or r.stdout).strip())
        return "rxe0"

    def setup_vivid(self) -> None:
        r = self.sh("modprobe vivid && for i in $(seq 50); do ls /dev/video* >/dev/null 2>&1 && break; "
                    "sleep 0.1; done; ls /dev/video*", check=False)
        if r.rc != 0:
            raise LabError("the vivid V4L2 test driver could not be loaded: " + (r.stderr or r.stdout).strip())

    def memory_args(self, memory: str, mechanism: str, roles: dict[str, Namespace] | None = None) -> list[str]:
        choose(memory, MEMORY_KINDS, "memory kind")
        if memory == "anon":
            return ["--memory", "anon"]
        if memory == "pagecache":
            return ["--memory", "file", "--path", f"/root/pin-{mechanism}.dat"]
        if memory.startswith("fsdax-"):
            return ["--memory", "file", "--path", f"{MOUNT_ROOT}/{memory}/pin-{mechanism}.dat"]
        roles = roles or self.prepare_pmem()
        return ["--memory", "devdax", "--path", "/dev/" + roles["devdax"].chardev]

    def _probe_argv(self, mechanism: str, memory: str, mapping: str, size: int, hold: float,
                    roles: dict[str, Namespace] | None) -> list[str]:
        choose(mechanism, MECHANISMS, "pin mechanism")
        choose(memory, MEMORY_KINDS, "memory kind")
        choose(mapping, MAPPINGS, "mapping")
        check_size(size)
        check_seconds(hold, "hold time", 600)
        args = [mechanism, *self.memory_args(memory, mechanism, roles), "--mapping", mapping]
        if mechanism != "v4l2":
            args += ["--size", str(size)]
        if mechanism == "rdma":
            args += ["--hold", str(float(hold))]
        if mechanism == "odirect":
            args += ["--target", "/root/odirect-src.dat"]
        return args

    @staticmethod
    def _pin_result(mechanism: str, memory: str, mapping: str, data: dict | None, log: list[str],
                    trace: list[str], fallback: str = "") -> PinResult:
        if data is None or "error" in data:
            raise LabError(f"pin probe {mechanism}/{memory} failed: " + (data or {}).get("error", fallback))
        return PinResult(mechanism=mechanism, memory=memory, mapping=mapping, ok=bool(data.get("ok")),
                         errno=data.get("errno"), errname=data.get("errname"),
                         vmpin_kb_delta=data.get("vmpin_kb_delta"),
                         foll_pin_delta=data.get("foll_pin_acquired_delta"), kernel_log=log, trace=trace,
                         detail=data)

    def pin(self, mechanism: str, memory: str, mapping: str = "shared", size: int = 2 * 2**20,
            hold: float = 0.0, roles: dict[str, Namespace] | None = None) -> PinResult:
        """One attempt at a pin of ``memory`` through ``mechanism``, measured."""
        argv = self._probe_argv(mechanism, memory, mapping, size, hold, roles)
        return self._observed_probe(argv, mechanism, memory, mapping, timeout=120 + float(hold))

    def _observed_probe(self, argv: list[str], mechanism: str, memory: str, mapping: str,
                        timeout: float) -> PinResult:
        self._ensure_probe()
        r, _, log, trace = self.observe(" ".join(shlex.quote(a) for a in ["python3", PROBE_PATH, *argv]),
                                        timeout=timeout)
        return self._pin_result(mechanism, memory, mapping, _last_json(r.stdout), log, trace,
                                (r.stderr or r.stdout).strip()[-1000:])

    def pin_many(self, cases: list[tuple[str, str, str]], size: int = 2 * 2**20,
                 roles: dict[str, Namespace] | None = None) -> list[PinResult]:
        """Several (mechanism, memory, mapping) attempts in one guest process
        (each in its own forked child), each with its own log and trace."""
        argvs = [self._probe_argv(mech, mem, mp, size, 0.0, roles) for mech, mem, mp in cases]
        self._ensure_probe()
        self._ensure_kprobe()
        stdin = "".join(json.dumps(a) + "\n" for a in argvs)
        r = self.vm.run(["python3", PROBE_PATH, "batch"], stdin=stdin, timeout=60 + 60 * len(cases))
        rows = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
        if len(rows) != len(cases):
            raise LabError(f"pin probe batch returned {len(rows)} of {len(cases)} results: "
                           + (r.stderr or r.stdout).strip()[-1000:])
        return [self._pin_result(mech, mem, mp, row.get("result"), row.get("kernel_log", []),
                                 refusal_lines("\n".join(row.get("trace", []))))
                for (mech, mem, mp), row in zip(cases, rows)]

    def v4l2_stream(self, memory: str = "anon", frames: int = 3,
                    roles: dict[str, Namespace] | None = None) -> PinResult:
        """Queue USERPTR buffers in ``memory`` and let vivid write ``frames``
        frames into them: the device writing pinned user memory."""
        if not isinstance(frames, int) or isinstance(frames, bool) or not 1 <= frames <= 100:
            raise ConfigError(f"frame count {frames!r} is out of range", hint="use 1..100 frames")
        argv = self._probe_argv("v4l2", memory, "shared", 2 * 2**20, 0.0, roles) + ["--stream", str(frames)]
        return self._observed_probe(argv, "v4l2", memory, "shared", timeout=60 + 10 * frames)

    def reset_pmem(self) -> list[Namespace]:
        """Unmount the lab's DAX mounts and return every namespace to raw mode
        (erases the persistent memory's filesystems, as the learner asked)."""
        for fs in FILESYSTEMS:
            self.umount(f"{MOUNT_ROOT}/fsdax-{fs}")
        for ns in self.namespaces():
            if ns.mode != "raw":
                self.set_mode(ns.dev, "raw")
        return self.namespaces()

    def hold_pin(self, mechanism: str = "rdma", memory: str = "anon", mapping: str = "shared",
                 size: int = 2 * 2**20, roles: dict[str, Namespace] | None = None):
        """Register a buffer and keep it pinned until ``.release()`` (a HeldPin),
        so a learner can watch VmPin stay up."""
        from labkit.lab.observe import open_held_pin
        choose(mechanism, ("rdma",), "holdable pin mechanism")
        choose(memory, MEMORY_KINDS, "memory kind")
        choose(mapping, MAPPINGS, "mapping")
        check_size(size)
        self._ensure_probe()
        args = ["python3", PROBE_PATH, mechanism, *self.memory_args(memory, mechanism, roles),
                "--mapping", mapping, "--size", str(size), "--hold", "-1"]
        return open_held_pin(self.vm, " ".join(shlex.quote(a) for a in args))

    def vmpin_kb(self, pid: int) -> int | None:
        """VmPin (kB) of guest process ``pid`` from /proc/PID/status; None if
        the process is gone or the kernel does not report VmPin."""
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            raise ConfigError(f"invalid process id {pid!r}", hint="pass the holder's PID, e.g. held.pid")
        r = self.sh(f"grep '^VmPin:' /proc/{pid}/status || true")
        m = re.search(r"VmPin:\s+(\d+)\s*kB", r.stdout)
        return int(m.group(1)) if m else None

    def truncate_wait(self, fs: str = "xfs", hold: float = 3.0) -> TruncateWait:
        choose(fs, FILESYSTEMS, "filesystem")
        hold = check_seconds(hold, "hold time", 20)
        self._ensure_probe()
        args = ["python3", PROBE_PATH, "truncate-wait", "--path", f"{MOUNT_ROOT}/fsdax-{fs}/truncate.dat",
                "--hold", str(float(hold)), "--timeout", "30"]
        r = self.vm.run(args, timeout=90)
        data = _last_json(r.stdout)
        if data is None or "error" in data:
            raise LabError("truncate demonstration failed: "
                           + (data or {}).get("error", (r.stderr or r.stdout).strip()[-1000:]))
        return TruncateWait(fs=fs, blocked=bool(data.get("blocked")), seconds=data.get("seconds"),
                            where=list(data.get("where", [])), completed=bool(data.get("completed")),
                            detail=data)

    # -- the whole picture -------------------------------------------------
    def pins_matrix(self, pins: list[PinResult]) -> dict[str, Any]:
        """Pin results already measured, in ``matrix()``'s shape (for
        ``dashboard.matrix_table``), labelled with the live kernel release."""
        return {"kernel": self.sh("uname -r").stdout.strip(),
                "accel": self.vm.accel.accel if self.vm.accel else None, "mounts": [],
                "pins": [{k: v for k, v in asdict(p).items() if k != "detail"} for p in pins],
                "truncate_wait": None, "seconds": None}

    def matrix(self, progress=None, cases: list[tuple[str, str, str]] | None = None,
               truncate: bool = True) -> dict[str, Any]:
        """Every mount and every mechanism x memory kind, measured now.

        ``cases`` limits the pin attempts to some (mechanism, memory, mapping)
        triples (e.g. ``SHORT_CASES``, so a notebook can compare two kernels in
        seconds); ``truncate=False`` skips the truncate demonstration."""
        say = progress or (lambda s: None)
        if cases is None:
            cases = [(mech, mem, mapping) for mech in MECHANISMS for mem in MEMORY_KINDS for mapping in MAPPINGS
                     if mapping == "shared" or (mech == "rdma" and mem in ("anon", "fsdax-xfs", "fsdax-ext4"))]
        cases = check_cases(cases)     # all checked before the guest is touched
        t0 = time.monotonic()
        say("preparing persistent memory and DAX mounts")
        mounts = self.prepare_mounts()
        roles = self._roles or self.prepare_pmem()
        say("bringing up soft-RoCE and vivid")
        self.setup_rdma()
        self.setup_vivid()
        say(f"{len(cases)} pin attempts: {', '.join(MECHANISMS)} x {', '.join(MEMORY_KINDS)}")
        pins = self.pin_many(cases, roles=roles)
        tw = None
        if truncate:
            say("truncate while a DAX page is referenced")
            tw = self.truncate_wait("xfs", hold=1.0)    # one second of blocking makes the point
        uname = self.sh("uname -r").stdout.strip()
        return {
            "kernel": uname,
            "accel": self.vm.accel.accel if self.vm.accel else None,
            "mounts": [{"fs": m.fs, "dax_active": m.dax_active, "experimental_warning": m.experimental_warning,
                        "kernel_log": m.kernel_log, "ok": m.ok, "options": m.options, "error": m.error}
                       for m in mounts],
            "pins": [{k: v for k, v in asdict(p).items() if k != "detail"} for p in pins],
            "truncate_wait": None if tw is None else {"fs": tw.fs, "blocked": tw.blocked, "seconds": tw.seconds,
                                                      "where": tw.where, "completed": tw.completed},
            "seconds": round(time.monotonic() - t0, 1),
        }


def _last_json(text: str) -> dict | None:
    for line in reversed(text.strip().splitlines()):
        line = line.strip()
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None


def explain_mount(log: list[str]) -> str:
    """Turn the kernel's terse mount refusals into something a learner can act on."""
    text = "\n".join(log)
    if "unsupported blocksize for DAX" in text or "blocksize" in text and "DAX" in text:
        return ("\n  explanation: ext4 chose a block size other than the page size (mkfs.ext4 picks 1 KiB "
                "blocks on small devices); DAX needs 4 KiB blocks: mkfs.ext4 -b 4096")
    if "DAX unsupported by block device" in text:
        return ("\n  explanation: this block device cannot do DAX; on QEMU's NVDIMMs a 'raw' namespace has "
                "no DAX: convert it with ndctl create-namespace -m fsdax")
    return ""


def explain_ndctl(stderr: str) -> str:
    if "misaligned" in stderr:
        return stderr + ("\n  explanation: the label area left the namespace misaligned; run ndctl "
                         "disable-region, init-labels, enable-region first, or use label-less DIMMs")
    return stderr


def matrices_on_two_kernels(lab: Lab, other_kernel: str | None = None,
                            cases: list[tuple[str, str, str]] | None = None,
                            truncate: bool = False) -> tuple[dict[str, Any], dict[str, Any], Any]:
    """``lab``'s matrix and the same cases measured on a VM of another kernel
    (``<name>-other``, started or attached), at the same time: the other VM
    starts, prepares its persistent memory and measures in a thread while
    ``lab`` measures. Returns ``(here, there, other_vm)``; the caller stops
    ``other_vm`` when done. ``cases`` defaults to ``SHORT_CASES``."""
    from concurrent.futures import ThreadPoolExecutor

    from labkit.image import build as image
    from labkit.machine.vm import connect

    cases = list(SHORT_CASES if cases is None else cases)
    kernel = lab.vm.describe()["kernel"]
    if other_kernel is None:
        other_kernel = next(k for k in image.KERNELS if k != kernel)
    image.check_kernel(other_kernel)
    if other_kernel == kernel:
        raise ConfigError(f"the other kernel must differ from this VM's ({kernel})",
                          hint="choose one of: " + ", ".join(k for k in image.KERNELS if k != kernel))
    check_cases(cases)                          # before anything starts
    box: dict[str, Any] = {}

    def measure_there() -> dict[str, Any]:
        box["vm"] = connect(name=f"{lab.vm.name}-other", kernel=other_kernel)
        return Lab(box["vm"]).matrix(cases=cases, truncate=truncate)

    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="labkit-other-kernel")
    try:
        there_f = pool.submit(measure_there)
        here = lab.matrix(cases=cases, truncate=truncate)
        there = there_f.result(timeout=600)
    finally:
        pool.shutdown(wait=False)
    return here, there, box["vm"]


def compare_matrices(a: dict[str, Any], b: dict[str, Any]) -> str:
    """Two ``matrix()`` results as text, side by side: the mount warnings and
    each pin's answer and FOLL_PIN count, marking the rows that differ."""
    def cell(p: dict) -> str:
        res = "ok" if p["ok"] else f"{p['errname']} ({p['errno']})"
        fp = p.get("foll_pin_delta")
        return f"{res} foll_pin {'-' if fp is None else f'{fp:+d}'}"

    def key(p: dict) -> tuple:
        return p["ok"], p["errno"], bool(p.get("foll_pin_delta"))
    lines = []
    for m in (a, b):
        warned = [mt["fs"] for mt in m.get("mounts", []) if mt.get("experimental_warning")]
        lines.append(f"{m['kernel']}: EXPERIMENTAL warning from {', '.join(warned) or 'no filesystem'}")
    lines.append(f"{'mechanism':9s} {'memory':10s} {a['kernel']:28s} | {b['kernel']}")
    theirs = {(p["mechanism"], p["memory"], p["mapping"]): p for p in b["pins"]}
    for p in a["pins"]:
        q = theirs.get((p["mechanism"], p["memory"], p["mapping"]))
        other = cell(q) if q else "not measured"
        mark = "   <- differs" if q and key(p) != key(q) else ""
        lines.append(f"{p['mechanism']:9s} {p['memory']:10s} {cell(p):28s} | {other}{mark}")
    return "\n".join(lines)
