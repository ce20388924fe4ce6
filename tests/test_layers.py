"""The layer map in CONTRIBUTING.md is true, and this test keeps it true.

The map's table lists labkit's layers in order; a layer imports only from
itself and the layers listed before it. The test reads the table itself (so
the map and the rule cannot drift apart), reads every import of every module
with ``ast`` (at the top of the file, inside functions, under
``TYPE_CHECKING``), and says in plain words which module imports which and
which rule that breaks. It also checks that the map names every module, that
the channel libraries stay in the machine layer and the guest code in the
standard library, and that ``import labkit.errors`` loads no channel library.
"""

from __future__ import annotations

import ast
import functools
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from labkit.version import __version__

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "labkit"
MAP = ROOT / "CONTRIBUTING.md"
RULE = "a layer imports only from itself and the layers listed before it in the map in CONTRIBUTING.md"

# Libraries that only one place may import (the rest of labkit reaches them
# through that place's own types): folder or file under labkit/.
OWNERS = {"paramiko": ("machine/channels/",), "qemu": ("machine/channels/",),
          "pexpect": ("machine/channels/", "machine/warm.py"), "jupyterhub": ("deploy/spawner.py",)}
GUEST = "lab/guest/"        # runs inside the guest: the standard library only,
GUEST_PACKAGES = {"pyverbs"}   # and the Python packages the image installs (python3-pyverbs)


@dataclass(frozen=True)
class Layer:
    """One row of the map: its place in the order, what it holds, the row's text."""

    index: int
    places: tuple[str, ...]         # paths under labkit/: "errors.py", "lab/guest/", ...
    described: tuple[str, ...]      # every `name` in the row's other cells

    @property
    def title(self) -> str:
        return ", ".join(self.places)


@dataclass(frozen=True)
class Import:
    """One import statement: who, which line, of what."""

    source: str                     # path under labkit/
    line: int
    target: str                     # dotted module name


def read_map(text: str) -> list[Layer]:
    """The rows of the table under "## The layers", in order."""
    section = text.split("## The layers", 1)[1].split("\n## ", 1)[0]
    rows = [r for r in section.splitlines() if r.startswith("|") and not set(r) <= set("|-: ")][1:]
    layers = []
    for i, row in enumerate(rows):
        cells = [c.strip() for c in row.strip().strip("|").split("|")]
        places = tuple(re.findall(r"`([^`]+)`", cells[0]))
        described = tuple(n for c in cells[1:] for n in re.findall(r"`([^`]+)`", c))
        layers.append(Layer(i, places, described))
    return layers


def module_name(rel: str) -> str:
    parts = ["labkit", *Path(rel).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def all_modules(pkg: Path = PKG) -> dict[str, str]:
    """Dotted name -> path under labkit/, for every module of the package."""
    return {module_name(str(p.relative_to(pkg))): str(p.relative_to(pkg)) for p in sorted(pkg.rglob("*.py"))}


@functools.lru_cache(maxsize=None)
def parsed(pkg: Path, rel: str) -> ast.Module:
    return ast.parse((pkg / rel).read_text(), filename=rel)


def imports_of(rel: str, modules: dict[str, str], pkg: Path = PKG) -> list[Import]:
    """Every import of labkit in one module, wherever it stands in the file."""
    tree = parsed(pkg, rel)
    name = module_name(rel)
    package = name if rel.endswith("__init__.py") else name.rpartition(".")[0]
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Import(rel, node.lineno, a.name) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package.split(".")[:len(package.split(".")) - node.level + 1]
                base = ".".join(up + ([base] if base else []))
            # `from labkit import paths` imports the module labkit.paths
            subs = [f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in modules]
            found += [Import(rel, node.lineno, t) for t in (subs or [base])]
    return [i for i in found if i.target == "labkit" or i.target.startswith("labkit.")]


def third_party_imports(rel: str, pkg: Path = PKG) -> list[tuple[int, str]]:
    """(line, top-level name) of every absolute import that is not labkit."""
    tree = parsed(pkg, rel)
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name.split(".")[0]) for a in node.names]
        elif isinstance(node, ast.ImportFrom) and not node.level and node.module:
            out.append((node.lineno, node.module.split(".")[0]))
    return [(line, top) for line, top in out if top != "labkit"]


def layer_of(rel: str, layers: list[Layer]) -> Layer | None:
    """The row whose place holds ``rel`` (the longest matching place wins)."""
    best: tuple[int, Layer] | None = None
    for layer in layers:
        for place in layer.places:
            hit = rel.startswith(place) if place.endswith("/") else rel == place
            if hit and (best is None or len(place) > best[0]):
                best = (len(place), layer)
    return best[1] if best else None


def named_in(rel: str, layer: Layer) -> bool:
    """Does the row name this module: its own place, its file name or path, or a subfolder holding it?"""
    if rel in layer.places:
        return True
    for name in layer.described:
        if name.endswith("/") and f"/{name}" in f"/{rel}":
            return True
        if ("/" + rel).endswith("/" + name):
            return True
    return False


