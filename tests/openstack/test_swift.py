"""Real Swift in the test cloud stores the platform's artifacts the way the Swift artifact store will use it.

Everything goes through openstacksdk as the platform's service account (``cloudml-os`` on ``cloudml``),
behind the production proxy pipeline (Keystone tokens, keystoneauth, SLO), so a regression in how the
platform talks to Swift shows here and not first on an operator's cloud.
"""

from __future__ import annotations

import hashlib
import os
import uuid
from collections.abc import Iterator

import pytest
import requests
from openstack import exceptions

pytestmark = pytest.mark.integration

MIB = 1024 * 1024


@pytest.fixture
def container(service_account) -> Iterator[str]:
    """A fresh container, emptied and deleted afterwards (SLO manifests together with their segments)."""
    name = f"test-{uuid.uuid4().hex[:8]}"
    service_account.object_store.create_container(name)
    yield name
    for listed in service_account.object_store.objects(name):
        service_account.delete_object(name, listed.name)
    service_account.object_store.delete_container(name, ignore_missing=True)


def _names(service_account, container: str, prefix: str | None = None) -> list[str]:
    return [listed.name for listed in service_account.object_store.objects(container, prefix=prefix)]


def test_objects_round_trip_list_by_prefix_and_delete(service_account, container):
    objects = {"jobs/j1/model/saved_model.pb": b"graph", "jobs/j1/model/variables.index": b"index",
               "jobs/j2/logs/chief.log": b"hello\n"}
    for name, data in objects.items():
        service_account.object_store.upload_object(container=container, name=name, data=data)

    for name, data in objects.items():
        assert service_account.object_store.download_object(name, container=container) == data
    assert _names(service_account, container, prefix="jobs/j1/") == ["jobs/j1/model/saved_model.pb",
                                                               "jobs/j1/model/variables.index"]
    assert _names(service_account, container, prefix="jobs/j2/") == ["jobs/j2/logs/chief.log"]

    service_account.object_store.delete_object("jobs/j2/logs/chief.log", container=container)
    with pytest.raises(exceptions.NotFoundException):
        service_account.object_store.download_object("jobs/j2/logs/chief.log", container=container)
    assert _names(service_account, container, prefix="jobs/j2/") == []


def test_large_object_is_a_static_large_object_that_streams_back(service_account, container, tmp_path):
    data = os.urandom(2 * MIB + 12345)
    path = tmp_path / "model.bin"
    path.write_bytes(data)

    service_account.create_object(container, "model.bin", filename=str(path), segment_size=MIB)

    head = service_account.object_store.get_object_metadata("model.bin", container=container)
    assert head.is_static_large_object
    assert head.content_length == len(data)
    manifest = service_account.object_store.get(f"{container}/model.bin", params={"multipart-manifest": "get"}).json()
    assert [segment["bytes"] for segment in manifest] == [MIB, MIB, 12345]
    assert _names(service_account, container) == [
        "model.bin", "model.bin/000000", "model.bin/000001", "model.bin/000002"]

    digest, chunks = hashlib.sha256(), 0
    for chunk in service_account.object_store.stream_object("model.bin", container=container, chunk_size=256 * 1024):
        digest.update(chunk)
        chunks += 1
    assert digest.hexdigest() == hashlib.sha256(data).hexdigest()
    assert chunks > 1

    service_account.delete_object(container, "model.bin")
    assert _names(service_account, container) == []


def test_another_project_is_refused_the_platform_account(test_cloud, service_account, container):
    service_account.object_store.upload_object(container=container, name="model.bin", data=b"weights")
    account = service_account.object_store.get_endpoint()
    alice = test_cloud.connect("alice")
    try:
        own_account = alice.object_store.get(alice.object_store.get_endpoint(), raise_exc=False)
        assert own_account.status_code in (200, 204)
        for method, path in [("GET", ""), ("GET", f"/{container}"), ("GET", f"/{container}/model.bin"),
                             ("PUT", f"/{container}/planted"), ("DELETE", f"/{container}/model.bin")]:
            answer = alice.object_store.request(account + path, method, raise_exc=False)
            assert answer.status_code == 403, (method, path, answer.status_code)
    finally:
        alice.close()
    assert requests.get(f"{account}/{container}", timeout=10).status_code == 401
    assert service_account.object_store.download_object("model.bin", container=container) == b"weights"
