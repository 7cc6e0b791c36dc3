"""Filters on a search: which gallery images may be returned, by label and by metadata fields.

A filter is a JSON object: ``{"label": "hat"}``, ``{"label": ["hat", "shoes"], "color": "red"}``. The key
``label`` matches the image's label; any other key matches that top-level metadata field. A value matches by
equality (a string, a number, a boolean, or null for "absent or null"); a list matches any of its values. All
keys must match. The allowed images are found in the metadata database and only they are searched, before the
structural stage, so a filter never leaves fewer results than it could.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any

MAX_KEYS = 16
MAX_VALUES = 256
_FIELD = re.compile(r"^[A-Za-z0-9_\-. ]{1,64}$")
Scalar = str | int | float | bool | None


@dataclass(frozen=True)
class Filter:
    """``conditions``: (``label`` or a metadata field, the values any of which it may have)."""

    conditions: tuple[tuple[str, tuple[Scalar, ...]], ...]

    def sql(self) -> tuple[str, list[Any]]:
        """The ``WHERE`` clause over the ``images`` table, and its parameters."""
        clauses, params = [], []
        for key, values in self.conditions:
            column = "label" if key == "label" else f"json_extract(metadata, '$.\"{key}\"')"
            parts = []
            for value in values:
                if value is None:
                    parts.append(f"{column} IS NULL")
                elif isinstance(value, bool):  # JSON true/false read back as 1/0
                    parts.append(f"({column} = ? AND json_type(metadata, '$.\"{key}\"') = ?)")
                    params += [int(value), "true" if value else "false"]
                else:
                    parts.append(f"{column} = ?")
                    params.append(value)
            clauses.append("(" + " OR ".join(parts) + ")")
        return " AND ".join(clauses), params


def parse(text: str | dict[str, Any] | None) -> Filter | None:
    """A filter from its JSON text (or parsed object); None for none. ValueError says what is wrong."""
    if text is None or text == "":
        return None
    value = json.loads(text) if isinstance(text, str) else text
    if not isinstance(value, dict):
        raise ValueError("where: a JSON object, e.g. {\"label\": \"hat\", \"color\": [\"red\", \"blue\"]}")
    if not value:
        return None
    if len(value) > MAX_KEYS:
        raise ValueError(f"where: at most {MAX_KEYS} keys")
    conditions = []
    for key, wanted in value.items():
        if not _FIELD.match(key):
            raise ValueError(f"where: field names are 1-64 letters, digits, spaces, '_', '-' or '.', not {key[:80]!r}")
        values = tuple(wanted) if isinstance(wanted, list) else (wanted,)
        if not values or len(values) > MAX_VALUES:
            raise ValueError(f"where: {key}: 1 to {MAX_VALUES} values")
        for v in values:
            if not isinstance(v, (str, int, float, bool)) and v is not None:
                raise ValueError(f"where: {key}: values are strings, numbers, booleans or null, not {type(v).__name__}")
        conditions.append((key, values))
    return Filter(tuple(conditions))
