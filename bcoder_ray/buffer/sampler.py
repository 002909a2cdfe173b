"""Mini-batches of buffer rows, streamed with bounded memory: mixing human and generated programs at ρ_real
(Appendix H), or drawn from all matching rows without a split (`rho_real=None`, for on-policy readers).

Each stream (human, generated, or all rows) is endless: every epoch lists the live sample files again (so new
appends and compactions are picked up), keeps the row groups whose statistics may match the filters, shuffles
them, and reads them one at a time into a window of about `window_rows` rows that is permuted and emitted. Memory
is one window per stream plus one batch, whatever the size of the buffer. A mixed batch is round(ρ_real·B) human
rows followed by B - round(ρ_real·B) generated rows; an unmixed one is B rows of the one stream.

A `SamplerSpec` other than uniform (`bcoder_ray.buffer.draws`: prioritized by |TD error|, freshness-decayed, or
balanced per problem) draws the generated stream's rows by its rule instead (`WeightedStream`, with replacement,
an index of the stream's rows in memory) and adds a `weight` column of importance weights to every batch.

Works on the storage layer (`catalog.Catalog`), not on the `ReplayBuffer` facade.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bcoder_ray.buffer.catalog import SAMPLES, Catalog
from bcoder_ray.buffer.draws import RowIndex, SamplerSpec, draw_distribution
from bcoder_ray.buffer.filters import Filters
from bcoder_ray.buffer.priorities import PriorityTable
from bcoder_ray.buffer.schema import LEARNER_COLUMNS, PROMPT_KEY, SAMPLE_SCHEMA, BufferError, prompt_keys
from bcoder_ray.buffer.staleness import lag_array
from bcoder_ray.buffer.storage import FileEntry
from bcoder_ray.buffer.targets import TargetsJoin, stored_target_fields


# What a weighted stream's index reads of each row (the draw rules' inputs), carried as private `_<name>` columns.
INDEX_COLUMNS = ("sample_id", "suite", "problem_id", "policy_version", "outcome")
PRIVATE_COLUMNS = ("_row", *(f"_{c}" for c in INDEX_COLUMNS))
WEIGHT_COLUMN = "weight"


class PromptIndex:
    """The prompts table in memory (one row per problem and tokenizer, small) and the join onto rows."""

    def __init__(self, catalog: Catalog):
        self.catalog = catalog
        self._load()

    def _load(self) -> None:
        table = self.catalog.prompts()
        self.keys = prompt_keys(table).combine_chunks() if table.num_rows else pa.array([], pa.string())
        self.prompt_ids = table["prompt_ids"].combine_chunks()

    def indices(self, rows: pa.Table, where: str) -> pa.Array:
        """Row -> prompt row; reloads once for prompts written since, then names the first missing key."""
        keys = prompt_keys(rows)
        idx = pc.index_in(keys, value_set=self.keys)
        if idx.null_count:
            self._load()
            idx = pc.index_in(keys, value_set=self.keys)
        if idx.null_count:
            i = pc.index(pc.is_null(idx), True).as_py()
            key = tuple(rows[c][i].as_py() for c in PROMPT_KEY)
            raise BufferError(f"{where}: no prompt for (suite, problem_id, tokenizer_hash) = {key}; "
                              f"put_prompts() it before sampling")
        return idx.cast(pa.int32())


@dataclass(frozen=True)
class Unit:
    file: FileEntry
    row_group: int
    row_start: int  # index of the row group's first row in the file


class SourceStream:
    """Endless shuffled rows of one source (None: all sources), prepared for the learner (see module docstring).

    The shuffle window is a set of open row groups, each permuted once when opened (the one copy of a row);
    a draw of n rows is spread uniformly at random over the open groups and takes zero-copy slices of them, so
    the groups drain at the same pace. Unread rows stay about `window_rows`; as a slice keeps its whole group
    alive, memory is about twice that (groups are half-read on average) plus one group being read. Each
    emitted row is copied once (when its group is permuted).
    """

    def __init__(self, catalog: Catalog, source: str | None, filters: Filters, rng: np.random.Generator,
                 prompts: PromptIndex, targets_fingerprint: str | None, target_fields: Sequence[pa.Field],
                 require_targets: bool, extra_columns: Sequence[str], window_rows: int):
        self.catalog, self.source, self.filters, self.rng = catalog, source, filters, rng
        self.prompts, self.fp, self.require_targets = prompts, targets_fingerprint, require_targets
        self.target_fields = list(target_fields)
        self.extra_columns = tuple(extra_columns)
        self.window_rows = window_rows
        read = {"source", "program_ids", "reward", *PROMPT_KEY, *self.extra_columns, *filters.columns()}
        if self.fp is not None:
            read.add("sample_id")
        self.read_columns = sorted(read)
        self._open: list[list] = []  # [permuted table, next position]
        self._open_rows = 0
        self._epoch: Iterator[Unit] = iter(())
        self._epoch_rows = 0
        self._epoch_started = False
        self._join: TargetsJoin | None = None

    def _matching_units(self) -> Iterator[Unit]:
        """The row groups of the buffer's sample files whose statistics may match the filters, in file order."""
        for entry in self.catalog.files(SAMPLES):
            meta = self.catalog.metadata(entry)
            start = 0
            for g in range(meta.num_row_groups):
                rg = meta.row_group(g)
                if self.filters.row_group_may_match(_stats(rg), self.source):
                    yield Unit(entry, g, start)
                start += rg.num_rows

    def _new_epoch(self) -> None:
        if self._epoch_started and self._epoch_rows == 0:
            raise BufferError(f"replay buffer {self.catalog.uri}: no {self.source or 'buffer'} rows match "
                              f"{self.filters}"
                              + (f" with targets fp={self.fp}" if self.fp and self.require_targets else ""))
        units = list(self._matching_units())
        order = self.rng.permutation(len(units))
        self._epoch = iter([units[i] for i in order])
        self._epoch_rows = 0
        self._epoch_started = True
        self._join = (TargetsJoin.open(self.catalog.store, self.fp, self.target_fields)
                      if self.fp is not None else None)

    def _read_unit(self, unit: Unit, index_columns: bool = False) -> pa.Table | None:
        # None: compacted away since the epoch began (its rows are in the merged file next epoch), damaged
        # (quarantined) or unreadable for now (read again next epoch)
        t = self.catalog.guarded(unit.file, f"reading row group {unit.row_group}",
                                 lambda: self.catalog.read_samples(unit.file, self.read_columns, unit.row_group))
        if t is None:
            return None
        if index_columns:  # where each row sits in its group, to find it again after filtering
            t = t.append_column("_row", pa.array(np.arange(t.num_rows, dtype=np.int64)))
        keep = pc.equal(t["source"], self.source) if self.source is not None else pa.array(np.ones(t.num_rows, bool))
        if self._join is not None:
            t, has_targets = self._join.attach(t, unit.file.stem, unit.row_start)
            if self.require_targets:
                keep = pc.and_(keep, has_targets)
        user = self.filters.mask(t)
        if user is not None:
            keep = pc.and_(keep, user)
        if not pc.all(keep).as_py():
            t = t.filter(keep)
        if t.num_rows == 0:
            return None
        cols = {
            "_prompt": self.prompts.indices(t, f"{unit.file.name} row group {unit.row_group}"),
            "program_ids": t["program_ids"],
            "reward": t["reward"].cast(pa.float32()),
            "is_human": pc.equal(t["source"], "human"),
        }
        for f in self.target_fields:
            cols[f.name] = t[f.name]
        for c in self.extra_columns:
            cols.setdefault(c, t[c])
        if index_columns:
            cols["_row"] = t["_row"]
            for c in INDEX_COLUMNS:
                cols[f"_{c}"] = t[c]
        return pa.table(cols).combine_chunks()

    def _fill(self) -> None:
        """Open row groups until the window holds `window_rows` rows (or the epoch ends with some open)."""
        while self._open_rows < self.window_rows:
            unit = next(self._epoch, None)
            if unit is None:
                if self._open_rows:
                    return
                self._new_epoch()
                continue
            t = self._read_unit(unit)
            if t is not None:
                self._open.append([t.take(pa.array(self.rng.permutation(t.num_rows))), 0])
                self._open_rows += t.num_rows
                self._epoch_rows += t.num_rows

    def take(self, n: int) -> list[pa.Table]:
        parts: list[pa.Table] = []
        need = n
        while need:
            self._fill()
            left = np.array([t.num_rows - pos for t, pos in self._open], np.int64)
            counts = _split_evenly(self.rng, min(need, int(left.sum())), left)
            for slot, c in zip(self._open, counts):
                if c:
                    t, pos = slot
                    parts.append(t.slice(pos, c))  # zero-copy: the group was permuted when opened
                    slot[1] = pos + c
            self._open = [s for s in self._open if s[1] < s[0].num_rows]
            self._open_rows -= int(counts.sum())
            need -= int(counts.sum())
        return parts


