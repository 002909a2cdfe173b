"""Filling an algorithm's cached per-token targets into the buffer: once per row and fingerprint, by a Ray Data
`map_batches` job or by the running policy actors.

    job = TargetJob(AlgorithmRef(cfg.algorithm.name, cfg.algorithm, ctx), plan.targets, pad_id(tokenizer))
    n = fill_targets(buffer, job, num_cpus=1.0)              # or pool=actor_pool: the policy actors fill them

What is computed is the algorithm's business (`Algorithm.target_computer(targets)`: a callable from a `Batch` to
{column: one list per row}); this module only finds the rows lacking `targets.fingerprint`, hands them over in
batches, and writes the columns back keyed by the rows' sample ids (a redone batch writes nothing twice).

The computer sees the learner columns plus the sample columns `targets.rows.extra_columns` names (per-token ones,
listed in `targets.rows.token_columns`, in `Batch.tokens`; the others in `Batch.info`). With `targets.group_by`
its batches hold whole groups (rows sharing those columns' values, e.g. one problem's samples of one policy
version) of the rows lacking targets, whatever the batch size: a group is never split, so targets that depend on
a group's other rows (GRPO's advantages) see all of it. The rollout writes each problem's samples in one file, so
a group's targets are written by one sidecar write (all or none); rows lost to failures are simply absent.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc

from bcoder_ray.algorithms import make_algorithm
from bcoder_ray.algorithms.base import AlgorithmConfig, RunContext, TargetsPlan
from bcoder_ray.model.batch import collate
from bcoder_ray.buffer import rows_from_batch
from bcoder_ray.util.quiet import quiet_libraries

GROUPED_CHUNK_ROWS = 4096  # rows per actor task when targets are filled by groups (as missing_targets' tables)
RAY_DATA_ATTEMPTS = 3  # Ray Data jobs per fill: one whose actor died is followed by one over the rows still missing


IDENTITY_COLUMNS = ("sample_id", "suite", "problem_id", "source")
"""Columns of the rows lacking targets that a target computer sees in `Batch.info` (e.g. to join other buffer
rows by sample id)."""


@dataclass(frozen=True)
class AlgorithmRef:
    """An algorithm by name, typed config and run context, rebuilt in any process (`make_algorithm`)."""

    name: str
    config: AlgorithmConfig
    context: RunContext
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
        # the rows' identity columns (as `missing_targets` hands them out), the plan's extra columns and its
        # grouping keys ride along in `Batch.info`; its per-token extra columns in `Batch.tokens`
        t = self.job.targets
        token_columns = tuple(t.rows.token_columns)
        info_columns = tuple(c for c in dict.fromkeys((*IDENTITY_COLUMNS, *t.rows.extra_columns, *t.group_by))
                             if c not in token_columns and c in batch.column_names)
        values = self.compute(collate(rows, self.job.pad_id, token_columns=token_columns, info_columns=info_columns))
        columns = {name: batch.column(name) for name in ("sample_file", "row_index", "sample_id")
                   if name in batch.column_names}
        for name in self.job.targets.columns:
            columns[name] = pa.array(values[name], type=_list_type(values[name]))
        return pa.table(columns)

    def table(self, table: pa.Table) -> pa.Table:
        """`self` over `table` in slices of the job's batch size (whole groups with `group_by`), concatenated."""
        step, group_by = self.job.batch_size, self.job.targets.group_by
        pieces = (group_slices(table, group_by, step) if group_by else
                  [table.slice(start, step) for start in range(0, table.num_rows, step)])
        return pa.concat_tables([self(piece) for piece in pieces])


