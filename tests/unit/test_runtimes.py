"""Node runtimes: named by their requirements' hash, built once, rebuilt when a build was cut short.

One test builds a real virtualenv (offline: a tiny wheel made here, ``--no-index``); the rest swap the
build step for a recorder to prove the locking and marker logic quickly.
"""

import base64
import hashlib
import subprocess
import sys
import threading
import time
import zipfile
from pathlib import Path

import pytest

from cloudml_os import runtimes


def make_wheel(directory: Path) -> Path:
    """A minimal pure-Python wheel, ``cloudml_os_tinypkg`` 1.0, with a valid RECORD."""
    dist_info = "cloudml_os_tinypkg-1.0.dist-info"
    files = {
        "cloudml_os_tinypkg/__init__.py": "VALUE = 42\n",
        f"{dist_info}/METADATA": "Metadata-Version: 2.1\nName: cloudml-os-tinypkg\nVersion: 1.0\n",
        f"{dist_info}/WHEEL": "Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n",
    }
    record = []
    for name, text in files.items():
        digest = base64.urlsafe_b64encode(hashlib.sha256(text.encode()).digest()).rstrip(b"=").decode()
        record.append(f"{name},sha256={digest},{len(text.encode())}")
    record.append(f"{dist_info}/RECORD,,")
    path = directory / "cloudml_os_tinypkg-1.0-py3-none-any.whl"
    with zipfile.ZipFile(path, "w") as wheel:
        for name, text in files.items():
            wheel.writestr(name, text)
        wheel.writestr(f"{dist_info}/RECORD", "\n".join(record) + "\n")
    return path


@pytest.fixture
def requirements(tmp_path):
    path = tmp_path / "tiny.txt"
    path.write_text("# nothing to install\n")
    return path


@pytest.fixture
def recorded_builds(monkeypatch):
    """Replace the pip build with one that makes the directory and records each call."""
    builds = []

    def fake_build(target, requirements, python, pip_cache, build_packages, pip_args):
        builds.append(target)
        time.sleep(0.2)  # long enough for a concurrent caller to arrive while this one builds
        target.mkdir(parents=True)
        (target / "built").write_text(str(len(builds)))

    monkeypatch.setattr(runtimes, "_build_runtime", fake_build)
    return builds


def test_requirements_file_of_the_tensorflow_runtime_pins_tensorflow():
    path = runtimes.requirements_file("tensorflow-2.21")
    assert path.parent.name == "runtimes" and path.parent.parent.name == "images"
    assert "tensorflow-cpu==2.21.0" in path.read_text().splitlines()


def test_unknown_runtime_names_the_valid_ones():
    with pytest.raises(runtimes.RuntimeNotFound, match="'tensorflow-0.1'.*tensorflow-2.21"):
        runtimes.requirements_file("tensorflow-0.1")


def test_runtime_name_must_not_be_a_path():
    with pytest.raises(runtimes.RuntimeNotFound):
        runtimes.requirements_file("../runtimes/tensorflow-2.21")


def test_runtime_dirname_is_the_name_and_a_hash_of_the_requirements(requirements):
    digest = hashlib.sha256(requirements.read_bytes()).hexdigest()[:12]
    assert runtimes.runtime_dirname("tiny", requirements) == f"tiny-{digest}"
    assert runtimes.runtime_dirname("tiny", requirements) == runtimes.runtime_dirname("tiny", requirements)


def test_changed_requirements_make_a_new_runtime(requirements):
    before = runtimes.runtime_dirname("tiny", requirements)
    requirements.write_text("tensorflow-cpu==2.21.0\n")
    assert runtimes.runtime_dirname("tiny", requirements) != before


def test_runtime_dirname_of_a_catalogued_runtime_reads_its_file():
    name = runtimes.runtime_dirname("tensorflow-2.21")
    assert name.startswith("tensorflow-2.21-") and len(name) == len("tensorflow-2.21-") + 12


def test_base_python_is_a_real_interpreter_outside_this_virtualenv():
    python = Path(runtimes.base_python())
    assert python.exists()
    if sys.prefix != sys.base_prefix:
        assert not python.parent.samefile(Path(sys.prefix) / "bin")


