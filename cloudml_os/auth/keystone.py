"""Keystone authentication for OpenStack mode: keystonemiddleware's auth_token in front of the API.

The middleware validates the ``X-Auth-Token`` of every request against Keystone (with the account of
clouds.yaml entry ``openstack_auth_cloud``, which needs Keystone's ``service`` role to validate others' tokens)
and sets the ``X-Project-*`` and ``X-Roles`` headers, after removing any the client sent itself. The
API's project path segment is the Keystone project's *name* (``/v1/projects/team-a/jobs``), so that paths
read as in Cloud ML Engine; Keystone roles map onto the platform's roles: ``admin`` → admin,
``member`` → member, ``reader`` → viewer. The same :func:`cloudml_os.auth.authorize` rule then applies,
platform admins included: the ``admin`` role on the Keystone project named by setting ``admin_project``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

from cloudml_os.config import Settings
from cloudml_os.errors import Unauthenticated

# Keystone role → platform role, strongest first.
ROLE_MAP = (("admin", "admin"), ("member", "member"), ("reader", "viewer"))


@dataclasses.dataclass(frozen=True)
class KeystoneCaller:
    """Who a Keystone token names: its project (by name) and the platform role its Keystone roles give."""

    project: str
    role: str
    user: str


def keystone_middleware(app: Any, settings: Settings) -> Any:
    """Wrap a WSGI app in keystonemiddleware's auth_token, configured from the service account's cloud.

    ``delay_auth_decision`` lets the public endpoints (health, OpenAPI) through; every other request is
    refused by :func:`caller_from_headers` unless the middleware confirmed its token. A token may come as
    ``X-Auth-Token`` or, as Cloud ML Engine clients send it, ``Authorization: Bearer``.
    """
    from keystonemiddleware.auth_token import AuthProtocol

    from cloudml_os.cloud.openstack import service_account

    account = service_account(settings.openstack_auth_cloud or settings.openstack_cloud)
    conf = {
        "delay_auth_decision": True,
        "www_authenticate_uri": account["auth"].get("auth_url"),
        "interface": account["interface"],
        "region_name": account["region_name"],
        "auth_type": account["auth_type"],
        "log_name": "cloudml_os.keystone",
        **account["auth"],
    }
    protocol = AuthProtocol(app, {key: value for key, value in conf.items() if value is not None})

    def accept_bearer(environ: dict[str, Any], start_response: Any) -> Any:
        # Cloud ML Engine clients send "Authorization: Bearer TOKEN"; Keystone's header is X-Auth-Token.
        authorization = environ.get("HTTP_AUTHORIZATION", "")
        if "HTTP_X_AUTH_TOKEN" not in environ and authorization[:7].lower() == "bearer ":
            environ["HTTP_X_AUTH_TOKEN"] = authorization[7:].strip()
        return protocol(environ, start_response)

    return accept_bearer


def caller_from_headers(headers: Mapping[str, str]) -> KeystoneCaller:
    """The caller keystonemiddleware confirmed; :raises Unauthenticated: when it confirmed none."""
    if headers.get("X-Identity-Status") != "Confirmed" or headers.get("X-Service-Identity-Status") == "Invalid":
        raise Unauthenticated("Request had invalid or missing authentication credentials: "
                              "send a Keystone token in 'X-Auth-Token'.")
    project = headers.get("X-Project-Name")
    if not project:
        raise Unauthenticated("The Keystone token is not scoped to a project.")
    roles = {role.strip().lower() for role in headers.get("X-Roles", "").split(",")}
    role = next((ours for theirs, ours in ROLE_MAP if theirs in roles), "")
    return KeystoneCaller(project=project, role=role, user=headers.get("X-User-Name", ""))
