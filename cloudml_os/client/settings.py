"""The user's ``cloudml`` settings: a JSON file in the user's config folder, environment overrides, flags.

Where a value comes from, strongest first: a global flag (``--project``, ``--endpoint``), the environment
(``CLOUDML_PROJECT``, ``CLOUDML_ENDPOINT``, ``CLOUDML_TOKEN``), the file. The file is
``click.get_app_dir("cloudml")/config.json`` unless ``CLOUDML_CONFIG`` names another. It holds the API
token, so it is always written with mode 0600 (replaced atomically, never left world-readable half way)
in a folder of mode 0700. This module reads and writes settings; it never prints a token.
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Mapping
from pathlib import Path

import click

from cloudml_os.client.rest import CliError

KEYS = ("endpoint", "project", "token", "auth_url", "auth_type")
AUTH_TYPES = ("local", "keystone")
DEFAULT_ENDPOINT = "http://127.0.0.1:8080"
ENVIRONMENT = {"endpoint": "CLOUDML_ENDPOINT", "project": "CLOUDML_PROJECT", "token": "CLOUDML_TOKEN"}


class SettingsError(CliError):
    """The settings file is unreadable, or a value is not valid for its key."""


def config_path(environ: Mapping[str, str] | None = None) -> Path:
    """The settings file: ``CLOUDML_CONFIG`` if set, else ``config.json`` in the user's config folder."""
    environ = os.environ if environ is None else environ
    if environ.get("CLOUDML_CONFIG"):
        return Path(environ["CLOUDML_CONFIG"]).expanduser()
    return Path(click.get_app_dir("cloudml")) / "config.json"


def read_file(path: Path) -> dict[str, str]:
    """The settings stored in ``path`` ({} when it does not exist). :raises SettingsError: unreadable."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        raise SettingsError(f"cannot read the settings file {path}: {exc}") from None
    if not isinstance(data, dict):
        raise SettingsError(f"the settings file {path} does not hold a JSON object")
    return {key: str(value) for key, value in data.items() if key in KEYS and value is not None}


def write_file(path: Path, values: Mapping[str, str]) -> None:
    """Replace ``path`` with ``values``: written to a 0600 file beside it, then renamed over it.

    :raises SettingsError: the file cannot be written.
    """
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(descriptor, "w") as handle:
            json.dump(dict(sorted(values.items())), handle, indent=2)
            handle.write("\n")
        os.chmod(temporary, 0o600)  # os.open's mode is filtered by the umask; the file must be 0600 anyway
        os.replace(temporary, path)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise SettingsError(f"cannot write the settings file {path}: {exc}") from None


def check_value(key: str, value: str) -> str:
    """``value`` made canonical for ``key``. :raises SettingsError: not a valid value."""
    if key not in KEYS:
        raise SettingsError(f"unknown setting {key!r}; settings are {', '.join(KEYS)}")
    value = value.strip()
    if not value:
        raise SettingsError(f"{key}: give a value (or use `cloudml config unset {key}`)")
    if key in ("endpoint", "auth_url"):
        if not value.startswith(("http://", "https://")):
            raise SettingsError(f"{key}: must be an http:// or https:// URL, not {value!r}")
        value = value.rstrip("/")
        if key == "endpoint" and value.endswith("/v1"):
            value = value[: -len("/v1")]
    if key == "auth_type" and value not in AUTH_TYPES:
        raise SettingsError(f"auth_type: must be one of {', '.join(AUTH_TYPES)}, not {value!r}")
    return value


@dataclasses.dataclass
class Settings:
    """The effective settings, and where each came from (``file``, an environment variable, ``flag``)."""

    values: dict[str, str]
    sources: dict[str, str]
    path: Path

    @classmethod
    def load(cls, flags: Mapping[str, str | None] | None = None,
             environ: Mapping[str, str] | None = None) -> Settings:
        environ = os.environ if environ is None else environ
        path = config_path(environ)
        values = read_file(path)
        sources = dict.fromkeys(values, "file")
        for key, variable in ENVIRONMENT.items():
            if environ.get(variable):
                values[key], sources[key] = check_value(key, environ[variable]), variable
        for key, value in (flags or {}).items():
            if value is not None:
                values[key], sources[key] = check_value(key, value), "flag"
        return cls(values, sources, path)

    @property
    def endpoint(self) -> str:
        return self.values.get("endpoint", DEFAULT_ENDPOINT)

    @property
    def project(self) -> str | None:
        return self.values.get("project")

    @property
    def token(self) -> str | None:
        return self.values.get("token")

    @property
    def auth_type(self) -> str:
        return self.values.get("auth_type", "local")

    @property
    def auth_url(self) -> str | None:
        return self.values.get("auth_url")
