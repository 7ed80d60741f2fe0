"""``/v1/projects/{p}/packages``: upload trainer packages and list them (an added resource).

Cloud ML Engine takes ``gs://`` package URIs; here a client uploads the package first and puts the
returned ``store://`` URI in ``trainingInput.packageUris``. An upload is inspected in a temporary
folder (see :mod:`cloudml_os.archives`) and only reaches the artifact store and the database once it
has passed, so a refused archive leaves nothing behind. Objects are named by content
(``packages/{sha256[:16]}/{filename}``), so uploading the same file twice returns the same package.
"""

from __future__ import annotations

import hashlib
import tempfile
from pathlib import Path
from typing import IO, Any

from flask import current_app, request
from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from werkzeug.datastructures import FileStorage

from cloudml_os.api import ApiBlueprint, services
from cloudml_os.api.schemas import PackageListSchema, PackageSchema, PackageUploadSchema
from cloudml_os.archives import ArchiveError, archive_format, inspect_archive, safe_filename
from cloudml_os.artifacts import make_uri
from cloudml_os.errors import AlreadyExists, InvalidArgument, RequestTooLarge
from cloudml_os.store import Package

blp = ApiBlueprint("packages", __name__, url_prefix="/v1/projects/<project:project>",
                   description="Trainer packages (added resource): upload once, then name in packageUris.")

MULTIPART_OVERHEAD = 1 << 20  # room for the multipart framing around the file


@blp.before_request
def _allow_package_sized_bodies() -> None:
    """Other endpoints keep the app's small body limit; this one takes archives up to the package cap."""
    request.max_content_length = current_app.config["PACKAGE_MAX_BYTES"] + MULTIPART_OVERHEAD


def _copy_and_hash(source: IO[bytes], target: Path, limit: int) -> tuple[str, int]:
    """Copy the upload to ``target``; return its SHA-256 and size. :raises RequestTooLarge: over ``limit``."""
    digest = hashlib.sha256()
    size = 0
    with target.open("wb") as out:
        while chunk := source.read(1 << 20):
            size += len(chunk)
            if size > limit:
                raise RequestTooLarge(f"file: a package may be at most {limit} bytes")
            digest.update(chunk)
            out.write(chunk)
    return digest.hexdigest(), size


@blp.route("/packages", methods=["POST"])
@blp.arguments(PackageUploadSchema, location="files")
@blp.response(200, PackageSchema)
def upload_package(files: dict[str, Any], project: str) -> Package:
    """Upload a trainer package (multipart field ``file``): a Python sdist or wheel, or a .tar.gz/.tgz/.tar/.zip."""
    svc = services()
    upload: FileStorage = files["file"]
    try:
        filename = safe_filename(upload.filename or "")
        archive_format(filename)
    except ArchiveError as exc:
        raise InvalidArgument(f"file: {exc}") from None
    with tempfile.TemporaryDirectory(prefix="cloudml-os-upload-") as staging:
        path = Path(staging) / filename
        sha256, size = _copy_and_hash(upload.stream, path, current_app.config["PACKAGE_MAX_BYTES"])
        try:
            info = inspect_archive(path, filename)
        except ArchiveError as exc:
            raise InvalidArgument(f"file: {exc}") from None
        key = f"packages/{sha256[:16]}/{filename}"
        existing = svc.store.package_by_uri(make_uri(project, key))
        if existing is not None:
            if existing.sha256 != sha256:  # a 64-bit prefix collision: refuse rather than overwrite
                raise AlreadyExists(f"{existing.uri} already exists with other content")
            return existing
        with path.open("rb") as source:
            uri = svc.artifacts.put_file(project, key, source)
    package = Package(project=project, uri=uri, filename=filename, kind=info.kind, sha256=sha256, size=size)
    try:
        svc.store.add(package)
    except IntegrityError:  # the same file uploaded concurrently: its row is ours too
        return svc.store.package_by_uri(uri) or package
    return package


@blp.route("/packages", methods=["GET"])
@blp.response(200, PackageListSchema)
def list_packages(project: str) -> dict[str, Any]:
    """The project's packages, newest first."""
    with services().store.session() as session:
        packages = list(session.scalars(
            select(Package).where(Package.project == project).order_by(Package.id.desc())))
    return {"packages": packages}
