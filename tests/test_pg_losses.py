"""PPO / GRPO loss math (bcoder_ray.algorithms.policy_gradient.losses) against hand computations, and the policy's
forward (bcoder_ray.algorithms.common.policy_forward) against a direct log_softmax.

Tolerances
----------
- ``HAND``: every hand value below is a combination of at most ~10 float32 operations on O(1) inputs (|x| ≤ 2);
  each rounding is ≤ 2^-24 ≈ 6e-8 of an intermediate ≤ 2 (exp/log in torch are within ~1 ulp), so the absolute
  error is ≤ 10·2·6e-8 ≈ 1.2e-6: atol 2e-6, and rtol 1e-5 (> 10 roundings of 6e-8 relative) for larger values.
- ``MODEL``: log-probs of the tiny (d_model 32, 2-layer, V = 48) model computed two ways (a padded batch through
  ``PolicyLM.states`` vs one unpadded row through the HF forward) differ only by the summation order of length-32
  dot products, layer norms and a 48-way logsumexp: ~sqrt(32)·6e-8·|activation| per product over ~10 sequential
  sub-layers with activations O(1-10) is ~1e-6; 1e-5 bounds it with margin.
- ``GRAD``: the same KL gradient reached through two autograd graphs that differ by an exactly-zero policy term;
  the values agree to a few float32 roundings of the gradient's magnitude: rtol 1e-5, atol 1e-6·max|g|.
"""

from __future__ import annotations

import math

import pytest
import torch

from bcoder_ray.algorithms.common import ValueHead, policy_forward
from bcoder_ray.algorithms.policy_gradient.config import GRPOConfig, PPOConfig
from bcoder_ray.algorithms.policy_gradient.losses import (aggregate, clipped_surrogate, gae, group_advantages,
                                                          grpo_loss, kl_per_token, per_token_column, ppo_advantages,
                                                          ppo_loss, ppo_token_rewards, value_loss, whiten)
from bcoder_ray.model.batch import collate
from bcoder_ray.model.lm import DECODER_ONLY, PolicyLM, load_lm
from learner_fixtures import KINDS, PAD, direct_logits, example_rows, perturb, tiny_checkpoint

torch.set_num_threads(1)
HAND = dict(rtol=1e-5, atol=2e-6)
MODEL = dict(rtol=1e-5, atol=1e-5)


def _close(actual, expected, tol=HAND):
    torch.testing.assert_close(torch.as_tensor(actual, dtype=torch.float32),
                               torch.as_tensor(expected, dtype=torch.float32), **tol)


@pytest.fixture(scope="module", params=KINDS)
def checkpoint(request, tmp_path_factory):
    return tiny_checkpoint(request.param, str(tmp_path_factory.mktemp(request.param)))


@pytest.fixture(scope="module")
def gpt2_checkpoint(tmp_path_factory):
    return tiny_checkpoint(DECODER_ONLY, str(tmp_path_factory.mktemp("gpt2")))


def _policy(path: str, trainable: bool = False) -> PolicyLM:
    lm = load_lm(path)
    lm.requires_grad_(trainable)
    return PolicyLM(lm)


