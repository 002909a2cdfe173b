"""The Parquet replay buffer: every human and generated program, persistent, shared by actors and learners.

Public API (`bcoder_ray.buffer`; this module is its facade, the parts live beside it, one job per module):

    from bcoder_ray.buffer import ReplayBuffer, Filters, make_row, prompt_rows, rows_from_batch, exec_result

    buf = ReplayBuffer(uri)                       # local path, file://..., s3://bucket/prefix?endpoint_override=...
    buf = ReplayBuffer("bucket/prefix", filesystem=pyarrow.fs.S3FileSystem(...))   # or an explicit filesystem
    buf.put_prompts(rows) -> int                  # suite, problem_id, tokenizer_hash, prompt, prompt_ids
    buf.prompts(suite=None, tokenizer_hash=None) -> pa.Table
    buf.append(rows, batch_key: str) -> int       # train-split rows only; rows written (0 for a retried batch)
    buf.append_eval(rows, batch_key: str) -> int  # any split: kept apart in eval/, never read by learners
    buf.batch_rows(batch_key, columns=None) -> pa.Table | None   # what a batch wrote (None: it never landed)
    buf.lookup_results([(program_hash, tests_hash), ...]) -> {(program_hash, tests_hash): {outcome, reward,
        tests_passed, tests_total, error, timeout, exec_time}}     # exec_result(row) -> a cached ExecResult
    buf.missing_targets(fingerprint, filters=None, max_rows=4096, columns=()) -> Iterator[pa.Table]
    buf.write_targets(table, fingerprint, batch_key) -> int
    buf.sampler(batch_size, rho_real=0.5, filters=None, seed=0, targets_fingerprint=None,
                require_targets=True, num_batches=None, extra_columns=(), sampler=None) -> MixedSampler (iterable of pa.Table)
    buf.ray_dataset(batch_size, num_batches, rho_real=0.5, filters=None, seed=0, targets_fingerprint=None,
                    require_targets=True, parallelism=None, num_cpus=None, extra_columns=(),
                    sampler=None) -> ray.data.Dataset   # sampler: a draws.SamplerSpec (None: uniform)
    buf.priorities(table) -> PriorityTable        # a learner stage's |TD error| per sample_id, beside the data
    buf.compact(target_rows=65536, min_files=2, lock_timeout_s=600) -> [CompactionReport, ...]
    buf.stats() -> BufferStats;  buf.read(area, columns, filters) / buf.scan(...) for small buffers and tools
    python -m bcoder_ray.buffer stats PATH [--json];  python -m bcoder_ray.buffer compact PATH
    python -m bcoder_ray.buffer recheck PATH      # restore quarantined files that read back whole

Rows. `make_row(problem, program, program_ids, exec_result, source=..., tokenizer_hash=..., iteration=...,
policy_version=..., actor=..., sampling=..., decoding="sample", logprobs=None, truncated=False, run_id=None)`
builds one from an `envs.problem.Problem` and an `envs.result.ExecResult`. `append` takes a list of such dicts,
a dict of columns or a `pyarrow.Table` with columns of `bcoder_ray.buffer.schema.SAMPLE_SCHEMA` (the
contract); `sample_id` and `schema_version` are always computed, `program_hash` when absent, and rows are
validated (source, outcome, reward = eq. 2 of the outcome, split, decoding in ("sample", "greedy"), logprobs one
value per program token or null) with the offending row named. Columnar input is the fast path (a 4096-row
actor batch is one file).

Schema versions (`SCHEMA_VERSION` = 2). Version 2 added `decoding` ("sample" | "greedy"; null reads as
"sample"), `logprobs` (per-token log-probabilities of the distribution actually sampled, or null), `truncated`
(the program was cut at the length limit; null reads as false) and `run_id`, and dropped version 1's inline
target columns. Files of version 1 still read: the new columns come back as nulls (then those defaults), the old
inline targets are ignored (those rows lack targets until `write_targets` fills them); compaction rewrites such
rows in the current layout, keeping their `schema_version`.

What learners get. The sampler yields `pyarrow.Table` batches of exactly `batch_size` rows with the columns
`LEARNER_COLUMNS`: prompt_ids (joined from the prompts table by (suite, problem_id, tokenizer_hash)),
program_ids, reward (float32), is_human (source == "human"); then, when `targets_fingerprint` is given, that
fingerprint's target columns (rows without them are skipped unless require_targets=False, which gives nulls;
`missing_targets` lists them); then the `extra_columns` asked for (any sample column: sample_id, source,
problem_id, policy_version, outcome, truncated, logprobs, ...). With `rho_real` in [0, 1] each batch is
round(ρ_real·B) human rows then the rest generated (Appendix H); with `rho_real=None` it is B rows drawn from
all matching rows alike (on-policy readers, with `Filters(policy_versions=...)`). Each stream reads its row
groups in shuffled order through a bounded shuffle window, so memory does not grow with the buffer, and each
epoch re-lists the files (new appends appear; one epoch of draws visits every matching row once).
`rows_from_batch(batch)` turns a batch (also a Ray Data pyarrow/numpy batch) into the list of dicts
`bcoder_ray.model.batch.collate` takes, list values as numpy arrays.
Filters (`Filters` or a dict): suite(s), split(s), outcome(s), iterations=(lo, hi) inclusive (it selects
generated rows; human rows belong to no iteration and always pass), tokenizer_hash (pass the current
tokenizer's fingerprint and rows with stale token ids are left out), policy_versions (generated rows of those
versions; human rows left out), current_version with min_staleness / max_staleness (generated rows that many
versions behind it, `bcoder_ray.buffer.staleness`; human rows kept), decoding (e.g. ("sample",) leaves out greedy baselines), sources (("human",) or
("generated",)), require_logprobs. Row groups whose statistics rule them out are not read.

Ray Train. `TorchTrainer(datasets={"train": buf.ray_dataset(B, steps, ...)})`; in the loop
`train.get_dataset_shard("train").iter_batches(batch_size=B, batch_format="pyarrow")` then `rows_from_batch`.
Every block is one batch of B rows made by the sampler in a read task, so with batch_size=B (no local
shuffle) every batch keeps the exact ρ_real split on every worker. Read tasks open the buffer by URI: workers on
other nodes need the same path (NFS) or object store.

Cached targets. Declared by the algorithm that writes them, not by the schema: `missing_targets(fp)` yields
rows lacking targets for fp (sample_file, row_index, sample_id, suite, problem_id, tokenizer_hash, source,
prompt_ids, program_ids); the job computes its per-token columns (B-Coder: target_actions, a_ckpt, v_phi; any
names not taken by sample columns, each a list with one value per program token) and calls
`write_targets(table, fp, batch_key)`, which writes sidecar files keyed by sample file and row (checked against
sample_id); the columns `missing_targets` handed out may be passed back and are not stored. The first write
for a fingerprint fixes its column set and types; a write with another set is a BufferError. Readers join the
sidecars: a reader gets exactly the fingerprint it asks for, with exactly its columns.

Layout under the root (plain tools read `samples/`: pyarrow, `pandas.read_parquet(ROOT/samples)`, DuckDB
`read_parquet('ROOT/samples/*.parquet')`, `ray.data.read_parquet('ROOT/samples')`; a buffer that mixes schema
versions needs a reader that unifies schemas, e.g. DuckDB's `union_by_name=true`, or this package):

    samples/part-<hash of batch key>.parquet    learner-facing rows, train split only, one file per writer batch
    samples/compact-<hash>.parquet              files merged by compaction
    eval/...                                    rows of other splits (evaluation candidates), same schema
    prompts/part-<hash>.parquet                 one row per (suite, problem_id, tokenizer_hash)
    targets/fp=<fingerprint>/<sample-file-stem>--<key>.parquet   targets (row_index, sample_id, the fp's columns)
    priorities/<stage>/part-<time_ns>-<key>.parquet   |TD errors| by sample_id (prioritized replay; append-only)
    quarantine/<area>/<name>                    damaged files moved aside
    _meta/compactions/<area>--<merged>.json     what each compaction replaced (kept for ever)

Guarantees. A writer writes whole new files: a hidden temporary `_tmp-*.partial` name, fsynced, then renamed
and the directory fsynced (on object stores one PUT, visible only when complete), never touching others' files,
so after a crash or a power loss a name holds its whole file or is absent; `clean_tmp` (also run by `compact`)
removes leftovers of killed writers after an hour. The file name derives from the batch key, so a retried
`append` writes nothing, also after its file was compacted (the ledger in `_meta`); the name is taken
exclusively (hard link; S3: conditional PUT through boto3), so of two live attempts of one batch exactly one
reports its rows and the other 0. `sample_id` is a hash of (batch_key, index in the batch, program_hash,
suite/problem_id, source, iteration). Compaction writes its ledger record before the merged file appears and
this package's readers hide the sources as soon as it does, so they never see a row twice (plain tools may,
between the merged file's rename and the sources' deletion); compactions exclude each other by the compaction
lock (`Store.lock`: flock on local and NFS paths, a lease on S3; docs/buffer.md says what each guarantees), and
each finishes what a killed one left. A compaction record that does not parse was never complete: it is
quarantined with a warning and treated as never written. Opening validates every new file's footer and
columns, and pages carry CRC checksums. A failed read is retried and diagnosed (the bytes fetched whole and
parsed in memory): a file proven damaged is moved to quarantine/ with a `BufferWarning` and the rest stays
readable; one that only could not be read stays in place and is skipped for now, with a warning.
`python -m bcoder_ray.buffer recheck PATH` restores quarantined files that read back whole.
Costs: `lookup_results` scans the two hash columns of the whole buffer (about a second per million rows);
`stats` scans four small columns.

Parts (each works on the storage layer, `Store` / `Ledger` / `Catalog`, never on this facade): schema, filters,
storage, ledger, catalog, targets, priorities, draws, sampler, ray_data, compaction, stats, recheck, synthetic.
"""

