"""Stage φ and θ losses: cached = live (values and gradients), masking and normalisation, terminal steps, the
conservative vs optimality fixed points on a tiny deterministic MDP, collation and the targets fingerprint."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from bcoder_ray.model.batch import collate
from bcoder_ray.algorithms.bcoder.losses import phi_loss, td_targets, theta_loss
from bcoder_ray.algorithms.bcoder.q_model import QModel
from bcoder_ray.algorithms.bcoder.targets import (NO_ACTION, TARGET_COLUMNS, FrozenTargets, compute_frozen_targets,
                                                  targets_fingerprint)
from learner_fixtures import EOS, FAMILIES, KINDS, PAD, example_rows, perturb, tiny_checkpoint

torch.set_num_threads(1)
GAMMA = 0.9


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    return tiny_checkpoint(request.param, str(tmp_path_factory.mktemp(request.param)))


def _examples():
    return example_rows(4)


def _trained_model(checkpoint):
    model = QModel.create(checkpoint)
    perturb(model.freeze_for_stage("theta"), scale=0.3, seed=5)
    perturb(model.freeze_for_stage("phi"), scale=0.3, seed=6)
    return model


def _as_stored(rows):
    """What the replay buffer gives back: int32 / float32 lists."""
    return [{"target_actions": np.asarray(r["target_actions"], np.int32).tolist(),
             "a_ckpt": np.asarray(r["a_ckpt"], np.float32).tolist(),
             "v_phi": np.asarray(r["v_phi"], np.float32).tolist()} for r in rows]


def _loss_and_grads(model, params, fn, batch):
    for p in params:
        p.grad = None
    loss, metrics = fn(model, batch)
    loss.backward()
    return loss.detach(), [p.grad.clone() for p in params], metrics


@pytest.mark.parametrize("stage,operator", [("phi", None), ("theta", "conservative"), ("theta", "optimality")])
def test_cached_targets_give_the_live_loss_and_gradients(checkpoint, stage, operator):
    model = _trained_model(checkpoint)
    live = collate(_examples(), PAD)
    stored = _as_stored(compute_frozen_targets(model, live))
    for row, ex in zip(stored, _examples()):
        assert all(len(v) == len(ex["program_ids"]) for v in row.values())
        assert row["target_actions"][-1] == NO_ACTION and max(row["a_ckpt"]) <= 0
    cached = collate([{**ex, **row} for ex, row in zip(_examples(), stored)], PAD, token_columns=TARGET_COLUMNS)
    view = FrozenTargets.cached(cached)
    assert view.target_actions.dtype == torch.long and view.v_phi is not None
    live_targets = FrozenTargets.cached(live)
    assert live_targets.target_actions is None and live_targets.a_ckpt is None

    params = model.freeze_for_stage(stage)
    if stage == "phi":
        fn = lambda m, b: phi_loss(m, b, gamma=GAMMA)  # noqa: E731
    else:
        fn = lambda m, b: theta_loss(m, b, gamma=GAMMA, operator=operator)  # noqa: E731
    loss_live, grads_live, metrics_live = _loss_and_grads(model, params, fn, live)
    loss_cached, grads_cached, metrics_cached = _loss_and_grads(model, params, fn, cached)
    # Live and cached targets differ only by float32 rounding (eps = 2**-23), accumulated over the sums a value
    # passes through: the batch's tokens (4 rows of <= 10 positions), per layer (2), forward and backward, the
    # d_ff (64), d_model (32) and attention (<= 10 positions) sums, and the vocabulary's softmax (48). Bounds
    # relative to each tensor's scale, since cancellation can leave entries near zero.
    tol = (40 + 2 * 2 * (64 + 32 + 10) + 48) * torch.finfo(torch.float32).eps
    assert torch.allclose(loss_live, loss_cached, rtol=tol, atol=tol * float(loss_live.abs()))
    for g_live, g_cached in zip(grads_live, grads_cached):
        assert torch.allclose(g_live, g_cached, rtol=tol, atol=tol * float(g_live.abs().max()))
    assert metrics_live.keys() == metrics_cached.keys()
    assert any(g.abs().sum() > 0 for g in grads_live)

    # stage θ with cached targets needs neither θ_ckpt nor φ on the device
    if stage == "theta":
        model.ckpt = model.phi = None
        loss_alone, grads_alone, _ = _loss_and_grads(model, params, fn, cached)
        assert torch.allclose(loss_alone, loss_cached) and all(
            torch.allclose(a, b) for a, b in zip(grads_alone, grads_cached))


@pytest.mark.parametrize("stage", ["phi", "theta"])
def test_padding_is_masked_and_each_program_weighs_the_same(checkpoint, stage):
    """The batch loss is the mean of per-program token means: padding changes nothing."""
    model = _trained_model(checkpoint)
    model.freeze_for_stage(stage)
    fn = phi_loss if stage == "phi" else theta_loss
    kwargs = {} if stage == "phi" else {"beta_adv": 0.0, "beta_ce": 0.0}
    whole, _ = fn(model, collate(_examples(), PAD), gamma=GAMMA, **kwargs)
    alone = [fn(model, collate([ex], PAD), gamma=GAMMA, **kwargs)[0] for ex in _examples()]
    assert torch.allclose(whole, torch.stack(alone).mean(), rtol=1e-5)


def test_terminal_step_bootstraps_nothing():
    batch = collate([{"prompt_ids": [3], "program_ids": [4, 5, EOS], "reward": 0.7, "is_human": False},
                     {"prompt_ids": [3], "program_ids": [EOS], "reward": -1.0, "is_human": False}], PAD)
    next_values = torch.tensor([[10.0, 20.0, 30.0], [40.0, 50.0, 60.0]])
    y = td_targets(next_values, batch, gamma=0.5)
    assert y[0].tolist() == [10.0, 15.0, pytest.approx(0.7)]   # γ·V(s_{t+1}), then r_T alone
    assert y[1, 0] == -1.0                                     # a one-token program is terminal at once


def test_auxiliary_losses_use_ground_truth_programs_only(checkpoint):
    """L_adv and L_ce read human programs that pass their tests: generated rows and failing human programs
    (row 3 of the examples: a human program whose stored text is a runtime error) contribute nothing."""
    model = _trained_model(checkpoint)
    model.freeze_for_stage("theta")
    generated = [dict(ex, is_human=False) for ex in _examples()]
    _, metrics = theta_loss(model, collate(generated, PAD), gamma=GAMMA)
    assert metrics["l_adv"] == 0.0 and metrics["l_ce"] == 0.0 and metrics["n_human"] == 0
    failing_humans = [dict(ex, reward=-0.3) if ex["is_human"] else ex for ex in _examples()]
    _, metrics = theta_loss(model, collate(failing_humans, PAD), gamma=GAMMA)
    assert metrics["l_adv"] == 0.0 and metrics["l_ce"] == 0.0 and metrics["n_human"] == 0

    batch = collate(_examples(), PAD)
    _, summed = theta_loss(model, batch, gamma=GAMMA, aux_reduction="sum")
    _, meaned = theta_loss(model, batch, gamma=GAMMA, aux_reduction="mean")
    with torch.no_grad():
        encoded = model.encode(batch)
        out = model.theta_outputs(batch, encoded, model.phi_raw_values(batch, encoded))
        q_all = model.alpha * (out.logits - out.max_logit.unsqueeze(-1)) + out.value.unsqueeze(-1)
        log_pi = (q_all / model.alpha).log_softmax(-1)           # π_θ = softmax(Q_θ/α)
    sums, means, adv_sums = [], [], []
    assert batch.ground_truth.tolist() == [True, False, False, False]
    for b in torch.nonzero(batch.ground_truth).flatten().tolist():
        n = int(batch.lengths[b])
        nll = -log_pi[b, torch.arange(n), batch.program_ids[b, :n]]
        sums.append(float(nll.sum()))
        means.append(float(nll.mean()))
        adv_sums.append(float(out.advantage[b, :n].abs().sum()))
    assert summed["l_ce"] == pytest.approx(np.mean(sums), rel=1e-4)
    assert meaned["l_ce"] == pytest.approx(np.mean(means), rel=1e-4)
    assert summed["l_adv"] == pytest.approx(np.mean(adv_sums), rel=1e-4)
    loss, m = theta_loss(model, batch, gamma=GAMMA, beta_adv=0.3, beta_ce=0.2)
    assert float(loss.detach()) == pytest.approx(m["l_q"] + 0.3 * m["l_adv"] + 0.2 * m["l_ce"], rel=1e-5)


# ------------------------------------------------------------------------------------------ tiny MDP
def _tiny_mdp(kind, directory):
    """Vocabulary {0: EOS, 1: A, 2: B}; programs of at most 2 tokens: every state-action pair is in the data.

    The checkpoint's greedy action after the first token is the worst one, so the conservative operator (which
    bootstraps with the greedy action) and the optimality operator (max) disagree on Q(s_0, A) and Q(s_0, B)."""
    ckpt = tiny_checkpoint(kind, directory, vocab_size=3, eos=0, pad=0, seed=3)
    model = QModel.create(ckpt, alpha=1.0)
    prompt = [1]
    programs = [[0]] + [[x, a] for x in (1, 2) for a in (0, 1, 2)]
    probe = collate([{"prompt_ids": prompt, "program_ids": [x, 0], "reward": 0.0, "is_human": False}
                     for x in (1, 2)], 0)
    greedy = {x: row["target_actions"][0] for x, row in zip((1, 2), compute_frozen_targets(model, probe))}
    reward = {(0,): -1.0}
    for x, (bad, best, middle) in zip((1, 2), [(-0.6, 0.5, 0.2), (-0.3, 0.8, 0.1)]):
        others = [a for a in (0, 1, 2) if a != greedy[x]]
        reward[(x, greedy[x])], reward[(x, others[0])], reward[(x, others[1])] = bad, best, middle
    examples = [{"prompt_ids": prompt, "program_ids": w, "reward": reward[tuple(w)], "is_human": False}
                for w in programs]
    batch = collate(examples, 0)
    batch = collate([{**ex, **row} for ex, row in zip(examples, compute_frozen_targets(model, batch))], 0,
                    token_columns=TARGET_COLUMNS)
    return model, batch, reward, greedy


@pytest.mark.parametrize("kind,operator", list(itertools.product(KINDS, ["conservative", "optimality"])))
def test_tiny_mdp_reaches_the_fixed_point_of_its_operator(kind, operator, tmp_path):
    gamma = 0.9
    model, batch, reward, greedy = _tiny_mdp(kind, str(tmp_path))
    model.ckpt = model.phi = None                       # cached targets: θ alone
    params = model.freeze_for_stage("theta")
    steps = 500
    optimiser = torch.optim.Adam(params, lr=3e-3)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimiser, lambda i: 1 - i / steps)
    model.train()
    for _ in range(steps):
        optimiser.zero_grad()
        loss, metrics = theta_loss(model, batch, gamma=gamma, beta_adv=0.0, beta_ce=0.0, operator=operator)
        loss.backward()
        optimiser.step()
        schedule.step()
    assert metrics["l_q"] < 1e-4
    model.eval()
    with torch.no_grad():
        out = model.theta_outputs(batch, model.encode(batch), FrozenTargets.cached(batch).v_phi)
    q = {tuple(w[: t + 1]): float(out.q[b, t]) for b, w in enumerate(batch.program_ids.tolist())
         for t in range(int(batch.lengths[b]))}
    for x in (1, 2):
        for a in (0, 1, 2):
            assert q[(x, a)] == pytest.approx(reward[(x, a)], abs=0.03)       # terminal: Q = r
        conservative = gamma * reward[(x, greedy[x])]                            # eq. 14 fixed point
        optimal = gamma * max(reward[(x, a)] for a in (0, 1, 2))                 # eq. 13 fixed point
        expected, other = (conservative, optimal) if operator == "conservative" else (optimal, conservative)
        assert q[(x,)] == pytest.approx(expected, abs=0.03)
        assert abs(q[(x,)] - other) > 0.5
    assert q[(0,)] == pytest.approx(-1.0, abs=0.03)


# ------------------------------------------------------------------------------------------ collate
def test_collate_pads_prompts_left_and_programs_right():
    batch = collate([{"prompt_ids": [5, 6], "program_ids": [7, EOS], "reward": 1, "source": "human"},
                     {"prompt_ids": [8], "program_ids": [9, 10, 11], "reward": -0.3, "is_human": False}], PAD)
    assert batch.prompt_ids.tolist() == [[5, 6], [PAD, 8]] and batch.prompt_mask.tolist() == [[1, 1], [0, 1]]
    assert batch.program_ids.tolist() == [[7, EOS, PAD], [9, 10, 11]]
    assert batch.lengths.tolist() == [2, 3] and batch.is_human.tolist() == [True, False]
    assert batch.tokens == {} and batch.reward.dtype == torch.float32


def test_collate_names_the_bad_row():
    good = {"prompt_ids": [5], "program_ids": [7, EOS], "reward": 1.0, "is_human": True}
    bad = dict(good, sample_id="s-42", a_ckpt=[0.0])
    with pytest.raises(ValueError, match=r"example 1 \(sample_id s-42\).*a_ckpt"):
        collate([dict(good, a_ckpt=[0.0, 0.0]), bad], PAD, token_columns=("a_ckpt",))
    with pytest.raises(KeyError, match="example 0.*reward"):
        collate([{"prompt_ids": [5], "program_ids": [7]}], PAD)
    with pytest.raises(KeyError, match="example 1.*a_ckpt"):      # a batch is all-cached or all-live
        collate([dict(good, a_ckpt=[0.0, -1.0]), good], PAD, token_columns=("a_ckpt",))
    assert FrozenTargets.cached(collate([dict(good, a_ckpt=[0.0, -1.0]), good], PAD)).a_ckpt is None


def test_collate_keeps_int_columns_int_and_the_view_marks_padding():
    rows = [{"prompt_ids": [5], "program_ids": [7, 8, EOS], "reward": 1.0, "is_human": True,
             "target_actions": [8, 9, NO_ACTION], "a_ckpt": [0.0, -0.5, 0.0]},
            {"prompt_ids": [5], "program_ids": [7, EOS], "reward": -1.0, "is_human": False,
             "target_actions": [3, NO_ACTION], "a_ckpt": [-1.0, 0.0]}]
    batch = collate(rows, PAD, token_columns=("target_actions", "a_ckpt"))
    assert batch.tokens["target_actions"].dtype == torch.long and batch.tokens["a_ckpt"].dtype == torch.float32
    view = FrozenTargets.cached(batch)
    assert view.target_actions.tolist() == [[8, 9, NO_ACTION], [3, NO_ACTION, NO_ACTION]]  # padding: no action
    assert view.a_ckpt.tolist() == [[0.0, -0.5, 0.0], [-1.0, 0.0, 0.0]] and view.v_phi is None


# ------------------------------------------------------------------------------------------ fingerprint
def _tokenizer(extra: str = ""):
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "def": 3, "f": 4}
    if extra:
        vocab[extra] = len(vocab)
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")


def test_targets_fingerprint_tracks_everything_targets_depend_on(tmp_path):
    ckpt_a = tiny_checkpoint("decoder-only", str(tmp_path / "a"), seed=0)
    ckpt_b = tiny_checkpoint("decoder-only", str(tmp_path / "b"), seed=1)
    base = dict(max_prompt_len=600, max_program_len=512, alpha=1.0)
    ref = targets_fingerprint(ckpt_a, _tokenizer(), **base)
    assert ref == targets_fingerprint(ckpt_a, _tokenizer(), **base)
    variants = [targets_fingerprint(ckpt_b, _tokenizer(), **base),
                targets_fingerprint(ckpt_a, _tokenizer("return"), **base),
                targets_fingerprint(ckpt_a, _tokenizer(), **dict(base, max_prompt_len=500)),
                targets_fingerprint(ckpt_a, _tokenizer(), **dict(base, max_program_len=256)),
                targets_fingerprint(ckpt_a, _tokenizer(), **dict(base, alpha=0.5)),
                targets_fingerprint(ckpt_a, _tokenizer(), phi_checkpoint=ckpt_b, **base),
                targets_fingerprint(ckpt_a, _tokenizer(), prompt_format="v2", **base),
                targets_fingerprint(ckpt_a, _tokenizer(), dtype="bfloat16", **base)]
    assert ref not in variants and len(set(variants)) == len(variants)


def test_targets_from_buffer_rows_equal_targets_from_a_batch(checkpoint):
    model = _trained_model(checkpoint)
    assert compute_frozen_targets(model, _examples()) == compute_frozen_targets(model, collate(_examples(), PAD))


@pytest.mark.parametrize("kind", FAMILIES)
def test_the_bootstrap_of_a_network_with_dropout_is_read_without_it(kind, tmp_path):
    """With dropout in the trained network, the TD targets (eq. 12 / 15) come from a no-grad eval-mode forward:
    the same whatever the dropout draw, and equal to an eval-mode loss's; the prediction keeps its dropout. With
    `dropout_free_targets=False` the targets move with the draw. Every module's mode is as it was after."""
    from bcoder_ray.model.lm import has_dropout

    ckpt = tiny_checkpoint(kind, str(tmp_path / kind), dropout=0.3)
    assert has_dropout(QModel.create(ckpt, parts=("theta",)).theta)
    assert not has_dropout(QModel.create(tiny_checkpoint(kind, str(tmp_path / "plain")), parts=("theta",)).theta)
    model = _trained_model(ckpt)
    live = collate(_examples(), PAD)
    batch = collate([{**ex, **row} for ex, row in zip(_examples(), compute_frozen_targets(model, live))], PAD)
    losses = {"phi": lambda m, **kw: phi_loss(m, batch, gamma=GAMMA, **kw),
              "theta": lambda m, **kw: theta_loss(m, batch, gamma=GAMMA, **kw)}
    for stage, loss_fn in losses.items():
        model.freeze_for_stage(stage)
        model.train(False)
        _, reference = loss_fn(model)
        model.train(True)
        modes = [m.training for m in model.modules()]
        runs = {}
        for free in (True, False):
            for seed in (1, 2):
                torch.manual_seed(seed)
                runs[free, seed] = loss_fn(model, dropout_free_targets=free)
        assert [m.training for m in model.modules()] == modes
        loss_key = "l_v" if stage == "phi" else "l_q"
        assert runs[True, 1][1][loss_key] != runs[True, 2][1][loss_key]  # the prediction has dropout
        assert runs[True, 1][1]["target_mean"] == runs[True, 2][1]["target_mean"]
        # the eval-mode loss reads its targets from the forward with gradient: the same values, up to float32
        # rounding of another kernel path
        assert runs[True, 1][1]["target_mean"] == pytest.approx(reference["target_mean"], rel=1e-5)
        assert runs[False, 1][1]["target_mean"] != runs[False, 2][1]["target_mean"]
