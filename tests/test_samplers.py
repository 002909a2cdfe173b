"""The replay samplers (`buffer.sampler`): uniform is today's stream, unchanged; prioritized, fresh_prioritized and
balanced draw by their formulas (checked on draws from a synthetic buffer, each count within 5 binomial standard
errors of its expectation); the priority side table (last write wins, changes what is drawn); the importance
weights reach B-Coder's losses; the learner's per-row TD errors become priorities; the config refuses
prioritized replay for an algorithm without TD errors, and compare.py does not refuse a comparison of samplers."""

from __future__ import annotations

import collections
import math

import numpy as np
import pyarrow as pa
import pytest
import torch

from bcoder_ray.buffer import BufferError, ReplayBuffer, SamplerSpec
from bcoder_ray.buffer.synthetic import synthetic_prompts, synthetic_rows

N_PROBLEMS = 4
DRAWS = 6000  # generated rows drawn per distribution check
BATCH = 60
Z = 5.0  # standard errors allowed per count: with ~100 counts checked, a false alarm has odds ~1e-5


def _buffer(tmp_path, iterations=(0,), per_iteration=40, humans=8) -> ReplayBuffer:
    rng = np.random.default_rng(7)
    buf = ReplayBuffer(str(tmp_path / "buffer"))
    buf.put_prompts(synthetic_prompts(rng, N_PROBLEMS, mean_tokens=6, max_tokens=12))
    for it in iterations:
        rows = synthetic_rows(rng, per_iteration, start=100 * it, n_problems=N_PROBLEMS, iteration=it,
                              mean_tokens=5, max_tokens=9)
        buf.append(rows, f"gen-{it}")
    if humans:
        buf.append(synthetic_rows(rng, humans, start=10_000, n_problems=N_PROBLEMS, source="human", mean_tokens=5,
                                  max_tokens=9), "human")
    return buf


def _generated(buf: ReplayBuffer) -> pa.Table:
    t = buf.read(columns=["sample_id", "source", "problem_id", "iteration", "outcome"])
    return t.filter(pa.compute.equal(t["source"], "generated"))


def _draw(buf: ReplayBuffer, spec: SamplerSpec | None, draws: int = DRAWS, rho_real: float = 0.0, seed: int = 3):
    """(count per sample_id, weight per sample_id, the batches) of `draws` generated rows."""
    counts: collections.Counter = collections.Counter()
    weights: dict[str, float] = {}
    batches = list(buf.sampler(BATCH, rho_real, seed=seed, num_batches=draws // BATCH, sampler=spec,
                               extra_columns=["sample_id", "source", "problem_id", "outcome"]))
    for b in batches:
        for sid, source, w in zip(b["sample_id"].to_pylist(), b["source"].to_pylist(),
                                  b["weight"].to_pylist() if "weight" in b.column_names else [1.0] * b.num_rows):
            if source == "generated":
                counts[sid] += 1
                assert weights.setdefault(sid, w) == w  # a row's weight does not depend on its batch mates
    return counts, weights, batches


def _assert_counts_follow(counts: collections.Counter, p: dict[str, float], draws: int) -> None:
    assert sum(counts.values()) == draws
    for sid, prob in p.items():
        se = math.sqrt(draws * prob * (1 - prob))
        assert abs(counts[sid] - draws * prob) <= Z * se + 1e-9, (sid, counts[sid], draws * prob, se)


def _is_weights(p: dict[str, float], b: float) -> dict[str, float]:
    n = len(p)
    raw = {sid: (n * prob) ** -b for sid, prob in p.items()}
    top = max(raw.values())
    return {sid: w / top for sid, w in raw.items()}


# ------------------------------------------------------------------------------------------------ uniform
def test_uniform_is_todays_stream_bit_for_bit(tmp_path):
    buf = _buffer(tmp_path)
    kwargs = dict(batch_size=8, rho_real=0.5, seed=11, num_batches=6, extra_columns=["sample_id"])
    today = list(buf.sampler(**kwargs))
    uniform = list(buf.sampler(**kwargs, sampler=SamplerSpec(kind="uniform")))
    assert all(a.equals(b) for a, b in zip(today, uniform)) and len(today) == 6
    assert "weight" not in uniform[0].column_names