from __future__ import annotations

import hashlib
from typing import Any, Iterable, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bcoder_ray.buffer.catalog import EVAL, PROMPTS, SAMPLES, Catalog
from bcoder_ray.buffer.compaction import CompactionReport, compact
from bcoder_ray.buffer.draws import SamplerSpec
from bcoder_ray.buffer.filters import Filters
from bcoder_ray.buffer.ledger import Ledger
from bcoder_ray.buffer.priorities import PRIORITIES_DIR, PriorityTable
from bcoder_ray.buffer.sampler import MixedSampler, PromptIndex
from bcoder_ray.buffer.schema import (PROMPT_SCHEMA, SAMPLE_SCHEMA, TRAIN_SPLIT, BufferError, prompt_keys,
                                      prompts_to_table, rows_to_table)
from bcoder_ray.buffer.stats import BufferStats, compute_stats
from bcoder_ray.buffer.storage import FileEntry, Store
from bcoder_ray.buffer.targets import (SIDECAR_ROW_GROUP, TARGETS_DIR, check_columns, check_target_lengths,
                                       fingerprint_dir, sample_stem_of, sidecar_name, sidecar_schema,
                                       stored_target_fields, target_fields_of)
from envs.result import ExecResult, Outcome

RESULT_COLUMNS = ("outcome", "reward", "tests_passed", "tests_total", "error", "timeout", "exec_time")


