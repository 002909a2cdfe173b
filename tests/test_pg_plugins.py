"""The `ppo`, `grpo` and `rest_em` plug-ins (bcoder_ray.algorithms.policy_gradient.algorithm,
bcoder_ray.algorithms.rest_em.algorithm) in-process, no Ray: the rows their stages read through the real buffer,
their stage modules' losses on hand-made batches, GRPO's group advantages through the grouped cached-target path,
ReST-EM's restart, PPO's refusal of T ≠ 1.

Tolerance ``MODEL``: two forwards of the same tiny model over different batch shapes (float32) agree to ~1e-6.
"""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from bcoder_ray.algorithms import make_algorithm
from bcoder_ray.algorithms.base import RunContext, StagePlan
from bcoder_ray.algorithms.lm_policy import VALUE_HEAD_FILE
from onpolicy_reference import select_on_policy
from bcoder_ray.algorithms.common import policy_forward
from bcoder_ray.algorithms.policy_gradient.losses import group_advantages
from bcoder_ray.model.batch import collate
from bcoder_ray.buffer import ReplayBuffer, rows_from_batch
from bcoder_ray.loop.target_filling import AlgorithmRef, TargetComputer, TargetJob, fill_targets, group_slices
from bcoder_ray.config import ConfigError, load_config
from envs.result import REWARD, Outcome
from learner_fixtures import PAD, example_rows, perturb, tiny_context

torch.set_num_threads(1)
MODEL = dict(rtol=1e-5, atol=1e-5)
TOK_HASH = "tok"


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> RunContext:
    return tiny_context(tmp_path_factory.mktemp("pg"))


def _algo(name: str, ctx: RunContext, **config):
    return make_algorithm(name, {"name": name, **config}, ctx)


# ------------------------------------------------------------------------------------------ a small buffer
def _row(i: int, problem: str, source: str, version: str, outcome: str = "failed", decoding: str = "sample",
         logprobs: bool = True, iteration: int = 0) -> dict:
    ids = [2 + (i % 7), 3 + (i % 5), 1]
    return {"tests_hash": f"t{problem}", "suite": "toy", "split": "train", "problem_id": problem, "source": source,
            "iteration": iteration, "policy_version": version, "program": f"program {i}", "program_ids": ids,
            "tokenizer_hash": TOK_HASH, "outcome": outcome, "reward": REWARD[Outcome(outcome)],
            "decoding": decoding, "logprobs": [-0.5 - 0.1 * k for k in range(len(ids))] if logprobs else None}


def _buffer(tmp_path) -> ReplayBuffer:
    """Rows of versions "0" and "1" (sampled, greedy, without log-probabilities), human rows; problem p2 of
    version 1 lost one of its three samples."""
    buf = ReplayBuffer(str(tmp_path / "buffer"))
    buf.put_prompts([{"suite": "toy", "problem_id": p, "tokenizer_hash": TOK_HASH, "prompt": p,
                      "prompt_ids": [5, 6, 7 + k]} for k, p in enumerate(("p0", "p1", "p2"))])
    buf.append([_row(i, f"p{i % 3}", "human", "human", "passed") for i in range(3)], "human")
    buf.append([_row(10 + i, f"p{i % 3}", "generated", "0", ("passed", "failed")[i % 2]) for i in range(6)], "v0")
    v1 = [_row(20, "p0", "generated", "1", "passed", iteration=1), _row(21, "p0", "generated", "1", iteration=1),
          _row(22, "p0", "generated", "1", "compile_error", iteration=1),
          _row(23, "p1", "generated", "1", iteration=1), _row(24, "p1", "generated", "1", iteration=1),
          _row(25, "p1", "generated", "1", iteration=1),                      # all equal: Â = 0
          _row(26, "p2", "generated", "1", "passed", iteration=1),
          _row(27, "p2", "generated", "1", "runtime_error", iteration=1)]    # a group of 2 (one row lost)
    buf.append(v1, "v1")
    buf.append([_row(30, "p0", "generated", "1", "passed", decoding="greedy", iteration=1),
                _row(31, "p1", "generated", "1", "passed", logprobs=False, iteration=1)], "v1-other")
    return buf


