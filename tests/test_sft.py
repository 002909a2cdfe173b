"""The `sft` plug-in (bcoder_ray.algorithms.sft.algorithm), B-Coder's `beta_td`, the human seed's `warm_start`
mode and experiments/compare.py's control presets, in-process (no Ray): the stage's loss against a hand
computation of the CE, the rows it plans (B-Coder's stage θ's) through the real buffer, its published folder,
θ's loss at β_td = 0, the problems the seed selects, the preset specs.

Tolerance ``MODEL``: the stage's CE and the references (a direct log_softmax on unpadded rows, theta_loss's L_ce) run
the same tiny model (d_model 32, V = 48) through different batch shapes; they differ by the summation order of
float32 dot products and logsumexps (~1e-6 on values O(1-10)), so rtol = atol = 1e-5. The β_td checks are exact:
the same forward, and the weighted sum formed from the same float32 values.
"""

from __future__ import annotations


import pytest
import torch

from bcoder_ray.algorithms import make_algorithm
from bcoder_ray.algorithms.base import Rows, RunContext
from bcoder_ray.algorithms.bcoder.algorithm import BCoder, BCoderConfig, QStage
from bcoder_ray.algorithms.bcoder.losses import theta_loss
from bcoder_ray.algorithms.bcoder.q_model import QModel
from bcoder_ray.algorithms.sft.algorithm import SFT, SFTConfig
from bcoder_ray.buffer import ReplayBuffer, rows_from_batch
from bcoder_ray.buffer.human_seed import prompted_problems, seeded_problems
from bcoder_ray.config import ConfigError, load_config
from bcoder_ray.model.batch import collate
from bcoder_ray.model.lm import PolicyLM, load_lm
from envs.result import REWARD, Outcome
from learner_fixtures import KINDS, PAD, direct_logits, example_rows, tiny_checkpoint, tiny_context
from tests.experiment_scripts import load_experiment

torch.set_num_threads(1)
MODEL = dict(rtol=1e-5, atol=1e-5)
TOK_HASH = "tok"


@pytest.fixture(scope="module")
def ctx(tmp_path_factory) -> RunContext:
    return tiny_context(tmp_path_factory.mktemp("sft"))


@pytest.fixture(scope="module", params=KINDS)
def checkpoint(request, tmp_path_factory):
    return tiny_checkpoint(request.param, str(tmp_path_factory.mktemp(request.param)))


def _sft(ctx: RunContext, **config) -> SFT:
    return make_algorithm("sft", {"name": "sft", **config}, ctx)


def _rows() -> list[dict]:
    """example_rows with one passing generated program: 0 human passing (the ground truth), 1 generated failing,
    2 generated passing, 3 human failing."""
    rows = example_rows(4)
    rows[2] = dict(rows[2], reward=REWARD[Outcome.PASSED])
    return rows


def _hand_nll(policy: PolicyLM, row: dict, reduction: str) -> torch.Tensor:
    """Σ_t (or mean_t) -log p(w_t | s_t) of one unpadded row, from a direct log_softmax."""
    program = torch.tensor(row["program_ids"])
    nll = -torch.log_softmax(direct_logits(policy, row).float(), -1).gather(-1, program.unsqueeze(-1)).squeeze(-1)
    return nll.sum() if reduction == "sum" else nll.mean()


# ------------------------------------------------------------------------------------------ the loss
def test_sft_loss_is_the_hand_ce_of_the_passing_rows(checkpoint):
    """The CE on the ground-truth row only; with include_generated on every passing row; failing rows (human or
    generated) never. At θ_ckpt it is B-Coder's L_ce of the same batch (reduction = aux_reduction)."""
    rows = _rows()
    batch = collate(rows, PAD)
    ctx = RunContext(theta_ckpt=checkpoint, tokenizer_path="unused", source_len=16, target_len=16)
    model = QModel.create(checkpoint)
    for reduction in ("sum", "mean"):
        losses = {}
        for include_generated, trained in ((False, [0]), (True, [0, 2])):
            algo = _sft(ctx, reduction=reduction, include_generated=include_generated)
            stage = algo.build_stage(algo.plan_iteration(0, {}, "0")[0])
            with torch.no_grad():
                loss, metrics = stage(batch)
            hand = torch.stack([_hand_nll(stage.policy, rows[i], reduction) for i in trained]).mean()
            torch.testing.assert_close(loss, hand, **MODEL)
            assert metrics["n_programs"] == len(trained) and metrics["n_human"] == 1 and metrics["n_rows"] == 4
            assert metrics["n_tokens"] == sum(len(rows[i]["program_ids"]) for i in trained)
            losses[include_generated] = loss
        with torch.no_grad():
            _, bcoder = theta_loss(model, batch, gamma=1.0, aux_reduction=reduction)
        torch.testing.assert_close(losses[False], torch.tensor(bcoder["l_ce"]), **MODEL)