class WeightedStream(SourceStream):
    """Rows of one source drawn by a `SamplerSpec` (prioritized, fresh_prioritized, balanced:
    `bcoder_ray.buffer.draws`), each with its importance weight in a `weight` column.

    It keeps an index of the stream's rows (where each sits and what the draw rules read: sample_id, problem,
    policy version, outcome, some tens of bytes a row), built by reading the stream's row groups once, and built again
    every `spec.refresh_batches` batches (new rows, new priorities; reading the files costs what one epoch of the
    uniform stream costs). Draws are with replacement, as in prioritized replay. A drawn row is read from its row
    group; the groups are cached, about `window_rows` rows of them, least recently used out."""

    def __init__(self, *args, spec: SamplerSpec, priorities: PriorityTable | None, **kwargs):
        super().__init__(*args, **kwargs)
        self.spec, self.priorities = spec, priorities
        self.read_columns = sorted({*self.read_columns, *INDEX_COLUMNS})
        self._units: list[Unit] = []
        self._cache: OrderedDict[int, pa.Table] = OrderedDict()
        self._cached_rows = 0
        self._batches = 0
        self._p: np.ndarray | None = None

    def _refresh(self) -> None:
        self._join = (TargetsJoin.open(self.catalog.store, self.fp, self.target_fields)
                      if self.fp is not None else None)
        self._units, self._cache, self._cached_rows = [], OrderedDict(), 0
        parts, unit_of = [], []
        for unit in self._matching_units():
            t = self._read_unit(unit, index_columns=True)
            if t is not None:
                self._remember(len(self._units), t)
                parts.append(t.select(list(PRIVATE_COLUMNS)))
                unit_of.append(np.full(t.num_rows, len(self._units), np.int64))
                self._units.append(unit)
        if not parts:
            raise BufferError(f"replay buffer {self.catalog.uri}: no {self.source or 'buffer'} rows match "
                              f"{self.filters}"
                              + (f" with targets fp={self.fp}" if self.fp and self.require_targets else ""))
        index = pa.concat_tables(parts)
        self._unit_of = np.concatenate(unit_of)
        self._row = index["_row"].to_numpy()
        problem = pc.binary_join_element_wise(index["_suite"], index["_problem_id"], "\x1f")
        priority = (self.priorities.lookup(index["_sample_id"]) if self.priorities is not None
                    else np.full(index.num_rows, np.nan))
        self._p, self._w = draw_distribution(self.spec, RowIndex(
            priority=priority, lag=(lag_array(index["_policy_version"], self.spec.current_version)
                                    if self.spec.current_version else np.full(index.num_rows, np.nan)),
            passed=pc.equal(index["_outcome"], "passed").to_numpy(zero_copy_only=False),
            problem=pc.dictionary_encode(problem).combine_chunks().indices.to_numpy()))
        self._batches = 0

    def _remember(self, u: int, table: pa.Table) -> None:
        self._cache[u] = table
        self._cached_rows += table.num_rows
        while self._cached_rows > self.window_rows and len(self._cache) > 1:
            _, old = self._cache.popitem(last=False)
            self._cached_rows -= old.num_rows

    def _unit_table(self, u: int) -> pa.Table | None:
        if u in self._cache:
            self._cache.move_to_end(u)
            return self._cache[u]
        t = self._read_unit(self._units[u], index_columns=True)
        if t is not None:
            self._remember(u, t)
        return t

    def take(self, n: int) -> list[pa.Table]:
        if self._p is None or (self.spec.refresh_batches and self._batches >= self.spec.refresh_batches):
            self._refresh()
        self._batches += 1
        parts: list[pa.Table] = []
        for attempt in range(3):
            picks = self.rng.choice(len(self._p), size=n, p=self._p)
            missed = 0
            for u in np.unique(self._unit_of[picks]):
                sel = picks[self._unit_of[picks] == u]
                t = self._unit_table(int(u))
                rows = t["_row"].to_numpy() if t is not None else np.zeros(0, np.int64)
                pos = np.minimum(np.searchsorted(rows, self._row[sel]), max(len(rows) - 1, 0))
                found = (rows[pos] == self._row[sel]) if len(rows) else np.zeros(len(sel), bool)
                missed += int((~found).sum())  # compacted away or filtered out since the index was built
                if found.any():
                    part = t.take(pa.array(pos[found])).drop_columns(list(PRIVATE_COLUMNS))
                    parts.append(part.append_column(WEIGHT_COLUMN, pa.array(self._w[sel[found]])))
            if not missed:
                return parts
            n = missed
            self._refresh()
        raise BufferError(f"replay buffer {self.catalog.uri}: {n} drawn rows vanished three times in a row "
                          f"(compactions while sampling?)")


