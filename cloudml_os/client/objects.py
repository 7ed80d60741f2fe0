"""``cloudml objects cp|ls|rm``: the project's objects (``store://PROJECT/NAME``), as ``gsutil cp|ls|rm``
are Cloud Storage's.

One side of a copy is a ``store://`` URI, the other a local path or ``-`` (stdin, stdout). The URI names the
project; a ``--project`` flag naming another one is refused, not guessed at. Where each file goes is decided
and checked in full (names, files, folders) before the first byte moves, the way ``cp -r`` decides: into a
destination folder that exists, else as it. The moving itself, resumable and verified, is
:mod:`cloudml_os.client.transfer`'s. Progress bars go to stderr on a terminal, one line per file copied;
stdout gets the uploaded objects only when ``--format`` asks for them.
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import tempfile
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any, BinaryIO

import click
from rich.progress import BarColumn, DownloadColumn, Progress, TaskID, TextColumn, TransferSpeedColumn

from cloudml_os.client.context import command, invocation
from cloudml_os.client.output import Column, emit, stderr
from cloudml_os.client.rest import ApiClient, ApiError, CliError
from cloudml_os.client.transfer import (
    CHUNK_BYTES,
    RESUMABLE_THRESHOLD,
    StoreUri,
    Transfers,
    check_name,
    copy_hashed,
    is_store_uri,
    md5_of,
    object_path,
    parse_uri,
)

OBJECT_COLUMNS = [Column("URI", "uri"), Column("SIZE", "size"), Column("UPDATED", "updated"),
                  Column("MD5_HASH", "md5Hash")]


@click.group("objects")
def objects_group() -> None:
    """Copy files to and from the project's objects (store://PROJECT/NAME), list and remove them."""


# ---- what goes where -----------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class Upload:
    source: Path | None  # None: stdin
    target: StoreUri


@dataclasses.dataclass(frozen=True)
class Download:
    source: StoreUri
    target: Path | None  # None: stdout
    make_parents: bool = False  # a file of a folder copied with -r: its folders are made as needed


def _one_project(uris: Sequence[StoreUri]) -> str:
    projects = sorted({uri.project for uri in uris})
    if len(projects) > 1:
        raise CliError(f"the URIs name several projects ({', '.join(projects)}); copy from one at a time", 2)
    return projects[0]


def _api(project: str) -> ApiClient:
    """The client of the project a URI names. :raises CliError: (exit 2) ``--project`` names another one."""
    state = invocation()
    flag = state.flags.get("project")
    if flag and flag != project:
        raise CliError(f"the URI names project {project}, but --project says {flag}", 2)
    return state.api(project)


def _listing(api: ApiClient, prefix: str, recursive: bool, page_size: int = 1000) -> Iterator[dict[str, Any]]:
    """The objects under ``prefix`` in name order, following ``nextPageToken``; without ``recursive`` one
    level, each folder as ``{"name": "data/2026/", "uri": "store://P/data/2026/"}``."""
    params: dict[str, Any] = {"prefix": prefix, "pageSize": page_size}
    if not recursive:
        params["delimiter"] = "/"
    while True:
        page = api.call("GET", "/objects", params=params)
        folders = [{"name": name, "uri": str(StoreUri(str(api.project), name))} for name in page.get("prefixes", [])]
        yield from sorted([*page.get("objects", []), *folders], key=lambda entry: entry["name"])
        if not page.get("nextPageToken"):
            return
        params["pageToken"] = page["nextPageToken"]


def _holds_objects(api: ApiClient, uri: StoreUri) -> bool:
    """Whether ``uri`` taken as a folder holds anything (as ``cp -r`` asks whether a destination exists)."""
    return next(_listing(api, uri.prefix, False, 1), None) is not None


def _folder_name(path: Path) -> str:
    """The name a copied folder keeps (``""`` for ``.`` or ``..``: their contents are copied)."""
    name = os.path.basename(os.path.normpath(path))
    return "" if name in (".", "..") else name


