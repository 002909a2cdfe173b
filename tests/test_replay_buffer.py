"""The Parquet replay buffer on local disk: contents, ρ_real sampling, targets, compaction, damage, plain tools."""

from __future__ import annotations

import os
import subprocess
import sys
import warnings
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from bcoder_ray.buffer.synthetic import synthetic_prompts, synthetic_rows
from bcoder_ray.replay_buffer import (LEARNER_COLUMNS, BufferError, BufferWarning, ReplayBuffer, exec_result,
                                      make_row, rows_from_batch)
from envs.problem import Problem, TestSpec, program_hash
from envs.result import ExecResult, Outcome, TestResult

REPO = Path(__file__).resolve().parents[1]
TOK = "synthetic-tok"
TARGETS = ("target_actions", "a_ckpt", "v_phi", "targets_fingerprint")


def small_rows(rng, n, **kw):
    kw.setdefault("mean_tokens", 12)
    kw.setdefault("max_tokens", 40)
    kw.setdefault("n_problems", 20)
    return synthetic_rows(rng, n, **kw)


@pytest.fixture
def buffer(tmp_path):
    """Prompts for suites a and b; human rows of both suites; generated rows over iterations 0..3."""
    rng = np.random.default_rng(0)
    buf = ReplayBuffer(str(tmp_path / "buf"), row_group_size=64)
    for suite in ("a", "b"):
        buf.put_prompts(synthetic_prompts(rng, 20, suite=suite, mean_tokens=8, max_tokens=30))
        buf.append(small_rows(rng, 60, suite=suite, source="human"), f"human/{suite}")
    for it in range(4):
        for suite in ("a", "b"):
            buf.append(small_rows(rng, 150, suite=suite, iteration=it, start=1000 * it), f"gen/{suite}/{it}")
    return buf


def test_read_back_equals_written_and_ids_are_deterministic(tmp_path):
    problem = Problem(suite="toy", problem_id="p1", split="train", statement="s", prompt="Write f.",
                      hidden_tests=TestSpec("assert", asserts=("assert f(1) == 2",)))
    result = ExecResult(Outcome.FAILED, -0.3, tests=[TestResult("failed"), TestResult("passed")], error="wrong",
                        wall_time=0.25)
    rows = [make_row(problem, "def f(x):\n    return x\n", [5, 6, 7], result, source="generated",
                     tokenizer_hash=TOK, iteration=2, policy_version="v2", actor="actor-0",
                     sampling={"temperature": 0.6, "top_p": 0.95}),
            {"tests_hash": "h", "suite": "toy", "split": "train", "problem_id": "p2", "source": "human",
             "program": "print(1)", "program_ids": [1, 2], "tokenizer_hash": TOK, "outcome": "passed",
             "target_actions": [3, 4], "a_ckpt": [0.0, -1.5], "v_phi": [0.25, 0.5], "targets_fingerprint": "fp1"}]
    buf = ReplayBuffer(str(tmp_path / "b"))
    assert buf.append(rows, "actor-0/iter-2/batch-0") == 2
    back = buf.read().to_pylist()
    assert len(back) == 2
    r0, r1 = back
    assert r0["tests_hash"] == problem.hidden_tests.content_hash()
    assert r0["program_hash"] == program_hash("def f(x):\n    return x\n")
    assert (r0["outcome"], r0["reward"], r0["tests_passed"], r0["tests_total"]) == ("failed", -0.3, 1, 2)
    assert (r0["error"], r0["exec_time"], r0["iteration"], r0["policy_version"]) == ("wrong", 0.25, 2, "v2")
    assert r0["sampling"] == '{"temperature":0.6,"top_p":0.95}'
    assert r0["program_ids"] == [5, 6, 7] and r0["target_actions"] is None and r0["targets_fingerprint"] is None
    assert r0["schema_version"] == 1 and r0["split"] == "train"
    assert r1["reward"] == 1.0 and r1["sampling"] == "{}" and r1["error"] is None and r1["timeout"] is False
    assert r1["target_actions"] == [3, 4] and r1["a_ckpt"] == [0.0, -1.5] and r1["v_phi"] == [0.25, 0.5]
    assert r1["program_hash"] == program_hash("print(1)")
    # The same batch under the same key elsewhere gets the same ids; another key, other ids.
    other = ReplayBuffer(str(tmp_path / "c"))
    other.append(rows, "actor-0/iter-2/batch-0")
    other.append(rows, "actor-1/iter-2/batch-0")
    ids = other.read(columns=["sample_id"])["sample_id"].to_pylist()
    assert set(r["sample_id"] for r in back) < set(ids) and len(set(ids)) == 4


