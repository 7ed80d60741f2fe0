"""What every ``cloudml`` command shares: the global options, the settings they override, the API client.

``--project``, ``--endpoint`` and ``--format`` are accepted before the command (``cloudml --project p
jobs list``) and after it (``cloudml jobs list --format json``), as gcloud's flags are; the later one
wins. :func:`command` declares a command with them; :func:`invocation` gives a command its state.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from typing import Any

import click
import requests

from cloudml_os.client.output import Format, parse_format
from cloudml_os.client.rest import ApiClient
from cloudml_os.client.settings import Settings


@dataclasses.dataclass
class Invocation:
    """One run of ``cloudml``: the global options given, and what they lead to.

    :param session: the HTTP session every API client of this run uses (a test passes one with its own
        transport adapter as Click's ``obj``); None: a new ``requests.Session`` per client.
    """

    flags: dict[str, str | None] = dataclasses.field(default_factory=dict)
    format: Format | None = None
    session: requests.Session | None = None

    def settings(self) -> Settings:
        return Settings.load(self.flags)

    def api(self, project: str | None = None) -> ApiClient:
        """The API client for the effective endpoint, credential and project (or ``project``, e.g. the one
        a ``store://PROJECT/…`` URI names)."""
        settings = self.settings()
        return ApiClient(settings.endpoint, project or settings.project, settings.token, settings.auth_type,
                         session=self.session)


def invocation() -> Invocation:
    return click.get_current_context().ensure_object(Invocation)


def _remember(name: str) -> Callable[[click.Context, click.Parameter, Any], None]:
    def callback(ctx: click.Context, param: click.Parameter, value: Any) -> None:
        if value is None:
            return
        state = ctx.ensure_object(Invocation)
        if name == "format":
            state.format = parse_format(value)
        else:
            state.flags[name] = value
    return callback


def global_options(function: Callable[..., Any]) -> Callable[..., Any]:
    """Add ``--project``, ``--endpoint`` and ``--format`` to a command or group."""
    options = [
        click.option("--project", metavar="PROJECT", expose_value=False, callback=_remember("project"),
                     help="The project (overrides CLOUDML_PROJECT and the config file)."),
        click.option("--endpoint", metavar="URL", expose_value=False, callback=_remember("endpoint"),
                     help="The API's URL, e.g. http://127.0.0.1:8080 (overrides CLOUDML_ENDPOINT and the "
                          "config file)."),
        click.option("--format", "format_", metavar="FORMAT", expose_value=False, callback=_remember("format"),
                     help="Output: json, yaml, table, none, value(field.path,…) or table(field.path,…)."),
    ]
    for option in reversed(options):
        function = option(function)
    return function


def command(group: click.Group, name: str, **kwargs: Any) -> Callable[[Callable[..., Any]], click.Command]:
    """``@group.command(name)`` with the global options."""
    def decorate(function: Callable[..., Any]) -> click.Command:
        return group.command(name, **kwargs)(global_options(function))
    return decorate


def parse_labels(text: str | None) -> dict[str, str]:
    """``k=v,k2=v2`` → a dict. :raises click.BadParameter: a pair without ``=``."""
    labels: dict[str, str] = {}
    for pair in (text or "").split(","):
        if not pair.strip():
            continue
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise click.BadParameter(f"{pair!r} is not KEY=VALUE", param_hint="--labels")
        labels[key.strip()] = value.strip()
    return labels