def test_rest_em_and_sft_share_one_ce(ctx):
    """ReST-EM's M-step loss is the shared CE on every row (its passing-rows check aside): the same as SFT's CE
    selecting every row."""
    from bcoder_ray.algorithms.common import cross_entropy
    from bcoder_ray.algorithms.rest_em.losses import rest_em_loss

    policy = PolicyLM(load_lm(ctx.theta_ckpt))
    batch = collate([dict(r, reward=REWARD[Outcome.PASSED]) for r in example_rows(4)], PAD)
    with torch.no_grad():
        for reduction in ("sum", "mean"):
            loss, metrics = rest_em_loss(policy, batch, reduction=reduction)
            every, same = cross_entropy(policy, batch, rows=torch.ones(4, dtype=torch.bool), reduction=reduction)
            assert torch.equal(loss, every) and metrics == same


def test_a_batch_without_a_passing_row_trains_nothing_and_still_backpropagates(ctx):
    algo = _sft(ctx, include_generated=True)
    stage = algo.build_stage(algo.plan_iteration(0, {}, "0")[0])
    rows = _rows()
    loss, metrics = stage(collate([rows[1], rows[3]], PAD))              # failing generated and failing human
    assert float(loss.detach()) == 0.0 and metrics["n_programs"] == 0.0
    loss.backward()
    grads = [p.grad for p in stage.trainable_parameters()]
    assert all(g is not None for g in grads) and all(float(g.abs().sum()) == 0.0 for g in grads)
    loss, _ = stage(collate(rows, PAD))
    loss.backward()
    assert stage.policy.lm.get_output_embeddings().weight.grad.abs().sum() > 0


def test_options():
    c = SFTConfig()
    assert (c.rho_real, c.include_generated, c.reduction, c.restart_from_ckpt) == (0.5, False, "sum", False)
    assert c.rho_real == BCoderConfig().rho_real and c.reduction == BCoderConfig().aux_reduction
    for bad in ({"rho_real": 1.5}, {"rho_real": -0.1}, {"reduction": "max"}):
        with pytest.raises(ValueError):
            SFTConfig(**bad)
    assert not SFT.on_policy


# ------------------------------------------------------------------------------------------ the rows
def test_sft_plans_the_rows_of_bcoders_theta_stage(ctx):
    for rho in (0.5, 1.0, 0.0):
        (plan,) = _sft(ctx, rho_real=rho).plan_iteration(1, {}, "1")
        theta = [p for p in make_algorithm("bcoder", {"name": "bcoder", "rho_real": rho}, ctx)
                 .plan_iteration(1, {}, "1") if p.name == "theta"][0]
        assert plan.rows == theta.rows == Rows(rho_real=rho)             # ρ_real-mixed, no filter, no extra column
        assert plan.name == "sft" and plan.targets is None
    assert SFT.stage_defaults["sft"] == BCoder.stage_defaults["theta"]
    for name in ("embedded", "ci_tiny", "mbpp", "apps_codet5"):         # the shipped settings: θ's, stage for stage
        sft = load_config(name, ["--algorithm.name", "sft"], check_paths=False).stage("sft")
        theta = load_config(name, ["--algorithm.name", "bcoder"], check_paths=False).stage("theta")
        assert sft == theta, name
    # continues from the last policy (as B-Coder's theta_continue), or restarts from θ_ckpt
    assert _sft(ctx).plan_iteration(2, {"sft": "/last"}, "2")[0].spec["start"] == "/last"
    assert _sft(ctx, restart_from_ckpt=True).plan_iteration(2, {"sft": "/last"}, "2")[0].spec["start"] is None
    assert not _sft(ctx).rollout_request().logprobs and _sft(ctx).ranker({"sft": "/last"}) is None


def _row(i: int, problem: str, source: str, outcome: str) -> dict:
    ids = [2 + (i % 7), 3 + (i % 5), 1]
    return {"tests_hash": f"t{problem}", "suite": "toy", "split": "train", "problem_id": problem, "source": source,
            "iteration": 0, "policy_version": "human" if source == "human" else "0", "program": f"program {i}",
            "program_ids": ids, "tokenizer_hash": TOK_HASH, "outcome": outcome, "reward": REWARD[Outcome(outcome)],
            "decoding": "sample"}


