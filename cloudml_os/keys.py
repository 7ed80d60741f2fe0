"""Keys: every cluster gets an SSH keypair of its own, every local node a host key of its own, and an
installation's own secrets (key-encryption key, session-signing key) are made once and kept in its data dir."""

from __future__ import annotations

import os
import secrets
from collections.abc import Callable
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey


def generate_keypair(comment: str = "") -> tuple[str, str]:
    """A new ed25519 keypair: (OpenSSH private key text, one-line OpenSSH public key)."""
    key = Ed25519PrivateKey.generate()
    private = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
    ).decode()
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    line = public.decode()
    return private, f"{line} {comment}".strip()


def kept_secret(path: Path, make: Callable[[], str]) -> str:
    """The secret stored at ``path``, made with ``make()`` the first time (mode 0600).

    Written aside, then linked into place: a process starting at the same time (the API and a worker) never
    reads a half-written file, and the first link wins, so every process of the installation agrees on one.
    """
    if path.exists():
        return path.read_text().strip()
    path.parent.mkdir(parents=True, exist_ok=True)
    draft = path.with_name(f"{path.name}.{os.getpid()}.{secrets.token_hex(4)}")
    descriptor = os.open(draft, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(descriptor, "w") as handle:
            handle.write(make() + "\n")
        try:
            os.link(draft, path)
        except FileExistsError:
            pass
    finally:
        draft.unlink()
    return path.read_text().strip()
