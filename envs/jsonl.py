"""JSON Lines files read with errors that name the file and line at fault."""

from __future__ import annotations

import json
import os
from typing import Any, Iterator


def iter_jsonl(path: str | os.PathLike, error: type[Exception] = ValueError,
               where_format: str = "{path}:{line}") -> Iterator[tuple[str, Any]]:
    """(where, value) for each non-blank line of `path`; `where` (`where_format` filled with the path and the line
    number) is for the caller's own messages. A line that is not JSON raises `error` naming it."""
    with open(path, encoding="utf-8") as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = where_format.format(path=path, line=line_no)
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{where}: not valid JSON ({e.msg})") from None
            yield where, value
