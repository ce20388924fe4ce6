"""The fact table: every kernel version stated in the notebooks' prose is a
verified release in labkit.course.facts, every 12-hex commit id in the
notebooks is in the table, and every entry is well formed."""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from labkit.course import facts

NOTEBOOKS = sorted((Path(__file__).parent.parent / "notebooks").glob("[0-9][0-9]-*.ipynb"))
# a kernel version in prose: "v5.6", "Linux 6.12", "kernel 6.1", "--kernel 6.12"
VERSION_RE = re.compile(r"(?:\bv|\b(?:Linux|kernel|--kernel)\s+)(\d+\.\d+)\b")
COMMIT_RE = re.compile(r"\b[0-9a-f]{12}\b")


def _markdown(path: Path) -> str:
    return "\n".join(c.source for c in nbformat.read(path, as_version=4).cells if c.cell_type == "markdown")


def _all_text(path: Path) -> str:
    return "\n".join(c.source for c in nbformat.read(path, as_version=4).cells)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_version_in_prose_is_a_verified_release(path):
    stated = set(VERSION_RE.findall(_markdown(path)))
    assert stated <= facts.verified_releases(), sorted(stated - facts.verified_releases())


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.name)
def test_every_commit_id_in_a_notebook_is_in_the_table(path):
    ids = set(COMMIT_RE.findall(_all_text(path)))
    assert ids <= facts.commits(), sorted(ids - facts.commits())


def test_entries_are_well_formed():
    keys = [f.key for f in facts.FACTS]
    assert len(keys) == len(set(keys))
    for f in facts.FACTS:
        assert f.commit is None or re.fullmatch(r"[0-9a-f]{12}", f.commit), f.key
        assert f.release is None or re.fullmatch(r"\d+\.\d+", f.release), f.key
        assert f.commit_evidence and (f.release is None or f.release_evidence), f.key
        assert f.notebooks and all(re.fullmatch(r"\d\d", n) for n in f.notebooks), f.key


def test_the_known_wrong_sentences_are_gone():
    text = "\n".join(_markdown(p) for p in NOTEBOOKS)
    assert "can simply wait" not in text
    assert "what `malloc` returns" not in text
    assert "buffers queued" not in "\n".join(_all_text(p) for p in NOTEBOOKS)
    assert "v5.6 era" not in text
    assert "Two things to read off" not in text


def test_cite():
    assert facts.cite("foll-pin") == '"mm/gup: introduce pin_user_pages*() and FOLL_PIN" (eddb1c228f79, v5.6)'
