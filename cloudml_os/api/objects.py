"""``/v1/projects/{p}/objects`` and ``…/uploads``: the project's object store (an added resource).

What Cloud Storage is to Cloud ML Engine: data sets, packages, job directories and exported models, each an
object ``store://PROJECT/NAME``. Bodies stream between the client and the artifact store in 1 MiB pieces; no
object is ever held whole in memory or in a temporary file. A plain ``PUT`` sends one object in one request;
a resumable upload (as Cloud Storage's) survives broken connections: the session is a database row, the bytes
kept are the artifact store's (which alone can say how many survived a cut), so any API process may take the
next piece. Checksums a client sends are checked before an object becomes visible. docs/api.md has the
protocol with examples.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import re
import uuid
from collections.abc import Iterable
from typing import IO, Any

from flask import Response, current_app, request
from marshmallow import Schema, ValidationError, fields, validate, validates
from werkzeug.exceptions import ClientDisconnected
from werkzeug.wsgi import wrap_file

from cloudml_os.api import ApiBlueprint, services
from cloudml_os.api.schemas import Int64, Timestamp
from cloudml_os.artifacts import (
    ArtifactError,
    ChecksumMismatch,
    Expected,
    Hashes,
    IncompleteBody,
    ObjectInfo,
    b64_digest,
    make_uri,
    parse_uri,
)
from cloudml_os.errors import Aborted, InvalidArgument, NotFound, OutOfRange, RequestTooLarge
from cloudml_os.store.models import ObjectUpload

blp = ApiBlueprint("objects", __name__, url_prefix="/v1/projects/<project:project>",
                   description="The project's objects (added resource): data sets, packages, job directories, "
                               "models; resumable uploads.")

MAX_SEGMENTS = 1000  # a resumable upload is kept in at most this many chunks (Swift's limit on an SLO)
MiB = 1 << 20
_CONTENT_RANGE = re.compile(r"bytes (?:(\d+)-(\d+)|\*)/(\d+)\Z")
_HEX_SHA256 = re.compile(r"[0-9a-f]{64}\Z")
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


class ObjectSchema(Schema):
    name = fields.String()
    uri = fields.String()
    size = Int64()
    md5Hash = fields.String()
    updated = Timestamp()


class ObjectListSchema(Schema):
    objects = fields.List(fields.Nested(ObjectSchema))
    prefixes = fields.List(fields.String())
    nextPageToken = fields.String()


class ObjectListArgs(Schema):
    prefix = fields.String(load_default="", validate=validate.Length(max=1024))
    delimiter = fields.String(load_default="", validate=validate.OneOf(["", "/"]))
    pageSize = fields.Integer(load_default=1000, validate=validate.Range(min=1, max=1000))
    pageToken = fields.String(load_default="")

    @validates("prefix")
    def _plain(self, value: str, **_: Any) -> None:
        if _CONTROL.search(value):
            raise ValidationError("must not hold control characters")


class DeleteArgs(Schema):
    recursive = fields.Boolean(load_default=False)


class UploadStartSchema(Schema):
    name = fields.String(required=True)
    size = Int64(required=True, validate=validate.Range(min=0))
    md5Hash = fields.String()
    sha256 = fields.String()

    @validates("md5Hash")
    def _md5(self, value: str, **_: Any) -> None:
        _md5_hex(value, "md5Hash")

    @validates("sha256")
    def _sha256(self, value: str, **_: Any) -> None:
        if not _HEX_SHA256.match(value):
            raise ValidationError("must be 64 lowercase hex digits")


class UploadSchema(Schema):
    uploadId = fields.String(attribute="upload_id")
    name = fields.String()
    uri = fields.String()
    size = Int64()
    received = Int64()
    chunkBytes = Int64(attribute="chunk_bytes")
    expireTime = Timestamp(attribute="expire_time")
    object = fields.Nested(ObjectSchema)


# ---- objects --------------------------------------------------------------------------------------

@blp.route("/objects/<path:name>", methods=["PUT"])
@blp.response(200, ObjectSchema)
def put_object(project: str, name: str) -> dict[str, Any]:
    """Upload one object; its bytes are the body (send ``Content-Length``; optional ``Content-MD5`` and
    ``X-Content-SHA256`` are verified before the object becomes visible)."""
    svc = services()
    uri = _uri(project, name)
    size = _body_length(svc.settings.max_object_bytes)
    expected = Expected(md5=_header_md5(), sha256=_header_sha256())
    try:
        info = svc.artifacts.write_object(project, parse_uri(uri)[1], _Body(request.stream), size, expected)
    except ChecksumMismatch as exc:
        raise InvalidArgument(f"{_checksum_header(expected)}: {exc}") from None
    except IncompleteBody as exc:
        raise InvalidArgument(f"{exc}; nothing was stored") from None
    except ArtifactError as exc:
        raise InvalidArgument(str(exc)) from None
    return _object(project, info)


@blp.route("/objects/<path:name>", methods=["GET"])
def get_object(project: str, name: str) -> Response:
    """Download an object (``Range`` honoured: one range, answered 206); ``HEAD`` gives its headers."""
    svc = services()
    uri = _uri(project, name)
    info = svc.artifacts.stat(uri)
    if info is None:
        raise NotFound(f"{uri} does not exist")
    first, length, status = 0, info.size, 200
    headers = {"Accept-Ranges": "bytes", "Last-Modified": _http_date(info.updated)}
    if info.md5:
        headers.update({"ETag": f'"{info.md5}"', "X-Content-MD5": b64_digest(info.md5)})
    if request.range is not None or "Range" in request.headers:
        wanted = request.range.range_for_length(info.size) if request.range is not None else None
        if wanted is None and request.range is not None:
            raise OutOfRange(f"Range {request.headers['Range']!r} is not satisfiable: {uri} has {info.size} "
                             "bytes", headers={"Content-Range": f"bytes */{info.size}"})
        if wanted is not None:
            first, stop = wanted
            length, status = stop - first, 206
            headers["Content-Range"] = f"bytes {first}-{stop - 1}/{info.size}"
    body: Iterable[bytes] = iter(())
    if request.method != "HEAD":
        local = svc.artifacts.open_object(uri)
        if local is not None:  # gunicorn sends a wrapped file with sendfile from its position, Content-Length bytes
            local.seek(first)
            body = wrap_file(request.environ, local, buffer_size=1 << 20)  # pieces where it is iterated instead
        else:
            body = svc.artifacts.read_range(uri, first, length)
    response = Response(body, status=status, mimetype="application/octet-stream", headers=headers,
                        direct_passthrough=True)
    response.content_length = length
    return response


@blp.route("/objects", methods=["GET"])
@blp.arguments(ObjectListArgs, location="query")
@blp.response(200, ObjectListSchema)
def list_objects(args: dict[str, Any], project: str) -> dict[str, Any]:
    """The project's objects under ``prefix`` in name order, a page at a time; with ``delimiter=/`` the names
    below the next ``/`` are rolled up into ``prefixes``, as Cloud Storage lists folders."""
    artifacts = services().artifacts
    prefix, delimiter, page_size = args["prefix"], args["delimiter"], args["pageSize"]
    after = _decode_token(args["pageToken"]) if args["pageToken"] else ""
    objects: list[dict[str, Any]] = []
    prefixes: list[str] = []
    more = True
    while more and len(objects) + len(prefixes) < page_size:
        batch = artifacts.list_objects(project, prefix, after, page_size)
        more = len(batch) == page_size
        for info in batch:
            after = info.key
            folder = _rolled_up(info.key, prefix, delimiter)
            if folder is not None:
                if not prefixes or prefixes[-1] != folder:
                    prefixes.append(folder)
                    after = folder + "\U0010ffff"  # every name in the folder sorts before this
                    more = True
                    break
                continue
            objects.append(_object(project, info))
            if len(objects) + len(prefixes) >= page_size:
                break
    body: dict[str, Any] = {"objects": objects, "prefixes": prefixes}
    if more and (objects or prefixes):
        body["nextPageToken"] = base64.urlsafe_b64encode(after.encode()).decode()
    return body


@blp.route("/objects/<path:name>", methods=["DELETE"])
@blp.arguments(DeleteArgs, location="query")
def delete_object(args: dict[str, Any], project: str, name: str) -> dict[str, int]:
    """Delete an object; with ``recursive=true`` also every object under ``NAME/``."""
    artifacts = services().artifacts
    uri = _uri(project, name)
    key = parse_uri(uri)[1]
    deleted = int(artifacts.delete_object(uri))
    if args["recursive"]:
        while batch := artifacts.list_objects(project, key + "/", "", 1000):
            deleted += sum(artifacts.delete_object(make_uri(project, info.key)) for info in batch)
    if not deleted:
        raise NotFound(f"{uri} does not exist" + ("" if args["recursive"] else " (a folder? add recursive=true)"))
    return {"deleted": deleted}


# ---- resumable uploads ----------------------------------------------------------------------------

@blp.route("/uploads", methods=["POST"])
@blp.arguments(UploadStartSchema)
@blp.response(200, UploadSchema)
def start_upload(body: dict[str, Any], project: str) -> dict[str, Any]:
    """Start a resumable upload of ``size`` bytes to the object ``name``."""
    svc = services()
    uri = _uri(project, body["name"], field="name")
    if body["size"] > svc.settings.max_object_bytes:
        raise RequestTooLarge(f"size: an object may be at most {svc.settings.max_object_bytes} bytes")
    # Chunks of whole MiB, large enough that the object needs at most MAX_SEGMENTS of them.
    chunk = max(svc.settings.upload_chunk_bytes, -(-body["size"] // MAX_SEGMENTS // MiB) * MiB)
    upload = svc.store.add(ObjectUpload(
        upload_id=uuid.uuid4().hex, project=project, name=parse_uri(uri)[1], size=body["size"],
        chunk_bytes=chunk, md5=_md5_hex(body["md5Hash"], "md5Hash") if "md5Hash" in body else None,
        sha256=body.get("sha256")))
    return _session(upload, 0)


@blp.route("/uploads/<upload_id>", methods=["GET"])
def get_upload(project: str, upload_id: str) -> Response:
    """How many bytes of the upload are kept (``received``; also the ``X-Upload-Received`` header)."""
    upload = _upload(project, upload_id)
    received = services().artifacts.upload_received(project, upload_id, upload.size, upload.chunk_bytes)
    return _session_response(upload, received)


@blp.route("/uploads/<upload_id>", methods=["PUT"])
def put_upload(project: str, upload_id: str) -> Response:
    """Send the bytes ``Content-Range: bytes FIRST-LAST/SIZE`` (FIRST = ``received``); the request that
    completes the upload commits the object. ``bytes */SIZE`` with no body asks for the state (and commits an
    empty object)."""
    svc = services()
    upload = _upload(project, upload_id)
    first, last, total = _content_range(upload.size)
    received = svc.artifacts.upload_received(project, upload_id, upload.size, upload.chunk_bytes)
    expected = Expected(md5=upload.md5, sha256=upload.sha256)
    hashes = None
    if first is not None:
        length = _body_length(upload.size)
        if length != last - first + 1:
            raise InvalidArgument(f"Content-Range: {last - first + 1} bytes announced, Content-Length is {length}")
        if first != received:
            raise Aborted(f"the upload has {received} bytes; send the bytes from offset {received}",
                          headers={"X-Upload-Received": str(received)})
        svc.store.touch_object_upload(upload_id)
        hashes = Hashes(expected) if first == 0 and last + 1 == total else None
        try:
            received = svc.artifacts.upload_write(project, upload_id, first, _Body(request.stream), length,
                                                  upload.size, upload.chunk_bytes, hashes)
        except IncompleteBody as exc:
            raise InvalidArgument(f"{exc}; ask the upload how many bytes it kept and resume") from None
        except ArtifactError as exc:  # another request holds the upload: the client asks again later
            kept = svc.artifacts.upload_received(project, upload_id, upload.size, upload.chunk_bytes)
            raise Aborted(str(exc), headers={"X-Upload-Received": str(kept)}) from None
    if received < upload.size:
        return _session_response(upload, received)
    if not svc.store.delete_object_upload(upload_id):
        raise NotFound(f"upload {upload_id} was completed or abandoned by another request")
    try:
        info = svc.artifacts.upload_commit(project, upload_id, upload.name, upload.size, upload.chunk_bytes,
                                           hashes, expected)
    except ChecksumMismatch as exc:
        raise InvalidArgument(f"{'sha256' if upload.sha256 and 'SHA-256' in str(exc) else 'md5Hash'}: {exc}; "
                              "the upload is deleted") from None
    except ArtifactError as exc:
        raise InvalidArgument(f"name: {exc}; the upload is deleted") from None
    return _session_response(upload, received, info)


@blp.route("/uploads/<upload_id>", methods=["DELETE"])
def delete_upload(project: str, upload_id: str) -> dict[str, Any]:
    """Abandon an upload and drop the bytes it kept."""
    svc = services()
    _upload(project, upload_id)
    if svc.store.delete_object_upload(upload_id):
        svc.artifacts.upload_abort(project, upload_id)
    return {}


# ---- helpers --------------------------------------------------------------------------------------

class _Body:
    """The request body as the artifact store reads it: a client that goes away mid-body is an early end
    (which the store turns into :class:`IncompleteBody`), not werkzeug's 400 from deep inside a copy."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream

    def read(self, size: int = -1) -> bytes:
        try:
            return self._stream.read(size)
        except ClientDisconnected:
            return b""


