"""Run in the guest, by the guest's own Python, once after the helper zipapp is
uploaded: ``python3 -c SOURCE-OF-THIS-FILE PATH``.

Python cannot cache what it compiles from inside a zip, so without this every
helper call compiled all the helper's modules again: about 1.2 s of each call
under TCG, against 0.25 s for Python's own start. This puts a ``.pyc`` beside
each ``.py`` in the archive (zipimport reads those), compiled by the Python
that will run them (the guests' Pythons differ: 3.9, 3.11, 3.13). They are
"unchecked hash" pycs (PEP 552), so no timestamps are compared; the sources
stay in the archive for tracebacks. The file is replaced in one rename; if
anything fails the archive is left as it was (still correct, only slower).

Standard library only: it runs before anything else of labkit's is there.
"""

import importlib.util
import io
import os
import sys
import zipfile
from importlib._bootstrap_external import _code_to_hash_pyc  # type: ignore[attr-defined]


def precompiled(raw: bytes, path: str) -> bytes:
    """The archive ``raw`` (a shebang line, then a zip) with a .pyc for each module."""
    head = raw[:raw.index(b"PK\x03\x04")]
    src = zipfile.ZipFile(io.BytesIO(raw))
    out = io.BytesIO()
    out.write(head)
    with zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as z:
        for info in src.infolist():
            data = src.read(info)
            z.writestr(info, data)
            if info.filename.endswith(".py") and info.filename != "__main__.py":
                code = compile(data, f"{path}/{info.filename}", "exec", dont_inherit=True)
                pyc = zipfile.ZipInfo(info.filename + "c", date_time=info.date_time)
                pyc.external_attr = info.external_attr
                pyc.compress_type = zipfile.ZIP_DEFLATED
                z.writestr(pyc, _code_to_hash_pyc(code, importlib.util.source_hash(data), False))
    return out.getvalue()


def main(path: str) -> None:
    with open(path, "rb") as f:
        data = precompiled(f.read(), path)
    tmp = f"{path}.precompiled"
    with open(tmp, "wb") as f:
        f.write(data)
    os.chmod(tmp, 0o755)
    os.replace(tmp, path)


if __name__ == "__main__":
    main(sys.argv[1])
