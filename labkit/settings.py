"""labkit's settings: every ``LABKIT_*`` knob, typed, in one frozen value.

``Settings.from_env(environ)`` is the only reader of ``LABKIT_*`` variables.
It runs at the edges — the command line, ``labkit.connect()``/``labkit.VM``,
the grader's entry points, the tools — and the layers below take the result
(``image/`` and ``machine/`` never read the environment). A bad value is a
``ConfigError`` that names the variable and says what it takes, raised when
the settings are resolved, not deep inside a VM start.

What each variable means is documented in docs/ (installation, performance,
deploy, grading) and in ``labkit --help``; the field comments repeat it.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

from labkit.errors import ConfigError
from labkit.paths import PROJECT_DIR

log = logging.getLogger(__name__)

# TCG's translation cache under software emulation. QEMU's own default (1 GiB)
# fills over a long session (984 MB of a course-long VM's 1.6 GB); 128 MiB cost
# no measurable speed on 2026-12-02 (pin matrix 21.2 s vs 21.0 s, medians of 3;
# grading notebooks 01+02 45-48 s vs 42-44 s) and saves 123 MB per VM after the
# matrix (docs/performance.md).
DEFAULT_TCG_CACHE_MB = 128
# The sandbox uids a grader leases when LABKIT_GRADE_UIDS is not set.
GRADE_UIDS_FIRST, GRADE_UIDS_COUNT = 62000, 1000
GRADE_UIDS_VAR = "LABKIT_GRADE_UIDS"
DEFAULT_SHARED_CACHE = "/var/cache/labkit"
# The host-wide start queue (machine/pace.py): a directory every local user
# shares, and how long a start waits there for its turn before it gives up.
DEFAULT_START_QUEUE_DIR = "/tmp/labkit-start-queue"
DEFAULT_START_QUEUE_TIMEOUT = 600.0

_TRUE, _FALSE = ("1", "yes", "true", "on"), ("0", "no", "false", "off")


@dataclass(frozen=True)
class Settings:
    """Where labkit keeps things and how it runs guests, resolved once."""

    recipe_dir: Path = PROJECT_DIR / "images"            # LABKIT_RECIPE_DIR: the image recipe
    images_dir: Path = PROJECT_DIR / "images" / "build"  # LABKIT_IMAGES_DIR: built images, one dir per kernel
    state_dir: Path = Path.home() / ".local/state/labkit"  # LABKIT_STATE_DIR: per-VM state (vms/<name>/)
    cache_dir: Path = Path.home() / ".cache/labkit"      # LABKIT_CACHE_DIR: accel probe, snapshots, kernel source
    # LABKIT_SHARED_CACHE_DIR: the host-wide cache an instructor fills once
    # (warm-start snapshots) and every learner reads; None: turned off
    shared_cache_dir: Path | None = Path(DEFAULT_SHARED_CACHE)
    notebooks_dir: Path = PROJECT_DIR / "notebooks"      # LABKIT_NOTEBOOKS_DIR: the student notebooks
    vm_name: str = "default"                             # LABKIT_VM: the VM labkit.connect() means
    accel: str | None = None                             # LABKIT_ACCEL=kvm|tcg: forced; None: probe
    tcg_cache_mb: int = DEFAULT_TCG_CACHE_MB             # LABKIT_TCG_CACHE_MB: TCG's translation cache
    auto_build: bool = True                              # LABKIT_AUTO_BUILD=0: never build a missing image
    mirror: str = ""                                     # LABKIT_MIRROR: a Debian mirror URI for builds
    apt_sources: Path | None = None                      # LABKIT_APT_SOURCES: an apt sources file for builds
    free_page_reporting: bool = True                     # LABKIT_FREE_PAGE_REPORTING=0: no balloon
    # LABKIT_MANAGED_VMS: VMs whose start and stop belong to another process
    # (the summative grader's sandbox sets it for the guests it started)
    managed_vms: frozenset[str] = frozenset()
    # LABKIT_LIFETIME_PID (else JPY_PARENT_PID in a hub's kernel): the process
    # whose end ends a persistent VM too; 0: none
    lifetime_pid: int = 0
    grade_uids: range = field(default=range(GRADE_UIDS_FIRST, GRADE_UIDS_FIRST + GRADE_UIDS_COUNT))
    kernel_source: Path | None = None                    # LABKIT_KERNEL_SOURCE: the guest kernel's source tree
    # LABKIT_START_SLOTS: guests that may start at once on this host (0: no
    # start queue); None: from the host's CPUs and available memory
    start_slots: int | None = None
    start_queue_dir: Path = Path(DEFAULT_START_QUEUE_DIR)  # LABKIT_START_QUEUE_DIR
    start_queue_timeout: float = DEFAULT_START_QUEUE_TIMEOUT  # LABKIT_START_QUEUE_TIMEOUT: seconds
    # LABKIT_BOOT_TIMEOUT: seconds a restore or cold boot may take to SSH-ready (None: the
    # accelerator's default); a host that emulates slowly (nested emulation) raises it
    boot_timeout: float | None = None
    warm_start: bool = True                              # LABKIT_WARM_START=0: every start boots cold

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> Settings:
        """The settings ``environ`` gives (an empty value counts as unset;
        relative paths are taken from the current directory, here, once)."""
        e = environ
        home = Path.home()
        recipe = _path(e, "LABKIT_RECIPE_DIR", PROJECT_DIR / "images")
        xdg_state = _path(e, "XDG_STATE_HOME", home / ".local/state")
        xdg_cache = _path(e, "XDG_CACHE_HOME", home / ".cache")
        shared = e.get("LABKIT_SHARED_CACHE_DIR", DEFAULT_SHARED_CACHE)
        return cls(
            recipe_dir=recipe,
            images_dir=_path(e, "LABKIT_IMAGES_DIR", recipe / "build"),
            state_dir=_path(e, "LABKIT_STATE_DIR", xdg_state / "labkit"),
            cache_dir=_path(e, "LABKIT_CACHE_DIR", xdg_cache / "labkit"),
            shared_cache_dir=Path(shared) if shared else None,
            notebooks_dir=_path(e, "LABKIT_NOTEBOOKS_DIR", PROJECT_DIR / "notebooks"),
            vm_name=e.get("LABKIT_VM") or "default",
            accel=_accel(e.get("LABKIT_ACCEL", "")),
            tcg_cache_mb=_tcg_cache_mb(e.get("LABKIT_TCG_CACHE_MB", "")),
            auto_build=_flag(e, "LABKIT_AUTO_BUILD", True, "0 refuses to build a missing image; 1 builds it"),
            warm_start=_flag(e, "LABKIT_WARM_START", True, "0 boots every guest cold (no warm-start snapshot is "
                                                           "made or restored); 1 warm-starts"),
            mirror=e.get("LABKIT_MIRROR", ""),
            apt_sources=Path(e["LABKIT_APT_SOURCES"]) if e.get("LABKIT_APT_SOURCES") else None,
            free_page_reporting=_free_page_reporting(e.get("LABKIT_FREE_PAGE_REPORTING", "1")),
            managed_vms=frozenset(e.get("LABKIT_MANAGED_VMS", "").split()),
            lifetime_pid=_lifetime_pid(e),
            grade_uids=grade_uid_range(e.get(GRADE_UIDS_VAR, "")),
            kernel_source=Path(e["LABKIT_KERNEL_SOURCE"]) if e.get("LABKIT_KERNEL_SOURCE") else None,
            start_slots=_start_slots(e.get("LABKIT_START_SLOTS", "")),
            start_queue_dir=_path(e, "LABKIT_START_QUEUE_DIR", Path(DEFAULT_START_QUEUE_DIR)),
            start_queue_timeout=_start_queue_timeout(e.get("LABKIT_START_QUEUE_TIMEOUT", "")),
            boot_timeout=_seconds("LABKIT_BOOT_TIMEOUT", e.get("LABKIT_BOOT_TIMEOUT", ""),
                                  "how long a guest may take to start, e.g. 600; unset: 120 under TCG, 60 with KVM"),
        )

    def with_(self, **changes: object) -> Settings:
        return replace(self, **changes)  # type: ignore[arg-type]


def from_environment() -> Settings:
    """This process's settings, for an edge (the command line, ``labkit.connect``,
    ``labkit.VM`` built without settings, a tool's entry point)."""
    return Settings.from_env(os.environ)