def layer_violations(pkg: Path = PKG, map_text: str | None = None) -> list[str]:
    """Every arrow against the map's order, in plain words."""
    layers = read_map(map_text if map_text is not None else MAP.read_text())
    modules = all_modules(pkg)
    problems = []
    for rel in modules.values():
        mine = layer_of(rel, layers)
        if mine is None:
            problems.append(f"labkit/{rel} is in no layer of the map in CONTRIBUTING.md")
            continue
        for imp in imports_of(rel, modules, pkg):
            target = modules.get(imp.target)
            if target is None:
                problems.append(f"labkit/{rel} line {imp.line} imports {imp.target}, which is no module of labkit")
                continue
            theirs = layer_of(target, layers)
            if theirs is not None and theirs.index > mine.index:
                problems.append(
                    f"labkit/{rel} (layer {mine.title}) imports {imp.target} (labkit/{target}, layer "
                    f"{theirs.title}) at line {imp.line}: the map lists layer {theirs.title} after layer "
                    f"{mine.title}, and {RULE}")
    return problems


def test_the_map_reads_as_layers():
    layers = read_map(MAP.read_text())
    places = [p for layer in layers for p in layer.places]
    assert len(layers) >= 8 and len(places) == len(set(places)), places
    for must in ("errors.py", "machine/", "lab/", "lab/guest/", "course/", "cli.py", "__init__.py"):
        assert must in places, f"the map in CONTRIBUTING.md has no row for labkit/{must}"


def test_no_import_runs_against_the_layer_order():
    problems = layer_violations()
    assert not problems, "imports against the layer map:\n" + "\n".join(problems)


def test_the_map_names_every_module():
    layers = read_map(MAP.read_text())
    missing = []
    for rel in all_modules().values():
        layer = layer_of(rel, layers)
        if layer is None:
            missing.append(f"labkit/{rel}: no row of the map holds it")
        elif not rel.endswith("/__init__.py") and not named_in(rel, layer):
            missing.append(f"labkit/{rel}: the row for {layer.title} does not name it "
                           f"(write `{Path(rel).name}` or its folder in that row)")
    assert not missing, "modules the map in CONTRIBUTING.md does not list:\n" + "\n".join(missing)


def test_the_reader_sees_imports_inside_functions_and_a_planted_upward_import(tmp_path):
    """The test itself must be able to fail: an import inside a function,
    from the error tree up to the machine layer, is caught and explained."""
    pkg = tmp_path / "labkit"
    (pkg / "machine").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "machine" / "__init__.py").write_text("")
    (pkg / "machine" / "vm.py").write_text("from labkit import errors\n")
    (pkg / "errors.py").write_text("def f():\n    from .machine import vm\n    return vm\n")
    table = ("## The layers\n\n| folder | what |\n| --- | --- |\n| `errors.py` | errors |\n"
             "| `machine/` | `vm.py` |\n| `__init__.py` | face |\n")
    problems = layer_violations(pkg, table)
    assert problems == ["labkit/errors.py (layer errors.py) imports labkit.machine.vm (labkit/machine/vm.py, "
                        f"layer machine/) at line 2: the map lists layer machine/ after layer errors.py, and {RULE}"]


@pytest.mark.parametrize("library", sorted(OWNERS))
def test_a_library_is_imported_only_by_its_owner(library):
    wrong = [f"labkit/{rel} line {line} imports {library}" for rel in all_modules().values()
             for line, top in third_party_imports(rel) if top == library
             and not any(rel.startswith(o) if o.endswith("/") else rel == o for o in OWNERS[library])]
    assert not wrong, f"only {', '.join('labkit/' + o for o in OWNERS[library])} may import {library}:\n" \
        + "\n".join(wrong)


def test_guest_code_uses_the_standard_library_only():
    wrong = [f"labkit/{rel} line {line} imports {top}" for rel in all_modules().values() if rel.startswith(GUEST)
             for line, top in third_party_imports(rel) if top not in sys.stdlib_module_names | GUEST_PACKAGES]
    assert not wrong, f"labkit/{GUEST} runs inside the guest, with the standard library and {sorted(GUEST_PACKAGES)} only:\n" + "\n".join(wrong)


@pytest.mark.parametrize("module", ["labkit.errors", "labkit.lab", "labkit.course.dashboard"])
def test_importing_a_layer_above_the_channels_loads_no_channel_library(module):
    """The package faces (``labkit``, ``labkit.machine``) load on first use, and
    the types the lab shares with the machine layer live below the channels."""
    code = (f"import {module}, sys; "
            "print([m for m in ('paramiko', 'qemu.qmp', 'pexpect') if m in sys.modules])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_the_names_notebooks_use_stay_importable():
    code = ("import sys, labkit\n"
            "assert [m for m in ('paramiko', 'qemu.qmp', 'pexpect') if m in sys.modules] == []\n"
            "from labkit.lab import Lab\nfrom labkit import dashboard\nfrom labkit.grading import record\n"
            "print(labkit.connect.__module__, labkit.VM.__name__, labkit.LabError.__name__, Lab.__name__,\n"
            "      callable(dashboard.vm_panel), callable(record), callable(labkit.course.hint), labkit.__version__)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["labkit.machine.vm", "VM", "LabError", "Lab", "True", "True", "True", __version__]
