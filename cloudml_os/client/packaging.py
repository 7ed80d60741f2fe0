"""The trainer's source distribution, built from the user's package folder as gcloud builds it.

The folder is copied into a temporary folder first (without ``.git``, caches, earlier builds), so
building leaves the user's tree as it was, and a read-only tree builds too. A folder with a
``setup.py`` is built with ``python setup.py sdist``; one with only a ``pyproject.toml`` with
``python -m build --sdist --no-isolation`` when ``build`` is installed, else by calling its PEP 517
backend's ``build_sdist`` directly (what ``build --no-isolation`` does), so nothing is fetched from an
index. The Python is the one running ``cloudml``.
"""

from __future__ import annotations

import importlib.util
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Callable
from pathlib import Path

from cloudml_os.client.rest import CliError

# Names never copied into the build: VCS data, caches, earlier builds, virtualenvs.
SKIPPED = {".git", ".hg", ".svn", "__pycache__", ".pytest_cache", ".mypy_cache", ".ruff_cache", ".tox", ".venv",
           ".eggs"}
SKIPPED_AT_TOP = {"build", "dist"}

# Runs inside the package folder with sys.argv = [_, OUT_DIR, BACKEND, BACKEND_PATH...].
_PEP517_SDIST = """
import importlib, os, sys
out, backend, paths = sys.argv[1], sys.argv[2], sys.argv[3:]
sys.path[:0] = [os.path.abspath(p) for p in paths]
module, _, attribute = backend.partition(":")
hooks = importlib.import_module(module)
for name in filter(None, attribute.split(".")):
    hooks = getattr(hooks, name)
print(hooks.build_sdist(out))
"""


def check_package_dir(path: Path) -> None:
    """:raises CliError: (exit 2) ``path`` is no Python package folder (neither setup.py nor pyproject.toml)."""
    if not path.is_dir():
        raise CliError(f"--package-path {path}: not a folder", 2)
    if not (path / "setup.py").is_file() and not (path / "pyproject.toml").is_file():
        raise CliError(f"--package-path {path}: neither setup.py nor pyproject.toml there; a trainer package is "
                       f"built as a Python source distribution (see docs/cli.md)", 2)


def _ignore(top: Path) -> Callable[[str, list[str]], set[str]]:
    """``copytree``'s filter: :data:`SKIPPED` anywhere, :data:`SKIPPED_AT_TOP` in the package folder itself."""
    def ignore(folder: str, names: list[str]) -> set[str]:
        skipped = {name for name in names if name in SKIPPED or name.endswith((".egg-info", ".pyc"))}
        if Path(folder) == top:
            skipped |= SKIPPED_AT_TOP & set(names)
        return skipped
    return ignore


def _backend(source: Path) -> tuple[str, list[str]]:
    """The PEP 517 backend ``pyproject.toml`` names (setuptools' legacy backend by default) and its path."""
    try:
        system = tomllib.loads((source / "pyproject.toml").read_text()).get("build-system", {})
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise CliError(f"{source / 'pyproject.toml'}: {exc}") from None
    return system.get("build-backend", "setuptools.build_meta:__legacy__"), list(system.get("backend-path", []))


def build_sdist(package_dir: Path, work_dir: Path, python: str = sys.executable) -> Path:
    """Build the source distribution of ``package_dir`` under ``work_dir``; the ``.tar.gz`` made.

    :raises CliError: (exit 2) not a package folder; (exit 1) the build failed, with the end of its output.
    """
    check_package_dir(package_dir)
    source = work_dir / "source" / package_dir.resolve().name
    out = work_dir / "dist"
    out.mkdir(parents=True)
    shutil.copytree(package_dir, source, ignore=_ignore(package_dir), symlinks=True)
    if (source / "setup.py").is_file():
        command = [python, "setup.py", "-q", "sdist", "--formats=gztar", "--dist-dir", str(out)]
    elif importlib.util.find_spec("build") is not None:
        command = [python, "-m", "build", "--sdist", "--no-isolation", "--outdir", str(out), str(source)]
    else:
        backend, paths = _backend(source)
        command = [python, "-c", _PEP517_SDIST, str(out), backend, *paths]
    done = subprocess.run(command, cwd=source, capture_output=True, text=True)
    built = sorted(out.glob("*.tar.gz"))
    if done.returncode != 0 or len(built) != 1:
        tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-15:])
        raise CliError(f"building the source distribution of {package_dir} failed "
                       f"(exit {done.returncode}):\n{tail}")
    return built[0]
