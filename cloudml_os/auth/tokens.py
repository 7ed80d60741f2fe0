"""Local API tokens: created by ``cloudml-os token create``, presented as ``Authorization: Bearer``.

Only the SHA-256 of a token is stored, so a leaked database does not leak usable credentials; the
token itself is shown once, when it is created. Tokens are long random strings, so a plain hash (no
salt, no slow KDF) is enough and lets a request be checked with one indexed lookup.
"""

from __future__ import annotations

import hashlib
import re
import secrets

from cloudml_os.artifacts import PROJECT_ID_PATTERN
from cloudml_os.auth import ROLES
from cloudml_os.cache import TtlCache
from cloudml_os.errors import Unauthenticated
from cloudml_os.store import Store, Token

TOKEN_PREFIX = "cmlos_"
PROJECT_ID = re.compile(PROJECT_ID_PATTERN)


def hash_token(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def create_token(store: Store, project: str, role: str, description: str = "") -> str:
    """Make a token for ``project`` with ``role``, store its hash, and return the token (shown once).

    :raises ValueError: the project id or the role is invalid.
    """
    if not PROJECT_ID.fullmatch(project):
        raise ValueError(f"project id {project!r} must match [a-z][a-z0-9-]{{0,61}}")
    if role not in ROLES:
        raise ValueError(f"role {role!r} is not one of {', '.join(ROLES)}")
    if len(description) > 255:
        raise ValueError("description must be at most 255 characters")
    token = TOKEN_PREFIX + secrets.token_urlsafe(32)
    store.add(Token(token_hash=hash_token(token), project=project, role=role, description=description))
    return token


def token_from_header(store: Store, authorization: str | None, lookups: TtlCache | None = None) -> Token:
    """The stored token an ``Authorization: Bearer …`` header names (found in ``lookups`` when given: a
    token revoked elsewhere is refused once the cache's ttl has passed).

    :raises Unauthenticated: the header is missing, not a bearer token, or names no stored token.
    """
    if not authorization:
        raise Unauthenticated("Request is missing required authentication credential: "
                              "send 'Authorization: Bearer <token>'.")
    scheme, _, credential = authorization.strip().partition(" ")
    credential = credential.strip()
    if scheme.lower() != "bearer" or not credential:
        raise Unauthenticated("Authorization header must be 'Bearer <token>'.")
    token_hash = hash_token(credential)
    if lookups is None:
        token = store.token_by_hash(token_hash)
    else:
        token = lookups.get(("token", token_hash), lambda: store.token_by_hash(token_hash))
    if token is None:
        raise Unauthenticated("Request had invalid authentication credentials.")
    return token
