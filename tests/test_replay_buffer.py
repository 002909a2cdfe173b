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
from bcoder_ray.buffer import (LEARNER_COLUMNS, SCHEMA_VERSION, BufferError, BufferWarning, Filters, ReplayBuffer,
                               exec_result, make_row, part_name, rows_from_batch)
from envs.problem import Problem, TestSpec, program_hash
from envs.result import ExecResult, Outcome, TestResult

REPO = Path(__file__).resolve().parents[1]
TOK = "synthetic-tok"
TARGETS = ("target_actions", "a_ckpt", "v_phi")


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
                     sampling={"temperature": 0.6, "top_p": 0.95}, logprobs=[-0.5, -1.0, -0.25], truncated=True,
                     run_id="run-7"),
            {"tests_hash": "h", "suite": "toy", "split": "train", "problem_id": "p2", "source": "human",
             "program": "print(1)", "program_ids": [1, 2], "tokenizer_hash": TOK, "outcome": "passed"}]
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
    assert r0["program_ids"] == [5, 6, 7] and not set(TARGETS) & set(r0)
    assert r0["schema_version"] == SCHEMA_VERSION == 2 and r0["split"] == "train"
    assert (r0["decoding"], r0["logprobs"], r0["truncated"], r0["run_id"]) == ("sample", [-0.5, -1.0, -0.25],
                                                                            True, "run-7")
    assert r1["reward"] == 1.0 and r1["sampling"] == "{}" and r1["error"] is None and r1["timeout"] is False
    assert (r1["decoding"], r1["logprobs"], r1["truncated"], r1["run_id"]) == ("sample", None, False, None)
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
    with pytest.raises(BufferError, match="row 0 .*logprobs must have one value per program token"):
        buf.append([{**good[0], "logprobs": [-1.0], "program_ids": [1, 2]}], "k")
    with pytest.raises(BufferError, match="row 1 .*decoding must be one of"):
        buf.append([good[0], {**good[1], "decoding": "beam"}], "k")
    with pytest.raises(BufferError, match="unknown column"):  # targets are no sample columns (version 2)
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
        assert b.column_names == [*LEARNER_COLUMNS, *TARGETS, "sample_id"]
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
    # merging everything: one file, same rows, the fingerprint's sidecars remapped onto it
    buffer.compact(target_rows=10_000)
    assert len(buffer.files("samples")) == 1
    assert buffer.read().sort_by("sample_id").equals(before)
    assert sorted(s for t in buffer.missing_targets(fp) for s in t["sample_id"].to_pylist()) == \
        sorted(set(missing_before) - late_ids)
    assert buffer.stats().targets_rows == {fp: 660 + len(late_ids)}


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
    # (the package is the CLI: python -m bcoder_ray.buffer)
    out = subprocess.run([sys.executable, "-m", "bcoder_ray.buffer", "stats", buffer.uri],
                         capture_output=True, text=True, cwd=REPO, check=True).stdout
    table = buffer.read(columns=["outcome"])
    rate = pc.sum(pc.equal(table["outcome"], "passed")).as_py() / table.num_rows
    assert "samples (train, learner-facing): 1320 rows" in out
    assert "by suite: a=660, b=660" in out and "by source: generated=1200, human=120" in out
    assert "by iteration: 0=420, 1=300, 2=300, 3=300" in out
    assert f"pass rate {100 * rate:.2f}%" in out and "size on disk:" in out and "MiB" in out


# ---- schema version 2, algorithm-declared targets, on-policy readers --------------------------------------

