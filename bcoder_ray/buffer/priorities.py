"""The priority side table: each row's last |TD error| under a learner's stage, beside the data, never in it.

    table = PriorityTable(store, "theta")
    table.write(sample_ids, td_errors, writer_key="theta-iter1-a0-rank0-step10")   # a new small file
    ids, values = table.read()                                                     # last value per sample_id

Layout: `priorities/<table>/part-<time_ns>-<hash of writer key>.parquet`, columns sample_id (the buffer's unique
row key) and priority (float64, ≥ 0). Writers only add whole files (atomic, `Store.write_parquet`), so the
sample files are never rewritten and a killed writer leaves nothing half-written; a reader takes, per sample_id,
the value of the file last in name order (the newest write; two writers in the same nanosecond, rare, order by
key). Ids that compaction keeps (it keeps every sample_id) keep their priority; ids no longer in the buffer are
ignored by readers. The files are not merged: one per learner report, small.
"""

from __future__ import annotations

import hashlib
import re
import time
from typing import Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bcoder_ray.buffer.schema import BufferError
from bcoder_ray.buffer.storage import DamagedFileError, Store, UnreadableFileError

PRIORITIES_DIR = "priorities"
PRIORITY_SCHEMA = pa.schema([pa.field("sample_id", pa.string(), nullable=False),
                             pa.field("priority", pa.float64(), nullable=False)])
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


def priority_dir(table: str) -> str:
    if not isinstance(table, str) or not _NAME.match(table):
        raise BufferError(f"priority table {table!r}: use 1-64 characters of [A-Za-z0-9_-] (a stage name)")
    return f"{PRIORITIES_DIR}/{table}"


class PriorityTable:
    """One table of priorities (a learner stage's) in a buffer's store (see the module docstring)."""

    def __init__(self, store: Store, table: str):
        self.store, self.table, self.dir = store, table, priority_dir(table)

    def write(self, sample_ids: Sequence[str], priorities: Sequence[float] | np.ndarray, writer_key: str) -> int:
        """Record these rows' priorities (one new file); the rows written."""
        values = np.asarray(priorities, np.float64)
        if len(sample_ids) != len(values):
            raise BufferError(f"priority table {self.table}: {len(sample_ids)} sample ids, {len(values)} priorities")
        bad = ~np.isfinite(values) | (values < 0)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            raise BufferError(f"priority table {self.table}: sample_id {sample_ids[i]} has priority {values[i]} "
                              f"(needs a finite value >= 0, an |TD error|)")
        if not len(values):
            return 0
        key = hashlib.sha256(writer_key.encode()).hexdigest()[:16]
        rel = f"{self.dir}/part-{time.time_ns():020d}-{key}.parquet"
        self.store.write_parquet(rel, pa.table({"sample_id": pa.array(list(sample_ids), pa.string()),
                                                "priority": pa.array(values)}), PRIORITY_SCHEMA, 65536)
        return len(values)

    def read(self) -> tuple[pa.Array, np.ndarray]:
        """(sample ids, priorities): the newest value of every id recorded. A file that cannot be read now is
        skipped with a warning (its rows keep their older value, or none)."""
        parts = []
        for info in self.store.list(self.dir):
            try:
                parts.append(self.store.read_parquet(info.path, lambda pf: pf.read()).cast(PRIORITY_SCHEMA))
            except FileNotFoundError:
                continue
            except (UnreadableFileError, DamagedFileError) as e:
                self.store.warn(f"skipped priorities {info.base_name} for now: {e}")
        if not parts:
            return pa.array([], pa.string()), np.zeros(0)
        t = pa.concat_tables(parts)
        ids = t["sample_id"].combine_chunks()
        unique = pc.unique(ids)
        slot = pc.index_in(ids, value_set=unique).to_numpy()
        last = np.full(len(unique), -1, np.int64)
        np.maximum.at(last, slot, np.arange(len(ids)))  # the last write of an id (files in name order) wins
        return unique, t["priority"].combine_chunks().to_numpy()[last]

    def lookup(self, sample_ids: pa.Array | pa.ChunkedArray) -> np.ndarray:
        """The newest priority of each of `sample_ids` (NaN where none is recorded)."""
        ids, values = self.read()
        if isinstance(sample_ids, pa.ChunkedArray):
            sample_ids = sample_ids.combine_chunks()
        pos = pc.index_in(sample_ids, value_set=ids).to_numpy(zero_copy_only=False)
        pos = np.asarray(pos, np.float64)  # nulls (unknown ids) read as NaN
        out = np.full(len(sample_ids), np.nan)
        hit = ~np.isnan(pos)
        out[hit] = values[pos[hit].astype(np.int64)]
        return out
