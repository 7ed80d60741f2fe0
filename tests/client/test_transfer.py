"""The objects protocol of ``cloudml`` without a platform: ``store://`` URIs, and the turns of a transfer a
real API rarely takes (an object replaced between two reads, an answer lost after the upload completed, a
503, a link that stays down), answered by a scripted transport adapter; refusals before any request."""

from __future__ import annotations

import base64
import hashlib
import io
import json

import pytest
import requests
from requests.adapters import HTTPAdapter
from requests.structures import CaseInsensitiveDict
from urllib3.exceptions import ProtocolError

from cloudml_os.client.rest import ApiClient, CliError
from cloudml_os.client.transfer import StoreUri, Transfers, parse_uri
from tests.client.cli_helpers import cli_env, run
from tests.harness import free_port


def md5_b64(data: bytes) -> str:
    return base64.b64encode(hashlib.md5(data).digest()).decode()


class Broken:
    """An answer's body that breaks after ``limit`` bytes."""

    def __init__(self, data: bytes, limit: int):
        self.data, self.limit = data, limit

    def stream(self, amount: int, decode_content: bool = True):
        yield self.data[:self.limit]
        raise ProtocolError("connection broken")

    def close(self) -> None:
        pass


class Scripted(HTTPAdapter):
    """Answers each request with the next of ``answers``: an exception to raise, or (status, headers, body)
    where body is bytes, a JSON-able object or a :class:`Broken` body. Records each request."""

    def __init__(self, *answers):
        super().__init__()
        self.answers = list(answers)
        self.sent: list[requests.PreparedRequest] = []

    def send(self, request, **kwargs):
        self.sent.append(request)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        status, headers, body = answer
        response = requests.Response()
        response.status_code, response.url, response.request = status, request.url, request
        if isinstance(body, (dict, list)):
            body, headers = json.dumps(body).encode(), {"Content-Type": "application/json", **headers}
        response.headers = CaseInsensitiveDict(headers)
        response.raw = body if isinstance(body, Broken) else io.BytesIO(body)
        return response

    def calls(self) -> list[tuple[str, str, str | None]]:
        return [(sent.method, sent.path_url, sent.headers.get("Range") or sent.headers.get("Content-Range"))
                for sent in self.sent]


def transfers(adapter: Scripted, retries: list[str], sleeps: list[float]) -> Transfers:
    session = requests.Session()
    session.mount("http://", adapter)
    return Transfers(ApiClient("http://api.test", "p", "token", session=session), sleep=sleeps.append,
                     on_retry=retries.append, chunk_bytes=4, resumable_threshold=4)


def test_store_uris_name_a_project_and_an_object_or_a_folder():
    assert parse_uri("store://demo") == StoreUri("demo", "")
    assert parse_uri("store://demo/") == StoreUri("demo", "")
    assert parse_uri("store://demo/data/2026/") == StoreUri("demo", "data/2026/")
    uri = parse_uri("store://demo/data/train.csv")
    assert (str(uri), uri.is_folder, uri.basename, uri.prefix) == (
        "store://demo/data/train.csv", False, "train.csv", "data/train.csv/")
    assert parse_uri("store://demo/").basename == "demo" and parse_uri("store://demo/a/").join("b").name == "a/b"
    for bad in ("gs://bucket/x", "store:///x", "store://Demo/x", "store://demo//x", "store://demo/a/../b",
                "store://demo/./b", "store://demo/a\x00b", "store://demo/a\nb", "store://demo/" + "x" * 1025):
        with pytest.raises(CliError) as refused:
            parse_uri(bad)
        assert refused.value.exit_code == 2, bad