# -------------------------------------------------------------------------------------------- prioritized
def test_prioritized_draws_follow_the_priorities_and_weights_correct_them(tmp_path):
    buf = _buffer(tmp_path)
    gen = _generated(buf)["sample_id"].to_pylist()
    recorded = {sid: float(v) for sid, v in zip(gen[:30], np.linspace(0.0, 3.0, 30))}  # the last 10: none yet
    buf.priorities("theta").write(list(recorded), list(recorded.values()), "test")
    spec = SamplerSpec(kind="prioritized", table="theta", priority_exponent=0.7, is_exponent=0.5, epsilon=0.05,
                       refresh_batches=0)
    newest = max(recorded.values())  # rows without a priority get the largest recorded
    score = {sid: (recorded.get(sid, newest) + spec.epsilon) ** spec.priority_exponent for sid in gen}
    total = sum(score.values())
    p = {sid: s / total for sid, s in score.items()}
    counts, weights, _ = _draw(buf, spec)
    _assert_counts_follow(counts, p, DRAWS)
    expected = _is_weights(p, spec.is_exponent)
    for sid, w in weights.items():
        assert w == pytest.approx(expected[sid], rel=1e-6)  # float32 of the formula
    assert weights[gen[0]] == max(weights.values()) or gen[0] not in weights  # the rarest row weighs most


def test_a_priority_write_changes_what_is_drawn(tmp_path):
    buf = _buffer(tmp_path, humans=0)
    gen = _generated(buf)["sample_id"].to_pylist()
    spec = SamplerSpec(kind="prioritized", table="phi", priority_exponent=1.0, epsilon=0.01, refresh_batches=1)
    sampler = iter(buf.sampler(BATCH, 0.0, seed=5, sampler=spec, extra_columns=["sample_id"]))
    before = collections.Counter(sid for _ in range(10) for sid in next(sampler)["sample_id"].to_pylist())
    # no priorities yet: every row has the (default) largest one, so the draws are uniform
    _assert_counts_follow(before, {sid: 1 / len(gen) for sid in gen}, 10 * BATCH)
    buf.priorities("phi").write(gen, [10.0] + [0.0] * (len(gen) - 1), "learner-step1")
    next(sampler)  # the batch in flight when the write landed may predate it: refreshed before the next one
    after = collections.Counter(sid for _ in range(10) for sid in next(sampler)["sample_id"].to_pylist())
    p_hot = 10.01 / (10.01 + 0.01 * (len(gen) - 1))
    _assert_counts_follow(after, {gen[0]: p_hot}, 10 * BATCH)
    assert after[gen[0]] > 0.9 * 10 * BATCH > before[gen[0]]


def test_fresh_prioritized_decays_with_age_in_policy_versions(tmp_path):
    """Async-like rows: several policy versions within one rollout iteration, so an age in iterations and a lag in
    versions disagree; the draws follow the lag. Another run's rows (no lag) age as the oldest of this run's."""
    rng = np.random.default_rng(7)
    buf = ReplayBuffer(str(tmp_path / "buffer"))
    buf.put_prompts(synthetic_prompts(rng, N_PROBLEMS, mean_tokens=6, max_tokens=12))
    # (rollout iteration, policy version, rows): versions 0-1 sampled in iteration 0, versions 2-4 in iteration 1
    groups = [(0, "r/0", 10), (0, "r/1", 10), (1, "r/2", 10), (1, "r/3", 10), (1, "r/4", 10), (3, "other/9", 10)]
    for i, (it, version, n) in enumerate(groups):
        t = synthetic_rows(rng, n, start=100 * i, n_problems=N_PROBLEMS, iteration=it, mean_tokens=5, max_tokens=9)
        buf.append(t.set_column(t.schema.get_field_index("policy_version"), "policy_version",
                                pa.array([version] * n)), f"gen-{i}")
    gen = buf.read(columns=["sample_id", "policy_version"])
    ids, versions = gen["sample_id"].to_pylist(), gen["policy_version"].to_pylist()
    prio = {sid: 0.5 + (i % 3) for i, sid in enumerate(ids)}
    buf.priorities("theta").write(list(prio), list(prio.values()), "test")
    spec = SamplerSpec(kind="fresh_prioritized", table="theta", priority_exponent=1.0, is_exponent=1.0,
                       epsilon=0.01, tau=1.5, current_version="r/5", refresh_batches=0)
    lag = {"r/0": 5, "r/1": 4, "r/2": 3, "r/3": 2, "r/4": 1, "other/9": 5}  # another run's: the oldest known lag
    score = {sid: (prio[sid] + spec.epsilon) * math.exp(-lag[v] / spec.tau) for sid, v in zip(ids, versions)}
    total = sum(score.values())
    p = {sid: s / total for sid, s in score.items()}
    counts, weights, _ = _draw(buf, spec)
    _assert_counts_follow(counts, p, DRAWS)
    expected = _is_weights(p, 1.0)
    assert all(w == pytest.approx(expected[sid], rel=1e-6) for sid, w in weights.items())
    by_version = collections.Counter()
    for sid, v in zip(ids, versions):
        by_version[v] += counts[sid]
    assert by_version["r/4"] > by_version["r/2"] > by_version["r/0"]
    with pytest.raises(ValueError, match="current_version"):
        SamplerSpec(kind="fresh_prioritized", table="theta")