def _files_under(folder: Path) -> Iterator[tuple[Path, str]]:
    """Every regular file under ``folder`` (links to files followed, links to folders not), in name order,
    with its ``/``-separated path relative to ``folder``."""
    def refuse(error: OSError) -> None:
        raise CliError(f"{error.filename}: {error.strerror}")

    for top, folders, files in os.walk(folder, onerror=refuse):
        folders.sort()
        for name in sorted(files) + sorted(name for name in folders if Path(top, name).is_symlink()):
            path = Path(top, name)
            if path.is_file():
                yield path, path.relative_to(folder).as_posix()
            else:
                reason = "a link to a folder" if path.is_dir() else "not a regular file"
                stderr().print(f"WARNING: skipping {path}: {reason}")


def plan_uploads(api: ApiClient, sources: Sequence[str], target: StoreUri, recursive: bool) -> list[Upload]:
    """Which local file becomes which object. :raises CliError: a source is missing (exit 1), a name is not
    an object name, or two files would become one object (exit 2)."""
    if "-" in sources:
        if len(sources) > 1 or recursive:
            raise CliError("- (stdin) is copied alone and without -r", 2)
        if target.is_folder:
            raise CliError(f"{target}: name the object stdin becomes (store://PROJECT/NAME)", 2)
        return [Upload(None, target)]
    paths = [Path(source) for source in sources]
    for path in paths:
        if not path.exists():
            raise CliError(f"{path}: no such file or folder")
        if path.is_dir() and not recursive:
            raise CliError(f"{path} is a folder: copy it with -r")
    into = target.is_folder or len(paths) > 1 or (any(path.is_dir() for path in paths)
                                                   and _holds_objects(api, target))
    plan: list[Upload] = []
    for path in paths:
        if path.is_dir():
            name = _folder_name(path)
            base = target.join(name) if into and name else target
            plan += [Upload(file, base.join(relative)) for file, relative in _files_under(path)]
        else:
            plan.append(Upload(path, target.join(path.name) if into else target))
    seen: dict[str, Path | None] = {}
    for upload in plan:
        check_name(upload.target.name, str(upload.source))
        if upload.target.name in seen:
            raise CliError(f"{seen[upload.target.name]} and {upload.source} would both become {upload.target}", 2)
        seen[upload.target.name] = upload.source
    return plan


def plan_downloads(api: ApiClient, sources: Sequence[StoreUri], target: str, recursive: bool) -> list[Download]:
    """Which object becomes which local file. :raises CliError: nothing matches a source (exit 1), or the
    copy cannot be done as asked (exit 2)."""
    if target == "-":
        if len(sources) > 1 or recursive or sources[0].is_folder:
            raise CliError("- (stdout) takes one object, without -r", 2)
        return [Download(sources[0], None)]
    destination = Path(target)
    into = destination.is_dir() or target.endswith(("/", os.sep)) or len(sources) > 1
    if into and not destination.is_dir() and not recursive:
        raise CliError(f"{destination}: no such folder")
    plan: list[Download] = []
    for source in sources:
        objects = list(_listing(api, source.prefix, True)) if recursive else []
        if not objects:
            if source.is_folder:
                if recursive:
                    raise ApiError(404, "NOT_FOUND", f"{source} holds no objects")
                raise CliError(f"{source} is a folder: copy it with -r", 2)
            file = destination / source.basename if into else destination
            if not recursive and not file.parent.is_dir():
                raise CliError(f"{file.parent}: no such folder")
            plan.append(Download(source, file, make_parents=recursive))
            continue
        base = destination / source.basename if into else destination
        for found in objects:
            relative = check_name(found["name"][len(source.prefix):], found["name"])  # never outside `base`
            plan.append(Download(StoreUri(source.project, found["name"]), base.joinpath(*relative.split("/")),
                                 make_parents=True))
    return plan


# ---- moving bytes --------------------------------------------------------------------------------------

