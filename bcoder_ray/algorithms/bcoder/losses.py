"""The B-Coder losses: stage φ (eq. 12) and stage θ (eq. 17 = β_td·eq. 15 + β_adv·eq. 8 + β_ce·CE of π_θ; β_td = 1
in the paper).

Public API
----------
- ``phi_loss(model, batch, *, gamma, dropout_free_targets=True, encoded=None, rows=None) -> (loss, metrics)``:
  L_V of eq. 12.
- ``theta_loss(model, batch, *, gamma, beta_adv=0.1, beta_ce=0.5, beta_td=1.0, operator="conservative",
  aux_reduction="sum", dropout_free_targets=True, encoded=None, rows=None) -> (loss, metrics)``: L_ft of eq. 17
  for θ.
``rows``, a dict when given, receives per-row tensors [B] (detached): ``td_error``, the mean |δ_t| over the
program's valid tokens (the priority prioritized replay records, `bcoder_ray.buffer.priorities`).
- ``OPERATORS = ("conservative", "optimality")``; ``AUX_REDUCTIONS = ("sum", "mean")``.
``loss`` is a scalar tensor (backward it); ``metrics`` is a dict of floats: phi — ``l_v``, ``td_error`` (mean |TD|
over valid tokens), ``v_mean``, ``q_mean``, ``target_mean`` (mean TD target y); theta — ``l_q``, ``l_adv``, ``l_ce``,
``loss``, ``td_error``, ``v_mean``, ``q_mean``, ``target_mean``, ``adv_mean``, ``n_human``.

Targets come from the batch's cached per-token columns when present (``FrozenTargets.cached``, in
``bcoder_ray.algorithms.bcoder.targets``), else live from the frozen networks the model holds (θ_ckpt; and φ for stage
θ), without gradient. Cached and live give the same loss.

Conventions (program w_0 … w_{T-1}, state s_t, action a_t = w_t, reward r at the last step only):
- TD target y_t = γ·SG(bootstrap(s_{t+1})) for t < T-1 (r_t = 0), and y_{T-1} = r (terminal: no bootstrap).
- Stage φ, eq. 12: Q_φ(s_t, a_t) = A_ckpt(s_t, a_t) + V_φ(s_t) (eq. 11); the conservative target action
  â = argmax p_ckpt has A_ckpt(s', â) = 0, so bootstrap(s') = V_φ(s'). The optimality operator gives the same
  (max_a A_ckpt = 0), so stage φ has no operator option.
- Stage θ, eq. 15: bootstrap(s') = Q_θ(s', â') with â' = argmax p_ckpt(·|s') (conservative operator, eq. 14), or
  max_a Q_θ(s', a) = V_θ(s') (optimality operator, eq. 13, the Figure 1 ablation: the dueling advantage's max is 0).
  Both read from a teacher-forced forward of θ, detached.
- The bootstrap of the network being trained (V_φ(s') in stage φ, Q_θ(s', ·) in stage θ) carries no dropout when
  ``dropout_free_targets`` (the default) and the network has dropout (`has_dropout`: T5 / CodeT5 use 0.1): it is
  read from a second, no-grad forward in eval mode, while the prediction Q(s_t, a_t) keeps the training forward's
  dropout. Without dropout, or with ``dropout_free_targets=False``, it is read from the training forward itself.
- Normalisation of L_V and L_Q (the 1/T of eq. 12, 15): mean of the squared TD error over a program's valid
  (non-padding) tokens, then mean over the programs of the batch, each program's term times its importance
  weight `Batch.weight` (1 unless the replay sampler is prioritized); L_adv and L_ce weigh their rows alike
  (human rows are read uniformly: weight 1).
- L_adv (eq. 8) and L_ce (π_θ = softmax(Q_θ/α) = softmax(ℓ_θ), since Q_θ/α is ℓ_θ shifted per state) on ground-truth
  programs only (`Batch.ground_truth`: human programs that pass their tests), averaged over them of the batch (0 when there are none). Per program,
  ``aux_reduction="sum"`` sums over its tokens (eq. 8 and eq. 1 as written); ``"mean"`` averages over its tokens.
- ``beta_td`` weighs L_Q (1: eq. 17 as written). With ``beta_td=0`` the loss is exactly β_adv·L_adv + β_ce·L_ce (the
  TD term is still computed, for its metrics, and enters as 0·L_Q); neither term reads V_φ or the target actions â,
  so θ then learns nothing from stage φ (the control `bcoder_no_td` of experiments/compare.py).
- "Plain dueling DQN" (skip the LM initialisation) is a property of the model: ``QModel.create(...,
  init_from_lm=False)``; the losses are unchanged (pair it with ``operator="optimality"`` for Figure 1's curve).
"""

