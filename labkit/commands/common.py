"""What the commands share: error lines, boot progress, argument types."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from typing import Any


def err(msg: str) -> None:
    print(f"labkit: {msg}", file=sys.stderr, flush=True)


def progress_lines(quiet: bool) -> Callable[[str], None]:
    """A progress callback: ``  ... line`` on stderr, or nothing."""
    return (lambda s: None) if quiet else (lambda s: print(f"  ... {s}", file=sys.stderr, flush=True))


def boot_progress(quiet: bool = False) -> Callable[[str], None]:
    """A console-line callback that shows the learner the boot is moving."""
    start = time.monotonic()

    def show(line: str) -> None:
        if quiet:
            return
        text = line.strip()
        if len(text) > 90:
            text = text[:87] + "..."
        sys.stderr.write(f"\r\033[K  booting [{time.monotonic() - start:5.1f}s] {text}")
        sys.stderr.flush()
    return show


def end_progress(quiet: bool) -> None:
    if not quiet:
        sys.stderr.write("\r\033[K")
        sys.stderr.flush()


def number(kind: type, low: float | None = None, high: float | None = None, *, above: float | None = None,
           flag: str = "", hint: str = "", what: str = "a number") -> Callable[[str], Any]:
    """An argparse type: ``kind(text)`` within ``low..high`` (or more than
    ``above``). The one place the command line checks a number's range;
    ``flag`` names the option in the message (argparse prefixes only
    "argument --x:"), ``hint`` replaces the "use low..high" advice, ``what``
    says what the text should have been ("a port number")."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not {what}") from None
        said = f"{flag} {text}" if flag else text
        if above is not None and value <= above:
            raise argparse.ArgumentTypeError(f"{said} must be more than {above:g}")
        if (low is not None and value < low) or (high is not None and value > high):
            raise argparse.ArgumentTypeError(f"{said} is out of range ({hint or f'use {low:g}..{high:g}'})")
        return value
    parse.__name__ = kind.__name__      # argparse names the type in its own messages
    return parse


def positive(kind: type) -> Callable[[str], Any]:
    """An argparse type for a number more than 0."""
    return number(kind, above=0)


def command_words(words: list[str]) -> list[str]:
    """The guest command after an optional ``--``."""
    return words[1:] if words[:1] == ["--"] else words
