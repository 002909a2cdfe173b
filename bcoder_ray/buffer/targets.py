"""Cached frozen targets filled in after the rows were written: sidecar files, and joining them onto rows.

A sidecar `targets/fp=<fingerprint>/<sample-file-stem>--<key>.parquet` holds, for rows of one sample file,
`row_index` (position in that file), `sample_id` (checked on join) and the three per-token target columns. A
reader asking for fingerprint F takes a row's inline targets when their `targets_fingerprint` is F, else the
sidecar's, else the row has none for F. Sidecars are read by row group with `row_index` statistics, so joining
one row group of samples reads only the matching part of its sidecars.
"""

from __future__ import annotations

import hashlib
import re

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bcoder_ray.buffer.schema import SAMPLE_SCHEMA, TARGET_COLUMNS, BufferError
from bcoder_ray.buffer.storage import Store

TARGETS_DIR = "targets"
SIDECAR_SCHEMA = pa.schema([
    pa.field("row_index", pa.int64(), nullable=False),
    pa.field("sample_id", pa.string(), nullable=False),
] + [SAMPLE_SCHEMA.field(c) for c in TARGET_COLUMNS])
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


def check_target_lengths(table: pa.Table, program_ids: pa.ChunkedArray | pa.Array, where: str) -> None:
    n_ids = pc.list_value_length(program_ids)
    for c in TARGET_COLUMNS:
        if table[c].null_count:
            raise BufferError(f"{where}: {c} is null for sample_id {table['sample_id'][pc.index(pc.is_null(table[c]), True).as_py()]}")
        bad = pc.fill_null(pc.not_equal(pc.list_value_length(table[c]), n_ids), True)
        if pc.any(bad).as_py():
            i = pc.index(bad, True).as_py()
            raise BufferError(f"{where}: sample_id {table['sample_id'][i].as_py()}: {c} has "
                              f"{pc.list_value_length(table[c])[i].as_py()} values for {n_ids[i].as_py()} program tokens")


class TargetsJoin:
    """Attach the targets of one fingerprint to row groups of sample files (one instance per reader epoch)."""

    def __init__(self, store: Store, fingerprint: str, sidecars: dict[str, list[str]]):
        self.store = store
        self.fingerprint = fingerprint
        self.sidecars = sidecars  # sample stem -> sidecar paths

    @classmethod
    def open(cls, store: Store, fingerprint: str) -> "TargetsJoin":
        by_stem: dict[str, list[str]] = {}
        for info in store.list(fingerprint_dir(fingerprint)):
            by_stem.setdefault(sample_stem_of(info.base_name), []).append(info.path)
        return cls(store, fingerprint, by_stem)

    def _sidecar_rows(self, stem: str, start: int, stop: int) -> pa.Table | None:
        parts = []
        for path in list(self.sidecars.get(stem, ())):
            try:
                pf = self.store.parquet_file(path)
                meta = pf.metadata
                col = meta.schema.to_arrow_schema().names.index("row_index")
                groups = []
                for g in range(meta.num_row_groups):
                    st = meta.row_group(g).column(col).statistics
                    if st is None or not st.has_min_max or (st.min < stop and st.max >= start):
                        groups.append(g)
                t = pf.read_row_groups(groups, use_threads=False) if groups else None
            except FileNotFoundError:
                continue  # replaced by compaction since the listing
            except (pa.ArrowInvalid, pa.ArrowIOError, OSError, ValueError) as e:
                # its rows simply lack targets again: missing_targets lists them for recomputation
                self.store.quarantine(path[len(self.store.root) + 1:], f"reading targets failed: {e}")
                self.sidecars[stem] = [p for p in self.sidecars[stem] if p != path]
                continue
            if t is not None:
                mask = pc.and_(pc.greater_equal(t["row_index"], start), pc.less(t["row_index"], stop))
                parts.append(t.filter(mask))
        parts = [p for p in parts if p.num_rows]
        return pa.concat_tables(parts) if parts else None

    def attach(self, table: pa.Table, stem: str, start: int) -> tuple[pa.Table, pa.Array]:
        """`table` is rows [start, start + n) of sample file `stem` with sample_id, the target columns and
        targets_fingerprint. Returns it with targets for this fingerprint, and a mask of rows that have them."""
        n = table.num_rows
        inline_ok = pc.fill_null(pc.equal(table["targets_fingerprint"], self.fingerprint), False)
        inline_ok = pc.and_(inline_ok, pc.is_valid(table["target_actions"]))
        if pc.all(inline_ok).as_py():
            return table, inline_ok
        side = self._sidecar_rows(stem, start, start + n)
        if side is None:
            return table, inline_ok
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
        for c in TARGET_COLUMNS:
            col = pc.if_else(inline_ok, table[c], side[c].take(take))
            table = table.set_column(table.schema.get_field_index(c), c, col)
        return table, pc.or_(inline_ok, pa.array(valid))
