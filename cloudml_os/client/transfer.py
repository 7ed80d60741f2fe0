"""Moving bytes between local files and the project's objects (``store://PROJECT/NAME``), across broken links.

An upload of at most ``resumable_threshold`` bytes is one ``PUT …/objects/NAME`` with ``Content-MD5``; a
larger one opens a resumable session (``POST …/uploads`` with its ``md5Hash``) and sends ``chunk_bytes`` at a
time with ``Content-Range``. Either way the API verifies the MD5 before the object becomes visible. A download
streams into a file the caller opened (a temporary file beside the target, or stdout) and is checked against
``X-Content-MD5`` when the API sends it.

A broken connection (refused, reset, timed out, a body cut short) or a 502/503/504 answer is tried again
after a pause that doubles: an upload first asks its session how many bytes it kept (``GET …/uploads/ID``)
and goes on from there; a download asks for the rest with ``Range``, and starts again only if the object
changed meanwhile (its ``ETag``). ``attempts`` failures in a row without a byte of progress give up. Files are
read and written a piece at a time, never whole in memory. This module speaks the protocol and prints nothing:
progress and retries reach the caller through callbacks.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import re
import time
import urllib.parse
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO, TypeVar

import requests

from cloudml_os.client.rest import ApiClient, CliError

MiB = 1 << 20
CHUNK_BYTES = 8 * MiB  # also the API's max_request_bytes default is 16 MiB: a chunk fits any request limit
RESUMABLE_THRESHOLD = 8 * MiB
PIECE = MiB  # bytes read, hashed or written at a time
TRANSFER_TIMEOUT = (30, 600)  # connect, then read: the last chunk of an upload is verified before the answer
RETRIED_STATUSES = frozenset({502, 503, 504})

SCHEME = "store://"
MAX_NAME_BYTES = 1024
# The API's rules (docs/api.md, "Objects"), checked here so that a bad name is refused before any byte moves.
_PROJECT_ID = re.compile(r"[a-z][a-z0-9-]{0,61}\Z")
_REFUSED_IN_NAME = re.compile(r"[\x00-\x1f\x7f-\x9f\ud800-\udfff]")

Progress = Callable[[int], None]  # bytes done so far; it goes back when a retry resends bytes
T = TypeVar("T")


# ---- names ---------------------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class StoreUri:
    """``store://PROJECT/NAME``: ``name`` is ``""`` for the project's top, and ends with ``/`` for a folder."""

    project: str
    name: str

    def __str__(self) -> str:
        return f"{SCHEME}{self.project}/{self.name}"

    @property
    def is_folder(self) -> bool:
        return self.name == "" or self.name.endswith("/")

    @property
    def prefix(self) -> str:
        """The name as a folder, to list or copy under: ``""`` or ending with ``/``."""
        return self.name if self.is_folder else self.name + "/"

    @property
    def basename(self) -> str:
        """The last segment of the name (the project for the project's top)."""
        return self.name.rstrip("/").rpartition("/")[2] or self.project

    def join(self, relative: str) -> StoreUri:
        """The object ``relative`` (``/``-separated) under this URI as a folder."""
        return StoreUri(self.project, self.prefix + relative)


def is_store_uri(text: str) -> bool:
    return text.startswith(SCHEME)


def parse_uri(text: str) -> StoreUri:
    """``store://PROJECT``, ``store://PROJECT/`` or ``store://PROJECT/NAME`` (``NAME/``: a folder).

    :raises CliError: (exit 2) another shape, a project id the API cannot have, or an invalid name.
    """
    if not text.startswith(SCHEME):
        raise CliError(f"{_shown(text)} is not a store://PROJECT/NAME URI", 2)
    project, _, name = text[len(SCHEME):].partition("/")
    if not _PROJECT_ID.match(project):
        raise CliError(f"{_shown(text)}: {_shown(project)} is not a project id (store://PROJECT/NAME)", 2)
    if name:
        check_name(name.removesuffix("/"), text)
    return StoreUri(project, name)


def check_name(name: str, shown: str) -> str:
    """``name`` when it is an object name the API takes: ``/``-separated segments, none empty, ``.`` or ``..``,
    no control characters, at most 1024 bytes in UTF-8.

    :param shown: what the message names (the URI or the local file the name came from).
    :raises CliError: (exit 2) it is not.
    """
    try:
        size = len(name.encode("utf-8"))
    except UnicodeEncodeError:  # a local file name that is not UTF-8 (os.fsdecode's surrogates)
        size = MAX_NAME_BYTES + 1
    if (not name or size > MAX_NAME_BYTES or _REFUSED_IN_NAME.search(name)
            or any(segment in ("", ".", "..") for segment in name.split("/"))):
        raise CliError(f"{_shown(shown)}: not a valid object name: '/'-separated segments, none empty, '.' or "
                       f"'..', no control characters, at most {MAX_NAME_BYTES} bytes in UTF-8", 2)
    return name


