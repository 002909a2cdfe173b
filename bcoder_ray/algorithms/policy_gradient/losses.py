"""Policy-gradient losses shared by the PPO and GRPO plug-ins: log-probs, KL estimators, GAE, PPO-clip, GRPO.

Pure PyTorch over the learner's padded ``Batch`` (``bcoder_ray.model.batch``); no Ray, no config. The method summaries
are ``docs/baselines.md`` §2 (PPO with a KL penalty, GRPO).

Public API
----------
- ``PPOOptions``, ``GRPOOptions``: the options (a docstring under each field); ``AGGREGATIONS``, ``KL_ESTIMATORS``.
- ``encode_prompts(policy, batch) -> Encoded | None``: the policy's own encoder output (encoder-decoder only).
- ``taken_logprobs(logits, actions, mask) -> [B, T]``: log π(a_t | s_t) of the taken tokens, 0 at padding.
- ``token_entropy(logits, mask) -> [B, T]``: H(π(·| s_t)), 0 at padding.
- ``ValueHead(hidden_size, *, seed=0)``, ``ValueHead.for_policy(policy, *, seed=0)``: V(s_t) = Linear(h_t).
- ``policy_forward(policy, batch, *, encoded=None, value_head=None, with_entropy=False) -> PolicyOutputs``:
  log-probs (+ values, + entropy) from ONE teacher-forced forward of the policy.
- ``per_token_column(values, batch, what) -> [B, T]``: a buffer per-token list column (e.g. the sampling
  ``logprobs``) padded like ``batch.program_ids``; each row's length must equal its program's.
- ``kl_per_token(logprobs, ref_logprobs, estimator) -> [B, T]``: k1 or k3 against θ_ckpt (Schulman 2020).
- ``aggregate(per_token, mask, mode) -> scalar``: "token" (mean over all valid tokens) or "sequence" (mean over
  each sequence's tokens, then over sequences).
- PPO: ``ppo_token_rewards``, ``gae``, ``whiten``, ``clipped_surrogate``, ``value_loss``,
  ``ppo_advantages(...) -> (advantages, returns, token_rewards)``, ``ppo_loss(...) -> (loss, metrics)``.
- GRPO: ``group_advantages(rewards, group_keys, *, normalize_std, eps) -> [B]``, ``grpo_loss(...) -> (loss, metrics)``.

Conventions (as ``bcoder_ray.losses``): program w_0 … w_{T_b-1}, state s_t = (prompt, w_<t), action a_t = w_t;
``mask`` is the batch's ``program_mask`` ([B, T], right-padded); the execution reward r_b arrives at the last
valid token. "old" log-probs are those of the distribution actually sampled (θ_old, the buffer's ``logprobs``);
"ref" log-probs are θ_ckpt's (the KL anchor p_0). Every loss is a scalar to minimise; metrics are floats.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Sequence

import torch
from torch import nn

from bcoder_ray.model.batch import Batch
from bcoder_ray.model.batch import per_program_mean
from bcoder_ray.model.lm import ENCODER_DECODER, Encoded, PolicyLM, token_logit_stats

AGGREGATIONS = ("token", "sequence")
KL_ESTIMATORS = ("k1", "k3")


# ---------------------------------------------------------------------------------------------- options
def _check_choice(owner: str, name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"{owner}.{name} must be one of {allowed}, got {value!r}")


def _check_range(owner: str, name: str, value: float, lo: float, hi: float, *, lo_open: bool = False) -> None:
    bad_lo = value <= lo if lo_open else value < lo
    if bad_lo or value > hi:
        raise ValueError(f"{owner}.{name} must be in {'(' if lo_open else '['}{lo}, {hi}], got {value}")


@dataclass(frozen=True)
class PPOOptions:
    """PPO-clip with a value head, GAE and a per-token KL penalty against θ_ckpt (baselines.md §2)."""

    beta: float = 0.05
    """coefficient β of the per-token KL penalty -β·(log π_old - log p_ckpt) folded into the rewards"""
    gamma: float = 1.0
    """discount factor γ of the returns and of GAE"""
    lam: float = 0.95
    """λ of generalised advantage estimation (Schulman et al. 2016, eq. 16)"""
    clip_low: float = 0.2
    """ε_low: the ratio is clipped below at 1 - ε_low (PPO eq. 7)"""
    clip_high: float = 0.2
    """ε_high: the ratio is clipped above at 1 + ε_high (= ε_low in PPO; larger is DAPO's clip-higher)"""
    value_clip: float | None = 0.2
    """clip range of the value update around the old values (PPO2 / OpenAI baselines); None: unclipped loss"""
    value_coef: float = 0.1
    """weight of the value loss in the total loss"""
    entropy_coef: float = 0.0
    """weight of the entropy bonus (subtracted from the loss); 0 skips computing the entropy"""
    whiten_advantages: bool = True
    """normalise the GAE advantages to mean 0, std 1 over the batch's valid tokens"""
    whiten_eps: float = 1e-8
    """ε in (Â - mean) / (std + ε) of the whitening"""
    aggregation: str = "token"
    """"token": mean of the per-token losses over all valid tokens; "sequence": per sequence, then over sequences"""

    def __post_init__(self) -> None:
        name = type(self).__name__
        _check_range(name, "beta", self.beta, 0.0, float("inf"))
        _check_range(name, "gamma", self.gamma, 0.0, 1.0)
        _check_range(name, "lam", self.lam, 0.0, 1.0)
        _check_range(name, "clip_low", self.clip_low, 0.0, 1.0, lo_open=True)
        _check_range(name, "clip_high", self.clip_high, 0.0, float("inf"), lo_open=True)
        if self.value_clip is not None:
            _check_range(name, "value_clip", self.value_clip, 0.0, float("inf"), lo_open=True)
        _check_range(name, "value_coef", self.value_coef, 0.0, float("inf"))
        _check_range(name, "entropy_coef", self.entropy_coef, 0.0, float("inf"))
        _check_range(name, "whiten_eps", self.whiten_eps, 0.0, float("inf"), lo_open=True)
        _check_choice(name, "aggregation", self.aggregation, AGGREGATIONS)


@dataclass(frozen=True)
class GRPOOptions:
    """GRPO: group-relative advantages, no value head, KL to θ_ckpt as a loss term (DeepSeekMath 2024, eq. 3)."""

    beta: float = 0.04
    """coefficient β of the KL loss term β·D_KL[π_θ || p_ckpt] (DeepSeekMath: 0.04)"""
    kl_estimator: str = "k3"
    """per-token KL estimator: "k1" = log π_θ - log p_ckpt, "k3" = exp(log p_ckpt - log π_θ) - (…) - 1 (eq. 4)"""
    clip_low: float = 0.2
    """ε_low: the ratio is clipped below at 1 - ε_low"""
    clip_high: float = 0.2
    """ε_high: the ratio is clipped above at 1 + ε_high (DAPO's clip-higher uses 0.28)"""
    aggregation: str = "sequence"
    """"sequence": 1/G Σ_i 1/|o_i| Σ_t (DeepSeekMath eq. 3); "token": mean over all valid tokens (DAPO §3.3)"""
    normalize_std: bool = True
    """divide r_i - mean(r_group) by std(r_group) + eps (off: Dr. GRPO, Liu et al. 2025)"""
    std_eps: float = 1e-4
    """eps in (r_i - mean) / (std + eps)"""

    def __post_init__(self) -> None:
        name = type(self).__name__
        _check_range(name, "beta", self.beta, 0.0, float("inf"))
        _check_choice(name, "kl_estimator", self.kl_estimator, KL_ESTIMATORS)
        _check_range(name, "clip_low", self.clip_low, 0.0, 1.0, lo_open=True)
        _check_range(name, "clip_high", self.clip_high, 0.0, float("inf"), lo_open=True)
        _check_choice(name, "aggregation", self.aggregation, AGGREGATIONS)
        _check_range(name, "std_eps", self.std_eps, 0.0, float("inf"), lo_open=True)


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


# ---------------------------------------------------------------------------------------------- log-probs
def encode_prompts(policy: PolicyLM, batch: Batch) -> Encoded | None:
    """The policy's own encoder over the prompts (encoder-decoder); None for decoder-only models.

    Gradient follows the encoder's ``requires_grad``; a trainer holding a frozen ``SharedEncoder`` (as
    ``QModel.encode``) should pass that output to ``policy_forward`` instead."""
    if policy.kind != ENCODER_DECODER:
        return None
    hidden = policy.lm.get_encoder()(input_ids=batch.prompt_ids, attention_mask=batch.prompt_mask).last_hidden_state
    return Encoded(hidden, batch.prompt_mask)


def taken_logprobs(logits: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log π(a_t | s_t) = ℓ(s_t, a_t) - log Σ_a exp ℓ(s_t, a), float32 [B, T], 0 at padding.

    Uses ``q_model.token_logit_stats`` (one fused op: ℓ[a_t] and log Z, backward = one [N, V] gradient)."""
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(actions.shape):
        raise ValueError(f"logits {tuple(logits.shape)} and actions {tuple(actions.shape)}: expected [B, T, V] "
                         f"and [B, T]")
    _check_like(mask, actions=actions)
    every_row = torch.ones(actions.shape[0], dtype=torch.bool, device=logits.device)
    _, taken, log_z = token_logit_stats(logits, actions, every_row)
    logp = taken.float() - log_z                                            # log softmax at the taken token
    return torch.where(mask.bool(), logp, torch.zeros_like(logp))


def token_entropy(logits: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """H(π(·|s_t)) = log Z - Σ_a π(a|s_t) ℓ(s_t, a), float32 [B, T], 0 at padding (a dense [B, T, V] softmax)."""
    lf = logits.float()
    log_z = torch.logsumexp(lf, dim=-1)
    entropy = log_z - (lf.softmax(-1) * lf).sum(-1)
    return torch.where(mask.bool(), entropy, torch.zeros_like(entropy))


class ValueHead(nn.Module):
    """PPO's critic on the policy's own hidden states: V(s_t) = w·h_t + b (a shared trunk, one forward).

    Initialised with w ~ N(0, 0.02²), b = 0 from its own generator (no global RNG state). The value loss's gradient
    reaches the policy's trunk through h_t unless the caller detaches it."""

    def __init__(self, hidden_size: int, *, seed: int = 0):
        super().__init__()
        if hidden_size <= 0:
            raise ValueError(f"ValueHead: hidden_size must be positive, got {hidden_size}")
        self.linear = nn.Linear(hidden_size, 1)
        generator = torch.Generator().manual_seed(seed)
        with torch.no_grad():
            self.linear.weight.copy_(torch.randn(self.linear.weight.shape, generator=generator) * 0.02)
            self.linear.bias.zero_()

    @classmethod
    def for_policy(cls, policy: PolicyLM, *, seed: int = 0) -> "ValueHead":
        """A head sized for ``policy``'s hidden states (the LM head's input width), on its device."""
        head_weight = policy.lm.get_output_embeddings().weight                # [V, d]
        return cls(int(head_weight.shape[1]), seed=seed).to(device=head_weight.device)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        """[B, T, d] hidden states of s_t -> [B, T] float32 values V(s_t)."""
        if hidden.shape[-1] != self.linear.in_features:
            raise ValueError(f"ValueHead: hidden size {hidden.shape[-1]}, head expects {self.linear.in_features}")
        return self.linear(hidden.to(self.linear.weight.dtype)).squeeze(-1).float()


@dataclass
class PolicyOutputs:
    """Per-token outputs of one teacher-forced policy forward ([B, T] each, 0 at padding)."""
    logprobs: torch.Tensor                 # log π_θ(a_t | s_t)
    values: torch.Tensor | None = None     # V(s_t) from the value head (PPO), else None
    entropy: torch.Tensor | None = None    # H(π_θ(·|s_t)) when asked for, else None


def policy_forward(policy: PolicyLM, batch: Batch, *, encoded: Encoded | None = None,
                   value_head: ValueHead | None = None, with_entropy: bool = False) -> PolicyOutputs:
    """Log-probs of the taken tokens (and V(s_t), H_t) from ONE pass of the policy's decoder.

    The hidden states come from ``PolicyLM.states`` (positions as in ``q_model``'s docstring: decoder-only reads
    [left-padded prompt, w_0 … w_{T-2}], encoder-decoder [decoder_start, w_0 … w_{T-2}]) and the logits from
    ``PolicyLM.logits``; the value head reads the same hidden states."""
    if encoded is None:
        encoded = encode_prompts(policy, batch)
    hidden = policy.states(batch, encoded)                                  # s_0 … s_{T-1}: [B, T, d]
    logits = policy.logits(hidden)
    mask = batch.program_mask
    logp = taken_logprobs(logits, batch.program_ids, mask)
    values = None
    if value_head is not None:
        v = value_head(hidden)
        values = torch.where(mask.bool(), v, torch.zeros_like(v))
    entropy = token_entropy(logits, mask) if with_entropy else None
    return PolicyOutputs(logp, values, entropy)


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
    (1/T_b Σ_t x·m) (DeepSeekMath eq. 3; ``losses._per_program_mean``, the 1/T of B-Coder's eq. 12/15)."""
    _check_choice("aggregate", "mode", mode, AGGREGATIONS)
    _check_like(mask, per_token=per_token)
    if mode == "token":
        return _masked_mean_t(per_token, mask)
    return per_program_mean(per_token, mask)


# ---------------------------------------------------------------------------------------------- PPO
def ppo_token_rewards(old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor, reward: torch.Tensor,
                      mask: torch.Tensor, beta: float) -> torch.Tensor:
    """r_t = -β·(log π_old(a_t|s_t) - log p_ckpt(a_t|s_t)) + [t = T_b - 1]·r_b (baselines.md §2; Ziegler et al.
    2019 eq. 2 per token), float32 [B, T], 0 at padding; constants (no gradient)."""
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
                   options: PPOOptions) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Once per batch of fresh samples, before the PPO epochs: (advantages Â_t (whitened if asked), returns R_t,
    per-token rewards r_t), all [B, T], detached. ``old_values`` are the value head's V(s_t) at sampling time."""
    rewards = ppo_token_rewards(old_logprobs, ref_logprobs, reward, mask, options.beta)
    advantages, returns = gae(rewards, old_values, mask, options.gamma, options.lam)
    if options.whiten_advantages:
        advantages = whiten(advantages, mask, options.whiten_eps)          # returns stay unwhitened
    return advantages, returns, rewards


def ppo_loss(outputs: PolicyOutputs, old_logprobs: torch.Tensor, old_values: torch.Tensor,
             advantages: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
             options: PPOOptions) -> tuple[torch.Tensor, dict[str, float]]:
    """L = L_clip + c_v·L_V - c_H·H (PPO eq. 9, as a loss) for one mini-batch; ``outputs`` from ``policy_forward``
    with the value head (and ``with_entropy=True`` when ``options.entropy_coef`` > 0)."""
    if outputs.values is None:
        raise ValueError("ppo_loss: outputs.values is None; call policy_forward with the value head")
    if options.entropy_coef > 0 and outputs.entropy is None:
        raise ValueError("ppo_loss: entropy_coef > 0 but outputs.entropy is None; call policy_forward with "
                         "with_entropy=True")
    pg, metrics = clipped_surrogate(outputs.logprobs, old_logprobs, advantages, mask, options.clip_low,
                                    options.clip_high, options.aggregation)
    vf, v_metrics = value_loss(outputs.values, old_values, returns, mask, options.value_clip, options.aggregation)
    loss = pg + options.value_coef * vf
    entropy = outputs.entropy
    if entropy is not None and options.entropy_coef > 0:
        loss = loss - options.entropy_coef * aggregate(entropy, mask, options.aggregation)
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
              options: GRPOOptions) -> tuple[torch.Tensor, dict[str, float]]:
    """GRPO objective (DeepSeekMath eq. 3) as a loss: agg(-min(ρ_t Â_i, clip(ρ_t, 1-ε_low, 1+ε_high) Â_i))
    + β·agg(KL_t), KL_t the k1 or k3 estimate against θ_ckpt (eq. 4); ``advantages`` [B] from ``group_advantages``.
    Both aggregations are linear, so this equals eq. 3's agg(-surrogate + β·KL) term by term."""
    _check_like(mask, logprobs=logprobs, old_logprobs=old_logprobs, ref_logprobs=ref_logprobs)
    _check_rows(mask, advantages=advantages)
    pg, metrics = clipped_surrogate(logprobs, old_logprobs, advantages, mask, options.clip_low, options.clip_high,
                                    options.aggregation)
    kl = kl_per_token(logprobs, ref_logprobs, options.kl_estimator)
    kl = torch.where(mask.bool(), kl, torch.zeros_like(kl))
    kl_term = aggregate(kl, mask, options.aggregation)
    loss = pg + options.beta * kl_term                                      # eq. 3, negated
    adv = advantages.detach().float()
    metrics.update({"loss": float(loss.detach()), "policy_loss": float(pg.detach()), "kl": float(kl_term.detach()),
                    "advantage_mean": float(adv.mean()) if adv.numel() else 0.0,
                    "zero_advantage_fraction": float((adv == 0).float().mean()) if adv.numel() else 0.0})
    return loss, metrics


__all__ = ["AGGREGATIONS", "KL_ESTIMATORS", "GRPOOptions", "PPOOptions", "PolicyOutputs", "ValueHead",
           "aggregate", "clipped_surrogate", "encode_prompts", "gae", "group_advantages", "grpo_loss",
           "kl_per_token", "per_token_column", "policy_forward", "ppo_advantages", "ppo_loss",
           "ppo_token_rewards", "taken_logprobs", "token_entropy", "value_loss", "whiten"]
