"""Validate HOT stacks with Heat's own engine code, in-process and without a cloud.

Run with the OpenStack services' python (``services.ensure_services_venv()``); reads a JSON list of
``{"template": dict or YAML text, "files": {name: text}, "parameters": {name: value}}`` on stdin and
prints one JSON list of ``{"valid": bool, "error": str | null, "seconds": float}`` in the same order.

Each stack goes through what heat-engine's stack-create does before it touches a cloud: the template's
sections, parameters and conditions, every resource's property schema and values (with nested stacks:
each ResourceGroup's member and each template resource), get_attr/get_resource targets, outputs. What
needs a cloud is skipped, and only that: the custom constraints that look a name up through a client
(nova.flavor, glance.image, neutron.network…) become no-ops, and Heat's ``cloud_backend`` hook is given
:class:`OfflineClients`, which answers the few client questions resource validation asks (is the service
there, which microversion, does this image exist) the way a current cloud with every service would.
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from typing import Any

from heat.common import context, exception, messaging, template_format
from heat.engine import clients, constraints, environment, resources, template
from heat.engine import stack as parser
from oslo_config import cfg

CLIENT_CONSTRAINT_MODULES = "heat.engine.clients."


class NotLookedUp(Exception):
    """What an offline lookup raises; client plugins treat it as 'not found', as for a resource made later."""


class OfflinePlugin:
    """Heat's client plugin for one service, with the calls validation makes answered without a cloud.

    Constants and pure helpers (``RES_TYPE_NETWORK``…) come from the real plugin. The answers below are
    those of a current cloud that has every service; image and flavor lookups raise :class:`NotLookedUp`,
    which the plugin reports as not found, the case Heat accepts for resources made later. Any other call
    reaches the real plugin, which has no credentials and fails loudly, so a new lookup shows up at once.
    """

    # No service types: ``Resource.is_service_available`` then takes the service as present.
    service_types: list[str] = []

    def __init__(self, plugin: Any) -> None:
        self._plugin = plugin

    def __getattr__(self, name: str) -> Any:
        return getattr(self._plugin, name)

    def is_version_supported(self, version: str) -> bool:
        return True

    def has_extension(self, alias: str) -> bool:
        return True

    def is_not_found(self, error: Exception) -> bool:
        return isinstance(error, NotLookedUp) or self._plugin.is_not_found(error)

    def get_image(self, image: str) -> Any:
        raise NotLookedUp(image)

    def get_flavor(self, flavor: str) -> Any:
        raise NotLookedUp(flavor)


class OfflineClients(clients.OpenStackClients):
    """A Heat ``cloud_backend`` whose client plugins are :class:`OfflinePlugin` (see the module docstring)."""

    def __init__(self, request_context: context.RequestContext) -> None:
        super().__init__(request_context)
        self._offline: dict[str, OfflinePlugin] = {}

    def client_plugin(self, name: str) -> OfflinePlugin | None:
        if name not in self._offline:
            plugin = super().client_plugin(name)
            if plugin is None:
                return None
            self._offline[name] = OfflinePlugin(plugin)
        return self._offline[name]

    def client(self, name: str, version: str | None = None) -> Any:
        raise NotLookedUp(f"no {name} client while validating offline")


class SkippedLookup(constraints.BaseCustomConstraint):
    """Stands in for a custom constraint that would look the value up in the cloud."""

    def validate(self, value: Any, context: Any, template: Any = None) -> bool:
        return True


def setup_heat() -> list[str]:
    """Initialise Heat's engine code once; return the custom constraints that were made no-ops."""
    cfg.CONF([], project="heat", default_config_files=[])
    cfg.CONF.set_override("cloud_backend", f"{__name__}.OfflineClients")
    # Counting a stack's resources against the limit reads Heat's database; there is none here.
    cfg.CONF.set_override("max_resources_per_stack", -1)
    messaging.setup("fake://")
    resources.initialise()
    clients.initialise()
    registered = resources.global_env().constraints
    skipped = sorted(name for name, constraint in registered.items()
                     if constraint.__module__.startswith(CLIENT_CONSTRAINT_MODULES))
    for name in skipped:
        resources.global_env().register_constraint(name, SkippedLookup)
    return skipped


def validate_stack(request: dict[str, Any]) -> dict[str, Any]:
    """Validate one ``{template, files, parameters}`` the way stack-create does before it creates anything."""
    started = time.perf_counter()
    try:
        body = request["template"]
        if isinstance(body, str):
            body = template_format.parse(body)
        env = environment.Environment({"parameters": request.get("parameters", {})})
        tmpl = template.Template(body, files=request.get("files", {}), env=env)
        request_context = context.RequestContext(user_id="validator", project_id="validator", is_admin=True)
        stack = parser.Stack(request_context, "validate", tmpl, strict_validate=True)
        stack.validate()
    except exception.HeatException as error:
        return {"valid": False, "error": str(error), "seconds": time.perf_counter() - started}
    except Exception as error:  # Heat lets some property errors through unwrapped (ValueError, TypeError)
        traceback.print_exc(file=sys.stderr)
        return {"valid": False, "error": f"{type(error).__name__}: {error}", "seconds": time.perf_counter() - started}
    return {"valid": True, "error": None, "seconds": time.perf_counter() - started}


def main() -> int:
    requests = json.load(sys.stdin)
    skipped = setup_heat()
    print(f"lookups skipped (custom constraints): {', '.join(skipped)}", file=sys.stderr)
    json.dump([validate_stack(request) for request in requests], sys.stdout)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
