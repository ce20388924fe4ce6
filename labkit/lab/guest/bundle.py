"""Pack the guest helper (``labkit.lab.guest.pinprobe`` plus the shared
``labkit.lab.guest.vocab``) into one stdlib-only zipapp, in memory, from the package's
own sources (read by ``files``, the one place that finds guest-side files): the
same code works from a source tree, an editable install and a wheel.

Inside the archive the modules keep their package paths, with empty
``labkit/__init__.py`` and ``labkit/lab/__init__.py`` stand-ins, so the helper's
relative imports resolve the same way in the guest as on the host.
"""

from __future__ import annotations

import functools
import hashlib
import io
import logging
import zipfile

from labkit.lab.guest import files as guest_files

log = logging.getLogger(__name__)

SHEBANG = b"#!/usr/bin/env python3\n"
MAIN = "import sys\nfrom labkit.lab.guest.pinprobe.cli import main\nsys.exit(main())\n"
STUB = '"""Stand-in package inside the guest helper zipapp."""\n'
_EPOCH = (2020, 1, 1, 0, 0, 0)        # fixed timestamps: the same sources give the same bytes


def sources() -> dict[str, str]:
    """Archive path -> source text of every module the guest helper needs."""
    files = {"__main__.py": MAIN, "labkit/__init__.py": STUB, "labkit/lab/__init__.py": STUB,
             "labkit/lab/guest/__init__.py": STUB}
    files.update({f"labkit/lab/guest/{name}": text for name, text in guest_files.pinprobe_sources().items()})
    return files


@functools.lru_cache(maxsize=1)
def build() -> bytes:
    """The zipapp: a shebang line and a zip of ``sources()`` (run as ``python3 FILE``)."""
    buf = io.BytesIO()
    buf.write(SHEBANG)
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for name, text in sorted(sources().items()):
            info = zipfile.ZipInfo(name, date_time=_EPOCH)
            info.compress_type = zipfile.ZIP_DEFLATED
            info.external_attr = 0o644 << 16
            z.writestr(info, text)
    data = buf.getvalue()
    log.debug("guest helper zipapp: %d bytes, sha256 %s", len(data), hashlib.sha256(data).hexdigest()[:12])
    return data