def test_a_download_of_an_object_replaced_between_two_reads_starts_over():
    old, new = b"0123456789", b"abcdefghij"
    adapter = Scripted(
        (200, {"Content-Length": "10", "ETag": '"old"', "X-Content-MD5": md5_b64(old)}, Broken(old, 4)),
        (206, {"Content-Length": "6", "ETag": '"new"', "Content-Range": "bytes 4-9/10"}, new[4:]),
        (200, {"Content-Length": "10", "ETag": '"new"', "X-Content-MD5": md5_b64(new)}, new))
    retries, sleeps, target = [], [], io.BytesIO()
    assert transfers(adapter, retries, sleeps).download("data/a", target) == 10
    assert target.getvalue() == new
    assert adapter.calls() == [("GET", "/v1/projects/p/objects/data/a", None),
                               ("GET", "/v1/projects/p/objects/data/a", "bytes=4-"),
                               ("GET", "/v1/projects/p/objects/data/a", None)]
    assert retries == ["downloading data/a: the connection broke during the answer; trying again in 0.5 s (1/4)",
                       "downloading data/a: the object changed while it was read; starting over; trying again in "
                       "0.5 s (1/4)"]


def test_a_download_to_stdout_cannot_start_over_and_says_so():
    old = b"0123456789"
    adapter = Scripted((200, {"Content-Length": "10", "ETag": '"old"'}, Broken(old, 4)),
                       (206, {"ETag": '"new"', "Content-Range": "bytes 4-9/10"}, b"efghij"))
    out = io.BytesIO()
    with pytest.raises(CliError, match="the object changed while it was read"):
        transfers(adapter, [], []).download("a", out, restartable=False)
    assert out.getvalue() == b"0123"


def test_a_download_whose_bytes_do_not_have_the_announced_md5_fails():
    adapter = Scripted((200, {"Content-Length": "3", "X-Content-MD5": md5_b64(b"abc")}, b"abd"))
    with pytest.raises(CliError, match="the bytes have MD5 .* the API announced"):
        transfers(adapter, [], []).download("a", io.BytesIO())


def test_an_upload_whose_completing_answer_was_lost_finds_its_object():
    data = b"0123456789"
    stored = {"name": "big", "uri": "store://p/big", "size": "10", "md5Hash": md5_b64(data)}
    adapter = Scripted(
        (200, {}, {"uploadId": "u1", "name": "big", "size": "10", "received": "0", "chunkBytes": "4"}),
        (200, {}, {"uploadId": "u1", "name": "big", "size": "10", "received": "4"}),
        (200, {}, {"uploadId": "u1", "name": "big", "size": "10", "received": "8"}),
        requests.ConnectionError("reset"),  # the last chunk arrived and was committed; its answer did not
        (404, {}, {"error": {"code": 404, "status": "NOT_FOUND", "message": "upload 'u1' does not exist"}}),
        (200, {}, {"objects": [stored], "nextPageToken": "x"}))
    retries, sleeps = [], []
    assert transfers(adapter, retries, sleeps).upload(io.BytesIO(data), 10, md5_b64(data), "big") == stored
    assert adapter.calls() == [("POST", "/v1/projects/p/uploads", None),
                               ("PUT", "/v1/projects/p/uploads/u1", "bytes 0-3/10"),
                               ("PUT", "/v1/projects/p/uploads/u1", "bytes 4-7/10"),
                               ("PUT", "/v1/projects/p/uploads/u1", "bytes 8-9/10"),
                               ("GET", "/v1/projects/p/uploads/u1", None),
                               ("GET", "/v1/projects/p/objects?prefix=big&pageSize=1", None)]
    assert json.loads(adapter.sent[0].body) == {"name": "big", "size": 10, "md5Hash": md5_b64(data)}
    assert sleeps == [0.5]