class Display:
    """Per-file progress bars on stderr when it is a terminal (none otherwise), and messages above them."""

    def __init__(self) -> None:
        self.console = stderr()
        self._progress: Progress | None = None
        if self.console.is_terminal:
            # Transient: each bar gives way to its file's "Copied …" line.
            self._progress = Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(),
                                      TransferSpeedColumn(), console=self.console, transient=True)

    def __enter__(self) -> Display:
        if self._progress is not None:
            self._progress.start()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None,
                 trace: TracebackType | None) -> None:
        if self._progress is not None:
            self._progress.stop()

    def say(self, message: str) -> None:
        self.console.print(message)

    def bar(self, description: str, total: int | None) -> Bar:
        progress = self._progress
        return Bar(progress, progress.add_task(description, total=total) if progress is not None else None)


@dataclasses.dataclass
class Bar:
    """One file's bar (doing nothing where there is none)."""

    progress: Progress | None
    task: TaskID | None

    def describe(self, description: str, total: int | None) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, description=description, total=total, completed=0)

    def update(self, done: int) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.update(self.task, completed=done)

    def close(self) -> None:
        if self.progress is not None and self.task is not None:
            self.progress.remove_task(self.task)
            self.progress.refresh()  # else a message printed next is followed by the bar's last drawing


def _upload(transfers: Transfers, display: Display, upload: Upload) -> dict[str, Any]:
    name = upload.target.name
    if upload.source is None:
        # The API wants the size and MD5 first: stdin goes to a temporary file (never to memory) on the way.
        with tempfile.TemporaryFile(prefix="cloudml-stdin-") as spool:
            md5, size = copy_hashed(click.open_file("-", "rb"), spool)
            return _send(transfers, display, spool, size, md5, name, "stdin")
    try:
        file = upload.source.open("rb")
    except OSError as error:
        raise CliError(f"{upload.source}: {error.strerror or error}") from None
    with file:
        bar = display.bar(f"Hashing {upload.source.name}", os.fstat(file.fileno()).st_size)
        try:
            md5, size = md5_of(file, bar.update)
        except OSError as error:
            raise CliError(f"{upload.source}: {error.strerror or error}") from None
        finally:
            bar.close()
        return _send(transfers, display, file, size, md5, name, upload.source.name)


def _send(transfers: Transfers, display: Display, file: BinaryIO, size: int, md5: str, name: str,
          shown: str) -> dict[str, Any]:
    bar = display.bar(f"Uploading {shown}", size)
    try:
        return transfers.upload(file, size, md5, name, bar.update)
    finally:
        bar.close()


def _download(transfers: Transfers, display: Display, download: Download) -> int:
    name = download.source.name
    bar = display.bar(f"Downloading {download.source.basename}", None)

    def started(size: int) -> None:
        bar.describe(f"Downloading {download.source.basename}", size)

    try:
        if download.target is None:
            out = click.open_file("-", "wb")
            size = transfers.download(name, out, started, bar.update, restartable=False)
            out.flush()
            return size
        return _download_file(transfers, name, download.target, download.make_parents, started, bar)
    finally:
        bar.close()


def _download_file(transfers: Transfers, name: str, target: Path, make_parents: bool,
                   started: Callable[[int], None], bar: Bar) -> int:
    """Into a temporary file beside ``target``, renamed over it once complete and verified."""
    temporary = target.with_name(f".{target.name}.{secrets.token_hex(4)}.part")
    try:
        if make_parents:
            target.parent.mkdir(parents=True, exist_ok=True)
        if target.is_dir():
            raise CliError(f"{target} is a folder")
        # O_EXCL: never write through a link someone put there; 0o666 less the umask, as any new file.
        with os.fdopen(os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "w+b") as out:
            size = transfers.download(name, out, started, bar.update)
        os.replace(temporary, target)
        return size
    except OSError as error:
        temporary.unlink(missing_ok=True)
        raise CliError(f"{error.filename or target}: {error.strerror or error}") from None
    except BaseException:
        temporary.unlink(missing_ok=True)
        raise


