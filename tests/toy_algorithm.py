"""A toy algorithm registered from outside the package (tests/test_algorithms.py runs it through the real loop):
one stage, a plain cross-entropy loss on the ground-truth programs of the buffer, publishing the LM it trains."""

from __future__ import annotations

import torch

from bcoder_ray.algorithms.base import Algorithm, AlgorithmConfig, Rows, StageModule, StagePlan
from bcoder_ray.algorithms.registry import register_algorithm
from bcoder_ray.model.batch import Batch, per_program_mean
from bcoder_ray.model.lm import PolicyLM, load_lm, token_logit_stats
from bcoder_ray.util.storage import local_dir


class ToyConfig(AlgorithmConfig):
    name: str = "toy_ce"
    """The toy's name."""


class CEStage(StageModule):
    def __init__(self, lm):
        super().__init__()
        lm.requires_grad_(True)
        self.lm, self.policy = lm, PolicyLM(lm)

    def trainable_parameters(self):
        return [p for p in self.lm.parameters() if p.requires_grad]

    def forward(self, batch: Batch):
        logits = self.policy.logits(self.policy.states(batch, None))
        _, taken, log_z = token_logit_stats(logits, batch.program_ids, torch.ones_like(batch.is_human))
        rows = batch.ground_truth
        loss = per_program_mean((log_z - taken)[rows], batch.program_mask[rows]) if rows.any() \
            else logits.sum() * 0.0
        return loss, {"loss": float(loss.detach()), "n_rows": float(rows.sum())}

    def save(self, directory, tokenizer=None):
        self.lm.save_pretrained(directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)


@register_algorithm
class ToyCE(Algorithm):
    name = "toy_ce"
    Config = ToyConfig
    stage_names = ("ce",)

    def plan_iteration(self, iteration, state, policy_version):
        return [StagePlan("ce", Rows(rho_real=1.0), spec={"start": state.get("ce")})]

    def policy(self, state):
        return state.get("ce")

    def build_stage(self, plan, device=None):
        lm = load_lm(local_dir(plan.spec.get("start") or self.ctx.theta_ckpt), device=device)  # a URI: copied here
        lm.train()
        return CEStage(lm)