def _uri(project: str, name: str, field: str = "name") -> str:
    uri = make_uri(project, name)
    try:
        if name.endswith("/"):  # parse_uri takes it for a folder; an object's name is never one
            raise ArtifactError(name)
        parse_uri(uri)
    except ArtifactError:
        raise InvalidArgument(f"{field}: {name[:200]!r} is not a valid object name: '/'-separated segments, none "
                              "empty, '.' or '..', no control characters, at most 1024 bytes") from None
    return uri


def _object(project: str, info: ObjectInfo) -> dict[str, Any]:
    body = {"name": info.key, "uri": make_uri(project, info.key), "size": info.size, "updated": info.updated}
    if info.md5:
        body["md5Hash"] = b64_digest(info.md5)
    return body


def _upload(project: str, upload_id: str) -> ObjectUpload:
    upload = services().store.object_upload(project, upload_id) if upload_id.isalnum() else None
    if upload is None:
        raise NotFound(f"upload {upload_id[:64]!r} does not exist (completed, abandoned or expired)")
    return upload


def _session(upload: ObjectUpload, received: int, info: ObjectInfo | None = None) -> dict[str, Any]:
    ttl = dt.timedelta(seconds=services().settings.upload_session_ttl)
    session = {"upload_id": upload.upload_id, "name": upload.name, "uri": make_uri(upload.project, upload.name),
               "size": upload.size, "received": received, "chunk_bytes": upload.chunk_bytes,
               "expire_time": (upload.updated_at or upload.created_at) + ttl}
    if info is not None:
        session["object"] = _object(upload.project, info)
    return session


