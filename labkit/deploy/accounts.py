"""A class's learners on one shared host: their accounts, their private homes,
and the nbgrader exchange they hand work in through.

No learner may read another's work. A distribution's ``useradd`` makes homes
with whatever ``HOME_MODE``/``UMASK`` its ``/etc/login.defs`` says (0755 on
Debian before 12, Ubuntu before 21.04 and many images), so every home is set
to 0700 here after ``useradd``, and again for learners who already exist.

The exchange follows nbgrader's own layout (``nbgrader.exchange.default``):
the root is writable by all, a course directory and its ``outbound`` belong
to the instructor (0755: learners fetch, only the instructor releases), and
``inbound`` takes everyone's submissions. Two bits more than nbgrader sets:
the sticky bit on the root and on ``inbound``, so that nobody but a file's
owner (and the instructor, who owns the directory) can delete or replace it
— a learner cannot swap another's submission or course directory.

The API is what an installer calls: ``read_roster`` (a CSV) → ``enrol`` →
``list[Learner]``; ``prepare_exchange(root)`` → ``Exchange``. Both are
idempotent and need root.
"""

from __future__ import annotations

import csv
import grp
import logging
import os
import pwd
import re
import secrets
import stat
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from labkit.errors import LabError

log = logging.getLogger(__name__)

HOME_MODE = 0o700
EXCHANGE_ROOT = Path("/srv/nbgrader/exchange")     # nbgrader's default Exchange.root
COURSE = "labkit"                                  # instructor/nbgrader_config.py's course_id
ROOT_MODE = 0o1777          # nbgrader makes it 0777; sticky: nobody removes another's course directory
COURSE_MODE = 0o755         # the instructor's (nbgrader refuses a course dir the instructor does not own)
OUTBOUND_MODE = 0o755       # releases: the instructor writes, learners read
INBOUND_MODE = 0o3733       # submissions: nbgrader's 2733 (write, no listing, the instructor's group) + sticky
FIRST_LEARNER_UID = 1000    # below it: system accounts, never enrolled
# POSIX portable user names as useradd accepts them by default (NAME_REGEX of adduser.conf)
USERNAME_RE = re.compile(r"[a-z_][a-z0-9_-]{0,31}")


class AccountError(LabError):
    """A roster or an account that cannot be used as asked."""

    def __init__(self, problem: str, hint: str = "") -> None:
        super().__init__(problem)
        self.hint = hint


@dataclass(frozen=True)
class Row:
    """One learner of the roster: ``line`` is where it was (for errors)."""

    username: str
    full_name: str = ""
    line: int = 0


@dataclass(frozen=True)
class Learner:
    """An enrolled learner: ``created`` if this call made the account,
    ``home_fixed`` if their home's mode was changed to 0700."""

    username: str
    uid: int
    home: Path
    created: bool
    home_fixed: bool


@dataclass(frozen=True)
class Exchange:
    """The prepared nbgrader exchange of one course."""

    root: Path
    course: str
    owner: str

    @property
    def inbound(self) -> Path:
        return self.root / self.course / "inbound"

    @property
    def outbound(self) -> Path:
        return self.root / self.course / "outbound"


# -- the roster ------------------------------------------------------------------------

def read_roster(path: Path) -> list[Row]:
    """The rows of a CSV of ``username[,full name]`` (an optional header
    ``username,...``, blank lines and ``#`` comments are skipped); an
    AccountError naming the line of the first bad row."""
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise AccountError(f"cannot read the roster {path}: {exc}",
                           hint="give a UTF-8 CSV file with one learner per line: username[,full name]") from exc
    return parse_roster(text.splitlines(), str(path))


def parse_roster(lines: Iterable[str], source: str = "roster") -> list[Row]:
    rows: list[Row] = []
    seen: dict[str, int] = {}
    for number, cells in enumerate(csv.reader(lines), start=1):
        cells = [c.strip() for c in cells]
        if not any(cells) or cells[0].startswith("#"):
            continue
        if number == 1 and cells[0].lower() in ("username", "user", "login"):
            continue
        row = _row(cells, number, source)
        if row.username in seen:
            raise AccountError(f"{source}, line {number}: {row.username!r} is already on line {seen[row.username]}",
                               hint="list each learner once")
        seen[row.username] = number
        rows.append(row)
    return rows


def _row(cells: Sequence[str], number: int, source: str) -> Row:
    where = f"{source}, line {number}"
    if len(cells) > 2:
        raise AccountError(f"{where}: {len(cells)} columns; expected username[,full name]",
                           hint='quote a full name that contains a comma: alice,"Smith, Alice"')
    name = cells[0]
    if not USERNAME_RE.fullmatch(name):
        raise AccountError(f"{where}: {name!r} is not a valid user name",
                           hint="lower-case letters, digits, '_' and '-', starting with a letter or '_', "
                                "at most 32 characters")
    full = cells[1] if len(cells) > 1 else ""
    if any(c in full for c in ":\n\r") or not full.isprintable():
        raise AccountError(f"{where}: the full name {full!r} contains ':' or a control character",
                           hint="the full name goes into /etc/passwd, where ':' separates the fields")
    return Row(name, full, number)


