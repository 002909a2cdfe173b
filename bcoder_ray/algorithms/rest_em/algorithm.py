"""Expert iteration / ReST-EM (Singh et al. 2023; docs/baselines.md §3) as the `rest_em` plug-in.

E-step: the rollout samples m programs per problem from the published policy and executes them (the shared
rollout). M-step: one stage (`stages.rest_em`, its `steps` the M-step's optimiser steps) of cross-entropy
(`bcoder_ray.algorithms.rest_em.losses.rest_em_loss`) on the programs of this iteration that passed (generated rows
of this policy version, outcome passed: `RestEM.m_step_rows`), starting from θ_ckpt (ReST-EM, the default) or from
the last policy (`restart_from_ckpt: false`); `include_human` also mixes every passing human program in (drawn
uniformly with the generated ones). An iteration in which no program passed trains nothing: the policy is then
θ_ckpt (restart: an M-step on no data from θ_ckpt) or stays the last one (continue). The published policy is the
M-step's LM; no ranker.
"""

from __future__ import annotations

from typing import Literal

from bcoder_ray.algorithms.base import AlgorithmConfig, Rows, StageModule, StagePlan
from bcoder_ray.algorithms.lm_policy import LMPolicyAlgorithm, PolicyStage
from bcoder_ray.algorithms.rest_em.losses import rest_em_loss
from bcoder_ray.buffer.filters import Filters
from bcoder_ray.model.batch import Batch
from envs.result import Outcome


class RestEMConfig(AlgorithmConfig):
    """Expert iteration / ReST-EM: fine-tune on the passing programs of each iteration (docs/baselines.md §3)."""

    name: str = "rest_em"
    """The registered algorithm: rest_em."""
    restart_from_ckpt: bool = True
    """Each M-step starts from θ_ckpt (ReST-EM); false: from the last policy (expert iteration)."""
    include_human: bool = False
    """Also train on every passing human program of the train problems (off, as in the paper)."""
    reduction: Literal["mean", "sum"] = "mean"
    """Per program: mean of the token NLLs, or their sum (eq. 1 as written); then the mean over programs."""


class RestEMStage(PolicyStage):
    def __init__(self, policy, config: RestEMConfig):
        super().__init__(policy, dropout=True)
        self.config = config

    def forward(self, batch: Batch):
        return rest_em_loss(self.policy, batch, reduction=self.config.reduction)


class RestEM(LMPolicyAlgorithm):
    name = "rest_em"
    Config = RestEMConfig
    stage_names = ("rest_em",)
    stage_defaults = {"rest_em": {"steps": 60, "lr": 2e-5, "schedule": "linear", "batch_size_per_worker": 16,
                                  "num_workers": 2, "cpus_per_worker": 0.25, "report_every": 20}}
    config: RestEMConfig

    def start_of(self, state: dict) -> str | None:
        return None if self.config.restart_from_ckpt else state.get(self.stage)

    def m_step_rows(self, iteration: int, policy_version: str) -> Rows:
        """The passing programs this iteration sampled (and, with `include_human`, every passing human one)."""
        passed = (Outcome.PASSED.value,)
        if self.config.include_human:  # the iteration window keeps human rows (they belong to no iteration)
            filters = Filters(iteration_min=iteration, iteration_max=iteration, decoding=("sample",), outcomes=passed)
        else:
            filters = Filters(policy_versions=(str(policy_version),), sources=("generated",), decoding=("sample",),
                              outcomes=passed)
        return Rows(rho_real=None, filters=filters)

    def plan_iteration(self, iteration: int, state: dict, policy_version: str) -> list[StagePlan]:
        return [self._stage_plan(self.m_step_rows(iteration, policy_version), state)]

    def after_stage(self, plan: StagePlan, checkpoint: str | None, iteration: int, state: dict) -> None:
        if checkpoint is None and self.config.restart_from_ckpt:
            state[plan.name] = None                                     # nothing passed: the M-step is θ_ckpt
            state[f"{plan.name}_iteration"] = iteration
            return
        super().after_stage(plan, checkpoint, iteration, state)

    def build_stage(self, plan: StagePlan, device=None) -> StageModule:
        return RestEMStage(self._load_start(plan, device), self.config)