# ---------------------------------------------------------------------------------------------- log-probs
def _direct_logprobs(policy: PolicyLM, row: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """log p(w_t | prompt, w_<t) and the entropy per program token, from the HF model's own forward on one
    unpadded row, through log_softmax (independent of PolicyLM.states / token_logit_stats)."""
    program = torch.tensor(row["program_ids"])
    logp_all = torch.log_softmax(direct_logits(policy, row).float(), -1)
    taken = logp_all.gather(-1, program.unsqueeze(-1)).squeeze(-1)
    entropy = -(logp_all.exp() * logp_all).sum(-1)
    return taken, entropy


def test_taken_logprobs_match_log_softmax(checkpoint):
    policy = _policy(checkpoint)
    rows = example_rows(4)                                   # unequal prompt and program lengths: both paddings
    batch = collate(rows, PAD)
    with torch.no_grad():
        out = policy_forward(policy, batch, with_entropy=True)
    for i, row in enumerate(rows):
        n = len(row["program_ids"])
        taken, entropy = _direct_logprobs(policy, row)
        _close(out.logprobs[i, :n], taken, MODEL)
        _close(out.entropy[i, :n], entropy, MODEL)
        assert (out.logprobs[i, n:] == 0).all() and (out.entropy[i, n:] == 0).all()   # padding masked
    assert (out.logprobs[batch.program_mask.bool()] < 0).all()
    assert out.values is None


def test_values_come_from_the_same_forward(checkpoint):
    policy = _policy(checkpoint)
    head = ValueHead.for_policy(policy, seed=3)
    batch = collate(example_rows(4), PAD)
    calls = []
    hook = policy.body.register_forward_hook(lambda *_: calls.append(1))
    try:
        out = policy_forward(policy, batch, value_head=head)
    finally:
        hook.remove()
    assert len(calls) == 1                                   # one pass of the decoder for log-probs and values
    with torch.no_grad():
        expected = head(policy.states(batch, policy.encode(batch.prompt_ids, batch.prompt_mask)))
    mask = batch.program_mask.bool()
    _close(out.values[mask], expected[mask], MODEL)
    assert (out.values[~mask] == 0).all()
    out.values.sum().backward()
    assert head.linear.weight.grad is not None and head.linear.weight.grad.abs().sum() > 0


def test_per_token_column_pads_and_names_the_bad_row():
    rows = example_rows(2)                                   # programs of 5 and 2 tokens
    batch = collate(rows, PAD)
    col = per_token_column([[-0.5] * 5, [-1.0, -2.0]], batch, "logprobs")
    assert col.tolist() == [[-0.5] * 5, [-1.0, -2.0, 0.0, 0.0, 0.0]]
    with pytest.raises(ValueError, match="row 1 has 3 entries, its program has 2"):
        per_token_column([[-0.5] * 5, [-1.0, -2.0, -3.0]], batch, "logprobs")
    with pytest.raises(ValueError, match="row 0 has none"):
        per_token_column([None, [-1.0, -2.0]], batch, "logprobs")


# ---------------------------------------------------------------------------------------------- KL
def test_kl_estimators_hand_values():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -1.0]])
    _close(kl_per_token(logp, ref, "k1"), [[0.5, -1.0]])                     # logp - ref
    # k3 = e^d - d - 1 with d = ref - logp = (-0.5, 1.0): e^-0.5 + 0.5 - 1, e - 2
    _close(kl_per_token(logp, ref, "k3"), [[0.10653066, 0.71828183]])
    # as GRPO's loss term with Â = 0: β·token-mean(k3) = 0.5 · (0.10653066 + 0.71828183) / 2
    mask = torch.ones(1, 2)
    loss, metrics = grpo_loss(logp, logp, ref, torch.zeros(1), mask,
                              GRPOConfig(beta=0.5, kl_estimator="k3", aggregation="token"))
    _close(loss, 0.20620312)
    _close(metrics["kl"], 0.41240625)
    with pytest.raises(ValueError, match="estimator"):
        kl_per_token(logp, ref, "k2")


