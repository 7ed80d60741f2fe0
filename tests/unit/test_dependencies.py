"""Reading pip's answers: what a dry-run report leaves to install, and pip's failures told in a line.

The outputs below are pip 23.2's own (the runtimes' pip), captured from real runs; the same commands run for
real, on nodes, in tests/integration/test_trainer_dependencies.py.
"""

from __future__ import annotations

import pytest

from cloudml_os.dependencies import (
    DependencyError,
    Requirement,
    WheelCache,
    Wheels,
    install_argv,
    missing_requirements,
    pip_failure,
    pip_options,
    resolution_key,
)

OWN = "/nodes/chief-0/job/packages"


def item(name: str, version: str, url: str, is_direct: bool = False) -> dict:
    return {"metadata": {"name": name, "version": version}, "download_info": {"url": url}, "is_direct": is_direct}


def test_the_report_leaves_out_the_jobs_own_packages():
    report = {"version": "1", "install": [
        item("deps-trainer", "0.1", f"file://{OWN}/deps-trainer-0.1.tar.gz", is_direct=True),
        item("cmlos_helper", "1.0", f"file://{OWN}/cmlos_helper-1.0-py3-none-any.whl"),
        item("Pandas", "3.1.1", "https://files.pythonhosted.org/packages/3a/a9/pandas-3.1.1-cp311-cp311.whl"),
        item("python_dateutil", "4.0.0", "https://files.pythonhosted.org/packages/python_dateutil-4.0.0.whl"),
        item("cloudml-hypertune", "0.1.0.dev6", "file:///opt/pypi/simple/cloudml-hypertune-0.1.0.dev6.tar.gz"),
    ]}
    assert missing_requirements(report, OWN) == [
        Requirement("cloudml-hypertune", "0.1.0.dev6"), Requirement("pandas", "3.1.1"),
        Requirement("python-dateutil", "4.0.0")]
    assert missing_requirements({"install": []}, OWN) == []


def test_a_requirement_from_its_own_url_is_refused_with_its_name():
    report = {"install": [item("tool", "1.0", "git+https://example.org/tool.git", is_direct=True)]}
    with pytest.raises(DependencyError, match="'tool' is required from git\\+https://example.org/tool.git; upload"):
        missing_requirements(report, OWN)


@pytest.mark.parametrize("name, version", [("--index-url=http://evil", "1"), ("ok", "not a version"), ("", "1")])
def test_a_report_with_a_name_or_version_that_is_not_one_is_refused(name, version):
    with pytest.raises(DependencyError, match="invalid"):
        missing_requirements({"install": [item(name, version, "https://x/y.whl")]}, OWN)


NOT_FOUND = """\
Looking in indexes: https://pypi.org/simple, file:///opt/pypi/simple
Processing ./packages/bad-trainer-0.1.tar.gz
  Preparing metadata (setup.py): started
  Preparing metadata (setup.py): finished with status 'done'
WARNING: Location 'file:///opt/pypi/simple/no-such-package-xyz/' is ignored: it is neither a file nor a directory.
ERROR: Could not find a version that satisfies the requirement no-such-package-xyz (from bad-trainer) (from versions: none)
ERROR: No matching distribution found for no-such-package-xyz
"""  # noqa: E501

NO_SUCH_VERSION = (
    "ERROR: Could not find a version that satisfies the requirement pandas==99.0 (from bad-trainer) (from versions: "
    "0.1, 0.2, 2.3.3, 3.0.0rc0, 3.0.0, 3.1.0, 3.1.1)\nERROR: No matching distribution found for pandas==99.0\n")

CONFLICT = """\
INFO: pip is looking at multiple versions of bad-trainer to determine which version is compatible with other requirements. This could take a while.
ERROR: Cannot install bad-trainer==0.1 because these package versions have conflicting dependencies.

The conflict is caused by:
    bad-trainer 0.1 depends on numpy>=2
    The user requested (constraint) numpy==1.23.5

To fix this you could try to:
1. loosen the range of package versions you've specified
2. remove package versions to allow pip attempt to solve the dependency conflict

ERROR: ResolutionImpossible: for help visit https://pip.pypa.io/en/latest/topics/dependency-resolution/#dealing-with-dependency-conflicts
"""  # noqa: E501