# The sample schema as version 1 wrote it (copied from bcoder_ray/buffer/schema.py before version 2).
_ids, _floats = pa.list_(pa.int32()), pa.list_(pa.float32())
SAMPLE_SCHEMA_V1 = pa.schema([
    pa.field("schema_version", pa.int16(), nullable=False),
    pa.field("sample_id", pa.string(), nullable=False),
    pa.field("program_hash", pa.string(), nullable=False),
    pa.field("tests_hash", pa.string(), nullable=False),
    pa.field("suite", pa.string(), nullable=False),
    pa.field("split", pa.string(), nullable=False),
    pa.field("problem_id", pa.string(), nullable=False),
    pa.field("source", pa.string(), nullable=False),
    pa.field("iteration", pa.int32(), nullable=False),
    pa.field("policy_version", pa.string(), nullable=False),
    pa.field("actor", pa.string(), nullable=False),
    pa.field("sampling", pa.string(), nullable=False),
    pa.field("program", pa.string(), nullable=False),
    pa.field("program_ids", _ids, nullable=False),
    pa.field("tokenizer_hash", pa.string(), nullable=False),
    pa.field("outcome", pa.string(), nullable=False),
    pa.field("reward", pa.float64(), nullable=False),
    pa.field("tests_passed", pa.int32(), nullable=False),
    pa.field("tests_total", pa.int32(), nullable=False),
    pa.field("error", pa.string()),
    pa.field("timeout", pa.bool_(), nullable=False),
    pa.field("exec_time", pa.float64(), nullable=False),
    pa.field("target_actions", _ids),
    pa.field("a_ckpt", _floats),
    pa.field("v_phi", _floats),
    pa.field("targets_fingerprint", pa.string()),
])


def write_v1_file(buf: ReplayBuffer, rows: pa.Table, batch_key: str, inline_fp: str | None = None) -> pa.Table:
    """Rows as version 1 wrote them: its columns only, schema_version 1, inline targets when `inline_fp`."""
    from bcoder_ray.buffer.schema import rows_to_table

    t = rows_to_table(rows, batch_key)
    n = t.num_rows
    cols = {c: t[c] for c in SAMPLE_SCHEMA_V1.names if c in t.column_names}
    cols["schema_version"] = pa.array(np.ones(n, np.int16))
    for c, typ in (("target_actions", _ids), ("a_ckpt", _floats), ("v_phi", _floats)):
        cols[c] = t["program_ids"].cast(typ) if inline_fp else pa.nulls(n, typ)
    cols["targets_fingerprint"] = pa.array([inline_fp] * n, pa.string())
    table = pa.table({c: cols[c] for c in SAMPLE_SCHEMA_V1.names}).cast(SAMPLE_SCHEMA_V1)
    buf.store.write_parquet(f"samples/{part_name(batch_key)}", table, SAMPLE_SCHEMA_V1, 32)
    return table


def test_version_1_files_still_read(tmp_path):
    rng = np.random.default_rng(11)
    buf = ReplayBuffer(str(tmp_path / "b"), row_group_size=32)
    buf.put_prompts(synthetic_prompts(rng, 20, mean_tokens=8, max_tokens=30))
    old_h = write_v1_file(buf, small_rows(rng, 40, source="human"), "v1/human", inline_fp="old-fp")
    old_g = write_v1_file(buf, small_rows(rng, 80), "v1/gen")
    assert buf.append(small_rows(rng, 60, iteration=1), "v2/gen") == 60
    with warnings.catch_warnings():
        warnings.simplefilter("error", BufferWarning)  # nothing is quarantined
        reader = ReplayBuffer(buf.uri)
    back = reader.read()
    assert back.num_rows == 180 and not set(TARGETS) & set(back.column_names)
    old = back.filter(pc.equal(back["schema_version"], 1))
    assert old.num_rows == 120
    assert set(old["decoding"].to_pylist()) == {"sample"} and set(old["truncated"].to_pylist()) == {False}
    assert old["logprobs"].null_count == 120 and old["run_id"].null_count == 120
    assert sorted(old["sample_id"].to_pylist()) == sorted(old_h["sample_id"].to_pylist() + old_g["sample_id"].to_pylist())
    # the sampler reads both versions; filters on the new columns see version-1 rows as their defaults
    for b in reader.sampler(16, 0.25, seed=0, num_batches=20,
                            extra_columns=["schema_version", "decoding", "truncated", "logprobs"]):
        assert b.num_rows == 16 and sum(b["is_human"].to_pylist()) == 4
        assert set(b["decoding"].to_pylist()) == {"sample"}
    assert reader.read(filters={"decoding": ["sample"]}).num_rows == 180
    assert reader.read(filters={"require_logprobs": True}).num_rows == 0
    # old inline targets are ignored: those rows lack targets for every fingerprint until written again
    assert sum(t.num_rows for t in reader.missing_targets("old-fp")) == 180
    with pytest.raises(BufferError, match="no human rows match .* with targets fp=old-fp"):
        next(iter(reader.sampler(8, 0.5, targets_fingerprint="old-fp")))
    for i, t in enumerate(reader.missing_targets("new-fp")):
        reader.write_targets(constant_targets(t, 4.0), "new-fp", f"j{i}")
    # compaction rewrites version-1 rows in the current layout, keeping what readers see
    before = reader.read().sort_by("sample_id")
    reader.compact(target_rows=10_000)
    assert len(reader.files("samples")) == 1
    assert reader.read().sort_by("sample_id").equals(before)
    merged = pq.read_schema(reader.files("samples")[0].path)
    assert "decoding" in merged.names and "target_actions" not in merged.names
    got = [r for b in reader.sampler(16, 0.5, targets_fingerprint="new-fp", num_batches=5) for r in b.to_pylist()]
    assert {x for r in got for x in r["v_phi"]} == {4.0}


