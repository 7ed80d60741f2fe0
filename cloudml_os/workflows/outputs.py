"""Running trainers' outputs, copied to the job's directory in the artifact store while they write them.

What a trainer writes under ``--job-dir`` is under the job's ``store://`` directory (JOB_DIR) seconds later,
as on Cloud ML Engine, where ``--job-dir`` is a bucket: every ``output_sync_seconds`` (default 2, ± 25 % at
random; 0: only the final rounds below) the worker lists each node's job directory with one command
(``find -printf``: path, size, modification time) and copies what changed over the SSH connections it already
trusts, so no store credential reaches a node and every driver gets it. Layout under JOB_DIR:

- the job directory of the node that owns the outputs (the framework's first export role: TensorFlow's chief,
  PyTorch's master, MXNet's first worker), 1:1 (``ckpt/model.ckpt-100.index`` on the node is
  ``JOB_DIR/ckpt/model.ckpt-100.index``); a tuning trial's is ``JOB_DIR/TRIAL/…``;
- every node's TensorBoard event files (``*tfevents*``), only under ``tensorboard/NODE/PATH``
  (``tensorboard/trial-N/ROLE/PATH``), where the metrics API reads the curves; never deleted;
- the platform's own names, which the 1:1 copy never writes (a trainer's file there is left out, said once in
  an ``OUTPUTS`` event): ``logs/`` (teardown's), ``tensorboard/`` and ``.cloudml-os/`` (this module's record).
  ``model/`` is shared by contract: trainers export there, it is copied while they run, and the export step
  replaces it with the exported model it finds (usually the same files).

Which changes a round copies: the 1:1 copy's go oldest first (by modification time) up to the first that may
still be written, i.e. changed within the last ``quiet`` seconds (half a second, at most half the interval)
by the node's clock; it and all newer ones wait. So the store holds what the node held at some moment, and
an index written after its checkpoint (TensorFlow's ``checkpoint``) never reaches the store before the files
it names. A file waits one round at most: one that waited is copied as it is then, if every older change is
in (a log written all the time would never be otherwise). Names of files being written are left out
(TensorFlow's ``*_temp/`` folders and ``*.tmp…`` files, ``*.part``). Event files go whenever they grew: they
are append-only and TensorBoard's reader drops a torn last record. A copied file the node no longer has
(TensorFlow keeps ``max_to_keep`` checkpoints) is deleted from the store only in a round that copied every
change of its listing: the store then holds the folder as listed, so the checkpoint the stored index names is
never deleted before an index naming a newer one is in. When training ends, before a restart and at teardown
a final round copies everything at once (the trainers have stopped).

State: ``JOB_DIR/.cloudml-os/outputs.json`` records every file copied (its size and modification time on the
node), written after each round that changed the store; a copier reads it when it starts and keeps nothing
it cannot rebuild, so a redelivered window, on any worker, goes on where the last stopped. A record of
another job (a reused ``jobDir``) is not this job's: its files may be overwritten, never deleted. A restart
puts exactly the record's files onto every node (:meth:`OutputSync.download`): the last synced checkpoint
outlives the chief's node. A crash between copies and the record loses nothing: unrecorded copies are made
again, unrecorded deletions tried again.

Bounds: the copy holds at most ``MAX_COPY_FILES`` files and ``MAX_COPY_BYTES`` bytes (the caps of
:meth:`NodeSession.get_tree`); more is left out, said once. Names from nodes are untrusted: only plain path
segments of UTF-8 without control characters, and no links (``find -type f``). A copy reads at most the size
listed (and one byte more, to see a file that grew). A round stops between files when its window ends.

This module must not import the training workflow (which imports it): node folders come in as
:class:`Source`\\ s built there and in the tuning workflow.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import io
import json
import logging
import random
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence, Set
from pathlib import Path
from typing import TYPE_CHECKING, Any

from cloudml_os.artifacts import ArtifactError, job_dir_uri, make_uri, parse_uri
from cloudml_os.remote import NodeSession, RemoteError
from cloudml_os.remote.ssh import MAX_COPY_BYTES, MAX_COPY_FILES, script_argv
from cloudml_os.store import Cluster, Job, Node

if TYPE_CHECKING:
    from cloudml_os.workflows.train import TrainingContext

log = logging.getLogger(__name__)

TENSORBOARD = "tensorboard"
RECORD = ".cloudml-os/outputs.json"
# Top-level names of JOB_DIR the 1:1 copy never writes: the nodes' logs, the event files, the record.
RESERVED = ("logs", TENSORBOARD, ".cloudml-os")
QUIET_SECONDS = 0.5  # a file unchanged this long (at most half the interval) is taken as complete
ROUND_SPREAD = 0.25  # rounds come every interval ± this share of it, at random
SPOOL_IN_MEMORY = 8 << 20  # a copied file larger than this waits on the worker's disk, not in memory
LISTING_LIMIT = 64 << 20  # bytes of one listing read from a node: MAX_COPY_FILES names of ~600 bytes
_MAX_NAME_BYTES = 255
# Files being written: TensorFlow's checkpoint shards (``ckpt-5_temp/part-…``) and atomic writes
# (``checkpoint.tmp<uuid>``), and the usual ``.tmp`` / ``.part`` suffixes.
_TEMPORARY = re.compile(r"(?:^|/)[^/]*_temp(?:_[0-9a-f]+)?/|\.(?:tmp[0-9a-f]*|part)$")
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f]")
_MTIME = re.compile(rb"\d{1,12}(?:\.\d{1,10})?")

# $1 the folder, $2 the most bytes to send. Prints NUL-terminated records: ``missing`` alone, or
# ``now TIME``, one ``f SIZE MTIME PATH`` per regular file (PATH relative, not following links), ``end CODE``.
_LIST_SCRIPT = r"""
cd -- "$1" 2>/dev/null || { printf 'missing\0'; exit 0; }
{ printf 'now %s\0' "$(date +%s.%N)"; find . -type f -printf 'f %s %T@ %P\0'; printf 'end %s\0' "$?"; } \
  | head -c "$2"