def test_retry_of_a_batch_adds_nothing(tmp_path):
    rng = np.random.default_rng(1)
    buf = ReplayBuffer(str(tmp_path / "b"))
    rows = small_rows(rng, 30)
    assert buf.append(rows, "k1") == 30
    assert buf.append(rows, "k1") == 0
    assert buf.append(small_rows(rng, 5), "k1") == 0  # the key decides, as for a restarted actor
    assert buf.append(rows, "k2") == 30
    assert buf.read().num_rows == 60
    assert len(buf.files("samples")) == 2


def test_bad_rows_are_refused_with_the_row_named(tmp_path):
    rng = np.random.default_rng(2)
    buf = ReplayBuffer(str(tmp_path / "b"))
    good = small_rows(rng, 3).to_pylist()
    with pytest.raises(BufferError, match="row 1 .* split 'test'.*append_eval"):
        buf.append([good[0], {**good[1], "split": "test"}], "k")
    with pytest.raises(BufferError, match="row 0 .*outcome must be one of"):
        buf.append([{**good[0], "outcome": "crashed"}], "k")
    with pytest.raises(BufferError, match="row 2 .*reward disagrees"):
        buf.append([good[0], good[1], {**good[2], "outcome": "passed", "reward": -0.3}], "k")
    with pytest.raises(BufferError, match="one value per program token"):
        buf.append([{**good[0], "target_actions": [1], "a_ckpt": [0.0], "v_phi": [0.0],
                     "targets_fingerprint": "f", "program_ids": [1, 2]}], "k")
    with pytest.raises(BufferError, match="all set or all null"):
        buf.append([{**good[0], "target_actions": good[0]["program_ids"]}], "k")
    with pytest.raises(BufferError, match="missing required column"):
        buf.append([{k: v for k, v in good[0].items() if k != "tokenizer_hash"}], "k")
    with pytest.raises(BufferError, match="unknown column"):
        buf.append([{**good[0], "colour": "red"}], "k")
    assert buf.read().num_rows == 0 and not buf.files("samples")


def test_rho_real_holds_in_every_batch(buffer):
    for batch_size, rho in ((16, 0.5), (10, 0.25), (7, 1 / 3), (8, 1.0), (8, 0.0)):
        n_human = round(rho * batch_size)
        batches = list(buffer.sampler(batch_size, rho, seed=3, num_batches=40))
        assert len(batches) == 40
        for b in batches:
            assert b.num_rows == batch_size
            assert sum(b["is_human"].to_pylist()) == n_human
            assert b.column_names == ["prompt_ids", "program_ids", "reward", "is_human"]


def test_one_epoch_of_draws_visits_every_row_once(buffer):
    generated = buffer.read(filters={"suite": "a"}).filter(pc.equal(buffer.read(filters={"suite": "a"})["source"],
                                                                     "generated"))
    n = generated.num_rows  # 600
    sampler = buffer.sampler(20, rho_real=0.5, filters={"suite": "a"}, seed=5, window_rows=128,
                             extra_columns=["sample_id", "source"])
    drawn = []
    for b in sampler:
        drawn += pc.filter(b["sample_id"], pc.invert(b["is_human"])).to_pylist()
        if len(drawn) >= n:
            break
    assert Counter(drawn[:n]) == Counter(generated["sample_id"].to_pylist())  # no loss, no repeat
    # and the order is shuffled, not file order
    assert drawn[:50] != generated["sample_id"].to_pylist()[:50]


