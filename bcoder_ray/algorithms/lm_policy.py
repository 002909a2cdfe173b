"""What the LM-policy plug-ins (`ppo`, `grpo`: `bcoder_ray.algorithms.policy_gradient`; `rest_em`:
`bcoder_ray.algorithms.rest_em`; `sft`: `bcoder_ray.algorithms.sft`) share: the policy is a plain Hugging Face LM
trained whole, published as its own folder (`save_pretrained`, so `from_pretrained` and the rollout's sampler load
it; PPO's value head sits beside it in the same folder), no ranker.

- `LMPolicyAlgorithm`: an `Algorithm` with one stage per iteration (`stage_names[0]`) whose checkpoint is the
  published policy; `start_of(state)` is where the next stage starts (None: θ_ckpt).
- `PolicyStage`: a `StageModule` over a `PolicyLM` (+ optional `bcoder_ray.algorithms.common.ValueHead`);
  subclasses define `forward`.
- `load_policy(path, *, trainable, ...)`, `load_value_head(directory, policy, seed)`, `VALUE_HEAD_FILE`.
- `on_policy_rows(policy_version, ...)`: the buffer rows an on-policy stage reads (and fills targets for).
- `fingerprint(ctx, tokenizer, **parts)`: a cached-target fingerprint over θ_ckpt, the tokenizer, the lengths, the
  dtype and `parts` (checkpoint folders by content where a part's name ends in `_dir`).
- `per_row(values, lengths)`: a [B, T] tensor as one list per row, cut at each row's length (target columns).
"""

from __future__ import annotations

import hashlib
import json
import os
from functools import cached_property
from typing import Any

import torch
from torch import nn

from bcoder_ray.algorithms.base import Algorithm, Rows, RunContext, StageModule, StagePlan
from bcoder_ray.algorithms.common import ValueHead
from bcoder_ray.buffer.filters import Filters
from bcoder_ray.model.lm import LoadOptions, PolicyLM, checkpoint_identity, load_lm
from bcoder_ray.util.storage import local_dir
from bcoder_ray.model.tokenization import tokenizer_fingerprint

VALUE_HEAD_FILE = "ppo_value_head.safetensors"
ON_POLICY_COLUMNS = ("logprobs",)


def load_policy(path: str, *, trainable: bool, dtype: torch.dtype | None = None,
                device: torch.device | str | None = None, options: LoadOptions | None = None) -> PolicyLM:
    """The LM at `path` as a `PolicyLM`: every parameter trainable, or frozen in eval mode (targets); `options`
    (`LoadOptions`) go to its `from_pretrained`."""
    lm = load_lm(local_dir(path), dtype=dtype, device=device, options=options)
    if trainable:
        lm.requires_grad_(True)
    return PolicyLM(lm)


def load_value_head(directory: str | None, policy: PolicyLM, seed: int) -> ValueHead:
    """PPO's value head saved in `directory` beside its LM, or a fresh one (seeded: every process that builds
    the fresh head of θ_ckpt gets the same weights) when `directory` is None or holds none."""
    head = ValueHead.for_policy(policy, seed=seed)
    directory = local_dir(directory, "value head checkpoint") if directory else directory
    path = os.path.join(directory, VALUE_HEAD_FILE) if directory else None
    if path and os.path.exists(path):
        from safetensors.torch import load_file

        head.load_state_dict(load_file(path, device=str(head.linear.weight.device)))
    elif directory:
        raise FileNotFoundError(f"{directory}: no {VALUE_HEAD_FILE} (a PPO checkpoint saves its value head there)")
    return head


def on_policy_rows(policy_version: str, extra_columns: tuple[str, ...] = (),
                   token_columns: tuple[str, ...] = ()) -> Rows:
    """Generated rows sampled (not greedy) by `policy_version` with their sampling log-probabilities, drawn
    uniformly (no human mixing); `logprobs` comes as a per-token column."""
    filters = Filters(policy_versions=(str(policy_version),), decoding=("sample",), sources=("generated",),
                      require_logprobs=True)
    extra = tuple(dict.fromkeys((*ON_POLICY_COLUMNS, *extra_columns)))
    return Rows(rho_real=None, filters=filters, extra_columns=extra,
                token_columns=tuple(dict.fromkeys((*ON_POLICY_COLUMNS, *token_columns))))


def fingerprint(ctx: RunContext, tokenizer: Any, **parts: Any) -> str:
    data = {"theta_ckpt": checkpoint_identity(ctx.theta_ckpt, ctx.options_for().revision),
            "tokenizer": tokenizer_fingerprint(tokenizer, ctx.text_format()),
            "source_len": ctx.source_len, "target_len": ctx.target_len, "dtype": ctx.dtype,
            **{k: (checkpoint_identity(v) if k.endswith("_dir") and v else v) for k, v in parts.items()}}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()[:16]


def per_row(values: torch.Tensor, lengths: torch.Tensor) -> list[list[float]]:
    return [values[b, :n].float().tolist() for b, n in enumerate(lengths.tolist())]


class PolicyStage(StageModule):
    """A stage that trains a whole LM (and PPO's value head); `dropout` False keeps the LM in eval mode while
    training, so that its log-probabilities match those of the sampler (PPO's and GRPO's ratios)."""

    def __init__(self, policy: PolicyLM, value_head: ValueHead | None = None, *, dropout: bool = True):
        super().__init__()
        self.policy, self.value_head, self.dropout = policy, value_head, dropout

    def trainable_parameters(self) -> list[nn.Parameter]:
        return [p for p in self.parameters() if p.requires_grad]  # parameters() yields tied weights once

    def train(self, mode: bool = True) -> "PolicyStage":
        super().train(mode and self.dropout)
        self.training = mode
        return self

    def save(self, directory: str, tokenizer: Any = None) -> None:
        os.makedirs(directory, exist_ok=True)
        self.policy.lm.save_pretrained(directory)
        if self.value_head is not None:
            from safetensors.torch import save_file

            save_file({k: v.detach().contiguous() for k, v in self.value_head.state_dict().items()},
                      os.path.join(directory, VALUE_HEAD_FILE))
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)


class LMPolicyAlgorithm(Algorithm):
    """One stage per iteration, named `stage_names[0]`; its last checkpoint is the published policy."""

    @property
    def stage(self) -> str:
        return self.stage_names[0]

    @cached_property
    def _tokenizer(self):
        return self.ctx.load_tokenizer()

    def policy(self, state: dict) -> str | None:
        return state.get(self.stage)

    def start_of(self, state: dict) -> str | None:
        """Where the next stage starts: the last policy (None: θ_ckpt)."""
        return state.get(self.stage)

    def _stage_plan(self, rows: Rows, state: dict, **kwargs: Any) -> StagePlan:
        spec = {"start": self.start_of(state), **kwargs.pop("spec", {})}
        return StagePlan(self.stage, rows, spec=spec, skip_if_empty=True, **kwargs)

    def _load_start(self, plan: StagePlan, device=None) -> PolicyLM:
        start = plan.spec.get("start") or self.ctx.theta_ckpt
        return load_policy(start, trainable=True, device=device, options=self.ctx.options_for(start))

    def _frozen(self, path: str | None, device=None) -> PolicyLM:
        path = path or self.ctx.theta_ckpt
        return load_policy(path, trainable=False, dtype=getattr(torch, self.ctx.dtype), device=device,
                           options=self.ctx.options_for(path))