def _split_evenly(rng: np.random.Generator, k: int, left: np.ndarray) -> np.ndarray:
    """k draws spread uniformly at random over the open groups (each at most its unread rows): groups drain
    at the same pace, so the window holds about window_rows rows and no group lingers half-read."""
    counts = np.zeros(len(left), np.int64)
    while k:
        room = left - counts
        open_ = np.flatnonzero(room > 0)
        add = np.minimum(rng.multinomial(k, np.full(len(open_), 1 / len(open_))), room[open_])
        counts[open_] += add
        k -= int(add.sum())
    return counts


def _stats(rg) -> dict[str, tuple]:
    out = {}
    for i in range(rg.num_columns):
        col = rg.column(i)
        st = col.statistics
        if st is not None and st.has_min_max and "." not in col.path_in_schema:
            out[col.path_in_schema] = (st.min, st.max)
    return out


class MixedSampler:
    """Iterator of `pyarrow.Table` mini-batches (see module docstring); `num_batches=None` is endless.

    Columns: `LEARNER_COLUMNS`, then the target columns of `targets_fingerprint` (as stored when the sampler
    starts; a sampler started before any were written yields none), then `extra_columns` (sample columns, e.g.
    sample_id, source, problem_id, policy_version, outcome, truncated, logprobs). `rho_real=None`: no
    human/generated split, every matching row equally likely.

    `sampler`: how the generated rows (with `rho_real=None`: all rows) are drawn; None or kind "uniform": the
    shuffled window above, and the batches have no `weight` column. Any other kind (`bcoder_ray.buffer.draws`)
    draws them by its rule (`WeightedStream`) and every batch ends with a float32 `weight` column: their
    importance weights, and 1 for the human rows, which are always read uniformly (the ρ_real share of
    ground-truth programs the cross-entropy terms read stays an unbiased sample of them)."""

    def __init__(self, catalog: Catalog, batch_size: int, rho_real: float | None = 0.5,
                 filters: Filters | dict | None = None, seed: int = 0, targets_fingerprint: str | None = None,
                 require_targets: bool = True, num_batches: int | None = None,
                 extra_columns: Sequence[str] = (), window_rows: int = 8192, sampler: SamplerSpec | None = None):
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if rho_real is not None and not 0.0 <= rho_real <= 1.0:
            raise ValueError(f"rho_real must be in [0, 1] or None, got {rho_real}")
        unknown = [c for c in extra_columns if c not in SAMPLE_SCHEMA.names and c not in LEARNER_COLUMNS]
        if unknown:
            raise ValueError(f"extra_columns {unknown} are not sample columns; the schema has "
                             f"{list(SAMPLE_SCHEMA.names)}")
        self.batch_size = batch_size
        self.num_batches = num_batches
        self.fp = targets_fingerprint
        self.extra_columns = tuple(c for c in dict.fromkeys(extra_columns) if c not in LEARNER_COLUMNS)
        fields = (stored_target_fields(catalog.store, targets_fingerprint) or []) if targets_fingerprint else []
        self.target_columns = tuple(f.name for f in fields)
        filters = Filters.coerce(filters)
        prompts = PromptIndex(catalog)
        self.weighted = sampler is not None and sampler.kind != "uniform"

        def stream(source: str | None, k: int, drawn: bool = False) -> SourceStream:
            args = (catalog, source, filters, np.random.default_rng([seed, k]), prompts, targets_fingerprint,
                    fields, require_targets, self.extra_columns, window_rows)
            if not (drawn and self.weighted):
                return SourceStream(*args)
            table = PriorityTable(catalog.store, sampler.table) if sampler.prioritized else None
            return WeightedStream(*args, spec=sampler, priorities=table)

        if rho_real is None:
            self.n_human, self.n_generated = 0, batch_size
            self.human, self.generated = None, stream(None, 2, drawn=True)
        else:
            self.n_human = int(round(rho_real * batch_size))  # Appendix H: ρ_real·B ground-truth programs
            self.n_generated = batch_size - self.n_human
            self.human = stream("human", 0) if self.n_human else None
            self.generated = stream("generated", 1, drawn=True) if self.n_generated else None
        self.prompts = prompts

    def columns(self) -> list[str]:
        return [*LEARNER_COLUMNS, *self.target_columns, *self.extra_columns,
                *([WEIGHT_COLUMN] if self.weighted else [])]

    def next_batch(self) -> pa.Table:
        parts = []
        if self.human is not None:
            parts += self.human.take(self.n_human)
            if self.weighted:  # human rows are read uniformly: weight 1
                parts = [p.append_column(WEIGHT_COLUMN, pa.array(np.ones(p.num_rows, np.float32))) for p in parts]
        if self.generated is not None:
            parts += self.generated.take(self.n_generated)
        rows = pa.concat_tables(parts)  # chunked: one chunk per row group drawn from, no copy
        out = {"prompt_ids": self.prompts.prompt_ids.take(rows["_prompt"])}
        for c in self.columns()[1:]:
            out[c] = rows[c]
        return pa.table(out)

    def __iter__(self) -> Iterator[pa.Table]:
        produced = 0
        while self.num_batches is None or produced < self.num_batches:
            yield self.next_batch()
            produced += 1