def resolve(given: Settings | None) -> Settings:
    """``given``, else this process's settings: the default of a public entry
    point that notebooks and tests call without settings."""
    return given if given is not None else from_environment()


def _path(environ: Mapping[str, str], name: str, default: Path) -> Path:
    return Path(environ.get(name) or default).absolute()


def _flag(environ: Mapping[str, str], name: str, default: bool, meaning: str) -> bool:
    text = environ.get(name, "").strip().lower()
    if not text:
        return default
    if text not in _TRUE + _FALSE:
        raise ConfigError(f"{name}={environ[name]!r} is not 0 or 1", hint=meaning)
    return text in _TRUE


def _accel(text: str) -> str | None:
    value = text.strip().lower()
    if not value:
        return None
    if value not in ("kvm", "tcg"):
        raise ConfigError(f"LABKIT_ACCEL={text!r} is not an accelerator",
                          hint="use kvm or tcg, or unset it to let labkit probe KVM")
    return value


def _tcg_cache_mb(text: str) -> int:
    if not text:
        return DEFAULT_TCG_CACHE_MB
    if not text.isdigit():
        raise ConfigError(f"LABKIT_TCG_CACHE_MB={text!r} is not a number of MiB",
                          hint=f"e.g. LABKIT_TCG_CACHE_MB=1024 (QEMU's own default), or unset it for "
                               f"labkit's {DEFAULT_TCG_CACHE_MB}")
    return int(text)


