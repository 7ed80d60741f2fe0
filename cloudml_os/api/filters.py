"""List filters of the v1 API: ``FIELD=VALUE`` / ``FIELD!=VALUE`` terms joined by ``AND``.

One grammar for every list endpoint (jobs, models, versions, operations); each says which fields it
filters on. Anything else is refused rather than ignored, so that a filter never silently matches more.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Collection, Mapping
from typing import Any

from sqlalchemy import ColumnElement, or_

from cloudml_os.errors import InvalidArgument


@dataclasses.dataclass(frozen=True)
class Condition:
    """One term of a list filter: ``field`` is e.g. ``state`` or ``labels.KEY``; ``op`` is ``=`` or ``!=``."""

    field: str
    op: str
    value: str


_TERM = re.compile(r'\s*([A-Za-z][A-Za-z0-9_]*(?:\.[^\s=!":()]+)?)\s*(!=|=)\s*(?:"([^"\\]*)"|([^\s"()]+))\s*')
_AND = re.compile(r"AND\s+")


def parse_list_filter(text: str, fields: Mapping[str, Collection[str]]) -> list[Condition]:
    """Parse ``FIELD=VALUE`` and ``FIELD!=VALUE`` terms joined by ``AND``.

    :param fields: the fields the resource can be filtered on and their valid values (empty: any
        value); a field ``labels`` stands for every ``labels.KEY``.
    :raises InvalidArgument: naming what was not understood, so that a filter never silently matches more.
    """
    terms = [f"{name}.KEY=VALUE" if name == "labels" else f"{name}=VALUE" for name in fields]
    supported = f"supported: {', '.join(terms)} (= or !=), joined by AND"
    conditions: list[Condition] = []
    position = 0
    if not text.strip():
        return conditions
    while True:
        match = _TERM.match(text, position)
        if match is None:
            raise InvalidArgument(f"filter: cannot parse {text[position:].strip()!r}; {supported}")
        field, op = match.group(1), match.group(2)
        value = match.group(3) if match.group(3) is not None else match.group(4)
        name = "labels" if field.startswith("labels.") else field
        if name not in fields or field == "labels":
            raise InvalidArgument(f"filter: cannot filter on {field!r}; {supported}")
        if fields[name] and value not in fields[name]:
            raise InvalidArgument(f"filter: {field} cannot be {value!r}; valid: {', '.join(fields[name])}")
        conditions.append(Condition(field, op, value))
        position = match.end()
        if position == len(text):
            return conditions
        joiner = _AND.match(text, position)
        if joiner is None:
            raise InvalidArgument(f"filter: expected AND before {text[position:]!r}; {supported}")
        position = joiner.end()


def compare(column: Any, condition: Condition) -> ColumnElement[bool]:
    """SQL for one condition on ``column``; for ``labels.KEY``, ``column`` is the labels JSON column and
    ``!=`` also matches rows without the label."""
    if condition.field.startswith("labels."):
        label = column[condition.field.removeprefix("labels.")].as_string()
        if condition.op == "=":
            return label == condition.value
        return or_(label.is_(None), label != condition.value)
    return column == condition.value if condition.op == "=" else column != condition.value