def rows_from_batch(batch) -> list[dict]:
    """A sampler / Ray Data batch (pyarrow Table, or dict of numpy columns) as the list of dicts that
    `bcoder_ray.model.batch.collate` takes; list columns become numpy arrays (zero-copy views of the batch)."""
    if isinstance(batch, dict):
        names = list(batch)
        cols = [_numpy_column(batch[c]) for c in names]
    else:
        names = batch.column_names
        cols = [_numpy_column(batch[c]) for c in names]
    n = len(cols[0]) if cols else 0
    return [{name: col[i] for name, col in zip(names, cols)} for i in range(n)]


def _numpy_column(col) -> Sequence:
    if isinstance(col, np.ndarray):
        return col if col.dtype != object else list(col)
    if isinstance(col, pa.ChunkedArray):
        if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
            return [x for chunk in col.chunks for x in _numpy_column(chunk)]
        return col.to_numpy()
    if pa.types.is_list(col.type) or pa.types.is_large_list(col.type):
        if col.null_count:
            return [None if v is None else np.asarray(v) for v in col.to_pylist()]
        values = col.values.to_numpy(zero_copy_only=False)
        offsets = col.offsets.to_numpy()
        return [values[offsets[i]:offsets[i + 1]] for i in range(len(col))]
    return col.to_numpy(zero_copy_only=False)
