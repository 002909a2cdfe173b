"""The replay buffer's parts, one job each. The public entry point is `bcoder_ray.replay_buffer.ReplayBuffer`.

- schema: the columns, building rows (`make_row`, `prompt_rows`), validating caller rows into Arrow tables
- filters: which rows a reader wants (suite, split, outcome, iteration window, tokenizer)
- storage: files on any pyarrow filesystem: atomic whole-file writes, listing, footer checks, quarantine
- ledger: which files a compaction replaced (reader hiding, retry detection, targets relocation)
- targets: cached-target sidecar files and joining them onto rows
- sampler: ρ_real-mixed mini-batches streamed with bounded memory; `rows_from_batch` for collate
- ray_data: the same batches as a Ray Data dataset for Ray Train
- compaction: merging small files without changing what readers see
- stats: what a buffer holds (the `stats` command)
- synthetic: synthetic rows and prompts for tests and the benchmark
"""
