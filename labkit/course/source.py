"""Read the running kernel's source: find a function, show it with line
numbers, and mark the lines that match what the lab measured.

The text comes from Debian's ``linux-source-X.Y`` of exactly the guest's
kernel (``labkit.image.kernelsrc``). Finding a function is plain text work over
kernel coding style (a definition starts in column 0, its body opens with a
``{`` line and ends at the matching brace), which is all a reader needs here;
nothing is compiled. Which line to mark comes from the live measurement: a
kretprobe that saw ``ret=-95`` marks every ``return -EOPNOTSUPP;`` of the
probed function (there can be more than one: the learner tells them apart).

    src = source.for_lab(lab)
    listing = src.function("check_vma_flags")
    source.show(listing, mark=listing.returning(-95))
"""

from __future__ import annotations

import errno
import html
import re
from dataclasses import dataclass, field
from pathlib import Path

from labkit.errors import LabError
from labkit.settings import from_environment


class SourceNotFound(LabError):
    """A function or file the learner asked for is not in this kernel's source."""

    def __init__(self, what: str, release: str, hint: str = "") -> None:
        super().__init__(f"{what} is not in the source of {release}")
        self.what = what
        self.release = release
        self.hint = hint


# a definition's first line: starts in column 0, names the function before its "("
_DEF = r"^(?![\s#/*}}])(?:[^;=(]*?[\s*])?{name}\s*\("


def _strip_noise(line: str) -> str:
    """The line without string/char literals and comments (for brace counting)."""
    line = re.sub(r'"(?:\\.|[^"\\])*"', '""', line)
    line = re.sub(r"'(?:\\.|[^'\\])*'", "''", line)
    line = re.sub(r"/\*.*?\*/", "", line)
    return line.split("//", 1)[0]


def _span_at(lines: list[str], i: int) -> tuple[int, int] | None:
    """(first, last) 0-based lines of the definition whose name is on line ``i``,
    or None when that line starts a prototype or a declaration instead. The
    span starts at the return type when it sits on the line above."""
    j = i
    while j < len(lines) and lines[j].rstrip() != "{":   # the body's opening brace
        if _strip_noise(lines[j]).rstrip().endswith((";", "}")) or (j > i and not lines[j][:1].isspace()):
            return None                                  # a prototype, a macro use, a struct
        j += 1
    if j >= len(lines):
        return None
    depth, k, in_comment = 0, j, False
    for k in range(j, len(lines)):
        text = lines[k]
        if in_comment:
            if "*/" not in text:
                continue
            text, in_comment = text.split("*/", 1)[1], False
        text = _strip_noise(text)
        if "/*" in text:
            text, in_comment = text.split("/*", 1)[0], True
        depth += text.count("{") - text.count("}")
        if depth == 0:
            break
    first = i
    prev = lines[i - 1].rstrip() if i else ""
    if prev and not prev.endswith((";", "}", "*/", ")")) and not prev.startswith(("#", " ", "\t", "/")):
        first = i - 1        # "static struct page *" above "follow_page_mask(...)"
    return first, k


def function_span(lines: list[str], name: str) -> tuple[int, int] | None:
    """(first, last) 0-based line indexes of ``name``'s definition, or None."""
    pat = re.compile(_DEF.format(name=re.escape(name)))
    for i, line in enumerate(lines):
        if pat.match(line):
            span = _span_at(lines, i)
            if span:
                return span
    return None


_KEYWORDS = {"if", "for", "while", "switch", "return", "sizeof"}


def defined_functions(lines: list[str]) -> list[tuple[int, int, str]]:
    """(first, last, name) of every function definition in a file, in order."""
    out = []
    for i, line in enumerate(lines):
        if not line.strip() or line.startswith(("{", " ", "\t", "#", "/", "}")):
            continue
        m = re.match(r"^(?:[^;=(]*?[\s*])?(\w+)\s*\(", line)
        if m and m.group(1) not in _KEYWORDS:
            span = _span_at(lines, i)
            if span:
                out.append((span[0], span[1], m.group(1)))
    return out


@dataclass(frozen=True)
class Listing:
    """One function's source: its file, first line number (1-based) and text."""

    path: str
    name: str
    start: int
    lines: tuple[str, ...]
    release: str = ""

    @property
    def end(self) -> int:
        return self.start + len(self.lines) - 1

    def matching(self, pattern: str) -> list[int]:
        """Line numbers (1-based, as in the file) whose text matches ``pattern``."""
        rx = re.compile(pattern)
        return [self.start + i for i, ln in enumerate(self.lines) if rx.search(ln)]

    def returning(self, retval: int) -> list[int]:
        """Lines that return the errno a kretprobe saw (``-95`` -> every
        ``return -EOPNOTSUPP;`` and ``return -ENOTSUP;``, and every
        ``rc = -EOPNOTSUPP;`` that a ``goto out`` returns, the shape of 5.10's
        __gup_longterm_locked() and get_vaddr_frames()): the candidates for
        the line the probe caught."""
        if retval >= 0:
            return self.matching(rf"\breturn\s+{retval}\s*;")
        names = sorted(n for n in dir(errno) if n.startswith("E") and getattr(errno, n) == -retval)
        if not names:
            return []
        alternatives = "|".join(names)
        return self.matching(rf"(?:\breturn\s+|\b\w+\s*=\s*)-(?:{alternatives})\s*;")

    def text(self, mark: list[int] | None = None) -> str:
        marked = set(mark or ())
        width = len(str(self.end))
        return "\n".join(f"{'>' if self.start + i in marked else ' '} {self.start + i:>{width}}  {ln}"
                         for i, ln in enumerate(self.lines))

    def html(self, mark: list[int] | None = None, note: str = "") -> str:
        """The listing as HTML: line numbers, marked lines highlighted, a caption."""
        marked = set(mark or ())
        rows = []
        for i, ln in enumerate(self.lines):
            n = self.start + i
            style = ' style="background:#fff3b0;font-weight:bold"' if n in marked else ""
            rows.append(f'<span{style}><span style="color:#888">{n:>5}</span>  '
                        f"{html.escape(ln.expandtabs(8))}</span>")
        cap = f"{html.escape(self.path)}:{self.start}-{self.end}"
        if self.release:
            cap += f" (Linux {html.escape(self.release)})"
        if note:
            cap += f" - {html.escape(note)}"
        return (f'<div class="labkit-source"><div style="font-family:sans-serif;font-size:90%">{cap}</div>'
                f'<pre style="line-height:1.25;font-size:85%">' + "\n".join(rows) + "</pre></div>")

    def __str__(self) -> str:
        return self.text()


