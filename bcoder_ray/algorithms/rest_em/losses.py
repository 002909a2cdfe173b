"""ReST-EM / expert iteration (Singh et al. 2023; docs/baselines.md §3): which rows an M-step trains on, and its loss.

E-step: the rollout samples programs from the current policy and executes them (unchanged pipeline).
M-step: maximise J(θ) = E_{(x,y)∈D_i}[r(x,y) log p_θ(y|x)] with r ∈ {0, 1} (pass or not) (Singh et al. §3),
i.e. cross-entropy on the programs of iteration i that passed. Restarting from θ_ckpt (the default)
or continuing from the last policy is a schedule choice (``RestEMOptions.restart_from_ckpt``), read by the plug-in.

Public API
----------
- ``RestEMOptions``: the options (a docstring under each field).
- ``PASSED_REWARD``: r of a passing program (eq. 2: +1), ``envs.result.REWARD[Outcome.PASSED]``.
- ``m_step_mask(table, iteration, *, include_human=False) -> pa.ChunkedArray``: bool per row of a buffer table.
- ``select_m_step_rows(table, iteration, *, include_human=False) -> pa.Table``: those rows.
- ``rest_em_loss(policy, batch, *, encoded=None, reduction="mean") -> (loss, metrics)``: the M-step's CE.
"""

from __future__ import annotations

from dataclasses import dataclass

import pyarrow as pa
import pyarrow.compute as pc
import torch

from bcoder_ray.algorithms.policy_gradient.losses import encode_prompts, policy_forward
from bcoder_ray.model.batch import Batch
from bcoder_ray.algorithms.bcoder.losses import AUX_REDUCTIONS
from bcoder_ray.model.batch import per_program_mean
from bcoder_ray.model.lm import Encoded, PolicyLM
from envs.result import REWARD, Outcome

PASSED_REWARD = REWARD[Outcome.PASSED]
GENERATED, HUMAN = "generated", "human"   # bcoder_ray.buffer.schema.SOURCES


@dataclass(frozen=True)
class RestEMOptions:
    """Expert iteration / ReST-EM: fine-tune on the passing programs of each iteration (baselines.md §3)."""

    restart_from_ckpt: bool = True
    """each M-step starts from θ_ckpt (ReST-EM); False continues from the last policy (expert iteration)"""
    include_human: bool = False
    """mix the passing human programs into every M-step (off, as in the paper)"""
    reduction: str = "mean"
    """per program: "mean" of the token NLLs over its tokens, or "sum" (eq. 1 as written); then mean over programs"""

    def __post_init__(self) -> None:
        if self.reduction not in AUX_REDUCTIONS:
            raise ValueError(f"RestEMOptions.reduction must be one of {AUX_REDUCTIONS}, got {self.reduction!r}")


def _require(table: pa.Table, columns: tuple[str, ...], what: str) -> None:
    missing = [c for c in columns if c not in table.column_names]
    if missing:
        raise KeyError(f"{what}: the table lacks column(s) {missing}; it has {table.column_names}")


def _passed(table: pa.Table) -> pa.ChunkedArray:
    """r = +1 (Outcome PASSED); the buffer keeps reward and outcome consistent (schema.rows_to_table checks eq. 2)."""
    if "outcome" in table.column_names:
        return pc.equal(table["outcome"], Outcome.PASSED.value)
    if "reward" in table.column_names:
        return pc.equal(table["reward"], PASSED_REWARD)
    raise KeyError(f"m_step_mask: the table needs an 'outcome' or a 'reward' column; it has {table.column_names}")


def m_step_mask(table: pa.Table, iteration: int, *, include_human: bool = False) -> pa.ChunkedArray:
    """Rows the M-step of ``iteration`` trains on: generated in that iteration and passed; with ``include_human``
    also every passing human program (human rows belong to no iteration). Nulls count as no match."""
    _require(table, ("source", "iteration"), "m_step_mask")
    generated = pc.and_(pc.equal(table["source"], GENERATED), pc.equal(table["iteration"], int(iteration)))
    keep = generated
    if include_human:
        keep = pc.or_(generated, pc.equal(table["source"], HUMAN))
    return pc.fill_null(pc.and_(keep, _passed(table)), False)


def select_m_step_rows(table: pa.Table, iteration: int, *, include_human: bool = False) -> pa.Table:
    """The rows of ``m_step_mask`` (order kept)."""
    return table.filter(m_step_mask(table, iteration, include_human=include_human))


def rest_em_loss(policy: PolicyLM, batch: Batch, *, encoded: Encoded | None = None,
                 reduction: str = "mean") -> tuple[torch.Tensor, dict[str, float]]:
    """-J(θ) of the M-step: mean over programs of Σ_t (or mean_t) -log p_θ(w_t | s_t), the cross-entropy of
    eq. 1 as ``losses.theta_loss``'s L_ce computes it (log Z - ℓ[a_t] via ``token_logit_stats``, ``aux_reduction``).

    Every row must be a passing program (r = +1; r ∈ {0, 1} weights the others out of J); the error names the
    first row that is not, so a selection bug cannot silently train on failures."""
    if reduction not in AUX_REDUCTIONS:
        raise ValueError(f"rest_em_loss: reduction must be one of {AUX_REDUCTIONS}, got {reduction!r}")
    bad = torch.nonzero(batch.reward != PASSED_REWARD).flatten()
    if bad.numel():
        i = int(bad[0])
        raise ValueError(f"rest_em_loss: row {i} has reward {float(batch.reward[i])}, the M-step trains only on "
                         f"passing programs (reward {PASSED_REWARD}); select rows with select_m_step_rows")
    if encoded is None:
        encoded = encode_prompts(policy, batch)
    nll = -policy_forward(policy, batch, encoded=encoded).logprobs          # -log p_θ(w_t | s_t), 0 at padding
    mask = batch.program_mask
    if reduction == "mean":
        loss = per_program_mean(nll, mask)
    else:
        loss = (nll * mask.to(nll.dtype)).sum(1).mean()
    tokens = int(mask.sum())
    return loss, {"l_ce": float(loss.detach()), "n_programs": float(batch.size), "n_tokens": float(tokens),
                  "n_human": float(batch.is_human.sum())}
