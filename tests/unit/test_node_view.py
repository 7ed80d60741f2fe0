"""The script that shapes a local node's view of the files: what it mounts, in which order, quoted for sh.

The mounts themselves are proven on real nodes in tests/integration/test_store_view.py; here the commands
are run by dash with ``mount``, ``mkdir`` and ``rm`` replaced by functions that print their arguments.
"""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from cloudml_os.cloud.node_view import NodeView, setup_commands, setup_script, view_for, wrap

# Defines the commands as functions that print their argv (NUL-separated, one line each), then runs the
# script; its final `exec "$@"` runs `echo done`.
RECORD = "for c in mount mkdir rm; do eval \"$c() { printf '%s\\\\0' $c \\\"\\$@\\\"; echo; }\"; done\n"


def run_recorded(view: NodeView) -> list[list[str]]:
    argv = wrap(view, ["echo", "done"])
    assert argv[:2] == ["/bin/sh", "-c"]
    result = subprocess.run(["dash", "-c", RECORD + argv[2], *argv[3:]], capture_output=True, text=True,
                            check=True)
    lines = result.stdout.split("\n")
    assert lines[-2:] == ["done", ""]
    return [line.rstrip("\0").split("\0") for line in lines[:-2]]


NASTY = Path("/tmp/d a'$(id)`id`\"\\ta;x*")


def test_paths_with_shell_metacharacters_reach_mount_as_they_are():
    view = view_for(NASTY / "data", NASTY / "data" / "nodes" / "n1", NASTY / "data" / "rt", "p", NASTY / "arts")
    assert run_recorded(view) == setup_commands(view)


def test_the_project_is_bound_read_only_before_the_data_folder_is_covered_and_the_kept_folders_come_back():
    view = NodeView(hidden=Path("/d"), kept=(Path("/d/nodes/c/n"), Path("/d/rt")), project="p",
                    project_source=Path("/d/artifacts/p"))
    assert setup_commands(view) == [
        ["mount", "-t", "tmpfs", "-o", "mode=0755,size=1m,nosuid,nodev", "cloudml-store", "/store"],
        ["mkdir", "/store/p"],
        ["mount", "--bind", "/d/artifacts/p", "/store/p"],
        ["mount", "-o", "remount,bind,ro,nosuid,nodev", "/store/p"],
        ["mkdir", "-p", "/store/.keep/0", "/store/.keep/1"],
        ["mount", "--bind", "/d/nodes/c/n", "/store/.keep/0"],
        ["mount", "--bind", "/d/rt", "/store/.keep/1"],
        ["mount", "-t", "tmpfs", "-o", "mode=0755,size=1m,nosuid,nodev", "cloudml-hidden", "/d"],
        ["mkdir", "-p", "/d/nodes/c/n"],
        ["mount", "--move", "/store/.keep/0", "/d/nodes/c/n"],
        ["mkdir", "-p", "/d/rt"],
        ["mount", "--move", "/store/.keep/1", "/d/rt"],
        ["rm", "-r", "/store/.keep"],
        ["mount", "-o", "remount,ro,nosuid,nodev", "/d"],
        ["mount", "-o", "remount,ro,nosuid,nodev", "/store"],
    ]
    assert setup_script(view).startswith("set -eu\n") and setup_script(view).endswith('exec "$@"\n')


def test_a_node_without_a_project_gets_an_empty_store(tmp_path):
    view = view_for(tmp_path, tmp_path / "nodes" / "n", Path("/elsewhere/runtimes"), None, tmp_path / "artifacts")
    assert view.project is None and view.kept == (tmp_path.resolve() / "nodes" / "n",)  # runtimes not covered
    under_store = {word for command in setup_commands(view) for word in command if word.startswith("/store/")}
    assert under_store == {"/store/.keep", "/store/.keep/0"}  # only where the node's folder waits a moment


@pytest.mark.parametrize(("data_dir", "artifacts", "message"), [
    ("/store/cloudml", "/srv/artifacts", "the data folder /store/cloudml lies under /store"),
    ("/srv/cloudml", "/store", "the artifact store /store/p lies under /store"),
    ("/", "/srv/artifacts", "/store lies inside the data folder /"),
])
def test_layouts_the_view_cannot_shape_are_refused(data_dir, artifacts, message):
    with pytest.raises(ValueError, match=message):
        view_for(Path(data_dir), Path(data_dir) / "nodes" / "n", Path("/opt/rt"), "p", Path(artifacts))


def test_a_node_folder_outside_the_data_folder_is_refused():
    with pytest.raises(ValueError, match="is not inside the data folder"):
        view_for(Path("/srv/a"), Path("/srv/b/n"), Path("/opt/rt"), "p", Path("/srv/a/artifacts"))