def test_targets_are_the_columns_their_writer_declares(buffer):
    rows = [t for t in buffer.missing_targets("fp-a")]
    first = rows[0]
    n = pc.list_value_length(first["program_ids"]).to_pylist()
    # one custom per-token column (an on-policy method's advantages, say), float64 as written
    adv = first.select(["sample_file", "row_index", "sample_id"]).append_column(
        "advantage", pa.array([[0.5] * k for k in n], pa.list_(pa.float64())))
    assert buffer.write_targets(adv, "fp-a", "a/0") == first.num_rows
    # the columns missing_targets handed out may come back; they are not targets
    assert buffer.write_targets(rows[1].append_column(
        "advantage", pa.array([[1.5] * k for k in pc.list_value_length(rows[1]["program_ids"]).to_pylist()],
                              pa.list_(pa.float32()))), "fp-a", "a/1") == rows[1].num_rows
    side = pq.read_schema(next(Path(buffer.store.root, "targets", "fp=fp-a").glob("*.parquet")))
    assert side.names == ["row_index", "sample_id", "advantage"]
    # another column set for the same fingerprint is refused, naming both sets
    with pytest.raises(BufferError, match=r"\['a_ckpt', 'advantage'\] differ from the columns \['advantage'\]"):
        buffer.write_targets(adv.append_column("a_ckpt", adv["advantage"]), "fp-a", "a/2")
    with pytest.raises(BufferError, match="one value per program token"):
        buffer.write_targets(adv.set_column(3, "advantage", pa.array([1.0] * adv.num_rows)), "fp-b", "b/0")
    with pytest.raises(BufferError, match="named like sample columns"):
        buffer.write_targets(adv.append_column("reward", adv["advantage"]), "fp-c", "c/0")
    with pytest.raises(BufferError, match="advantage has"):
        buffer.write_targets(adv.set_column(3, "advantage", pa.array([[0.0]] * adv.num_rows)), "fp-d", "d/0")
    # readers get exactly that fingerprint's columns (types of the first write)
    filled = set(first["sample_id"].to_pylist()) | set(rows[1]["sample_id"].to_pylist())
    for b in buffer.sampler(8, None, seed=0, num_batches=10, targets_fingerprint="fp-a",
                            extra_columns=["sample_id"]):
        assert b.column_names == [*LEARNER_COLUMNS, "advantage", "sample_id"]
        assert b.schema.field("advantage").type == pa.list_(pa.float64())
        assert set(b["sample_id"].to_pylist()) <= filled
    # without require_targets, rows lacking them come with nulls
    b = next(iter(buffer.sampler(64, 0.5, seed=0, targets_fingerprint="fp-a", require_targets=False)))
    assert b.column_names == [*LEARNER_COLUMNS, "advantage"] and b["advantage"].null_count > 0


