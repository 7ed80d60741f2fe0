"""A trainer's own dependencies: what its packages require beyond the runtime, fetched once, installed per job.

On Cloud ML Engine the ``install_requires`` of a trainer package are installed on top of the runtime. Here
the runtime (a virtualenv holding the framework and its pinned numpy) must stay untouched and win, and
``pip install --target`` would ignore what it holds. So the requirements are resolved against the runtime
itself: one node of the job runs ``pip install --dry-run --report`` with the runtime's interpreter and no
``--target``, so pip sees what the runtime has and reports only what is missing; the runtime's own
distributions are given as constraints, so a requirement that would replace one of them (``numpy>=2`` on
MXNet's numpy 1.23.5) fails with the conflict named instead of shadowing it. The same node downloads or
builds exactly the missing distributions as wheels (``pip wheel --no-deps``) from the site's index, and every
node installs exactly those files offline (``--no-deps --no-index``) into the job's site folder.

The wheel cache (:class:`WheelCache`) lives on the worker, one folder per runtime and project, and reaches
the nodes over their SSH sessions: a job of N nodes fetches each missing wheel once, on one node, a later job
of the project needing the same versions fetches none, and one of the same packages (whose resolution the
cache remembers) reaches no index at all; only the resolving node ever reaches the index. Measured with an
index counting requests (docs/operator-guide.md): a first job of 2 nodes fetches each file on the resolving
node only (twice there from an index that forbids caching: pip 23.2's dry run downloads too), the next job of
the same packages on 3 nodes nothing, a new version of the package with the same requirements each file once.
The cache is per project because its wheels come back from a node, where the project's code has already run (the
trainer's setup.py runs during the resolution): a file a node hands back may reach that project's later jobs,
never another project's.

Nothing here builds a shell command or runs pip on the worker: pip runs on a node, with an argv list, and the
names and versions read back from the node's report are checked before they are given to pip again.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shlex
import tempfile
import urllib.parse
from collections.abc import Iterable, Sequence
from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from packaging.utils import InvalidWheelFilename, canonicalize_name, parse_wheel_filename
from packaging.version import InvalidVersion, Version

if TYPE_CHECKING:  # the workflows pass their sessions in
    from cloudml_os.remote import NodeSession

PIP_TIMEOUT = 600.0  # seconds for a resolution or an install
FETCH_TIMEOUT = 3600.0  # seconds for downloading and building the missing wheels (a framework wheel is GBs)
MAX_REPORT_BYTES = 64 << 20
FAILURE_LINES = 12  # most lines of pip's output kept in an error message
_NAME = re.compile(r"[A-Za-z0-9](?:[A-Za-z0-9._-]{0,198}[A-Za-z0-9])?")


class DependencyError(Exception):
    """The job's requirements cannot be installed; the message says which and why, for the job's owner."""


@dataclasses.dataclass(frozen=True, order=True)
class Requirement:
    """One distribution to install: a name (canonical, as PEP 503 writes it) and one exact version."""

    name: str
    version: str

    @property
    def spec(self) -> str:
        return f"{self.name}=={self.version}"

    def __str__(self) -> str:
        return f"{self.name} {self.version}"


@dataclasses.dataclass(frozen=True)
class Wheels:
    """A job's requirements and the cached files that hold them.

    :ivar resolved_on: the node that resolved them (None: the cache remembered the resolution of the same
        packages).
    :ivar fetched_on: the node that downloaded or built the files the cache lacked (None: all were cached);
        ``fetched`` names those files, which that node holds already.
    """

    requirements: tuple[Requirement, ...] = ()
    files: tuple[Path, ...] = ()
    resolved_on: str | None = None
    fetched_on: str | None = None
    fetched: frozenset[str] = frozenset()

    def summary(self) -> str:
        """One line for the job's events."""
        names = ", ".join(str(r) for r in self.requirements)
        resolved = f"resolved on node {self.resolved_on}" if self.resolved_on else "resolved before for these packages"
        cached = len(self.requirements) - len(self.fetched)
        fetched = f"{len(self.fetched)} fetched on node {self.fetched_on}" if self.fetched else "none fetched"
        return f"Requirements {names}: {resolved}; {cached} from the wheel cache, {fetched}"


def pip_options(index_url: str, extra_args: str) -> list[str]:
    """The settings ``pip_index_url`` and ``pip_extra_args`` (checked by :mod:`cloudml_os.config`) as pip
    arguments; none when both are empty, so the node's own pip configuration applies."""
    return (["--index-url", index_url] if index_url else []) + shlex.split(extra_args)


