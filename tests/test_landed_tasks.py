"""What makes a redone rollout task cheap and exact: the buffer reads back the rows a batch wrote, also after a
compaction merged them away (`ReplayBuffer.batch_rows`); a policy actor handed a task whose rows landed counts
its reply from them and samples nothing (`PolicyWorker.rollout`); and the async loop's wait on the learner's
calls stops at the first that fails, not at the slowest (`RolloutStream.wait`). The kills themselves:
tests/test_async_faults.py."""

from __future__ import annotations

import numpy as np
import pytest

from bcoder_ray.buffer import ReplayBuffer
from bcoder_ray.buffer.synthetic import synthetic_prompts, synthetic_rows

ROWS = 12


def rows(seed: int):
    return synthetic_rows(np.random.default_rng(seed), ROWS, mean_tokens=8, max_tokens=20, n_problems=5,
                          start=100 * seed)


def filled(root, batches: int = 3) -> ReplayBuffer:
    buf = ReplayBuffer(str(root), row_group_size=4)
    buf.put_prompts(synthetic_prompts(np.random.default_rng(0), 5, mean_tokens=8, max_tokens=20))
    for b in range(batches):
        assert buf.append(rows(b), f"task-{b}") == ROWS
    return buf


def test_a_batch_reads_back_as_written_before_and_after_compaction(tmp_path):
    buf = filled(tmp_path / "buffer")
    columns = ["sample_id", "outcome", "reward"]
    written = {b: buf.batch_rows(f"task-{b}", columns) for b in range(3)}
    assert all(t.num_rows == ROWS for t in written.values())
    assert len({i for t in written.values() for i in t["sample_id"].to_pylist()}) == 3 * ROWS  # three batches
    assert buf.batch_rows("task-never", columns) is None
    reports = buf.compact(target_rows=10 * ROWS)
    assert reports and not list((tmp_path / "buffer" / "samples").glob("part-*.parquet"))  # merged away
    for b in range(3):  # each batch's own slice of the merged file, in order
        assert buf.batch_rows(f"task-{b}", columns).equals(written[b])
    assert buf.batch_rows("task-never", columns) is None


def test_a_task_whose_rows_landed_is_counted_from_them_not_sampled_again(tmp_path):
    from bcoder_ray.algorithms.base import RolloutRequest
    from bcoder_ray.loop.rollout import PolicyWorker, Task, WorkerArgs

    buf = filled(tmp_path / "buffer", batches=1)
    worker = PolicyWorker.__new__(PolicyWorker)  # the reply path alone: no model, no executor
    worker._buffer, worker.actor_name = buf, "actor-0"
    worker.args = WorkerArgs(problems={}, context=None)

    def sample(*args, **kwargs):
        raise AssertionError("a landed task was sampled again")

    worker._score = sample
    reply = worker.rollout(Task("task-0", (0, 1), iteration=0, seed=1), None, None, None)
    stored = rows(0).to_pylist()
    assert reply["landed"] and reply["written"] == reply["executed"] == 0
    assert reply["programs"] == ROWS
    assert reply["passed"] == sum(r["outcome"] == "passed" for r in stored)
    assert reply["reward_sum"] == pytest.approx(sum(r["reward"] for r in stored), rel=1e-6)  # float32 column
    with pytest.raises(AssertionError, match="sampled again"):  # a task that never landed is sampled
        worker.rollout(Task("task-1", (0, 1), iteration=0, seed=1), None, None, RolloutRequest())


def test_the_wait_on_the_learner_stops_at_the_first_failed_call(ray_local):
    import ray

    from bcoder_ray.loop.rollout_stream import CallFailed, RolloutStream

    @ray.remote(num_cpus=0)
    def hangs():
        import time

        time.sleep(600)  # as a DDP rank whose peer died, waiting in a collective

    @ray.remote(num_cpus=0)
    def fails():
        raise ValueError("rank 1 died")

    stream = RolloutStream([], iter(()), None, None, policy=lambda: None)
    slow = hangs.remote()
    with pytest.raises(CallFailed, match="rank 1 died"):
        stream.wait([slow, fails.remote()])
    ray.cancel(slow, force=True)
    assert stream.wait([ray.put(1), ray.put(2)]) == [1, 2]
