"""The Swift artifact store against real Swift: SLO segments, trees, odd keys, projects, failures, streaming.

Every test goes through openstacksdk as the platform's service account, with 1 MiB segments so that a
file of a few MiB is already a Static Large Object. The module's containers share one random prefix and
are deleted at the end, segments included.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import socket
import tracemalloc
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
from openstack.connection import Connection

from cloudml_os.artifacts import ArtifactError, files_of
from cloudml_os.artifacts.swift import SwiftArtifactStore
from tests.testcloud.cloud import TestCloud

pytestmark = pytest.mark.integration

MIB = 1024 * 1024
PREFIX = f"test-artifacts-{uuid.uuid4().hex[:8]}-"


@pytest.fixture(scope="module")
def platform(test_cloud: TestCloud) -> Iterator[Connection]:
    conn = test_cloud.connect("cloudml-os")
    yield conn
    # Raw DELETEs with quoted names: openstacksdk's delete_object does not quote '#' or '?'.
    for container in list(conn.object_store.containers(prefix=PREFIX)):
        for listed in list(conn.object_store.objects(container.name)):
            conn.object_store.delete(f"{container.name}/{quote(listed.name)}")
        conn.object_store.delete_container(container.name)
    conn.close()


@pytest.fixture(scope="module")
def store(platform: Connection) -> SwiftArtifactStore:
    return SwiftArtifactStore(platform, container_prefix=PREFIX, segment_size=MIB)


def _names(platform: Connection, project: str, prefix: str | None = None, segments: bool = False) -> list[str]:
    container = PREFIX + project + ("_segments" if segments else "")
    if not any(c.name == container for c in platform.object_store.containers(prefix=container)):
        return []
    return [listed.name for listed in platform.object_store.objects(container, prefix=prefix)]


def _head(platform: Connection, project: str, key: str) -> dict[str, str]:
    response = platform.object_store.head(f"{PREFIX}{project}/{key}")
    assert response.status_code == 200
    return response.headers


def _manifest(platform: Connection, project: str, key: str) -> list[dict]:
    response = platform.object_store.get(f"{PREFIX}{project}/{key}", params={"multipart-manifest": "get"})
    assert response.status_code == 200
    return response.json()


def _read(store: SwiftArtifactStore, uri: str) -> bytes:
    with store.local_file(uri) as path:
        return path.read_bytes()


def _tree(root: Path) -> dict[str, bytes]:
    return {name: path.read_bytes() for name, path in files_of(root)}


def _write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for name, data in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(data)
    return root


def test_a_small_file_round_trips(platform, store):
    uri = store.put_file("small", "packages/trainer-0.1.tar.gz", io.BytesIO(b"a trainer package"))

    assert uri == "store://small/packages/trainer-0.1.tar.gz"
    assert store.exists(uri)
    assert _read(store, uri) == b"a trainer package"
    assert "X-Static-Large-Object" not in _head(platform, "small", "packages/trainer-0.1.tar.gz")
    assert _names(platform, "small") == ["packages/trainer-0.1.tar.gz"]
    assert _names(platform, "small", segments=True) == []


def test_an_empty_file_round_trips(store):
    uri = store.put_file("small", "logs/empty.log", io.BytesIO(b""))

    assert store.exists(uri)
    assert _read(store, uri) == b""


def test_a_large_file_is_a_static_large_object_with_its_segments_in_the_segments_container(platform, store):
    data = os.urandom(5 * MIB // 2)

    uri = store.put_file("slo", "models/big.bin", io.BytesIO(data))

    head = _head(platform, "slo", "models/big.bin")
    assert head["X-Static-Large-Object"].lower() == "true"
    assert int(head["Content-Length"]) == len(data)
    manifest = _manifest(platform, "slo", "models/big.bin")
    assert [segment["bytes"] for segment in manifest] == [MIB, MIB, MIB // 2]
    assert all(segment["name"].startswith(f"/{PREFIX}slo_segments/models/big.bin/") for segment in manifest)
    assert sorted(f"/{PREFIX}slo_segments/{name}" for name in _names(platform, "slo", segments=True)) == \
        [segment["name"] for segment in manifest]
    assert _names(platform, "slo") == ["models/big.bin"]
    assert hashlib.sha256(_read(store, uri)).hexdigest() == hashlib.sha256(data).hexdigest()


def test_overwriting_a_large_object_deletes_its_old_segments(platform, store):
    store.put_file("overwrite", "model.bin", io.BytesIO(os.urandom(5 * MIB // 2)))
    first = _names(platform, "overwrite", segments=True)
    assert len(first) == 3

    second = os.urandom(3 * MIB // 2)
    uri = store.put_file("overwrite", "model.bin", io.BytesIO(second))

    assert _read(store, uri) == second
    segments = _names(platform, "overwrite", segments=True)
    assert len(segments) == 2 and not set(segments) & set(first)
    assert sorted(f"/{PREFIX}overwrite_segments/{name}" for name in segments) == \
        [segment["name"] for segment in _manifest(platform, "overwrite", "model.bin")]

    store.put_file("overwrite", "model.bin", io.BytesIO(b"small now"))

    assert _read(store, uri) == b"small now"
    assert "X-Static-Large-Object" not in _head(platform, "overwrite", "model.bin")
    assert _names(platform, "overwrite", segments=True) == []


def test_a_tree_round_trips_and_a_smaller_tree_replaces_it(platform, store, tmp_path):
    files = {"saved_model.pb": b"graph", "variables/variables.data-00000-of-00001": os.urandom(5 * MIB // 2),
             "variables/variables.index": b"index", "assets/empty.txt": b"", "assets/deep/er/vocab.txt": b"a\nb\n"}
    uri = store.put_tree("tree", "models/m/v1", _write_tree(tmp_path / "v1", files))

    assert uri == "store://tree/models/m/v1"
    with store.local_tree(uri) as root:
        assert _tree(root) == files
    assert _names(platform, "tree") == sorted(f"models/m/v1/{name}" for name in files)
    assert len(_names(platform, "tree", segments=True)) == 3

    fewer = {"saved_model.pb": b"graph 2", "assets/deep/er/vocab.txt": b"c\n"}
    store.put_tree("tree", "models/m/v1", _write_tree(tmp_path / "v2", fewer))

    with store.local_tree(uri) as root:
        assert _tree(root) == fewer
    assert _names(platform, "tree") == sorted(f"models/m/v1/{name}" for name in fewer)
    assert _names(platform, "tree", segments=True) == []


def test_exists_for_trees_files_and_missing_uris(store, tmp_path):
    store.put_tree("exists", "models/m/v1", _write_tree(tmp_path, {"a/b.txt": b"b"}))

    assert store.exists("store://exists/models/m/v1")
    assert store.exists("store://exists/models/m/v1/")
    assert store.exists("store://exists/models/m")
    assert store.exists("store://exists/models/m/v1/a/b.txt")
    assert not store.exists("store://exists/models/m/v")
    assert not store.exists("store://exists/models/m/v1/a/c.txt")
    assert not store.exists(f"store://never-{uuid.uuid4().hex[:8]}/models/m/v1")


def test_missing_uris_raise_artifact_errors(store):
    store.put_file("missing", "present.txt", io.BytesIO(b"here"))

    for uri in ("store://missing/absent.txt", f"store://never-{uuid.uuid4().hex[:8]}/absent.txt"):
        with pytest.raises(ArtifactError, match="does not exist"), store.local_file(uri):
            pass
        with pytest.raises(ArtifactError, match="does not exist"), store.local_tree(uri):
            pass


@pytest.mark.parametrize("key", ["dir with space/a b.txt", "ünïcødé/模型 🙂.bin", "odd/#frag?query=1&x=%20;+.txt"])
def test_keys_with_spaces_unicode_and_url_characters_round_trip(platform, store, key):
    uri = store.put_file("keys", key, io.BytesIO(key.encode()))

    assert store.exists(uri)
    assert _read(store, uri) == key.encode()
    assert key in _names(platform, "keys")

    large = os.urandom(3 * MIB // 2)
    store.put_file("keys", key, io.BytesIO(large))
    store.put_file("keys", key, io.BytesIO(large[:MIB + 1]))

    assert _read(store, uri) == large[:MIB + 1]
    assert len([name for name in _names(platform, "keys", segments=True) if name.startswith(key + "/")]) == 2


def test_a_tree_under_an_odd_key_round_trips(store, tmp_path):
    files = {"ä b/#1?.txt": b"1", "c%2Fd.txt": b"2", "big ✓.bin": os.urandom(MIB + 7)}
    uri = store.put_tree("keys", "models/é #?/v1", _write_tree(tmp_path, files))

    with store.local_tree(uri) as root:
        assert _tree(root) == files


def test_each_project_has_its_own_container(platform, store):
    a = store.put_file("team-a", "x", io.BytesIO(b"of team a"))
    b = store.put_file("team-b", "x", io.BytesIO(b"of team b"))

    assert (_read(store, a), _read(store, b)) == (b"of team a", b"of team b")
    assert _names(platform, "team-a") == ["x"] and _names(platform, "team-b") == ["x"]


def test_no_project_reaches_another_projects_segments(platform, store):
    """A project named like a segments container would read another project's segments: none can be."""
    store.put_file("team-c", "model.bin", io.BytesIO(os.urandom(MIB + 1)))

    assert len(_names(platform, "team-c", segments=True)) == 2
    assert not store.exists("store://team-c-segments/model.bin")
    with pytest.raises(ArtifactError, match="not a valid artifact URI"):
        store.exists("store://team-c_segments/model.bin")


