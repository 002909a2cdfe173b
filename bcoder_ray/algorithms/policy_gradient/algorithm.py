"""The on-policy policy-gradient baselines (docs/baselines.md §2) as plug-ins, both on
`bcoder_ray.algorithms.policy_gradient.losses` (configs: `bcoder_ray.algorithms.policy_gradient.config`):

- `ppo`: PPO-clip with a value head on the policy's trunk and GAE; the reward of token t is the KL penalty
  -β (log π_old - log p_ckpt) plus, at the last token, the execution reward (eq. 2).
- `grpo`: group-relative advantages over the rollout's m samples of a problem (rows lost to infrastructure
  failures: the group has the rows it has), no value head, β·KL[π_θ || p_ckpt] (k1 or k3) as a loss term.

Each iteration is one stage (`stages.ppo` / `stages.grpo`) that starts from the current policy (θ_old, the one that
sampled: θ_ckpt in iteration 0) and reads only the rows that policy sampled
(`bcoder_ray.algorithms.lm_policy.on_policy_rows`: generated, sampled, this `policy_version`, with the sampling
log-probabilities); the buffer keeps every row. The stage makes `steps` optimiser steps of uniformly drawn
mini-batches over those N = problems × m rows, so steps = epochs × ceil(N / (batch_size_per_worker × num_workers))
(epochs in expectation: Ray Data's read tasks each stream the rows in their own shuffled order). The defaults are
for the embedded config (192 × 4 = 768 rows, 32 per step: 24 mini-batches): PPO 4 epochs (96 steps), GRPO 2 epochs
(48 steps, DeepSeekMath uses one).

Cached targets, computed once per row before the stage (`bcoder_ray.loop.target_filling`), fingerprinted by θ_ckpt, the
tokenizer, the lengths and the dtype, plus:
- PPO: `logp_ckpt` (θ_ckpt's log-probability of each sampled token, for the KL) and `v_old` (V(s_t) of the policy
  that sampled, with its value head: GAE's old values); the fingerprint also covers that checkpoint (LM and head).
  Caching `v_old` rather than computing it in the stage keeps one network in the learner (no frozen copy of the
  sampling policy beside the trained one, no forward of it per mini-batch and epoch) and makes the values fixed
  over the epochs as PPO's old values are. GAE and the whitening run in the stage per mini-batch (cheap; the
  whitening per mini-batch as OpenAI baselines' ppo2 does).
- GRPO: `logp_ckpt` and `advantage` (the row's Â on every token), filled by groups (`TargetsPlan.group_by` =
  suite, problem, policy version), since a mini-batch holds random rows and rarely a whole group; the fingerprint
  covers the normalisation options.
"""

from __future__ import annotations

from typing import Mapping

import torch

from bcoder_ray.algorithms.base import StageModule, StagePlan, TargetComputer, TargetsPlan
from bcoder_ray.algorithms.common import policy_forward
from bcoder_ray.algorithms.lm_policy import (LMPolicyAlgorithm, PolicyStage, fingerprint, load_value_head,
                                             on_policy_rows, per_row)
from bcoder_ray.algorithms.policy_gradient.config import GRPOConfig, PPOConfig
from bcoder_ray.algorithms.policy_gradient.losses import group_advantages, grpo_loss, ppo_advantages, ppo_loss
from bcoder_ray.model.batch import Batch, masked_mean

GROUP_BY = ("suite", "problem_id", "policy_version")
_STAGE = {"lr": 1e-5, "schedule": "constant", "batch_size_per_worker": 16, "num_workers": 2,
          "cpus_per_worker": 0.25, "report_every": 12}


class PPOStage(PolicyStage):
    def __init__(self, policy, value_head, config: PPOConfig):
        super().__init__(policy, value_head, dropout=False)
        self.config = config

    def forward(self, batch: Batch):
        o, mask, tokens = self.config, batch.program_mask, batch.tokens
        old, ref, v_old = tokens["logprobs"], tokens["logp_ckpt"], tokens["v_old"]
        advantages, returns, _ = ppo_advantages(old, ref, v_old, batch.reward, mask, o)   # GAE, per mini-batch
        out = policy_forward(self.policy, batch, value_head=self.value_head, with_entropy=o.entropy_coef > 0)
        loss, metrics = ppo_loss(out, old, v_old, advantages, returns, mask, o)
        metrics["kl_ckpt"] = float(masked_mean(old - ref, mask))       # the penalty's k1 of π_old vs θ_ckpt
        metrics["reward_mean"] = float(batch.reward.mean())
        return loss, metrics


