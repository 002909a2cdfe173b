"""What the format adapters share: the Skip signal and typed field readers whose errors name the field."""

from __future__ import annotations

import json
import re
from typing import Any

from envs.problem import SpecError


class Skip(Exception):
    """A well-formed row the suite cannot use (e.g. tests in another language): left out, counted, logged."""


def field(row: dict, key: str, kind: type | tuple[type, ...], where: str, required: bool = True) -> Any:
    value = row.get(key)
    if value is None:
        if required:
            raise SpecError(f"{where}: missing field {key!r}")
        return None
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise SpecError(f"{where}: field {key!r} must be {names}, got {type(value).__name__}")
    return value


def json_field(row: dict, key: str, where: str, required: bool = True) -> Any:
    """A field stored as a JSON string (as most hub data sets store nested data), or already decoded."""
    value = row.get(key)
    if value is None or value == "":
        if required:
            raise SpecError(f"{where}: missing field {key!r}")
        return None
    if not isinstance(value, str):
        return value  # a Parquet struct or list column arrives decoded
    try:
        return json.loads(value)
    except json.JSONDecodeError as e:
        raise SpecError(f"{where}: field {key!r} is not valid JSON ({e.msg})") from None


_FENCE = re.compile(r"```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)```", re.S | re.I)


def strip_fences(text: str) -> str:
    """The code of a Markdown answer (the last fenced block), or the text itself when it has no fence."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else text
