"""Exercise 3.8 without a guest: the real guest-side judge
(labkit.lab.guest.pinprobe.learner_buffer.judge) runs the learner's code in a
child process on the host, over an ordinary temporary file, and only the
registration is faked, answering like the 6.1 guest measured it (see
tests/test_buffer_exercise.py's live test): a shared mapping of the file is
refused, a private mapping is registered only when every page is an anonymous
copy (written), anonymous memory is registered. Also the answers the tests use."""

from __future__ import annotations

import os
import random
import string
import subprocess
import sys
import tempfile
from dataclasses import dataclass

FAKE_RUNNER = r"""
import json, os, sys
from labkit.lab.guest.pinprobe.learner_buffer import Kernel, judge

def vma(addr):
    cur = None
    with open("/proc/self/smaps") as f:
        for line in f:
            head = line.split()
            if "-" in head[0] and len(head) >= 5:
                lo, hi = (int(x, 16) for x in head[0].split("-"))
                cur = {"in": lo <= addr < hi, "perms": head[1], "file": len(head) > 5 and head[4] != "0",
                       "size": hi - lo}
            elif head[0] == "Anonymous:" and cur and cur["in"]:
                cur["anon"] = int(head[1]) * 1024
                return cur
    return cur

MARK = sys.argv[1] + ".mr"

def register(addr, size):
    # in the learner's process (as the guest's ibv_reg_mr is): the kernel's answer; an accepted region is
    # left where the fake kernel below lists it, as `rdma resource` lists the region of a pid
    v = vma(addr)
    if v["file"] and (v["perms"][3] == "s" or v.get("anon", 0) < size):
        return {"errno": 95, "errname": "EOPNOTSUPP", "message": "refused"}, None
    with open(MARK, "w") as f:
        json.dump({"pid": os.getpid(), "mrlen": size}, f)
    return {"errno": None, "errname": None, "message": "registered"}, None

class NoWatch:
    ok, error = False, "not on the host"
    def close(self):
        pass

class FakeKernel(Kernel):
    def watch_umem(self):
        return NoWatch()     # the host's tracefs is not the judge's to probe
    def _mr(self):
        try:
            with open(MARK) as f:
                return json.load(f)
        except OSError:
            return None
    def mrs(self, pid):
        mr = self._mr()
        return [mr] if mr and mr["pid"] == pid else []
    def vmpin_kb(self, pid):
        mr = self._mr()
        return mr["mrlen"] // 1024 if mr and mr["pid"] == pid else 0
    def foll_pins(self):
        return {"nr_foll_pin_acquired": None, "nr_foll_pin_released": None}

path, size, timeout = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
try:
    print(json.dumps(judge(sys.stdin.read(), path, size, timeout, register, FakeKernel())))
finally:
    if os.path.exists(MARK):
        os.unlink(MARK)
"""

SIZE = 2 * 2**20


class FakeHelperHost:
    """The lab surface the code exercises reach the guest through (``lab.vm``,
    ``lab.helper.argv``, ``memory_args``, the setup calls of ``Live.ready``),
    for the fake labs of the tests. ``run`` records what was sent and hands the
    learner's code (stdin) to ``guest``, which a subclass provides."""

    def __init__(self) -> None:
        self.sent: list[tuple[list[str], str | None]] = []

    @property
    def vm(self):
        return self

    @property
    def helper(self):
        return self

    def argv(self, *args):
        return ["python3", "/run/labkit/pinprobe.pyz", *args]

    def memory_args(self, memory, mechanism):
        return ["--memory", "file", "--path", f"/mnt/fsdax-xfs/pin-{mechanism}.dat", "--dax-fs", "xfs"]

    def run(self, argv, timeout=60, check=False, stdin=None):
        self.sent.append((list(argv), stdin))
        return self.guest(stdin)

    def guest(self, stdin):
        raise NotImplementedError

    def prepare_mounts(self):
        return []

    def setup_rdma(self):
        return "rxe0"

    def setup_vivid(self):
        return None


@dataclass
class _Out:
    stdout: str
    rc: int = 0
    stderr: str = ""


