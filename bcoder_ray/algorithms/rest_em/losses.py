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

from bcoder_ray.algorithms.common import AUX_REDUCTIONS, cross_entropy
from bcoder_ray.model.batch import Batch
from bcoder_ray.model.lm import Encoded, PolicyLM
from envs.result import REWARD, Outcome

PASSED_REWARD = REWARD[Outcome.PASSED]


def rest_em_loss(policy: PolicyLM, batch: Batch, *, encoded: Encoded | None = None,
                 reduction: str = "mean") -> tuple[torch.Tensor, dict[str, float]]:
    """-J(θ) of the M-step: mean over programs of Σ_t (or mean_t) -log p_θ(w_t | s_t), the cross-entropy of
    eq. 1 on every row of the batch (``bcoder_ray.algorithms.common.cross_entropy``, which computes it as
    ``bcoder_ray.algorithms.bcoder.losses.theta_loss``'s L_ce does; ``reduction`` as its ``aux_reduction``).

    Every row must be a passing program (r = +1; r ∈ {0, 1} weights the others out of J); the error names the
    first row that is not, so a selection bug cannot silently train on failures."""
    if reduction not in AUX_REDUCTIONS:
        raise ValueError(f"rest_em_loss: reduction must be one of {AUX_REDUCTIONS}, got {reduction!r}")
    bad = torch.nonzero(batch.reward != PASSED_REWARD).flatten()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"rest_em_loss: row {i} has reward {float(batch.reward[i])}, the M-step trains only on "
                         f"passing programs (reward {PASSED_REWARD}); RestEM.m_step_rows selects them")
    return cross_entropy(policy, batch, encoded=encoded, reduction=reduction)
