"""Frozen-target caching: what the frozen networks say about a program, computed once and stored beside it.

Public API
----------
- ``frozen_target_tensors(model, batch, encoded=None, *, with_v_phi=None) -> FrozenTargets``: tensors [B, T]
  (no gradient) — ``target_actions`` (int64), ``a_ckpt`` (float32), ``v_phi`` (float32 or None). Needs ``model.ckpt``
  (θ_ckpt), and ``model.phi`` for ``v_phi``. The losses call this for live targets.
- ``compute_frozen_targets(model, batch, *, with_v_phi=None) -> list[dict]``: the same, one dict per program of the
  batch (a ``Batch``, or buffer rows with ``prompt_ids`` and ``program_ids``, collated with ``model.pad_id``), each value a list as long as that program's ``program_ids`` — the replay buffer's columns
  ``target_actions`` (list[int]), ``a_ckpt`` (list[float]) and, when φ is held, ``v_phi`` (list[float]).
  ``with_v_phi`` defaults to "when the model holds φ".
- ``targets_fingerprint(checkpoint, tokenizer, *, max_prompt_len, max_program_len, alpha, phi_checkpoint=None,
  prompt_format="", dtype="float32", revision=None) -> str``: identifies everything the stored targets depend on — the
  checkpoint's weights (local dirs: names, sizes and the first/last MiB of every weight/config file; hub names: the
  name and its ``revision`` when one is set, so fingerprints without a revision are unchanged), the
  tokenizer's content (``tokenization.tokenizer_fingerprint``), the truncation lengths, α, the φ checkpoint when
  ``v_phi`` is stored, the prompt construction (``prompt_format``: a version string of how prompt text is built),
  and the compute dtype. Recompute a row's targets when its fingerprint differs.

Per-token meaning (program w_0 … w_{T-1}, state s_t = (prompt, w_<t)):
  target_actions[t] = â_{t+1} = argmax_a p_ckpt(a | s_{t+1}) for t < T-1; -1 at t = T-1 (terminal: no bootstrap).
  a_ckpt[t] = A_ckpt(s_t, w_t) = α(ℓ_ckpt(s_t, w_t) - max_a ℓ_ckpt(s_t, a)) ≤ 0 (eq. 9).
  v_phi[t] = raw v_φ(s_t) (V_φ(s_t) = R_max - softabs(v_phi[t]), G.1).
Why these suffice: A_ckpt(s', â') = 0, so stage φ's target is γ·V_φ(s') and needs no target action; stage θ reads
Q_θ(s_{t+1}, â_{t+1}) from its own forward and needs only â_{t+1} and the frozen v_φ.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Mapping, Sequence

import torch

from bcoder_ray.model.batch import Batch, collate
from bcoder_ray.algorithms.bcoder.q_model import Encoded, QModel
from bcoder_ray.model.lm import checkpoint_identity
from bcoder_ray.model.tokenization import tokenizer_fingerprint


NO_ACTION = -1  # target_actions at the terminal step and at padding
TARGET_COLUMNS = ("target_actions", "a_ckpt", "v_phi")  # the buffer's per-token columns (v_phi: when φ is held)


@dataclass
class FrozenTargets:
    """The frozen targets of a batch, computed live (`frozen_target_tensors`) or read from its cached per-token
    columns (`cached`); a target the batch does not carry is None."""

    target_actions: torch.Tensor | None  # [B, T] int64, NO_ACTION at the terminal step and padding
    a_ckpt: torch.Tensor | None          # [B, T] float32, 0 at padding
    v_phi: torch.Tensor | None           # [B, T] float32, 0 at padding

    @classmethod
    def cached(cls, batch: Batch) -> "FrozenTargets":
        """The cached columns of `batch` (`Batch.tokens`, padded with 0: padding becomes NO_ACTION here)."""
        actions = batch.tokens.get("target_actions")
        if actions is not None:
            actions = actions.long().masked_fill(batch.program_mask == 0, NO_ACTION)
        return cls(actions, batch.tokens.get("a_ckpt"), batch.tokens.get("v_phi"))


def frozen_target_tensors(model: QModel, batch: Batch, encoded: Encoded | None = None, *,
                          with_v_phi: bool | None = None) -> FrozenTargets:
    if with_v_phi is None:
        with_v_phi = model.phi is not None
    if encoded is None:
        encoded = model.encode(batch)
    mask = batch.program_mask.bool()
    with torch.no_grad():
        logits = model.ckpt_logits(batch, encoded)                                   # ℓ_ckpt(s_t, ·)
        max_logit = logits.max(dim=-1).values
        taken = logits.gather(-1, batch.program_ids.unsqueeze(-1)).squeeze(-1)
        a_ckpt = (model.alpha * (taken - max_logit).float()).masked_fill(~mask, 0.0)   # eq. 9
        greedy = logits.argmax(dim=-1)                                                # argmax p_ckpt(· | s_t)
        target_actions = torch.full_like(greedy, NO_ACTION)
        has_next = mask[:, 1:]                                                        # t < T_b - 1
        target_actions[:, :-1] = greedy[:, 1:].masked_fill(~has_next, NO_ACTION)      # â_{t+1}
        v_phi = None
        if with_v_phi:
            v_phi = model.phi_raw_values(batch, encoded).masked_fill(~mask, 0.0)
    return FrozenTargets(target_actions, a_ckpt, v_phi)


def compute_frozen_targets(model: QModel, batch: Batch | Sequence[Mapping], *,
                           with_v_phi: bool | None = None) -> list[dict]:
    if not isinstance(batch, Batch):
        rows = [{"reward": 0.0, "is_human": False, **{k: r[k] for k in ("prompt_ids", "program_ids")}}
                for r in batch]
        batch = collate(rows, model.pad_id)
    device = next(model.parameters()).device
    batch = batch.to(device)
    targets = frozen_target_tensors(model, batch, with_v_phi=with_v_phi)
    lengths = batch.lengths.tolist()
    rows = []
    for b, length in enumerate(lengths):
        row = {"target_actions": targets.target_actions[b, :length].tolist(),
               "a_ckpt": targets.a_ckpt[b, :length].tolist()}
        if targets.v_phi is not None:
            row["v_phi"] = targets.v_phi[b, :length].tolist()
        rows.append(row)
    return rows


def targets_fingerprint(checkpoint: str, tokenizer, *, max_prompt_len: int, max_program_len: int, alpha: float,
                        phi_checkpoint: str | None = None, prompt_format: str = "",
                        dtype: str = "float32", revision: str | None = None) -> str:
    parts = {
        "checkpoint": checkpoint_identity(checkpoint, revision),
        "tokenizer": tokenizer_fingerprint(tokenizer),
        "max_prompt_len": int(max_prompt_len),
        "max_program_len": int(max_program_len),
        "alpha": float(alpha),
        "phi": checkpoint_identity(phi_checkpoint) if phi_checkpoint else None,
        "prompt_format": prompt_format,
        "dtype": dtype,
    }
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:16]