def part_name(batch_key: str) -> str:
    """The file a writer's batch goes to: a retried batch maps to the same name."""
    if not isinstance(batch_key, str) or not batch_key:
        raise BufferError(f"batch_key must be a non-empty string, got {batch_key!r}")
    return "part-" + hashlib.sha256(batch_key.encode("utf-8")).hexdigest()[:32] + ".parquet"


def exec_result(row: dict[str, Any]) -> ExecResult:
    """A `lookup_results` row as a cached `ExecResult` (per-test verdicts are not stored, only counts)."""
    return ExecResult(outcome=Outcome(row["outcome"]), reward=float(row["reward"]), tests=[],
                      timeout=bool(row["timeout"]), error=row["error"], wall_time=0.0, cached=True)


class ReplayBuffer:
    """A directory of Parquet files on any pyarrow filesystem (see the module docstring)."""

    def __init__(self, uri: str, filesystem: pafs.FileSystem | None = None, *, compression: str = "snappy",
                 row_group_size: int = 2048, validate: bool = True):
        self.uri = uri
        self.filesystem = filesystem
        self.store = Store(uri, filesystem, compression)
        self.ledger = Ledger(self.store)
        self.catalog = Catalog(self.store, self.ledger)
        self.row_group_size = row_group_size
        if validate:
            self.check()

    def __repr__(self) -> str:
        return f"ReplayBuffer({self.uri!r})"

    # ---- files (the storage layer: bcoder_ray.buffer.catalog) ------------------------------------------------
    def check(self) -> None:
        """Validate every file not seen yet (footer and columns); damaged ones go to quarantine/."""
        self.catalog.check()

    def files(self, area: str) -> list[FileEntry]:
        """Live, validated Parquet files of an area, sorted by name (sources of a visible merged file hidden)."""
        return self.catalog.files(area)

    def metadata(self, entry: FileEntry) -> pq.FileMetaData:
        return self.catalog.metadata(entry)

    def parquet_file(self, entry: FileEntry) -> pq.ParquetFile:
        return self.catalog.parquet_file(entry)

    def quarantine_file(self, entry: FileEntry, reason: str) -> None:
        self.catalog.quarantine_file(entry, reason)

    def scan(self, area: str = SAMPLES, columns: Sequence[str] | None = None,
             filters: Filters | dict | None = None) -> Iterator[tuple[FileEntry, pa.Table]]:
        """(file, rows) per live file of `area`, optionally projected and filtered; damaged files quarantined.
        Sample rows of any schema version come as the current schema."""
        return self.catalog.scan(area, columns, filters)

    def read(self, area: str = SAMPLES, columns: Sequence[str] | None = None,
             filters: Filters | dict | None = None) -> pa.Table:
        """A whole area as one table: for tests and small buffers (the sampler streams instead)."""
        return self.catalog.read(area, columns, filters)

    def clean_tmp(self, older_than_s: float = 3600.0) -> int:
        """Delete temporary files of killed writers older than `older_than_s` (they are never visible)."""
        dirs = [SAMPLES, EVAL, PROMPTS, "_meta/compactions"]
        dirs += [f"{TARGETS_DIR}/{d}" for d in self.store.list_dirs(TARGETS_DIR)]
        dirs += [f"{PRIORITIES_DIR}/{d}" for d in self.store.list_dirs(PRIORITIES_DIR)]
        return self.store.clean_tmp(dirs, older_than_s)

    # ---- writing --------------------------------------------------------------------------------------------
    def _write_batch(self, area: str, table: pa.Table, batch_key: str) -> int:
        name = part_name(batch_key)
        if table.num_rows == 0:
            return 0
        self.ledger.refresh()
        if self.store.exists(f"{area}/{name}") or name in self.ledger.replaced(area):
            return 0  # a retried batch: already written (perhaps since compacted)
        # Exclusive: of two live attempts of one batch (a retried task whose first attempt still runs) exactly
        # one publishes; the other reports 0 rows instead of replacing the first's file after it reported them.
        if not self.store.write_parquet(f"{area}/{name}", table, SAMPLE_SCHEMA, self.row_group_size,
                                        exclusive=True):
            return 0
        return 0 if self._superseded(area, name, table) else table.num_rows

    def _superseded(self, area: str, name: str, table: pa.Table) -> bool:
        """Whether the file just published is a late copy of a batch whose first file another attempt
        published and a compaction merged away while this one wrote (readers hide the copy): then it is
        deleted and this attempt wrote nothing. Not so when the compaction that names it is in progress, or
        merged this very file (its rows are those in the merged file)."""
        self.ledger.refresh()
        found = self.ledger.replaced(area).get(name)
        if found is None:
            return False
        live = {i.base_name for i in self.store.list(area)}
        where = self.ledger.resolve(area, found[0], live)
        if where is None:
            return False  # its compaction has not committed: it reads this file
        path, offset = self.store.path(f"{area}/{where[0]}"), found[1] + where[1]
        ids = self.store.read_parquet(path, lambda pf: pf.read(columns=["sample_id"]))["sample_id"]
        if ids.slice(offset, table.num_rows).combine_chunks().equals(table["sample_id"].combine_chunks()):
            return False
        self.store.delete(f"{area}/{name}")
        return True

    def append(self, rows: Any, batch_key: str) -> int:
        """Append train-split rows as one new file named after `batch_key`; 0 when that batch exists already."""
        table = rows_to_table(rows, batch_key, "append")
        bad = pc.fill_null(pc.not_equal(table["split"], TRAIN_SPLIT), True)
        if pc.any(bad).as_py():
            i = pc.index(bad, True).as_py()
            raise BufferError(f"append: row {i} ({table['suite'][i].as_py()}/{table['problem_id'][i].as_py()}) has split "
                              f"{table['split'][i].as_py()!r}: only train-split rows enter the learners' buffer; "
                              f"use append_eval() for evaluation candidates")
        return self._write_batch(SAMPLES, table, batch_key)

    def batch_rows(self, batch_key: str, columns: Sequence[str] | None = None,
                   area: str = SAMPLES) -> pa.Table | None:
        """The rows batch `batch_key` wrote, read back (its own file, or its slice of the file a compaction merged
        it into); None when it never landed. A rollout task redone after its actor or the driver died finds its
        rows here instead of sampling them again."""
        name = part_name(batch_key)
        self.ledger.refresh()
        entries = {e.name: e for e in self.catalog.files(area)}  # (a source a merged file holds is hidden)
        where = self.ledger.resolve(area, name, set(entries))
        if where is None:
            return None
        file, offset = where
        table = self.catalog.read_samples(entries[file], columns)
        if file == name:
            return table
        rows = next(n for c in self.ledger.records(area) for src, _, n in c.sources if src == name)
        return table.slice(offset, rows)

    def append_eval(self, rows: Any, batch_key: str) -> int:
        """Append rows of any split to eval/, which no learner-facing reader (sampler, ray_dataset) reads."""
        return self._write_batch(EVAL, rows_to_table(rows, batch_key, "append_eval"), batch_key)

    def put_prompts(self, rows: Any) -> int:
        """Store prompts once per (suite, problem_id, tokenizer_hash); identical repeats are skipped, a
        different prompt under an existing key is an error."""
        table = prompts_to_table(rows)
        if table.num_rows == 0:
            return 0
        keys = prompt_keys(table).to_pylist()
        first = {}
        for i, k in enumerate(keys):
            first.setdefault(k, i)
        table = table.take(sorted(first.values()))
        keys = prompt_keys(table)
        existing = self.prompts()
        if existing.num_rows:
            idx = pc.index_in(keys, value_set=prompt_keys(existing).combine_chunks())
            known = pc.is_valid(idx)
            if pc.any(known).as_py():
                old = existing.take(pc.filter(idx, known))
                new = table.filter(known)
                for i in range(new.num_rows):
                    if old["prompt"][i] != new["prompt"][i] or old["prompt_ids"][i] != new["prompt_ids"][i]:
                        key = tuple(new[c][i].as_py() for c in ("suite", "problem_id", "tokenizer_hash"))
                        raise BufferError(f"put_prompts: (suite, problem_id, tokenizer_hash) = {key} is stored "
                                          f"with a different prompt; a changed prompt needs a new tokenizer_hash "
                                          f"or a new buffer")
                table = table.filter(pc.invert(known))
        if table.num_rows == 0:
            return 0
        digest = hashlib.sha256("\n".join(prompt_keys(table).to_pylist()).encode()).hexdigest()[:32]
        rel = f"{PROMPTS}/part-{digest}.parquet"
        if not self.store.exists(rel):
            self.store.write_parquet(rel, table, PROMPT_SCHEMA, self.row_group_size)
        return table.num_rows

    def prompts(self, suite: str | None = None, tokenizer_hash: str | None = None) -> pa.Table:
        """The prompts table (one row per key; the first file in name order wins a duplicate)."""
        return self.catalog.prompts(suite, tokenizer_hash)

    # ---- the executor's cache -------------------------------------------------------------------------------
    def lookup_results(self, keys: Iterable[tuple[str, str]], include_eval: bool = True
                       ) -> dict[tuple[str, str], dict[str, Any]]:
        """Results already recorded for (program_hash, tests_hash) pairs (the executor's cache key), from any
        iteration or run: {key: {outcome, reward, tests_passed, tests_total, error, timeout, exec_time}}.
        Keys never executed are absent. Cost: one scan of the two hash columns (plus the hits)."""
        wanted = {(str(p), str(t)) for p, t in keys}
        if not wanted:
            return {}
        programs = pa.array(sorted({p for p, _ in wanted}), pa.string())
        found: dict[tuple[str, str], dict[str, Any]] = {}
        for area in (SAMPLES, EVAL) if include_eval else (SAMPLES,):
            for entry, t in self.scan(area, columns=["program_hash", "tests_hash"]):
                hit = pc.is_in(t["program_hash"], value_set=programs)
                if not pc.any(hit).as_py():
                    continue
                rows = np.flatnonzero(hit.to_numpy(zero_copy_only=False))
                full = self.catalog.read_samples(entry, ["program_hash", "tests_hash", *RESULT_COLUMNS])
                for row in full.take(pa.array(rows)).to_pylist():
                    key = (row.pop("program_hash"), row.pop("tests_hash"))
                    if key in wanted and key not in found:
                        found[key] = row
        return found

    # ---- cached targets --------------------------------------------------------------------------------------
    def missing_targets(self, fingerprint: str, filters: Filters | dict | None = None,
                        max_rows: int = 4096, columns: Sequence[str] = ()) -> Iterator[pa.Table]:
        """Learner rows without targets for `fingerprint`, as tables of at most `max_rows` rows with
        sample_file, row_index, sample_id, suite, problem_id, tokenizer_hash, source, prompt_ids, program_ids
        (and the sample `columns` asked for, e.g. reward: context for the computer, not to be passed back):
        compute the targets and hand them (with sample_file, row_index, sample_id) to `write_targets`."""
        fdir = fingerprint_dir(fingerprint)
        sidecars: dict[str, list[FileEntry]] = {}
        for side in self.files(fdir):
            sidecars.setdefault(sample_stem_of(side.name), []).append(side)
        filters = Filters.coerce(filters)
        expr = filters.expression()
        prompts = PromptIndex(self.catalog)
        base = ("sample_id", "suite", "problem_id", "tokenizer_hash", "source", "program_ids")
        extra = [c for c in dict.fromkeys(columns) if c not in base and c != "prompt_ids"]
        columns = sorted({*base, *extra, *filters.columns()})
        for entry in self.files(SAMPLES):
            t = self.catalog.read_samples(entry, columns)
            covered = np.zeros(t.num_rows, bool)
            for side in sidecars.get(entry.stem, ()):
                covered[self.parquet_file(side).read(columns=["row_index"])["row_index"].to_numpy()] = True
            t = t.append_column("row_index", pa.array(np.arange(t.num_rows, dtype=np.int64)))
            t = t.filter(pa.array(~covered))
            if expr is not None:
                t = t.filter(expr)
            if t.num_rows == 0:
                continue
            prompt_ids = prompts.prompt_ids.take(prompts.indices(t, entry.name))
            out = pa.table({"sample_file": pa.array([entry.name] * t.num_rows), "row_index": t["row_index"],
                            "sample_id": t["sample_id"], "suite": t["suite"], "problem_id": t["problem_id"],
                            "tokenizer_hash": t["tokenizer_hash"], "source": t["source"],
                            "prompt_ids": prompt_ids, "program_ids": t["program_ids"],
                            **{c: t[c] for c in extra}})
            for start in range(0, out.num_rows, max_rows):
                yield out.slice(start, max_rows)

    def _locate(self, sample_ids: pa.Array) -> tuple[pa.Array, pa.Array]:
        """(sample_file, row_index) of each id, by scanning the sample_id column (when a caller lacks them)."""
        files = np.full(len(sample_ids), None, object)
        rows = np.full(len(sample_ids), -1, np.int64)
        for entry, t in self.scan(SAMPLES, columns=["sample_id"]):
            pos = pc.index_in(sample_ids, value_set=t["sample_id"].combine_chunks()).to_numpy(zero_copy_only=False)
            hit = ~np.isnan(pos.astype(float))
            files[hit], rows[hit] = entry.name, pos[hit].astype(np.int64)
        if (rows < 0).any():
            i = int(np.flatnonzero(rows < 0)[0])
            raise BufferError(f"write_targets: sample_id {sample_ids[i].as_py()} is not in the buffer")
        return pa.array(files.tolist(), pa.string()), pa.array(rows)

    def write_targets(self, table: Any, fingerprint: str, batch_key: str) -> int:
        """Store targets computed for `fingerprint`: a table (or list of dicts, or dict of columns) with
        sample_id, the target columns and, as `missing_targets` gives them, sample_file and row_index (else
        located by sample_id). Target columns: every column but those `missing_targets` hands out, each a list
        with one value per program token, typed as in the table; every write for a fingerprint has the same
        set (else BufferError naming both). One sidecar per sample file, named after `batch_key`: a retry
        writes nothing."""
        fdir = fingerprint_dir(fingerprint)
        where = f"write_targets fp={fingerprint}"
        if not isinstance(table, pa.Table):
            table = pa.Table.from_pylist(list(table)) if not isinstance(table, dict) else pa.table(table)
        if "sample_id" not in table.column_names:
            raise BufferError(f"{where}: missing column 'sample_id'")
        fields = target_fields_of(table.schema)
        stored = stored_target_fields(self.store, fingerprint)
        check_columns(fields, stored, where)
        if stored is not None:  # the first write fixed the types
            fields = stored
        if "sample_file" not in table.column_names or "row_index" not in table.column_names:
            files, rows = self._locate(table["sample_id"].combine_chunks())
            table = table.append_column("sample_file", files).append_column("row_index", rows)
        schema = sidecar_schema(fields)
        try:
            table = table.select(["sample_file", *schema.names]).cast(
                pa.schema([pa.field("sample_file", pa.string()), *schema]))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError, pa.ArrowTypeError) as e:
            raise BufferError(f"{where}: columns do not fit the fingerprint's types {schema}: {e}") from e
        live = {e.name: e for e in self.files(SAMPLES)}
        names = [f.name for f in fields]
        written = 0
        for name in pc.unique(table["sample_file"]).to_pylist():
            part = table.filter(pc.equal(table["sample_file"], name))
            found = self.ledger.resolve(SAMPLES, name, set(live))
            if found is None:
                raise BufferError(f"write_targets: sample file {name!r} is not in the buffer {self.uri}")
            entry, offset = live[found[0]], found[1]
            rel = f"{fdir}/{sidecar_name(entry.stem, batch_key, name)}"
            if self.store.exists(rel):
                continue
            rows = pc.add(part["row_index"], offset)
            if pc.any(pc.greater_equal(rows, entry.num_rows)).as_py() or pc.any(pc.less(rows, 0)).as_py():
                raise BufferError(f"write_targets: row_index out of range for {name} ({entry.num_rows} rows)")
            sample = self.catalog.read_samples(entry, ["sample_id", "program_ids"]).take(rows)
            bad = pc.not_equal(sample["sample_id"], part["sample_id"])
            if pc.any(bad).as_py():
                i = pc.index(bad, True).as_py()
                raise BufferError(f"write_targets: {name} row {part['row_index'][i].as_py()} holds sample_id "
                                  f"{sample['sample_id'][i].as_py()}, not {part['sample_id'][i].as_py()}")
            check_target_lengths(part, sample["program_ids"], names, where)
            side = part.drop_columns(["sample_file"]).set_column(0, "row_index", rows)
            side = side.take(pc.sort_indices(side["row_index"]))
            self.store.write_parquet(rel, side, schema, SIDECAR_ROW_GROUP)
            written += side.num_rows
        return written

    # ---- priorities (prioritized replay) -----------------------------------------------------------------------
    def priorities(self, table: str) -> PriorityTable:
        """A learner stage's priority side table (`bcoder_ray.buffer.priorities`): `write(sample_ids, values,
        writer_key)`, `read()`, `lookup(sample_ids)`."""
        return PriorityTable(self.store, table)

    # ---- reading for learners -------------------------------------------------------------------------------
    def sampler(self, batch_size: int, rho_real: float | None = 0.5, filters: Filters | dict | None = None,
                seed: int = 0, targets_fingerprint: str | None = None, require_targets: bool = True,
                num_batches: int | None = None, extra_columns: Sequence[str] = (),
                window_rows: int = 8192, sampler: SamplerSpec | None = None) -> MixedSampler:
        """Endless (or `num_batches`) mini-batches as pyarrow Tables, ρ_real-mixed (`rho_real=None`: drawn
        from all matching rows, no split); `sampler`: how the generated rows are drawn (None: uniformly); see
        MixedSampler."""
        return MixedSampler(self.catalog, batch_size, rho_real, filters, seed, targets_fingerprint,
                            require_targets, num_batches, extra_columns, window_rows, sampler)

    def ray_dataset(self, batch_size: int, num_batches: int, rho_real: float | None = 0.5,
                    filters: Filters | dict | None = None, seed: int = 0,
                    targets_fingerprint: str | None = None, require_targets: bool = True,
                    parallelism: int | None = None, num_cpus: float | None = None,
                    extra_columns: Sequence[str] = (), sampler: SamplerSpec | None = None):
        """A `ray.data.Dataset` of `num_batches` blocks of `batch_size` rows (the sampler's batches, with its
        columns), produced by `parallelism` (default 4) read tasks with distinct seeds
        (bcoder_ray.buffer.ray_data). Iterate it with `iter_batches(batch_size=batch_size)` and no local
        shuffle to keep each batch's exact ρ_real split."""
        import ray.data

        from bcoder_ray.buffer.ray_data import MixedBatchDatasource

        source = MixedBatchDatasource(self.uri, self.filesystem, batch_size, num_batches, seed, {
            "rho_real": rho_real, "filters": Filters.coerce(filters), "targets_fingerprint": targets_fingerprint,
            "require_targets": require_targets, "extra_columns": tuple(extra_columns), "sampler": sampler})
        # As many read tasks as blocks requested, so Ray never splits a block (a mixed batch) in pieces.
        tasks = min(parallelism or 4, num_batches)
        # num_cpus: the CPU share of each read task (Ray's default is 1; less lets the reads fit beside
        # fractional train workers and actors on a small machine)
        return ray.data.read_datasource(source, override_num_blocks=tasks, num_cpus=num_cpus)

    # ---- maintenance ----------------------------------------------------------------------------------------
    def compact(self, target_rows: int = 65536, min_files: int = 2, clean_tmp_older_than_s: float = 3600.0,
                lock_timeout_s: float = 600.0) -> list[CompactionReport]:
        """Merge small files of samples/ and eval/ (see bcoder_ray.buffer.compaction) under the buffer's
        compaction lock (waiting up to `lock_timeout_s` for another compactor, then BufferError)."""
        self.clean_tmp(clean_tmp_older_than_s)
        return [compact(self.catalog, area, target_rows, min_files, self.row_group_size, lock_timeout_s)
                for area in (SAMPLES, EVAL)]

    def stats(self) -> BufferStats:
        return compute_stats(self.catalog)