from __future__ import annotations

import torch

from torch import nn

from bcoder_ray.algorithms.common import AUX_REDUCTIONS
from bcoder_ray.model.batch import Batch, masked_mean, per_program_mean, per_program_means
from bcoder_ray.algorithms.bcoder.q_model import Encoded, QModel, capped_value
from bcoder_ray.model.lm import eval_mode, has_dropout
from bcoder_ray.algorithms.bcoder.targets import FrozenTargets, frozen_target_tensors

OPERATORS = ("conservative", "optimality")


def _terminal_mask(batch: Batch) -> torch.Tensor:
    """[B, T] True at each program's last valid token."""
    last = (batch.lengths - 1).clamp_min(0)
    positions = torch.arange(batch.program_ids.shape[1], device=batch.program_ids.device)
    return positions.unsqueeze(0) == last.unsqueeze(1)


def td_targets(next_values: torch.Tensor, batch: Batch, gamma: float) -> torch.Tensor:
    """y_t = γ·SG(next_values[:, t+1]) for non-terminal t, r at the terminal step (next_values[:, t] is at s_t)."""
    shifted = torch.zeros_like(next_values)
    shifted[:, :-1] = next_values[:, 1:].detach()
    terminal = _terminal_mask(batch)
    reward = batch.reward.to(shifted.dtype).unsqueeze(1).expand_as(shifted)
    return torch.where(terminal, reward, gamma * shifted)


def own_target_pass(net: nn.Module, dropout_free_targets: bool) -> bool:
    """Whether the bootstrap of `net` (the network being trained) needs a forward of its own, without dropout."""
    return dropout_free_targets and net.training and has_dropout(net)