SETUP_PY_RAISED = """\
Processing ./packages/boom-trainer-0.1.tar.gz
  Preparing metadata (setup.py): started
  Preparing metadata (setup.py): finished with status 'error'
  error: subprocess-exited-with-error

  × python setup.py egg_info did not run successfully.
  │ exit code: 1
  ╰─> [7 lines of output]
      Traceback (most recent call last):
        File "<string>", line 2, in <module>
        File "<pip-setuptools-caller>", line 34, in <module>
        File "/tmp/pip-req-build-0t2pqf52/setup.py", line 3, in <module>
          if os.environ.get("BOOM"): raise RuntimeError("boom: cannot build here")
                                     ^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^^
      RuntimeError: boom: cannot build here
      [end of output]

  note: This error originates from a subprocess, and is likely not a problem with pip.
error: metadata-generation-failed

× Encountered error while generating package metadata.
╰─> See above for output.
"""

UNREACHABLE = (
    "WARNING: Retrying (Retry(total=0, connect=None, read=None, redirect=None, status=None)) after connection broken "
    "by 'NewConnectionError('<pip._vendor.urllib3.connection.HTTPConnection object at 0x7f7952ac52d0>: Failed to "
    "establish a new connection: [Errno 111] Connection refused')': /simple/pandas/\n"
    "ERROR: Could not find a version that satisfies the requirement pandas (from net-trainer) (from versions: none)\n"
    "ERROR: No matching distribution found for pandas\n")


@pytest.mark.parametrize("output, message", [
    (NOT_FOUND, "no distribution found for 'no-such-package-xyz' (required by bad-trainer)"),
    (NO_SUCH_VERSION, "no distribution found for 'pandas==99.0' (required by bad-trainer); the index has 2.3.3, "
                      "3.0.0rc0, 3.0.0, 3.1.0, 3.1.1 …"),
    ("ERROR: No matching distribution found for pandas==3.1.1\n", "no distribution found for 'pandas==3.1.1'"),
    (CONFLICT, "conflicting requirements: bad-trainer 0.1 depends on numpy>=2; the runtime has numpy 1.23.5, "
               "which stays"),
    (SETUP_PY_RAISED, "python setup.py egg_info did not run successfully\n"
                      'File "/tmp/pip-req-build-0t2pqf52/setup.py", line 3, in <module>\n'
                      'if os.environ.get("BOOM"): raise RuntimeError("boom: cannot build here")\n'
                      "RuntimeError: boom: cannot build here"),
    (UNREACHABLE, "no distribution found for 'pandas' (required by net-trainer) (the package index could not be "
                  "reached: [Errno 111] Connection refused)"),
    ("WARNING: noise\nERROR: Package 'x' requires a different Python: 3.11.7 not in '>=3.12'\n",
     "Package 'x' requires a different Python: 3.11.7 not in '>=3.12'"),
    ("something broke\n", "something broke"),
    ("", "pip failed without a message"),
])
def test_pip_failures_are_told_in_a_few_lines_naming_the_requirement(output, message):
    assert pip_failure(output, ["numpy==1.23.5", "mxnet==1.9.1"]) == message


def test_a_conflict_with_a_constraint_the_runtime_does_not_pin_is_told_as_a_constraint():
    assert pip_failure(CONFLICT) == ("conflicting requirements: bad-trainer 0.1 depends on numpy>=2; "
                                     "constraint numpy==1.23.5")


