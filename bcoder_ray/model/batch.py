"""Mini-batches for the learner: padded tensors built from replay-buffer rows.

Public API
----------
- ``Batch``: a dataclass of tensors (all on one device, see ``Batch.to``)
    - ``prompt_ids`` [B, S] int64, **left**-padded with ``pad_id``; ``prompt_mask`` [B, S] int64 (1 = token).
    - ``program_ids`` [B, T] int64, **right**-padded with ``pad_id``; ``program_mask`` [B, T] int64.
    - ``reward`` [B] float32: the eq. 2 reward, received at the program's last token (the terminal step).
    - ``is_human`` [B] bool: ground-truth program (L_adv and L_ce of eq. 17 use these rows only).
    - ``tokens``: per-token columns by name, each [B, T] aligned with ``program_ids`` and 0 at padding: an
      algorithm's cached targets (B-Coder's, read through ``bcoder_ray.algorithms.bcoder.targets.FrozenTargets``),
      the sampling log-probabilities, ...; ``info``: per-row values by name, as lists.
    - ``weight`` [B] float32: each row's importance weight from the replay sampler (a batch's ``weight`` column:
      prioritized replay's w_i, ``bcoder_ray.buffer.draws``); 1 for every row when the batch has none. Losses
      that honour it multiply each row's loss by it (B-Coder's).
  ``Batch.lengths`` [B]: program lengths T_b. ``Batch.size``: B. A row's ``weight`` key, when present, fills
  ``Batch.weight``.
- ``collate(examples: list[dict], pad_id: int, *, token_columns=(), info_columns=()) -> Batch``: each example has
  the replay buffer's columns ``prompt_ids``, ``program_ids`` (list[int], as made by
  ``bcoder_ray.model.tokenization``: program ids + EOS, or cut at the length limit without EOS), ``reward``
  (float), ``is_human`` (bool; or ``source`` == "human"). ``token_columns``: per-token lists, one value per program
  token, padded into ``Batch.tokens[name]`` [B, T] (int64 when the values are ints, float32 otherwise; 0 at
  padding); ``info_columns``: per-row values kept as lists in ``Batch.info[name]`` (e.g. problem_id,
  policy_version).
- ``Batch.ground_truth`` [B] bool: the rows whose program is a ground truth, i.e. a human program that passes its
  tests (stored text) — the one definition every loss term on "human programs" (B-Coder's L_adv and L_ce, the
  baselines' cross-entropy) uses.

Positions: program token t is the action a_t = w_t taken in state s_t = (prompt, w_<t), t = 0 … T_b - 1.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass, field, fields
from typing import Any, Mapping, Sequence

import torch

from envs.result import REWARD, Outcome

PASS_REWARD = REWARD[Outcome.PASSED]


@dataclass
class Batch:
    prompt_ids: torch.Tensor
    prompt_mask: torch.Tensor
    program_ids: torch.Tensor
    program_mask: torch.Tensor
    reward: torch.Tensor
    is_human: torch.Tensor
    tokens: dict[str, torch.Tensor] = field(default_factory=dict)
    info: dict[str, list] = field(default_factory=dict)
    weight: torch.Tensor | None = None  # None: 1 for every row (set so in __post_init__)

    def __post_init__(self):
        if self.weight is None:
            self.weight = torch.ones(self.reward.shape[0], dtype=torch.float32, device=self.reward.device)

    @property
    def ground_truth(self) -> torch.Tensor:
        """Human programs that pass their tests (their stored text's reward is the pass reward)."""
        return self.is_human & (self.reward == PASS_REWARD)

    @property
    def size(self) -> int:
        return int(self.program_ids.shape[0])

    @property
    def lengths(self) -> torch.Tensor:
        return self.program_mask.sum(dim=1)

    def to(self, device: torch.device | str) -> "Batch":
        moved = {f.name: getattr(self, f.name) for f in fields(self) if f.name not in ("tokens", "info")}
        return Batch(**{k: v.to(device) for k, v in moved.items()},
                     tokens={k: v.to(device) for k, v in self.tokens.items()}, info=dict(self.info))


def _is_human(example: Mapping[str, Any], index: int) -> bool:
    if "is_human" in example and example["is_human"] is not None:
        return bool(example["is_human"])
    if "source" in example:
        return example["source"] == "human"
    raise KeyError(f"example {index}: needs 'is_human' (or 'source'); has keys {sorted(example)}")


def _where(example: Mapping[str, Any], index: int) -> str:
    sid = example.get("sample_id")
    return f"example {index}" + (f" (sample_id {sid})" if sid is not None else "")


def _per_token(examples: Sequence[Mapping[str, Any]], key: str, t: int) -> torch.Tensor:
    # ints (token ids) stay ints; the first row decides (a program has at least one token)
    integral = all(isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in examples[0][key])
    out = torch.zeros((len(examples), t), dtype=torch.long if integral else torch.float32)
    for i, ex in enumerate(examples):
        values = list(ex[key])
        if len(values) != len(ex["program_ids"]):
            raise ValueError(f"{_where(ex, i)}: '{key}' has {len(values)} entries, program_ids has "
                             f"{len(ex['program_ids'])}; per-token columns have one value per program token")
        out[i, : len(values)] = torch.tensor(values, dtype=out.dtype)
    return out


def collate(examples: Sequence[Mapping[str, Any]], pad_id: int, *, token_columns: Sequence[str] = (),
            info_columns: Sequence[str] = ()) -> Batch:
    """Pad a list of buffer rows into a ``Batch`` (prompts left-padded, programs right-padded)."""
    if not examples:
        raise ValueError("collate: no examples")
    for i, ex in enumerate(examples):
        for key in ("prompt_ids", "program_ids", "reward"):
            if key not in ex or ex[key] is None:
                raise KeyError(f"{_where(ex, i)}: missing '{key}'")
        if len(ex["program_ids"]) == 0:
            raise ValueError(f"{_where(ex, i)}: empty program_ids (a program has at least its EOS)")
        if len(ex["prompt_ids"]) == 0:
            raise ValueError(f"{_where(ex, i)}: empty prompt_ids")
    b = len(examples)
    s = max(len(ex["prompt_ids"]) for ex in examples)
    t = max(len(ex["program_ids"]) for ex in examples)
    prompt_ids = torch.full((b, s), pad_id, dtype=torch.long)
    prompt_mask = torch.zeros((b, s), dtype=torch.long)
    program_ids = torch.full((b, t), pad_id, dtype=torch.long)
    program_mask = torch.zeros((b, t), dtype=torch.long)
    for i, ex in enumerate(examples):
        p, w = list(ex["prompt_ids"]), list(ex["program_ids"])
        prompt_ids[i, s - len(p):] = torch.tensor(p, dtype=torch.long)
        prompt_mask[i, s - len(p):] = 1
        program_ids[i, : len(w)] = torch.tensor(w, dtype=torch.long)
        program_mask[i, : len(w)] = 1
    reward = torch.tensor([float(ex["reward"]) for ex in examples], dtype=torch.float32)
    is_human = torch.tensor([_is_human(ex, i) for i, ex in enumerate(examples)], dtype=torch.bool)

    tokens = {}
    for key in token_columns:
        missing = [i for i, ex in enumerate(examples) if ex.get(key) is None]
        if missing:
            raise KeyError(f"{_where(examples[missing[0]], missing[0])}: missing per-token column '{key}'")
        tokens[key] = _per_token(examples, key, t)
    info = {key: [ex.get(key) for ex in examples] for key in info_columns}
    weight = None
    if any(ex.get("weight") is not None for ex in examples):
        weight = torch.tensor([1.0 if ex.get("weight") is None else float(ex["weight"]) for ex in examples],
                              dtype=torch.float32)
    return Batch(prompt_ids, prompt_mask, program_ids, program_mask, reward, is_human, tokens=tokens, info=info,
                 weight=weight)


def per_program_means(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """[B]: the mean of each program's values over its valid tokens (the 1/T of eq. 12 and 15)."""
    mask = mask.to(values.dtype)
    return (values * mask).sum(1) / mask.sum(1).clamp_min(1.0)


def per_program_mean(values: torch.Tensor, mask: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over each program's valid tokens, then over the programs, each program's mean times its `weight`
    (importance weights; None: 1, the plain mean)."""
    per_program = per_program_means(values, mask)
    if weight is not None:
        per_program = per_program * weight.to(per_program.dtype)
    return per_program.mean()


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> float:
    mask = mask.to(values.dtype)
    return float((values * mask).sum() / mask.sum().clamp_min(1.0))