# ---- on the resolving node ------------------------------------------------------------------------------

def prepare(node: str, session: NodeSession, python: str, targets: Sequence[str], folder: str, cache: WheelCache,
            key: str, options: Sequence[str] = ()) -> Wheels:
    """Resolve on ``node`` (reached by ``session``) what ``targets`` need beyond the runtime, unless ``cache``
    remembers the resolution of ``key`` (:func:`resolution_key`: the same packages), fetch there (into
    ``FOLDER/wheels``) the wheels the cache lacks and add them to the cache.

    :returns: the requirements and the cached wheels holding them, to be put on every node.
    :raises DependencyError: a requirement could not be resolved or fetched (named).
    """
    requirements = cache.resolution(key)
    resolved_on = None if requirements is not None else node
    if requirements is None:
        requirements = resolve(session, python, targets, folder, options)
    missing = cache.missing(requirements)
    fetched: set[str] = set()
    if missing:
        fetch_wheels(session, python, missing, f"{folder}/wheels", options)
        with cache.staging() as incoming:
            session.get_tree(f"{folder}/wheels", Path(incoming))
            fetched = cache.add(Path(incoming), missing)
    files = [(r, cache.files(r)) for r in requirements]
    lacking = [str(r) for r, found in files if not found]
    if lacking:
        raise DependencyError(f"fetching the trainer's requirements failed: pip made no wheel of {', '.join(lacking)}")
    if resolved_on is not None:
        cache.remember(key, requirements)
    return Wheels(tuple(requirements), tuple(path for _, found in files for path in found), resolved_on,
                  node if fetched else None, frozenset(fetched))


def resolve(session: NodeSession, python: str, targets: Sequence[str], folder: str,
            options: Sequence[str] = ()) -> list[Requirement]:
    """What installing ``targets`` (the job's sdists and wheels on the node) needs beyond the runtime.

    :param python: the runtime's interpreter on the node.
    :param folder: the job's folder on the node: its ``packages`` folder (also searched for requirements,
        so wheels uploaded beside the trainer satisfy them) holds ``targets``; the report is written there.
    :param options: index options (:func:`pip_options`).
    :raises DependencyError: pip could not resolve them; the message names the requirement and why.
    """
    pins = session.run([python, "-m", "pip", "list", "--format=freeze", "--disable-pip-version-check"],
                       timeout=PIP_TIMEOUT).stdout
    constraints, report = f"{folder}/runtime-constraints.txt", f"{folder}/requirements-report.json"
    session.put(pins.encode(), constraints)
    result = session.run([
        python, "-m", "pip", "install", "--dry-run", "--report", report, "--no-build-isolation",
        "--disable-pip-version-check", "--progress-bar", "off", "--constraint", constraints,
        "--find-links", f"{folder}/packages", *options, *targets,
    ], check=False, timeout=PIP_TIMEOUT)
    if result.exit_code != 0:
        raise DependencyError("installing the trainer's requirements failed: "
                              + pip_failure(f"{result.stdout}\n{result.stderr}", pins.split()))
    try:
        document = json.loads(session.read_file(report, 0, MAX_REPORT_BYTES))
    except ValueError:
        raise DependencyError("installing the trainer's requirements failed: pip wrote no readable report") from None
    return missing_requirements(document, f"{folder}/packages")


def fetch_wheels(session: NodeSession, python: str, requirements: Sequence[Requirement], wheel_folder: str,
                 options: Sequence[str] = ()) -> None:
    """Download (or build, from an sdist) one wheel per requirement into ``wheel_folder`` on the node.

    :raises DependencyError: naming what could not be fetched.
    """
    result = session.run([
        python, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--disable-pip-version-check",
        "--progress-bar", "off", "--wheel-dir", wheel_folder, *options, *(r.spec for r in requirements),
    ], check=False, timeout=FETCH_TIMEOUT)
    if result.exit_code != 0:
        raise DependencyError("fetching the trainer's requirements failed: "
                              + pip_failure(f"{result.stdout}\n{result.stderr}"))


