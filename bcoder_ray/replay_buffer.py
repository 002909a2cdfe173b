"""The Parquet replay buffer: every human and generated program, persistent, shared by actors and learners.

Public API (helpers and the driver code against this; the implementation lives in `bcoder_ray/buffer/`):

    from bcoder_ray.replay_buffer import ReplayBuffer, Filters, make_row, prompt_rows, rows_from_batch

    buf = ReplayBuffer(uri)                       # local path, file://, s3://bucket/prefix?endpoint_override=...
    buf = ReplayBuffer("bucket/prefix", filesystem=pyarrow.fs.S3FileSystem(...))   # or an explicit filesystem
    buf.put_prompts(rows) -> int                  # rows: suite, problem_id, tokenizer_hash, prompt, prompt_ids
    buf.prompts(suite=None, tokenizer_hash=None) -> pa.Table
    buf.append(rows, batch_key: str) -> int       # train-split rows only; returns rows written (0 on a retry)
    buf.append_eval(rows, batch_key: str) -> int  # any other split: kept apart in eval/, never read by learners
    buf.lookup_results([(program_hash, tests_hash), ...]) -> {(program_hash, tests_hash): {outcome, reward, ...}}
    buf.missing_targets(fingerprint, filters=None) -> Iterator[pa.Table]   # rows lacking targets, per sample file
    buf.write_targets(table, fingerprint, batch_key) -> int
    buf.sampler(batch_size, rho_real=0.5, filters=None, seed=0, targets_fingerprint=None) -> MixedSampler
    buf.ray_dataset(batch_size, num_batches, rho_real=0.5, filters=None, seed=0, targets_fingerprint=None)
        -> ray.data.Dataset                     # blocks are whole ρ_real-mixed mini-batches of batch_size rows
    buf.compact(target_rows=..., inline_targets=None) -> CompactionReport
    buf.stats() -> BufferStats;   python -m bcoder_ray.replay_buffer stats PATH [--json]

Rows. `make_row(problem, program, program_ids, result, source=..., tokenizer_hash=..., iteration=...,
policy_version=..., actor=..., sampling=...)` builds one from a `Problem` and an `ExecResult`; `append` also
takes a list of dicts, a dict of columns or a `pyarrow.Table` with the columns of `buffer.schema.SAMPLE_SCHEMA`
(see there; `sample_id`, `program_hash`, `schema_version` are filled in when absent).

What learners get. `MixedSampler` yields `pyarrow.Table` mini-batches of exactly `batch_size` rows with the
columns `LEARNER_COLUMNS` = prompt_ids, program_ids, reward, is_human, and, when `targets_fingerprint` is given,
target_actions, a_ckpt, v_phi (rows lacking targets for that fingerprint are skipped: `missing_targets` lists
them). `rows_from_batch(batch)` turns such a batch (or a Ray Data pyarrow/numpy batch) into the list of dicts
that `bcoder_ray.batch.collate` takes (list values are numpy arrays). Per batch, round(ρ_real·B) rows are human
(source == "human") and the rest generated (Appendix H); each source is streamed in shuffled row groups through a
bounded shuffle window, so memory does not grow with the buffer; every epoch re-lists files (new appends appear).
Ray Train: `TorchTrainer(datasets={"train": buf.ray_dataset(B, steps, ...)})`, then in the loop
`train.get_dataset_shard("train").iter_batches(batch_size=B, batch_format="pyarrow")`: each block is one mixed
batch, so with batch_size=B (and no local shuffle) every batch keeps the exact ρ_real split.

Layout under the root (plain tools read `samples/`: pyarrow, pandas, DuckDB `read_parquet('ROOT/samples/*.parquet')`,
`ray.data.read_parquet('ROOT/samples')`):

    samples/<part>.parquet                  learner-facing rows, train split only, one file per writer batch
    eval/<part>.parquet                     rows of other splits (evaluation candidates), same schema
    prompts/<part>.parquet                  one row per (suite, problem_id, tokenizer_hash)
    targets/fp=<fingerprint>/<sample-file-stem>--<key>.parquet   cached targets filled in later, by sample_id
    quarantine/<area>/<name>                corrupt or truncated files moved aside on open
    _meta/compactions/<merged>.json         which files a compacted file replaced (lineage, retry ledger)

Guarantees. A writer writes whole new files: a temporary `_tmp-*.partial` name, then a rename (object stores:
one PUT, visible only when complete), never touching others' files. File names derive from the batch key, so a
retried `append` with the same key writes nothing, also after compaction (the ledger in `_meta`). `sample_id`
is a hash of (batch_key, index in batch, program_hash, suite/problem_id, source, iteration). Compaction merges
small files and writes its ledger before the merged file appears, so this module's readers never see a row twice
(plain tools may, for the instant between the merged file's rename and the sources' deletion). Run one compactor
at a time (the driver). Opening checks every new file's Parquet footer; a damaged file is moved to quarantine/
with a warning; pages carry CRC checksums, so damage inside a page is caught (and quarantined) on read.
"""

from __future__ import annotations