def _shown(text: str) -> str:
    return text if text.isprintable() and len(text) <= 200 else repr(text)[:200]


def object_path(name: str) -> str:
    """The API path of object ``name`` (each segment percent-encoded)."""
    return "/objects/" + urllib.parse.quote(name, safe="/")


# ---- local bytes ---------------------------------------------------------------------------------------

def md5_of(source: BinaryIO, on_progress: Progress = lambda done: None) -> tuple[str, int]:
    """The base64 MD5 (as ``Content-MD5`` and ``md5Hash`` write it) and the size of what ``source`` holds from
    where it is; read a piece at a time."""
    digest, size = hashlib.md5(usedforsecurity=False), 0
    while piece := source.read(PIECE):
        digest.update(piece)
        size += len(piece)
        on_progress(size)
    return base64.b64encode(digest.digest()).decode(), size


def copy_hashed(source: BinaryIO, target: BinaryIO) -> tuple[str, int]:
    """Copy ``source`` to ``target`` a piece at a time; the base64 MD5 and size of what was copied."""
    digest, size = hashlib.md5(usedforsecurity=False), 0
    while piece := source.read(PIECE):
        target.write(piece)
        digest.update(piece)
        size += len(piece)
    return base64.b64encode(digest.digest()).decode(), size


class FileSlice:
    """``length`` bytes of an open file from ``first``, as a request body that ``requests`` sends with a
    ``Content-Length`` and reads a piece at a time; ``on_progress`` hears the file offset reached.

    Deliberately not an ``io`` object (see ``rest.MultipartFile``): ``requests`` would fall back to chunked
    transfer, which the API refuses."""

    def __init__(self, file: BinaryIO, first: int, length: int, on_progress: Progress = lambda done: None):
        self._file, self._offset, self._left, self._on_progress = file, first, length, on_progress
        self._length = length
        file.seek(first)

    def __len__(self) -> int:
        return self._length

    def read(self, size: int | None = -1) -> bytes:
        size = self._left if size is None or size < 0 else min(size, self._left)
        piece = self._file.read(size) if size else b""
        self._left -= len(piece)
        self._offset += len(piece)
        if piece:
            self._on_progress(self._offset)
        return piece


# ---- retrying ------------------------------------------------------------------------------------------

class _Retry(Exception):
    """An answer worth trying again: 502/503/504, or 409 ``ABORTED`` to a resumable upload's chunk (sent from
    another offset than the session's, or while a broken request of it is still being written)."""


def is_transient(exc: BaseException) -> bool:
    """A failure of the link rather than a refusal: worth a pause and another try."""
    if isinstance(exc, requests.exceptions.SSLError):
        return False  # a certificate does not get better by asking again
    return isinstance(exc, (_Retry, requests.ConnectionError, requests.Timeout,
                            requests.exceptions.ChunkedEncodingError))


def _answer(api: ApiClient, response: requests.Response) -> Any:
    """The JSON of a good answer. :raises _Retry: 502/503/504; :raises ApiError: any other error."""
    if response.status_code in RETRIED_STATUSES:
        raise _Retry(f"the API answered {response.status_code}")
    if response.status_code >= 400:
        raise api.error(response)
    try:
        return response.json()
    except ValueError:
        raise CliError(f"the API at {api.endpoint} answered {response.request.method} {response.url} with "
                       "something that is not JSON") from None


