"""``cloudml config`` (the settings file) and ``cloudml auth login`` (a Keystone token into it).

``auth login`` posts the user's credentials to Keystone's ``/v3/auth/tokens`` and keeps the token
Keystone answers in ``X-Subject-Token``; a password is read with a hidden prompt when not given and is
never stored, echoed or printed. Neither command ever prints a token.
"""

from __future__ import annotations

import sys
from typing import Any

import click
import requests

from cloudml_os.client.context import command, invocation
from cloudml_os.client.output import emit, stderr
from cloudml_os.client.rest import TIMEOUT, CliError
from cloudml_os.client.settings import KEYS, check_value, read_file, write_file


@click.group("config")
def config_group() -> None:
    """Show and change cloudml's settings (endpoint, project, token, auth_url, auth_type).

    They live in a JSON file in your config folder (CLOUDML_CONFIG names another), written with mode 0600.
    CLOUDML_ENDPOINT, CLOUDML_PROJECT and CLOUDML_TOKEN override the file; --endpoint and --project
    override both.
    """


@command(config_group, "set")
@click.argument("key", type=click.Choice(KEYS))
@click.argument("value")
def config_set(key: str, value: str) -> None:
    """Set KEY to VALUE in the settings file.

    \b
    cloudml config set endpoint http://127.0.0.1:8080
    cloudml config set project demo
    cloudml config set token -          # read the token from stdin (keeps it out of the shell history)
    cloudml config set auth_type local  # local API tokens (default) or keystone (set by auth login)
    """
    if key == "token" and value == "-":
        value = sys.stdin.read()
    path = invocation().settings().path
    values = read_file(path)
    values[key] = check_value(key, value)
    write_file(path, values)
    stderr().print(f"Updated property [{key}] in {path}.")


@command(config_group, "unset")
@click.argument("key", type=click.Choice(KEYS))
def config_unset(key: str) -> None:
    """Remove KEY from the settings file."""
    path = invocation().settings().path
    values = read_file(path)
    if values.pop(key, None) is not None:
        write_file(path, values)
    stderr().print(f"Unset property [{key}] in {path}.")


@command(config_group, "list")
def config_list() -> None:
    """Show the effective settings and where each comes from (the token is never shown)."""
    settings = invocation().settings()
    shown = {key: ("(hidden)" if key == "token" else value) for key, value in settings.values.items()}
    fmt = invocation().format
    if fmt is not None:
        emit(shown, fmt)
        return
    click.echo(f"# {settings.path}")
    for key in KEYS:
        if key in shown:
            source = settings.sources[key]
            click.echo(f"{key} = {shown[key]}" + ("" if source == "file" else f"  # from {source}"))
    if "endpoint" not in shown:
        click.echo(f"endpoint = {settings.endpoint}  # default")


@click.group("auth")
def auth_group() -> None:
    """Sign in to the platform's Keystone (OpenStack mode)."""


def _keystone_body(username: str | None, password: str | None, user_domain: str, project_name: str | None,
                   project_domain: str, credential_id: str | None, credential_secret: str | None) -> dict[str, Any]:
    if credential_id:
        return {"auth": {"identity": {"methods": ["application_credential"], "application_credential": {
            "id": credential_id, "secret": credential_secret}}}}
    auth: dict[str, Any] = {"identity": {"methods": ["password"], "password": {"user": {
        "name": username, "domain": {"name": user_domain}, "password": password}}}}
    if project_name:
        auth["scope"] = {"project": {"name": project_name, "domain": {"name": project_domain}}}
    return {"auth": auth}


def tokens_url(auth_url: str) -> str:
    """Keystone's token URL from an auth URL given with or without its ``/v3``."""
    auth_url = auth_url.rstrip("/")
    return f"{auth_url}/auth/tokens" if auth_url.endswith("/v3") else f"{auth_url}/v3/auth/tokens"


@command(auth_group, "login")
@click.option("--auth-url", envvar="OS_AUTH_URL", help="Keystone's URL, e.g. https://keystone.example.org:5000/v3 "
              "(default: the auth_url setting, then OS_AUTH_URL).")
@click.option("--username", envvar="OS_USERNAME", help="Your Keystone user (default OS_USERNAME).")
@click.option("--password", help="Your password; asked for (not echoed) when not given.")
@click.option("--user-domain", envvar="OS_USER_DOMAIN_NAME", default="Default", show_default=True,
              help="The user's domain.")
@click.option("--project-name", envvar="OS_PROJECT_NAME", help="The project to scope the token to; it also "
              "becomes the project setting (default OS_PROJECT_NAME).")
@click.option("--project-domain", envvar="OS_PROJECT_DOMAIN_NAME", default="Default", show_default=True,
              help="The project's domain.")
@click.option("--application-credential-id", envvar="OS_APPLICATION_CREDENTIAL_ID",
              help="Sign in with an application credential instead of a password.")
@click.option("--application-credential-secret", help="The application credential's secret; asked for when not "
              "given.")
def auth_login(auth_url: str | None, username: str | None, password: str | None, user_domain: str,
               project_name: str | None, project_domain: str, application_credential_id: str | None,
               application_credential_secret: str | None) -> None:
    """Get a Keystone token and keep it in the settings (auth_type keystone).

    \b
    cloudml auth login --auth-url http://keystone:5000/v3 --username alice --project-name team-a
    cloudml auth login --auth-url http://keystone:5000/v3 --application-credential-id ID

    The token is sent as X-Auth-Token from then on; the project becomes the token's project.
    """
    state = invocation()
    settings = state.settings()
    auth_url = check_value("auth_url", auth_url) if auth_url else settings.auth_url
    if not auth_url:
        raise click.UsageError("give --auth-url (or set it: cloudml config set auth_url URL)")
    if not application_credential_id and not username:
        raise click.UsageError("give --username, or --application-credential-id")
    if application_credential_id and not application_credential_secret:
        application_credential_secret = click.prompt("Application credential secret", hide_input=True,
                                                     err=True)
    if not application_credential_id and password is None:
        password = click.prompt(f"Password for {username}", hide_input=True, err=True)
    body = _keystone_body(username, password, user_domain, project_name, project_domain,
                          application_credential_id, application_credential_secret)
    url = tokens_url(auth_url)
    try:
        response = requests.post(url, json=body, timeout=TIMEOUT)
    except requests.RequestException as exc:
        raise CliError(f"cannot reach Keystone at {auth_url}: {type(exc).__name__}") from None
    if response.status_code != 201 or not response.headers.get("X-Subject-Token"):
        try:
            message = response.json()["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = f"HTTP {response.status_code}"
        raise CliError(f"Keystone refused the sign-in: {message}")
    token = response.json().get("token", {})
    project = (token.get("project") or {}).get("name")
    values = read_file(settings.path)
    values.update(token=response.headers["X-Subject-Token"], auth_type="keystone", auth_url=auth_url)
    if project:
        values["project"] = project
    write_file(settings.path, values)
    who = (token.get("user") or {}).get("name", username)
    stderr().print(f"Signed in to Keystone as {who}" + (f", project {project}" if project else "")
                   + (f"; the token expires at {token['expires_at']}" if token.get("expires_at") else "") + ".")

