"""The replay buffer: a Parquet directory of every human and generated program (the manual is the docstring of
`bcoder_ray.buffer.replay_buffer`, the facade). Public API:

    from bcoder_ray.buffer import (ReplayBuffer, Filters, make_row, prompt_rows, rows_from_batch, exec_result,
                                   BufferError, BufferWarning, LEARNER_COLUMNS, SCHEMA_VERSION, BufferStats)

Parts, one job each; every part works on the storage layer (Store, Ledger, Catalog), none imports the facade:

- schema: the columns (schema versions), building rows (`make_row`, `prompt_rows`), validating caller rows
  into Arrow tables, reading rows of older versions as the current one (`conform`)
- filters: which rows a reader wants (suite, split, outcome, iteration window, tokenizer, policy versions, a
  staleness window, decoding, source, log-probabilities present)
- staleness: policy versions in order, the lag of the generated rows a reader reads and its distribution
- storage: files on any pyarrow filesystem: atomic, durable (exclusive when asked) whole-file writes, listing,
  reads that retry transient errors and tell them from damage, footer checks, quarantine, the compaction lock
- ledger: which files a compaction replaced (reader hiding, retry detection, targets relocation)
- catalog: the live, validated files of each area and reading them (the layer readers work on)
- targets: an algorithm's cached-target sidecar files (any per-token columns) and joining them onto rows
- priorities: the side table of each row's last |TD error| per learner stage (prioritized replay)
- draws: the sampler kinds (uniform, prioritized, fresh_prioritized, balanced): probabilities, importance weights
- sampler: ρ_real-mixed (or unmixed) mini-batches streamed with bounded memory; `rows_from_batch` for collate
- ray_data: the same batches as a Ray Data dataset for Ray Train (imports Ray; not imported here)
- compaction: merging small files without changing what readers see
- stats: what a buffer holds (the `stats` command)
- recheck: re-checking quarantined files, restoring those that read back whole (the `recheck` command)
- synthetic: synthetic rows and prompts for tests and the benchmark
- replay_buffer: the `ReplayBuffer` facade;  __main__: `python -m bcoder_ray.buffer stats|compact|recheck PATH`
"""

from bcoder_ray.buffer.compaction import CompactionReport
from bcoder_ray.buffer.draws import SAMPLER_KINDS, SamplerSpec
from bcoder_ray.buffer.filters import Filters
from bcoder_ray.buffer.replay_buffer import ReplayBuffer, exec_result, part_name
from bcoder_ray.buffer.sampler import MixedSampler, rows_from_batch
from bcoder_ray.buffer.schema import (LEARNER_COLUMNS, PROMPT_SCHEMA, SAMPLE_SCHEMA, SCHEMA_VERSION, BufferError,
                                      make_row, prompt_rows)
from bcoder_ray.buffer.stats import BufferStats
from bcoder_ray.buffer.storage import BufferWarning

__all__ = ["ReplayBuffer", "Filters", "make_row", "prompt_rows", "rows_from_batch", "exec_result", "BufferError",
           "BufferWarning", "LEARNER_COLUMNS", "SCHEMA_VERSION", "BufferStats", "MixedSampler",
           "CompactionReport", "SAMPLE_SCHEMA", "PROMPT_SCHEMA", "part_name", "SamplerSpec", "SAMPLER_KINDS"]