def install_argv(python: str, site: str, packages: Sequence[str], wheel_folder: str,
                 requirements: Sequence[Requirement]) -> list[str]:
    """The command installing the job's ``packages`` (files) and exactly ``requirements`` (from the wheels in
    ``wheel_folder``) into ``site``, offline: nothing is resolved, nothing is downloaded."""
    specs = [r.spec for r in requirements]
    return [python, "-m", "pip", "install", "--no-deps", "--no-index", "--no-build-isolation",
            "--disable-pip-version-check", "--quiet", "--upgrade", "--target", site,
            *(["--find-links", wheel_folder] if specs else []), *packages, *specs]


# ---- on the worker --------------------------------------------------------------------------------------

def resolution_key(packages: Iterable[Path], options: Sequence[str]) -> str:
    """What a resolution depends on beside the runtime (whose cache it is kept in): the packages' bytes and
    the index options."""
    digests = []
    for path in packages:
        with path.open("rb") as package:
            digests.append(hashlib.file_digest(package, "sha256").hexdigest())
    digests.sort()
    return hashlib.sha256(json.dumps({"packages": digests, "options": list(options)}).encode()).hexdigest()


class WheelCache:
    """The worker's wheels for one runtime and project: a folder of ``*.whl`` files, and ``resolutions/`` of
    what earlier jobs' packages resolved to; files are added whole (written beside, then renamed), shared by
    the worker's processes. Delete it any time to start over.

    A resolution is remembered because the runtimes' pip (23.2) downloads every file it picks even with
    ``--dry-run`` (pypa/pip#12603): a job whose packages were resolved before reaches no index at all. So
    the same packages get the same versions, as with a lock file, until the cache is deleted.
    """

    def __init__(self, folder: Path) -> None:
        self.folder = folder

    def files(self, requirement: Requirement) -> list[Path]:
        """The cached wheels of exactly ``requirement`` (one per platform the project's nodes needed)."""
        if not self.folder.is_dir():
            return []
        return sorted(path for path in self.folder.glob("*.whl") if _wheel_of(path.name) == requirement)

    def missing(self, requirements: Iterable[Requirement]) -> list[Requirement]:
        return [r for r in requirements if not self.files(r)]

    def add(self, folder: Path, requirements: Iterable[Requirement]) -> set[str]:
        """Move the wheels of ``requirements`` found in ``folder`` into the cache; the names moved.
        Other files (anything a node put beside them) are left where they are."""
        wanted = set(requirements)
        self.folder.mkdir(parents=True, exist_ok=True)
        moved = set()
        for path in folder.iterdir():
            if path.is_file() and not path.is_symlink() and _wheel_of(path.name) in wanted:
                os.replace(path, self.folder / path.name)
                moved.add(path.name)
        return moved

    def resolution(self, key: str) -> list[Requirement] | None:
        """The requirements remembered for ``key`` (:func:`resolution_key`); None if none (or unreadable)."""
        try:
            document = json.loads((self.folder / "resolutions" / f"{key}.json").read_text())
            return [_requirement(str(name), str(version)) for name, version in document["requirements"]]
        except (OSError, ValueError, KeyError, TypeError, DependencyError):
            return None

    def remember(self, key: str, requirements: Iterable[Requirement]) -> None:
        folder = self.folder / "resolutions"
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / f".{key}.{os.getpid()}.part"
        partial.write_text(json.dumps({"requirements": [[r.name, r.version] for r in requirements]}))
        os.replace(partial, folder / f"{key}.json")

    def staging(self) -> tempfile.TemporaryDirectory:
        """A temporary folder beside the cache (same file system, so :meth:`add` renames)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        return tempfile.TemporaryDirectory(prefix=".incoming-", dir=self.folder)


def _wheel_of(filename: str) -> Requirement | None:
    try:
        name, version, _build, _tags = parse_wheel_filename(filename)
    except (InvalidWheelFilename, InvalidVersion):
        return None
    return Requirement(canonicalize_name(name), str(version))


# ---- reading pip's answers (pure) -------------------------------------------------------------------------

def missing_requirements(report: dict[str, Any], own_folder: str) -> list[Requirement]:
    """The distributions a ``pip install --dry-run --report`` would install, less the job's own files
    (those in ``own_folder``), sorted.

    :raises DependencyError: a requirement given as a URL of its own (``name @ URL``), which cannot be
        cached or installed offline; or a name or version that is not one (the report came from a node).
    """
    own = PurePosixPath(own_folder)
    requirements = set()
    for item in report.get("install", []):
        metadata = item.get("metadata", {})
        name, version = str(metadata.get("name", "")), str(metadata.get("version", ""))
        url = str(item.get("download_info", {}).get("url", ""))
        if url.startswith("file://") and PurePosixPath(urllib.parse.unquote(url[len("file://"):])).parent == own:
            continue
        if item.get("is_direct"):
            raise DependencyError(f"installing the trainer's requirements failed: {name or url!r} is required "
                                  f"from {url}; upload it beside the trainer (packageUris) instead")
        requirements.add(_requirement(name, version))
    return sorted(requirements)


def _requirement(name: str, version: str) -> Requirement:
    """:raises DependencyError: ``name`` or ``version`` is not one (they come from a node)."""
    if not _NAME.fullmatch(name):
        raise DependencyError(f"installing the trainer's requirements failed: invalid distribution name {name!r}")
    try:
        return Requirement(canonicalize_name(name), str(Version(version)))
    except InvalidVersion:
        raise DependencyError(f"installing the trainer's requirements failed: invalid version {version!r} "
                              f"of {name!r}") from None


_NOT_FOUND = re.compile(r"Could not find a version that satisfies the requirement (\S+)"
                        r"(?: \(from ([^)]*)\))?(?: \(from versions: ([^)]*)\))?")
_NO_MATCH = re.compile(r"No matching distribution found for (\S+)")
_UNREACHABLE = re.compile(r"WARNING: Retrying .*?after connection broken by '(\w+)\(.*?(?:: )?([^:']*)'\)'")


def pip_failure(output: str, runtime_pins: Iterable[str] = ()) -> str:
    """What went wrong, in a line or a few, from the output (stdout and stderr) of a failed pip command.

    :param runtime_pins: the runtime's ``name==version`` lines (the constraints given to pip), so that a
        conflict with one of them is told as what the runtime has.
    """
    lines = [line.rstrip() for line in output.splitlines()]
    message = (_not_found(output) or _conflict(lines, set(runtime_pins)) or _subprocess_error(lines)
               or _error_lines(lines))
    unreachable = _UNREACHABLE.search(output)
    if unreachable:
        message += f" (the package index could not be reached: {unreachable.group(2).strip() or unreachable.group(1)})"
    return message


def _not_found(output: str) -> str | None:
    found = _NOT_FOUND.search(output)
    if found is None:
        match = _NO_MATCH.search(output)
        return f"no distribution found for {match.group(1)!r}" if match else None
    requirement, required_by, listed = found.groups()
    message = f"no distribution found for {requirement!r}" + (f" (required by {required_by})" if required_by else "")
    versions = [v.strip() for v in (listed or "").split(",") if v.strip() not in ("", "none")]
    if versions:
        message += f"; the index has {', '.join(versions[-5:])}" + (" …" if len(versions) > 5 else "")
    return message


def _conflict(lines: list[str], runtime_pins: set[str]) -> str | None:
    try:
        start = lines.index("The conflict is caused by:") + 1
    except ValueError:
        return None
    causes = []
    for line in lines[start:]:
        if not line.strip():
            break
        cause = line.strip()
        constraint = cause.removeprefix("The user requested (constraint) ")
        if constraint != cause:
            cause = (f"the runtime has {constraint.replace('==', ' ')}, which stays" if constraint in runtime_pins
                     else f"constraint {constraint}")
        causes.append(cause)
    return "conflicting requirements: " + "; ".join(causes[:FAILURE_LINES])


def _subprocess_error(lines: list[str]) -> str | None:
    """A build step that failed (a setup.py that raised): pip's title for it and the end of its output."""
    title = next((line.strip().removeprefix("× ") for line in lines if line.strip().startswith("× ")), None)
    if title is None:
        return None
    try:
        start = next(i for i, line in enumerate(lines) if line.strip().startswith("╰─> [")) + 1
        end = next(i for i in range(start, len(lines)) if lines[i].strip() == "[end of output]")
    except StopIteration:
        return title
    tail = [line.strip() for line in lines[start:end] if line.strip().strip("^~")][-3:]  # no caret lines
    return "\n".join([title.rstrip("."), *tail])


def _error_lines(lines: list[str]) -> str:
    errors = [line.removeprefix("ERROR: ") for line in lines if line.startswith("ERROR: ")]
    if not errors:
        errors = [line.strip() for line in lines if line.strip() and not line.startswith("WARNING: ")]
    return "\n".join(errors[-FAILURE_LINES:]) or "pip failed without a message"
