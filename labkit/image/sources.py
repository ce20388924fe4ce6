"""Package sources for an image build, derived from the host's own apt
configuration with the suite changed (so no mirror host is ever written into
labkit), or taken from ``LABKIT_MIRROR`` / ``LABKIT_APT_SOURCES``.

The rewriting is pure text -> text (one-line ``.list`` and deb822
``.sources``) so it is tested without touching /etc/apt.
"""

from __future__ import annotations

import re
from pathlib import Path

from labkit.errors import HostSetupError
from labkit.image.kernels import KernelVariant
from labkit.settings import Settings

APT_DIR = Path("/etc/apt")


def rename_suite(suite: str, host_codename: str, target: str) -> str:
    """'bookworm-security' -> 'trixie-security' (host bookworm, target trixie);
    suites of other distributions ('nodistro', 'sid') are kept."""
    if suite == host_codename:
        return target
    if suite.startswith(host_codename + "-"):
        return target + suite[len(host_codename):]
    return suite


def _suites(tokens: list[str], host_codename: str, v: KernelVariant) -> list[str]:
    out: list[str] = []
    for s in tokens:
        out.append(rename_suite(s, host_codename, v.suite))
        if out[-1] == v.suite:      # the main archive: the extra suites live beside it
            out += [x for x in v.extra_suites if x not in tokens]
    return out


def derive_deb822(text: str, host_codename: str, v: KernelVariant) -> str:
    """A deb822 .sources text with every ``Suites:`` field moved to ``v``'s suites."""
    def fix(m: re.Match) -> str:
        return m.group(1) + " ".join(_suites(m.group(2).split(), host_codename, v))
    return re.sub(r"(?im)^(Suites:[ \t]*)(.*?)[ \t]*$", fix, text)


def derive_list(text: str, host_codename: str, v: KernelVariant) -> str:
    """A one-line sources.list text moved to ``v``'s suites (one line per suite)."""
    out = []
    for line in text.splitlines():
        m = re.match(r"^(\s*deb(?:-src)?\s+(?:\[[^\]]*\]\s+)?\S+\s+)(\S+)(\s.*)?$", line)
        if not m:
            out.append(line)
            continue
        out += [m.group(1) + s + (m.group(3) or "")
                for s in _suites([m.group(2)], host_codename, v)]
    return "\n".join(out) + ("\n" if text.endswith("\n") else "")


def mirror_lines(uri: str, v: KernelVariant) -> list[str]:
    """mmdebstrap MIRROR arguments for a mirror URI the user gave (LABKIT_MIRROR)."""
    suites = [v.suite, f"{v.suite}-updates", *v.extra_suites]
    return [f"deb {uri} {s} main" for s in suites]


def _active(text: str) -> bool:
    return "debian" in text and any(ln.strip() and not ln.lstrip().startswith("#")
                                    for ln in text.splitlines())


def host_source_files(apt_dir: Path = APT_DIR) -> list[Path]:
    candidates = [apt_dir / "sources.list"] + sorted((apt_dir / "sources.list.d").glob("*"))
    return [f for f in candidates if f.is_file() and f.suffix in (".list", ".sources") and _active(f.read_text())]


def os_release(path: Path = Path("/etc/os-release")) -> dict[str, str]:
    out: dict[str, str] = {}
    try:
        for line in path.read_text().splitlines():
            k, _, val = line.partition("=")
            out[k] = val.strip().strip('"')
    except OSError:
        pass
    return out


def apt_sources(v: KernelVariant, build_dir: Path, settings: Settings, apt_dir: Path = APT_DIR,
                osr: dict[str, str] | None = None) -> list[str]:
    """MIRROR arguments for mmdebstrap: the user's override (``settings.apt_sources``,
    else ``settings.mirror``), else the host's own Debian sources with the
    suite changed to ``v``'s (files written to ``build_dir``)."""
    if settings.apt_sources is not None:
        src = settings.apt_sources
        if not src.is_file():
            raise HostSetupError(f"LABKIT_APT_SOURCES={src} is not a file",
                                 hint="point it to an apt sources.list or deb822 .sources file with "
                                      + needed_suites(v))
        return [str(src)]
    if settings.mirror:
        return mirror_lines(settings.mirror, v)
    osr = os_release() if osr is None else osr
    if osr.get("ID") != "debian":
        raise HostSetupError(
            f"this host is {osr.get('PRETTY_NAME', 'not Debian')}: its apt sources are not Debian's",
            hint="set LABKIT_MIRROR to a Debian mirror URI, or LABKIT_APT_SOURCES to a sources file "
                 "with " + needed_suites(v))
    codename = osr.get("VERSION_CODENAME", v.suite)
    found = []
    for i, f in enumerate(host_source_files(apt_dir)):
        derive = derive_deb822 if f.suffix == ".sources" else derive_list
        out = build_dir / f"apt-{i:02d}{f.suffix}"
        out.write_text(derive(f.read_text(), codename, v))
        found.append(str(out))
    if not found:
        raise HostSetupError(f"no Debian apt sources found in {apt_dir}",
                             hint="set LABKIT_MIRROR to a Debian mirror URI")
    return found


def needed_suites(v: KernelVariant) -> str:
    names = [v.suite, f"{v.suite}-updates", f"{v.suite}-security", *v.extra_suites]
    return ", ".join(names)