# -- accounts ----------------------------------------------------------------------------

def _require_root(what: str) -> None:
    if os.geteuid() != 0:
        raise AccountError(f"{what} needs root (it creates accounts and sets their homes' owners and modes)",
                           hint="run it as root, e.g. with sudo")


def enrol(rows: Iterable[Row], group: str | None = None) -> list[Learner]:
    """Create each learner that does not exist yet (``useradd``, with a
    group of their own unless ``group`` is given) and make every learner's
    home theirs alone (0700), whatever the distribution's defaults. Running
    it again changes nothing but homes that were opened since."""
    _require_root("labkit class enrol")
    if group is not None:
        try:
            grp.getgrnam(group)
        except KeyError:
            raise AccountError(f"no group {group!r} on this host", hint=f"groupadd {group}, or leave --group out") \
                from None
    learners = [_enrol_one(row, group) for row in rows]
    for learner in learners:
        kvm_access(learner.username)
    return learners




def kvm_access(username: str, dev: Path = Path("/dev/kvm")) -> bool:
    """Put ``username`` in the group that may open ``dev`` (where the host has KVM), so their
    guests boot with KVM, as the instructor's warm-up guest did: a warm-start snapshot is only
    restored with the accelerator it was made with. True if they are in it now."""
    try:
        group = grp.getgrgid(os.stat(dev).st_gid)
    except (OSError, KeyError):
        return False            # no KVM on this host: everyone's guests use TCG, the snapshot's too
    if group.gr_gid == 0:
        return False
    if username in group.gr_mem or pwd.getpwnam(username).pw_gid == group.gr_gid:
        return True
    r = subprocess.run(["usermod", "--append", "--groups", group.gr_name, "--", username], capture_output=True,
                       text=True, timeout=60)
    if r.returncode != 0:
        raise AccountError(f"usermod --append --groups {group.gr_name} {username} failed: "
                           f"{(r.stderr or r.stdout).strip()}",
                           hint=f"add them by hand (gpasswd -a {username} {group.gr_name}), or their guests "
                                "boot with TCG and cold")
    log.info("%s may use %s (group %s)", username, dev, group.gr_name)
    return True


def _enrol_one(row: Row, group: str | None) -> Learner:
    pw = _existing(row.username)
    created = pw is None
    if pw is None:
        pw = _useradd(row, group)
    if pw.pw_uid < FIRST_LEARNER_UID:
        raise AccountError(f"line {row.line}: {row.username!r} is a system account (uid {pw.pw_uid}), not a learner",
                           hint="remove it from the roster")
    home = Path(pw.pw_dir)
    fixed = private_home(home, pw.pw_uid, pw.pw_gid, row.line)
    return Learner(row.username, pw.pw_uid, home, created, fixed)


def _existing(name: str) -> pwd.struct_passwd | None:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        return None


def _useradd(row: Row, group: str | None) -> pwd.struct_passwd:
    argv = ["useradd", "--create-home", "--shell", "/bin/bash"]
    argv += ["--gid", group] if group else ["--user-group"]
    if row.full_name:
        argv += ["--comment", row.full_name]
    r = subprocess.run([*argv, "--", row.username], capture_output=True, text=True, timeout=60)
    if r.returncode != 0:
        raise AccountError(f"line {row.line}: useradd {row.username} failed: {(r.stderr or r.stdout).strip()}")
    pw = pwd.getpwnam(row.username)
    log.info("created learner %s (uid %d)", row.username, pw.pw_uid)
    return pw


def private_home(home: Path, uid: int, gid: int, line: int = 0) -> bool:
    """Make ``home`` (a learner's, owned by ``uid``) mode 0700; True if it was
    not. A home that is missing is made; one owned by someone else is refused
    (it is not theirs to be given)."""
    where = f"line {line}: " if line else ""
    try:
        st = os.lstat(home)
    except FileNotFoundError:
        home.mkdir(mode=HOME_MODE, parents=True)
        os.chown(home, uid, gid)
        st = os.lstat(home)
    if not stat.S_ISDIR(st.st_mode):
        raise AccountError(f"{where}{home} is not a directory", hint="move it away; enrol makes the home again")
    if st.st_uid != uid:
        raise AccountError(f"{where}{home} belongs to uid {st.st_uid}, not to its learner (uid {uid})",
                           hint=f"check who should own it, then chown {uid} {home}")
    if stat.S_IMODE(st.st_mode) == HOME_MODE:
        return False
    os.chmod(home, HOME_MODE)
    log.info("%s: mode %o -> 0700", home, stat.S_IMODE(st.st_mode))
    return True


