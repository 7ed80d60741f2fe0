"""Encryption at rest of the secrets the database holds: each cluster's SSH private key.

A leaked database dump (a backup, a replica) must not hand out shell access to every node, so the
``clusters.private_key`` column holds a Fernet token (AES-128-CBC + HMAC-SHA256, from ``cryptography``)
made with the installation's key-encryption key. The column type does the work at the boundary, so that
every reader of a :class:`~cloudml_os.store.models.Cluster` row (ORM or Core) gets plaintext and nothing
else in the code knows. The key reaches the type through the engine's dialect, which is the Store's own
(see :meth:`cloudml_os.store.Store.__init__`): there is no module-level key.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from cryptography.fernet import Fernet, InvalidToken
from sqlalchemy import Text
from sqlalchemy.engine import Dialect
from sqlalchemy.types import TypeDecorator

from cloudml_os.keys import kept_secret

KEY_FILE = "key-encryption.key"
DIALECT_ATTRIBUTE = "cloudml_os_key_cipher"
LEGACY_PLAINTEXT = "-----BEGIN "  # keys written before encryption existed (read, never written)


class KeyDecryptionError(RuntimeError):
    """A stored key cannot be decrypted with this installation's key-encryption key (it was changed)."""


def load_key_encryption_key(configured: str, data_dir: Path) -> str:
    """The installation's key-encryption key: ``configured`` if set, else the one kept in ``data_dir``.

    The embedded default makes one on first use (:func:`cloudml_os.keys.kept_secret`, mode 0600), which the
    API and a worker starting together agree on. Processes on several hosts must share it through the setting.
    """
    if configured:
        return configured
    return kept_secret(data_dir / KEY_FILE, lambda: Fernet.generate_key().decode())


def attach_cipher(dialect: Dialect, key: str) -> None:
    """Give one engine's dialect the key its :class:`EncryptedText` columns use.

    :raises ValueError: ``key`` is not a Fernet key.
    """
    setattr(dialect, DIALECT_ATTRIBUTE, Fernet(key.encode()))


class EncryptedText(TypeDecorator):
    """Text stored as a Fernet token; the empty string (a deleted key) is stored as is."""

    impl = Text
    cache_ok = True

    def process_bind_param(self, value: Any, dialect: Dialect) -> Any:
        if not value:
            return value
        cipher = getattr(dialect, DIALECT_ATTRIBUTE, None)
        if cipher is None:  # an engine not made by a Store: refuse rather than write plaintext
            raise KeyDecryptionError("this database engine has no key-encryption key to store a key with")
        return cipher.encrypt(value.encode()).decode("ascii")

    def process_result_value(self, value: Any, dialect: Dialect) -> Any:
        cipher = getattr(dialect, DIALECT_ATTRIBUTE, None)
        if not value or value.startswith(LEGACY_PLAINTEXT) or cipher is None:
            return value  # without the key (an engine not made by a Store) the reader sees the ciphertext
        try:
            return cipher.decrypt(value.encode("ascii")).decode()
        except InvalidToken:
            raise KeyDecryptionError("a cluster's SSH key cannot be decrypted: the key_encryption_key "
                                     "setting differs from the one it was stored with") from None