def phi_loss(model: QModel, batch: Batch, *, gamma: float, dropout_free_targets: bool = True,
             encoded: Encoded | None = None,
             rows: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """L_V (eq. 12): only φ's decoder and V head receive gradient."""
    if encoded is None:
        encoded = model.encode(batch)
    a_ckpt = FrozenTargets.cached(batch).a_ckpt
    if a_ckpt is None:
        a_ckpt = frozen_target_tensors(model, batch, encoded, with_v_phi=False).a_ckpt
    value = capped_value(model.phi_raw_values(batch, encoded), model.r_max)   # V_φ(s_t), G.1
    q = a_ckpt.float() + value                                                 # Q_φ(s_t, a_t), eq. 11
    next_value = value
    if own_target_pass(model.phi, dropout_free_targets):
        with torch.no_grad(), eval_mode(model.phi):
            next_value = capped_value(model.phi_raw_values(batch, encoded), model.r_max)
    target = td_targets(next_value, batch, gamma)                     # r + γ·SG(Q_φ(s', â')) = γ·V_φ(s')
    td = target - q
    mask = batch.program_mask.bool()
    loss = per_program_mean(td.pow(2), mask, batch.weight)
    if rows is not None:
        rows["td_error"] = per_program_means(td.detach().abs(), mask)
    metrics = {"l_v": float(loss.detach()), "td_error": masked_mean(td.detach().abs(), mask),
               "v_mean": masked_mean(value.detach(), mask), "q_mean": masked_mean(q.detach(), mask),
               "target_mean": masked_mean(target, mask)}
    return loss, metrics


def theta_loss(model: QModel, batch: Batch, *, gamma: float, beta_adv: float = 0.1, beta_ce: float = 0.5,
               beta_td: float = 1.0, operator: str = "conservative", aux_reduction: str = "sum",
               dropout_free_targets: bool = True, encoded: Encoded | None = None,
               rows: dict[str, torch.Tensor] | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """L_ft (eq. 17) = β_td·L_Q (eq. 15) + β_adv·L_adv (eq. 8) + β_ce·L_ce; only θ (decoder, LM head, h1) is
    trained."""
    if operator not in OPERATORS:
        raise ValueError(f"operator must be one of {OPERATORS}, got {operator!r}")
    if aux_reduction not in AUX_REDUCTIONS:
        raise ValueError(f"aux_reduction must be one of {AUX_REDUCTIONS}, got {aux_reduction!r}")
    if model.theta is None:
        raise ValueError("theta_loss: this QModel holds no θ")
    if encoded is None:
        encoded = model.encode(batch)
    needs_actions = operator == "conservative"
    needs_v_phi = model.theta.uses_phi
    cached = FrozenTargets.cached(batch)
    target_actions, v_phi = cached.target_actions, cached.v_phi
    if (needs_actions and target_actions is None) or (needs_v_phi and v_phi is None):
        live = frozen_target_tensors(model, batch, encoded, with_v_phi=needs_v_phi and v_phi is None)
        target_actions = target_actions if target_actions is not None else live.target_actions
        v_phi = v_phi if v_phi is not None else live.v_phi

    human = batch.ground_truth  # L_adv and L_ce read ground-truth programs only (human, passing its tests)
    out = model.theta_outputs(batch, encoded, v_phi if needs_v_phi else None, lse_rows=human)
    mask = batch.program_mask.bool()
    target_out = out
    if own_target_pass(model.theta, dropout_free_targets):
        with torch.no_grad(), eval_mode(model.theta):
            target_out = model.theta_outputs(batch, encoded, v_phi if needs_v_phi else None)
    if needs_actions:
        # target_actions[:, t] = â_{t+1} is an action in state s_{t+1}: read Q_θ(s_{t+1}, â_{t+1}) at index t+1
        actions_here = torch.zeros_like(batch.program_ids)
        actions_here[:, 1:] = target_actions[:, :-1]
        bootstrap = target_out.q_of(actions_here, model.alpha)               # conservative operator, eq. 14
    else:
        bootstrap = target_out.value                                        # max_a Q_θ(s', a) = V_θ(s'), eq. 13
    target = td_targets(bootstrap, batch, gamma)
    td = target - out.q
    l_q = per_program_mean(td.pow(2), mask, batch.weight)                 # eq. 15
    if rows is not None:
        rows["td_error"] = per_program_means(td.detach().abs(), mask)

    n_human = int(human.sum())
    l_adv = l_ce = out.q.new_zeros(())
    if n_human:
        h_mask = mask[human].float()
        per_token_adv = out.advantage[human].abs()                          # eq. 8: |A_θ(s*_t, a*_t)|
        per_token_ce = (out.log_z - out.taken_logit).float()[human]         # -log π_θ(a*_t | s*_t)
        norm = h_mask.sum(1).clamp_min(1.0) if aux_reduction == "mean" else torch.ones_like(h_mask[:, 0])
        h_weight = batch.weight[human]
        l_adv = ((per_token_adv * h_mask).sum(1) / norm * h_weight).mean()
        l_ce = ((per_token_ce * h_mask).sum(1) / norm * h_weight).mean()
    loss = beta_td * l_q + beta_adv * l_adv + beta_ce * l_ce                # eq. 17 (β_td = 1 in the paper)
    metrics = {"loss": float(loss.detach()), "l_q": float(l_q.detach()), "l_adv": float(l_adv.detach()),
               "l_ce": float(l_ce.detach()),
               "td_error": masked_mean(td.detach().abs(), mask), "v_mean": masked_mean(out.value.detach(), mask),
               "q_mean": masked_mean(out.q.detach(), mask), "target_mean": masked_mean(target, mask),
               "adv_mean": masked_mean(out.advantage.detach(), mask),
               "n_human": float(n_human)}
    return loss, metrics