@dataclasses.dataclass
class Transfers:
    """Uploads and downloads of one project's objects.

    :param api: the project's API client; its ``session`` carries every request (a test gives it a transport
        adapter that breaks connections).
    :param attempts: failures in a row, without a byte of progress in between, before giving up.
    :param backoff: the first pause after a failure, in seconds; it doubles up to ``max_backoff``.
    :param sleep: how to pause (a test passes one that does not wait).
    :param on_retry: told a one-line message before each pause.
    """

    api: ApiClient
    chunk_bytes: int = CHUNK_BYTES
    resumable_threshold: int = RESUMABLE_THRESHOLD
    attempts: int = 5
    backoff: float = 0.5
    max_backoff: float = 30.0
    sleep: Callable[[float], None] = time.sleep
    on_retry: Callable[[str], None] = lambda message: None

    def _retrying(self, step: Callable[[], T], progress: Callable[[], int], what: str) -> T:
        """``step()``, tried again after each transient failure, until it returns or ``attempts`` of them
        fail in a row with ``progress()`` standing still.

        :raises CliError: the last failure (a connection failure as one line, an answer as the API's message).
        """
        failures, seen = 0, progress()
        while True:
            try:
                return step()
            except Exception as exc:
                if isinstance(exc, requests.RequestException) and not is_transient(exc):
                    raise self.api.unreachable(exc) from None
                if not is_transient(exc):
                    raise
                if progress() != seen:
                    failures, seen = 0, progress()
                failures += 1
                if failures >= self.attempts:
                    if isinstance(exc, _Retry):
                        raise CliError(f"{what}: {exc}") from None
                    raise self.api.unreachable(exc) from None
                pause = min(self.backoff * 2 ** (failures - 1), self.max_backoff)
                self.on_retry(f"{what}: {_reason(exc)}; trying again in {pause:g} s "
                              f"({failures}/{self.attempts - 1})")
                self.sleep(pause)

    # ---- uploads ---------------------------------------------------------------------------------------

    def upload(self, source: BinaryIO, size: int, md5: str, name: str,
               on_progress: Progress = lambda done: None) -> dict[str, Any]:
        """Store ``size`` bytes of the seekable ``source`` (from offset 0) as object ``name``; the object.

        :param md5: the base64 MD5 of those bytes (:func:`md5_of`), which the API verifies.
        :raises CliError: the API refused (its v1 message), or the link failed ``attempts`` times in a row.
        """
        if size <= self.resumable_threshold:
            return self._put_object(source, size, md5, name, on_progress)
        return self._resumable(source, size, md5, name, on_progress)

    def _put_object(self, source: BinaryIO, size: int, md5: str, name: str,
                    on_progress: Progress) -> dict[str, Any]:
        def step() -> dict[str, Any]:
            on_progress(0)
            return _answer(self.api, self.api.send(
                "PUT", object_path(name), data=FileSlice(source, 0, size, on_progress), timeout=TRANSFER_TIMEOUT,
                headers={"Content-Type": "application/octet-stream", "Content-MD5": md5}))
        return self._retrying(step, lambda: 0, f"uploading {name}")

    def _resumable(self, source: BinaryIO, size: int, md5: str, name: str,
                   on_progress: Progress) -> dict[str, Any]:
        what = f"uploading {name}"
        start = {"name": name, "size": size, "md5Hash": md5}
        session = self._retrying(lambda: _answer(self.api, self.api.send("POST", "/uploads", json=start)),
                                 lambda: 0, what)
        upload = _Upload(self, session, md5, source, on_progress)
        try:
            while True:
                answer = self._retrying(upload.send_next, lambda: upload.received, what)
                if "object" in answer:
                    return answer["object"]
        except BaseException:
            upload.abandon()
            raise

    # ---- downloads -------------------------------------------------------------------------------------

    def download(self, name: str, target: BinaryIO, on_start: Callable[[int], None] = lambda size: None,
                 on_progress: Progress = lambda done: None, restartable: bool = True) -> int:
        """Write object ``name`` into ``target`` (empty, at its start); the size written.

        :param on_start: told the object's size once it is known (and again if the download starts over).
        :param restartable: whether ``target`` can be emptied to start over (a file, not stdout), should the
            object change between a broken read and its resumption.
        :raises CliError: the API refused (its v1 message: no such object…), the link failed ``attempts``
            times in a row, or the bytes do not have the MD5 the API announced.
        """
        download = _Download(self, name, target, on_start, on_progress, restartable)
        self._retrying(download.read_rest, lambda: download.written, f"downloading {name}")
        download.verify()
        return download.written


