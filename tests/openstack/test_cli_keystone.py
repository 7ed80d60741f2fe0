"""``cloudml auth login`` against the test cloud's real Keystone, then ``cloudml`` commands on a platform in
OpenStack mode (``auth = keystone``) with the token it stored: with a password (asked for, never echoed)
and with an application credential. No training is needed."""

from __future__ import annotations

import json
import stat
import uuid

import pytest

from tests.client.cli_helpers import cli_env, run
from tests.harness import start_platform
from tests.openstack.settings import openstack_environment

pytestmark = pytest.mark.integration

OPENSTACK_VARIABLES = ("OS_AUTH_URL", "OS_USERNAME", "OS_PROJECT_NAME", "OS_USER_DOMAIN_NAME",
                       "OS_PROJECT_DOMAIN_NAME", "OS_APPLICATION_CREDENTIAL_ID")


@pytest.fixture(scope="module")
def platform(test_cloud, tmp_path_factory, database_url):
    import kombu

    from tests.conftest import AMQP_URL

    queue = f"cloudml-cli-ks-{uuid.uuid4().hex[:8]}"
    with start_platform(tmp_path_factory.mktemp("keystone-cli"), database_url=database_url,
                        broker_url=AMQP_URL, task_queue=queue, stop_grace_seconds=2,
                        local_address_prefix="127.17", local_port_base=25800,
                        **openstack_environment(test_cloud)) as running:
        yield running
    with kombu.Connection(AMQP_URL) as connection:
        connection.default_channel.queue_delete(queue)


@pytest.fixture
def env(platform, tmp_path):
    return {**cli_env(tmp_path / "config.json", endpoint=platform.base_url), **dict.fromkeys(OPENSTACK_VARIABLES)}


def test_auth_login_with_a_password_keeps_a_keystone_token_the_api_takes(platform, test_cloud, env, tmp_path):
    password = test_cloud.service_password
    login = run(env, "auth", "login", "--auth-url", test_cloud.auth_url, "--username", "alice",
                "--project-name", "team-a", input=password + "\n")
    assert login.exit_code == 0, login.output
    assert "Signed in to Keystone as alice, project team-a" in login.stderr
    assert password not in login.output and login.stdout == ""
    config = tmp_path / "config.json"
    stored = json.loads(config.read_text())
    assert stat.S_IMODE(config.stat().st_mode) == 0o600
    assert stored["auth_type"] == "keystone" and stored["project"] == "team-a"
    assert stored["token"] not in login.output and password not in config.read_text()

    # The API (keystonemiddleware) takes the stored token as X-Auth-Token; team-a is the path's project.
    assert run(env, "models", "create", "cli_keystone_model").exit_code == 0
    listed = run(env, "models", "list", "--format", "value(name)")
    assert listed.exit_code == 0 and "projects/team-a/models/cli_keystone_model" in listed.stdout.split()
    assert run(env, "models", "delete", "cli_keystone_model").exit_code == 0
    assert "token = (hidden)" in run(env, "config", "list").stdout

    refused = run(env, "auth", "login", "--auth-url", test_cloud.auth_url, "--username", "alice",
                  "--password", "not-her-password", "--project-name", "team-a")
    assert refused.exit_code == 1 and refused.stderr.startswith("ERROR: Keystone refused the sign-in: ")
    assert json.loads(config.read_text()) == stored  # nothing changed
    # A token Keystone does not know is refused by the API in one line.
    wrong = run({**env, "CLOUDML_TOKEN": "gAAAAAB" + "x" * 150}, "jobs", "list")
    assert wrong.exit_code == 1 and wrong.stderr.startswith("ERROR: UNAUTHENTICATED: ")
    assert wrong.stderr.count("\n") == 1


def test_auth_login_with_an_application_credential(platform, test_cloud, env):
    alice = test_cloud.connect("alice")
    credential = alice.identity.create_application_credential(
        user=alice.current_user_id, name=f"cloudml-cli-{uuid.uuid4().hex[:6]}")
    try:
        login = run(env, "auth", "login", "--auth-url", test_cloud.auth_url.removesuffix("/v3"),
                    "--application-credential-id", credential.id, input=credential.secret + "\n")
        assert login.exit_code == 0, login.output
        assert "project team-a" in login.stderr and credential.secret not in login.output
        caller = run(env, "jobs", "list", "--format", "json")
        assert caller.exit_code == 0, caller.output
        assert json.loads(caller.stdout) == []
    finally:
        alice.identity.delete_application_credential(alice.current_user_id, credential.id)
        alice.close()