def _free_page_reporting(text: str) -> bool:
    if text not in ("0", "1"):
        raise ConfigError(f"LABKIT_FREE_PAGE_REPORTING={text!r} is not 0 or 1",
                          hint="1 (the default) returns memory the guest freed to the host; 0 does not")
    return text == "1"


def _lifetime_pid(environ: Mapping[str, str]) -> int:
    """``LABKIT_LIFETIME_PID`` when set (``0`` turns it off; the hub
    configuration sets it to the learner's Jupyter server). Otherwise, in a
    Jupyter kernel of a JupyterHub server (``JUPYTERHUB_USER`` set), the
    server that started the kernel (``JPY_PARENT_PID``, set by jupyter_client).
    A kernel restart keeps the VM; stopping or culling the server ends it.
    Outside a hub a persistent VM is the learner's own and outlives everything."""
    value = environ.get("LABKIT_LIFETIME_PID")
    if value is None and environ.get("JUPYTERHUB_USER"):
        value = environ.get("JPY_PARENT_PID")
    try:
        pid = int(value or 0)
    except ValueError:
        # a warning, not an error: a hub's odd value must not stop a learner's notebook
        log.warning("LABKIT_LIFETIME_PID=%r is not a PID; the VM is not tied to any process", value)
        return 0
    return pid if pid > 0 else 0


def grade_uid_range(text: str) -> range:
    """``LABKIT_GRADE_UIDS`` (``START-END``, inclusive) or 62000-62999."""
    text = text.strip()
    if not text:
        return range(GRADE_UIDS_FIRST, GRADE_UIDS_FIRST + GRADE_UIDS_COUNT)
    try:
        start, end = (int(x) for x in text.split("-", 1))
    except ValueError:
        raise ConfigError(f"{GRADE_UIDS_VAR}={text!r} is not a uid range",
                          hint=f"give START-END, e.g. {GRADE_UIDS_VAR}=63000-63099") from None
    if not 1000 <= start <= end < 2**31 - 1:
        raise ConfigError(f"{GRADE_UIDS_VAR}={text!r}: the range must lie between 1000 and 2147483646, "
                          "start <= end", hint="use uids no account on this host has, e.g. 63000-63099")
    return range(start, end + 1)


def _start_slots(text: str) -> int | None:
    text = text.strip()
    if not text:
        return None
    if not text.isdigit():
        raise ConfigError(f"LABKIT_START_SLOTS={text!r} is not a number of guests",
                          hint="how many guests may start at once on this host, e.g. 2; 0 turns the start "
                               "queue off; unset: one per CPU, as memory allows")
    return int(text)


def _seconds(name: str, text: str, what: str) -> float | None:
    text = text.strip()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise ConfigError(f"{name}={text!r} is not a number of seconds", hint=what)
    return value


def _start_queue_timeout(text: str) -> float:
    value = _seconds("LABKIT_START_QUEUE_TIMEOUT", text, "how long a start waits for its turn, e.g. 300; unset: "
                     f"{DEFAULT_START_QUEUE_TIMEOUT:g}")
    return DEFAULT_START_QUEUE_TIMEOUT if value is None else value
