"""labkit's settings: every LABKIT_* variable resolved in one place, with
clear errors for bad values, and nothing below the edges reading the
environment (machine/ and image/ read no variable at all)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from labkit.errors import ConfigError
from labkit.paths import PROJECT_DIR
from labkit.settings import DEFAULT_TCG_CACHE_MB, Settings

PKG = Path(__file__).resolve().parents[1] / "labkit"


def test_an_empty_environment_gives_the_documented_defaults(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    s = Settings.from_env({})
    assert s.recipe_dir == PROJECT_DIR / "images" and s.images_dir == PROJECT_DIR / "images" / "build"
    assert s.state_dir == tmp_path / ".local/state/labkit" and s.cache_dir == tmp_path / ".cache/labkit"
    assert s.shared_cache_dir == Path("/var/cache/labkit") and s.notebooks_dir == PROJECT_DIR / "notebooks"
    assert (s.vm_name, s.accel, s.tcg_cache_mb, s.auto_build, s.free_page_reporting) == \
        ("default", None, DEFAULT_TCG_CACHE_MB, True, True)
    assert (s.mirror, s.apt_sources, s.managed_vms, s.lifetime_pid, s.kernel_source) == \
        ("", None, frozenset(), 0, None)
    assert s.grade_uids == range(62000, 63000)


def test_every_variable_is_read(tmp_path):
    env = {"LABKIT_RECIPE_DIR": str(tmp_path / "r"), "LABKIT_STATE_DIR": str(tmp_path / "s"),
           "LABKIT_CACHE_DIR": str(tmp_path / "c"), "LABKIT_SHARED_CACHE_DIR": "",
           "LABKIT_NOTEBOOKS_DIR": str(tmp_path / "n"), "LABKIT_VM": "lab1", "LABKIT_ACCEL": " TCG ",
           "LABKIT_TCG_CACHE_MB": "1024", "LABKIT_AUTO_BUILD": "0", "LABKIT_MIRROR": "http://m.invalid/debian",
           "LABKIT_APT_SOURCES": str(tmp_path / "a.sources"), "LABKIT_FREE_PAGE_REPORTING": "0",
           "LABKIT_MANAGED_VMS": "judge  companion-6-12", "LABKIT_LIFETIME_PID": "4242",
           "LABKIT_GRADE_UIDS": "63000-63009", "LABKIT_KERNEL_SOURCE": str(tmp_path / "6.1.0-x"),
           "LABKIT_START_SLOTS": "3", "LABKIT_START_QUEUE_DIR": str(tmp_path / "q"),
           "LABKIT_START_QUEUE_TIMEOUT": "30", "LABKIT_BOOT_TIMEOUT": "900"}
    s = Settings.from_env(env)
    assert s.images_dir == tmp_path / "r" / "build"          # follows the recipe unless set itself
    assert (s.state_dir, s.cache_dir, s.shared_cache_dir, s.notebooks_dir) == \
        (tmp_path / "s", tmp_path / "c", None, tmp_path / "n")
    assert (s.vm_name, s.accel, s.tcg_cache_mb, s.auto_build, s.free_page_reporting) == \
        ("lab1", "tcg", 1024, False, False)
    assert (s.mirror, s.apt_sources) == ("http://m.invalid/debian", tmp_path / "a.sources")
    assert s.managed_vms == {"judge", "companion-6-12"} and s.lifetime_pid == 4242
    assert s.grade_uids == range(63000, 63010) and s.kernel_source == tmp_path / "6.1.0-x"
    assert (s.start_slots, s.start_queue_dir, s.start_queue_timeout) == (3, tmp_path / "q", 30.0)
    assert s.boot_timeout == 900.0
    assert Settings.from_env({}).start_slots is None       # unset: the host decides
    assert Settings.from_env({"LABKIT_IMAGES_DIR": str(tmp_path / "i")}).images_dir == tmp_path / "i"


@pytest.mark.parametrize("name, value, words", [
    ("LABKIT_ACCEL", "hvf", "LABKIT_ACCEL='hvf' is not an accelerator"),
    ("LABKIT_TCG_CACHE_MB", "lots", "LABKIT_TCG_CACHE_MB='lots' is not a number of MiB"),
    ("LABKIT_TCG_CACHE_MB", "-5", "is not a number of MiB"),
    ("LABKIT_AUTO_BUILD", "maybe", "LABKIT_AUTO_BUILD='maybe' is not 0 or 1"),
    ("LABKIT_FREE_PAGE_REPORTING", "yes", "LABKIT_FREE_PAGE_REPORTING='yes' is not 0 or 1"),
    ("LABKIT_GRADE_UIDS", "many", "LABKIT_GRADE_UIDS='many' is not a uid range"),
    ("LABKIT_GRADE_UIDS", "10-20", "the range must lie between 1000 and 2147483646"),
    ("LABKIT_START_SLOTS", "two", "LABKIT_START_SLOTS='two' is not a number of guests"),
    ("LABKIT_START_SLOTS", "-1", "is not a number of guests"),
    ("LABKIT_START_QUEUE_TIMEOUT", "soon", "LABKIT_START_QUEUE_TIMEOUT='soon' is not a number of seconds"),
    ("LABKIT_BOOT_TIMEOUT", "-5", "LABKIT_BOOT_TIMEOUT='-5' is not a number of seconds"),
    ("LABKIT_START_QUEUE_TIMEOUT", "0", "is not a number of seconds"),
])
def test_a_bad_value_is_a_clear_error_naming_the_variable(name, value, words):
    with pytest.raises(ConfigError, match=words) as e:
        Settings.from_env({name: value})
    assert e.value.hint          # and says what it takes


@pytest.mark.parametrize("value, want", [("0", False), ("no", False), ("off", False), ("FALSE", False),
                                         ("1", True), ("yes", True), ("", True)])
def test_auto_build_takes_the_usual_words(value, want):
    assert Settings.from_env({"LABKIT_AUTO_BUILD": value}).auto_build is want


def test_a_bad_value_on_the_command_line_is_one_line_not_a_traceback(monkeypatch, capsys):
    from labkit import cli
    monkeypatch.setenv("LABKIT_ACCEL", "hvf")
    assert cli.main(["vm", "status", "--name", "nonexistent"]) == 2
    err = capsys.readouterr().err
    assert "LABKIT_ACCEL='hvf'" in err and "kvm or tcg" in err and "Traceback" not in err


# -- nothing below the edges reads the environment --------------------------------------

def _environment_reads(path: Path) -> list[str]:
    """Each read of the environment in ``path``: ``os.environ`` (except whole,
    as ``dict(os.environ)``: a copy handed to a child process), ``os.getenv``,
    ``environ`` imported from os, and the settings' own readers."""
    tree = ast.parse(path.read_text(), str(path))
    copies = {id(call.args[0]) for call in ast.walk(tree)
              if isinstance(call, ast.Call) and isinstance(call.func, ast.Name) and call.func.id == "dict"
              and len(call.args) == 1 and not call.keywords}
    found = []
    for node in ast.walk(tree):
        where = f"{path.as_posix().split('/labkit/')[-1]}:{getattr(node, 'lineno', 0)}"
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "os" \
                and node.attr in ("environ", "environb", "getenv", "getenvb") and id(node) not in copies:
            found.append(f"{where} os.{node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module == "os" \
                and {a.name for a in node.names} & {"environ", "getenv"}:
            found.append(f"{where} from os import ...")
        elif isinstance(node, ast.Attribute) and node.attr in ("from_env", "from_environment"):
            found.append(f"{where} {node.attr}")
        elif isinstance(node, ast.ImportFrom) and node.module == "labkit.settings" \
                and {a.name for a in node.names} & {"from_environment"}:
            found.append(f"{where} imports from_environment")
    return found


# The machine and image layers resolve no settings of their own except at
# their public faces: ``labkit.VM``/``labkit.connect`` and the image
# functions notebooks and tests call without settings use
# ``settings.resolve(None)``; everything under them takes what they pass.
def test_machine_and_image_read_no_environment_variable():
    reads = [r for layer in ("machine", "image") for f in sorted((PKG / layer).rglob("*.py"))
             for r in _environment_reads(f)]
    assert reads == [], "the machine and image layers must take Settings, not read the environment:\n" + \
        "\n".join(reads)


def test_the_check_sees_a_planted_read(tmp_path):
    planted = tmp_path / "planted.py"
    planted.write_text("import os\nfrom os import getenv\n\ndef f():\n    return os.environ.get('LABKIT_X'), "
                       "os.getenv('Y'), dict(os.environ)\n")
    assert sorted(r.split(" ", 1)[1] for r in _environment_reads(planted)) == \
        ["from os import ...", "os.environ", "os.getenv"]


def test_only_settings_reads_labkit_variables():
    """Outside ``settings.py`` no module reads a LABKIT_* variable (building a
    child's environment, e.g. LABKIT_VM for JupyterLab, is writing, not reading)."""
    offenders = []
    for f in sorted(PKG.rglob("*.py")):
        if f.name == "settings.py" or "lab/guest" in f.as_posix():
            continue
        for node in ast.walk(ast.parse(f.read_text())):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                    and node.func.attr in ("get", "getenv", "pop") and node.args \
                    and isinstance(node.args[0], ast.Constant) and str(node.args[0].value).startswith("LABKIT_"):
                offenders.append(f"{f.relative_to(PKG.parent)}:{node.lineno}")
            if isinstance(node, ast.Subscript) and isinstance(node.slice, ast.Constant) \
                    and str(node.slice.value).startswith("LABKIT_") and isinstance(node.ctx, ast.Load):
                offenders.append(f"{f.relative_to(PKG.parent)}:{node.lineno}")
    assert offenders == []
