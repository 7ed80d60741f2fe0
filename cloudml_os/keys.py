"""SSH key generation: every cluster gets a keypair of its own, every local node a host key of its own."""

from __future__ import annotations

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