# --------------------------------------------------------------------------------------------- balanced
def test_balanced_holds_the_pass_share_within_every_problem(tmp_path):
    buf = _buffer(tmp_path, per_iteration=80)
    gen = _generated(buf)
    problem, passed = gen["problem_id"].to_pylist(), [o == "passed" for o in gen["outcome"].to_pylist()]
    spec = SamplerSpec(kind="balanced", pass_share=0.4, refresh_batches=0)
    counts, weights, _ = _draw(buf, spec)
    assert set(weights.values()) == {1.0}
    n = len(problem)
    mixed = 0
    for pid in set(problem):
        rows = [i for i in range(n) if problem[i] == pid]
        n_pass = sum(passed[i] for i in rows)
        share = spec.pass_share if 0 < n_pass < len(rows) else (1.0 if n_pass else 0.0)
        mixed += 0 < n_pass < len(rows)
        drawn = sum(counts[gen["sample_id"][i].as_py()] for i in rows)
        drawn_pass = sum(counts[gen["sample_id"][i].as_py()] for i in rows if passed[i])
        # the problem keeps its share of the stream, and inside it the passing rows make pass_share of the draws
        p_problem = len(rows) / n
        assert abs(drawn - DRAWS * p_problem) <= Z * math.sqrt(DRAWS * p_problem * (1 - p_problem))
        assert abs(drawn_pass - drawn * share) <= Z * math.sqrt(drawn * share * (1 - share)) + 1e-9
    assert mixed >= 2  # the check saw problems with both kinds of program


# --------------------------------------------------------------------------------------------- side table
def test_the_priority_table_keeps_the_newest_value_and_refuses_bad_ones(tmp_path):
    buf = _buffer(tmp_path, humans=0)
    samples = tmp_path / "buffer" / "samples"
    data_files = {p.name: p.stat().st_mtime_ns for p in samples.iterdir()}
    table = buf.priorities("theta")
    ids = _generated(buf)["sample_id"].to_pylist()[:3]
    table.write(ids, [1.0, 2.0, 3.0], "a")
    table.write(ids[:1], [7.0], "b")
    got = table.lookup(pa.array([*ids, "not-a-row"]))
    assert got[:3].tolist() == [7.0, 2.0, 3.0] and np.isnan(got[3])
    assert np.isnan(buf.priorities("phi").lookup(pa.array(ids))).all()  # each stage has a table of its own
    with pytest.raises(BufferError, match=ids[1]):
        table.write(ids, [1.0, float("nan"), 0.5], "c")
    with pytest.raises(BufferError, match="priority table"):
        buf.priorities("../x")
    assert {p.name: p.stat().st_mtime_ns for p in samples.iterdir()} == data_files  # the data never rewritten
    assert len(list((tmp_path / "buffer" / "priorities" / "theta").iterdir())) == 2  # one small file per write


# --------------------------------------------------------------------------------------------- the losses
@pytest.fixture(scope="module")
def q_model(tmp_path_factory):
    from bcoder_ray.algorithms.bcoder.q_model import QModel
    from learner_fixtures import perturb, tiny_checkpoint

    model = QModel.create(tiny_checkpoint("decoder-only", str(tmp_path_factory.mktemp("ckpt"))))
    perturb(model.freeze_for_stage("theta"), scale=0.3, seed=5)
    perturb(model.freeze_for_stage("phi"), scale=0.3, seed=6)
    return model