class _Upload:
    """One resumable upload session's bookkeeping: where the bytes stand, and when to ask the API."""

    def __init__(self, transfers: Transfers, session: dict[str, Any], md5: str, source: BinaryIO,
                 on_progress: Progress):
        self.transfers, self.api = transfers, transfers.api
        self.upload_id, self.name, self.size, self.md5 = session["uploadId"], session["name"], int(session["size"]), md5
        self.received: int = int(session.get("received", 0))
        self.in_step = True  # whether `received` is what the API holds (False after a failed request)
        self.source, self.on_progress = source, on_progress
        # The API keeps whole units of chunkBytes (Swift segments): send multiples of it.
        unit = int(session.get("chunkBytes") or 1)
        self.chunk = max(unit, -(-transfers.chunk_bytes // unit) * unit)

    @property
    def path(self) -> str:
        return f"/uploads/{self.upload_id}"

    def send_next(self) -> dict[str, Any]:
        """Send the next chunk from where the API stands; its answer (with ``object`` once complete)."""
        if not self.in_step:
            response = self.api.send("GET", self.path)
            if response.status_code == 404 and (stored := self._committed()) is not None:
                return {"received": self.size, "object": stored}  # the last answer was lost, not the upload
            self.received, self.in_step = int(_answer(self.api, response)["received"]), True
        first = self.received
        self.on_progress(first)
        last = min(first + self.chunk, self.size) - 1
        self.in_step = False
        response = self.api.send("PUT", self.path, data=FileSlice(self.source, first, last - first + 1,
                                                                  self.on_progress),
                                 headers={"Content-Type": "application/octet-stream",
                                          "Content-Range": f"bytes {first}-{last}/{self.size}"},
                                 timeout=TRANSFER_TIMEOUT)
        if response.status_code == 409:  # ABORTED: out of step, or an earlier request still writing
            raise _Retry(self.api.error(response).format_message())
        answer = _answer(self.api, response)
        self.received, self.in_step = int(answer["received"]), True
        if "object" not in answer and self.received <= first:
            raise CliError(f"uploading {answer.get('name', self.upload_id)}: the API kept none of the "
                           f"{last - first + 1} bytes sent (it keeps whole units of {self.chunk} bytes)")
        return answer

    def _committed(self) -> dict[str, Any] | None:
        """The object, if a completing chunk whose answer was lost has stored these very bytes."""
        listed = _answer(self.api, self.api.send("GET", "/objects", params={"prefix": self.name, "pageSize": 1}))
        found = [stored for stored in listed.get("objects", []) if stored.get("name") == self.name]
        if found and found[0].get("md5Hash") == self.md5 and int(found[0].get("size", -1)) == self.size:
            return found[0]
        return None

    def abandon(self) -> None:
        """Drop the session, best effort (the API removes forgotten ones after a week anyway)."""
        try:
            self.api.send("DELETE", self.path, timeout=5)
        except requests.RequestException:
            pass


class _Download:
    """One download's bookkeeping: bytes written, their MD5 so far, and what the API said of the object."""

    def __init__(self, transfers: Transfers, name: str, target: BinaryIO, on_start: Callable[[int], None],
                 on_progress: Progress, restartable: bool):
        self.transfers, self.name, self.target = transfers, name, target
        self.on_start, self.on_progress, self.restartable = on_start, on_progress, restartable
        self.written = 0
        self.size: int | None = None
        self.etag: str | None = None
        self.md5: str | None = None  # base64, as the API announced it
        self.digest = hashlib.md5(usedforsecurity=False)

    def read_rest(self) -> None:
        headers = {"Range": f"bytes={self.written}-"} if self.written else {}
        response = self.transfers.api.send("GET", object_path(self.name), headers=headers, stream=True,
                                           timeout=TRANSFER_TIMEOUT)
        with response:
            if response.status_code in RETRIED_STATUSES:
                raise _Retry(f"the API answered {response.status_code}")
            if response.status_code >= 400:
                raise self.transfers.api.error(response)
            self._begin(response)
            for piece in _pieces(response):
                self.target.write(piece)
                self.digest.update(piece)
                self.written += len(piece)
                self.on_progress(self.written)
        if self.size is not None and self.written < self.size:  # an answer that ended early but cleanly
            raise _Retry(f"the answer ended after {self.written} of {self.size} bytes")

    def _begin(self, response: requests.Response) -> None:
        """Take the object's size, ETag and MD5 from a first answer; check a resumed one continues it."""
        etag = response.headers.get("ETag")
        if self.written:
            resumed = response.status_code == 206 and _range_start(response) == self.written
            if resumed and (etag == self.etag or not (etag and self.etag)):
                return
            if not self.restartable:
                raise CliError(f"downloading {self.name}: the object changed while it was read; the output holds "
                               f"a part of the old one")
            self.target.seek(0)
            self.target.truncate()
            self.written, self.digest = 0, hashlib.md5(usedforsecurity=False)
            if response.status_code == 206:  # a part of the new object: read it whole instead
                raise _Retry("the object changed while it was read; starting over")
        self.etag, self.md5 = etag, response.headers.get("X-Content-MD5")
        length = response.headers.get("Content-Length")
        self.size = int(length) if length is not None and length.isdigit() else None
        self.on_start(self.size if self.size is not None else 0)

    def verify(self) -> None:
        """:raises CliError: the bytes do not have the size or MD5 the API announced."""
        if self.size is not None and self.written != self.size:
            raise CliError(f"downloading {self.name}: {self.written} bytes came, not {self.size}")
        got = base64.b64encode(self.digest.digest()).decode()
        if self.md5 and got != self.md5:
            raise CliError(f"downloading {self.name}: the bytes have MD5 {got}, the API announced {self.md5}")


def _pieces(response: requests.Response) -> Iterator[bytes]:
    return response.iter_content(chunk_size=PIECE)


def _range_start(response: requests.Response) -> int | None:
    match = re.match(r"bytes (\d+)-\d+/\d+\Z", response.headers.get("Content-Range", ""))
    return int(match.group(1)) if match else None


def _reason(exc: BaseException) -> str:
    if isinstance(exc, _Retry):
        return str(exc)
    if isinstance(exc, requests.Timeout):
        return "timed out"
    if isinstance(exc, requests.exceptions.ChunkedEncodingError):
        return "the connection broke during the answer"
    return "the connection broke"
