"""Reading learners' answers, in one tested place: errno names and numbers
(with aliases: ENOTSUP is 95 too), "ok" words, lists of names, integers,
function names from trace lines. Every reader returns None (or False) for
an answer it cannot read, never raises."""

from __future__ import annotations

import errno as _errno
import re
from typing import Any

Result = tuple[bool, str]


def _text(value: Any) -> str:
    return str(value).strip().lower()


def errno_number(answer: Any) -> int | None:
    """95, -95, "95", "EOPNOTSUPP", "-EOPNOTSUPP", "errno.ENOTSUP" -> 95;
    anything else (a substring of a name, a description) -> None."""
    if isinstance(answer, bool):
        return None
    if isinstance(answer, int):
        return abs(answer)
    if not isinstance(answer, str):
        return None
    s = answer.strip().lstrip("-").strip()
    if s.startswith("errno."):
        s = s[len("errno."):]
    if re.fullmatch(r"\d{1,4}", s):
        return int(s)
    if re.fullmatch(r"E[A-Z0-9]+", s.upper()) and s == s.upper() or re.fullmatch(r"e[a-z0-9]+", s):
        value = getattr(_errno, s.upper(), None)
        return value if isinstance(value, int) else None
    return None


def _is_ok_word(answer: Any) -> bool:
    return isinstance(answer, (str, int)) and not isinstance(answer, bool) and _text(answer) in (
        "ok", "0", "success", "succeeds", "allowed")


def _errno_matches(answer: Any, res) -> Result:
    """Right if the answer names the kernel's answer: 'ok' for success, or the
    errno by name (any alias) or number."""
    if res.ok:
        return _is_ok_word(answer), ""
    got = errno_number(answer)
    if got is None:
        return False, "give an errno name such as \"EPERM\" or its number"
    return got == res.errno, ""


def _as_set(value: Any) -> set[str] | None:
    """A list/tuple/set of names, or a comma/space separated string; None if
    it is not a collection of names (a blank string is not)."""
    if isinstance(value, str):
        if not value.strip():
            return None
        value = value.replace(",", " ").split()
    if not isinstance(value, (list, tuple, set, frozenset)):
        return None
    if not all(isinstance(v, str) for v in value):
        return None
    return {_text(v) for v in value}


def _int(value: Any) -> int | None:
    if isinstance(value, bool):
        return None
    if isinstance(value, float):
        return int(value) if value.is_integer() else None
    try:
        return int(str(value).strip())
    except (TypeError, ValueError):
        return None


def _name(value: Any) -> str:
    """A C identifier from an answer: 'check_vma_flags()' / 'mm/gup.c:check_vma_flags' -> 'check_vma_flags'."""
    s = _text(value)
    s = s.split(":")[-1].strip()
    return re.sub(r"\(\s*\)$", "", s).strip()


def probed_function(trace_line: str) -> str | None:
    """The function a kretprobe line reports. tracefs prints a return probe as
    ``(RETURN_ADDRESS <- PROBED_FUNCTION)`` (print_kretprobe_event):
    '(__get_user_pages+0x1a2/0x6f0 <- check_vma_flags) ret=-95' -> 'check_vma_flags'."""
    m = re.search(r"<-\s*(\w+)(?:\+0x[0-9a-f]+/0x[0-9a-f]+)?\)", trace_line)
    return m.group(1) if m else None



def _bool_answer(answer: Any) -> bool | None:
    return answer if isinstance(answer, bool) else None
