"""The objects API on the real API process (gunicorn) and the local store: streamed uploads with checksums,
resumable uploads across cut connections, ranged downloads, listing and deletion, and bad input."""

from __future__ import annotations

import base64
import hashlib
import http.client
import os
import threading
import time
import urllib.parse
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.harness import Client

MiB = 1 << 20


@pytest.fixture(scope="module")
def client(platform) -> Client:
    return platform.client(f"objects-{uuid.uuid4().hex[:6]}")


def _md5(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


def _stored(platform, client: Client, name: str) -> Path:
    return platform.data_dir / "artifacts" / client.project / name


def test_put_get_round_trip_with_checksums(client):
    data = os.urandom(3 * MiB + 17)
    put = client.request("PUT", "/objects/data/train.csv", data=data,
                         headers={"Content-MD5": _md5(data), "X-Content-SHA256": hashlib.sha256(data).hexdigest()})
    assert put.status_code == 200, put.text
    body = put.json()
    assert body["name"] == "data/train.csv" and body["uri"] == f"store://{client.project}/data/train.csv"
    assert body["size"] == str(len(data)) and body["md5Hash"] == _md5(data)
    got = client.request("GET", "/objects/data/train.csv")
    assert got.status_code == 200 and got.content == data
    assert got.headers["X-Content-MD5"] == _md5(data) and got.headers["Accept-Ranges"] == "bytes"
    head = client.request("HEAD", "/objects/data/train.csv")
    assert head.status_code == 200 and head.headers["Content-Length"] == str(len(data)) and not head.content


def test_a_wrong_checksum_stores_nothing(platform, client):
    old = b"the old bytes"
    assert client.request("PUT", "/objects/checked/file", data=old).status_code == 200
    new = b"new bytes that were corrupted on the way"
    wrong_md5 = client.request("PUT", "/objects/checked/file", data=new, headers={"Content-MD5": _md5(b"other")})
    assert wrong_md5.status_code == 400 and "Content-MD5" in wrong_md5.json()["error"]["message"]
    wrong_sha = client.request("PUT", "/objects/checked/file", data=new,
                               headers={"X-Content-SHA256": hashlib.sha256(b"other").hexdigest()})
    assert wrong_sha.status_code == 400 and wrong_sha.json()["error"]["status"] == "INVALID_ARGUMENT"
    fresh = client.request("PUT", "/objects/checked/never", data=new, headers={"Content-MD5": _md5(b"other")})
    assert fresh.status_code == 400
    assert client.request("GET", "/objects/checked/file").content == old
    assert client.request("GET", "/objects/checked/never").status_code == 404
    assert not list((platform.data_dir / "artifacts" / ".uploads").glob("staged-*"))


def test_ranges(client):
    data = bytes(range(256)) * 40
    client.request("PUT", "/objects/ranged.bin", data=data)
    for header, expected, content_range in (("bytes=10-19", data[10:20], f"bytes 10-19/{len(data)}"),
                                            ("bytes=10000-", data[10000:], f"bytes 10000-10239/{len(data)}"),
                                            ("bytes=-5", data[-5:], f"bytes 10235-10239/{len(data)}"),
                                            ("bytes=10200-99999", data[10200:], f"bytes 10200-10239/{len(data)}")):
        got = client.request("GET", "/objects/ranged.bin", headers={"Range": header})
        assert got.status_code == 206, header
        assert got.content == expected and got.headers["Content-Range"] == content_range
    beyond = client.request("GET", "/objects/ranged.bin", headers={"Range": "bytes=10240-"})
    assert beyond.status_code == 416
    assert beyond.json()["error"]["status"] == "OUT_OF_RANGE" and beyond.headers["Content-Range"] == "bytes */10240"


def test_list_pages_and_folders(client):
    names = ["tree/a.txt", "tree/b/1", "tree/b/2", "tree/b-c", "tree/c/d/e", "tree/z"]
    for name in names:
        assert client.request("PUT", f"/objects/{name}", data=name.encode()).status_code == 200
    seen, token = [], None
    while True:
        page = client.request("GET", "/objects", params={"prefix": "tree/", "pageSize": 2,
                                                         **({"pageToken": token} if token else {})}).json()
        assert len(page["objects"]) <= 2
        seen += [item["name"] for item in page["objects"]]
        token = page.get("nextPageToken")
        if not token:
            break
    assert seen == sorted(names)
    folders = client.request("GET", "/objects", params={"prefix": "tree/", "delimiter": "/"}).json()
    assert [item["name"] for item in folders["objects"]] == ["tree/a.txt", "tree/b-c", "tree/z"]
    assert folders["prefixes"] == ["tree/b/", "tree/c/"]
    first = client.request("GET", "/objects", params={"prefix": "tree/", "delimiter": "/", "pageSize": 2}).json()
    rest = client.request("GET", "/objects", params={"prefix": "tree/", "delimiter": "/",
                                                     "pageToken": first["nextPageToken"]}).json()
    assert (first["objects"] + rest["objects"], first["prefixes"] + rest["prefixes"]) == \
        (folders["objects"], folders["prefixes"])
    item = folders["objects"][0]
    assert item["md5Hash"] == _md5(b"tree/a.txt") and item["size"] == "10" and item["updated"].endswith("Z")


def test_delete_one_and_recursive(platform, client):
    for name in ("gone/x", "gone/y/z", "gone/y/w"):
        client.request("PUT", f"/objects/{name}", data=b"1")
    assert client.request("DELETE", "/objects/gone/x").json() == {"deleted": 1}
    folder = client.request("DELETE", "/objects/gone/y")
    assert folder.status_code == 404 and "recursive=true" in folder.json()["error"]["message"]
    assert client.request("DELETE", "/objects/gone", params={"recursive": "true"}).json() == {"deleted": 2}
    assert client.request("GET", "/objects", params={"prefix": "gone/"}).json()["objects"] == []
    assert not _stored(platform, client, "gone").exists()


@pytest.mark.parametrize("name", ["%2E%2E/escape", "a/%2E/b", "a//b", "x" * 1100, "bad%0Aname", "trailing/"])
def test_bad_names_store_nothing(platform, client, name):
    response = client.request("PUT", f"/objects/{name}", data=b"data")
    assert response.status_code in (400, 404), response.text
    assert response.json()["error"]["status"] in ("INVALID_ARGUMENT", "NOT_FOUND")
    assert not (platform.data_dir / "artifacts" / "escape").exists()


def test_an_object_and_a_folder_of_one_name_are_refused_on_the_local_store(client):
    assert client.request("PUT", "/objects/clash/file", data=b"1").status_code == 200
    under_object = client.request("PUT", "/objects/clash/file/below", data=b"2")
    assert under_object.status_code == 400 and "cannot also be a folder" in under_object.json()["error"]["message"]
    over_folder = client.request("PUT", "/objects/clash", data=b"3")
    assert over_folder.status_code == 400 and "folder of objects" in over_folder.json()["error"]["message"]
    assert client.request("GET", "/objects/clash/file").content == b"1"


def test_other_projects_and_viewers(platform, client):
    client.request("PUT", "/objects/private", data=b"secret")
    other = platform.client(f"other-{uuid.uuid4().hex[:6]}")
    other.project = client.project  # its token, this project's URLs
    assert other.request("GET", "/objects/private").status_code == 404
    assert other.request("GET", "/objects").status_code == 404
    viewer = platform.client(client.project, role="viewer")
    assert viewer.request("GET", "/objects/private").content == b"secret"
    denied = viewer.request("PUT", "/objects/private", data=b"changed")
    assert denied.status_code == 403
    assert client.request("GET", "/objects/private").content == b"secret"


def test_over_the_size_limit(client):
    url = urllib.parse.urlsplit(client.base_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    connection.putrequest("PUT", f"/v1/projects/{client.project}/objects/big")
    connection.putheader("Authorization", f"Bearer {client.token}")
    connection.putheader("Content-Length", str(60 << 30))
    connection.endheaders()
    connection.send(b"x" * 1000)
    response = connection.getresponse()
    assert response.status == 413 and b"RESOURCE_EXHAUSTED" in response.read()
    connection.close()
    assert client.request("GET", "/objects/big").status_code == 404
    start = client.request("POST", "/uploads", json={"name": "huge", "size": 60 << 30})
    assert start.status_code == 413 and start.json()["error"]["status"] == "RESOURCE_EXHAUSTED"


# ---- resumable uploads ----------------------------------------------------------------------------

def send_cut(client: Client, path: str, headers: dict[str, str], data: bytes, cut_after: int) -> None:
    """Send a PUT announcing all of ``data`` but close the connection after ``cut_after`` bytes."""
    url = urllib.parse.urlsplit(client.base_url)
    connection = http.client.HTTPConnection(url.hostname, url.port, timeout=30)
    connection.putrequest("PUT", f"/v1/projects/{client.project}{path}")
    credential = {"X-Auth-Token": client.token} if client.keystone else {"Authorization": f"Bearer {client.token}"}
    for key, value in {**credential, "Content-Length": str(len(data)), **headers}.items():
        connection.putheader(key, value)
    connection.endheaders()
    connection.send(data[:cut_after])
    time.sleep(0.3)
    connection.sock.close()


def wait_received(client: Client, upload_id: str, at_least: int) -> int:
    deadline = time.monotonic() + 30
    while True:
        received = int(client.request("GET", f"/uploads/{upload_id}").json()["received"])
        if received >= at_least or time.monotonic() > deadline:
            return received
        time.sleep(0.2)


def test_resumable_upload_survives_a_cut_connection(client):
    data = os.urandom(5 * MiB + 123)
    start = client.request("POST", "/uploads", json={"name": "resumed/data.bin", "size": len(data),
                                                     "md5Hash": _md5(data)})
    assert start.status_code == 200, start.text
    upload = start.json()
    assert upload["received"] == "0" and upload["uri"] == f"store://{client.project}/resumed/data.bin"
    upload_id = upload["uploadId"]
    send_cut(client, f"/uploads/{upload_id}", {"Content-Range": f"bytes 0-{len(data) - 1}/{len(data)}"},
              data, cut_after=2 * MiB)
    received = wait_received(client, upload_id, 2 * MiB)
    assert 0 < received <= 2 * MiB
    assert client.request("GET", "/objects/resumed/data.bin").status_code == 404  # nothing visible yet
    wrong = client.request("PUT", f"/uploads/{upload_id}", data=data[1:],
                           headers={"Content-Range": f"bytes 1-{len(data) - 1}/{len(data)}"})
    assert wrong.status_code == 409 and wrong.headers["X-Upload-Received"] == str(received)
    done = client.request("PUT", f"/uploads/{upload_id}", data=data[received:],
                          headers={"Content-Range": f"bytes {received}-{len(data) - 1}/{len(data)}"})
    assert done.status_code == 200, done.text
    assert done.json()["object"]["md5Hash"] == _md5(data)
    assert client.request("GET", "/objects/resumed/data.bin").content == data
    assert client.request("GET", f"/uploads/{upload_id}").status_code == 404  # the session is gone


def test_resumable_upload_with_a_wrong_checksum_stores_nothing(client):
    data = b"a" * 1000
    upload_id = client.request("POST", "/uploads", json={"name": "bad-md5", "size": 1000,
                                                         "md5Hash": _md5(b"b" * 1000)}).json()["uploadId"]
    first = client.request("PUT", f"/uploads/{upload_id}", data=data[:400],
                           headers={"Content-Range": "bytes 0-399/1000"})
    assert first.status_code == 200 and first.json()["received"] == "400"
    last = client.request("PUT", f"/uploads/{upload_id}", data=data[400:],
                          headers={"Content-Range": "bytes 400-999/1000"})
    assert last.status_code == 400 and "md5Hash" in last.json()["error"]["message"]
    assert client.request("GET", "/objects/bad-md5").status_code == 404
    assert client.request("GET", f"/uploads/{upload_id}").status_code == 404


def test_bad_upload_requests(client):
    assert client.request("GET", "/uploads/0123456789abcdef").status_code == 404
    assert client.request("PUT", "/uploads/nope", data=b"x", headers={"Content-Range": "bytes 0-0/1"}) \
        .status_code == 404
    for body in ({"name": "../x", "size": 1}, {"name": "ok", "size": -1}, {"name": "ok", "size": 1, "md5Hash": "zz"},
                 {"size": 1}, {"name": "ok", "size": 1, "sha256": "12"}):
        response = client.request("POST", "/uploads", json=body)
        assert response.status_code == 400, body
    upload_id = client.request("POST", "/uploads", json={"name": "strict", "size": 10}).json()["uploadId"]
    for headers, data in (({"Content-Range": "bytes 0-9/11"}, b"x" * 10),  # another size
                          ({"Content-Range": "bytes 0-4/10"}, b"x" * 10),  # more body than the range
                          ({"Content-Range": "bytes 5-12/10"}, b"x" * 8),  # beyond the end
                          ({"Content-Range": "0-9/10"}, b"x" * 10)):
        response = client.request("PUT", f"/uploads/{upload_id}", data=data, headers=headers)
        assert response.status_code == 400, headers
    assert client.request("GET", f"/uploads/{upload_id}").json()["received"] == "0"
    assert client.request("DELETE", f"/uploads/{upload_id}").status_code == 200
    assert client.request("GET", f"/uploads/{upload_id}").status_code == 404
    empty = client.request("POST", "/uploads", json={"name": "empty", "size": 0}).json()["uploadId"]
    done = client.request("PUT", f"/uploads/{empty}", headers={"Content-Range": "bytes */0"})
    assert done.status_code == 200 and done.json()["object"]["size"] == "0"


# ---- one gibibyte --------------------------------------------------------------------------------

def _api_workers(platform) -> list[int]:
    api = platform.processes["api"].pid
    return [int(pid) for pid in Path(f"/proc/{api}/task/{api}/children").read_text().split()] or [api]


def _peak_rss(pids: list[int]) -> int:
    """The largest resident set (bytes) any of the processes had since the last reset."""
    peak = 0
    for pid in pids:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                peak = max(peak, int(line.split()[1]) * 1024)
    return peak


def pattern(total: int, first: int = 0) -> Iterator[bytes]:
    """``total`` bytes of a reproducible pattern from offset ``first``, made as they are sent."""
    block = hashlib.sha256(b"cloudml").digest() * (MiB // 32)
    offset = first
    while offset < total:
        start = offset % len(block)
        piece = block[start:][:total - offset]
        offset += len(piece)
        yield piece


class StreamedBody:
    """A request body of known length read as it is sent (requests sends ``__len__`` + ``read`` objects with a
    Content-Length; a generator would go chunked, which the API refuses)."""

    def __init__(self, pieces: Iterator[bytes], length: int) -> None:
        self._pieces, self._left, self._buffer = pieces, length, b""

    def __len__(self) -> int:
        return self._left

    def read(self, size: int = -1) -> bytes:
        if not self._buffer:
            self._buffer = next(self._pieces, b"")
        data, self._buffer = self._buffer[:size if size >= 0 else None], self._buffer[size if size >= 0 else
                                                                                       len(self._buffer):]
        self._left -= len(data)
        return data


def test_one_gibibyte_cut_and_resumed_in_bounded_memory(platform, client):
    size = 1 << 30
    md5 = hashlib.md5()
    for piece in pattern(size):
        md5.update(piece)
    workers = _api_workers(platform)
    for pid in workers:
        Path(f"/proc/{pid}/clear_refs").write_text("5")  # resets VmHWM to the current resident set
    before = max(_peak_rss([pid]) for pid in workers)
    upload_id = client.request("POST", "/uploads", json={
        "name": "big/one-gib", "size": size, "md5Hash": base64.b64encode(md5.digest()).decode()}).json()["uploadId"]

    half = size // 2
    cut = threading.Thread(target=send_cut, args=(client, f"/uploads/{upload_id}",
                                                   {"Content-Range": f"bytes 0-{half - 1}/{size}"},
                                                   b"".join(pattern(half)), half - 3 * MiB))
    cut.start()
    cut.join()
    received = wait_received(client, upload_id, half - 3 * MiB)
    assert half - 4 * MiB < received <= half - 3 * MiB
    for _ in range(50):  # until the server has seen the cut request end (it holds the upload until then)
        done = client.request("PUT", f"/uploads/{upload_id}",
                              data=StreamedBody(pattern(size, received), size - received),
                              headers={"Content-Range": f"bytes {received}-{size - 1}/{size}"})
        if done.status_code != 409:
            break
        time.sleep(0.2)
    assert done.status_code == 200, done.text
    growth = _peak_rss(workers) - before
    assert growth < 64 * MiB, f"the API's resident memory grew by {growth / MiB:.0f} MiB"

    downloaded = hashlib.md5()
    with client.request("GET", "/objects/big/one-gib", stream=True) as got:
        for piece in got.iter_content(MiB):
            downloaded.update(piece)
    assert downloaded.digest() == md5.digest()
    client.request("DELETE", "/objects/big/one-gib")
