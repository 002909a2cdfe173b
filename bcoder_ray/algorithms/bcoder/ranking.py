"""The free reward model (Section 4.5, eq. 18-20): per-token Q and V from one teacher-forced pass, R̃, ranking.

Public API
----------
- ``token_scores(model, prompts, programs, *, gamma, pad_id, batch_size=16) -> list[ProgramScores]``: for each
  (prompt ids, program ids) pair (programs as ``tokenization.encode_program`` / ``sampling`` make them, possibly
  written by another model), Q_θ(s_t, a_t), V_θ(s_t), A_θ(s_t, a_t), r̃_t and R̃. Needs θ, and φ when θ uses it.
- ``score_programs(model, prompts, programs, *, gamma, pad_id, batch_size=16) -> list[float]``: R̃ per program.
- ``rank(model, prompt, candidates, *, gamma, pad_id, batch_size=16) -> Ranking``: the m candidates of one prompt,
  ``Ranking.order`` (candidate indices, best R̃ first; ties keep the candidates' order) and ``Ranking.scores``
  (R̃ per candidate, in the candidates' order).
- ``prefix_values(model, prompt, prefixes, *, pad_id, batch_size=16) -> list[float]``: the value of each program
  prefix w_0 … w_{τ-1} for value-guided search, Q_θ(s_{τ-1}, w_{τ-1}) of its last token (below).

Definitions (program w_0 … w_{T-1}, s_t = (prompt, w_<t)):
  r̃_t = Q_θ(s_t, a_t) - γ·V_θ(s_{t+1}) for t < T-1, and r̃_{T-1} = Q_θ(s_{T-1}, a_{T-1}) (V := 0 after the last
  token) — eq. 20 in its approximate form; R̃ = Σ_t r̃_t (eq. 19).
  Identity: R̃ = V(s_0) + Σ_t A_θ(s_t, a_t) + (1-γ)·Σ_{t=1..T-1} V(s_t); all candidates of a prompt share V(s_0).
The value of a prefix is Q_θ(s_{τ-1}, w_{τ-1}), the Q of the token just sampled: the return expected after it
(Bellman: r_{τ-1} + γ·V_θ(s_τ), with r = 0 before the end), so in the units of eq. 2's reward. It is one scale for
prefixes that go on and programs that just ended (their last Q estimates the reward r_T itself, where V(s_T) is
not defined: V := 0 after the last token), and it comes from the same teacher-forced pass as R̃. Not V_φ alone: φ
values θ_ckpt's greedy continuation (the conservative operator, eq. 12, 14), θ's own value is V_θ = V_φ + V^r_θ.
Not the prefix's partial R̃: by the identity above it is V(s_0) + Σ A + a (1-γ) term, a likelihood-like sum that
says little of where the prefix is heading.
The pass runs without gradient; encoder-decoder prompts are encoded once per distinct prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from bcoder_ray.model.batch import collate
from bcoder_ray.algorithms.bcoder.q_model import Encoded, QModel


@dataclass
class ProgramScores:
    q: list[float]           # Q_θ(s_t, a_t)
    value: list[float]       # V_θ(s_t)
    advantage: list[float]   # A_θ(s_t, a_t)
    r_tilde: list[float]     # r̃_t
    total: float             # R̃


@dataclass
class Ranking:
    order: list[int]
    scores: list[float]


def _encode_unique(model: QModel, prompts: Sequence[Sequence[int]], pad_id: int) -> Encoded | None:
    if model.encoder is None:
        return None
    keys = [tuple(p) for p in prompts]
    unique = list(dict.fromkeys(keys))
    where = {k: i for i, k in enumerate(unique)}
    examples = [{"prompt_ids": list(k), "program_ids": [pad_id], "reward": 0.0, "is_human": False} for k in unique]
    prompt_batch = collate(examples, pad_id).to(model.encoder.embedding.weight.device)
    encoded = model.encode(prompt_batch)
    index = torch.tensor([where[k] for k in keys], device=encoded.hidden.device)
    return encoded.select(index)


@torch.no_grad()
def token_scores(model: QModel, prompts: Sequence[Sequence[int]], programs: Sequence[Sequence[int]], *,
                 gamma: float, pad_id: int, batch_size: int = 16) -> list[ProgramScores]:
    if model.theta is None:
        raise ValueError("ranking needs θ")
    if model.theta.uses_phi and model.phi is None:
        raise ValueError("ranking needs φ's value path too: create the QModel with parts ('phi', 'theta')")
    if len(prompts) != len(programs):
        raise ValueError(f"token_scores: {len(prompts)} prompts but {len(programs)} programs")
    device = model.theta.lm.get_output_embeddings().weight.device
    was_training = model.training
    model.eval()
    results: list[ProgramScores] = []
    try:
        for start in range(0, len(programs), batch_size):
            chunk_prompts = prompts[start:start + batch_size]
            chunk = [{"prompt_ids": list(p), "program_ids": list(w), "reward": 0.0, "is_human": False}
                     for p, w in zip(chunk_prompts, programs[start:start + batch_size])]
            batch = collate(chunk, pad_id).to(device)
            encoded = _encode_unique(model, chunk_prompts, pad_id)
            v_phi = model.phi_raw_values(batch, encoded) if model.theta.uses_phi else None
            out = model.theta_outputs(batch, encoded, v_phi)
            next_value = torch.zeros_like(out.value)
            next_value[:, :-1] = out.value[:, 1:]
            last = batch.lengths - 1
            next_value[torch.arange(batch.size, device=device), last] = 0.0    # V(s_T) := 0 after the last token
            r_tilde = out.q - gamma * next_value                                # eq. 20
            for b, length in enumerate(batch.lengths.tolist()):
                r = r_tilde[b, :length]
                results.append(ProgramScores(q=out.q[b, :length].tolist(), value=out.value[b, :length].tolist(),
                                             advantage=out.advantage[b, :length].tolist(), r_tilde=r.tolist(),
                                             total=float(r.sum())))          # eq. 19
    finally:
        model.train(was_training)
    return results


def score_programs(model: QModel, prompts: Sequence[Sequence[int]], programs: Sequence[Sequence[int]], *,
                   gamma: float, pad_id: int, batch_size: int = 16) -> list[float]:
    """R̃ of each (prompt, program), each distinct pair scored once: a repeated program gets the very same score
    (scored in another batch, its padding would differ and the float rounding with it, so ties would not be ties)."""
    pairs = [(tuple(p), tuple(w)) for p, w in zip(prompts, programs, strict=True)]
    distinct = list(dict.fromkeys(pairs))
    totals = [s.total for s in token_scores(model, [p for p, _ in distinct], [w for _, w in distinct], gamma=gamma,
                                            pad_id=pad_id, batch_size=batch_size)]
    by_pair = dict(zip(distinct, totals))
    return [by_pair[x] for x in pairs]


def rank(model: QModel, prompt: Sequence[int], candidates: Sequence[Sequence[int]], *, gamma: float, pad_id: int,
         batch_size: int = 16) -> Ranking:
    if not candidates:
        raise ValueError("rank: no candidates")
    scores = score_programs(model, [prompt] * len(candidates), candidates, gamma=gamma, pad_id=pad_id,
                            batch_size=batch_size)
    order = sorted(range(len(candidates)), key=lambda i: -scores[i])
    return Ranking(order=order, scores=scores)


def prefix_values(model: QModel, prompt: Sequence[int], prefixes: Sequence[Sequence[int]], *, pad_id: int,
                  batch_size: int = 16) -> list[float]:
    """Q_θ(s_{τ-1}, w_{τ-1}) of each prefix's last token (see the module docstring), one teacher-forced pass."""
    if any(len(w) == 0 for w in prefixes):
        raise ValueError("prefix_values: an empty prefix has no last token to value")
    scores = token_scores(model, [prompt] * len(prefixes), prefixes, gamma=1.0,  # Q does not depend on γ
                          pad_id=pad_id, batch_size=batch_size)
    return [s.q[-1] for s in scores]
