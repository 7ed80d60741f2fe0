"""Fixtures of the site-setup tests: Ansible's virtualenv, the source archive, the test host, a test cloud.

``CLOUDML_OS_SITE_INSTANCE=N`` (default 7) picks the test host's network (``10.233.N.0/24``) and the
test cloud instance (tests/testcloud) that openstack.yml runs against, apart from the OpenStack tests'
own cloud. Every test here runs real programs (ansible-playbook, systemd-nspawn, OpenStack services), so
each is marked ``integration``.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.site.ansible_runner import REPOSITORY, Ansible, ensure_ansible_venv
from tests.site.host import SiteHost, start_site_host
from tests.testcloud.base import free_instance

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def site_instance() -> int:
    return free_instance(int(os.environ.get("CLOUDML_OS_SITE_INSTANCE", "7")))


@pytest.fixture(scope="session")
def ansible() -> Ansible:
    return Ansible(ensure_ansible_venv())


@pytest.fixture(scope="session")
def source_archive(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The working tree as an operator's release archive holds it (`make release`: the files git knows and the
    dashboard's npm-built assets)."""
    archive = tmp_path_factory.mktemp("source") / "cloudml-os.tar.gz"
    subprocess.run(["make", "-s", "release", f"RELEASE_ARCHIVE={archive}"], cwd=REPOSITORY, check=True)
    return archive


@pytest.fixture(scope="module")
def site_host(tmp_path_factory: pytest.TempPathFactory, site_instance: int) -> Iterator[SiteHost]:
    host = start_site_host(tmp_path_factory.mktemp("site-host"), site_instance)
    yield host
    host.stop()
