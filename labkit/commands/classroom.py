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
stops the run before any account is made, with its line number."""

EXCHANGE_DESCRIPTION = f"""\
Make the nbgrader exchange at DIR (default {accounts.EXCHANGE_ROOT}, nbgrader's
Exchange.root): DIR mode 1777, DIR/COURSE and its outbound 0755 owned by the
instructor (nbgrader refuses a course directory the instructor does not own;
only the instructor releases), inbound 3733 (learners hand in but cannot list,
delete or replace anyone's submission)."""


def cmd_class_enrol(args: argparse.Namespace, settings: Settings) -> int:
    rows = accounts.read_roster(args.roster)        # every line checked before any account is made
    learners = accounts.enrol(rows, group=args.group)
    for learner in learners:
        what = "created" if learner.created else "exists"
        fixed = f", home {learner.home} made private (0700)" if learner.home_fixed else ""
        print(f"{learner.username}: {what} (uid {learner.uid}){fixed}")
    made = sum(1 for x in learners if x.created)
    print(f"{len(learners)} learners: {made} created, {len(learners) - made} already there; every home 0700")
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

INSTALL_DESCRIPTION = """\
Set up this host as the class's server, as root, on a systemd host (Debian 12
or 13, Ubuntu 24.04): packages, a venv with labkit and JupyterHub, the proxy,
TLS (a self-signed certificate unless --cert/--key), the hub's config, every
kernel image the course uses (copied from --images, else built) and a
warm-start snapshot of each in the shared read-only cache, the notebooks
learners get on their first spawn, the nbgrader exchange, and the hub as the
systemd service labkit-hub. Each step looks first whether it is done; running
it again changes only what is missing. Then: labkit class enrol CLASS.csv."""


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


def cmd_class_install(args: argparse.Namespace, settings: Settings) -> int:
    from labkit.deploy import install
    kw = dict(admins=tuple(a for a in (args.admins or "").split(",") if a) or None, port=args.port,
              kernels=tuple(args.kernels) if args.kernels else None, images_from=args.images, wheels=args.wheels,
              source=args.source, cert=args.cert, key=args.key, memory=args.memory, cpus=args.cpus,
              group=args.group)
    plan = install.plan_from(**kw)
    took = install.install(plan, say=print, dry_run=args.dry_run)
    if not args.dry_run:
        print(f"done in {sum(took.values()):.0f} s: https://<this host>:{plan.port}/ ; "
              "next: labkit class enrol CLASS.csv --group " + plan.group)
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
    from labkit.deploy.install import COURSE_KERNELS, Plan
    ins = cs.add_parser("install", help="set up this systemd host as the class's server (run once, and again "
                                        "at any time)", description=INSTALL_DESCRIPTION,
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    ins.add_argument("--images", type=Path, default=None, metavar="DIR",
                     help="guest images built elsewhere (DIR/<kernel>/...), copied instead of built here")
    ins.add_argument("--wheels", type=Path, default=None, metavar="DIR",
                     help="install labkit and the hub from these wheels only (no package index)")
    ins.add_argument("--source", type=Path, default=None, metavar="DIR",
                     help="the labkit checkout (hub config, notebooks; default: this one)")
    ins.add_argument("--admins", default=None, metavar="USER,...", help="who gets /hub/admin")
    ins.add_argument("--group", default=None, help=f"the learners' Unix group (default {Plan.group})")
    ins.add_argument("--port", type=int, default=None, help=f"the hub's HTTPS port (default {Plan.port})")
    ins.add_argument("--cert", type=Path, default=None, help="TLS certificate (default: a self-signed one)")
    ins.add_argument("--key", type=Path, default=None, help="TLS key, with --cert")
    ins.add_argument("--kernels", nargs="+", default=None, choices=COURSE_KERNELS,
                     help=f"the kernels to install (default: all the course uses, {' '.join(COURSE_KERNELS)})")
    ins.add_argument("--memory", default=None, help=f"memory per learner (default {Plan.memory})")
    ins.add_argument("--cpus", type=float, default=None, help=f"CPUs per learner (default {Plan.cpus})")
    ins.add_argument("--dry-run", action="store_true", help="say which steps would run, change nothing")
    ins.set_defaults(func=cmd_class_install)