def _read_stage_rows(buf: ReplayBuffer, plan: StagePlan, fingerprint: str | None = None) -> list[dict]:
    """One epoch of the stage's draws: every row its filters select, once (a single stream)."""
    n = buf.read(columns=["sample_id"], filters=plan.rows.filters).num_rows
    sampler = buf.sampler(n, rho_real=plan.rows.rho_real, filters=plan.rows.filters, num_batches=1,
                          targets_fingerprint=fingerprint, extra_columns=("sample_id", "program",
                                                                          *plan.rows.extra_columns))
    return [r for batch in sampler for r in rows_from_batch(batch)]


def test_on_policy_stages_read_exactly_the_current_versions_sampled_rows(tmp_path, ctx):
    buf = _buffer(tmp_path)
    expected = {f"program {i}" for i in range(20, 28)}
    for name in ("ppo", "grpo"):
        (plan,) = _algo(name, ctx).plan_iteration(1, {}, "1")
        assert plan.rows.rho_real is None and plan.skip_if_empty
        got = _read_stage_rows(buf, plan)
        assert {r["program"] for r in got} == expected and len(got) == len(expected)
        assert all(len(r["logprobs"]) == len(r["program_ids"]) for r in got)
        # the same rows as the on-policy predicate of phase 1 over the whole table
        assert set(select_on_policy(buf.read(), "1")["program"].to_pylist()) == expected
        (plan0,) = _algo(name, ctx).plan_iteration(0, {}, "0")
        assert {r["program"] for r in _read_stage_rows(buf, plan0)} == {f"program {i}" for i in range(10, 16)}
    (m_step,) = _algo("rest_em", ctx).plan_iteration(1, {}, "1")
    assert {r["program"] for r in _read_stage_rows(buf, m_step)} == {"program 20", "program 26", "program 31"}
    (mixed,) = _algo("rest_em", ctx, include_human=True).plan_iteration(1, {}, "1")
    assert {r["program"] for r in _read_stage_rows(buf, mixed)} == \
        {"program 20", "program 26", "program 31", "program 0", "program 1", "program 2"}


# ------------------------------------------------------------------------------------------ stage losses
def _hand_batch(stage, n: int = 4):
    """example_rows with the stage's per-token columns: the sampler's log-probs = the policy's own (ratio 1)."""
    rows = example_rows(n)
    with torch.no_grad():
        own = policy_forward(stage.policy, collate(rows, PAD)).logprobs
    for b, row in enumerate(rows):
        t = len(row["program_ids"])
        row["logprobs"] = own[b, :t].tolist()
        row["logp_ckpt"] = (own[b, :t] - 0.1).tolist()        # θ_ckpt a little less likely: k1 = +0.1 per token
        row["v_old"] = [0.0] * t
        row["advantage"] = [(-1.0, 0.5, 0.5, 0.0)[b]] * t
    return collate(rows, PAD, token_columns=("logprobs", "logp_ckpt", "v_old", "advantage"))


def test_ppo_stage_loss_on_a_hand_batch(tmp_path, ctx):
    algo = _algo("ppo", ctx, beta=0.5)
    (plan,) = algo.plan_iteration(0, {}, "0")
    stage = algo.build_stage(plan)
    stage.train()
    assert not stage.policy.lm.training                        # no dropout: ratios against the sampler's log-probs
    batch = _hand_batch(stage)
    loss, metrics = stage(batch)
    assert torch.isfinite(loss) and metrics["clip_fraction"] == 0.0 and abs(metrics["approx_kl"]) < 1e-6
    assert metrics["kl_ckpt"] == pytest.approx(0.1, abs=1e-5)
    loss.backward()
    params = stage.trainable_parameters()
    assert {id(p) for p in stage.value_head.parameters()} <= {id(p) for p in params}
    assert all(p.grad is not None for p in params)
    # saved: a plain LM folder with the value head beside it; the next stage starts from both
    out = str(tmp_path / "ppo-ckpt")
    stage.save(out)
    assert os.path.exists(os.path.join(out, VALUE_HEAD_FILE))
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(out)
    (nxt,) = algo.plan_iteration(1, {"ppo": out}, "1")
    assert nxt.spec["start"] == out and nxt.targets.spec["sampler_dir"] == out
    again = algo.build_stage(nxt)
    torch.testing.assert_close(again.value_head.linear.weight, stage.value_head.linear.weight)
    fp0 = plan.targets.fingerprint
    assert nxt.targets.fingerprint != fp0 and algo.plan_iteration(0, {}, "0")[0].targets.fingerprint == fp0