"""


# ---- what is listed and what a round does (pure) ----------------------------------------------------

@dataclasses.dataclass(frozen=True)
class NodeFile:
    """A file as a listing saw it. ``mtime`` is the node's text (seconds since the epoch), compared as text
    so that no rounding makes a copy look stale."""

    size: int
    mtime: str


@dataclasses.dataclass(frozen=True)
class Listing:
    """One folder of one node: its files by path relative to the folder, and the node's clock then.

    ``complete``: every file was listed (``find`` succeeded, nothing cut off or malformed), so a file not
    listed is gone. ``missing``: the folder does not exist (yet). ``refused``: names that are not plain.
    """

    files: dict[str, NodeFile]
    now: float
    complete: bool
    refused: tuple[str, ...] = ()
    missing: bool = False


def parse_listing(output: bytes, max_files: int = MAX_COPY_FILES) -> Listing:
    """Read the listing script's output; what does not parse makes the listing incomplete, never an error."""
    records = output.split(b"\0")
    cut = records.pop() != b""  # the bytes after the last NUL: none unless the output was cut off
    if records == [b"missing"] and not cut:
        return Listing({}, 0.0, complete=True, missing=True)
    try:
        now = float(records[0].removeprefix(b"now ")) if records and records[0].startswith(b"now ") else None
    except ValueError:
        now = None
    if now is None:
        return Listing({}, 0.0, complete=False)
    files: dict[str, NodeFile] = {}
    refused: list[str] = []
    complete = not cut
    ended = False
    for entry in records[1:]:
        if entry.startswith(b"end "):
            ended = complete = complete and entry == b"end 0"
            break
        kind, size, mtime, path = (entry.split(b" ", 3) + [b""] * 3)[:4]
        if kind != b"f" or not size.isdigit() or not _MTIME.fullmatch(mtime) or not path:
            complete = False
            continue
        if len(files) >= max_files:
            complete = False
            break
        name = plain_path(path)
        if name is None:
            refused.append(path.decode("utf-8", "backslashreplace"))
            continue
        files[name] = NodeFile(int(size), mtime.decode())
    return Listing(files, now, complete and ended, tuple(refused))


