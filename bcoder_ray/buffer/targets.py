"""Cached targets of an algorithm, computed after the rows were written: sidecar files, and joining them onto
rows.

Targets are declared by whoever writes them, not by the buffer's schema. A fingerprint names one way of
computing them (a checkpoint, a tokenizer, the algorithm's settings). Its sidecars
`targets/fp=<fingerprint>/<sample-file-stem>--<key>.parquet` hold, for rows of one sample file, `row_index`
(position in that file), `sample_id` (checked on join) and the fingerprint's target columns: any per-token list
columns, one value per program token, with the types of the first write. Every write for a fingerprint has the
same column set (`check_columns`). A reader asking for fingerprint F gets exactly F's target columns, from its
sidecars; rows without them have none for F. Sidecars are read by row group with `row_index` statistics, so
joining one row group of samples reads only the matching part of its sidecars.
"""

from __future__ import annotations

import hashlib
import re
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bcoder_ray.buffer.schema import LEARNER_COLUMNS, SAMPLE_SCHEMA, BufferError
from bcoder_ray.buffer.storage import DamagedFileError, Store, UnreadableFileError

TARGETS_DIR = "targets"
SIDECAR_KEY_FIELDS = (pa.field("row_index", pa.int64(), nullable=False),
                      pa.field("sample_id", pa.string(), nullable=False))
SIDECAR_KEY_COLUMNS = tuple(f.name for f in SIDECAR_KEY_FIELDS)
# What `missing_targets` hands out besides the keys: a writer may pass them back; they are not targets.
CONTEXT_COLUMNS = ("sample_file", "suite", "problem_id", "tokenizer_hash", "source", "prompt_ids", "program_ids")
SIDECAR_ROW_GROUP = 1024
_FINGERPRINT = re.compile(r"^[A-Za-z0-9._-]{1,128}$")


def fingerprint_dir(fingerprint: str) -> str:
    if not isinstance(fingerprint, str) or not _FINGERPRINT.match(fingerprint):
        raise BufferError(f"targets fingerprint {fingerprint!r}: use 1-128 characters of [A-Za-z0-9._-]")
    return f"{TARGETS_DIR}/fp={fingerprint}"


def sidecar_name(sample_stem: str, batch_key: str, origin: str) -> str:
    key = hashlib.sha256(f"{batch_key}\x1f{origin}".encode()).hexdigest()[:16]
    return f"{sample_stem}--{key}.parquet"


def sample_stem_of(sidecar: str) -> str:
    return sidecar.split("--", 1)[0]


def sidecar_schema(target_fields: Sequence[pa.Field]) -> pa.Schema:
    return pa.schema([*SIDECAR_KEY_FIELDS, *target_fields])


def target_fields_of(schema: pa.Schema) -> list[pa.Field]:
    """The target columns of a table a writer hands to `write_targets` (or of a sidecar)."""
    return [f for f in schema if f.name not in SIDECAR_KEY_COLUMNS + CONTEXT_COLUMNS]


def stored_target_fields(store: Store, fingerprint: str) -> list[pa.Field] | None:
    """The target columns of `fingerprint` as its first sidecar holds them; None when none is stored yet."""
    for info in store.list(fingerprint_dir(fingerprint)):
        try:
            schema = store.parquet_file(info.path).schema_arrow
        except FileNotFoundError:
            continue  # replaced by compaction since the listing
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError, ValueError):
            continue  # damaged: readers quarantine it; another sidecar tells the columns
        return target_fields_of(schema)
    return None


def check_columns(fields: Sequence[pa.Field], stored: Sequence[pa.Field] | None, where: str) -> None:
    """The writer's target columns: at least one, list-typed, named apart from the sample columns, and the
    same set as the fingerprint's stored ones."""
    names = [f.name for f in fields]
    if not names:
        raise BufferError(f"{where}: no target columns (besides {list(SIDECAR_KEY_COLUMNS + CONTEXT_COLUMNS)})")
    clash = [n for n in names if n in SAMPLE_SCHEMA.names or n in LEARNER_COLUMNS]
    if clash:
        raise BufferError(f"{where}: target column(s) {clash} are named like sample columns; rename them")
    not_lists = [f"{f.name}: {f.type}" for f in fields
                 if not (pa.types.is_list(f.type) or pa.types.is_large_list(f.type))]
    if not_lists:
        raise BufferError(f"{where}: target columns hold one value per program token (a list); got {not_lists}")
    if stored is not None and set(names) != {f.name for f in stored}:
        raise BufferError(f"{where}: target columns {sorted(names)} differ from the columns "
                          f"{sorted(f.name for f in stored)} already stored for this fingerprint")


