"""Running ``cloudml`` in tests: in-process with Click's CliRunner, or the installed command for real."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner, Result

from cloudml_os.client.main import cli

# The console script pip installed next to this interpreter (.venv/bin/cloudml).
CLOUDML = Path(sys.executable).parent / "cloudml"
VARIABLES = ("CLOUDML_CONFIG", "CLOUDML_ENDPOINT", "CLOUDML_PROJECT", "CLOUDML_TOKEN")


def cli_env(config: Path, **variables: str) -> dict[str, str | None]:
    """CliRunner's environment: the settings file ``config``, no stray CLOUDML_* of the caller's shell."""
    env: dict[str, str | None] = dict.fromkeys(VARIABLES)
    env["CLOUDML_CONFIG"] = str(config)
    env.update({f"CLOUDML_{key.upper()}": value for key, value in variables.items()})
    return env


def run(env: dict[str, str | None], *args: str, input: str | bytes | None = None, obj: object = None) -> Result:
    """``cloudml ARGS`` in-process; stdout and stderr apart (``result.stdout``, ``result.stderr``).

    :param obj: Click's context object, e.g. an ``Invocation`` carrying the HTTP session to use.
    """
    return CliRunner().invoke(cli, list(args), env=env, input=input, catch_exceptions=False, prog_name="cloudml",
                              obj=obj)


def process_env(config: Path, **variables: str) -> dict[str, str]:
    """The environment of the installed command: this one's, with only the given CLOUDML_* settings."""
    env = {key: value for key, value in os.environ.items() if key not in VARIABLES}
    env.update({key: value for key, value in cli_env(config, **variables).items() if value is not None})
    return env


def run_installed(env: dict[str, str], *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    return subprocess.run([str(CLOUDML), *args], env=env, capture_output=True, text=True, timeout=timeout)
