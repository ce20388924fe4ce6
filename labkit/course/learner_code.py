"""What the code exercises (3.8, 6.5) share on the host: a learner's source is
checked here without being run, then sent to the guest helper on its stdin
(never as shell text or an argument) with the path of the lab's fs-dax file."""

from __future__ import annotations

import ast
from typing import Any

from labkit.lab.helper import last_json

MAX_SOURCE = 20_000
TIME_UP = "time limit exceeded"       # what the guest judges report for code that ran too long


def source_problem(answer: Any, signature: str) -> str | None:
    """Why ``answer`` cannot be run at all, or None; ``signature`` is the
    function the learner must define, e.g. ``"hold(m)"``. Only compiled here."""
    name = signature.split("(")[0]
    if not isinstance(answer, str) or not answer.strip():
        return f"give the code as a string that defines  def {signature}:"
    if len(answer) > MAX_SOURCE:
        return "the code is too long"
    try:
        tree = ast.parse(answer)
    except (SyntaxError, ValueError) as exc:
        return f"the code does not compile: {type(exc).__name__} on line {getattr(exc, 'lineno', '?')}"
    if not any(isinstance(n, ast.FunctionDef) and n.name == name for n in tree.body):
        return f"define a function  {signature}  at the top level"
    return None


def run_in_guest(lab: Any, subcommand: str, memory: str, tag: str, source: str, timeout: float,
                 *extra: str, wait: float = 60.0) -> dict[str, Any] | None:
    """Run guest helper ``subcommand`` on the lab's file of ``memory`` with
    the learner's ``source`` on stdin; its JSON answer (None if it gave none)."""
    args = lab.memory_args(memory, tag)
    path_and_dax = [a for a in args if a not in ("--memory", "file")]
    argv = lab.helper.argv(subcommand, *path_and_dax, "--timeout", str(float(timeout)), *extra)
    r = lab.vm.run(argv, timeout=timeout + wait, stdin=source)
    return last_json(r.stdout)
