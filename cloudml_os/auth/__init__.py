"""Who may do what: the roles of a project token and the one rule that decides what each may do.

A token belongs to one project and has one role. ``viewer`` reads, ``member`` and ``admin`` also
change things (submit, cancel, upload). The rule lives in :func:`role_allows` alone so that the API
and the dashboard cannot drift apart; :func:`is_platform_admin` names the callers above every project.
This package never reads a request body or touches jobs.
"""

from __future__ import annotations

from typing import Protocol

from cloudml_os.config import Settings
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


def is_platform_admin(caller: Caller, settings: Settings) -> bool:
    """Whether ``caller`` administers the whole platform: the ``admin`` role in ``settings.admin_project``.

    As in OpenStack, where the admin role on the cloud's admin project is cloud-wide, this is the only
    path to other projects' resources and to quotas; an ``admin`` of any other project is admin of that
    project alone.
    """
    return caller.project == settings.admin_project and caller.role == "admin"


def authorize(token: Caller, project: str, method: str, resource: str, settings: Settings) -> None:
    """Check that ``token`` may use ``method`` on ``resource`` of ``project``.

    Another project's resource answers 404 exactly like a missing one, so that a token cannot probe
    which projects or jobs exist elsewhere. Platform admins (:func:`is_platform_admin`) may do
    everything in every project.

    :raises NotFound: the token is for another project.
    :raises PermissionDenied: the token's role may not make this request.
    """
    if is_platform_admin(token, settings):
        return
    if token.project != project:
        raise NotFound(f"{resource} not found")
    if not role_allows(token.role, write=is_write(method)):
        raise PermissionDenied(f"role {token.role!r} may not {method.upper()} {resource}")