def run_on_host(runner: str, stdin: str, size: int, timeout: float) -> _Out:
    """Run a judge ``runner`` (Python source; argv: path, size, timeout) in a
    child process on the host over a fresh temporary file of ``size`` bytes."""
    # letters only: a learner's error message may show the path, and the test that feedback gives no
    # value away looks for numbers such as 95 and 113 in it (mkstemp's random part has digits)
    letters = "".join(random.choices(string.ascii_lowercase, k=12))
    path = os.path.join(tempfile.gettempdir(), f"labkit-judge-{letters}")
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.pwrite(fd, b"\x5a" * size, 0)
        os.close(fd)
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        p = subprocess.run([sys.executable, "-c", runner, path, str(size), str(timeout)], input=stdin,
                           capture_output=True, text=True, timeout=2 * timeout + 30, env=env)
        return _Out(p.stdout, p.returncode, p.stderr)
    finally:
        os.unlink(path)


def run_fake_guest(stdin: str, timeout: float = 2.0) -> _Out:
    """What ``pinprobe learner-buffer`` would answer, judged on the host."""
    return run_on_host(FAKE_RUNNER, stdin, SIZE, timeout)


PRIVATE_WRITTEN = '''
import mmap, os

def buffer(path, size):
    fd = os.open(path, os.O_RDWR)
    m = mmap.mmap(fd, size, flags=mmap.MAP_PRIVATE)
    os.close(fd)
    for off in range(0, size, mmap.PAGESIZE):
        m[off] = 1
    return m
'''
ACCESS_COPY_FILLED = '''
import mmap
def buffer(path, size):
    with open(path, "r+b") as f:
        m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    m[:] = bytes(size)
    print("done")          # a learner's print goes to stderr, not into the answer
    return m
'''
SHARED_WRITTEN = '''
import mmap
def buffer(path, size):
    with open(path, "r+b") as f:
        m = mmap.mmap(f.fileno(), size)
    m[:] = bytes(size)
    return m
'''
PRIVATE_UNTOUCHED = '''
import mmap
def buffer(path, size):
    with open(path, "r+b") as f:
        return mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
'''
PRIVATE_READ = PRIVATE_WRITTEN.replace("m[off] = 1", "m[off]")
PRIVATE_HALF = PRIVATE_WRITTEN.replace("range(0, size,", "range(0, size // 2,")
ANON = '''
import mmap
def buffer(path, size):
    m = mmap.mmap(-1, size)
    m[:] = bytes(size)
    return m
'''
FORGED = '''
import mmap
def buffer(path, size):
    print('{"ok": true, "problem": null, "backed_by_file": true, "vmpin_kb_delta": 2048}')
    return mmap.mmap(-1, size)
'''
READ_ONLY = '''
import mmap
def buffer(path, size):
    with open(path, "rb") as f:
        return mmap.mmap(f.fileno(), size, access=mmap.ACCESS_READ)
'''
RAISES = '''
def buffer(path, size):
    return open(path + ".missing")
'''
RETURNS_BYTES = '''
def buffer(path, size):
    with open(path, "rb") as f:
        return f.read(size)
'''
TOO_SMALL = '''
import mmap
def buffer(path, size):
    with open(path, "r+b") as f:
        m = mmap.mmap(f.fileno(), 4096, access=mmap.ACCESS_COPY)
    m[0] = 1
    return m
'''
EXITS = '''
import os
def buffer(path, size):
    os._exit(0)
'''
LOOPS = '''
def buffer(path, size):
    while True:
        pass
'''
NO_FUNCTION = "buffer = 3\n"
SYNTAX_ERROR = "def buffer(path, size)\n    return None\n"

RIGHT = [PRIVATE_WRITTEN, ACCESS_COPY_FILLED]
WRONG = ["", 42, None, NO_FUNCTION, SYNTAX_ERROR, SHARED_WRITTEN, PRIVATE_UNTOUCHED, PRIVATE_READ, PRIVATE_HALF,
         ANON, FORGED, READ_ONLY, RAISES, RETURNS_BYTES, TOO_SMALL, EXITS, LOOPS]
