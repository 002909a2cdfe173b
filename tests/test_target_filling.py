"""How `bcoder_ray.loop.target_filling` cuts a fill into batches and chunks, in-process (no Ray): the computer's
batches are each sample file's rows in slices of the batch size whatever the chunks, the actors share a fill
evenly even when one file holds most rows (the human seed), Ray Data's chunks are large, and B-Coder's targets
filled through chunks are, bit for bit, those of the per-file batches."""

from __future__ import annotations

import math

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from bcoder_ray.algorithms import make_algorithm
from bcoder_ray.algorithms.base import TargetsPlan
from bcoder_ray.buffer import ReplayBuffer
from bcoder_ray.loop.target_filling import (BATCH_COLUMN, RAY_DATA_CHUNK_ROWS, TASKS_PER_WORKER, AlgorithmRef,
                                            TargetComputer, TargetJob, chunk_batches, fill_targets,
                                            plan_chunks)
from envs.result import REWARD, Outcome
from learner_fixtures import PAD, tiny_context

torch.set_num_threads(1)
TOK_HASH = "tok"
FILES = (100, 7, 7, 13, 3)  # rows per sample file: the human seed's large one, then rollout tasks' small ones


def _rows(file: int, n: int) -> list[dict]:
    rows = []
    for i in range(n):
        ids = [2 + (i + file) % 40 for _ in range(1 + (i * 5 + file) % 9)] + [1]  # lengths differ: padding varies
        rows.append({"tests_hash": f"t{i % 3}", "suite": "toy", "split": "train", "problem_id": f"p{i % 3}",
                     "source": "human" if file == 0 else "generated", "iteration": 0, "policy_version": "0",
                     "program": f"program {file}-{i}", "program_ids": ids, "tokenizer_hash": TOK_HASH,
                     "outcome": "failed", "reward": REWARD[Outcome.FAILED]})
    return rows


def _buffer(path, files=FILES) -> ReplayBuffer:
    buf = ReplayBuffer(str(path))
    buf.put_prompts([{"suite": "toy", "problem_id": f"p{k}", "tokenizer_hash": TOK_HASH, "prompt": f"p{k}",
                      "prompt_ids": [5 + k] * (2 + 3 * k)} for k in range(3)])
    for f, n in enumerate(files):
        buf.append(_rows(f, n), f"file-{f}")
    return buf


def _ids(tables) -> list[list[str]]:
    return [t["sample_id"].to_pylist() for t in tables]


def _per_file_batches(buf: ReplayBuffer, size: int) -> list[pa.Table]:
    """The batches every fill computed before chunks: each `missing_targets` table in slices of `size`."""
    return [t.slice(s, size) for t in buf.missing_targets("fp") for s in range(0, t.num_rows, size)]


@pytest.mark.parametrize("actors", [1, 2, 3])
def test_actor_chunks_keep_the_per_file_batches_and_share_the_rows(tmp_path, actors):
    buf = _buffer(tmp_path / "buffer")
    job = TargetJob(None, TargetsPlan("fp", ("t",)), PAD, batch_size=8)
    chunks = plan_chunks(buf, job, actors=actors)
    batches = [b for c in chunks for b in chunk_batches(c.table)]
    assert _ids(batches) == _ids(_per_file_batches(buf, 8))  # the same batches, in the same order
    assert all(BATCH_COLUMN not in b.column_names for b in batches)
    total = sum(FILES)
    least = math.ceil(total / (TASKS_PER_WORKER * actors))  # each chunk but the last reaches it, by whole batches
    sizes = [c.table.num_rows for c in chunks]
    assert all(least <= s < least + 8 for s in sizes[:-1]) and 0 < sizes[-1] < least + 8
    largest = max(buf.missing_targets("fp"), key=len)["sample_file"][0].as_py()  # 100 rows: most of the fill
    assert sum(largest in c.table["sample_file"].to_pylist() for c in chunks) >= 3  # cut: every actor gets work
    assert len({c.key for c in chunks}) == len(chunks)


def test_ray_data_chunks_are_large_and_grouped_targets_keep_whole_groups(tmp_path):
    buf = _buffer(tmp_path / "buffer", files=(600, 7, 700))
    job = TargetJob(None, TargetsPlan("fp", ("t",)), PAD, batch_size=16)
    chunks = plan_chunks(buf, job, actors=0)
    sizes = [c.table.num_rows for c in chunks]  # whole batches of 16 up to the first reaching the chunk size
    assert len(sizes) == 3 and all(RAY_DATA_CHUNK_ROWS <= s < RAY_DATA_CHUNK_ROWS + 16 for s in sizes[:-1])
    assert _ids(b for c in chunks for b in chunk_batches(c.table)) == _ids(_per_file_batches(buf, 16))
    grouped = TargetJob(None, TargetsPlan("fp", ("t",), group_by=("problem_id",)), PAD, batch_size=5)
    for actors in (0, 2):
        batches = [b for c in plan_chunks(buf, grouped, actors=actors) for b in chunk_batches(c.table)]
        problems = [set(b["problem_id"].to_pylist()) for b in batches]
        assert len(problems) == 3 and all(len(p) == 1 for p in problems)  # a group (~436 rows) is never cut


def test_targets_through_chunks_are_those_of_the_per_file_batches_bit_for_bit(tmp_path):
    ctx = tiny_context(tmp_path)
    buf = _buffer(tmp_path / "buffer")
    algo = make_algorithm("bcoder", {"name": "bcoder"}, ctx)
    targets = algo.plan_iteration(0, {}, "0")[0].targets  # stage φ's: target_actions and a_ckpt
    job = TargetJob(AlgorithmRef("bcoder", algo.config, ctx), targets, PAD, batch_size=8)
    computer = TargetComputer(job)
    expected = pa.concat_tables([computer.batch(b) for b in
                                 _per_file_batches_of(buf, targets.fingerprint, 8)])

    class Pool:  # what `rollout.ActorPool.fill_targets` does on its actors, in this process
        size = 2

        def fill_targets(self, chunks, job):
            chunks = list(chunks)
            assert len(chunks) > self.size
            return [buf.write_targets(computer(c.table), job.targets.fingerprint, batch_key=c.key) for c in chunks]

    assert fill_targets(buf, job, pool=Pool()) == sum(FILES)
    assert fill_targets(buf, job, pool=Pool()) == 0  # cached: nothing twice
    sidecars = sorted((tmp_path / "buffer" / "targets" / f"fp={targets.fingerprint}").iterdir())
    stored = pa.concat_tables([pq.read_table(p) for p in sidecars])
    assert stored.num_rows == sum(FILES)
    by_id = {sid: i for i, sid in enumerate(stored["sample_id"].to_pylist())}
    order = [by_id[s] for s in expected["sample_id"].to_pylist()]
    for name in targets.columns:
        got, want = stored[name].take(order).to_pylist(), expected[name].to_pylist()
        assert all(np.array_equal(np.asarray(g), np.asarray(w)) for g, w in zip(got, want)), name  # bit for bit


def _per_file_batches_of(buf: ReplayBuffer, fingerprint: str, size: int) -> list[pa.Table]:
    return [t.slice(s, size) for t in buf.missing_targets(fingerprint) for s in range(0, t.num_rows, size)]
