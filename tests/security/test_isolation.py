"""The isolation matrix: every route of the app under ``/v1/projects/<project>`` (and ``/v1/admin``) × every
method × who asks, generated from the app's own ``url_map`` so that a new endpoint is covered the day it
is added.

- a token of another project (even its admin) gets 404 NOT_FOUND, as for a resource that does not exist;
- a viewer of the project gets 403 PERMISSION_DENIED on every method that changes something;
- a platform admin (admin of ``settings.admin_project``) is let through (reads answer 200);
- ``/v1/admin/*`` answers 403 to everyone but platform admins.

Each case runs on a fresh copy of a database holding a package, a job, a model, a READY version and an
operation of project ``p``, so the paths name real resources and a mutating case cannot spoil another.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from werkzeug.routing import Rule

from cloudml_os.app import create_app
from cloudml_os.artifacts.local import LocalArtifactStore
from cloudml_os.auth import is_write
from cloudml_os.config import load_settings
from cloudml_os.store import Store
from tests.unit.test_api import assert_v1_error
from tests.unit.test_api import migrated_db as migrated_db  # a fixture, as is store
from tests.unit.test_api import store as store
from tests.unit.test_quotas import QuotaEnv

PROJECT_PREFIX = "/v1/projects/<project:project>"
ADMIN_PREFIX = "/v1/admin/"


def _routes() -> list[tuple[str, str]]:
    """(rule, method) of every route the app serves under the project and admin prefixes."""
    app = create_app(load_settings(environ={}, data_dir="/nonexistent"), store=Store("sqlite://"),
                     artifacts=LocalArtifactStore(Path("/nonexistent")), frameworks={}, start_job=lambda _pk: None)
    rules: list[Rule] = [r for r in app.url_map.iter_rules()
                         if r.rule.startswith(PROJECT_PREFIX) or r.rule.startswith(ADMIN_PREFIX)]
    return sorted((r.rule, method) for r in rules for method in r.methods - {"HEAD", "OPTIONS"})


ROUTES = _routes()
PROJECT_ROUTES = [case for case in ROUTES if case[0].startswith(PROJECT_PREFIX)]
ADMIN_ROUTES = [case for case in ROUTES if case[0].startswith(ADMIN_PREFIX)]


def test_the_matrix_covers_every_resource():
    """Guards the generator itself: the routes it finds include every resource family."""
    paths = {rule for rule, _ in PROJECT_ROUTES}
    for needle in ("/jobs", ":cancel", "/packages", "/models", "/versions", ":predict", "/operations", "/quotas",
                   ":getConfig",
                   "/objects", "/uploads"):
        assert any(needle in path for path in paths), needle
    assert len(PROJECT_ROUTES) >= 25


class World(QuotaEnv):
    """Project ``p`` with one of each resource, and a token of each kind of caller."""

    def __init__(self, tmp_path: Path, store: Store):
        super().__init__(tmp_path, store)
        assert self.submit("j1").status_code == 200
        self.deployed("v1")
        self.operation = self.create_version("v2").get_json()["name"].rsplit("/", 1)[1]
        put = self.client.put("/v1/projects/p/objects/data/x.csv", data=b"a,b\n", headers=self.admin)
        assert put.status_code == 200, put.get_data(as_text=True)
        upload = self.client.post("/v1/projects/p/uploads", json={"name": "data/y.csv", "size": 10}, headers=self.admin)
        self.values = {"project": "p", "job": "j1", "model": "census", "version": "v1",
                       "operation": self.operation, "cluster": "cml-serve-1", "node": "replica-0", "token_id": "1",
                       "name": "data/x.csv", "upload_id": upload.get_json()["uploadId"]}

    def path(self, rule: str) -> str:
        def fill(match: re.Match) -> str:
            name = match.group(2)
            assert name in self.values, f"route {rule}: give the matrix a value for <{name}>"
            return self.values[name]

        return re.sub(r"<(?:(\w+):)?(\w+)>", fill, rule)

    def call(self, method: str, rule: str, headers: dict):
        return self.client.open(self.path(rule), method=method, headers=headers, json={})


@pytest.fixture
def world(tmp_path, store) -> World:
    return World(tmp_path, store)


@pytest.mark.parametrize(("rule", "method"), PROJECT_ROUTES)
def test_another_projects_token_gets_404(world, rule, method):
    intruder = world.headers("intruder", "admin")
    message = assert_v1_error(world.call(method, rule, intruder), 404, "NOT_FOUND")
    assert "census" not in message or "projects/p/" in message  # names only what the path already named


@pytest.mark.parametrize(("rule", "method"), [case for case in PROJECT_ROUTES if is_write(case[1])])
def test_a_viewer_cannot_mutate(world, rule, method):
    assert_v1_error(world.call(method, rule, world.headers("p", "viewer")), 403, "PERMISSION_DENIED")


@pytest.mark.parametrize(("rule", "method"), PROJECT_ROUTES)
def test_a_platform_admin_is_allowed_in_every_project(world, rule, method):
    response = world.call(method, rule, world.platform_admin)
    assert response.status_code not in (401, 403, 404), (rule, method, response.get_data(as_text=True))
    if not is_write(method):
        assert response.status_code == 200, (rule, response.get_data(as_text=True))


@pytest.mark.parametrize(("rule", "method"), ADMIN_ROUTES)
def test_admin_routes_refuse_everyone_but_platform_admins(world, rule, method):
    for project, role in (("p", "admin"), ("p", "viewer"), ("admin", "member"), ("admin", "viewer")):
        assert_v1_error(world.call(method, rule, world.headers(project, role)), 403, "PERMISSION_DENIED")
    assert world.call(method, rule, world.platform_admin).status_code not in (401, 403)


def test_platform_admins_are_the_admins_of_the_admin_project_only_also_in_keystone_mode(tmp_path):
    from cloudml_os.auth import is_platform_admin
    from cloudml_os.auth.keystone import caller_from_headers

    settings = load_settings(environ={}, data_dir=tmp_path, admin_project="cloud-admin")

    def keystone(project: str, roles: str):
        return caller_from_headers({"X-Identity-Status": "Confirmed", "X-Project-Name": project, "X-Roles": roles,
                                    "X-User-Name": "u"})

    assert is_platform_admin(keystone("cloud-admin", "reader,admin"), settings)
    assert not is_platform_admin(keystone("cloud-admin", "member,reader"), settings)
    assert not is_platform_admin(keystone("team-a", "admin"), settings)
    assert not is_platform_admin(keystone("admin", "admin"), settings)  # the default name, not this installation's
