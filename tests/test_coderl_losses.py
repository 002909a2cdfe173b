"""CodeRL's actor loss (eq. 8 and 10): equals the equation on a hand-made batch, reduces to REINFORCE with the
options off, and sends gradient into the actor only."""

from __future__ import annotations

import math

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

from bcoder_ray.algorithms.coderl.algorithm import ActorStage, CodeRLConfig, load_trainable_lm
from bcoder_ray.algorithms.coderl.losses import coderl_actor_loss
from bcoder_ray.algorithms.common import policy_forward
from bcoder_ray.algorithms.coderl.critic import Critic, outcome_labels, token_values
from bcoder_ray.model.batch import collate
from bcoder_ray.model.lm import PolicyLM
from learner_fixtures import KINDS, PAD, example_rows, tiny_checkpoint

torch.set_num_threads(1)

# The hand computation below runs in float64 over at most 4 rows × 3 tokens of O(1) values; the loss runs in
# float32. Its sums have ≤ 12 terms, so the relative rounding error is ≤ ~sqrt(12)·eps32 per sum and a few such
# roundings in sequence: 1e-6·sqrt(12) ≈ 3.5e-6 (relative, on |loss| ≈ 1) is ample for every machine.
EPS32 = torch.finfo(torch.float32).eps
RTOL = 1e-6 * math.sqrt(12)

# rows: 0 human, 1-2 generated, 3 human; row 2 has one padding token
LOG_P = [[-0.5, -1.25, -0.75], [-2.0, -0.25, -1.5], [-0.125, -3.0, 0.0], [-1.0, -0.5, -0.25]]
MASK = [[1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1]]
HUMAN = [True, False, False, True]
REWARD = [1.0, -0.3, 1.0, 1.0]
BASELINE = [0.0, -1.0, -0.6, 7.0]        # r(W^b); the human rows' entries must not matter
Q_HAT = [[9.0, 9.0, 9.0], [0.2, 0.5, 0.9], [0.7, 0.1, 5.0], [9.0, 9.0, 9.0]]   # human rows and padding unread


def _tensors(requires_grad: bool = True):
    log_p = torch.tensor(LOG_P, requires_grad=requires_grad)
    return (log_p, torch.tensor(MASK), torch.tensor(HUMAN), torch.tensor(REWARD), torch.tensor(BASELINE),
            torch.tensor(Q_HAT))


def _eq10_by_hand(use_baseline: bool, use_critic: bool, reduction: str = "sum") -> float:
    """L_ce + L_rl written out with Python floats (float64)."""
    ce_terms, rl_terms = [], []
    for b in range(4):
        valid = [t for t in range(3) if MASK[b][t]]
        norm = len(valid) if reduction == "mean" else 1
        if HUMAN[b]:
            ce_terms.append(-sum(LOG_P[b][t] for t in valid) / norm)
            continue
        advantage = REWARD[b] - (BASELINE[b] if use_baseline else 0.0)              # r(W^s) - r(W^b)
        weight = {t: (Q_HAT[b][t] if use_critic else 1.0) for t in valid}          # q̂(w_t)
        rl_terms.append(-advantage * sum(weight[t] * LOG_P[b][t] for t in valid) / norm)
    return sum(ce_terms) / len(ce_terms) + sum(rl_terms) / len(rl_terms)


@pytest.mark.parametrize("use_baseline", [True, False])
@pytest.mark.parametrize("use_critic", [True, False])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_actor_loss_equals_eq10_on_a_hand_made_batch(use_baseline, use_critic, reduction):
    log_p, mask, human, reward, baseline, q_hat = _tensors()
    loss, metrics = coderl_actor_loss(log_p, mask, human, reward, baseline, q_hat, use_baseline=use_baseline,
                                      use_critic=use_critic, reduction=reduction)
    expected = _eq10_by_hand(use_baseline, use_critic, reduction)
    assert math.isclose(loss.item(), expected, rel_tol=RTOL, abs_tol=RTOL)
    assert math.isclose(metrics["l_ce"] + metrics["l_rl"], metrics["loss"], rel_tol=RTOL, abs_tol=RTOL)
    assert metrics["n_human"] == 2.0 and metrics["n_generated"] == 2.0


def test_numbers_of_the_full_loss_written_out():
    """One case fully by hand: L_ce = (2.5 + 1.75)/2; row 1: A = 0.7, Σ q̂ℓ = -0.4 - 0.125 - 1.35 = -1.875;
    row 2: A = 1.6, Σ q̂ℓ = -0.0875 - 0.3 = -0.3875; L_rl = -(0.7·-1.875 + 1.6·-0.3875)/2 = 0.96625."""
    loss, metrics = coderl_actor_loss(*_tensors())
    assert math.isclose(metrics["l_ce"], 2.125, rel_tol=RTOL)
    assert math.isclose(metrics["l_rl"], 0.96625, rel_tol=RTOL)
    assert math.isclose(loss.item(), 3.09125, rel_tol=RTOL)


def test_options_off_is_plain_reinforce():
    log_p, mask, human, reward, _, _ = _tensors()
    gen = ~human
    loss, metrics = coderl_actor_loss(log_p, mask, human, reward, use_baseline=False, use_critic=False)
    reinforce = -(reward[gen] * (log_p[gen] * mask[gen]).sum(1)).mean()        # -E[r Σ_t log p] (eq. 2-3)
    assert math.isclose(metrics["l_rl"], float(reinforce.detach()), rel_tol=RTOL)
    # the rows' baseline and q̂ are ignored when switched off; q̂ = 1 and r(W^b) = 0 give the same loss
    ones = coderl_actor_loss(log_p, mask, human, reward, torch.zeros(4), torch.ones(4, 3))[0]
    assert math.isclose(ones.item(), loss.item(), rel_tol=RTOL)