def _session_response(upload: ObjectUpload, received: int, info: ObjectInfo | None = None) -> Response:
    response = current_app.json.response(UploadSchema().dump(_session(upload, received, info)))
    response.headers["X-Upload-Received"] = str(received)
    return response


def _body_length(limit: int) -> int:
    """The request's Content-Length, which must be there and at most ``limit``; lets the body past the app's
    small default limit."""
    length = request.content_length
    if length is None:
        raise InvalidArgument("Content-Length: send the length of the body")
    if length > limit:
        raise RequestTooLarge(f"the body of {length} bytes is larger than allowed ({limit})")
    request.max_content_length = length
    return length


def _content_range(size: int) -> tuple[int | None, int, int]:
    """(FIRST, LAST, SIZE) of the Content-Range header; FIRST None for ``bytes */SIZE``."""
    match = _CONTENT_RANGE.match(request.headers.get("Content-Range", ""))
    if match is None:
        raise InvalidArgument("Content-Range: expected 'bytes FIRST-LAST/SIZE' or 'bytes */SIZE'")
    first, last, total = (int(v) if v is not None else None for v in match.groups())
    if total != size:
        raise InvalidArgument(f"Content-Range: the upload's size is {size}, not {total}")
    if first is not None and not first <= last < size:
        raise InvalidArgument(f"Content-Range: bytes {first}-{last} are not within the upload's {size} bytes")
    return first, last or 0, size