def test_the_wheel_cache_finds_wheels_by_name_and_exact_version(tmp_path):
    cache = WheelCache(tmp_path / "cache")
    pandas, hypertune = Requirement("pandas", "3.1.1"), Requirement("cloudml-hypertune", "0.1.0.dev6")
    assert cache.missing([pandas, hypertune]) == [pandas, hypertune]
    incoming = tmp_path / "incoming"
    incoming.mkdir()
    for name in ["pandas-3.1.1-cp311-cp311-manylinux_2_28_x86_64.whl", "pandas-3.1.0-cp311-cp311-linux_x86_64.whl",
                 "cloudml_hypertune-0.1.0.dev6-py2.py3-none-any.whl", "notes.txt", "bad-name.whl"]:
        (incoming / name).write_bytes(b"x")
    assert cache.add(incoming, [pandas, hypertune]) == {
        "pandas-3.1.1-cp311-cp311-manylinux_2_28_x86_64.whl", "cloudml_hypertune-0.1.0.dev6-py2.py3-none-any.whl"}
    assert sorted(p.name for p in incoming.iterdir()) == [
        "bad-name.whl", "notes.txt", "pandas-3.1.0-cp311-cp311-linux_x86_64.whl"]
    assert cache.missing([pandas, hypertune, Requirement("pandas", "3.1.0")]) == [Requirement("pandas", "3.1.0")]
    assert [p.name for p in cache.files(Requirement("cloudml-hypertune", "0.1.0.dev6"))] == [
        "cloudml_hypertune-0.1.0.dev6-py2.py3-none-any.whl"]


def test_the_install_names_exact_versions_and_reaches_no_index():
    argv = install_argv("/rt/bin/python", "/job/site-packages", ["/job/packages/t-0.1.tar.gz"], "/job/wheels",
                        [Requirement("pandas", "3.1.1")])
    assert argv[:4] == ["/rt/bin/python", "-m", "pip", "install"]
    assert {"--no-deps", "--no-index"} <= set(argv)
    assert argv[-4:] == ["--find-links", "/job/wheels", "/job/packages/t-0.1.tar.gz", "pandas==3.1.1"]
    assert "--find-links" not in install_argv("/rt/bin/python", "/site", ["/t.tar.gz"], "/wheels", [])


def test_the_index_settings_become_pip_options():
    assert pip_options("", "") == []
    assert pip_options("https://mirror/simple", "--trusted-host mirror --extra-index-url 'https://b/simple'") == [
        "--index-url", "https://mirror/simple", "--trusted-host", "mirror", "--extra-index-url", "https://b/simple"]


def test_the_event_says_what_came_from_the_cache_and_what_was_fetched_where():
    requirements = (Requirement("pandas", "3.1.1"), Requirement("tzdata", "2026.6"))
    fetched = Wheels(requirements, resolved_on="chief-0", fetched_on="chief-0",
                     fetched=frozenset({"tzdata-2026.6-py3-none-any.whl"}))
    assert fetched.summary() == ("Requirements pandas 3.1.1, tzdata 2026.6: resolved on node chief-0; 1 from the "
                                 "wheel cache, 1 fetched on node chief-0")
    assert Wheels(requirements).summary() == ("Requirements pandas 3.1.1, tzdata 2026.6: resolved before for these "
                                              "packages; 2 from the wheel cache, none fetched")


def test_a_resolution_is_remembered_for_the_same_package_bytes_and_index_options(tmp_path):
    trainer, other = tmp_path / "trainer-0.1.tar.gz", tmp_path / "other-0.1.tar.gz"
    trainer.write_bytes(b"one")
    other.write_bytes(b"two")
    key = resolution_key([trainer, other], [])
    assert key == resolution_key([other, trainer], [])
    assert len({key, resolution_key([trainer], []), resolution_key([trainer, other], ["--pre"])}) == 3
    cache = WheelCache(tmp_path / "cache")
    assert cache.resolution(key) is None
    cache.remember(key, [Requirement("pandas", "3.1.1")])
    cache.remember(resolution_key([trainer], []), [])
    assert cache.resolution(key) == [Requirement("pandas", "3.1.1")]
    assert cache.resolution(resolution_key([trainer], [])) == []
    (cache.folder / "resolutions" / f"{key}.json").write_text('{"requirements": [["--index-url=x", "1"]]}')
    assert cache.resolution(key) is None  # a record that is not one is not used