def plain_path(raw: bytes) -> str | None:
    """``raw`` as a relative path of plain UTF-8 segments (none empty, ``.`` or ``..``, over 255 bytes, or
    holding a control character), or None. U+FFFD is refused too: it stands for bytes that were not UTF-8
    where the listing was decoded with replacement (:meth:`NodeSession.run`), and names no file."""
    try:
        path = raw.decode("utf-8")
    except UnicodeDecodeError:
        return None
    if _CONTROL.search(path) or "\ufffd" in path:
        return None
    if any(part in ("", ".", "..") or len(part.encode()) > _MAX_NAME_BYTES for part in path.split("/")):
        return None
    return path


def is_event_file(path: str) -> bool:
    return "tfevents" in path.rpartition("/")[2]


def is_temporary(path: str) -> bool:
    return bool(_TEMPORARY.search(path))


@dataclasses.dataclass(frozen=True)
class Source:
    """A folder on a node that the copy reads: its event files go to ``tensorboard/SUMMARIES…``; with
    ``mirror`` set, its other files go 1:1 to ``JOB_DIR/MIRROR…`` (``""``: the job directory itself;
    ``"3/"``: trial 3's)."""

    node: Node
    root: str
    summaries: str
    mirror: str | None = None


@dataclasses.dataclass(frozen=True)
class Copy:
    path: str  # under the source's root
    key: str  # under JOB_DIR
    file: NodeFile


@dataclasses.dataclass(frozen=True)
class Changes:
    """What one round does with one listed folder."""

    copies: list[Copy]
    waiting: list[str]  # keys of changed files still being written
    gone: list[str]  # keys under JOB_DIR: files copied before and no longer on the node
    left_out: list[tuple[str, str]]  # (key, why)


def changes(listing: Listing, source: Source, copied: Mapping[str, NodeFile], quiet: float,
            waited: Set[str] = frozenset()) -> Changes:
    """The copies that bring the store up to ``listing``, given what was ``copied`` already, and the copied
    files the node no longer has.

    The 1:1 copy's changes are taken oldest first up to the first that changed within the last ``quiet``
    seconds and had not ``waited`` in the last round already; it and the newer ones wait. Event files are
    taken whenever they changed. Files are only said gone from a complete listing of an existing folder,
    within the source's 1:1 copy.
    """
    events, changed, left_out = [], [], []
    for path, file in listing.files.items():
        if is_temporary(path):
            continue
        if is_event_file(path):
            key = f"{TENSORBOARD}/{source.summaries}{path}"
            if copied.get(key) != file:
                events.append(Copy(path, key, file))
            continue
        if source.mirror is None:
            continue
        key = source.mirror + path
        top = key.partition("/")[0]
        if top in RESERVED:
            left_out.append((key, f"JOB_DIR/{top}/ is the platform's own"))
        elif copied.get(key) != file:
            changed.append(Copy(path, key, file))
    changed.sort(key=lambda c: (float(c.file.mtime), c.key))
    ready = next((i for i, c in enumerate(changed)
                  if listing.now - float(c.file.mtime) < quiet and c.key not in waited), len(changed))
    copies = sorted(changed[:ready] + events, key=lambda c: (float(c.file.mtime), c.key))
    gone: list[str] = []
    if source.mirror is not None and listing.complete and not listing.missing:
        listed = {source.mirror + path for path in listing.files}
        gone = sorted(key for key in copied if key.startswith(source.mirror) and key not in listed
                      and key.partition("/")[0] not in RESERVED)
    return Changes(copies, sorted(c.key for c in changed[ready:]), gone, left_out)