def test_gradient_is_the_eq10_coefficient_and_stops_at_rewards_and_weights():
    log_p, mask, human, reward, baseline, q_hat = _tensors()
    reward.requires_grad_(True)
    baseline.requires_grad_(True)
    q_hat.requires_grad_(True)
    loss, _ = coderl_actor_loss(log_p, mask, human, reward, baseline, q_hat)
    loss.backward()
    expected = torch.zeros(4, 3)
    for b in range(4):
        for t in range(3):
            if not MASK[b][t]:
                continue
            if HUMAN[b]:
                expected[b, t] = -1.0 / 2                                       # -1/n_human
            else:
                expected[b, t] = -(REWARD[b] - BASELINE[b]) * Q_HAT[b][t] / 2   # -A q̂_t / n_generated
    assert torch.allclose(log_p.grad, expected, rtol=RTOL, atol=RTOL)
    assert reward.grad is None and baseline.grad is None and q_hat.grad is None


def test_rows_of_one_kind_and_argument_errors():
    log_p, mask, human, reward, baseline, q_hat = _tensors()
    all_human = torch.ones(4, dtype=torch.bool)
    loss, metrics = coderl_actor_loss(log_p, mask, all_human, reward, baseline, q_hat)
    assert metrics["l_rl"] == 0.0 and math.isclose(loss.item(), metrics["l_ce"])
    loss, metrics = coderl_actor_loss(log_p, mask, ~all_human, reward, baseline, q_hat)
    assert metrics["l_ce"] == 0.0
    with pytest.raises(ValueError, match="baseline_reward"):
        coderl_actor_loss(log_p, mask, human, reward, None, q_hat)
    with pytest.raises(ValueError, match="q_weights"):
        coderl_actor_loss(log_p, mask, human, reward, baseline, None)
    with pytest.raises(ValueError, match=r"q_weights has shape \(4, 2\)"):
        coderl_actor_loss(log_p, mask, human, reward, baseline, q_hat[:, :2])
    with pytest.raises(ValueError, match="reduction"):
        coderl_actor_loss(log_p, mask, human, reward, baseline, q_hat, reduction="token")


# ------------------------------------------------------------------------------------------ on a real policy
@pytest.fixture(scope="module", params=KINDS)
def checkpoint(request, tmp_path_factory):
    return tiny_checkpoint(request.param, str(tmp_path_factory.mktemp(request.param)))


def _policy(checkpoint: str) -> PolicyLM:
    seq2seq = AutoConfig.from_pretrained(checkpoint).is_encoder_decoder
    cls = AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM
    lm = cls.from_pretrained(checkpoint)
    lm.requires_grad_(True)
    return PolicyLM(lm)


def test_actor_log_probs_match_the_models_own_forward(checkpoint):
    """ℓ_t as the actor stage computes it (`policy_forward(...).logprobs`, the actor's own encoder)."""
    policy = _policy(checkpoint)
    rows = example_rows()
    batch = collate(rows, PAD)
    with torch.no_grad():
        mine = policy_forward(policy, batch).logprobs
    for b, row in enumerate(rows):
        p, w = torch.tensor([row["prompt_ids"]]), torch.tensor([row["program_ids"]])
        with torch.no_grad():
            if policy.kind == "encoder-decoder":
                dec = torch.cat([torch.tensor([[policy.decoder_start_id]]), w[:, :-1]], 1)
                logits = policy.lm(input_ids=p, decoder_input_ids=dec).logits[0]
            else:
                logits = policy.lm(input_ids=torch.cat([p, w[:, :-1]], 1)).logits[0, p.shape[1] - 1:]
        ref = logits.log_softmax(-1).gather(-1, w[0].unsqueeze(-1)).squeeze(-1)
        n = w.shape[1]
        # float32 log-softmax over V = 48 logits of O(1): error ~ sqrt(V)·eps per entry, bounded with margin by
        # 1e-5 together with the padded-batch differences of the decoder (see test_coderl_critic's TOL)
        assert torch.allclose(mine[b, :n], ref, atol=1e-5)
        assert (mine[b, n:] == 0).all()


def test_only_the_actor_receives_gradient(checkpoint):
    """The actor stage (`ActorStage`, what a run trains) on a batch whose q̂ comes from a critic that has gradient
    enabled: the loss's gradient reaches the actor and never the critic."""
    critic = Critic.create(checkpoint, seed=1)
    critic.requires_grad_(True)
    rows = [dict(r, reward=1.0) if r["is_human"] else r for r in example_rows()]   # both human rows ground truth
    batch = collate(rows, PAD)
    labels = outcome_labels(["passed", "failed", "compile_error", "runtime_error"])
    q_hat = token_values(critic, batch, labels)
    baseline = torch.tensor([0.0, -1.0, -0.6, 0.0])
    batch.tokens.update(q_hat=q_hat, r_baseline=baseline.unsqueeze(1).expand_as(q_hat))   # the cached targets
    stage = ActorStage(load_trainable_lm(checkpoint), CodeRLConfig())
    policy = stage.policy
    loss, metrics = stage(batch)
    loss.backward()
    assert all(p.grad is None for p in critic.parameters())
    with_grad = [n for n, p in policy.lm.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0]
    assert len(with_grad) >= len(list(policy.lm.parameters())) // 2
    if policy.kind == "encoder-decoder":                      # the actor's own encoder is trained too
        assert any(n.startswith("encoder.") for n in with_grad)
    assert metrics["n_ground_truth"] == 2.0 and 0.0 < metrics["q_weight_mean"] < 1.0
