"""``/v1/projects/{p}/quotas`` and ``/v1/admin/projects``: read and set per-project quotas (added endpoints).

Any role of a project reads its quotas and usage; only platform admins
(:func:`cloudml_os.auth.is_platform_admin`) change them and list every project's. The limits, the usage
and their enforcement live in :mod:`cloudml_os.quotas`; these views only authorize and shape.
"""

from __future__ import annotations

from typing import Any

from flask import g

from cloudml_os import quotas
from cloudml_os.api import ApiBlueprint, services
from cloudml_os.api.schemas import ProjectQuotasListSchema, ProjectQuotasSchema, QuotaUpdateSchema
from cloudml_os.auth import is_platform_admin
from cloudml_os.errors import InvalidArgument, PermissionDenied

blp = ApiBlueprint("quotas", __name__, url_prefix="/v1",
                   description="Per-project quotas on GPUs, nodes, concurrent jobs and serving replicas "
                               "(added endpoints; changes by platform admins).")


def _require_platform_admin(action: str) -> None:
    if not is_platform_admin(g.token, services().settings):
        raise PermissionDenied(f"only platform admins (role admin in project "
                               f"{services().settings.admin_project!r}) may {action}")


@blp.route("/projects/<project:project>/quotas", methods=["GET"])
@blp.response(200, ProjectQuotasSchema)
def get_quotas(project: str) -> dict[str, Any]:
    """The project's limits (-1: unlimited) and its usage now."""
    svc = services()
    return quotas.project_quotas(svc.store, svc.settings, project)


@blp.route("/projects/<project:project>/quotas", methods=["PATCH"])
@blp.arguments(QuotaUpdateSchema)
@blp.response(200, ProjectQuotasSchema)
def patch_quotas(body: dict[str, Any], project: str) -> dict[str, Any]:
    """Override some of the project's limits (null: back to the default). Platform admins only."""
    _require_platform_admin("change quotas")
    svc = services()
    try:
        return quotas.set_quotas(svc.store, svc.settings, project, body["quotas"])
    except ValueError as exc:
        raise InvalidArgument(f"quotas: {exc}") from None


@blp.route("/admin/projects", methods=["GET"])
@blp.response(200, ProjectQuotasListSchema)
def list_projects() -> dict[str, Any]:
    """Every project that has a token, a job, a model or a quota, with its quotas and usage."""
    _require_platform_admin("list every project")
    svc = services()
    return {"projects": quotas.all_project_quotas(svc.store, svc.settings)}