@dataclasses.dataclass
class Record:
    """What the copy made (``JOB_DIR/.cloudml-os/outputs.json``): every file under JOB_DIR it wrote, as the
    node listed it, and the names already reported as left out."""

    job: int
    files: dict[str, NodeFile] = dataclasses.field(default_factory=dict)
    reported: set[str] = dataclasses.field(default_factory=set)
    updated: str = ""  # when it was last written (UTC, ISO 8601)
    size: int = 0  # bytes of the files

    def __post_init__(self) -> None:
        self.size = sum(file.size for file in self.files.values())

    def add(self, key: str, file: NodeFile) -> None:
        self.remove(key)
        self.files[key] = file
        self.size += file.size

    def remove(self, key: str) -> None:
        before = self.files.pop(key, None)
        if before is not None:
            self.size -= before.size

    @classmethod
    def from_json(cls, data: Any, job: int) -> Record:
        """The record for ``job``: an empty one when ``data`` is another job's, or not a record."""
        if not isinstance(data, dict) or data.get("job") != job:
            return cls(job)
        try:
            files = {str(key): NodeFile(int(size), str(mtime)) for key, (size, mtime) in data["files"].items()}
            return cls(job, files, {str(name) for name in data.get("reported", [])}, str(data.get("updated", "")))
        except (KeyError, TypeError, ValueError, AttributeError):
            return cls(job)

    def to_json(self) -> bytes:
        return json.dumps({"job": self.job, "updated": self.updated, "reported": sorted(self.reported),
                           "files": {key: [f.size, f.mtime] for key, f in sorted(self.files.items())}}).encode()

    def mirrored(self, prefix: str = "") -> list[str]:
        """Keys of the 1:1 copy under ``prefix`` (not event files, not the platform's names)."""
        return sorted(key for key in self.files if key.startswith(prefix) and key.partition("/")[0] not in RESERVED)


# ---- the copier -------------------------------------------------------------------------------------

