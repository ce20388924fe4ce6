"""``labkit class ...``: a class's learners on one shared host (accounts with
private homes, the nbgrader exchange). The decisions are in
:mod:`labkit.deploy.accounts`; this only turns arguments into its calls."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from labkit.deploy import accounts
from labkit.settings import Settings

CLASS_DESCRIPTION = """\
Set up a class on one shared host, as root: `enrol` creates the learners of a
roster and makes every learner's home private (0700), `exchange` makes the
nbgrader exchange with the modes nbgrader expects, plus the sticky bit so that
nobody can replace another's files. Both can be run again at any time: they
create what is missing and repair modes, and change nothing else."""

ENROL_DESCRIPTION = """\
CLASS.csv has one learner per line: username[,full name] (an optional header
line `username,full name`; blank lines and lines starting with # are skipped).
A learner that does not exist is created with useradd (a group of their own
unless --group is given); every learner's home is set to mode 0700 whatever
the distribution's HOME_MODE/UMASK, existing learners' included. A bad line
stops the run before any account is made, with its line number. With
--passwords FILE, each learner who cannot log in with a password yet gets a
random one, listed in FILE (made 0600; an existing FILE is refused, so no
handed-out password is lost); a password a learner has set stays theirs."""

EXCHANGE_DESCRIPTION = f"""\
Make the nbgrader exchange at DIR (default {accounts.EXCHANGE_ROOT}, nbgrader's
Exchange.root): DIR mode 1777, DIR/COURSE and its outbound 0755 owned by the
instructor (nbgrader refuses a course directory the instructor does not own;
only the instructor releases), inbound 3733 (learners hand in but cannot list,
delete or replace anyone's submission)."""


def cmd_class_enrol(args: argparse.Namespace, settings: Settings) -> int:
    rows = accounts.read_roster(args.roster)        # every line checked before any account is made
    if args.passwords is not None:
        accounts.check_password_file(args.passwords)
    learners = accounts.enrol(rows, group=args.group)
    for learner in learners:
        what = "created" if learner.created else "exists"
        fixed = f", home {learner.home} made private (0700)" if learner.home_fixed else ""
        print(f"{learner.username}: {what} (uid {learner.uid}){fixed}")
    made = sum(1 for x in learners if x.created)
    print(f"{len(learners)} learners: {made} created, {len(learners) - made} already there; every home 0700")
    if args.passwords is not None:
        given = accounts.give_passwords(learners, args.passwords)
        print(f"{len(given)} learners without a password got one: {args.passwords} (0600; hand them out, then "
              f"delete it); {len(learners) - len(given)} kept theirs")
    return 0


def cmd_class_exchange(args: argparse.Namespace, settings: Settings) -> int:
    ex = accounts.prepare_exchange(args.dir, course=args.course, instructor=args.instructor)
    print(f"exchange {ex.root} (1777), course {ex.course} owned by {ex.owner}: "
          f"outbound {ex.outbound} (0755), inbound {ex.inbound} (3733)")
    print(f"nbgrader_config.py: c.Exchange.root = {str(ex.root)!r}; c.CourseDirectory.course_id = {ex.course!r}")
    return 0


STATUS_DESCRIPTION = """\
Each learner of the hub: their server (running, starting, stopping, stopped),
their lab VMs (kernel, state, warm or cold start), the memory and CPU of
everything running as them on this host, when they were last active, and the
last error labkit recorded for them (a warm start that fell back, a refused
snapshot, a QEMU that died). Run it as root on the hub's host. The hub's
address and the instructor's token come from the installer's /etc/labkit/hub.env
unless given."""

def _hub_env() -> Any:
    from labkit.deploy import install
    return install.HubEnv.read(install.Plan().etc / "hub.env")


def cmd_class_status(args: argparse.Namespace, settings: Settings) -> int:
    import json

    from labkit.deploy import status
    env = _hub_env()
    url = args.hub
    if url is None:
        url = f"{'https' if env.ssl_cert else 'http'}://127.0.0.1:{env.port}"
    if args.token_file:
        try:
            token = args.token_file.read_text().strip()
        except OSError as exc:
            raise status.StatusError(f"cannot read the token file {args.token_file}: {exc.strerror}",
                                     hint="give a file holding the instructor's API token") from None
    else:
        token = env.admin_token
    if not token:
        raise status.StatusError("no instructor's token: /etc/labkit/hub.env has none and --token-file was not given",
                                 hint="run it as root on the hub's host, or give --token-file")
    rows = status.collect(status.hub_users(url, token, cafile=env.ssl_cert or None))
    print(json.dumps(status.as_json(rows), indent=1) if args.json else status.render(rows))
    return 0


def add_class(sub: Any) -> None:
    cl = sub.add_parser("class", help="a class on one shared host: enrol learners (private homes), "
                                      "the nbgrader exchange", description=CLASS_DESCRIPTION,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    cs = cl.add_subparsers(dest="sub", required=True, metavar="ACTION")
    en = cs.add_parser("enrol", help="create the learners of CLASS.csv; make every home private (0700)",
                       description=ENROL_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    en.add_argument("roster", type=Path, metavar="CLASS.csv", help="username[,full name] per line")
    en.add_argument("--group", default=None, help="put new learners in this existing group "
                                                  "(default: a group of their own)")
    en.add_argument("--passwords", type=Path, default=None, metavar="FILE",
                    help="give each learner who has no password a random one, listed in FILE (username,password; "
                         "made 0600, never overwritten)")
    en.set_defaults(func=cmd_class_enrol)
    ex = cs.add_parser("exchange", help="make the nbgrader exchange (1777, sticky inbound)",
                       description=EXCHANGE_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    ex.add_argument("dir", type=Path, nargs="?", default=accounts.EXCHANGE_ROOT, metavar="DIR",
                    help="the exchange root (default %(default)s)")
    ex.add_argument("--course", default=accounts.COURSE, help="nbgrader course id (default %(default)s)")
    ex.add_argument("--instructor", default=None, metavar="USER",
                    help="who owns the course directory (default: the user running this)")
    ex.set_defaults(func=cmd_class_exchange)
    st = cs.add_parser("status", help="each learner: server, VMs, memory, CPU, last activity, last error",
                       description=STATUS_DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    st.add_argument("--hub", default=None, metavar="URL",
                    help="the hub's address (default: from /etc/labkit/hub.env, else http://127.0.0.1:8000)")
    st.add_argument("--token-file", type=Path, default=None, metavar="FILE",
                    help="a file holding the instructor's API token (default: the one in /etc/labkit/hub.env)")
    st.add_argument("--json", action="store_true", help="one JSON object per learner")
    st.set_defaults(func=cmd_class_status)
    from labkit.deploy import install
    ins = cs.add_parser("install", help="set up this systemd host as the class's server (run once, and again "
                                        "at any time)", description=install.DESCRIPTION,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    install.add_arguments(ins)
    ins.set_defaults(func=lambda args, settings: install.run_from(args))
