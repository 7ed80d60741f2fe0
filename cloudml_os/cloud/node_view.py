"""What a local node sees of this host's files: its project's objects under ``/store``, none of the platform's data.

A local node (:mod:`cloudml_os.cloud.local`) is an sshd in PID and mount namespaces of its own, on this host's
filesystem. Before its sshd starts, a short ``sh`` script runs inside the new mount namespace (propagation
private, so nothing it mounts reaches the host, and nothing of the host's later mounts reaches it) and shapes
the node's view, as a VM's disk holds only what was put on it:

- ``/store`` is an empty read-only tmpfs holding one folder, ``/store/PROJECT``: a read-only bind of the local
  artifact store's folder of the cluster's project (:func:`cloudml_os.artifacts.parse_uri` maps
  ``store://PROJECT/NAME`` to ``artifacts_root/PROJECT/NAME``, so the node's path of an object is
  ``/store/PROJECT/NAME``). Reads go straight to the files: nothing is copied, a trainer reading 1 MiB of a
  large object reads 1 MiB. Objects put while the node runs appear there at once.
- the platform's data folder (``data_dir``: its database, key-encryption and dashboard-session keys, the broker,
  other clusters' node folders, every project's artifacts) is covered by an empty read-only tmpfs, and only the
  node's own folder (its sshd's config, keys and log, its ``work`` folder) and the runtimes folder, where they
  lie inside it, are bound back at their own paths.

What it is not: a wall against root. Trainers run as root for now (#25), and root can unmount or remount all
of this, or mount the host's disks; the rest of the host's filesystem is visible and writable as before. The
view keeps the platform's secrets and other projects' data out of reach of trainers that do not set out to
break out, and makes an honest mistake (a write into ``/store``) fail instead of changing anything.

Paths reach the script through :func:`shlex.join`, one command a line; the script ends by exec'ing the
command it is given (sshd), which becomes the namespace's PID 1. This module runs nothing.
"""

from __future__ import annotations

import dataclasses
import shlex
from collections.abc import Sequence
from pathlib import Path

STORE_ROOT = "/store"
SH = "/bin/sh"
MOUNT = "mount"
SCRIPT_NAME = "cloudml-node-view"  # $0 of the script: names it in ps and in its error messages
# Small and without device files or set-uid programs: they only hold mount points.
_TMPFS_OPTIONS = "mode=0755,size=1m,nosuid,nodev"
_STAGING = ".keep"  # where folders to bind back are held, inside the /store tmpfs, while data_dir is covered


@dataclasses.dataclass(frozen=True)
class NodeView:
    """One node's view. Paths are absolute and resolved (no symbolic links), as mount needs them.

    :param hidden: the folder to cover (the platform's data folder).
    :param kept: folders inside ``hidden`` to bind back at their own paths (the node's folder, the runtimes).
    :param project: the cluster's project, whose objects appear under ``/store/PROJECT``; None: none do.
    :param project_source: the local artifact store's folder of ``project``.
    """

    hidden: Path
    kept: tuple[Path, ...] = ()
    project: str | None = None
    project_source: Path | None = None


def setup_commands(view: NodeView) -> list[list[str]]:
    """The mount commands that shape the view, in order (each an argv)."""
    store = Path(STORE_ROOT)
    commands = [[MOUNT, "-t", "tmpfs", "-o", _TMPFS_OPTIONS, "cloudml-store", str(store)]]
    if view.project is not None and view.project_source is not None:
        target = store / view.project
        commands += [
            ["mkdir", str(target)],
            # A bind first, then its flags: mount(2) ignores "ro" on the call that makes a bind.
            [MOUNT, "--bind", str(view.project_source), str(target)],
            [MOUNT, "-o", "remount,bind,ro,nosuid,nodev", str(target)],
        ]
    # The folders to keep are held aside before data_dir is covered (after, their paths lead into the tmpfs).
    staged = [(path, store / _STAGING / str(index)) for index, path in enumerate(view.kept)]
    if staged:
        commands.append(["mkdir", "-p", *(str(stage) for _, stage in staged)])
    commands += [[MOUNT, "--bind", str(path), str(stage)] for path, stage in staged]
    commands.append([MOUNT, "-t", "tmpfs", "-o", _TMPFS_OPTIONS, "cloudml-hidden", str(view.hidden)])
    for path, stage in staged:
        commands += [["mkdir", "-p", str(path)], [MOUNT, "--move", str(stage), str(path)]]
    if staged:
        commands.append(["rm", "-r", str(store / _STAGING)])
    commands += [
        [MOUNT, "-o", "remount,ro,nosuid,nodev", str(view.hidden)],
        [MOUNT, "-o", "remount,ro,nosuid,nodev", str(store)],
    ]
    return commands


def setup_script(view: NodeView) -> str:
    """The ``sh`` script: the mount commands, stopping at the first failure, then ``exec "$@"``."""
    lines = ["set -eu", *(shlex.join(command) for command in setup_commands(view)), 'exec "$@"']
    return "\n".join(lines) + "\n"


def wrap(view: NodeView, argv: Sequence[str]) -> list[str]:
    """``argv`` run after the view is set up, as the same process (the script execs it)."""
    return [SH, "-c", setup_script(view), SCRIPT_NAME, *argv]


def view_for(data_dir: Path, node_dir: Path, runtimes_dir: Path, project: str | None,
             artifacts_root: Path | None) -> NodeView:
    """The view of a node whose folder is ``node_dir``; ``artifacts_root`` None: no project's objects.

    Paths are resolved here; ``node_dir`` must lie inside ``data_dir``, the runtimes folder is kept only where it
    does too (elsewhere it is not covered).

    :raises ValueError: a layout the script cannot shape: ``node_dir`` outside ``data_dir``, or the data folder
        or the artifact store at or under ``/store`` (the tmpfs mounted there first would cover them), or
        ``/store`` inside the data folder.
    """
    store = Path(STORE_ROOT)
    hidden = data_dir.resolve()
    kept = [node_dir.resolve()]
    runtimes = runtimes_dir.resolve()
    if runtimes.is_relative_to(hidden) and runtimes != hidden:
        kept.append(runtimes)
    if not kept[0].is_relative_to(hidden) or kept[0] == hidden:
        raise ValueError(f"the node folder {kept[0]} is not inside the data folder {hidden}")
    source = (artifacts_root / project).resolve() if project is not None and artifacts_root is not None else None
    for what, path in (("data folder", hidden), ("artifact store", source)):
        if path is not None and path.is_relative_to(store):
            raise ValueError(f"the {what} {path} lies under {STORE_ROOT}, where nodes see the store; move it")
    if store.is_relative_to(hidden):
        raise ValueError(f"{STORE_ROOT} lies inside the data folder {hidden}, which nodes must not see")
    return NodeView(hidden=hidden, kept=tuple(kept), project=project if source else None, project_source=source)