class OutputSync:
    """Copies nodes' outputs to the job's directory in the store: in rounds of :meth:`run`, every
    ``interval`` seconds in a thread of its own while used as a context manager (0: no thread).

    It opens its own SSH connection to each node it reads (sessions are not thread-safe), on first use; a node
    that fails is left alone for the rest of this copier's life (the watch step judges the node). Rounds are
    serialized, so a caller may run one (a trial's final round) while the thread runs.

    :param sources: the folders to read, or a function giving them at each round.
    """

    def __init__(self, ctx: TrainingContext, job: Job, cluster: Cluster,
                 sources: Sequence[Source] | Callable[[], Sequence[Source]], *, interval: float | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.ctx, self.job, self.cluster = ctx, job, cluster
        self._sources = sources if callable(sources) else (lambda: sources)
        self.interval = ctx.settings.output_sync_seconds if interval is None else interval
        self.quiet = min(QUIET_SECONDS, self.interval / 2)
        self.uri = job_dir_uri(job.project, job.job_id, job.training_input).rstrip("/")
        self.project, self.base = parse_uri(self.uri)
        self._clock = clock
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._sessions: dict[str, NodeSession] = {}
        self._failed: set[str] = set()  # nodes not read again by this copier
        self._record: Record | None = None
        self._waiting: set[str] = set()  # keys whose files waited in the last round (still being written)

    def __enter__(self) -> OutputSync:
        if self.interval > 0:
            self._thread = threading.Thread(target=self._loop, name=f"outputs-{self.job.id}", daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()
        for session in self._sessions.values():
            session.close()
        self._sessions.clear()

    def stop(self) -> None:
        """End the thread after the file it copies (if any); rounds may still be run by the caller."""
        self._stopping.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None

    def finish(self) -> None:
        """Stop the thread and run the final round: the trainers ended, what they wrote last is copied (from
        every node again, also one the thread gave up on)."""
        self.stop()
        self._failed.clear()
        self.run(final=True)

    def _loop(self) -> None:
        due = self._clock()
        spread = random.Random()
        while not self._stopping.is_set():
            try:
                self.run()
            except Exception:  # a round must not end the thread: the next one retries
                log.exception("job %s: copying outputs failed", self.job.id)
            # Rounds at a steady pace would lock onto a trainer that checkpoints every interval (or half of it):
            # each listing would find the newest checkpoint just written, and its index would wait for ever.
            due = max(due + self.interval * spread.uniform(1 - ROUND_SPREAD, 1 + ROUND_SPREAD), self._clock())
            self._stopping.wait(max(0.0, due - self._clock()))

    def run(self, sources: Sequence[Source] | None = None, *, final: bool = False) -> None:
        """One round over ``sources`` (default: the copier's). ``final``: the trainers have stopped: every
        changed file is copied, and an event says what the store holds; then failures are events too and
        never raise (the job goes on to its export, restart or deletion)."""
        with self._lock:
            chosen = list(self._sources() if sources is None else sources)
            try:
                record = self._load_record()
                changed = False
                for source in chosen:
                    if self._stopping.is_set() and not final:
                        break
                    changed |= self._round(source, record, final)
                if changed:
                    self._save_record(record)
            except (ArtifactError, OSError) as exc:
                if not final:
                    raise
                self.ctx.store.add_event(self.job.id, "OUTPUTS", f"Outputs could not be copied to {self.uri}/: {exc}")
                return
            if final:
                self._report(chosen, record)

    def _round(self, source: Source, record: Record, final: bool) -> bool:
        """Copy one folder's changes; whether the record changed."""
        session = self._session(source.node)
        if session is None:
            return False
        try:
            result = session.run(script_argv(_LIST_SCRIPT, source.root, str(LISTING_LIMIT)), timeout=60)
            listing = parse_listing(result.stdout.encode())  # the names were UTF-8 or are refused
        except RemoteError as exc:
            self._lose(source.node, exc, final)
            return False
        quiet = 0.0 if final else self.quiet
        found = changes(listing, source, record.files, quiet, self._waiting)
        prefix = source.mirror if source.mirror is not None else f"{TENSORBOARD}/{source.summaries}"
        self._waiting = {key for key in self._waiting if not key.startswith(prefix)} | set(found.waiting)
        changed = self._leave_out(record, source, [(name, "not a plain file name") for name in listing.refused]
                                  + found.left_out)
        caught_up = not found.waiting
        for copy in found.copies:
            if self._stopping.is_set() and not final:
                return changed
            why = self._over_caps(record, copy)
            if why:
                changed |= self._leave_out(record, source, [(copy.key, why)])
                continue
            try:
                outcome = self._copy(session, source, copy)
            except RemoteError as exc:
                self._lose(source.node, exc, final)
                return changed
            if outcome == "copied":
                record.add(copy.key, copy.file)
                changed = True
            elif outcome == "changed":
                # Written again while copied: the next round takes it, and the newer files after it, so that
                # the store never holds a file newer than one it lacks (TensorFlow's `checkpoint` pointer
                # without the checkpoint it names).
                caught_up = False
                break
            elif outcome == "refused":
                changed |= self._leave_out(record, source, [(copy.key, "not a valid name in the store")])
        if caught_up:  # the store holds the folder as listed: what it lacks is gone for good
            for key in found.gone:
                self.ctx.artifacts.delete_object(make_uri(self.project, f"{self.base}/{key}"))
                record.remove(key)
                changed = True
        return changed

    def _copy(self, session: NodeSession, source: Source, copy: Copy) -> str:
        """``copied``; ``changed`` (it grew or vanished while copied); ``refused`` (no valid object name)."""
        try:
            parse_uri(make_uri(self.project, f"{self.base}/{copy.key}"))
        except ArtifactError:
            return "refused"
        with tempfile.SpooledTemporaryFile(SPOOL_IN_MEMORY) as spool:
            got = session.get_file(f"{source.root}/{copy.path}", spool, copy.file.size)
            if got != copy.file.size:
                return "changed"
            spool.seek(0)
            self.ctx.artifacts.put_file(self.project, f"{self.base}/{copy.key}", spool)
        return "copied"

    def _over_caps(self, record: Record, copy: Copy) -> str:
        before = record.files.get(copy.key)
        count = len(record.files) + (before is None)
        size = record.size - (before.size if before else 0) + copy.file.size
        if count > MAX_COPY_FILES:
            return f"the job directory in the store would hold more than {MAX_COPY_FILES} files"
        if size > MAX_COPY_BYTES:
            return f"the job directory in the store would hold more than {MAX_COPY_BYTES} bytes"
        return ""

    def _leave_out(self, record: Record, source: Source, items: list[tuple[str, str]]) -> bool:
        """Say once (an event) that each ``(name, why)`` is not copied; whether the record changed."""
        new = [(name, why) for name, why in items if name not in record.reported]
        for name, why in new[:20]:
            self.ctx.store.add_event(self.job.id, "OUTPUTS", f"Not copied to {self.uri}/: {name} of "
                                     f"{source.node.name} ({why})", node=source.node.name)
        if len(new) > 20:
            self.ctx.store.add_event(self.job.id, "OUTPUTS", f"Not copied to {self.uri}/: {len(new) - 20} more "
                                     f"file(s) of {source.node.name}", node=source.node.name)
        record.reported.update(name for name, _ in new)
        return bool(new)

    def _session(self, node: Node) -> NodeSession | None:
        if node.name in self._failed:
            return None
        if node.name not in self._sessions:
            try:
                self._sessions[node.name] = self.ctx.connect(node, self.cluster.private_key)
            except RemoteError as exc:
                self._lose(node, exc, final=False)
                return None
        return self._sessions[node.name]

    def _lose(self, node: Node, error: RemoteError, final: bool) -> None:
        self._failed.add(node.name)
        session = self._sessions.pop(node.name, None)
        if session is not None:
            session.close()
        log.warning("job %s: outputs of %s are not copied: %s", self.job.id, node.name, error)
        if final:
            self.ctx.store.add_event(self.job.id, "OUTPUTS", f"Outputs of {node.name} could not be copied: {error}",
                                     node=node.name)

    def _report(self, sources: Sequence[Source], record: Record) -> None:
        mirrors = [s for s in sources if s.mirror is not None]
        files = sum(len(record.mirrored(s.mirror)) for s in mirrors)
        events = sum(key.startswith(f"{TENSORBOARD}/{s.summaries}") for key in record.files for s in sources)
        if not files and not events:
            return
        where = f"{self.uri}/{mirrors[0].mirror}" if mirrors else f"{self.uri}/"
        owner = f" of {mirrors[0].node.name}'s job directory" if mirrors else ""
        self.ctx.store.add_event(self.job.id, "OUTPUTS", f"Outputs copied to {where}: {files} file(s){owner}, "
                                 f"{events} TensorBoard event file(s) in {self.uri}/{TENSORBOARD}/")

    # -- the record --

    def _load_record(self) -> Record:
        if self._record is None:
            uri = make_uri(self.project, f"{self.base}/{RECORD}")
            if not self.ctx.artifacts.exists(uri):
                self._record = Record(self.job.id)
            else:
                with self.ctx.artifacts.local_file(uri) as path:
                    try:
                        data = json.loads(path.read_bytes())
                    except ValueError:
                        data = None
                self._record = Record.from_json(data, self.job.id)
        return self._record

    def _save_record(self, record: Record) -> None:
        record.updated = dt.datetime.now(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        self.ctx.artifacts.put_file(self.project, f"{self.base}/{RECORD}", io.BytesIO(record.to_json()))

    # -- a restart --

    def download(self, target: Path) -> tuple[int, str]:
        """Put the 1:1 copy of the job directory (as last recorded) into the local folder ``target``; the number
        of files and when the record was written. A file the store lost is left out (and off the record)."""
        with self._lock:
            record = self._load_record()
            count = 0
            for key in record.mirrored():
                try:
                    with self.ctx.artifacts.local_file(make_uri(self.project, f"{self.base}/{key}")) as path:
                        destination = target.joinpath(*key.split("/"))
                        destination.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copyfile(path, destination)
                    count += 1
                except ArtifactError:
                    record.remove(key)
            return count, record.updated

    def adopt(self, source: Source) -> None:
        """The restored files now on ``source``'s node are what the record holds: take their new modification
        times, so the next round does not copy them back."""
        with self._lock:
            record = self._load_record()
            session = self._session(source.node)
            if session is None or source.mirror is None:
                return
            try:
                result = session.run(script_argv(_LIST_SCRIPT, source.root, str(LISTING_LIMIT)), timeout=60)
            except RemoteError as exc:
                self._lose(source.node, exc, final=False)
                return
            for path, file in parse_listing(result.stdout.encode()).files.items():
                before = record.files.get(source.mirror + path)
                if before is not None and before.size == file.size:
                    record.add(source.mirror + path, file)
            self._save_record(record)


def final_sync(ctx: TrainingContext, job: Job, cluster: Cluster, sources: Sequence[Source]) -> None:
    """Copy what stopped trainers wrote last (:meth:`OutputSync.run` with ``final``); never raises."""
    with OutputSync(ctx, job, cluster, sources, interval=0) as sync:
        sync.run(final=True)