@pytest.mark.parametrize("stage", ["phi", "theta"])
def test_importance_weights_multiply_each_rows_loss(q_model, stage):
    """The weighted batch loss equals the hand-computed Σ_b w_b·L_b / B (and, for θ's L_adv and L_ce, over the
    ground-truth rows), each L_b from the row alone; a batch without weights is the weight-1 case exactly."""
    from bcoder_ray.algorithms.bcoder.losses import phi_loss, theta_loss
    from bcoder_ray.model.batch import collate
    from learner_fixtures import PAD, example_rows

    q_model.freeze_for_stage(stage)
    rows = example_rows(4)
    w = [0.25, 1.0, 0.5, 0.75]
    fn = phi_loss if stage == "phi" else theta_loss
    weighted, _ = fn(q_model, collate([{**r, "weight": x} for r, x in zip(rows, w)], PAD), gamma=0.9)
    plain, _ = fn(q_model, collate(rows, PAD), gamma=0.9)
    ones, _ = fn(q_model, collate([{**r, "weight": 1.0} for r in rows], PAD), gamma=0.9)
    assert torch.equal(plain, ones)  # under uniform, bit for bit
    alone = [fn(q_model, collate([r], PAD), gamma=0.9)[1] for r in rows]
    if stage == "phi":
        expected = sum(x * m["l_v"] for x, m in zip(w, alone)) / len(rows)
    else:
        gt = [i for i, r in enumerate(rows) if r["is_human"] and r["reward"] == 1.0]
        expected = (sum(x * m["l_q"] for x, m in zip(w, alone)) / len(rows)
                    + 0.1 * sum(w[i] * alone[i]["l_adv"] for i in gt) / len(gt)
                    + 0.5 * sum(w[i] * alone[i]["l_ce"] for i in gt) / len(gt))
    # float32 with other padding (single rows): test_losses' padding check holds to the same 1e-5
    assert float(weighted.detach()) == pytest.approx(expected, rel=1e-5)
    assert float(weighted.detach()) != pytest.approx(float(plain.detach()), rel=1e-3)  # the weights did change the loss


@pytest.mark.parametrize("stage", ["phi", "theta"])
def test_a_stage_reports_each_rows_td_error(q_model, stage, tmp_path):
    """QStage.row_td_errors: per program, the mean |δ_t| over its tokens; weighted by lengths they give the
    token mean the `td_error` metric reports."""
    from bcoder_ray.algorithms.bcoder.algorithm import BCoderConfig, QStage
    from bcoder_ray.model.batch import collate
    from learner_fixtures import PAD, example_rows

    module = QStage(q_model, stage, BCoderConfig())
    batch = collate(example_rows(4), PAD)
    _, metrics = module(batch)
    per_row = module.row_td_errors()
    assert per_row.shape == (4,) and not per_row.requires_grad
    lengths = batch.lengths.float()
    assert float((per_row * lengths).sum() / lengths.sum()) == pytest.approx(metrics["td_error"], rel=1e-5)


def test_the_learner_records_generated_rows_td_errors_as_priorities(tmp_path):
    from bcoder_ray.loop.learner import PriorityRecorder

    buf = _buffer(tmp_path)
    batch = next(iter(buf.sampler(6, 0.5, seed=1, extra_columns=["sample_id"])))
    recorder = PriorityRecorder(buf.priorities("theta"), "theta-rank0")
    td = torch.arange(6, dtype=torch.float32) / 4
    recorder.add(batch, td, "test")
    assert recorder.flush(10) == 3  # the three generated rows; human rows are read uniformly
    human = batch["is_human"].to_pylist()
    got = buf.priorities("theta").lookup(batch["sample_id"])
    for i, is_human in enumerate(human):
        assert np.isnan(got[i]) if is_human else got[i] == pytest.approx(float(td[i]))
    with pytest.raises(RuntimeError, match="row_td_errors"):
        recorder.add(batch, None, "stage 'x' (sft)")


# --------------------------------------------------------------------------------------------- the config
def test_prioritized_replay_needs_an_algorithm_with_td_errors():
    from bcoder_ray.config import ConfigError, load_config

    cfg = load_config("ci_tiny", ["--buffer.sampler.kind", "prioritized"], check_paths=False)
    assert cfg.buffer.sampler.spec("theta", "r/2") == SamplerSpec(kind="prioritized", table="theta",
                                                                  current_version="r/2")
    for algorithm in ("sft", "grpo"):
        with pytest.raises(ConfigError, match=f"'{algorithm}' reports none"):
            load_config("ci_tiny", ["--algorithm.name", algorithm, "--buffer.sampler.kind", "fresh_prioritized"],
                        check_paths=False)
    assert load_config("ci_tiny", ["--algorithm.name", "sft", "--buffer.sampler.kind", "balanced"],
                       check_paths=False).buffer.sampler.kind == "balanced"


def test_compare_finds_runs_that_differ_only_in_their_sampler_comparable():
    import sys
    from pathlib import Path

    from bcoder_ray.config import load_config

    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "experiments"))
    from compare import comparable_view

    views = {kind: comparable_view(load_config("ci_tiny", ["--buffer.sampler.kind", kind], check_paths=False)
                                   .to_dict()) for kind in ("uniform", "prioritized", "fresh_prioritized", "balanced")}
    assert len({repr(v) for v in views.values()}) == 1