@dataclass
class KernelSource:
    """The course's files of one kernel's source tree (see kernelsrc.FILES)."""

    root: Path
    release: str = ""
    _cache: dict[str, list[str]] = field(default_factory=dict, repr=False)

    def files(self) -> list[str]:
        return sorted(str(p.relative_to(self.root)) for p in self.root.rglob("*.[ch]"))

    def lines(self, path: str) -> list[str]:
        if path not in self._cache:
            f = self.root / path
            if not f.is_file():
                raise SourceNotFound(path, self.release, hint="files here: " + ", ".join(self.files()))
            self._cache[path] = f.read_text(errors="replace").splitlines()
        return self._cache[path]

    def function(self, name: str, path: str | None = None) -> Listing:
        """The definition of ``name`` (searched in ``path``, else in every file)."""
        if not re.fullmatch(r"\w+", name or ""):
            raise SourceNotFound(repr(name), self.release, hint="give a C function name, e.g. check_vma_flags")
        for p in [path] if path else self.files():
            lines = self.lines(p)
            span = function_span(lines, name)
            if span:
                a, b = span
                return Listing(p, name, a + 1, tuple(lines[a:b + 1]), self.release)
        raise SourceNotFound(f"function {name}()", self.release,
                             hint="it may have another name in this version: search for it with "
                                  "`labkit source --grep REGEX` (src.grep(REGEX) in a notebook)")

    def grep(self, pattern: str, path: str | None = None) -> list[tuple[str, int, str, str]]:
        """(file, line number, enclosing function or '', text) of each match."""
        rx = re.compile(pattern)
        hits = []
        for p in [path] if path else self.files():
            lines = self.lines(p)
            defs = defined_functions(lines)
            for i, ln in enumerate(lines):
                if rx.search(ln):
                    inside = next((n for a, b, n in defs if a <= i <= b), "")
                    hits.append((p, i + 1, inside, ln.strip()))
        return hits


def for_kernel(kernel: str, progress=None) -> KernelSource:
    """The source of the built ``kernel`` image's exact kernel (fetched once)."""
    from labkit.image import build, kernelsrc
    img = build.load_image(kernel, verify=False)
    root = kernelsrc.fetch(kernel, img.manifest, progress=progress)
    return KernelSource(root, img.kernel_release)


def for_lab(lab, progress=None) -> KernelSource:
    """The source of the kernel the lab's guest is running now (by ``uname -r``)."""
    from labkit.image.kernels import VARIANTS
    release = lab.sh("uname -r").stdout.strip()
    given = from_environment().kernel_source   # LABKIT_KERNEL_SOURCE: set by the grader's sandbox (no network)
    if given:
        root = given
        if root.name != release:
            raise SourceNotFound(f"the source of {release}", release,
                                 hint=f"LABKIT_KERNEL_SOURCE={given} holds {root.name}'s source")
        return KernelSource(root, release)
    kernel = next((v.name for v in VARIANTS if v.release_matches(release)), None)
    if kernel is None:
        raise SourceNotFound(f"a labkit image for {release}", release,
                             hint="the guest runs a kernel labkit did not build")
    src = for_kernel(kernel, progress=progress)
    if src.release != release:
        raise SourceNotFound(f"the source of {release}", release,
                             hint=f"the {kernel} image was rebuilt with {src.release}: restart the VM")
    return src


def show(listing: Listing, mark: list[int] | None = None, note: str = "") -> None:
    """Display a listing in the notebook (plain text elsewhere)."""
    from IPython.display import HTML, display
    display(HTML(listing.html(mark, note)))


def caught(trace_line: str) -> tuple[str, int] | None:
    """(function, return value) of a kretprobe trace line
    ``(... <- check_vma_flags) ret=-95``, or None."""
    m = re.search(r"<-\s*(\w+)(?:\+0x[0-9a-f]+/0x[0-9a-f]+)?\).*?=(-?\d+)", trace_line)
    return (m.group(1), int(m.group(2))) if m else None


def show_refusal(lab, result, progress=print) -> Listing:
    """Show the function a refused pin was caught in, from the running kernel's
    source, with the lines returning the traced value marked; returns the listing."""
    hit = next((c for c in map(caught, getattr(result, "trace", []) or []) if c), None)
    if hit is None:
        raise SourceNotFound("a traced refusal", getattr(result, "memory", "?"),
                             hint="pass a result that was refused and traced (r.ok is False, r.trace is not empty)")
    src = for_lab(lab, progress=progress)
    listing = src.function(hit[0])
    show(listing, mark=listing.returning(hit[1]), note=f"marked: the lines returning {hit[1]}, the value traced")
    return listing
