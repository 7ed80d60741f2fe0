"""Who may do what: the roles of a project token and the one rule that decides what each may do.

A token belongs to one project and has one role. ``viewer`` reads, ``member`` and ``admin`` also
change things (submit, cancel, upload). The rule lives in :func:`role_allows` alone so that the API
and the dashboard cannot drift apart. This package never reads a request body or touches jobs.
"""

from __future__ import annotations

from typing import Protocol

from cloudml_os.errors import NotFound, PermissionDenied

ROLES = ("admin", "member", "viewer")
WRITE_ROLES = frozenset({"admin", "member"})
READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def is_write(method: str) -> bool:
    """Whether an HTTP method changes state (everything but GET, HEAD and OPTIONS)."""
    return method.upper() not in READ_METHODS


def role_allows(role: str, *, write: bool) -> bool:
    """Whether ``role`` may read (``write=False``) or change (``write=True``) its project's resources."""
    if role not in ROLES:
        return False
    return not write or role in WRITE_ROLES


class Caller(Protocol):
    """Who makes a request: a local token (:class:`cloudml_os.store.Token`) or a Keystone caller."""

    project: str
    role: str


def authorize(token: Caller, project: str, method: str, resource: str) -> None:
    """Check that ``token`` may use ``method`` on ``resource`` of ``project``.

    Another project's resource answers 404 exactly like a missing one, so that a token cannot probe
    which projects or jobs exist elsewhere.

    :raises NotFound: the token is for another project.
    :raises PermissionDenied: the token's role may not make this request.
    """
    if token.project != project:
        raise NotFound(f"{resource} not found")
    if not role_allows(token.role, write=is_write(method)):
        raise PermissionDenied(f"role {token.role!r} may not {method.upper()} {resource}")
