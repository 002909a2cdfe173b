"""CodeRL's actor loss (Le et al. 2022, eq. 8 and 10; ``docs/baselines.md`` §1): cross-entropy on the human
programs + the critic-weighted, baseline-corrected policy gradient on the generated ones, equal weights.

Public API
----------
- ``coderl_actor_loss(log_probs, token_mask, is_human, reward, baseline_reward=None, q_weights=None, *,
  use_baseline=True, use_critic=True, reduction="sum") -> (loss, metrics)``: L = L_ce + L_rl.

``log_probs`` are ℓ_t = log p_θ(w_t | w_<t, D) of every program token, [B, T] with gradient, 0 at padding: the
actor's ``bcoder_ray.algorithms.common.policy_forward(policy, batch).logprobs`` (teacher-forced; for an
encoder-decoder actor the prompt goes through the actor's own encoder, with gradient). The actor stage
(``bcoder_ray.algorithms.coderl.algorithm.ActorStage``) calls ``coderl_actor_loss`` once on the ground-truth human
rows (L_ce) and once on the generated rows (L_rl) and weights the two (``ce_weight``, ``rl_weight``).

Definitions (program w_0 … w_{T-1} of a row b, m_t its valid-token mask, ℓ_t = log p_θ(w_t | w_<t, D)):
- L_ce  = mean over human rows of  -Σ_t m_t ℓ_t                                      (eq. 1, the warm start's CE)
- L_rl  = mean over generated rows of  -Σ_t m_t · A · c_t · ℓ_t                       (eq. 8, eq. 10)
  with A = r(W^s) - r(W^b) (``use_baseline``; else A = r(W^s)) and c_t = q̂_φ(w_t) (``use_critic``; else 1).
  A and c_t are constants (no gradient reaches the critic, the rewards or the baseline).
  Both off: L_rl = mean over generated rows of -r · Σ_t ℓ_t, plain REINFORCE (eq. 2-3).
- L = L_ce + L_rl (equal weights, as published). A term with no rows in the batch is 0.
- ``reduction="sum"`` sums over a program's tokens as eq. 8/10 are written (the B-Coder losses' ``aux_reduction``
  default); ``"mean"`` divides each program's sum by its valid-token count (``AUX_REDUCTIONS``). Programs are then
  averaged.
Metrics (floats): ``loss``, ``l_ce``, ``l_rl``, ``n_human``, ``n_generated``, ``advantage_mean`` (mean A over the
generated rows), ``q_weight_mean`` (mean c_t over their valid tokens), ``log_prob_mean`` (mean ℓ_t, all rows).
"""

from __future__ import annotations

import torch

from bcoder_ray.algorithms.common import AUX_REDUCTIONS


def _per_program(values: torch.Tensor, mask: torch.Tensor, reduction: str) -> torch.Tensor:
    """Σ_t m_t·values_t per program ([N]); divided by Σ_t m_t for ``reduction="mean"``."""
    total = (values * mask).sum(1)
    return total / mask.sum(1).clamp_min(1.0) if reduction == "mean" else total


def _check_shapes(log_probs: torch.Tensor, **row_tensors: torch.Tensor | None) -> None:
    b = log_probs.shape[0]
    for name, tensor in row_tensors.items():
        if tensor is None:
            continue
        expected = tuple(log_probs.shape) if name in ("token_mask", "q_weights") else (b,)
        if tuple(tensor.shape) != expected:
            raise ValueError(f"{name} has shape {tuple(tensor.shape)}, expected {expected} (log_probs is "
                             f"{tuple(log_probs.shape)})")


def coderl_actor_loss(log_probs: torch.Tensor, token_mask: torch.Tensor, is_human: torch.Tensor,
                      reward: torch.Tensor, baseline_reward: torch.Tensor | None = None,
                      q_weights: torch.Tensor | None = None, *, use_baseline: bool = True, use_critic: bool = True,
                      reduction: str = "sum") -> tuple[torch.Tensor, dict[str, float]]:
    """L = L_ce + L_rl (see the module docstring). All row tensors [B], token tensors [B, T].

    ``baseline_reward`` (r(W^b), the greedy decode's executed reward) is needed with ``use_baseline``, ``q_weights``
    (q̂_φ(w_t), ``critic.token_values``) with ``use_critic``; their values on human rows are never read."""
    if reduction not in AUX_REDUCTIONS:
        raise ValueError(f"reduction must be one of {AUX_REDUCTIONS}, got {reduction!r}")
    if use_baseline and baseline_reward is None:
        raise ValueError("use_baseline=True needs baseline_reward (r(W^b) of each row's greedy decode)")
    if use_critic and q_weights is None:
        raise ValueError("use_critic=True needs q_weights (the critic's q̂(w_t), critic.token_values)")
    _check_shapes(log_probs, token_mask=token_mask, is_human=is_human, reward=reward,
                  baseline_reward=baseline_reward if use_baseline else None,
                  q_weights=q_weights if use_critic else None)
    mask = token_mask.to(log_probs.dtype)
    human = is_human.bool()
    generated = ~human
    zero = log_probs.new_zeros(())

    l_ce = zero
    if human.any():
        l_ce = -_per_program(log_probs[human], mask[human], reduction).mean()           # eq. 1: -Σ_t log p(w*_t)

    l_rl, advantage_mean, q_mean = zero, 0.0, 1.0
    if generated.any():
        advantage = reward[generated].detach().to(log_probs.dtype)                       # r(W^s)
        if use_baseline:
            advantage = advantage - baseline_reward[generated].detach().to(log_probs.dtype)  # eq. 8: r(W^s) - r(W^b)
        weights = mask[generated]
        if use_critic:
            weights = weights * q_weights[generated].detach().to(log_probs.dtype)         # eq. 10: q̂_φ(w_t)
            q_mean = float((weights.sum() / mask[generated].sum().clamp_min(1.0)).detach())
        per_program = _per_program(log_probs[generated] * weights, mask[generated], reduction)
        l_rl = -(advantage * per_program).mean()                                  # eq. 8/10: -A Σ_t q̂_t log p_t
        advantage_mean = float(advantage.mean())
    loss = l_ce + l_rl                                                            # equal weights (CodeRL §3)
    valid = mask > 0
    metrics = {"loss": float(loss.detach()), "l_ce": float(l_ce.detach()), "l_rl": float(l_rl.detach()),
               "n_human": float(human.sum()), "n_generated": float(generated.sum()),
               "advantage_mean": advantage_mean, "q_weight_mean": q_mean,
               "log_prob_mean": float(log_probs.detach()[valid].mean()) if valid.any() else 0.0}
    return loss, metrics
