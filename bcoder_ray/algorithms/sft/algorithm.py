"""Supervised fine-tuning (SFT) as the `sft` plug-in: B-Coder's stage θ with its cross-entropy term alone.

SFT overrides only what B-Coder's stage θ learns from the rows, not the rows: each iteration is one stage
(`stages.sft`, whose defaults are those of `stages.theta`) that reads the ρ_real-mixed batches stage θ reads
(`Rows(rho_real=...)`, no other filter: round(ρ_real·B) human rows and the rest generated, per mini-batch) and
trains the plain LM with the cross-entropy of eq. 1 (`bcoder_ray.algorithms.common.cross_entropy`) on the batch's
ground-truth rows (`Batch.ground_truth`: human programs that pass their tests). That is B-Coder's L_ce, with
`reduction` as its `aux_reduction`, without L_Q and L_adv; the other rows of a batch are read and contribute
nothing, so with the same `steps` and batch size SFT reads what stage θ reads. `include_generated` adds the
batch's passing generated programs to the CE: rejection-sampling fine-tuning (RFT). Failing programs, human or
generated, never contribute.

Off-policy (it reads every generated row so far, whatever policy sampled it), no cached targets, no ranker; each
stage continues from the last policy (as B-Coder's `theta_continue`) unless `restart_from_ckpt`. The published
policy is the stage's LM, a plain Hugging Face folder (`bcoder_ray.algorithms.lm_policy`).
"""

from __future__ import annotations

from typing import Literal

import torch
from pydantic import Field

from bcoder_ray.algorithms.base import AlgorithmConfig, Rows, StageModule, StagePlan
from bcoder_ray.algorithms.common import cross_entropy
from bcoder_ray.algorithms.lm_policy import LMPolicyAlgorithm, PolicyStage
from bcoder_ray.model.batch import PASS_REWARD, Batch


class SFTConfig(AlgorithmConfig):
    """Cross-entropy on the passing human programs of B-Coder's stage-θ batches (and, for RFT, on the passing
    generated ones)."""

    name: str = "sft"
    """The registered algorithm: sft."""
    rho_real: float = Field(0.5, ge=0.0, le=1.0)
    """Share of human rows in each mini-batch, as B-Coder's `rho_real` (the same default, and a config file's
    B-Coder value carries over): the batches stage θ reads."""
    include_generated: bool = False
    """Also train on the passing generated programs of each batch (rejection-sampling fine-tuning); false: the
    passing human programs only (SFT)."""
    reduction: Literal["sum", "mean"] = "sum"
    """Per program: the sum of the token NLLs (eq. 1 as written) or their mean; then the mean over the programs
    trained on. "sum" is B-Coder's `aux_reduction` default, so the loss is its L_ce term exactly."""
    restart_from_ckpt: bool = False
    """Each stage starts from θ_ckpt; false: from the last policy (as B-Coder's `theta_continue: true`)."""


class SFTStage(PolicyStage):
    """The LM trained with the CE on the rows `trained_rows` selects."""

    def __init__(self, policy, config: SFTConfig):
        super().__init__(policy, dropout=True)
        self.config = config

    def trained_rows(self, batch: Batch) -> torch.Tensor:
        """[B] bool: the ground-truth rows, or with `include_generated` every passing row."""
        if self.config.include_generated:
            return batch.reward == PASS_REWARD
        return batch.ground_truth

    def forward(self, batch: Batch):
        loss, metrics = cross_entropy(self.policy, batch, rows=self.trained_rows(batch),
                                      reduction=self.config.reduction)
        return loss, {**metrics, "n_rows": float(batch.size)}


class SFT(LMPolicyAlgorithm):
    name = "sft"
    Config = SFTConfig
    stage_names = ("sft",)
    stage_defaults = {"sft": {"lr": 3e-5, "schedule": "linear"}}   # B-Coder's stage θ's (BCoder.stage_defaults)
    supports_async = True  # supervised on human (and, with include_generated, passed) rows of any policy
    config: SFTConfig

    def resumes_from(self, plan: StagePlan) -> str | None:
        return plan.spec.get("start")

    def start_of(self, state: dict) -> str | None:
        return None if self.config.restart_from_ckpt else state.get(self.stage)

    def rows(self) -> Rows:
        """The rows stage θ of B-Coder reads: ρ_real-mixed, no filter (the driver scopes them to the run's suite
        and tokenizer)."""
        return Rows(rho_real=self.config.rho_real)

    def plan_iteration(self, iteration: int, state: dict, policy_version: str) -> list[StagePlan]:
        return [self._stage_plan(self.rows(), state)]

    def build_stage(self, plan: StagePlan, device=None) -> StageModule:
        return SFTStage(self._load_start(plan, device), self.config)

