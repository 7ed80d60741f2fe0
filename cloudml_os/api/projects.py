"""``/v1/projects/{p}:getConfig``: what this installation offers a project.

v1 answers with the service account; we add the runtime catalogue (framework × runtimeVersion, from the
installed framework plugins), the machine types with the flavors they map to, so a client can build
a valid ``trainingInput`` without reading the operator's configuration, and the project's quotas and usage.
"""

from __future__ import annotations

from typing import Any

from cloudml_os import quotas
from cloudml_os.api import ApiBlueprint, services
from cloudml_os.api.schemas import ProjectConfigSchema

blp = ApiBlueprint("projects", __name__, url_prefix="/v1",
                   description="Project configuration: runtimes and machine types (added to v1's getConfig).")


@blp.route("/projects/<project:project>:getConfig", methods=["GET"])
@blp.response(200, ProjectConfigSchema)
def get_config(project: str) -> dict[str, Any]:
    """The runtimes and machine types jobs of this project can use, and its quotas and usage."""
    svc = services()
    runtimes = [
        {"framework": name, "runtimeVersion": version, "default": version == framework.default_runtime_version}
        for name, framework in sorted(svc.frameworks.items())
        for version in sorted(framework.runtimes)
    ]
    machine_types = [{"name": m.name, "flavor": m.flavor, "gpus": m.gpus}
                     for m in sorted(svc.settings.machine_types.values(), key=lambda m: m.name)]
    return {"serviceAccount": "", "serviceAccountProject": project, "config": {},
            "runtimes": runtimes, "machineTypes": machine_types,
            "quotas": quotas.project_quotas(svc.store, svc.settings, project)}
