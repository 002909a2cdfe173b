"""Filling an algorithm's cached per-token targets into the buffer: once per row and fingerprint, by a Ray Data
`map_batches` job or by the running policy actors.

    n = fill_targets(buffer, algorithm_ref, plan.targets, pad, via=TargetsVia(num_cpus=1.0))

What is computed is the algorithm's business (`Algorithm.target_computer(targets)`: a callable from a `Batch` to
{column: one list per row}); this module only finds the rows lacking `targets.fingerprint`, hands them over in
batches, and writes the columns back keyed by the rows' sample ids (a redone batch writes nothing twice).
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any, Mapping

import pyarrow as pa

from bcoder_ray.algorithms import make_algorithm
from bcoder_ray.algorithms.base import TargetsPlan
from bcoder_ray.batch import collate
from bcoder_ray.buffer import rows_from_batch
from bcoder_ray.quiet import quiet_libraries


IDENTITY_COLUMNS = ("sample_id", "suite", "problem_id", "source")
"""Columns of the rows lacking targets that a target computer sees in `Batch.info` (e.g. to join other buffer
rows by sample id)."""


@dataclass(frozen=True)
class AlgorithmRef:
    """An algorithm by plain data, rebuilt in any process (`make_algorithm`)."""

    name: str
    config: Mapping[str, Any]
    context: Mapping[str, Any]
    imports: tuple[str, ...] = ()

    def build(self):
        return make_algorithm(self.name, self.config, self.context, self.imports)


@dataclass(frozen=True)
class TargetJob:
    """What a target-filling worker needs: the algorithm, the targets it declares, batch size and threads."""

    algorithm: AlgorithmRef
    targets: TargetsPlan
    pad_id: int
    batch_size: int = 16
    threads: int = 1


class TargetComputer:
    """Rows lacking targets in (pyarrow), the same rows' target columns out; a Ray Data `map_batches` class."""

    def __init__(self, job: TargetJob):
        import torch

        torch.set_num_threads(max(1, job.threads))
        quiet_libraries()
        self.job = job
        self.compute = job.algorithm.build().target_computer(job.targets)

    def __call__(self, batch: pa.Table) -> pa.Table:
        rows = rows_from_batch(batch)
        for row in rows:
            row.setdefault("reward", 0.0)  # collate wants one; frozen targets do not depend on it
            row.setdefault("is_human", row.get("source") == "human")
        # the rows' identity columns (as `missing_targets` hands them out) ride along in `Batch.info`
        info = tuple(c for c in IDENTITY_COLUMNS if c in batch.column_names)
        values = self.compute(collate(rows, self.job.pad_id, info_columns=info))
        columns = {name: batch.column(name) for name in ("sample_file", "row_index", "sample_id")
                   if name in batch.column_names}
        for name in self.job.targets.columns:
            columns[name] = pa.array(values[name], type=_list_type(values[name]))
        return pa.table(columns)

    def table(self, table: pa.Table) -> pa.Table:
        """`self` over `table` in slices of the job's batch size, concatenated."""
        step = self.job.batch_size
        return pa.concat_tables([self(table.slice(start, step)) for start in range(0, table.num_rows, step)])


def _list_type(values: list) -> pa.DataType:
    """int32 lists for integer targets (actions), float32 lists otherwise."""
    first = next((v for row in values for v in row), 0.0)
    return pa.list_(pa.int32()) if isinstance(first, int) and not isinstance(first, bool) else pa.list_(pa.float32())


def targets_batch_key(table: pa.Table) -> str:
    """The write key of a batch of targets: a hash of its sample ids (a redone batch maps to the same key)."""
    ids = "\n".join(map(str, table.column("sample_id").to_pylist()))
    return hashlib.sha256(ids.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class TargetChunk:
    """Rows lacking targets, as `ReplayBuffer.missing_targets` gives them, handed to a policy actor."""

    key: str
    table: Any


def fill_targets(buffer, job: TargetJob, *, num_cpus: float = 1.0, num_gpus: float = 0.0, pool=None) -> int:
    """Compute and store `job.targets` for every buffer row lacking them. With no `pool`: a Ray Data
    `map_batches` job (one actor holding the frozen networks, `num_cpus`/`num_gpus`); with a
    `rollout.ActorPool`: its policy actors compute and write them. Returns the number of rows filled."""
    import ray.data

    t = job.targets
    tables = [x for x in buffer.missing_targets(t.fingerprint, filters=dict(t.rows.filters) or None) if x.num_rows]
    if not tables:
        return 0
    if pool is not None:
        return sum(pool.fill_targets([TargetChunk(targets_batch_key(x), x) for x in tables], job))
    dataset = ray.data.from_arrow(tables).map_batches(
        TargetComputer, fn_constructor_args=(job,), batch_size=job.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=num_cpus, num_gpus=num_gpus)
    filled = 0
    for out in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        buffer.write_targets(out, t.fingerprint, batch_key=targets_batch_key(out))
        filled += out.num_rows
    return filled