def test_rho_real_mixing_when_the_loops_problems_carry_no_human_program(tmp_path, ctx):
    """`buffer.human_programs: warm_start`: human rows only of the warm start's problems (w*), generated rows only
    of the loop's (l*); every batch the stage reads still holds round(ρ_real·B) human rows."""
    buf = ReplayBuffer(str(tmp_path / "buffer"))
    problems = ("w0", "w1", "w2", "l0", "l1")
    buf.put_prompts([{"suite": "toy", "problem_id": p, "tokenizer_hash": TOK_HASH, "prompt": p,
                      "prompt_ids": [5, 6, 7 + k]} for k, p in enumerate(problems)])
    buf.append([_row(i, f"w{i % 3}", "human", ("passed", "failed")[i % 4 == 3]) for i in range(6)], "human")
    buf.append([_row(10 + i, f"l{i % 2}", "generated", ("passed", "failed")[i % 2]) for i in range(8)], "it0")
    (plan,) = _sft(ctx).plan_iteration(0, {}, "0")
    sampler = buf.sampler(4, rho_real=plan.rows.rho_real, filters=plan.rows.filters, num_batches=5,
                          extra_columns=("source", "problem_id"))
    for table in sampler:
        rows = rows_from_batch(table)
        human = [r for r in rows if r["is_human"]]
        assert len(human) == 2 and {r["problem_id"][0] for r in human} == {"w"}
        assert {r["problem_id"][0] for r in rows if not r["is_human"]} == {"l"}


# ------------------------------------------------------------------------------------------ the policy
def test_sft_publishes_a_plain_hugging_face_folder(tmp_path, ctx):
    from transformers import AutoModelForCausalLM

    algo = _sft(ctx)
    (plan,) = algo.plan_iteration(0, {}, "0")
    stage = algo.build_stage(plan)
    stage.train()
    optimizer = torch.optim.AdamW(stage.trainable_parameters(), lr=1e-2)
    loss, _ = stage(collate(_rows(), PAD))
    loss.backward()
    optimizer.step()
    out = str(tmp_path / "sft-ckpt")
    stage.save(out, algo._tokenizer)
    state: dict = {}
    algo.after_stage(plan, out, 0, state)
    assert algo.policy(state) == out
    loaded = AutoModelForCausalLM.from_pretrained(out)
    trained = stage.policy.lm.state_dict()
    assert all(torch.equal(v, trained[k]) for k, v in loaded.state_dict().items())
    start = load_lm(ctx.theta_ckpt).state_dict()
    assert any(not torch.equal(v, start[k]) for k, v in loaded.state_dict().items())   # it trained


# ------------------------------------------------------------------------------------------ B-Coder's β_td
def test_beta_td_zero_leaves_the_advantage_and_ce_terms_exactly(ctx):
    batch = collate(example_rows(4), PAD)                               # a ground-truth row and three others
    model = QModel.create(ctx.theta_ckpt)
    default, no_td = BCoderConfig(), BCoderConfig(beta_td=0.0)
    assert default.beta_td == 1.0
    loss1, m1 = QStage(model, "theta", default)(batch)
    loss0, m0 = QStage(model, "theta", no_td)(batch)
    assert {k: m0[k] for k in ("l_q", "l_adv", "l_ce")} == {k: m1[k] for k in ("l_q", "l_adv", "l_ce")}
    assert m1["l_q"] > 0 and m1["l_adv"] > 0 and m1["l_ce"] > 0
    t = {k: torch.tensor(m1[k]) for k in ("l_q", "l_adv", "l_ce")}      # float32 values, exactly
    assert torch.equal(loss0.detach(), no_td.beta_adv * t["l_adv"] + no_td.beta_ce * t["l_ce"])
    assert torch.equal(loss1.detach(), t["l_q"] + default.beta_adv * t["l_adv"] + default.beta_ce * t["l_ce"])
    loss0.backward()                                                     # the TD term reaches nothing: h1 learns 0
    assert float(model.theta.h1.weight.grad.abs().sum()) == 0.0
    assert float(model.theta.lm.get_output_embeddings().weight.grad.abs().sum()) > 0
    with pytest.raises(ValueError):
        BCoderConfig(beta_td=-1.0)


# ------------------------------------------------------------------------------------------ the human seed
def test_warm_start_mode_seeds_exactly_the_warm_starts_problems():
    from envs.registry import load_suite

    train = load_suite("embedded", "train")[:10]
    loop, warm = train[:4], train[4:]
    ids = lambda problems: [p.problem_id for p in problems]             # noqa: E731
    assert ids(seeded_problems(loop, warm, "warm_start")) == ids(warm)
    assert ids(seeded_problems(loop, train[2:], "warm_start")) == ids(warm)  # never one of the loop's problems
    assert seeded_problems(train, train, "warm_start") == []             # the warm start learned the loop's too
    assert ids(seeded_problems(loop, warm, "loop")) == ids(loop)         # the other modes as they were
    assert ids(seeded_problems(loop, warm, "train")) == ids(train)
    evaluation = load_suite("embedded", "test")[:2]
    seeded = seeded_problems(loop, warm, "warm_start")
    assert ids(prompted_problems(loop, seeded, evaluation)) == ids(warm) + ids(loop) + ids(evaluation)
    assert ids(prompted_problems(loop, seeded_problems(loop, warm, "train"), evaluation)) == \
        ids(train) + ids(evaluation)                                      # every loop problem's prompt, once


