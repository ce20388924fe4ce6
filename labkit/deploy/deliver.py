"""Put the course's notebooks into a learner's home on their spawn, never
over their work: every file of the release that the learner does not have
yet is copied; a file they have (edited or not) is left as it is, and so is
anything that is not a plain file or directory on either side.

The hub runs it *as the learner* (``runuser -u NAME -- python -m
labkit.deploy.deliver SRC DEST``), so nothing is written into a home with
root's rights: a learner's symlink cannot redirect it anywhere they could
not write themselves.

    python -m labkit.deploy.deliver /opt/labkit/notebooks ~/notebooks
"""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path


def deliver(src: Path, dest: Path) -> list[Path]:
    """Copy what ``dest`` lacks of ``src``; returns the files copied."""
    copied: list[Path] = []
    if dest.is_symlink() or (dest.exists() and not dest.is_dir()):
        return copied                    # not ours to touch
    dest.mkdir(mode=0o700, exist_ok=True)
    for root, dirs, files in os.walk(src):
        rel = Path(root).relative_to(src)
        target_dir = dest / rel
        if target_dir.is_symlink() or (target_dir.exists() and not target_dir.is_dir()):
            dirs[:] = []
            continue
        target_dir.mkdir(mode=0o700, exist_ok=True)
        dirs[:] = [d for d in dirs if not d.startswith(".") and not (Path(root) / d).is_symlink()]
        for name in files:
            s, d = Path(root) / name, target_dir / name
            if name.startswith(".") or s.is_symlink() or os.path.lexists(d):
                continue
            shutil.copyfile(s, d, follow_symlinks=False)
            copied.append(d)
    return copied


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 2:
        print("usage: python -m labkit.deploy.deliver SRC DEST", file=sys.stderr)
        return 2
    src, dest = Path(args[0]), Path(args[1]).expanduser()
    if not src.is_dir():
        print(f"deliver: {src} is not a directory of notebooks", file=sys.stderr)
        return 2
    copied = deliver(src, dest)
    print(f"deliver: {len(copied)} new file(s) in {dest}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