def test_ppo_targets_are_theta_ckpt_logprobs_and_the_sampling_policys_values(ctx):
    algo = _algo("ppo", ctx)
    (plan,) = algo.plan_iteration(0, {}, "0")
    compute = algo.target_computer(plan.targets)
    batch = collate(example_rows(), PAD)
    values = compute(batch)
    stage = algo.build_stage(plan)                              # θ_old = θ_ckpt with the seeded fresh head
    with torch.no_grad():
        out = policy_forward(stage.policy, batch, value_head=stage.value_head)
    for b, n in enumerate(batch.lengths.tolist()):
        torch.testing.assert_close(torch.tensor(values["logp_ckpt"][b]), out.logprobs[b, :n], **MODEL)
        torch.testing.assert_close(torch.tensor(values["v_old"][b]), out.values[b, :n], **MODEL)


def test_grpo_stage_loss_on_a_hand_batch(ctx):
    algo = _algo("grpo", ctx, kl_estimator="k1", beta=0.5, aggregation="sequence")
    (plan,) = algo.plan_iteration(0, {}, "0")
    stage = algo.build_stage(plan)
    stage.train()
    batch = _hand_batch(stage)
    loss, metrics = stage(batch)
    # ratio 1: the surrogate is -mean_i Â_i; k1 = log π_θ - log p_ckpt = +0.1 on every token
    assert metrics["policy_loss"] == pytest.approx(-np.mean([-1.0, 0.5, 0.5, 0.0]), abs=1e-6)
    assert metrics["kl"] == pytest.approx(0.1, abs=1e-5)
    assert float(loss.detach()) == pytest.approx(metrics["policy_loss"] + 0.5 * 0.1, abs=1e-5)
    loss.backward()
    assert stage.value_head is None and all(p.grad is not None for p in stage.trainable_parameters())


# ------------------------------------------------------------------------------------------ GRPO's groups
def test_group_slices_keep_groups_whole():
    import pyarrow as pa

    table = pa.table({"g": ["b", "a", "b", "c", "a", "b"], "i": [0, 1, 2, 3, 4, 5]})
    pieces = group_slices(table, ("g",), 2)
    assert [p["g"].to_pylist() for p in pieces] == [["a", "a"], ["b", "b", "b"], ["c"]]
    assert [p["g"].to_pylist() for p in group_slices(table, ("g",), 5)] == [["a", "a", "b", "b", "b"], ["c"]]
    with pytest.raises(KeyError, match="lack"):
        group_slices(table, ("problem_id",), 2)


class _InProcessPool:
    """What `rollout.ActorPool.fill_targets` does on its actors, here in the test process."""

    size = 1

    def __init__(self, buf: ReplayBuffer):
        self.buf = buf

    def fill_targets(self, chunks, job):
        computer = TargetComputer(job)
        out = []
        for chunk in chunks:
            table = computer(chunk.table)
            self.buf.write_targets(table, job.targets.fingerprint, batch_key=chunk.key)
            out.append(table.num_rows)
        return out


