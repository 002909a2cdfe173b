"""Policy-gradient losses shared by the PPO and GRPO plug-ins: KL estimators, GAE, PPO-clip, GRPO.

Pure PyTorch over the learner's padded ``Batch`` (``bcoder_ray.model.batch``); no Ray. The losses read the
algorithm's own config (``bcoder_ray.algorithms.policy_gradient.config``: ``PPOConfig``, ``GRPOConfig``). The
method summaries are ``docs/baselines.md`` §2 (PPO with a KL penalty, GRPO). The policy's log-probs, values and
entropies come from ``bcoder_ray.algorithms.common.policy_forward``.

Public API
----------
- ``AGGREGATIONS``, ``KL_ESTIMATORS``: the choices of ``aggregate`` and ``kl_per_token``.
- ``per_token_column(values, batch, what) -> [B, T]``: a buffer per-token list column (e.g. the sampling
  ``logprobs``) padded like ``batch.program_ids``; each row's length must equal its program's.
- ``kl_per_token(logprobs, ref_logprobs, estimator) -> [B, T]``: k1 or k3 against θ_ckpt (Schulman 2020).
- ``aggregate(per_token, mask, mode) -> scalar``: "token" (mean over all valid tokens) or "sequence" (mean over
  each sequence's tokens, then over sequences).
- PPO: ``ppo_token_rewards``, ``gae``, ``whiten``, ``clipped_surrogate``, ``value_loss``,
  ``ppo_advantages(..., config) -> (advantages, returns, token_rewards)``, ``ppo_loss(..., config) -> (loss, metrics)``.
- GRPO: ``group_advantages(rewards, group_keys, *, normalize_std, eps) -> [B]``,
  ``grpo_loss(..., config) -> (loss, metrics)``.

Conventions (as ``bcoder_ray.algorithms.bcoder.losses``): program w_0 … w_{T_b-1}, state s_t = (prompt, w_<t),
action a_t = w_t; ``mask`` is the batch's ``program_mask`` ([B, T], right-padded); the execution reward r_b arrives
at the last valid token. "old" log-probs are those of the distribution actually sampled (θ_old, the buffer's
``logprobs``); "ref" log-probs are θ_ckpt's (the KL anchor p_0). Every loss is a scalar to minimise; metrics are
floats.
"""

from __future__ import annotations

from typing import Hashable, Sequence

import torch

from bcoder_ray.algorithms.common import PolicyOutputs
from bcoder_ray.algorithms.policy_gradient.config import GRPOConfig, PPOConfig
from bcoder_ray.model.batch import Batch, per_program_mean

AGGREGATIONS = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k3")


def _check_choice(owner: str, name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}.{name} must be one of {allowed}, got {value!r}")


# ---------------------------------------------------------------------------------------------- shape checks
def _check_like(mask: torch.Tensor, **tensors: torch.Tensor) -> None:
    """Every named tensor must have the mask's [B, T] shape (the error names the one at fault)."""
    if mask.dim() != 2:
        raise ValueError(f"mask must be [B, T], got shape {tuple(mask.shape)}")
    for name, t in tensors.items():
        if tuple(t.shape) != tuple(mask.shape):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, the mask has {tuple(mask.shape)}")


def _check_rows(mask: torch.Tensor, **tensors: torch.Tensor) -> None:
    for name, t in tensors.items():
        if tuple(t.shape) != (mask.shape[0],):
            raise ValueError(f"{name} has shape {tuple(t.shape)}, expected one value per row ({mask.shape[0]},)")