def test_filters_select_suite_outcome_and_iteration_window(buffer):
    sampler = buffer.sampler(12, 0.5, filters={"suite": "b", "outcome": ["failed", "passed"],
                                               "iterations": (1, 2), "tokenizer_hash": TOK},
                             seed=0, num_batches=30, extra_columns=["suite", "outcome", "iteration", "source"])
    for b in sampler:
        rows = b.to_pylist()
        assert {r["suite"] for r in rows} == {"b"}
        assert {r["outcome"] for r in rows} <= {"failed", "passed"}
        gen = [r for r in rows if r["source"] == "generated"]
        assert len(gen) == 6 and all(1 <= r["iteration"] <= 2 for r in gen)
    with pytest.raises(BufferError, match="no human rows match"):
        next(iter(buffer.sampler(4, 0.5, filters={"suite": "nope"})))
    with pytest.raises(BufferError, match="no generated rows match"):
        next(iter(buffer.sampler(4, 0.0, filters={"tokenizer_hash": "stale"})))  # stale token ids


def test_prompts_are_joined_by_problem_and_stored_once(buffer, tmp_path):
    prompts = buffer.prompts()
    by_key = {(r["suite"], r["problem_id"]): r["prompt_ids"] for r in prompts.to_pylist()}
    assert len(by_key) == 40
    batch = next(iter(buffer.sampler(32, 0.5, seed=1, extra_columns=["suite", "problem_id"])))
    for row in batch.to_pylist():
        assert row["prompt_ids"] == by_key[(row["suite"], row["problem_id"])]
    # collate-ready rows: exactly the learner's keys, numpy arrays for the token lists
    rows = rows_from_batch(batch.select(["prompt_ids", "program_ids", "reward", "is_human"]))
    assert set(rows[0]) == {"prompt_ids", "program_ids", "reward", "is_human"}
    assert list(rows[3]["program_ids"]) == batch["program_ids"][3].as_py()
    # repeating prompts is a no-op; changing one under the same key is an error
    again = prompts.filter(pc.equal(prompts["suite"], "a"))
    assert buffer.put_prompts(again) == 0
    changed = again.slice(0, 1).to_pylist()
    changed[0]["prompt"] += " (edited)"
    with pytest.raises(BufferError, match="different prompt"):
        buffer.put_prompts(changed)
    # a row whose prompt was never stored is named
    buffer.append([{**small_rows(np.random.default_rng(9), 1, suite="c").to_pylist()[0]}], "orphan")
    with pytest.raises(BufferError, match=r"no prompt for .*'c'"):
        for _ in buffer.sampler(64, 0.0, filters={"suite": "c"}, num_batches=3):
            pass