class GRPOStage(PolicyStage):
    def __init__(self, policy, config: GRPOConfig):
        super().__init__(policy, dropout=False)
        self.config = config

    def forward(self, batch: Batch):
        tokens = batch.tokens
        advantages = tokens["advantage"][:, 0]                          # the row's Â (the same on every token)
        out = policy_forward(self.policy, batch)
        loss, metrics = grpo_loss(out.logprobs, tokens["logprobs"], tokens["logp_ckpt"], advantages,
                                  batch.program_mask, self.config)
        metrics["reward_mean"] = float(batch.reward.mean())
        return loss, metrics


class PPO(LMPolicyAlgorithm):
    name = "ppo"
    Config = PPOConfig
    stage_names = ("ppo",)
    stage_defaults = {"ppo": {**_STAGE, "steps": 96}}
    on_policy = True
    config: PPOConfig

    def plan_iteration(self, iteration: int, state: dict, policy_version: str) -> list[StagePlan]:
        sampler = self.start_of(state)                                  # the policy that sampled this iteration
        rows = on_policy_rows(policy_version, token_columns=("logp_ckpt", "v_old"))
        fp = fingerprint(self.ctx, self._tokenizer, algorithm="ppo", sampler_dir=sampler, value_seed=self.ctx.seed)
        targets = TargetsPlan(fp, ("logp_ckpt", "v_old"), {"sampler_dir": sampler},
                              on_policy_rows(policy_version))
        return [self._stage_plan(rows, state, targets=targets)]

    def build_stage(self, plan: StagePlan, device=None) -> StageModule:
        policy = self._load_start(plan, device)
        head = load_value_head(plan.spec.get("start"), policy, self.ctx.seed)
        head.requires_grad_(True)
        return PPOStage(policy, head, self.config)

    def target_computer(self, targets: TargetsPlan, device=None) -> TargetComputer:
        sampler_dir = targets.spec.get("sampler_dir")
        ckpt = self._frozen(None, device)
        sampler = ckpt if sampler_dir is None else self._frozen(sampler_dir, device)
        head = load_value_head(sampler_dir, sampler, self.ctx.seed).to(getattr(torch, self.ctx.dtype))
        head.requires_grad_(False)
        where = next(ckpt.parameters()).device

        def compute(batch: Batch) -> Mapping[str, list]:
            batch = batch.to(where)
            with torch.no_grad():
                if sampler is ckpt:                                     # iteration 0: θ_old = θ_ckpt
                    out = policy_forward(ckpt, batch, value_head=head)
                    ref, values = out.logprobs, out.values
                else:
                    ref = policy_forward(ckpt, batch).logprobs
                    values = policy_forward(sampler, batch, value_head=head).values
            return {"logp_ckpt": per_row(ref, batch.lengths), "v_old": per_row(values, batch.lengths)}

        return compute


class GRPO(LMPolicyAlgorithm):
    name = "grpo"
    Config = GRPOConfig
    stage_names = ("grpo",)
    stage_defaults = {"grpo": {**_STAGE, "steps": 48}}
    on_policy = True
    config: GRPOConfig

    def plan_iteration(self, iteration: int, state: dict, policy_version: str) -> list[StagePlan]:
        c = self.config
        rows = on_policy_rows(policy_version, token_columns=("logp_ckpt", "advantage"))
        fp = fingerprint(self.ctx, self._tokenizer, algorithm="grpo", group_by=GROUP_BY,
                         normalize_std=c.normalize_std, std_eps=c.std_eps)
        fill = on_policy_rows(policy_version, extra_columns=("reward", *GROUP_BY))
        targets = TargetsPlan(fp, ("logp_ckpt", "advantage"), {}, fill, group_by=GROUP_BY)
        return [self._stage_plan(rows, state, targets=targets)]

    def build_stage(self, plan: StagePlan, device=None) -> StageModule:
        return GRPOStage(self._load_start(plan, device), self.config)

    def target_computer(self, targets: TargetsPlan, device=None) -> TargetComputer:
        c = self.config
        ckpt = self._frozen(None, device)
        where = next(ckpt.parameters()).device
        group_by = tuple(targets.group_by) or GROUP_BY

        def compute(batch: Batch) -> Mapping[str, list]:
            missing = [k for k in group_by if k not in batch.info]
            if missing:
                raise KeyError(f"grpo targets: the batch lacks the group columns {missing} (fill them with "
                               f"TargetsPlan.group_by so that each batch holds whole groups)")
            keys = list(zip(*(batch.info[k] for k in group_by)))
            advantages = group_advantages(batch.reward, keys, normalize_std=c.normalize_std, eps=c.std_eps)
            batch = batch.to(where)
            with torch.no_grad():
                ref = policy_forward(ckpt, batch).logprobs
            lengths = batch.lengths.tolist()
            return {"logp_ckpt": per_row(ref, batch.lengths),
                    "advantage": [[float(a)] * n for a, n in zip(advantages.tolist(), lengths)]}

        return compute