def test_an_upload_out_of_step_resends_from_where_the_session_stands():
    data = b"0123456789"
    aborted = {"error": {"code": 409, "status": "ABORTED", "message": "the upload has 6 bytes"}}
    adapter = Scripted(
        (200, {}, {"uploadId": "u1", "name": "n", "size": "10", "received": "0", "chunkBytes": "1"}),
        (409, {"X-Upload-Received": "6"}, aborted),
        (200, {"X-Upload-Received": "6"}, {"uploadId": "u1", "name": "n", "size": "10", "received": "6"}),
        (200, {}, {"uploadId": "u1", "received": "10", "object": {"name": "n"}}))
    retries: list[str] = []
    assert transfers(adapter, retries, []).upload(io.BytesIO(data), 10, md5_b64(data), "n") == {"name": "n"}
    assert [call[2] for call in adapter.calls()] == [None, "bytes 0-3/10", None, "bytes 6-9/10"]
    assert adapter.sent[-1].body.read(100) == b"6789"
    assert retries == ["uploading n: ABORTED: the upload has 6 bytes; trying again in 0.5 s (1/4)"]


def test_a_link_that_stays_down_gives_up_after_the_attempts_with_one_line():
    refused = requests.ConnectionError("Failed to establish a new connection: [Errno 111] Connection refused")
    adapter = Scripted(*[refused] * 5)
    retries, sleeps = [], []
    with pytest.raises(CliError) as failed:
        transfers(adapter, retries, sleeps).upload(io.BytesIO(b"abc"), 3, md5_b64(b"abc"), "x")
    assert failed.value.format_message() == "cannot reach the API at http://api.test: connection refused"
    assert sleeps == [0.5, 1.0, 2.0, 4.0] and len(adapter.sent) == 5
    unavailable = Scripted(*[(503, {}, b"busy")] * 5)
    with pytest.raises(CliError, match=r"^uploading x: the API answered 503$"):
        transfers(unavailable, [], []).upload(io.BytesIO(b"abc"), 3, md5_b64(b"abc"), "x")


def test_mistakes_in_a_command_are_refused_before_any_request(tmp_path):
    (tmp_path / "a.txt").write_text("a")
    (tmp_path / "folder").mkdir()
    env = cli_env(tmp_path / "config.json", endpoint=f"http://127.0.0.1:{free_port()}", project="p", token="t")
    cases = [  # arguments, exit status, stderr starts with
        (["cp", str(tmp_path / "a.txt"), str(tmp_path / "b.txt")], 2, "ERROR: one side of a copy is a store://"),
        (["cp", "store://p/a", "store://p/b"], 2, "ERROR: one side of a copy is a store://"),
        (["cp", str(tmp_path / "a.txt"), "store://p/x/../y"], 2, "ERROR: store://p/x/../y: not a valid object name"),
        (["cp", str(tmp_path / "nothing"), "store://p/x"], 1, f"ERROR: {tmp_path / 'nothing'}: no such file"),
        (["cp", str(tmp_path / "folder"), "store://p/x"], 1, f"ERROR: {tmp_path / 'folder'} is a folder: copy it"),
        (["cp", "-", "store://p/folder/"], 2, "ERROR: store://p/folder/: name the object stdin becomes"),
        (["cp", "-r", "store://p/a", "-"], 2, "ERROR: - (stdout) takes one object, without -r"),
        (["cp", "store://p/a", "store://q/b", str(tmp_path)], 2, "ERROR: the URIs name several projects (p, q)"),
        (["cp", "store://p/a", str(tmp_path / "no" / "such" / "a")], 1, f"ERROR: {tmp_path / 'no' / 'such'}: no"),
        (["rm", "store://p"], 2, "ERROR: store://p/: name an object or a folder"),
        (["rm", "store://p/data/"], 2, "ERROR: store://p/data/ is a folder: remove it with -r"),
        (["ls", "--project", "q", "store://p/data"], 2, "ERROR: the URI names project p, but --project says q"),
    ]
    for args, status, first in cases:
        result = run(env, "objects", *args)
        assert result.exit_code == status, (args, result.output)
        assert result.stderr.startswith(first) and result.stderr.count("\n") == 1, (args, result.stderr)
        assert result.stdout == ""
    assert sorted(path.name for path in tmp_path.iterdir()) == ["a.txt", "folder"]