def group_slices(table: pa.Table, group_by: tuple[str, ...], max_rows: int) -> list[pa.Table]:
    """`table` sorted by the `group_by` columns and cut into pieces of whole groups, each of at most `max_rows`
    rows unless one group alone is larger (then that group is one piece)."""
    missing = [c for c in group_by if c not in table.column_names]
    if missing:
        raise KeyError(f"group_by: the rows lack column(s) {missing}; they have {table.column_names}")
    if table.num_rows == 0:
        return []
    table = table.take(pc.sort_indices(table, sort_keys=[(c, "ascending") for c in group_by]))
    keys = list(zip(*(table[c].to_pylist() for c in group_by)))
    pieces, start, end = [], 0, 0
    for i in range(1, len(keys) + 1):
        if i < len(keys) and keys[i] == keys[i - 1]:
            continue
        if i - start > max_rows and end > start:  # this group does not fit beside the previous ones
            pieces.append(table.slice(start, end - start))
            start = end
        end = i
    pieces.append(table.slice(start, end - start))
    return pieces


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
    `rollout.ActorPool`: its policy actors compute and write them. Returns the number of rows filled.

    The Ray Data job's actor is not restarted by Ray (`max_restarts=0`): Ray Data hands its actors their
    constructor arguments through the object store, which a restart cannot count on (ray-project/ray#53727, and
    Ray's error line at every run). A job whose actor died is followed by a new one, with a new actor, over the
    rows that still lack targets (the buffer is what survives; a batch written before the death is not redone).
    """
    import ray.exceptions

    t = job.targets
    tables = _missing(buffer, job, GROUPED_CHUNK_ROWS if pool is not None else job.batch_size)
    if not tables:
        return 0
    if pool is not None:
        return sum(pool.fill_targets([TargetChunk(targets_batch_key(x), x) for x in tables], job))
    filled = 0
    for attempt in range(1, RAY_DATA_ATTEMPTS + 1):
        try:
            for out in _ray_data_job(tables, job, num_cpus, num_gpus).iter_batches(batch_size=None,
                                                                                    batch_format="pyarrow"):
                buffer.write_targets(out, t.fingerprint, batch_key=targets_batch_key(out))
                filled += out.num_rows
            return filled
        except ray.exceptions.RayActorError:  # the actor died (a bug in the computer raises RayTaskError)
            if attempt == RAY_DATA_ATTEMPTS:
                raise
            tables = _missing(buffer, job, job.batch_size)
            if not tables:
                return filled
    return filled


def fill_targets_here(buffer, job: TargetJob, computer: TargetComputer) -> int:
    """`fill_targets` in this process, with a `TargetComputer` this process holds (the persistent learner fills
    the targets of the rows that arrived since its last fill before it reads them: `run.mode: async`)."""
    filled = 0
    for table in _missing(buffer, job, job.batch_size):
        out = computer.table(table)
        buffer.write_targets(out, job.targets.fingerprint, batch_key=targets_batch_key(out))
        filled += out.num_rows
    return filled


def _missing(buffer, job: TargetJob, group_rows: int) -> list[pa.Table]:
    """The rows lacking `job.targets` (with the columns the computer sees), in whole groups of at most
    `group_rows` rows when the targets are grouped."""
    t = job.targets
    context = tuple(dict.fromkeys((*t.rows.extra_columns, *t.group_by)))
    tables = [x for x in buffer.missing_targets(t.fingerprint, filters=t.rows.filters, columns=context)
              if x.num_rows]
    if tables and t.group_by:  # whole groups per chunk (actors slice them further by group) or per Ray Data batch
        tables = group_slices(pa.concat_tables(tables, promote_options="default"), t.group_by, group_rows)
    return tables


def _ray_data_job(tables: list[pa.Table], job: TargetJob, num_cpus: float, num_gpus: float) -> "ray.data.Dataset":
    import ray.data

    return ray.data.from_arrow(tables).map_batches(
        TargetComputer, fn_constructor_args=(job,), batch_size=None if job.targets.group_by else job.batch_size,
        batch_format="pyarrow", compute=ray.data.ActorPoolStrategy(size=1), num_cpus=num_cpus, num_gpus=num_gpus,
        max_restarts=0)  # no restart from arguments Ray Data keeps in the object store: `fill_targets` starts anew