def test_ppo_token_rewards_kl_penalty_hand_values():
    old = torch.tensor([[-1.0, -2.0, -0.5], [-0.7, -0.1, 0.0]])
    ref = torch.tensor([[-1.2, -1.5, -0.5], [-0.2, -0.4, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    reward = torch.tensor([1.0, -0.3])
    # k1 = old - ref = (0.2, -0.5, 0) and (-0.5, 0.3); r_t = -β k1 (β = 0.5), + r_b at the last valid token
    expected = [[-0.1, 0.25, 1.0], [0.25, -0.15 - 0.3, 0.0]]
    _close(ppo_token_rewards(old, ref, reward, mask, beta=0.5), expected)


# ---------------------------------------------------------------------------------------------- GAE, whitening
def test_gae_hand_values():
    rewards = torch.tensor([[0.1, -0.2, 1.0], [0.0, 0.5, 7.0]])     # 7.0 and 99.0 sit in padding: ignored
    values = torch.tensor([[0.5, 0.4, 0.3], [0.2, 0.1, 99.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv, ret = gae(rewards, values, mask, gamma=0.9, lam=0.8)
    # row 0, γλ = 0.72; V after the last token is 0:
    #   δ2 = 1.0 - 0.3 = 0.7;  δ1 = -0.2 + 0.9·0.3 - 0.4 = -0.33;  δ0 = 0.1 + 0.9·0.4 - 0.5 = -0.04
    #   Â2 = 0.7;  Â1 = -0.33 + 0.72·0.7 = 0.174;  Â0 = -0.04 + 0.72·0.174 = 0.08528
    # row 1 (length 2): δ1 = 0.5 - 0.1 = 0.4;  δ0 = 0 + 0.9·0.1 - 0.2 = -0.11;  Â0 = -0.11 + 0.72·0.4 = 0.178
    _close(adv, [[0.08528, 0.174, 0.7], [0.178, 0.4, 0.0]])
    _close(ret, [[0.58528, 0.574, 1.0], [0.378, 0.5, 0.0]])             # R = Â + V
    adv1, _ = gae(rewards, values, mask, gamma=1.0, lam=1.0)            # γ = λ = 1: Monte Carlo return - V
    _close(adv1[0], [0.9 - 0.5, 0.8 - 0.4, 1.0 - 0.3])


def test_whiten_over_valid_tokens():
    x = torch.tensor([[1.0, 2.0, 3.0], [4.0, 50.0, 60.0]])
    mask = torch.tensor([[1, 1, 1], [1, 0, 0]])
    w = whiten(x, mask, eps=0.0)
    # mean 2.5, population variance (2.25 + 0.25 + 0.25 + 2.25) / 4 = 1.25
    s = math.sqrt(1.25)
    _close(w, [[-1.5 / s, -0.5 / s, 0.5 / s], [1.5 / s, 0.0, 0.0]])


# ---------------------------------------------------------------------------------------------- PPO-clip
def _clip_case():
    old = torch.tensor([[-1.0, -2.0], [-0.5, -3.0]])
    ratio = torch.tensor([[1.5, 0.5], [1.1, 9.0]])                      # 9.0 in padding: must not count
    logp = (old + ratio.log()).requires_grad_(True)
    adv = torch.tensor([[1.0, -2.0], [-1.0, 5.0]])
    mask = torch.tensor([[1, 1], [1, 0]])
    return logp, old, adv, mask


def test_ppo_clipped_objective_hand_values():
    logp, old, adv, mask = _clip_case()
    loss, metrics = clipped_surrogate(logp, old, adv, mask, clip_low=0.2, clip_high=0.3, aggregation="token")
    # token (0,0): ρÂ = 1.5, clip(1.5, 0.8, 1.3)·Â = 1.3       -> min 1.3  (clipped above, ε_high)
    # token (0,1): ρÂ = -1.0, clip(0.5, 0.8, 1.3)·Â = -1.6     -> min -1.6 (clipped below, ε_low)
    # token (1,0): ρÂ = -1.1, clip(1.1)·Â = -1.1               -> min -1.1 (inside the range)
    # L = -(1.3 - 1.6 - 1.1) / 3 = 1.4 / 3
    _close(loss, 1.4 / 3)
    _close(metrics["clip_fraction"], 2 / 3)
    # approx KL = mean((ρ-1) - ln ρ) = ((0.5 - ln 1.5) + (-0.5 - ln 0.5) + (0.1 - ln 1.1)) / 3
    _close(metrics["approx_kl"], (0.0945349 + 0.1931472 + 0.0046898) / 3)
    loss.backward()
    # only the unclipped token has gradient: ∂/∂logp (-ρÂ/3) = -ρÂ/3 = 1.1/3
    _close(logp.grad, [[0.0, 0.0], [1.1 / 3, 0.0]])
    seq, _ = clipped_surrogate(logp, old, adv, mask, clip_low=0.2, clip_high=0.3, aggregation="sequence")
    _close(seq, ((-1.3 + 1.6) / 2 + 1.1) / 2)                           # per sequence, then over sequences


def test_value_loss_clipped_hand_values():
    v = torch.tensor([[0.5, 0.5]])
    old = torch.tensor([[0.2, 0.2]])
    ret = torch.tensor([[0.0, 1.0]])
    mask = torch.ones(1, 2)
    # unclipped (V - R)² = (0.25, 0.25); V clipped to 0.2 ± 0.2 = 0.4: (0.16, 0.36); max = (0.25, 0.36)
    loss, metrics = value_loss(v, old, ret, mask, clip=0.2)
    _close(loss, 0.5 * (0.25 + 0.36) / 2)
    _close(metrics["value_clip_fraction"], 0.5)
    loss_u, _ = value_loss(v, old, ret, mask, clip=None)
    _close(loss_u, 0.5 * 0.25)


def test_ratio_one_gives_minus_mean_advantage():
    logp = torch.tensor([[-1.0, -2.0, -0.3], [-0.4, -0.9, 0.0]])
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    adv = torch.tensor([[0.3, -1.2, 2.0], [0.7, -0.1, 4.0]])
    loss, metrics = clipped_surrogate(logp, logp.clone(), adv, mask, 0.2, 0.2)
    _close(loss, -(0.3 - 1.2 + 2.0 + 0.7 - 0.1) / 5)                    # -mean Â over the 5 valid tokens
    assert metrics["clip_fraction"] == 0.0 and metrics["ratio_mean"] == 1.0
    g, _ = grpo_loss(logp, logp.clone(), logp.clone(), torch.tensor([0.5, -2.0]), mask,
                     GRPOConfig(beta=0.1, aggregation="token"))
    _close(g, -(0.5 * 3 - 2.0 * 2) / 5)                                  # KL to itself is 0


def test_ppo_loss_on_tiny_gpt2(gpt2_checkpoint):
    policy = _policy(gpt2_checkpoint, trainable=True)
    head = ValueHead.for_policy(policy)
    ref_policy = _policy(gpt2_checkpoint)
    perturb(ref_policy.parameters(), scale=0.05)
    batch = collate(example_rows(4), PAD)
    mask = batch.program_mask
    with torch.no_grad():
        sampled = policy_forward(policy, batch, value_head=head)
        ref = policy_forward(ref_policy, batch).logprobs
    opts = PPOConfig(beta=0.1, entropy_coef=0.01)
    adv, ret, rewards = ppo_advantages(sampled.logprobs, ref, sampled.values, batch.reward, mask, opts)
    _close(rewards.sum(1), batch.reward - 0.1 * ((sampled.logprobs - ref) * mask).sum(1))
    out = policy_forward(policy, batch, value_head=head, with_entropy=True)
    loss, metrics = ppo_loss(out, sampled.logprobs, sampled.values, adv, ret, mask, opts)
    # θ = θ_old: ρ = 1, the policy term is -mean Â = 0 after whitening (mean 0 over the valid tokens)
    assert abs(metrics["policy_loss"]) < 1e-6 and metrics["clip_fraction"] == 0.0
    loss.backward()
    assert head.linear.weight.grad.abs().sum() > 0
    assert all(torch.isfinite(p.grad).all() for p in policy.parameters() if p.grad is not None)
    with pytest.raises(ValueError, match="outputs.values is None"):
        ppo_loss(policy_forward(policy, batch), sampled.logprobs, sampled.values, adv, ret, mask, opts)


# ---------------------------------------------------------------------------------------------- GRPO
def test_group_advantages_formula():
    rewards = torch.tensor([1.0, -0.3, -1.0, -0.3, -0.3, 1.0, 1.0, -1.0])
    keys = ["a", "a", "b", "b", "a", "c", "d", "d"]
    # group a = (1.0, -0.3, -0.3): mean 0.4/3, deviations (2.6/3, -1.3/3, -1.3/3), sample variance
    #   ((2.6² + 2·1.3²)/9) / 2 = 10.14/18; group b = (-1.0, -0.3): mean -0.65, dev ∓0.35, variance 0.245
    # group c = (1.0): a group of one -> 0; group d = (1.0, -1.0): mean 0, variance 2
    eps = 1e-4
    sa, sb, sd = math.sqrt(10.14 / 18), math.sqrt(0.245), math.sqrt(2.0)
    expected = [2.6 / 3 / (sa + eps), -1.3 / 3 / (sa + eps), -0.35 / (sb + eps), 0.35 / (sb + eps),
                -1.3 / 3 / (sa + eps), 0.0, 1 / (sd + eps), -1 / (sd + eps)]
    _close(group_advantages(rewards, keys, eps=eps), expected)
    # std normalisation off: r_i - mean(r_group)
    _close(group_advantages(rewards, keys, normalize_std=False),
           [2.6 / 3, -1.3 / 3, -0.35, 0.35, -1.3 / 3, 0.0, 1.0, -1.0])


def test_group_advantages_equal_rewards_and_lost_rows_are_zero():
    # six equal rewards: the float32 sum of six -0.3 divided by 6 is off from -0.3 by an ulp (3e-8), so without
    # the all-equal rule r_i - mean would be ±3e-8, not 0; a group reduced to one row (p2) is 0 as well
    rewards = torch.tensor([-0.3] * 6 + [1.0, -0.6, -0.6])
    keys = [("s", "p1")] * 6 + [("s", "p2")] + [("s", "p3")] * 2        # p2 lost all rows but one
    for normalize in (True, False):
        assert group_advantages(rewards, keys, normalize_std=normalize).tolist() == [0.0] * 9
    with pytest.raises(ValueError, match="8 group keys for 9 rewards"):
        group_advantages(rewards, keys[:8])


def test_grpo_all_equal_group_only_kl_acts(gpt2_checkpoint):
    policy = _policy(gpt2_checkpoint, trainable=True)
    ref_policy = _policy(gpt2_checkpoint)
    perturb(ref_policy.parameters(), scale=0.05)
    rows = [dict(r, reward=-0.3, is_human=False) for r in example_rows(4)]
    batch = collate(rows, PAD)
    mask = batch.program_mask
    adv = group_advantages(batch.reward, ["p"] * 4)
    assert adv.tolist() == [0.0] * 4
    with torch.no_grad():
        ref = policy_forward(ref_policy, batch).logprobs
        noise = torch.randn(mask.shape, generator=torch.Generator().manual_seed(0)) * 0.3
    opts = GRPOConfig(beta=0.1, kl_estimator="k3", aggregation="sequence")
    params = [p for p in policy.parameters() if p.requires_grad]

    logp = policy_forward(policy, batch).logprobs
    old = (logp.detach() + noise) * mask                                # ρ ≠ 1 and some tokens clipped
    loss, metrics = grpo_loss(logp, old, ref, adv, mask, opts)
    full = torch.autograd.grad(loss, params, allow_unused=True)
    assert metrics["policy_loss"] == 0.0

    logp2 = policy_forward(policy, batch).logprobs
    kl = kl_per_token(logp2, ref, "k3") * mask
    kl_only = opts.beta * aggregate(kl, mask, "sequence")
    kl_grads = torch.autograd.grad(kl_only, params, allow_unused=True)
    _close(loss.detach(), kl_only.detach())
    for g_full, g_kl in zip(full, kl_grads):
        if g_kl is None:
            assert g_full is None or (g_full == 0).all()
            continue
        scale = float(g_kl.abs().max())
        torch.testing.assert_close(g_full, g_kl, rtol=1e-5, atol=1e-6 * scale + 1e-12)
    assert any(g is not None and g.abs().sum() > 0 for g in kl_grads)


def test_token_vs_sequence_aggregation_unequal_lengths():
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])                          # lengths 1 and 3
    adv = torch.tensor([-3.0, -1.0])
    for mode, loss_expected, grad_expected in (
            # token: (3 + 1 + 1 + 1) / 4; ∂L/∂logp = -Â_b / 4
            ("token", 1.5, [[0.75, 0, 0], [0.25, 0.25, 0.25]]),
            # sequence: (3/1 + 3/3) / 2; ∂L/∂logp = -Â_b / (B·T_b)
            ("sequence", 2.0, [[1.5, 0, 0], [1 / 6, 1 / 6, 1 / 6]])):
        logp = torch.full((2, 3), -1.0, requires_grad=True)
        loss, _ = grpo_loss(logp, logp.detach(), logp.detach(), adv, mask, GRPOConfig(beta=0.0, aggregation=mode))
        _close(loss, loss_expected)
        loss.backward()
        _close(logp.grad, grad_expected)


def test_options_name_the_bad_field():
    with pytest.raises(ValueError, match=r"PPOConfig\nlam\b"):
        PPOConfig(lam=1.5)
    with pytest.raises(ValueError, match=r"PPOConfig\naggregation\b"):
        PPOConfig(aggregation="batch")
    with pytest.raises(ValueError, match=r"GRPOConfig\nkl_estimator\b"):
        GRPOConfig(kl_estimator="k2")
    with pytest.raises(ValueError, match=r"GRPOConfig\nclip_low\b"):
        GRPOConfig(clip_low=0.0)
    with pytest.raises(ValueError, match="advantages has shape"):
        clipped_surrogate(torch.zeros(2, 3), torch.zeros(2, 3), torch.zeros(3), torch.ones(2, 3), 0.2, 0.2)
