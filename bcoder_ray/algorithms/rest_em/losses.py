"""ReST-EM / expert iteration (Singh et al. 2023; docs/baselines.md §3): the M-step's loss.

E-step: the rollout samples programs from the current policy and executes them (unchanged pipeline).
M-step: maximise J(θ) = E_{(x,y)∈D_i}[r(x,y) log p_θ(y|x)] with r ∈ {0, 1} (pass or not) (Singh et al. §3),
i.e. cross-entropy on the programs of iteration i that passed. Which rows those are (`RestEM.m_step_rows`, buffer
filters) and whether each M-step restarts from θ_ckpt (`RestEMConfig.restart_from_ckpt`) are the plug-in's
(`bcoder_ray.algorithms.rest_em.algorithm`).

Public API
----------
- ``PASSED_REWARD``: r of a passing program (eq. 2: +1), ``envs.result.REWARD[Outcome.PASSED]``.
- ``rest_em_loss(policy, batch, *, encoded=None, reduction="mean") -> (loss, metrics)``: the M-step's CE.
"""

from __future__ import annotations

import torch

from bcoder_ray.algorithms.common import AUX_REDUCTIONS, policy_forward
from bcoder_ray.model.batch import Batch, per_program_mean
from bcoder_ray.model.lm import Encoded, PolicyLM
from envs.result import REWARD, Outcome

PASSED_REWARD = REWARD[Outcome.PASSED]


def rest_em_loss(policy: PolicyLM, batch: Batch, *, encoded: Encoded | None = None,
                 reduction: str = "mean") -> tuple[torch.Tensor, dict[str, float]]:
    """-J(θ) of the M-step: mean over programs of Σ_t (or mean_t) -log p_θ(w_t | s_t), the cross-entropy of
    eq. 1 as ``bcoder_ray.algorithms.bcoder.losses.theta_loss``'s L_ce computes it (log Z - ℓ[a_t] via
    ``bcoder_ray.model.lm.token_logit_stats``; ``reduction`` as its ``aux_reduction``, ``AUX_REDUCTIONS``).

    Every row must be a passing program (r = +1; r ∈ {0, 1} weights the others out of J); the error names the
    first row that is not, so a selection bug cannot silently train on failures."""
    if reduction not in AUX_REDUCTIONS:
        raise ValueError(f"rest_em_loss: reduction must be one of {AUX_REDUCTIONS}, got {reduction!r}")
    bad = torch.nonzero(batch.reward != PASSED_REWARD).flatten()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"rest_em_loss: row {i} has reward {float(batch.reward[i])}, the M-step trains only on "
                         f"passing programs (reward {PASSED_REWARD}); RestEM.m_step_rows selects them")
    nll = -policy_forward(policy, batch, encoded=encoded).logprobs          # -log p_θ(w_t | s_t), 0 at padding
    mask = batch.program_mask
    if reduction == "mean":
        loss = per_program_mean(nll, mask)
    else:
        loss = (nll * mask.to(nll.dtype)).sum(1).mean()
    tokens = int(mask.sum())
    return loss, {"l_ce": float(loss.detach()), "n_programs": float(batch.size), "n_tokens": float(tokens),
                  "n_human": float(batch.is_human.sum())}
