"""The OpenStack tests share one test cloud per session (tests/testcloud), on instance 0 by default.

``CLOUDML_OS_TESTCLOUD_INSTANCE=N`` moves it to another instance's ports, subnet and vhost, so a developer
can run these tests while another cloud (another session's, another developer's) is up.
Every test here needs the real services, so each is marked ``integration``.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.testcloud.cloud import TestCloud, start_test_cloud

HERE = Path(__file__).resolve().parent


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(item.path).resolve().parents:
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def test_cloud(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestCloud]:
    cloud = start_test_cloud(tmp_path_factory.mktemp("testcloud"),
                             instance=int(os.environ.get("CLOUDML_OS_TESTCLOUD_INSTANCE", "0")))
    yield cloud
    cloud.stop()


@pytest.fixture
def service_account(test_cloud: TestCloud) -> Iterator:
    """An openstacksdk connection as the platform's service account (``cloudml-os`` on project ``cloudml``)."""
    conn = test_cloud.connect("cloudml-os")
    yield conn
    conn.close()
