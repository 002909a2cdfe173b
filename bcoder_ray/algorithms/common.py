"""What more than one algorithm family uses: the teacher-forced forward of a trained LM policy (CodeRL's actor,
PPO, GRPO, ReST-EM, SFT), the per-program reductions of the cross-entropy terms (B-Coder, ReST-EM, SFT, CodeRL)
and the cross-entropy of eq. 1 itself (ReST-EM's M-step, SFT).

Pure PyTorch over the learner's padded ``Batch`` (``bcoder_ray.model.batch``); no Ray, no config.

Public API
----------
- ``AUX_REDUCTIONS = ("sum", "mean")``: per program, the sum of the token terms (the equations as written) or their
  mean over the program's tokens; then the mean over programs.
- ``taken_logprobs(logits, actions, mask) -> [B, T]``: log π(a_t | s_t) of the taken tokens, 0 at padding.
- ``token_entropy(logits, mask) -> [B, T]``: H(π(·| s_t)), 0 at padding.
- ``ValueHead(hidden_size, *, seed=0)``, ``ValueHead.for_policy(policy, *, seed=0)``: V(s_t) = Linear(h_t) (PPO's
  critic; `lm_policy` saves it beside the LM).
- ``PolicyOutputs``; ``policy_forward(policy, batch, *, encoded=None, value_head=None, with_entropy=False)``:
  log-probs (+ values, + entropy) from ONE teacher-forced forward of the policy (the prompts through the policy's
  own encoder, ``PolicyLM.encode``, unless an encoder output is given).
- ``cross_entropy(policy, batch, *, rows=None, encoded=None, reduction="mean") -> (loss, metrics)``: the CE of eq. 1
  on the programs ``rows`` selects (every row by default), as B-Coder's L_ce computes it.

Conventions: program w_0 … w_{T-1}, state s_t = (prompt, w_<t), action a_t = w_t; ``mask`` is the batch's
``program_mask`` ([B, T], right-padded).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

import torch
from torch import nn

from bcoder_ray.model.batch import Batch
from bcoder_ray.model.lm import Encoded, PolicyLM, token_logit_stats

AUX_REDUCTIONS = ("sum", "mean")


def read_saved_meta(directory: str, meta_file: str, expected_format: str, saved_by: str) -> dict:
    """The JSON `meta_file` a network's `save` writes beside its weights, refused unless its "format" is
    `expected_format` (a folder another saver wrote, or none at all, names `saved_by` in the error)."""
    path = os.path.join(directory, meta_file)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: missing; {directory} was not saved by {saved_by}")
    with open(path) as f:
        meta = json.load(f)
    if meta.get("format") != expected_format:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {expected_format!r}")
    return meta


def taken_logprobs(logits: torch.Tensor, actions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log π(a_t | s_t) = ℓ(s_t, a_t) - log Σ_a exp ℓ(s_t, a), float32 [B, T], 0 at padding.

    Uses ``bcoder_ray.model.lm.token_logit_stats`` (one fused op: ℓ[a_t] and log Z, backward = one [N, V]
    gradient)."""
    if logits.dim() != 3 or tuple(logits.shape[:2]) != tuple(actions.shape):
        raise ValueError(f"logits {tuple(logits.shape)} and actions {tuple(actions.shape)}: expected [B, T, V] "
                         f"and [B, T]")
    if tuple(mask.shape) != tuple(actions.shape):
        raise ValueError(f"actions has shape {tuple(actions.shape)}, the mask has {tuple(mask.shape)}")
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

    The hidden states come from ``PolicyLM.states`` (positions as in ``bcoder_ray.model.lm``'s ``Trunk``:
    decoder-only reads [left-padded prompt, w_0 … w_{T-2}], encoder-decoder [decoder_start, w_0 … w_{T-2}]) and the
    logits from ``PolicyLM.logits``; the value head reads the same hidden states. Without ``encoded`` the prompts go
    through the policy's own encoder (``PolicyLM.encode``, with gradient when the encoder has ``requires_grad``); a
    trainer holding a frozen ``SharedEncoder`` passes that output instead."""
    if encoded is None:
        encoded = policy.encode(batch.prompt_ids, batch.prompt_mask)
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


def cross_entropy(policy: PolicyLM, batch: Batch, *, rows: torch.Tensor | None = None, encoded: Encoded | None = None,
                  reduction: str = "mean") -> tuple[torch.Tensor, dict[str, float]]:
    """The cross-entropy of eq. 1 on the programs ``rows`` selects (bool [B]; None: every row): per program Σ_t
    (``reduction="sum"``, eq. 1 as written) or mean_t of -log p_θ(w_t | s_t) = log Z - ℓ[a_t] (``policy_forward``),
    then the mean over the selected programs; ``reduction`` as B-Coder's ``aux_reduction`` (``AUX_REDUCTIONS``), so
    this is ``bcoder_ray.algorithms.bcoder.losses.theta_loss``'s L_ce when ``rows`` is ``Batch.ground_truth``.

    One forward over the whole batch; with no row selected the loss is 0, still computed from the forward (every
    trained parameter gets a zero gradient, so backward and DDP behave as on any other step). Metrics:
    ``l_ce``, ``n_programs`` and ``n_tokens`` (the selected programs and their tokens), ``n_human`` (the selected
    human rows)."""
    if reduction not in AUX_REDUCTIONS:
        raise ValueError(f"cross_entropy: reduction must be one of {AUX_REDUCTIONS}, got {reduction!r}")
    nll = -policy_forward(policy, batch, encoded=encoded).logprobs          # -log p_θ(w_t | s_t), 0 at padding
    mask = batch.program_mask.to(nll.dtype)
    per_program = (nll * mask).sum(1)
    if reduction == "mean":
        per_program = per_program / mask.sum(1).clamp_min(1.0)
    if rows is None:
        rows = torch.ones(batch.size, dtype=torch.bool, device=nll.device)
        loss = per_program.mean()
    else:
        rows = rows.to(device=nll.device, dtype=torch.bool)
        loss = per_program[rows].mean() if bool(rows.any()) else per_program.sum() * 0.0
    metrics = {"l_ce": float(loss.detach()), "n_programs": float(rows.sum()),
               "n_tokens": float(batch.program_mask[rows].sum()), "n_human": float((batch.is_human & rows).sum())}
    return loss, metrics


__all__ = ["AUX_REDUCTIONS", "PolicyOutputs", "ValueHead", "cross_entropy", "policy_forward", "taken_logprobs",
           "token_entropy"]