def test_on_policy_filters_and_unmixed_sampling(tmp_path):
    rng = np.random.default_rng(12)
    buf = ReplayBuffer(str(tmp_path / "b"), row_group_size=32)
    buf.put_prompts(synthetic_prompts(rng, 20, mean_tokens=8, max_tokens=30))
    buf.append(small_rows(rng, 50, source="human"), "human")
    for it in range(3):
        buf.append(small_rows(rng, 60, iteration=it), f"gen/{it}")  # policy_version v<it>
    greedy = small_rows(rng, 30, iteration=2)
    lengths = pc.list_value_length(greedy["program_ids"]).to_pylist()
    greedy = greedy.append_column("decoding", pa.array(["greedy"] * 30)).append_column(
        "logprobs", pa.array([[-0.1] * k for k in lengths], pa.list_(pa.float32())))
    buf.append(greedy, "greedy/2")
    cols = ["source", "policy_version", "decoding", "logprobs", "sample_id"]
    # rho_real=None: no split, every matching row alike; policy_versions keeps only that policy's rows
    on_policy = Filters(policy_versions=("v2",), decoding=("sample",))
    drawn = []
    for b in buf.sampler(10, None, filters=on_policy, seed=1, num_batches=12, extra_columns=cols):
        assert b.column_names == [*LEARNER_COLUMNS, *cols] and b.num_rows == 10
        assert set(b["policy_version"].to_pylist()) == {"v2"} and set(b["decoding"].to_pylist()) == {"sample"}
        drawn += b["sample_id"].to_pylist()
    expected = buf.read(filters=on_policy)
    assert expected.num_rows == 60 and set(drawn[:60]) == set(expected["sample_id"].to_pylist())
    # unmixed over everything: humans appear at their share, not at a fixed count
    humans = [sum(b["is_human"].to_pylist()) for b in buf.sampler(20, None, seed=2, num_batches=30)]
    assert len(set(humans)) > 1 and 0 < sum(humans) < 600
    # human rows are excluded under policy_versions, even when a mix asks for them
    with pytest.raises(BufferError, match="no human rows match"):
        next(iter(buf.sampler(10, 0.5, filters={"policy_version": "v2"})))
    assert buf.read(filters={"source": "human"}).num_rows == 50
    assert buf.read(filters={"sources": ["generated"], "decoding": ["greedy"]}).num_rows == 30
    assert buf.read(filters=Filters(require_logprobs=True))["decoding"].to_pylist() == ["greedy"] * 30
    b = next(iter(buf.sampler(8, 0.0, filters={"require_logprobs": True}, extra_columns=["logprobs"])))
    assert all(len(lp) == len(ids) for lp, ids in zip(b["logprobs"].to_pylist(), b["program_ids"].to_pylist()))
    with pytest.raises(ValueError, match="not in"):
        Filters(sources=("robot",))
    with pytest.raises(ValueError, match="not sample columns"):
        buf.sampler(4, 0.5, extra_columns=["colour"])
    # row groups are pruned by statistics: a greedy-only file is not read for ("sample",)
    from bcoder_ray.buffer.sampler import _stats

    greedy_file = [e for e in buf.files("samples") if e.name == part_name("greedy/2")][0]
    rg = buf.metadata(greedy_file).row_group(0)
    assert not Filters(decoding=("sample",)).row_group_may_match(_stats(rg), None)
    assert not Filters(policy_versions=("v1",)).row_group_may_match(_stats(rg), "generated")


def test_buffer_package_imports_are_acyclic_and_self_contained():
    """Every import in bcoder_ray/buffer (module-level and function-local): no cycle inside the package, and
    nothing from bcoder_ray outside it but the layers below it, bcoder_ray.util and bcoder_ray.model (envs is
    allowed)."""
    import ast

    pkg = REPO / "bcoder_ray" / "buffer"
    modules = {f"bcoder_ray.buffer.{p.stem}" if p.stem != "__init__" else "bcoder_ray.buffer": p
               for p in pkg.glob("*.py")}
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for mod, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            for name in names:
                if name.startswith("bcoder_ray") and not name.startswith("bcoder_ray.buffer"):
                    assert name.split(".")[1] in ("util", "model"), f"{mod} imports {name}"
                if name in modules and name != mod:
                    graph[mod].add(name)
    done: set[str] = set()

    def visit(m: str, path: tuple[str, ...]) -> None:
        assert m not in path, f"import cycle: {' -> '.join(path + (m,))}"
        if m in done:
            return
        for n in graph[m]:
            visit(n, path + (m,))
        done.add(m)

    for m in graph:
        visit(m, ())
    assert "bcoder_ray.buffer" not in set().union(*(graph[m] for m in graph if m != "bcoder_ray.buffer"))