def test_ensure_runtime_builds_a_working_virtualenv_once(tmp_path, monkeypatch):
    wheel = make_wheel(tmp_path)
    requirements = tmp_path / "tiny.txt"
    requirements.write_text(f"{wheel}\n")
    runtimes_dir = tmp_path / "runtimes"

    path = runtimes.ensure_runtime("tiny", runtimes_dir, requirements=requirements, build_packages=(),
                                   pip_args=("--no-index",), pip_cache=tmp_path / "pip-cache")

    assert path == runtimes_dir / runtimes.runtime_dirname("tiny", requirements)
    assert (path / runtimes.COMPLETE_MARKER).exists()
    result = subprocess.run([path / "bin" / "python", "-c", "import cloudml_os_tinypkg, sys; "
                             "print(cloudml_os_tinypkg.VALUE, sys.prefix)"],
                            capture_output=True, text=True, check=True)
    assert result.stdout.split() == ["42", str(path)]

    def must_not_build(*args):
        raise AssertionError("a complete runtime was built again")

    monkeypatch.setattr(runtimes, "_build_runtime", must_not_build)
    assert runtimes.ensure_runtime("tiny", runtimes_dir, requirements=requirements) == path


def test_second_call_reuses_the_runtime(tmp_path, requirements, recorded_builds):
    first = runtimes.ensure_runtime("tiny", tmp_path, requirements=requirements)
    second = runtimes.ensure_runtime("tiny", tmp_path, requirements=requirements)
    assert first == second and len(recorded_builds) == 1


def test_concurrent_callers_build_once(tmp_path, requirements, recorded_builds):
    results = []
    threads = [threading.Thread(target=lambda: results.append(
        runtimes.ensure_runtime("tiny", tmp_path, requirements=requirements))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(recorded_builds) == 1
    assert len(set(results)) == 1 and len(results) == 3


def test_incomplete_leftover_is_removed_and_rebuilt(tmp_path, requirements, monkeypatch):
    target = tmp_path / runtimes.runtime_dirname("tiny", requirements)
    target.mkdir()
    (target / "half-installed").write_text("")
    def fake_run(command, what):
        if command[1:3] == ["-m", "venv"]:
            Path(command[3]).mkdir()  # fails if the leftover was not removed first

    monkeypatch.setattr(runtimes, "_run", fake_run)

    path = runtimes.ensure_runtime("tiny", tmp_path, requirements=requirements)

    assert path == target
    assert not (target / "half-installed").exists()
    assert (target / runtimes.COMPLETE_MARKER).exists()


def test_failed_build_leaves_no_marker_and_is_retried(tmp_path, requirements, monkeypatch):
    def failing_build(target, *args):
        target.mkdir()
        raise runtimes.RuntimeBuildError("installing tiny.txt failed (exit 1)")

    monkeypatch.setattr(runtimes, "_build_runtime", failing_build)
    with pytest.raises(runtimes.RuntimeBuildError):
        runtimes.ensure_runtime("tiny", tmp_path, requirements=requirements)
    target = tmp_path / runtimes.runtime_dirname("tiny", requirements)
    assert target.exists() and not (target / runtimes.COMPLETE_MARKER).exists()

    monkeypatch.setattr(runtimes, "_build_runtime", lambda target, *args: None)
    assert runtimes.ensure_runtime("tiny", tmp_path, requirements=requirements) == target
    assert (target / runtimes.COMPLETE_MARKER).exists()


def test_missing_interpreter_is_a_build_error(tmp_path, requirements):
    with pytest.raises(runtimes.RuntimeBuildError, match="creating the virtualenv failed: cannot run"):
        runtimes.ensure_runtime("tiny", tmp_path, requirements=requirements, python=str(tmp_path / "nopython"))
    target = tmp_path / runtimes.runtime_dirname("tiny", requirements)
    assert not (target / runtimes.COMPLETE_MARKER).exists()


def test_failing_interpreter_is_a_build_error_with_its_exit_code(tmp_path, requirements):
    with pytest.raises(runtimes.RuntimeBuildError, match=r"creating the virtualenv failed \(exit 1\)"):
        runtimes.ensure_runtime("tiny", tmp_path, requirements=requirements, python="/bin/false")