def _header_md5() -> str | None:
    value = request.headers.get("Content-MD5")
    return None if value is None else _md5_hex(value, "Content-MD5", InvalidArgument)


def _header_sha256() -> str | None:
    value = request.headers.get("X-Content-SHA256")
    if value is None:
        return None
    if not _HEX_SHA256.match(value.lower()):
        raise InvalidArgument("X-Content-SHA256: expected 64 hex digits")
    return value.lower()


def _md5_hex(value: str, name: str, error: type[Exception] = ValidationError) -> str:
    """A base64 MD5 (as ``Content-MD5`` and Cloud Storage's ``md5Hash`` write it) as hex."""
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != 16:
        message = "expected the base64 of a 16-byte MD5 digest"
        raise error(f"{name}: {message}" if error is not ValidationError else message)
    return raw.hex()


def _checksum_header(expected: Expected) -> str:
    return "X-Content-SHA256" if expected.sha256 and not expected.md5 else "Content-MD5" if not expected.sha256 \
        else "Content-MD5/X-Content-SHA256"


def _rolled_up(key: str, prefix: str, delimiter: str) -> str | None:
    """The "folder" (prefix up to and with the next delimiter) a key lists under, or None to list the key."""
    if not delimiter:
        return None
    index = key.find(delimiter, len(prefix))
    return None if index < 0 else key[:index + 1]


def _decode_token(token: str) -> str:
    try:
        return base64.urlsafe_b64decode(token.encode()).decode()
    except (binascii.Error, ValueError, UnicodeDecodeError):
        raise InvalidArgument("pageToken: not a token this API gave") from None


def _http_date(moment: dt.datetime) -> str:
    return moment.replace(tzinfo=dt.UTC).strftime("%a, %d %b %Y %H:%M:%S GMT")
