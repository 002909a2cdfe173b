"""The buffer through Ray Data: plain read_parquet, and the ρ_real-mixed dataset handed to Ray Train."""

from __future__ import annotations

import os
import threading
from pathlib import Path

import numpy as np
import pytest

from bcoder_ray.buffer.synthetic import synthetic_prompts, synthetic_rows
from bcoder_ray.buffer import ReplayBuffer, rows_from_batch

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow  # Ray start-up and its first tasks take tens of seconds on the shared CPUs


@pytest.fixture(scope="module")
def ray_session():
    os.environ["RAY_AUTH_MODE"] = "disabled"
    import ray

    ray.init(num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "disabled"}})
    ray.data.DataContext.get_current().enable_progress_bars = False
    yield ray
    ray.shutdown()


@pytest.fixture(scope="module")
def buffer(tmp_path_factory):
    rng = np.random.default_rng(0)
    buf = ReplayBuffer(str(tmp_path_factory.mktemp("ray") / "buf"), row_group_size=64)
    buf.put_prompts(synthetic_prompts(rng, 10, mean_tokens=8, max_tokens=20))
    buf.append(synthetic_rows(rng, 50, source="human", mean_tokens=10, max_tokens=30, n_problems=10), "human")
    for k in range(3):
        buf.append(synthetic_rows(rng, 100, iteration=k, mean_tokens=10, max_tokens=30, n_problems=10), f"g{k}")
    return buf


def test_ray_data_reads_the_buffer(ray_session, buffer):
    ds = ray_session.data.read_parquet(os.path.join(buffer.store.root, "samples"))
    assert ds.count() == 350
    assert sorted(ds.unique("source")) == ["generated", "human"]


def test_mixed_dataset_keeps_rho_real_per_batch_and_per_shard(ray_session, buffer):
    ds = buffer.ray_dataset(batch_size=12, num_batches=10, rho_real=0.25, seed=1, parallelism=2)
    batches = list(ds.iter_batches(batch_size=12, batch_format="pyarrow"))
    assert len(batches) == 10
    for b in batches:
        assert b.num_rows == 12 and sum(b["is_human"].to_pylist()) == 3
        assert b.column_names == ["prompt_ids", "program_ids", "reward", "is_human"]

    # extra columns and unmixed sampling (on-policy readers) go through the read tasks too
    ds = buffer.ray_dataset(batch_size=10, num_batches=4, rho_real=None, seed=3, parallelism=2,
                            filters={"policy_versions": ["v2"]}, extra_columns=["sample_id", "policy_version"])
    for b in ds.iter_batches(batch_size=10, batch_format="pyarrow"):
        assert b.column_names == ["prompt_ids", "program_ids", "reward", "is_human", "sample_id", "policy_version"]
        assert set(b["policy_version"].to_pylist()) == {"v2"} and not any(b["is_human"].to_pylist())

    # as Ray Train hands it out: one shard per worker (streaming_split), consumed concurrently
    shards = buffer.ray_dataset(batch_size=8, num_batches=12, rho_real=0.5, seed=2).streaming_split(2)
    seen: list[list] = [[], []]

    def consume(i: int) -> None:
        for b in shards[i].iter_batches(batch_size=8, batch_format="numpy"):
            seen[i].append(rows_from_batch(b))

    threads = [threading.Thread(target=consume, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    all_batches = seen[0] + seen[1]
    assert len(all_batches) == 12 and seen[0] and seen[1]
    for rows in all_batches:
        assert len(rows) == 8 and sum(bool(r["is_human"]) for r in rows) == 4
        assert set(rows[0]) == {"prompt_ids", "program_ids", "reward", "is_human"}
        assert isinstance(rows[0]["program_ids"], np.ndarray) and rows[0]["program_ids"].dtype == np.int32