def test_cached_targets_filled_later_and_joined(buffer):
    fp = "ckpt-abc"
    missing = list(buffer.missing_targets(fp, max_rows=100))
    assert sum(t.num_rows for t in missing) == 120 + 1200
    assert all(t.num_rows <= 100 for t in missing)

    def targets_for(t):
        lengths = pc.list_value_length(t["program_ids"]).to_pylist()
        ids = t["program_ids"].to_pylist()
        return t.select(["sample_file", "row_index", "sample_id"]).append_column(
            "target_actions", pa.array([[x + 1 for x in r] for r in ids], pa.list_(pa.int32()))).append_column(
            "a_ckpt", pa.array([[-0.5] * n for n in lengths], pa.list_(pa.float32()))).append_column(
            "v_phi", pa.array([[float(n)] * n for n in lengths], pa.list_(pa.float32())))

    half = missing[: len(missing) // 2]
    for i, t in enumerate(half):
        assert buffer.write_targets(targets_for(t), fp, f"job/{i}") == t.num_rows
        assert buffer.write_targets(targets_for(t), fp, f"job/{i}") == 0  # retried job
    filled = {sid for t in half for sid in t["sample_id"].to_pylist()}
    left = list(buffer.missing_targets(fp))
    assert {s for t in left for s in t["sample_id"].to_pylist()} == \
        {s for t in missing for s in t["sample_id"].to_pylist()} - filled
    # readers see only rows with targets for the fingerprint they ask for, and the values written
    seen = 0
    for b in buffer.sampler(32, 0.25, seed=2, num_batches=20, targets_fingerprint=fp,
                            extra_columns=["sample_id"]):
        assert b.column_names[:7] == list(LEARNER_COLUMNS)
        assert sum(b["is_human"].to_pylist()) == 8
        for r in b.to_pylist():
            assert r["sample_id"] in filled
            assert r["target_actions"] == [x + 1 for x in r["program_ids"]]
            assert r["v_phi"] == [float(len(r["program_ids"]))] * len(r["program_ids"])
            seen += 1
    assert seen == 640
    # without sample_file/row_index the rows are located by sample_id; a wrong length is refused
    t = left[0]
    assert buffer.write_targets(targets_for(t).drop_columns(["sample_file", "row_index"]), fp, "job/x") == t.num_rows
    bad = targets_for(left[1]).to_pylist()
    bad[0]["a_ckpt"] = bad[0]["a_ckpt"] + [0.0]
    with pytest.raises(BufferError, match="a_ckpt has"):
        buffer.write_targets(bad, fp, "job/y")
    # another fingerprint sees none of these
    assert sum(t.num_rows for t in buffer.missing_targets("other-fp")) == 1320


def constant_targets(t: pa.Table, value: float) -> pa.Table:
    """Targets for rows from missing_targets: target_actions = program_ids, a_ckpt = 0, v_phi = value."""
    n = pc.list_value_length(t["program_ids"]).to_pylist()
    return t.select(["sample_file", "row_index", "sample_id"]).append_column(
        "target_actions", t["program_ids"]).append_column(
        "a_ckpt", pa.array([[0.0] * k for k in n], pa.list_(pa.float32()))).append_column(
        "v_phi", pa.array([[value] * k for k in n], pa.list_(pa.float32())))


def test_compaction_keeps_what_readers_see(buffer):
    fp = "ckpt-1"
    for i, t in enumerate(buffer.missing_targets(fp, filters={"suite": "a"})):
        buffer.write_targets(constant_targets(t, 1.0), fp, f"j{i}")
    pending = list(buffer.missing_targets(fp, filters={"suite": "b"}))  # a targets job still running
    assert all(f.startswith("part-") for t in pending for f in t["sample_file"].to_pylist())
    before = buffer.read().sort_by("sample_id")
    missing_before = sorted(s for t in buffer.missing_targets(fp) for s in t["sample_id"].to_pylist())
    files_before = len(buffer.files("samples"))
    report = buffer.compact(target_rows=400)[0]
    assert report.files_before == files_before == 10 and report.files_after < files_before
    fresh = ReplayBuffer(buffer.uri)
    for reader in (buffer, fresh):
        assert reader.read().sort_by("sample_id").equals(before)
        assert sorted(s for t in reader.missing_targets(fp) for s in t["sample_id"].to_pylist()) == missing_before
    for b in buffer.sampler(16, 0.5, targets_fingerprint=fp, filters={"suite": "a"}, num_batches=10):
        for r in b.to_pylist():
            assert r["target_actions"] == r["program_ids"] and r["v_phi"] == [1.0] * len(r["program_ids"])
    # a retried batch whose file was compacted away still adds nothing
    assert buffer.append(small_rows(np.random.default_rng(0), 60, suite="a", source="human"), "human/a") == 0
    # targets computed for rows of a file compacted away meanwhile land where the rows are now
    late = pending[0]
    assert buffer.write_targets(constant_targets(late, 2.0), fp, "late") == late.num_rows
    late_ids = set(late["sample_id"].to_pylist())
    assert sorted(s for t in buffer.missing_targets(fp) for s in t["sample_id"].to_pylist()) == \
        sorted(set(missing_before) - late_ids)
    got = {}
    for b in buffer.sampler(16, 0.0, targets_fingerprint=fp, filters={"suite": "b"}, num_batches=30,
                            extra_columns=["sample_id"]):
        got.update({r["sample_id"]: r["v_phi"][0] for r in b.to_pylist()})
    assert set(got) == late_ids  # suite b rows with targets for fp: exactly the late ones
    assert set(got.values()) == {2.0}
    # folding a fingerprint inline: one file, same rows, targets now inline
    buffer.compact(target_rows=10_000, inline_targets=fp)
    assert len(buffer.files("samples")) == 1 and not buffer.store.list(f"targets/fp={fp}")
    after = buffer.read().sort_by("sample_id")
    assert after.drop_columns(list(TARGETS)).equals(before.drop_columns(list(TARGETS)))
    assert pc.sum(pc.equal(after["targets_fingerprint"], fp)).as_py() == 660 + len(late_ids)
    assert sorted(s for t in buffer.missing_targets(fp) for s in t["sample_id"].to_pylist()) == \
        sorted(set(missing_before) - late_ids)


def test_interrupted_compaction_shows_no_row_twice_and_is_finished_later(buffer, monkeypatch):
    fp = "ckpt-2"
    for i, t in enumerate(buffer.missing_targets(fp)):
        buffer.write_targets(constant_targets(t, 3.0), fp, f"j{i}")
    before = buffer.read().sort_by("sample_id")
    real_delete = buffer.store.delete

    def crash(rel):  # the compactor dies after its merged file appeared, before removing the sources
        raise KeyboardInterrupt("killed")

    monkeypatch.setattr(buffer.store, "delete", crash)
    with pytest.raises(KeyboardInterrupt):
        buffer.compact(target_rows=10_000)
    monkeypatch.setattr(buffer.store, "delete", real_delete)
    samples = Path(buffer.store.root) / "samples"
    assert len(list(samples.glob("*.parquet"))) == 11  # sources and the merged file are all on disk
    reader = ReplayBuffer(buffer.uri)
    assert [f.name for f in reader.files("samples")] == [p.name for p in samples.glob("compact-*.parquet")]
    assert reader.read().sort_by("sample_id").equals(before)
    assert not list(reader.missing_targets(fp))
    reader.compact(target_rows=10_000)  # the next compaction removes the leftovers
    assert len(list(samples.glob("*.parquet"))) == 1
    assert len(list((Path(buffer.store.root) / "targets" / f"fp={fp}").iterdir())) == 1
    assert reader.read().sort_by("sample_id").equals(before)
    assert {r["v_phi"][0] for b in reader.sampler(32, 0.5, targets_fingerprint=fp, num_batches=5)
            for r in b.select(["v_phi"]).to_pylist()} == {3.0}


def test_damaged_files_are_quarantined_and_the_rest_stays_readable(buffer):
    files = buffer.files("samples")
    root = Path(buffer.store.root)
    truncated, garbage, flipped = files[2].path, files[3].path, files[5].path
    data = Path(truncated).read_bytes()
    Path(truncated).write_bytes(data[: len(data) // 2])
    Path(garbage).write_bytes(b"not parquet at all" * 10)
    data = bytearray(Path(flipped).read_bytes())
    middle = len(data) // 3
    data[middle:middle + 64] = bytes(x ^ 0xFF for x in data[middle:middle + 64])
    Path(flipped).write_bytes(bytes(data))
    with pytest.warns(BufferWarning, match="moved damaged file samples/.* to quarantine") as record:
        reopened = ReplayBuffer(buffer.uri)
    assert len(record) == 2  # footer damage is found on open
    assert sorted(p.name for p in (root / "quarantine" / "samples").iterdir()) == \
        sorted([Path(truncated).name, Path(garbage).name])
    assert len(reopened.files("samples")) == len(files) - 2
    # damage inside the data (a page's CRC, or its header) is found on read, and that file is moved aside too
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in reopened.sampler(64, 0.5, seed=0, num_batches=60):
            pass
        rows = sum(t.num_rows for _, t in reopened.scan())
    assert any(Path(flipped).name in str(w.message) and "failed" in str(w.message) for w in caught)
    assert (root / "quarantine" / "samples" / Path(flipped).name).exists()
    assert rows == sum(f.num_rows for f in files) - sum(f.num_rows for f in files if f.path in
                                                         (truncated, garbage, flipped))
    assert reopened.stats().quarantined == 3


def test_eval_candidates_are_kept_apart(buffer):
    rng = np.random.default_rng(4)
    ev = small_rows(rng, 50, suite="a", split="test")
    with pytest.raises(BufferError, match="append_eval"):
        buffer.append(ev, "eval/0")
    assert buffer.append_eval(ev, "eval/0") == 50
    eval_ids = set(buffer.read("eval")["sample_id"].to_pylist())
    for b in buffer.sampler(32, 0.5, num_batches=30, extra_columns=["sample_id"]):
        assert not eval_ids & set(b["sample_id"].to_pylist())
    stats = buffer.stats()
    assert stats.eval.rows == 50 and stats.samples.rows == 1320
    ev_row = ev.slice(0, 1).to_pylist()[0]
    assert (ev_row["program_hash"], ev_row["tests_hash"]) in buffer.lookup_results(
        [(ev_row["program_hash"], ev_row["tests_hash"])])


def test_lookup_results_is_the_executors_cache(buffer):
    table = buffer.read(columns=["program_hash", "tests_hash", "outcome", "reward", "tests_passed"])
    rows = table.slice(100, 5).to_pylist()
    keys = [(r["program_hash"], r["tests_hash"]) for r in rows]
    found = buffer.lookup_results(keys + [("0" * 64, "x"), (rows[0]["program_hash"], "other tests")])
    assert set(found) == set(keys)
    for r in rows:
        hit = found[(r["program_hash"], r["tests_hash"])]
        assert (hit["outcome"], hit["reward"], hit["tests_passed"]) == (r["outcome"], r["reward"], r["tests_passed"])
        cached = exec_result(hit)
        assert cached.cached and cached.outcome == Outcome(r["outcome"]) and cached.reward == r["reward"]
    assert buffer.lookup_results([]) == {}


def test_plain_tools_open_the_buffer(buffer):
    import duckdb
    import pandas as pd

    samples = os.path.join(buffer.store.root, "samples")
    # a killed writer's leftover must not confuse them
    Path(samples, "_tmp-deadbeef.partial").write_bytes(b"PAR1 half a file")
    df = pd.read_parquet(samples)
    assert len(df) == 1320 and set(df["source"]) == {"human", "generated"}
    counts = duckdb.sql(f"select source, count(*) as n from read_parquet('{samples}/*.parquet') "
                        f"group by source order by source").fetchall()
    assert counts == [("generated", 1200), ("human", 120)]
    assert pq.ParquetDataset(samples).read(columns=["sample_id"]).num_rows == 1320
    assert buffer.clean_tmp(older_than_s=0) == 1


def test_stats_cli(buffer):
    out = subprocess.run([sys.executable, "-m", "bcoder_ray.replay_buffer", "stats", buffer.uri],
                         capture_output=True, text=True, cwd=REPO, check=True).stdout
    table = buffer.read(columns=["outcome"])
    rate = pc.sum(pc.equal(table["outcome"], "passed")).as_py() / table.num_rows
    assert "samples (train, learner-facing): 1320 rows" in out
    assert "by suite: a=660, b=660" in out and "by source: generated=1200, human=120" in out
    assert "by iteration: 0=420, 1=300, 2=300, 3=300" in out
    assert f"pass rate {100 * rate:.2f}%" in out and "size on disk:" in out and "MiB" in out
