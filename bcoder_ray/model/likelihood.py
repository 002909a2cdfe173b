"""A program's log-likelihood under an LM, as a `Ranker`: the baseline every learned ranker must beat.

    logprobs = TokenLogprobs(sampler.lm, pad_id(sampler.tokenizer))
    by_sum = LogLikelihoodRanker(logprobs, "sum")      # log p(W | prompt) = Σ_t log p(w_t | s_t)
    by_mean = LogLikelihoodRanker(logprobs, "mean")    # per token: Σ_t log p(w_t | s_t) / T

The log-probabilities are the LM's own (temperature 1, no top-p): a property of the model, not of how the
candidates were sampled, so candidates read from a file are scored the same as fresh ones. One teacher-forced
pass per distinct (prompt, program); the sum and the mean rankers share it through one `TokenLogprobs`.
"""

from __future__ import annotations

from typing import Sequence

import torch

from bcoder_ray.model.batch import collate
from bcoder_ray.model.lm import PolicyLM, token_logit_stats
from bcoder_ray.model.ranker import Ranker

REDUCTIONS = ("sum", "mean")


class TokenLogprobs:
    """log p(w_t | s_t) of every token of each program under `policy`, memoised per (prompt, program)."""

    def __init__(self, policy: PolicyLM, pad_id: int, batch_size: int = 16):
        self.policy, self.pad_id, self.batch_size = policy, pad_id, batch_size
        self._memo: dict[tuple[tuple[int, ...], tuple[int, ...]], list[float]] = {}

    def __call__(self, prompt_ids: Sequence[Sequence[int]],
                 program_ids: Sequence[Sequence[int]]) -> list[list[float]]:
        pairs = [(tuple(p), tuple(w)) for p, w in zip(prompt_ids, program_ids, strict=True)]
        missing = [pair for pair in dict.fromkeys(pairs) if pair not in self._memo]
        for start in range(0, len(missing), self.batch_size):
            chunk = missing[start:start + self.batch_size]
            self._memo.update(zip(chunk, self._forward(chunk)))
        return [self._memo[pair] for pair in pairs]

    @torch.no_grad()
    def _forward(self, pairs: Sequence[tuple[tuple[int, ...], tuple[int, ...]]]) -> list[list[float]]:
        device = self.policy.lm.get_output_embeddings().weight.device
        batch = collate([{"prompt_ids": list(p), "program_ids": list(w), "reward": 0.0, "is_human": False}
                         for p, w in pairs], self.pad_id).to(device)
        was_training = self.policy.training
        self.policy.eval()  # no dropout: a score, not a training pass
        try:
            hidden = self.policy.states(batch, self.policy.encode(batch.prompt_ids, batch.prompt_mask))
            _, taken, log_z = token_logit_stats(self.policy.logits(hidden), batch.program_ids,
                                                torch.ones(batch.size, dtype=torch.bool, device=device))
        finally:
            self.policy.train(was_training)
        logp = (taken.float() - log_z.float()).cpu()  # log softmax at the taken token
        return [logp[b, :n].tolist() for b, n in enumerate(batch.lengths.tolist())]


class LogLikelihoodRanker(Ranker):
    """Scores a program by its log-likelihood under the LM: the sum over its tokens (`"sum"`: log p(W | prompt),
    which favours short programs) or the mean per token (`"mean"`: length-normalised)."""

    def __init__(self, logprobs: TokenLogprobs, reduction: str = "sum", label: str | None = None):
        if reduction not in REDUCTIONS:
            raise ValueError(f"LogLikelihoodRanker: reduction must be one of {REDUCTIONS}, got {reduction!r}")
        self.logprobs, self.reduction = logprobs, reduction
        self.label = label or f"{reduction}-loglik"

    def score(self, prompt_ids: Sequence[Sequence[int]], program_ids: Sequence[Sequence[int]]) -> list[float]:
        per_token = self.logprobs(prompt_ids, program_ids)
        if self.reduction == "sum":
            return [float(sum(lp)) for lp in per_token]
        return [float(sum(lp)) / len(lp) for lp in per_token]  # a program has at least its EOS: len >= 1