def check_target_lengths(table: pa.Table, program_ids: pa.ChunkedArray | pa.Array, columns: Sequence[str],
                         where: str) -> None:
    n_ids = pc.list_value_length(program_ids)
    for c in columns:
        if table[c].null_count:
            raise BufferError(f"{where}: {c} is null for sample_id "
                              f"{table['sample_id'][pc.index(pc.is_null(table[c]), True).as_py()]}")
        bad = pc.fill_null(pc.not_equal(pc.list_value_length(table[c]), n_ids), True)
        if pc.any(bad).as_py():
            i = pc.index(bad, True).as_py()
            raise BufferError(f"{where}: sample_id {table['sample_id'][i].as_py()}: {c} has "
                              f"{pc.list_value_length(table[c])[i].as_py()} values for {n_ids[i].as_py()} program tokens")


def _row_range(pf: pq.ParquetFile, start: int, stop: int) -> pa.Table | None:
    """The row groups of a sidecar whose `row_index` statistics may fall in [start, stop)."""
    meta = pf.metadata
    col = meta.schema.to_arrow_schema().names.index("row_index")
    groups = []
    for g in range(meta.num_row_groups):
        st = meta.row_group(g).column(col).statistics
        if st is None or not st.has_min_max or (st.min < stop and st.max >= start):
            groups.append(g)
    return pf.read_row_groups(groups, use_threads=False) if groups else None


class TargetsJoin:
    """Attach the targets of one fingerprint to row groups of sample files (one instance per reader epoch).
    `fields`: the fingerprint's target columns (fixed by the reader when it starts)."""

    def __init__(self, store: Store, fingerprint: str, sidecars: dict[str, list[str]], fields: Sequence[pa.Field]):
        self.store = store
        self.fingerprint = fingerprint
        self.sidecars = sidecars  # sample stem -> sidecar paths
        self.fields = list(fields)
        self.schema = sidecar_schema(self.fields)

    @classmethod
    def open(cls, store: Store, fingerprint: str, fields: Sequence[pa.Field] | None = None) -> "TargetsJoin":
        by_stem: dict[str, list[str]] = {}
        for info in store.list(fingerprint_dir(fingerprint)):
            by_stem.setdefault(sample_stem_of(info.base_name), []).append(info.path)
        if fields is None:
            fields = stored_target_fields(store, fingerprint) or []
        return cls(store, fingerprint, by_stem, fields)

    def _sidecar_rows(self, stem: str, start: int, stop: int) -> pa.Table | None:
        parts = []
        for path in list(self.sidecars.get(stem, ())):
            try:
                t = self.store.read_parquet(path, lambda pf: _row_range(pf, start, stop))
            except FileNotFoundError:
                continue  # replaced by compaction since the listing
            except UnreadableFileError as e:
                self.store.warn(f"skipped targets {path} for now (not moved): {e}")
                continue  # those rows lack targets this time
            except DamagedFileError as e:
                # its rows simply lack targets again: missing_targets lists them for recomputation
                self.store.quarantine(path[len(self.store.root) + 1:], f"reading targets failed: {e}")
                self.sidecars[stem] = [p for p in self.sidecars[stem] if p != path]
                continue
            if t is not None:
                mask = pc.and_(pc.greater_equal(t["row_index"], start), pc.less(t["row_index"], stop))
                parts.append(t.filter(mask).select(self.schema.names).cast(self.schema))
        parts = [p for p in parts if p.num_rows]
        return pa.concat_tables(parts) if parts else None

    def attach(self, table: pa.Table, stem: str, start: int) -> tuple[pa.Table, pa.Array]:
        """`table` is rows [start, start + n) of sample file `stem` with sample_id. Returns it with this
        fingerprint's target columns appended (null where a row has none), and a mask of rows that have them."""
        n = table.num_rows
        side = self._sidecar_rows(stem, start, start + n) if self.fields else None
        if side is None:
            for f in self.fields:
                table = table.append_column(f, pa.nulls(n, f.type))
            return table, pa.array(np.zeros(n, bool))
        pos = side["row_index"].to_numpy() - start
        idx = np.full(n, -1, np.int64)
        idx[pos] = np.arange(len(pos))  # a row covered twice takes the later sidecar's (identical) values
        valid = idx >= 0
        take = pa.array(idx, mask=~valid)
        ids = side["sample_id"].take(take)
        mismatch = pc.fill_null(pc.not_equal(ids, table["sample_id"]), False)
        if pc.any(mismatch).as_py():
            i = pc.index(mismatch, True).as_py()
            raise BufferError(f"targets fp={self.fingerprint} for {stem}: row {start + i} holds sample_id "
                              f"{ids[i].as_py()}, the sample file has {table['sample_id'][i].as_py()}")
        for f in self.fields:
            table = table.append_column(f, side[f.name].take(take))
        return table, pa.array(valid)