def test_grpo_group_advantages_through_the_grouped_target_path(tmp_path, ctx):
    buf = _buffer(tmp_path)
    algo = _algo("grpo", ctx)
    (plan,) = algo.plan_iteration(1, {}, "1")
    assert plan.targets.group_by and "reward" in plan.targets.rows.extra_columns
    ref = AlgorithmRef("grpo", algo.config, ctx)
    job = TargetJob(ref, plan.targets, PAD, batch_size=2)        # smaller than a group: groups must not be cut
    assert fill_targets(buf, job, pool=_InProcessPool(buf)) == 8
    assert fill_targets(buf, job, pool=_InProcessPool(buf)) == 0  # cached
    rows = _read_stage_rows(buf, plan, plan.targets.fingerprint)
    adv = {r["program"]: float(r["advantage"][0]) for r in rows}
    assert all(len(set(np.asarray(r["advantage"]).tolist())) == 1 for r in rows)
    by_problem = {"p0": [20, 21, 22], "p1": [23, 24, 25], "p2": [26, 27]}
    reward = {20: 1.0, 21: -0.3, 22: -1.0, 23: -0.3, 24: -0.3, 25: -0.3, 26: 1.0, 27: -0.6}
    for problem, ids in by_problem.items():
        expected = group_advantages(torch.tensor([reward[i] for i in ids]), [problem] * len(ids))
        assert [adv[f"program {i}"] for i in ids] == pytest.approx(expected.tolist(), abs=1e-6)
    assert [adv[f"program {i}"] for i in by_problem["p1"]] == [0.0, 0.0, 0.0]   # all equal: only the KL acts
    r = np.array([1.0, -0.3, -1.0])
    assert adv["program 20"] == pytest.approx((1.0 - r.mean()) / (r.std(ddof=1) + 1e-4), rel=1e-5)
    # logp_ckpt is θ_ckpt's log-probability of each token
    stage = algo.build_stage(plan)
    row = next(r for r in rows if r["program"] == "program 20")
    one = collate([{**row, "is_human": False}], PAD)
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(np.asarray(row["logp_ckpt"]), dtype=torch.float32),
                                   policy_forward(stage.policy, one).logprobs[0], **MODEL)


# ------------------------------------------------------------------------------------------ ReST-EM
def _weights(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def test_rest_em_restarts_from_theta_ckpt_or_continues(tmp_path, ctx):
    from bcoder_ray.model.lm import load_lm

    ckpt = _weights(load_lm(ctx.theta_ckpt))
    last = load_lm(ctx.theta_ckpt)
    perturb(list(last.parameters()))
    last_dir = str(tmp_path / "last-m-step")
    last.save_pretrained(last_dir)
    state = {"rest_em": last_dir}
    restart = _algo("rest_em", ctx)
    (plan,) = restart.plan_iteration(1, state, "1")
    built = _weights(restart.build_stage(plan).policy.lm)
    assert built.keys() == ckpt.keys() and all(torch.equal(built[k], ckpt[k]) for k in ckpt)
    cont = _algo("rest_em", ctx, restart_from_ckpt=False)
    (plan,) = cont.plan_iteration(1, state, "1")
    built = _weights(cont.build_stage(plan).policy.lm)
    trained = _weights(last)
    assert all(torch.equal(built[k], trained[k]) for k in trained)
    assert any(not torch.equal(built[k], ckpt[k]) for k in ckpt)
    # an iteration in which nothing passed: restart publishes θ_ckpt, continue keeps the last policy
    s1, s2 = dict(state), dict(state)
    restart.after_stage(plan, None, 1, s1)
    cont.after_stage(plan, None, 1, s2)
    assert restart.policy(s1) is None and cont.policy(s2) == last_dir


def test_rest_em_stage_trains_on_passing_rows_only(ctx):
    algo = _algo("rest_em", ctx)
    stage = algo.build_stage(algo.plan_iteration(0, {}, "0")[0])
    rows = [dict(r, reward=1.0, is_human=False) for r in example_rows()]
    loss, metrics = stage(collate(rows, PAD))
    assert torch.isfinite(loss) and metrics["n_programs"] == 4.0
    with pytest.raises(ValueError, match="passing"):
        stage(collate(example_rows(), PAD))


# ------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("name", ["ppo", "grpo"])
def test_on_policy_algorithms_refuse_other_rollout_temperatures(name):
    with pytest.raises(ConfigError, match=r"on-policy.*rollout\.temperature.*0\.8"):
        load_config("ci_tiny", ["--algorithm.name", name, "--rollout.temperature", "0.8",
                                "--suite.validation_split", "null"], check_paths=False)
    load_config("ci_tiny", ["--algorithm.name", "rest_em", "--rollout.temperature", "0.8",
                            "--suite.validation_split", "null"], check_paths=False)