def test_warm_start_mode_needs_problems_the_loop_never_rolls_out_on(tmp_path):
    from bcoder_ray.loop.driver import Run

    cfg = load_config("ci_tiny", ["--buffer.human_programs", "warm_start", "--suite.validation_split", "null"],
                      check_paths=False)
    assert cfg.buffer.human_programs == "warm_start"
    with pytest.raises(ConfigError, match="max_train_problems"):
        load_config("ci_tiny", ["--buffer.human_programs", "warm_start", "--suite.max_train_problems", "null",
                                "--suite.validation_split", "null"], check_paths=False)
    run = Run.__new__(Run)                                               # only its problem lists: no Ray
    run.run_dir = tmp_path                                               # (the contamination report goes here)
    run.cfg = load_config("ci_tiny", ["--buffer.human_programs", "warm_start", "--suite.max_train_problems",
                                      "100000", "--suite.validation_split", "null"], check_paths=False)
    with pytest.raises(ConfigError, match="leaves none of the"):
        run.load_problems()


# ------------------------------------------------------------------------------------------ compare.py presets
def load_compare():
    return load_experiment("compare")


def test_compare_presets():
    compare = load_compare()
    names = ["bcoder", "sft"]
    rho1 = compare.parse_spec("bcoder_rho1", names)
    assert (rho1.label, rho1.name, rho1.overrides, rho1.preset) == \
        ("bcoder_rho1", "bcoder", ["--algorithm.rho_real", "1.0"], "bcoder_rho1")
    no_td = compare.parse_spec("ctl=bcoder_no_td:--algorithm.alpha 0.3", names)
    assert (no_td.label, no_td.name, no_td.overrides) == \
        ("ctl", "bcoder", ["--algorithm.beta_td", "0", "--algorithm.alpha", "0.3"])
    assert load_config("ci_tiny", no_td.overrides, check_paths=False).algorithm.beta_td == 0.0
    assert compare.parse_spec("human_only=bcoder:--algorithm.rho_real 1.0", names).preset is None  # as before
    sft = compare.parse_spec("sft", names)
    assert (sft.label, sft.name, sft.overrides, sft.preset) == ("sft", "sft", [], "sft")

    def steps(spec, config, *common):
        return compare.preset_overrides(spec, config, [*common, "--algorithm.name", spec.name, *spec.overrides], [])

    assert steps(sft, "ci_tiny") == ["--stages.sft.steps", "4"]           # stages.theta.steps of the config
    assert steps(sft, None) == ["--stages.sft.steps", "150"]              # the embedded default
    assert steps(sft, "ci_tiny", "--stages.theta.steps", "9") == ["--stages.sft.steps", "9"]
    assert steps(compare.parse_spec("sft:--stages.sft.steps=3", names), "ci_tiny") == []   # given: kept
    assert steps(rho1, "ci_tiny") == []
    with pytest.raises(compare.ConfigError, match="rows a step"):
        steps(compare.parse_spec("sft:--stages.sft.batch_size_per_worker 4", names), "ci_tiny")
    assert "bcoder_no_td" in compare.presets_help() and "sft" in compare.presets_help()


def test_compare_plans_the_preset_runs(tmp_path):
    """compare.py's planning (no run): each preset's resolved config, beside a plain bcoder."""
    import argparse

    compare = load_compare()
    args = argparse.Namespace(budget=12, probe_problems=3, seed0=0, config="ci_tiny", imports=[])
    common = ["--suite.validation_split", "null", "--stages.theta.steps", "6", "--buffer.human_programs",
              "warm_start"]
    cfgs = {}
    for text in ("bcoder", "bcoder_rho1", "bcoder_no_td", "sft"):
        spec = compare.parse_spec(text, ["bcoder", "sft"])
        job, cfgs[text] = compare.plan_job(spec, 0, {}, common, args, tmp_path / "cmp", {})
        assert job.label == text and job.run_dir.name == f"{text}__seed0"
    assert [cfgs[k].algorithm.name for k in cfgs] == ["bcoder", "bcoder", "bcoder", "sft"]
    assert cfgs["bcoder"].algorithm.rho_real == 0.5 and cfgs["bcoder_rho1"].algorithm.rho_real == 1.0
    assert cfgs["bcoder"].algorithm.beta_td == 1.0 and cfgs["bcoder_no_td"].algorithm.beta_td == 0.0
    assert cfgs["sft"].stage("sft").steps == cfgs["bcoder"].stage("theta").steps == 6
    assert all(c.buffer.human_programs == "warm_start" for c in cfgs.values())
