"""The `ppo` and `grpo` configs (`algorithm:` in a run's config): the plug-ins
(`bcoder_ray.algorithms.policy_gradient.algorithm`) and the losses (`bcoder_ray.algorithms.policy_gradient.losses`)
read the same object. Each field's range is checked when the config is parsed (pydantic's error names the field).
"""

from __future__ import annotations

from typing import Literal

from pydantic import Field

from bcoder_ray.algorithms.base import AlgorithmConfig


class PPOConfig(AlgorithmConfig):
    """PPO-clip with a value head, GAE and a per-token KL penalty against θ_ckpt (docs/baselines.md §2)."""

    name: str = "ppo"
    """The registered algorithm: ppo."""
    gamma: float = Field(1.0, ge=0.0, le=1.0)
    """Discount of the returns and of GAE (1: the KL-penalised return of the whole program)."""
    beta: float = Field(0.05, ge=0.0)
    """Coefficient β of the per-token KL penalty -β·(log π_old - log p_ckpt) folded into the rewards."""
    lam: float = Field(0.95, ge=0.0, le=1.0)
    """λ of generalised advantage estimation (Schulman et al. 2016, eq. 16)."""
    clip_low: float = Field(0.2, gt=0.0, le=1.0)
    """ε_low: the ratio is clipped below at 1 - ε_low (PPO eq. 7)."""
    clip_high: float = Field(0.2, gt=0.0)
    """ε_high: the ratio is clipped above at 1 + ε_high (= ε_low in PPO; larger is DAPO's clip-higher)."""
    value_clip: float | None = Field(0.2, gt=0.0)
    """Clip range of the value update around the old values (PPO2 / OpenAI baselines); null: unclipped value
    loss."""
    value_coef: float = Field(0.1, ge=0.0)
    """Weight of the value loss in the total loss."""
    entropy_coef: float = Field(0.0, ge=0.0)
    """Weight of the entropy bonus (subtracted from the loss); 0 skips computing the entropy."""
    whiten_advantages: bool = True
    """Normalise the advantages to mean 0, std 1 over each mini-batch's valid tokens."""
    whiten_eps: float = Field(1e-8, gt=0.0)
    """ε in (Â - mean) / (std + ε) of the whitening."""
    aggregation: Literal["token", "sequence"] = "token"
    """token: the mean of the per-token losses over all valid tokens; sequence: the mean over each sequence's
    tokens, then over sequences."""


class GRPOConfig(AlgorithmConfig):
    """GRPO: group-relative advantages, no value head, KL to θ_ckpt as a loss term (DeepSeekMath 2024, eq. 3)."""

    name: str = "grpo"
    """The registered algorithm: grpo."""
    beta: float = Field(0.04, ge=0.0)
    """Coefficient β of the KL loss term β·KL[π_θ || p_ckpt] (DeepSeekMath: 0.04)."""
    kl_estimator: Literal["k1", "k3"] = "k3"
    """Per-token KL estimator: k1 = log π_θ - log p_ckpt, k3 = exp(-k1) + k1 - 1 (DeepSeekMath eq. 4)."""
    clip_low: float = Field(0.2, gt=0.0, le=1.0)
    """ε_low: the ratio is clipped below at 1 - ε_low."""
    clip_high: float = Field(0.2, gt=0.0)
    """ε_high: the ratio is clipped above at 1 + ε_high (DAPO's clip-higher: 0.28)."""
    aggregation: Literal["token", "sequence"] = "sequence"
    """sequence: 1/G Σ_i 1/|o_i| Σ_t, the mean over each program's tokens, then over programs (DeepSeekMath eq. 3);
    token: the mean over all valid tokens (DAPO §3.3)."""
    normalize_std: bool = True
    """Â = (r - mean_group) / (std_group + std_eps); false: r - mean_group (Dr. GRPO, Liu et al. 2025)."""
    std_eps: float = Field(1e-4, gt=0.0)
    """ε of the std normalisation (r_i - mean) / (std + ε)."""
