"""``store://`` URIs in a trainer's args, and the paths they become on the nodes that run it.

Nodes that see the store (:meth:`cloudml_os.cloud.base.Driver.store_mount`) hold the project's objects as
read-only files under ``ROOT/PROJECT/NAME``, so a trainer that is given ``store://p/data/train-*.csv`` gets
``/store/p/data/train-*.csv`` and reads it with ``glob``, ``tf.data`` or a data loader unchanged, as Cloud
ML Engine trainers read ``gs://`` (or Vertex AI's ``/gcs/``). A URI is recognised in two places only, so that
free text is passed on as it is: a whole argument (``store://p/data``), or the value of an option written
``--flag=store://p/data`` (an argument that starts with ``-`` and holds ``=``). Everything after the scheme is
kept, wildcards included. The URI must be well formed (:func:`cloudml_os.artifacts.parse_uri`) and of the
job's own project; the submission is refused otherwise, and also when nodes get no view of the store (rather
than handing the trainer a ``store://`` string it cannot open). Pure functions: no Flask, no database.
"""

from __future__ import annotations

from collections.abc import Sequence

from cloudml_os.artifacts import SCHEME, ArtifactError, parse_uri


class StoreArgError(ArtifactError):
    """A ``store://`` argument that cannot reach the trainer; ``index`` is its position in the args."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


def _split(arg: str) -> tuple[str, str] | None:
    """(what comes before the URI, the URI) when the argument holds one where one is recognised."""
    if arg.startswith(SCHEME):
        return "", arg
    if arg.startswith("-") and "=" in arg:
        flag, _, value = arg.partition("=")
        if value.startswith(SCHEME):
            return flag + "=", value
    return None


def store_uri_in(arg: str) -> str | None:
    """The ``store://`` URI an argument carries (see the module docstring for where), or None."""
    found = _split(arg)
    return found[1] if found else None


def check_store_args(args: Sequence[str], project: str, store_root: str | None) -> None:
    """Refuse ``store://`` arguments that a trainer of ``project`` could not open.

    :param store_root: where the nodes see the store (the driver's ``store_mount``), None if they do not.
    :raises StoreArgError: for the first argument holding a malformed URI, one of another project, or any URI
        when ``store_root`` is None.
    """
    for index, arg in enumerate(args):
        uri = store_uri_in(arg)
        if uri is None:
            continue
        try:
            uri_project, _ = parse_uri(uri)
        except ArtifactError as exc:
            raise StoreArgError(index, f"{exc}; an argument holds one store://PROJECT/NAME URI (the whole "
                                       "argument, or what follows --flag=)") from None
        if uri_project != project:
            raise StoreArgError(index, f"{uri!r} is not in project {project}: a trainer reads only its own "
                                       "project's objects")
        if store_root is None:
            raise StoreArgError(index, f"{uri!r}: the store is not mounted on this installation's nodes, so a "
                                       "trainer could not open it; pass the data another way (e.g. in the "
                                       "trainer package)")


def node_args(args: Sequence[str], project: str, store_root: str | None) -> list[str]:
    """``args`` as the trainer gets them: each recognised ``store://PROJECT/NAME`` becomes ``ROOT/PROJECT/NAME``.

    :raises StoreArgError: as :func:`check_store_args` (the submission was checked; this holds the line when
        an installation changed its driver or store while the job waited).
    """
    check_store_args(args, project, store_root)
    mapped = []
    for arg in args:
        found = _split(arg)
        if found is None:
            mapped.append(arg)
        else:
            before, uri = found
            mapped.append(f"{before}{store_root}/{uri[len(SCHEME):]}")
    return mapped