# -- passwords -------------------------------------------------------------------------------

PASSWORD_BYTES = 9          # 12 characters of token_urlsafe: 72 bits, short enough to type from a slip


def without_password(username: str) -> bool:
    """True if ``username`` cannot log in with a password yet (``passwd --status``: locked
    or none). A password the learner set stays theirs."""
    r = subprocess.run(["passwd", "--status", "--", username], capture_output=True, text=True, timeout=30)
    if r.returncode != 0:
        raise AccountError(f"passwd --status {username} failed: {(r.stderr or r.stdout).strip()}")
    fields = r.stdout.split()
    return len(fields) < 2 or fields[1] != "P"


def check_password_file(path: Path) -> None:
    """Refuse, before any account is made, a passwords file that exists (it holds passwords
    already handed out) or that cannot be made."""
    if path.exists() or path.is_symlink():
        raise AccountError(f"{path} exists: it may hold passwords already handed out",
                           hint="give a new file name; learners who have a password keep it")
    if not path.parent.is_dir():
        raise AccountError(f"{path.parent} is not a directory", hint="give a file in an existing directory")


def give_passwords(learners: Iterable[Learner], out: Path) -> dict[str, str]:
    """A new random password for each learner who has none (never for one who has), written
    as ``username,password`` lines to ``out`` (mode 0600, made here, never overwritten) and
    then set with chpasswd, which reads them on stdin (never on a command line)."""
    _require_root("labkit class enrol --passwords")
    check_password_file(out)
    given = {x.username: secrets.token_urlsafe(PASSWORD_BYTES) for x in learners if without_password(x.username)}
    lines = "".join(f"{name},{password}\n" for name, password in given.items())
    fd = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write("username,password\n" + lines)
    if given:
        r = subprocess.run(["chpasswd"], input=lines.replace(",", ":"), capture_output=True, text=True, timeout=120)
        if r.returncode != 0:
            raise AccountError(f"chpasswd failed: {(r.stderr or r.stdout).strip()}",
                               hint=f"{out} lists the passwords that were to be set; run enrol again with "
                                    "another --passwords file")
    return given


# -- the exchange ----------------------------------------------------------------------------

def prepare_exchange(root: Path = EXCHANGE_ROOT, course: str = COURSE, instructor: str | None = None) -> Exchange:
    """Make (or repair) the nbgrader exchange at ``root`` for ``course``,
    its course directory, ``outbound`` and ``inbound`` owned by
    ``instructor`` (this process's user if None). Idempotent."""
    owner = pwd.getpwuid(os.geteuid()) if instructor is None else _user(instructor)
    if owner.pw_uid != os.geteuid():
        _require_root("labkit class exchange --instructor")
    if not re.fullmatch(r"[A-Za-z0-9_.-]+", course) or course in (".", ".."):
        raise AccountError(f"{course!r} is not a course id nbgrader can use as a directory name")
    root = root.absolute()
    _dir(root, ROOT_MODE, None)
    _dir(root / course, COURSE_MODE, owner)
    _dir(root / course / "outbound", OUTBOUND_MODE, owner)
    _dir(root / course / "inbound", INBOUND_MODE, owner)
    return Exchange(root, course, owner.pw_name)


def _user(name: str) -> pwd.struct_passwd:
    try:
        return pwd.getpwnam(name)
    except KeyError:
        raise AccountError(f"no user {name!r} on this host", hint="give the instructor's account name") from None


def _dir(path: Path, mode: int, owner: pwd.struct_passwd | None) -> None:
    """``path`` a real directory (not a symlink someone planted) with ``mode``,
    owned by ``owner`` when given (root's otherwise, when made by root)."""
    try:
        path.mkdir()
    except FileExistsError:
        pass
    except OSError as exc:
        raise AccountError(f"cannot make {path}: {exc}", hint="run it as root, or choose a directory you own") \
            from exc
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise AccountError(f"{path} is not a directory (a symlink or a file)",
                           hint="remove it; labkit class exchange makes it again")
    if owner is not None and (st.st_uid, st.st_gid) != (owner.pw_uid, owner.pw_gid):
        if os.geteuid() != 0 and st.st_uid != owner.pw_uid:
            raise AccountError(f"{path} belongs to uid {st.st_uid}", hint="run labkit class exchange as root")
        os.chown(path, owner.pw_uid, owner.pw_gid, follow_symlinks=False)
    elif owner is None and st.st_uid not in (0, os.geteuid()):
        raise AccountError(f"{path} belongs to uid {st.st_uid}, who could change what every learner hands in",
                           hint="remove it and run labkit class exchange again (as root)")
    if stat.S_IMODE(st.st_mode) != mode:
        os.chmod(path, mode)    # after chown: chown clears the setgid bit
