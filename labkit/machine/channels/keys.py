"""Per-VM SSH keys: an ed25519 client key made at VM creation (mode 0600) and
the guest's host key, pinned from the (private) serial console at first boot."""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def ensure_client_key(path: Path) -> str:
    """Create ``path`` (private key, 0600) and ``path.pub`` if missing; return
    the public key's base64 blob (what goes on the guest kernel command line)."""
    if not path.exists():
        key = Ed25519PrivateKey.generate()
        pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
                                serialization.NoEncryption())
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as f:
            f.write(pem)
        pub = key.public_key().public_bytes(serialization.Encoding.OpenSSH,
                                            serialization.PublicFormat.OpenSSH)
        path.with_suffix(".pub").write_bytes(pub + b" labkit\n")
    os.chmod(path, 0o600)
    return path.with_suffix(".pub").read_text().split()[1]

