"""Who judges the course's points: the per-category, per-notebook point table
in docs/instructor.md is computed here from the exercise table
(``Exercise.judged_by``), and fails when the page drifts or the course's
ratios are not met: at least half of the autograded points judged by the live
kernel (code, an effect in the guest, or a value the learner designs the
measurement for) and at most 15% copyable from a cell or the prose.

"Live" is checked, not only declared, with a documented heuristic: a live
exercise's ``shown_by`` lists groups of words; no code cell of a released
notebook (notebooks/: the instructor sources with their solutions and hidden
checks taken out) may contain every word of a group. A cell's words include
the cases its vocabulary names stand for (``MEMORY_KINDS`` measured means
every kind; ``lab.matrix()`` every case of ``ALL_CASES``; the ODP story its
revocations), so ``pin_many([("rdma", k, "shared") for k in MEMORY_KINDS])``
counts as printing RDMA on every kind. The classification itself stays an
honest judgement written in ``labkit/course/exercises.py``; this scan catches
a cell added later that prints what an exercise claims no cell prints.
"""

from __future__ import annotations

import re
from pathlib import Path

import nbformat
import pytest

from labkit.course.exercises import EXERCISES, JUDGED_BY, Exercise
from labkit.errors import ConfigError
from labkit.lab.guest.vocab import ALL_CASES, MECHANISMS, MEMORY_KINDS, SHORT_CASES
from labkit.lab.odp import REVOCATIONS

ROOT = Path(__file__).parent.parent
DOC = ROOT / "docs" / "instructor.md"
BEGIN, END = "<!-- points table: tests/test_points.py -->", "<!-- end of the points table -->"
AUTO = ("live", "copyable", "completion")
MIN_LIVE, MAX_COPYABLE = 0.50, 0.15

# Live exercises that are effects or measurements whose parameters the learner
# chooses: nothing to scan for (why, for the reader of this test).
NOTHING_TO_SCAN = {
    "ex6.1": "the learner chooses the hold; the check refuses the holds the cells use",
    "ex7.1": "an effect: a mount of the learner's own, read from the guest's mount table",
}


def _cases_words(cases) -> list[str]:
    """One phrase per measured case: a group of words is shown by an expanded
    call only if one case has them all (the matrix's v4l2 row and its
    rdma/pagecache row do not make a v4l2/pagecache cell)."""
    return [" ".join(c) for c in cases]


# What a vocabulary name measured in a cell stands for.
EXPANSIONS = {
    "MEMORY_KINDS": [" ".join(MEMORY_KINDS)],
    "MECHANISMS": [" ".join(MECHANISMS)],
    "SHORT_CASES": _cases_words(SHORT_CASES),
    "matrices_on_two_kernels": _cases_words(SHORT_CASES),
    "lab.matrix(": _cases_words(ALL_CASES),
    "story_on_two_kernels": [" ".join(["rdma-odp", *MEMORY_KINDS]
                                      + [f"revoke-{m}-{k}-write" for m, k in REVOCATIONS])],
}


def table() -> dict[str, dict[str, int]]:
    """Notebook -> category -> points (autograded; ``manual``: the points graded by hand)."""
    out: dict[str, dict[str, int]] = {}
    for e in EXERCISES:
        row = out.setdefault(e.notebook, {c: 0 for c in JUDGED_BY})
        row[e.judged_by] += e.manual_points if e.judged_by == "manual" else e.points
    return dict(sorted(out.items()))