def _float_mask(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return mask.to(device=like.device, dtype=like.dtype)


def _masked_mean_t(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ values·mask / Σ mask (0 when the mask is empty), as a tensor."""
    m = _float_mask(mask, values)
    return (values * m).sum() / m.sum().clamp_min(1.0)


def _last_token_mask(mask: torch.Tensor) -> torch.Tensor:
    """[B, T] True at each row's last valid token (rows are right-padded)."""
    last = (mask.long().sum(1) - 1).clamp_min(0)
    positions = torch.arange(mask.shape[1], device=mask.device)
    return (positions.unsqueeze(0) == last.unsqueeze(1)) & mask.bool()


# ---------------------------------------------------------------------------------------------- buffer columns
def per_token_column(values: Sequence[Sequence[float] | None], batch: Batch, what: str) -> torch.Tensor:
    """A per-token buffer column (one list per row, e.g. the sampling ``logprobs``) as float32 [B, T], 0-padded.

    Raises naming the row when a list is missing or its length differs from the row's program length."""
    lengths = batch.lengths.tolist()
    if len(values) != len(lengths):
        raise ValueError(f"{what}: {len(values)} rows, the batch has {len(lengths)}")
    out = torch.zeros(batch.program_ids.shape, dtype=torch.float32)
    for i, (row, n) in enumerate(zip(values, lengths)):
        if row is None:
            raise ValueError(f"{what}: row {i} has none (rows without it are not eligible)")
        if len(row) != n:
            raise ValueError(f"{what}: row {i} has {len(row)} entries, its program has {n} tokens")
        out[i, :n] = torch.as_tensor(list(row), dtype=torch.float32)
    return out.to(batch.program_ids.device)


# ---------------------------------------------------------------------------------------------- KL, aggregation
def kl_per_token(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, estimator: str) -> torch.Tensor:
    """Per-token estimate of KL[π_θ || p_ref] at the sampled token (Schulman 2020, "Approximating KL divergence").

    k1 = log π_θ - log p_ref (unbiased, can be negative);
    k3 = exp(log p_ref - log π_θ) - (log p_ref - log π_θ) - 1 (unbiased, ≥ 0; DeepSeekMath eq. 4).
    Padding must be masked by the caller (both inputs are 0 there, so 0)."""
    _check_choice("kl_per_token", "estimator", estimator, KL_ESTIMATORS)
    if logprobs.shape != ref_logprobs.shape:
        raise ValueError(f"kl_per_token: logprobs {tuple(logprobs.shape)} vs ref_logprobs "
                         f"{tuple(ref_logprobs.shape)}")
    ref = ref_logprobs.detach().to(logprobs.dtype)
    if estimator == "k1":
        return logprobs - ref                                              # k1
    d = ref - logprobs
    return torch.exp(d) - d - 1.0                                          # k3


def aggregate(per_token: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """Scalar loss from per-token losses: "token" = Σ_{b,t} x·m / Σ m (DAPO §3.3); "sequence" = 1/B Σ_b
    (1/T_b Σ_t x·m) (DeepSeekMath eq. 3; ``bcoder_ray.model.batch.per_program_mean``, the 1/T of B-Coder's
    eq. 12/15)."""
    _check_choice("aggregate", "mode", mode, AGGREGATIONS)
    _check_like(mask, per_token=per_token)
    if mode == "token":
        return _masked_mean_t(per_token, mask)
    return per_program_mean(per_token, mask)


# ---------------------------------------------------------------------------------------------- PPO
def ppo_token_rewards(old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, reward: torch.Tensor,
                      mask: torch.Tensor, beta: float) -> torch.Tensor:
    """r_t = -β·(log π_old(a_t|s_t) - log p_ckpt(a_t|s_t)) + [t = T_b - 1]·r_b (docs/baselines.md §2; Ziegler et
    al. 2019 eq. 2 per token), float32 [B, T], 0 at padding; constants (no gradient)."""
    _check_like(mask, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs)
    _check_rows(mask, reward=reward)
    m = _float_mask(mask, old_logprobs.float())
    k1 = kl_per_token(old_logprobs.detach().float(), ref_logprobs.float(), "k1")
    rewards = -beta * k1 * m                                                # KL penalty at every token
    terminal = _last_token_mask(mask).float()
    return (rewards + terminal * reward.detach().float().unsqueeze(1)).detach()   # execution reward at the end


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalised advantage estimation (Schulman et al. 2016 §3; PPO paper eq. 11-12) per row, bootstrapping 0
    after the last valid token: δ_t = r_t + γ·V(s_{t+1})·m_{t+1} - V(s_t), Â_t = δ_t + γλ·Â_{t+1};
    returns R_t = Â_t + V(s_t). Both [B, T] float32, detached, 0 at padding."""
    _check_like(mask, rewards=rewards, values=values)
    m = _float_mask(mask, rewards.float())
    r, v = rewards.detach().float() * m, values.detach().float() * m
    advantages = torch.zeros_like(r)
    running = torch.zeros_like(r[:, 0])
    next_value = torch.zeros_like(r[:, 0])                                  # V after the last token: 0
    for t in range(r.shape[1] - 1, -1, -1):
        delta = r[:, t] + gamma * next_value - v[:, t]                      # PPO eq. 12: δ_t
        running = (delta + gamma * lam * running) * m[:, t]                 # PPO eq. 11, recursive form
        advantages[:, t] = running
        next_value = v[:, t]                                                # m_t = 0 at padding zeroes it
    returns = (advantages + v) * m                                          # R_t = Â_t + V(s_t) (value target)
    return advantages, returns


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """(x - mean) / (std + eps) over the valid tokens (population std), 0 at padding (advantage normalisation)."""
    _check_like(mask, values=values)
    m = _float_mask(mask, values)
    mean = _masked_mean_t(values, mask)
    var = _masked_mean_t((values - mean) ** 2, mask)
    return (values - mean) / (var.sqrt() + eps) * m


def clipped_surrogate(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
                      mask: torch.Tensor, clip_low: float, clip_high: float,
                      aggregation: str = "token") -> tuple[torch.Tensor, dict[str, float]]:
    """PPO-clip (Schulman et al. 2017, eq. 7) as a loss: L = -agg(min(ρ_t Â_t, clip(ρ_t, 1-ε_low, 1+ε_high) Â_t)),
    ρ_t = exp(log π_θ - log π_old). ``advantages`` is [B, T] (PPO) or [B] (GRPO: the row's Â on every token).

    Metrics: ``clip_fraction`` (share of valid tokens where the clipped term is the smaller one, i.e. no gradient),
    ``approx_kl`` (mean of k3 of π_old vs π_θ: (ρ-1) - log ρ), ``ratio_mean``, ``ratio_max``."""
    if advantages.dim() == 1:
        _check_rows(mask, advantages=advantages)
        advantages = advantages.unsqueeze(1).expand_as(logprobs)
    _check_like(mask, logprobs=logprobs, old_logprobs=old_logprobs, advantages=advantages)
    log_ratio = logprobs - old_logprobs.detach().to(logprobs.dtype)
    log_ratio = torch.where(mask.bool(), log_ratio, torch.zeros_like(log_ratio))   # padding: ρ = 1
    ratio = torch.exp(log_ratio)                                                    # ρ_t
    adv = advantages.detach().to(logprobs.dtype)
    unclipped = ratio * adv                                                         # ρ_t Â_t
    clipped = ratio.clamp(1.0 - clip_low, 1.0 + clip_high) * adv                    # clip(ρ_t, 1-ε, 1+ε) Â_t
    loss = aggregate(-torch.minimum(unclipped, clipped), mask, aggregation)         # -E_t[min(·, ·)]
    with torch.no_grad():
        valid = mask.bool()
        metrics = {"clip_fraction": float(_masked_mean_t((clipped < unclipped).float(), mask)),
                   "approx_kl": float(_masked_mean_t((ratio - 1.0) - log_ratio, mask)),
                   "ratio_mean": float(_masked_mean_t(ratio, mask)),
                   "ratio_max": float(ratio[valid].max()) if valid.any() else 1.0}
    return loss, metrics


def value_loss(values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip: float | None, aggregation: str = "token") -> tuple[torch.Tensor, dict[str, float]]:
    """½·agg((V - R)²), or with ``clip`` ½·agg(max((V - R)², (V_old + clip(V - V_old, -c, c) - R)²)) (PPO2's
    clipped value loss). Metrics: ``value_clip_fraction`` (share of tokens where the clipped term is larger)."""
    _check_like(mask, values=values, old_values=old_values, returns=returns)
    target = returns.detach().float()
    v = values.float()
    squared = (v - target) ** 2
    if clip is None:
        return 0.5 * aggregate(squared, mask, aggregation), {"value_clip_fraction": 0.0}
    old = old_values.detach().float()
    v_clipped = old + (v - old).clamp(-clip, clip)
    squared_clipped = (v_clipped - target) ** 2
    loss = 0.5 * aggregate(torch.maximum(squared, squared_clipped), mask, aggregation)
    fraction = float(_masked_mean_t((squared_clipped > squared).float().detach(), mask))
    return loss, {"value_clip_fraction": fraction}


def ppo_advantages(old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, old_values: torch.Tensor,
                   reward: torch.Tensor, mask: torch.Tensor,
                   config: PPOConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Once per batch of fresh samples, before the PPO epochs: (advantages Â_t (whitened if asked), returns R_t,
    per-token rewards r_t), all [B, T], detached. ``old_values`` are the value head's V(s_t) at sampling time."""
    rewards = ppo_token_rewards(old_logprobs, ref_logprobs, reward, mask, config.beta)
    advantages, returns = gae(rewards, old_values, mask, config.gamma, config.lam)
    if config.whiten_advantages:
        advantages = whiten(advantages, mask, config.whiten_eps)           # returns stay unwhitened
    return advantages, returns, rewards


def ppo_loss(outputs: PolicyOutputs, old_logprobs: torch.Tensor, old_values: torch.Tensor,
             advantages: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
             config: PPOConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """L = L_clip + c_v·L_V - c_H·H (PPO eq. 9, as a loss) for one mini-batch; ``outputs`` from ``policy_forward``
    with the value head (and ``with_entropy=True`` when ``config.entropy_coef`` > 0)."""
    if outputs.values is None:
        raise ValueError("ppo_loss: outputs.values is None; call policy_forward with the value head")
    if config.entropy_coef > 0 and outputs.entropy is None:
        raise ValueError("ppo_loss: entropy_coef > 0 but outputs.entropy is None; call policy_forward with "
                         "with_entropy=True")
    pg, metrics = clipped_surrogate(outputs.logprobs, old_logprobs, advantages, mask, config.clip_low,
                                    config.clip_high, config.aggregation)
    vf, v_metrics = value_loss(outputs.values, old_values, returns, mask, config.value_clip, config.aggregation)
    loss = pg + config.value_coef * vf
    entropy = outputs.entropy
    if entropy is not None and config.entropy_coef > 0:
        loss = loss - config.entropy_coef * aggregate(entropy, mask, config.aggregation)
    metrics.update(v_metrics)
    metrics.update({"loss": float(loss.detach()), "policy_loss": float(pg.detach()),
                    "value_loss": float(vf.detach()),
                    "value_mean": float(_masked_mean_t(outputs.values.detach(), mask)),
                    "return_mean": float(_masked_mean_t(returns.detach().float(), mask)),
                    "advantage_mean": float(_masked_mean_t(advantages.detach().float(), mask))})
    if entropy is not None:
        metrics["entropy"] = float(_masked_mean_t(entropy.detach(), mask))
    return loss, metrics


# ---------------------------------------------------------------------------------------------- GRPO
def _group_index(group_keys: Sequence[Hashable], n: int) -> torch.Tensor:
    if len(group_keys) != n:
        raise ValueError(f"group_advantages: {len(group_keys)} group keys for {n} rewards")
    ids: dict[Hashable, int] = {}
    return torch.tensor([ids.setdefault(k, len(ids)) for k in group_keys], dtype=torch.long)


def group_advantages(rewards: torch.Tensor, group_keys: Sequence[Hashable], *, normalize_std: bool = True,
                     eps: float = 1e-4) -> torch.Tensor:
    """GRPO's outcome-supervised advantage (DeepSeekMath §4.1.2): Â_i = (r_i - mean(r_g)) / (std(r_g) + eps) for
    row i of group g (rows sharing a key, e.g. the problem), or r_i - mean(r_g) with ``normalize_std=False``.

    std is the sample (Bessel-corrected) standard deviation of the rows the group has (as ``torch.std``); a group
    whose rewards are all equal, including a group of one row, gets exactly 0 (float rounding of the mean would
    otherwise leave ±1 ulp). Groups may have any size (rows lost to infrastructure failures). Returns [B] float32."""
    if rewards.dim() != 1:
        raise ValueError(f"group_advantages: rewards must be [B], got shape {tuple(rewards.shape)}")
    r = rewards.detach().float()
    index = _group_index(group_keys, r.shape[0]).to(r.device)
    n_groups = int(index.max()) + 1 if r.numel() else 0
    counts = torch.zeros(n_groups, device=r.device).index_add_(0, index, torch.ones_like(r))
    mean = torch.zeros(n_groups, device=r.device).index_add_(0, index, r) / counts
    centred = r - mean[index]                                               # r_i - mean(r_group)
    sq = torch.zeros(n_groups, device=r.device).index_add_(0, index, centred ** 2)
    std = (sq / (counts - 1).clamp_min(1.0)).sqrt()                         # sample std of the group
    lo = torch.full((n_groups,), float("inf"), device=r.device).scatter_reduce(0, index, r, "amin")
    hi = torch.full((n_groups,), float("-inf"), device=r.device).scatter_reduce(0, index, r, "amax")
    constant = (lo == hi)[index]                                            # all-equal group (or a single row)
    adv = centred / (std[index] + eps) if normalize_std else centred
    return torch.where(constant, torch.zeros_like(adv), adv)


def grpo_loss(logprobs: torch.Tensor, old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor,
              advantages: torch.Tensor, mask: torch.Tensor,
              config: GRPOConfig) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO objective (DeepSeekMath eq. 3) as a loss: agg(-min(ρ_t Â_i, clip(ρ_t, 1-ε_low, 1+ε_high) Â_i))
    + β·agg(KL_t), KL_t the k1 or k3 estimate against θ_ckpt (eq. 4); ``advantages`` [B] from ``group_advantages``.
    Both aggregations are linear, so this equals eq. 3's agg(-surrogate + β·KL) term by term."""
    _check_like(mask, logprobs=logprobs, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs)
    _check_rows(mask, advantages=advantages)
    pg, metrics = clipped_surrogate(logprobs, old_logprobs, advantages, mask, config.clip_low, config.clip_high,
                                    config.aggregation)
    kl = kl_per_token(logprobs, ref_logprobs, config.kl_estimator)
    kl = torch.where(mask.bool(), kl, torch.zeros_like(kl))
    kl_term = aggregate(kl, mask, config.aggregation)
    loss = pg + config.beta * kl_term                                      # eq. 3, negated
    adv = advantages.detach().float()
    metrics.update({"loss": float(loss.detach()), "policy_loss": float(pg.detach()), "kl": float(kl_term.detach()),
                    "advantage_mean": float(adv.mean()) if adv.numel() else 0.0,
                    "zero_advantage_fraction": float((adv == 0).float().mean()) if adv.numel() else 0.0})
    return loss, metrics


__all__ = ["AGGREGATIONS", "KL_ESTIMATORS", "aggregate", "clipped_surrogate", "gae", "group_advantages",
           "grpo_loss", "kl_per_token", "per_token_column", "ppo_advantages", "ppo_loss", "ppo_token_rewards",
           "value_loss", "whiten"]