def test_uploads_and_downloads_stream(platform, tmp_path, caplog):
    """Peak Python memory stays far below the object's size, with keystoneauth's debug log on and a text
    object (whose body that log would read): neither a single PUT nor a GET holds the object."""
    caplog.set_level(logging.DEBUG)
    big = SwiftArtifactStore(platform, container_prefix=PREFIX, segment_size=64 * MIB)
    source = tmp_path / "log.txt"
    source.write_bytes(b"a line of a long log\n" * (16 * MIB // 21))

    tracemalloc.start()
    try:
        with source.open("rb") as stream:
            uri = big.put_file("stream", "logs/chief.txt", stream)
        upload_peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.reset_peak()
        with big.local_file(uri) as path:
            download_peak = tracemalloc.get_traced_memory()[1]
            assert path.read_bytes() == source.read_bytes()
    finally:
        tracemalloc.stop()
    assert upload_peak < 4 * MIB and download_peak < 4 * MIB, (upload_peak, download_peak)
    assert "X-Static-Large-Object" not in _head(platform, "stream", "logs/chief.txt")


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _error_of(call: Callable[[], object]) -> str:
    with pytest.raises(ArtifactError) as raised:
        call()
    return str(raised.value)


@pytest.mark.parametrize("case", ["refused", "unreachable"])
def test_failed_calls_raise_artifact_errors_without_secrets(test_cloud, platform, store, case):
    """Alice on the platform's account is refused; a closed port with credentials in its URL is unreachable."""
    store.put_file("refused", "model.bin", io.BytesIO(b"weights"))
    endpoint = {"refused": platform.object_store.get_endpoint(),
                "unreachable": f"http://user:url-secret@127.0.0.1:{_closed_port()}/v1/AUTH_x"}[case]
    conn = Connection(**test_cloud.credentials("alice"), object_store_endpoint_override=endpoint)
    try:
        intruder = SwiftArtifactStore(conn, container_prefix=PREFIX, segment_size=MIB)
        messages = [_error_of(lambda: intruder.exists("store://refused/model.bin")),
                    _error_of(lambda: intruder.put_file("refused", "model.bin", io.BytesIO(b"planted"))),
                    _error_of(lambda: intruder.local_file("store://refused/model.bin").__enter__())]
        secrets = (conn.auth_token, "url-secret", test_cloud.service_password, "AUTH_", "http")
    finally:
        conn.close()
    for message in messages:
        assert message.startswith("object storage "), message
        assert not [secret for secret in secrets if secret in message], message
    assert _read(store, "store://refused/model.bin") == b"weights"


def test_a_huge_file_gets_larger_segments_than_swifts_manifest_limit(platform, tmp_path, monkeypatch):
    """Swift refuses a manifest of over 1000 segments; a file that would need more gets larger segments."""
    monkeypatch.setattr("cloudml_os.artifacts.swift.MAX_SEGMENTS", 2)
    data = os.urandom(3 * MIB)

    uri = SwiftArtifactStore(platform, container_prefix=PREFIX, segment_size=MIB).put_file(
        "huge", "model.bin", io.BytesIO(data))

    assert [segment["bytes"] for segment in _manifest(platform, "huge", "model.bin")] == [3 * MIB // 2] * 2
    assert _read(SwiftArtifactStore(platform, container_prefix=PREFIX), uri) == data
    assert _names(platform, "huge") == ["model.bin"]


# ---- the objects API's operations -----------------------------------------------------------------------

def test_objects_are_written_checked_listed_ranged_and_deleted(store, platform):
    from cloudml_os.artifacts import ChecksumMismatch, Expected

    small, large = os.urandom(100_000), os.urandom(3 * MIB + 5)
    info = store.write_object("objs", "a/small", io.BytesIO(small), len(small),
                              Expected(md5=hashlib.md5(small).hexdigest()))
    assert (info.size, info.md5) == (len(small), hashlib.md5(small).hexdigest())
    big = store.write_object("objs", "a/large", io.BytesIO(large), len(large),
                             Expected(sha256=hashlib.sha256(large).hexdigest()))
    assert (big.size, big.md5) == (len(large), hashlib.md5(large).hexdigest())  # an SLO, its true MD5 kept
    for expected in (Expected(md5=hashlib.md5(b"x").hexdigest()), Expected(sha256=hashlib.sha256(b"x").hexdigest())):
        for data in (b"replacement", os.urandom(2 * MIB + 1)):
            with pytest.raises(ChecksumMismatch):
                store.write_object("objs", "a/small", io.BytesIO(data), len(data), expected)
    assert b"".join(store.read_range("store://objs/a/small", 0, len(small))) == small  # unchanged
    assert b"".join(store.read_range("store://objs/a/large", MIB - 3, 10)) == large[MIB - 3:MIB + 7]
    listed = store.list_objects("objs", "a/", "", 10)
    assert [(i.key, i.size) for i in listed] == [("a/large", len(large)), ("a/small", len(small))]
    assert listed[1].md5 == hashlib.md5(small).hexdigest()
    assert [i.key for i in store.list_objects("objs", "a/", "a/large", 10)] == ["a/small"]
    assert store.delete_object("store://objs/a/large") and not store.delete_object("store://objs/a/large")
    assert _names(platform, "objs", segments=True) == []  # the SLO's segments went with it
    assert store.stat("store://objs/a/large") is None


def test_a_resumable_upload_keeps_whole_segments_across_a_cut(store, platform):
    from cloudml_os.artifacts import ChecksumMismatch, Expected, IncompleteBody

    data = os.urandom(5 * MIB + 1234)
    expected = Expected(md5=hashlib.md5(data).hexdigest())
    cut = io.BytesIO(data[:2 * MIB + 500])  # the connection breaks inside the third segment
    with pytest.raises(IncompleteBody):
        store.upload_write("objs", "up1", 0, cut, len(data), len(data), MIB, None)
    received = store.upload_received("objs", "up1", len(data), MIB)
    assert received == 2 * MIB
    assert store.stat("store://objs/resumed") is None
    kept = store.upload_write("objs", "up1", received, io.BytesIO(data[received:]), len(data) - received,
                              len(data), MIB, None)
    assert kept == len(data)
    info = store.upload_commit("objs", "up1", "resumed", len(data), MIB, None, expected)
    assert info.md5 == expected.md5
    assert b"".join(store.read_range("store://objs/resumed", 0, len(data))) == data
    store.upload_write("objs", "up2", 0, io.BytesIO(data), len(data), len(data), MIB, None)
    with pytest.raises(ChecksumMismatch):
        store.upload_commit("objs", "up2", "wrong", len(data), MIB, None, Expected(md5=hashlib.md5(b"").hexdigest()))
    assert store.stat("store://objs/wrong") is None
    assert [n for n in _names(platform, "objs", segments=True) if "/up2/" in n] == []
    store.upload_write("objs", "up3", 0, io.BytesIO(data[:MIB]), MIB, len(data), MIB, None)
    store.upload_abort("objs", "up3")
    assert store.upload_received("objs", "up3", len(data), MIB) == 0
    assert store.delete_object("store://objs/resumed")
    assert _names(platform, "objs", segments=True) == []
