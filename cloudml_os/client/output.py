"""How ``cloudml`` shows results: ``--format json|yaml|table|value(…)|none``, as gcloud's ``--format`` does.

Results go to stdout and nothing else does, so a script can parse them; messages, progress bars and
spinners go to stderr (:func:`stderr`). ``value(jobId,trainingOutput.exportedModelUri)`` prints the
named fields of each resource tab-separated, one line per resource; ``table(…)`` picks a table's
columns. Field paths are dotted, with ``[N]`` for a list element (``trainingOutput.trials[0].trialId``).
"""

from __future__ import annotations

import dataclasses
import json
import re
import sys
from collections.abc import Callable, Sequence
from typing import Any

import click
import yaml
from rich.console import Console
from rich.table import Table
from rich.text import Text

FORMATS = ("json", "yaml", "table", "value(…)", "table(…)", "none")
_WITH_FIELDS = re.compile(r"^(value|table)\((.*)\)\Z", re.DOTALL)
_PATH_PART = re.compile(r"([^.\[\]]+)|\[(\d+)\]")


@dataclasses.dataclass(frozen=True)
class Format:
    """A parsed ``--format``: its kind and, for ``value(…)`` and ``table(…)``, the field paths."""

    kind: str
    fields: tuple[str, ...] = ()


def parse_format(text: str) -> Format:
    """:raises click.BadParameter: not one of :data:`FORMATS`."""
    text = text.strip()
    if text in ("json", "yaml", "table", "none"):
        return Format(text)
    match = _WITH_FIELDS.match(text)
    if match:
        fields = tuple(part.strip() for part in match.group(2).split(",") if part.strip())
        if not fields:
            raise click.BadParameter(f"{match.group(1)}(…) needs at least one field, e.g. {match.group(1)}(name)")
        return Format(match.group(1), fields)
    raise click.BadParameter(f"unknown format {text!r}; use one of {', '.join(FORMATS)}")


def field(resource: Any, path: str) -> Any:
    """The value at a dotted ``path`` of ``resource`` (None where any part is missing)."""
    value = resource
    for name, index in _PATH_PART.findall(path):
        if name:
            value = value.get(name) if isinstance(value, dict) else None
        else:
            value = value[int(index)] if isinstance(value, list) and int(index) < len(value) else None
        if value is None:
            return None
    return value


def scalar(value: Any) -> str:
    """A value as one cell or field: lists joined with ``;``, objects as compact JSON, booleans lowercase."""
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, list):
        return ";".join(scalar(item) for item in value)
    if isinstance(value, dict):
        return json.dumps(value, separators=(",", ":"), sort_keys=True)
    return str(value)


def basename(value: Any) -> str:
    """The last part of a resource name (``projects/p/models/m`` → ``m``)."""
    return scalar(value).rsplit("/", 1)[-1]


@dataclasses.dataclass(frozen=True)
class Column:
    """A default table column: its header, the field it shows, and how the value becomes text."""

    header: str
    path: str
    show: Callable[[Any], str] = scalar


def stdout_console() -> Console:
    # Piped output keeps whole lines: a table is not folded to an imagined 80-column terminal.
    return Console(highlight=False, markup=False, emoji=False, width=None if sys.stdout.isatty() else 250)


def stderr() -> Console:
    """The console for messages, progress bars and spinners (rich draws these only on a terminal).

    Messages are printed as they are: no markup (``[job]`` is text), no emoji codes, no wrapping.
    """
    return Console(stderr=True, highlight=False, markup=False, emoji=False, soft_wrap=True)


def _table(rows: Sequence[Any], columns: Sequence[Column]) -> None:
    table = Table(box=None, show_edge=False, pad_edge=False, header_style="bold")
    for column in columns:
        table.add_column(column.header, overflow="fold")
    for row in rows:
        table.add_row(*(Text(column.show(field(row, column.path))) for column in columns))
    stdout_console().print(table)


def _header(path: str) -> str:
    last = _PATH_PART.findall(path)[-1]
    name = last[0] or f"[{last[1]}]"
    return re.sub(r"(?<=[a-z0-9])(?=[A-Z])", "_", name).upper()


def emit(data: Any, chosen: Format | None, default: str = "yaml", columns: Sequence[Column] = ()) -> None:
    """Print ``data`` (a resource, or a list of them) on stdout in the ``chosen`` format, else ``default``.

    :param columns: the table's columns when the format is plain ``table`` and ``data`` is a list.
    """
    fmt = chosen or parse_format(default)
    items = data if isinstance(data, list) else [data]
    if fmt.kind == "none":
        return
    if fmt.kind == "json":
        click.echo(json.dumps(data, indent=2, sort_keys=False))
    elif fmt.kind == "yaml":
        if isinstance(data, list):
            click.echo(yaml.safe_dump_all(data, sort_keys=False, allow_unicode=True), nl=False)
        else:
            click.echo(yaml.safe_dump(data, sort_keys=False, allow_unicode=True), nl=False)
    elif fmt.kind == "value":
        for item in items:
            click.echo("\t".join(scalar(field(item, path)) for path in fmt.fields))
    elif fmt.fields:
        _table(items, [Column(_header(path), path) for path in fmt.fields])
    elif columns and isinstance(data, list):
        _table(items, columns)
    else:  # a table of one resource: its top-level fields
        _table([{"key": key, "value": value} for key, value in (data or {}).items()],
               [Column("FIELD", "key"), Column("VALUE", "value")])
