"""Rows of a data set's files, each with where it came from, so that every error can name the file and row.

`source` is one of:
- a file (`.jsonl`, `.json`: a list of objects or {"rows": [...]} / {"data": [...]}, `.parquet`): its rows carry
  the split in a column (`split_column`, default "split"), or the file's name is the split (`test.jsonl`);
- a folder: one file per split, named `<split>.<ext>` or sharded `<split>-*.<ext>` (the Hugging Face layout,
  `train-00000-of-00002.parquet`), read in name order;
- anything else is a data set name for `datasets.load_dataset(source, split=split)` (a hub name such as
  `org/name`; `streaming=True` reads a large set lazily). `datasets` is a dependency of the project already.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from envs.jsonl import iter_jsonl
from envs.problem import SpecError

EXTENSIONS = (".jsonl", ".json", ".parquet")


class MissingSplit(ValueError):
    """The source holds no rows of the split asked for (not malformed data: `python -m envs.validate` skips it)."""


@dataclass(frozen=True)
class Row:
    """One raw row and where it is: `where` reads "FILE row N" (1-based; the line number for JSON Lines)."""

    data: dict
    where: str


def split_rows(source: str | os.PathLike, split: str, split_column: str = "split",
               streaming: bool = False, cache_dir: str | None = None) -> Iterator[Row]:
    """The rows of `split` in `source` (see the module's docstring)."""
    path = Path(source)
    if path.is_dir():
        files = split_files(path, split)
        if not files:
            names = sorted(p.name for p in path.iterdir() if p.suffix in EXTENSIONS)
            raise MissingSplit(f"{path}: no file for split {split!r}: expected {split}.jsonl, {split}.json, "
                            f"{split}.parquet or {split}-*.<ext> (the folder holds {names or 'no data files'})")
        for f in files:
            yield from _tagged(read_rows(f), split, split_column, f, by_name=True)
        return
    if path.is_file():
        yield from _tagged(read_rows(path), split, split_column, path, by_name=_names_split(path, split))
        return
    if path.suffix in EXTENSIONS or os.sep in str(source) and not _looks_like_hub_name(str(source)):
        raise SpecError(f"{source}: no such file or folder")
    yield from _hub_rows(str(source), split, streaming, cache_dir)


def split_files(folder: Path, split: str) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix in EXTENSIONS
                  and (p.stem == split or p.stem.startswith(split + "-")))


def _names_split(path: Path, split: str) -> bool:
    return path.stem == split or path.stem.startswith(split + "-")


def _tagged(rows: Iterator[Row], split: str, column: str, path: Path, by_name: bool) -> Iterator[Row]:
    """Rows of one file that belong to `split`: by their split column, or all of them when the file's name is
    the split and its rows carry none. A file with neither is an error (which split would it be?)."""
    any_row, yielded, seen = False, False, set()
    for row in rows:
        any_row = True
        value = row.data.get(column)
        if value is None:
            if by_name:
                yielded = True
                yield row
                continue
            raise SpecError(f"{row.where}: missing field {column!r} (the split): add it to every row, or give "
                            f"one file per split (<split>.jsonl, ...) in a folder")
        if not isinstance(value, str):
            raise SpecError(f"{row.where}: field {column!r} must be a string, got {type(value).__name__}")
        seen.add(value)
        if value == split:
            yielded = True
            yield row
    if not any_row:
        raise SpecError(f"{path}: the file holds no rows")
    if not yielded:
        raise MissingSplit(f"{path}: no row of split {split!r} (field {column!r}); its rows' splits are "
                        f"{sorted(seen)} (a run evaluates suite.validation_split and suite.test_split too: set one "
                        f"to null to skip it)")


def read_rows(path: Path) -> Iterator[Row]:
    """Every row of one file, as a dict, with where it is."""
    if path.suffix == ".jsonl":
        for where, value in iter_jsonl(path, SpecError, where_format="{path} line {line}"):
            yield Row(_as_object(value, where), where)
    elif path.suffix == ".json":
        try:
            value = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise SpecError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(value, dict):
            value = value.get("rows", value.get("data"))
        if not isinstance(value, list):
            raise SpecError(f"{path}: expected a JSON list of rows (or an object with a 'rows' list)")
        for i, item in enumerate(value):
            where = f"{path} row {i + 1}"
            yield Row(_as_object(item, where), where)
    elif path.suffix == ".parquet":
        import pyarrow.parquet as pq

        row_no = 0
        for batch in pq.ParquetFile(path).iter_batches(batch_size=256):  # large files are read a batch at a time
            for item in batch.to_pylist():
                row_no += 1
                yield Row(item, f"{path} row {row_no}")
    else:
        raise SpecError(f"{path}: unknown file type {path.suffix!r}; expected one of {EXTENSIONS}")


def _as_object(value: Any, where: str) -> dict:
    if not isinstance(value, dict):
        raise SpecError(f"{where}: expected a JSON object, got {type(value).__name__}")
    return value


def _looks_like_hub_name(source: str) -> bool:
    parts = source.split("/")
    return len(parts) == 2 and all(parts) and not source.startswith((".", "/"))


def _hub_rows(source: str, split: str, streaming: bool, cache_dir: str | None) -> Iterator[Row]:
    import datasets  # heavy; only a hub source needs it

    ds = datasets.load_dataset(source, split=split, streaming=streaming, cache_dir=cache_dir)
    for i, item in enumerate(ds):
        yield Row(dict(item), f"{source} [{split}] row {i + 1}")
