"""Node runtimes: the virtualenvs that trainers run in, built from ``images/runtimes/NAME.txt``.

A runtime is named by its requirements file and the hash of its contents, so editing the file makes a
new runtime and the control plane knows the path on a node without asking it. The same files are what
GPU images install, so local nodes and OpenStack VMs run the same framework versions. Building takes
minutes the first time; concurrent callers (several Celery workers, several jobs) build it once under a
file lock, and a build that died half-way is detected by its missing ``.complete`` marker and redone.
This module never imports an ML library; it only runs pip. It imports only the standard library, so image
builds (images/elements/cloudml-os-runtime) run this very file to build the images' runtimes.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path, PurePosixPath

# images/ lies beside the package in the source tree (the package is installed editable).
RUNTIMES_SOURCE_DIR = Path(__file__).resolve().parent.parent / "images" / "runtimes"
COMPLETE_MARKER = ".complete"
# The per-job trainer install resolves and builds sdists without build isolation (cloudml_os.dependencies):
# the build backend must already be in the runtime.
BUILD_PACKAGES = ("setuptools", "wheel")
# The caller's own interpreter settings must not leak into a build of another environment.
_ENVIRONMENT_NOT_PASSED = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PIP_USER", "PIP_TARGET", "PIP_PREFIX")


class RuntimeNotFound(LookupError):
    """No requirements file for the runtime; the message names the valid ones."""


class RuntimeBuildError(Exception):
    """Creating the virtualenv or installing its requirements failed; the message has pip's output tail."""


def available_runtimes(source_dir: Path = RUNTIMES_SOURCE_DIR) -> list[str]:
    """Runtime names, one per requirements file."""
    return sorted(path.stem for path in source_dir.glob("*.txt"))


def requirements_file(name: str, source_dir: Path = RUNTIMES_SOURCE_DIR) -> Path:
    """The requirements file of runtime ``name``.

    :raises RuntimeNotFound: when there is none; the message lists the valid runtimes.
    """
    path = source_dir / f"{name}.txt"
    if "/" in name or not path.is_file():
        valid = ", ".join(available_runtimes(source_dir)) or "none"
        raise RuntimeNotFound(f"unknown runtime {name!r}; valid runtimes: {valid} (in {source_dir})")
    return path


def runtime_dirname(name: str, requirements: Path | None = None) -> str:
    """``NAME-HASH``: the first 12 hex digits of the requirements file's SHA-256 name its contents."""
    path = requirements or requirements_file(name)
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:12]
    return f"{name}-{digest}"


def runtime_python(runtime_root: str, name: str) -> str:
    """The interpreter of runtime ``name`` on a node whose runtimes live under ``runtime_root``."""
    return str(PurePosixPath(runtime_root) / runtime_dirname(name) / "bin" / "python")


def base_python() -> str:
    """The interpreter new runtimes are made from: the base Python under this process's virtualenv.

    A venv made from inside another venv would point at that venv's interpreter and break when it goes.
    """
    candidates = [getattr(sys, "_base_executable", None), shutil.which("python3.11"), sys.executable]
    return next(c for c in candidates if c and Path(c).exists())


def ensure_runtime(
    name: str,
    runtimes_dir: Path,
    *,
    python: str | None = None,
    pip_cache: Path | None = None,
    requirements: Path | None = None,
    build_packages: Sequence[str] = BUILD_PACKAGES,
    pip_args: Sequence[str] = (),
) -> Path:
    """Build runtime ``name`` under ``runtimes_dir`` once and return its directory (``bin/python`` inside).

    Venvs are not relocatable, so the build happens in place; a leftover without the ``.complete``
    marker is removed first.

    :param python: base interpreter for the venv (default :func:`base_python`).
    :param pip_cache: pip's cache directory, shared between runtimes to avoid downloading twice.
    :param requirements: the requirements file (default ``images/runtimes/NAME.txt``).
    :param build_packages: installed beside the requirements so trainer sdists build without network.
    :param pip_args: extra pip install arguments, e.g. ``--no-index --find-links DIR`` on an air-gapped site.
    :raises RuntimeNotFound: no such runtime.
    :raises RuntimeBuildError: the venv or the install failed.
    """
    requirements = requirements or requirements_file(name)
    runtimes_dir = Path(runtimes_dir)
    target = runtimes_dir / runtime_dirname(name, requirements)
    marker = target / COMPLETE_MARKER
    if marker.exists():
        return target
    runtimes_dir.mkdir(parents=True, exist_ok=True)
    with open(runtimes_dir / f"{target.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # blocks while another process builds the same runtime
        if marker.exists():
            return target
        _build_runtime(target, requirements, python or base_python(), pip_cache, build_packages, pip_args)
        marker.write_text(f"built {time.strftime('%Y-%m-%dT%H:%M:%S%z')} from {requirements}\n")
    return target


def _build_runtime(target: Path, requirements: Path, python: str, pip_cache: Path | None,
                   build_packages: Sequence[str], pip_args: Sequence[str]) -> None:
    if target.exists():
        _progress(f"removing incomplete runtime {target}")
        shutil.rmtree(target)
    started = time.monotonic()
    _progress(f"building runtime {target.name} in {target} from {requirements} (minutes the first time)")
    _run([python, "-m", "venv", str(target)], "creating the virtualenv")
    cache = ["--cache-dir", str(pip_cache)] if pip_cache is not None else []
    _run([str(target / "bin" / "python"), "-m", "pip", "install", "--disable-pip-version-check",
          "--progress-bar", "off", *cache, "-r", str(requirements), *build_packages, *pip_args],
         f"installing {requirements.name}")
    _progress(f"runtime {target.name} built in {time.monotonic() - started:.0f} s")


def _run(command: list[str], what: str) -> None:
    """Run a build step, streaming its output to stderr so a long install shows progress."""
    tail: list[str] = []
    try:
        environment = {k: v for k, v in os.environ.items() if k not in _ENVIRONMENT_NOT_PASSED}
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                   env=environment)
    except OSError as exc:
        raise RuntimeBuildError(f"{what} failed: cannot run {command[0]}: {exc}") from None
    with process:
        for line in process.stdout or ():
            sys.stderr.write(line)
            tail = [*tail[-19:], line]
    if process.returncode != 0:
        output = "".join(tail).strip()
        raise RuntimeBuildError(f"{what} failed (exit {process.returncode}): {' '.join(command)}\n{output}")


def _progress(message: str) -> None:
    print(f"cloudml-os runtime: {message}", file=sys.stderr, flush=True)


def main(argv: Sequence[str] | None = None) -> int:
    """``python runtimes.py --runtimes-dir DIR NAME…``: what image builds run, where the platform is not installed."""
    parser = argparse.ArgumentParser(description="Build framework runtimes from their requirements files.")
    parser.add_argument("--runtimes-dir", type=Path, required=True)
    parser.add_argument("--source-dir", type=Path, default=RUNTIMES_SOURCE_DIR, help="folder of NAME.txt files")
    parser.add_argument("--python", help="base interpreter (default: this one's)")
    parser.add_argument("names", nargs="+")
    args = parser.parse_args(argv)
    for name in args.names:
        requirements = requirements_file(name, args.source_dir)
        print(ensure_runtime(name, args.runtimes_dir, python=args.python, requirements=requirements))
    return 0


if __name__ == "__main__":
    sys.exit(main())
