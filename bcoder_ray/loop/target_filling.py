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

Batches and chunks. The driver cuts the rows lacking targets into the computer's batches once (`plan_chunks`:
each sample file's rows in slices of `batch_size`, or whole groups), then packs consecutive batches into chunks,
the unit of a task and of a sidecar write: with actors, about `TASKS_PER_WORKER` chunks per actor (the actors
share a fill evenly, whatever the files' sizes; the human seed is one large file); with Ray Data, chunks of about
`RAY_DATA_CHUNK_ROWS` rows (one block each, written while the actor computes the next). A chunk numbers its rows'
batches (`BATCH_COLUMN`), so how batches are packed never changes what the computer sees, nor its targets.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bcoder_ray.algorithms import make_algorithm
from bcoder_ray.algorithms.base import AlgorithmConfig, RunContext, TargetsPlan
from bcoder_ray.model.batch import collate
from bcoder_ray.buffer import rows_from_batch
from bcoder_ray.util.quiet import quiet_libraries

GROUPED_CHUNK_ROWS = 4096  # rows per actor chunk at most (grouped targets: their batches are cut within such pieces)
TASKS_PER_WORKER = 4  # chunks per policy actor (about): the actors finish together, and a lost task redoes little
RAY_DATA_CHUNK_ROWS = 512  # rows per Ray Data block and per write (not per batch: each write lists, checks, fsyncs)
RAY_DATA_ATTEMPTS = 3  # Ray Data jobs per fill: one whose actor died is followed by one over the rows still missing
BATCH_COLUMN = "_targets_batch"
"""A chunk's column: the computer batch of each row (its position among the fill's batches), dropped before
computing."""


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
    """A chunk of rows lacking targets in (pyarrow), the same rows' target columns out; a Ray Data `map_batches`
    class, and what a policy actor calls."""

    def __init__(self, job: TargetJob):
        import torch

        torch.set_num_threads(max(1, job.threads))
        quiet_libraries()
        self.job = job
        self.compute = job.algorithm.build().target_computer(job.targets)

    def __call__(self, chunk: pa.Table) -> pa.Table:
        """The computer over each batch of `chunk` (as `BATCH_COLUMN` numbers them; without it, `chunk` is one
        batch), concatenated."""
        return pa.concat_tables([self.batch(b) for b in chunk_batches(chunk)])

    def batch(self, batch: pa.Table) -> pa.Table:
        """One call of the algorithm's computer: the rows' identity columns and their target columns."""
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


def chunk_batches(chunk: pa.Table) -> list[pa.Table]:
    """The batches of a chunk (`BATCH_COLUMN` dropped); a table without the column is one batch."""
    if BATCH_COLUMN not in chunk.column_names:
        return [chunk]
    numbers = chunk[BATCH_COLUMN].to_numpy()
    bounds = [0, *(np.flatnonzero(numbers[1:] != numbers[:-1]) + 1).tolist(), chunk.num_rows]
    chunk = chunk.drop_columns([BATCH_COLUMN])
    return [chunk.slice(start, stop - start) for start, stop in zip(bounds, bounds[1:])]


def pack_chunks(batches: list[pa.Table], chunk_rows: int) -> list[pa.Table]:
    """Consecutive `batches` in chunks of at least `chunk_rows` rows (the last may have fewer), numbering each
    batch in `BATCH_COLUMN` by its position in `batches` (so chunks that Ray Data joins still split right)."""
    chunks, current, rows = [], [], 0
    for i, b in enumerate(batches):
        current.append(b.append_column(BATCH_COLUMN, pa.array(np.full(b.num_rows, i, np.int32))))
        rows += b.num_rows
        if rows >= chunk_rows:
            chunks.append(pa.concat_tables(current, promote_options="default"))
            current, rows = [], 0
    if current:
        chunks.append(pa.concat_tables(current, promote_options="default"))
    return chunks


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
    rows that still lack targets (the buffer is what survives; a chunk written before the death is not redone).
    """
    import ray.exceptions

    t = job.targets
    chunks = plan_chunks(buffer, job, actors=pool.size if pool is not None else 0)
    if not chunks:
        return 0
    if pool is not None:
        return sum(pool.fill_targets(chunks, job))
    filled = 0
    for attempt in range(1, RAY_DATA_ATTEMPTS + 1):
        try:
            for out in _ray_data_job([c.table for c in chunks], job, num_cpus, num_gpus).iter_batches(
                    batch_size=None, batch_format="pyarrow"):
                buffer.write_targets(out, t.fingerprint, batch_key=targets_batch_key(out))
                filled += out.num_rows
            return filled
        except ray.exceptions.RayActorError:  # the actor died (a bug in the computer raises RayTaskError)
            if attempt == RAY_DATA_ATTEMPTS:
                raise
            chunks = plan_chunks(buffer, job, actors=0)
            if not chunks:
                return filled
    return filled


def fill_targets_here(buffer, job: TargetJob, computer: TargetComputer) -> int:
    """`fill_targets` in this process, with a `TargetComputer` this process holds (the persistent learner fills
    the targets of the rows that arrived since its last fill before it reads them: `run.mode: async`)."""
    filled = 0
    for chunk in plan_chunks(buffer, job, actors=1):
        out = computer(chunk.table)
        buffer.write_targets(out, job.targets.fingerprint, batch_key=chunk.key)
        filled += out.num_rows
    return filled


def plan_chunks(buffer, job: TargetJob, *, actors: int) -> list[TargetChunk]:
    """The rows lacking `job.targets` (with the columns the computer sees), cut into the computer's batches and
    packed into chunks: for `actors` policy actors, or (0) for a Ray Data job. The batches are those the
    chunks' tasks computed before chunks existed: each sample file's rows (`missing_targets`' tables) in slices
    of the batch size; grouped targets in whole groups, cut by `group_slices` (per `GROUPED_CHUNK_ROWS` piece on
    the actors)."""
    t = job.targets
    context = tuple(dict.fromkeys((*t.rows.extra_columns, *t.group_by)))
    tables = [x for x in buffer.missing_targets(t.fingerprint, filters=t.rows.filters, columns=context)
              if x.num_rows]
    if not tables:
        return []
    size = job.batch_size
    if t.group_by:
        whole = pa.concat_tables(tables, promote_options="default")
        pieces = group_slices(whole, t.group_by, GROUPED_CHUNK_ROWS) if actors else [whole]
        batches = [b for piece in pieces for b in group_slices(piece, t.group_by, size)]
    else:
        batches = [x.slice(start, size) for x in tables for start in range(0, x.num_rows, size)]
    total = sum(b.num_rows for b in batches)
    chunk_rows = (min(GROUPED_CHUNK_ROWS, math.ceil(total / (TASKS_PER_WORKER * actors))) if actors
                  else RAY_DATA_CHUNK_ROWS)
    return [TargetChunk(targets_batch_key(c), c) for c in pack_chunks(batches, chunk_rows)]


def _ray_data_job(tables: list[pa.Table], job: TargetJob, num_cpus: float, num_gpus: float) -> "ray.data.Dataset":
    import ray.data

    # one block per chunk and one call per block: the computer splits it into its batches (`BATCH_COLUMN`)
    return ray.data.from_arrow(tables).map_batches(
        TargetComputer, fn_constructor_args=(job,), batch_size=None, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=num_cpus, num_gpus=num_gpus,
        max_restarts=0)  # no restart from arguments Ray Data keeps in the object store: `fill_targets` starts anew