@command(objects_group, "cp")
@click.argument("sources", nargs=-1, required=True, metavar="SOURCE...")
@click.argument("destination")
@click.option("-r", "--recursive", is_flag=True, help="Copy folders and everything in them.")
@click.option("--chunk-size", type=click.IntRange(min=1), default=CHUNK_BYTES, hidden=True,
              help="Bytes per request of a resumable upload (rounded up to the API's chunkBytes).")
@click.option("--resumable-threshold", type=click.IntRange(min=0), default=RESUMABLE_THRESHOLD, hidden=True,
              help="Files larger than this many bytes are uploaded in a resumable session.")
def copy(sources: tuple[str, ...], destination: str, recursive: bool, chunk_size: int,
         resumable_threshold: int) -> None:
    """Copy files to or from the project's objects (store://PROJECT/NAME).

    \b
    cloudml objects cp train.csv store://demo/data/train.csv
    cloudml objects cp -r data store://demo/            # store://demo/data/…
    cloudml objects cp store://demo/data/train.csv .
    cloudml objects cp -r store://demo/jobs/census_1/model ./model
    gzip -c big.csv | cloudml objects cp - store://demo/data/big.csv.gz
    cloudml objects cp store://demo/data/train.csv - | head

    With -r a folder goes into DESTINATION when that exists (a local folder, or a store:// folder holding
    objects), else it becomes DESTINATION, as with cp -r. Files over 8 MiB are sent in a resumable session;
    every upload is verified by its MD5, every download by the MD5 the API announces; a broken connection
    is resumed where it broke.
    """
    remote = [source for source in sources if is_store_uri(source)]
    if is_store_uri(destination) == bool(remote) or (remote and len(remote) != len(sources)):
        raise CliError("one side of a copy is a store://PROJECT/NAME URI, the other local (a path or -)", 2)
    if is_store_uri(destination):
        _copy_up(sources, parse_uri(destination), recursive, chunk_size, resumable_threshold)
    else:
        _copy_down([parse_uri(source) for source in sources], destination, recursive, chunk_size,
                   resumable_threshold)


def _copy_up(sources: Sequence[str], target: StoreUri, recursive: bool, chunk_size: int,
             resumable_threshold: int) -> None:
    api = _api(target.project)
    uploads = plan_uploads(api, sources, target, recursive)
    done: list[dict[str, Any]] = []
    with Display() as display:
        transfers = _transfers(api, display, chunk_size, resumable_threshold)
        for upload in uploads:
            stored = _upload(transfers, display, upload)
            display.say(f"Copied {upload.source or 'stdin'} to {upload.target} ({stored.get('size')} bytes)")
            done.append(stored)
    _summary(len(done), sum(int(stored.get("size", 0)) for stored in done))
    emit(done if recursive or len(sources) > 1 else done[0], invocation().format, "none")


def _copy_down(sources: Sequence[StoreUri], destination: str, recursive: bool, chunk_size: int,
               resumable_threshold: int) -> None:
    api = _api(_one_project(sources))
    downloads = plan_downloads(api, sources, destination, recursive)
    total = 0
    with Display() as display:
        transfers = _transfers(api, display, chunk_size, resumable_threshold)
        for download in downloads:
            size = _download(transfers, display, download)
            total += size
            display.say(f"Copied {download.source} to {download.target or 'stdout'} ({size} bytes)")
    _summary(len(downloads), total)


def _transfers(api: ApiClient, display: Display, chunk_size: int, resumable_threshold: int) -> Transfers:
    return Transfers(api, chunk_bytes=chunk_size, resumable_threshold=resumable_threshold,
                     on_retry=lambda message: display.say(f"WARNING: {message}"))


def _summary(files: int, size: int) -> None:
    if files > 1:
        stderr().print(f"Copied {files} files ({size} bytes).")


# ---- ls, rm --------------------------------------------------------------------------------------------

