"""Exercise 6.5 without a guest: the real guest-side judge
(labkit.lab.guest.pinprobe.learner_hold.judge) runs the learner's code in a
child process on the host, over an ordinary temporary file, with the real
vmsplice. Only the kernel's two answers that need DAX are modelled, as the
live 6.1 guest measured them (tests/test_truncate_exercise.py's live test):
the truncate waits exactly while a pipe the learner spliced the mapping into
still holds data (the pipe's page references), and an RDMA registration of the
shared fs-dax mapping is refused with EOPNOTSUPP. Also the answers the tests use."""

from __future__ import annotations

from buffer_fake import _Out, run_on_host

FAKE_RUNNER = r"""
import errno, fcntl, json, os, struct, sys, termios
from labkit.lab.guest.pinprobe import learner_hold as lh

PIPES = sys.argv[1] + ".pipes"
real_vmsplice = lh.vmsplice

def vmsplice(fd, buf, length):
    # in the learner's process: the real vmsplice; the fake kernel below is told which pipe holds pages
    n = real_vmsplice(fd, buf, length)
    with open(PIPES, "a") as f:
        f.write(f"{os.getpid()} {fd}\n")
    return n

def referenced():
    # a pipe of the learner's process still holding spliced pages: its descriptor open and bytes unread,
    # seen from outside through /proc/<pid>/fd (as the kernel's page references are, by the truncate)
    try:
        with open(PIPES) as f:
            held = [line.split() for line in f]
    except OSError:
        return False
    for pid, fd in held:
        try:
            h = os.open(f"/proc/{pid}/fd/{fd}", os.O_RDONLY | os.O_NONBLOCK)
        except OSError:
            continue
        try:
            if struct.unpack("i", fcntl.ioctl(h, termios.FIONREAD, b"\0\0\0\0"))[0] > 0:
                return True
        except OSError:
            pass
        finally:
            os.close(h)
    return False

def register_mr(buf, length):
    raise OSError(errno.EOPNOTSUPP, "ibv_reg_mr: " + os.strerror(errno.EOPNOTSUPP))

class Truncate:
    # the fs-dax truncate as the live 6.1 guest showed it: asleep in the break-layouts wait while referenced
    def __init__(self, path):
        self.returncode = None
        self.stacks = [["xfs_break_dax_layouts", "xfs_break_layouts", "xfs_vn_setattr"]]
        self.states = ["S"]
        self.traced = False
    def poll(self):
        if self.returncode is None and not referenced():
            self.returncode = 0
        return self.returncode
    def sample(self):
        pass
    def error(self):
        return ""
    def stop(self):
        if self.returncode is None:
            self.returncode = -9

lh.TOOLS.update(vmsplice=vmsplice, register_mr=register_mr)
path, size = sys.argv[1], int(sys.argv[2])
try:
    print(json.dumps(lh.judge(sys.stdin.read(), path, size, float(sys.argv[3]), hold_s=0.3, after_s=1.0,
                              truncate=Truncate)))
finally:
    if os.path.exists(PIPES):
        os.unlink(PIPES)
"""

SIZE = 64 * 1024


def run_fake_guest(stdin: str, timeout: float = 2.0) -> _Out:
    """What ``pinprobe learner-hold`` would answer on a 6.1 guest, judged on the host."""
    return run_on_host(FAKE_RUNNER, stdin, SIZE, timeout)


CLOSES = '''
import os
def hold(m):
    r, w = os.pipe()
    vmsplice(w, m, 4096)
    def release():
        os.close(r)
        os.close(w)
    return release
'''
DRAINS = '''
import os
def hold(m):
    r, w = os.pipe()
    vmsplice(w, m, 8192)
    return lambda: os.read(r, 65536)     # reading the pipe empty drops its references too
'''
NOTHING = "def hold(m):\n    return lambda: None\n"
COPY = '''
import os
def hold(m):
    r, w = os.pipe()
    os.write(w, m[:4096])          # a copy of the data: the pipe holds its own page, not the file's
    return lambda: (os.close(r), os.close(w))
'''
NEVER = '''
import os
KEEP = []
def hold(m):
    r, w = os.pipe()
    vmsplice(w, m, 4096)
    KEEP.append((r, w))
    return lambda: None            # "releases" nothing
'''
LONGTERM = '''
def hold(m):
    mr = register_mr(m, 4096)
    return mr.close
'''
HALF = '''
import os
def hold(m):
    r, w = os.pipe()
    vmsplice(w, m, 8192)
    return lambda: os.read(r, 4096)     # drains one page of two: the other is still referenced
'''
NOT_CALLABLE = "def hold(m):\n    return 3\n"
RAISES = "def hold(m):\n    x = 1\n    return open('/nonexistent/file')\n"
RELEASE_RAISES = '''
import os
def hold(m):
    r, w = os.pipe()
    vmsplice(w, m, 4096)
    def release():
        raise ValueError("oops")
    return release
'''
LOOPS = "def hold(m):\n    while True:\n        pass\n"
RIGHT = [CLOSES, DRAINS]
WRONG = ["", 42, None, "def held(m):\n    pass\n", "def hold(m)\n", NOTHING, COPY, NEVER, LONGTERM, HALF,
         NOT_CALLABLE, RAISES, RELEASE_RAISES, LOOPS]
