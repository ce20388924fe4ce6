"""Grading results for people and for an LMS: one JSON file per student and
a CSV with one row per student x notebook x exercise.

``labkit course gradebook DIR... -o grades.csv`` merges the per-student JSON
files of several runs (e.g. one ``labkit course grade`` per Slurm array task)
into one CSV; its columns are an interface: keep them.
"""

from __future__ import annotations

import csv
import io
import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any

from labkit.errors import ConfigError

COLUMNS = ("student", "notebook", "notebook_sha256", "kernel_release", "labkit_version", "graded_at",
           "exercise", "points", "max", "feedback")
FORMAT = "labkit-grades/1"


def student_json(student: str, grades: list) -> dict[str, Any]:
    """One student's results (``grades``: summative.NotebookGrade)."""
    notebooks = []
    for g in grades:
        d = asdict(g)
        d.update(exercises=[e.gradebook_json() for e in g.exercises], score=g.score, max=g.max)
        notebooks.append(d)
    return {"format": FORMAT, "student": student, "notebooks": notebooks,
            "score": sum(g.score for g in grades), "max": sum(g.max for g in grades)}


def student_path(out: Path, student: str) -> Path:
    return out / f"{student}.json"


def write_student(out: Path, student: str, grades: list) -> Path:
    """Write (or rewrite, as more of the student's notebooks are graded) ``out/<student>.json``."""
    out.mkdir(parents=True, exist_ok=True)
    path = student_path(out, student)
    _replace(path, json.dumps(student_json(student, grades), indent=2))
    return path


def _replace(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a temporary file: a reader (gradebook,
    an instructor during a run) never sees half a file, and a run killed while
    writing leaves the previous version."""
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def rows(data: dict[str, Any]) -> list[dict[str, Any]]:
    """The CSV rows of one student's JSON."""
    out = []
    for nb in data["notebooks"]:
        for ex in nb["exercises"]:
            out.append({"student": data["student"], "notebook": nb["path"], "notebook_sha256": nb["sha256"],
                        "kernel_release": nb["kernel_release"], "labkit_version": nb["labkit_version"],
                        "graded_at": nb["started_at"], "exercise": ex["id"], "points": ex["points"],
                        "max": ex["max"], "feedback": ex["feedback"]})
    return out


def write_csv(path: Path, all_rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO(newline="")
    w = csv.DictWriter(buf, fieldnames=COLUMNS)
    w.writeheader()
    w.writerows(sorted(all_rows, key=lambda r: (r["student"], r["notebook"], r["exercise"])))
    _replace(path, buf.getvalue())


def load_student(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ConfigError(f"{path}: not a readable grades file ({exc})",
                          hint="give the --out directories of `labkit course grade`") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ConfigError(f"{path}: not a labkit grades file (no \"format\": \"{FORMAT}\")",
                          hint="give the --out directories of `labkit course grade`")
    return data


def merge(inputs: list[str | os.PathLike], out: Path) -> int:
    """Merge the per-student JSON files in ``inputs`` (directories or files)
    into the CSV ``out``; returns the number of students. A student graded in
    two inputs is an error (which result would be the grade?)."""
    files: list[Path] = []
    for i in map(Path, inputs):
        if i.is_dir():
            files += sorted(i.glob("*.json"))
        elif i.is_file():
            files.append(i)
        else:
            raise ConfigError(f"{i}: no such file or directory", hint="give --out directories of `labkit course grade`")
    if not files:
        raise ConfigError("no grades files (*.json) found", hint="give --out directories of `labkit course grade`")
    seen: dict[str, Path] = {}
    all_rows = []
    for f in files:
        data = load_student(f)
        if data["student"] in seen:
            raise ConfigError(f"student {data['student']!r} is in both {seen[data['student']]} and {f}",
                              hint="grade each submission once, or merge the runs you mean")
        seen[data["student"]] = f
        all_rows += rows(data)
    write_csv(out, all_rows)
    return len(seen)