@command(objects_group, "ls")
@click.argument("uri", required=False)
@click.option("-r", "--recursive", is_flag=True, help="Every object under the folder, not one level.")
@click.option("-l", "--long", "long_listing", is_flag=True,
              help="Each object's size, update time and MD5, then the total.")
@click.option("--page-size", type=click.IntRange(1, 1000), default=1000, hidden=True,
              help="Objects per request of the listing.")
def list_objects(uri: str | None, recursive: bool, long_listing: bool, page_size: int) -> None:
    """List objects: the project's top (default), a folder, or one object.

    \b
    cloudml objects ls                              # the configured project's top level
    cloudml objects ls store://demo/data/           # folders end with /
    cloudml objects ls -r -l store://demo/jobs/census_1

    The default output is one URI a line (-l: SIZE UPDATED MD5 URI, and a TOTAL line); --format json, yaml,
    value(…) or table(…) prints the object resources (a folder as {name, uri}).
    """
    if uri is None:
        project = invocation().settings().project
        if not project:
            raise CliError("no project set: give store://PROJECT/…, or use --project, CLOUDML_PROJECT or "
                           "`cloudml config set project P`", 2)
        target = StoreUri(project, "")
    else:
        target = parse_uri(uri)
    api = _api(target.project)
    entries = list(_listing(api, target.prefix, recursive, page_size))
    if not entries and not target.is_folder:  # not a folder: maybe one object
        entries = _object_named(api, target.name)
    if not entries and target.name:
        raise ApiError(404, "NOT_FOUND", f"{target} matched no objects")
    fmt = invocation().format
    if fmt is not None:
        emit(entries, fmt, "table", OBJECT_COLUMNS)
        return
    objects = [entry for entry in entries if "size" in entry]
    for entry in entries:
        if not long_listing:
            click.echo(entry["uri"])
        elif "size" in entry:
            updated = re.sub(r"\.\d+Z\Z", "Z", str(entry.get("updated", "")))  # to the second, as gsutil shows it
            click.echo(f"{entry['size']:>12}  {updated:<20}  {entry.get('md5Hash', ''):<24}  {entry['uri']}")
        else:
            click.echo(f"{'':>12}  {'':<20}  {'':<24}  {entry['uri']}")
    if long_listing:
        click.echo(f"TOTAL: {len(objects)} objects, {sum(int(entry['size']) for entry in objects)} bytes")


def _object_named(api: ApiClient, name: str) -> list[dict[str, Any]]:
    """``[the object name]``, or ``[]`` when there is none (it is the first name of its own prefix)."""
    first = api.call("GET", "/objects", params={"prefix": name, "pageSize": 1}).get("objects", [])
    return [found for found in first if found["name"] == name]


@command(objects_group, "rm")
@click.argument("uris", nargs=-1, required=True, metavar="URI...")
@click.option("-r", "--recursive", is_flag=True, help="Also every object under NAME/ (a folder).")
def remove(uris: tuple[str, ...], recursive: bool) -> None:
    """Remove objects; with -r, folders and everything in them.

    \b
    cloudml objects rm store://demo/data/train.csv
    cloudml objects rm -r store://demo/jobs/census_1
    """
    targets = [parse_uri(uri) for uri in uris]
    for target in targets:
        if not target.name:
            raise CliError(f"{target}: name an object or a folder (a whole project is not removed this way)", 2)
        if target.is_folder and not recursive:
            raise CliError(f"{target} is a folder: remove it with -r", 2)
    api = _api(_one_project(targets))
    removed = []
    for target in targets:
        answer = api.call("DELETE", object_path(target.name.rstrip("/")),
                          params={"recursive": "true"} if recursive else None)
        count = int(answer.get("deleted", 0))
        stderr().print(f"Removed {target} ({count} object{'' if count == 1 else 's'}).")
        removed.append({"uri": str(target), "deleted": count})
    emit(removed if len(removed) > 1 else removed[0], invocation().format, "none")