def render(t: dict[str, dict[str, int]]) -> str:
    """The markdown table docs/instructor.md carries between the markers."""
    lines = ["| notebook | live | copyable | completion | autograded | manual |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    total = {c: 0 for c in JUDGED_BY}
    for nb, row in t.items():
        lines.append(f"| {nb} | {row['live']} | {row['copyable']} | {row['completion']} | "
                     f"{sum(row[c] for c in AUTO)} | {row['manual']} |")
        for c in JUDGED_BY:
            total[c] += row[c]
    auto = sum(total[c] for c in AUTO)
    lines.append(f"| **all** | **{total['live']}** | **{total['copyable']}** | **{total['completion']}** | "
                 f"**{auto}** | **{total['manual']}** |")
    lines.append(f"| share of autograded | {total['live'] / auto:.0%} | {total['copyable'] / auto:.0%} | "
                 f"{total['completion'] / auto:.0%} | 100% | |")
    return "\n".join(lines)


def _doc_table() -> str:
    text = DOC.read_text()
    assert BEGIN in text and END in text, f"docs/instructor.md lost the markers {BEGIN!r} ... {END!r}"
    return text.split(BEGIN, 1)[1].split(END, 1)[0].strip()


def test_every_exercise_says_who_judges_it():
    with pytest.raises(ConfigError, match="judged_by"):
        Exercise("exX.1", "00", 1, "x", lambda a, live: (True, ""))
    for e in EXERCISES:
        assert e.judged_by in JUDGED_BY, e.id
        # the category follows from the kind where the kind decides it
        assert (e.kind == "prediction") == (e.judged_by == "completion"), e.id
        assert (e.kind == "explain") == (e.judged_by == "manual"), e.id
        assert e.kind != "code" or e.judged_by == "live", e.id


def test_the_instructor_page_carries_the_computed_table():
    expected = render(table())
    assert _doc_table() == expected, ("docs/instructor.md's points table differs from the exercise table; "
                                      f"put this between its markers:\n{expected}")


def test_most_points_are_judged_live_and_few_can_be_copied():
    t = table()
    live = sum(r["live"] for r in t.values())
    copyable = sum(r["copyable"] for r in t.values())
    auto = sum(r[c] for r in t.values() for c in AUTO)
    assert live / auto >= MIN_LIVE and copyable / auto <= MAX_COPYABLE, render(t)


def _released_code_cells() -> list[tuple[str, list[str]]]:
    """Each released code cell as the texts that may show a value: its source,
    and one phrase per case a vocabulary name in it measures."""
    cells = []
    for p in sorted((ROOT / "notebooks").glob("[0-9][0-9]-*.ipynb")):
        for c in nbformat.read(p, as_version=4).cells:
            if c.cell_type == "code":
                texts = [c.source] + [case for k, v in EXPANSIONS.items() if k in c.source for case in v]
                cells.append((p.name, texts))
    return cells


def _shows(texts: str | list[str], group: tuple[str, ...]) -> bool:
    """True if one of ``texts`` has every word of ``group``."""
    return any(all(re.search(rf"(?<![\w-]){re.escape(w)}(?![\w-])", t) for w in group)
               for t in ([texts] if isinstance(texts, str) else texts))


def test_no_released_cell_prints_a_live_value():
    cells = _released_code_cells()
    assert cells
    for e in EXERCISES:
        if e.judged_by != "live" or e.kind != "value":
            continue
        assert e.shown_by or e.id in NOTHING_TO_SCAN, f"{e.id}: say which cell words would print its answer"
        for name, words in cells:
            for group in e.shown_by:
                assert not _shows(words, group), (f"{e.id} is counted as live but a cell of {name} measures "
                                                  f"{group}: ask for a variant, or classify it copyable")


def test_the_scan_sees_a_cell_that_prints_a_value():
    """The heuristic is not vacuous: the notebook 03 table prints RDMA on every kind."""
    words = dict(_released_code_cells())
    assert any(_shows(w, ("rdma", "fsdax-ext4")) for n, w in _released_code_cells() if n.startswith("03"))
    assert not _shows("lab.pin('rdma', 'anon')", ("rdma", "fsdax-ext4")) and words
    # a matrix call shows the cases it measures, one case at a time
    matrix = [case for case in EXPANSIONS["matrices_on_two_kernels"]]
    assert _shows(matrix, ("rdma", "pagecache")) and not _shows(matrix, ("v4l2", "pagecache"))
