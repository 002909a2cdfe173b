"""A Ray Data view of the buffer for `TorchTrainer(datasets=...)`: read tasks that run the sampler.

Each read task opens the buffer's storage layer by URI (so workers on other nodes need the same path or object store) and
yields whole mini-batches of `batch_size` rows as blocks; `num_batches` batches in all, split over tasks with
distinct seeds. In the train loop, `get_dataset_shard("train").iter_batches(batch_size=B, batch_format="pyarrow")`
returns those blocks, each ρ_real-mixed (or unmixed with `rho_real=None`) with the sampler's columns
(`MixedSampler.columns`: learner columns, the fingerprint's targets, `extra_columns`); pass a batch to
`rows_from_batch` then `collate`.
"""

from __future__ import annotations

from typing import Any

import pyarrow.fs as pafs
from ray.data import Datasource, ReadTask
from ray.data.block import BlockMetadata

from bcoder_ray.buffer.catalog import Catalog
from bcoder_ray.buffer.sampler import MixedSampler
from bcoder_ray.buffer.storage import Store


class MixedBatchDatasource(Datasource):
    def __init__(self, uri: str, filesystem: pafs.FileSystem | None, batch_size: int, num_batches: int,
                 seed: int, sampler_kwargs: dict[str, Any]):
        if num_batches < 1:
            raise ValueError(f"num_batches must be >= 1, got {num_batches}")
        self.uri, self.filesystem = uri, filesystem
        self.batch_size, self.num_batches, self.seed = batch_size, num_batches, seed
        self.sampler_kwargs = dict(sampler_kwargs)

    def estimate_inmemory_data_size(self) -> int | None:
        return None

    def get_read_tasks(self, parallelism: int, per_task_row_limit: int | None = None,
                       data_context: Any = None) -> list[ReadTask]:
        n_tasks = max(1, min(parallelism, self.num_batches))
        counts = [self.num_batches // n_tasks + (k < self.num_batches % n_tasks) for k in range(n_tasks)]
        tasks = []
        for k, count in enumerate(counts):
            seed = self.seed * 1_000_003 + k  # distinct, reproducible streams per task

            def read(count: int = count, seed: int = seed):
                catalog = Catalog(Store(self.uri, self.filesystem))
                yield from MixedSampler(catalog, self.batch_size, seed=seed, num_batches=count,
                                        **self.sampler_kwargs)

            meta = BlockMetadata(num_rows=count * self.batch_size, size_bytes=None, exec_stats=None,
                                 input_files=None)
            tasks.append(ReadTask(read, meta))
        return tasks
