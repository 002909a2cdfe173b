"""Sampling programs from a policy LM (B-Coder's Q-sampling, Algorithm 2, is this over θ's LM): batched
temperature / nucleus sampling with the KV cache.

Public API
----------
- ``sample_programs(policy, prompts, n, *, max_new_tokens, eos_id, pad_id, temperature=1.0, top_p=1.0, seed=0,
  batch_size=None) -> list[list[list[int]]]``: ``policy`` is a ``bcoder_ray.model.lm.PolicyLM`` (a published
  policy as ``from_pretrained`` loads it, or a network of an algorithm that is one, such as B-Coder's θ);
  ``prompts`` are prompt token ids (list of lists,
  as ``tokenization.encode_prompt`` makes them); returns, per prompt, ``n`` programs as token-id lists, each ending
  at its first stop id (included; ``eos_id`` is one id or several, ``tokenization.stop_ids``) or cut at
  ``max_new_tokens`` tokens (none) — the same convention as ``tokenization.encode_program``. With ``stop_strings``
  (a ``tokenization.StopStrings``) a program also ends at the token that completes the first stop string (that token
  included). ``temperature=0`` is greedy decoding. With ``return_logprobs`` it returns
  ``(programs, logprobs)``: each sampled token's log-probability under the distribution it was drawn from
  (after temperature and top-p; the policy's own log-softmax for greedy decoding), aligned with the tokens.
  Rows are prompt-major (prompt 0's n samples first), processed ``batch_size`` rows at a time
  (default: all), with one ``torch.Generator`` seeded by ``seed`` for the whole call, so a call is reproducible for
  the same inputs, settings and ``batch_size``.
- ``warp_scores(scores, temperature, top_p) -> scores``: the sampler's processing of one step's scores
  (temperature, then top-p), the same operations and order as ``transformers``' ``generate``.
- ``Decoding(policy, rows, *, stop, pad_id, ...)``: the sampler's step-by-step state (KV cache, tokens, ends) with
  ``draw``, ``feed``, ``reorder`` (rows copied from others: value-guided search) and ``programs``.

Why θ alone: Q_θ(s, ·)/α = ℓ_θ(s, ·) - max_a ℓ_θ(s, a) + V_θ(s)/α is ℓ_θ plus a per-state constant, and
temperature, top-p and softmax are all invariant to such a constant. So Algorithm 2's distribution is exactly the
one obtained from ℓ_θ; the sampler uses ℓ_θ (no V head, no φ; per-token Q and V for ranking come from one
teacher-forced pass afterwards, ``bcoder_ray.algorithms.bcoder.ranking``). At initialisation ℓ_θ = ℓ_ckpt, so this draws the same
tokens as ``generate`` on the checkpoint with the same seed and settings.
"""

from __future__ import annotations

import numbers
from typing import Sequence

import torch

from bcoder_ray.model.lm import ENCODER_DECODER, PolicyLM, positions_from_mask
from bcoder_ray.model.tokenization import StopStrings


def warp_scores(scores: torch.Tensor, temperature: float, top_p: float) -> torch.Tensor:
    if temperature != 1.0:
        scores = scores / temperature
    if top_p < 1.0:
        sorted_scores, sorted_index = torch.sort(scores, descending=False)
        cumulative = sorted_scores.softmax(dim=-1).cumsum(dim=-1)
        remove_sorted = cumulative <= (1 - top_p)
        remove_sorted[..., -1:] = False                      # keep at least the most likely token
        remove = remove_sorted.scatter(1, sorted_index, remove_sorted)
        scores = scores.masked_fill(remove, -float("inf"))
    return scores


def _pad_left(rows: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, r in enumerate(rows):
        if len(r):
            ids[i, width - len(r):] = torch.tensor(list(r), dtype=torch.long)
            mask[i, width - len(r):] = 1
    return ids.to(device), mask.to(device)


class Decoding:
    """Rows of token ids decoded one token at a time with the KV cache: the sampler's loop (`sample_programs`) and
    value-guided search (`bcoder_ray.model.value_search`, which also reorders the rows) share it.

    ``draw`` samples each row's next token (a finished row gets ``pad_id``) and records where a row ends (its
    first stop id, or the token that completes a stop string); ``feed`` runs the body one step on those tokens;
    ``reorder`` makes row i a copy of row ``index[i]`` (its tokens, cache and end state); ``programs`` cuts each
    row at its end (stop token included). ``out`` [rows, steps] holds the tokens drawn, ``finished`` which rows
    have ended."""

    def __init__(self, policy: PolicyLM, rows: Sequence[Sequence[int]], *, stop: torch.Tensor, pad_id: int,
                 decoder_prefix: Sequence[int] = (), prefix: Sequence[int] = (),
                 stop_strings: StopStrings | None = None):
        self.policy, self.stop, self.pad_id, self.stop_strings = policy, stop, pad_id, stop_strings
        device = policy.lm.get_output_embeddings().weight.device
        ids, self.mask = _pad_left(rows, pad_id, device)
        self.encoded = None
        if policy.kind == ENCODER_DECODER:
            self.encoded = policy.encode(ids, self.mask)
            step_ids = torch.tensor([[policy.decoder_start_id, *decoder_prefix]] * len(rows), dtype=torch.long,
                                    device=device)
            self.hidden, self.cache = policy.decode(step_ids, encoded=self.encoded, use_cache=True)
        else:
            positions = positions_from_mask(self.mask)
            self.hidden, self.cache = policy.decode(ids, attention_mask=self.mask, position_ids=positions,
                                                    use_cache=True)
            self.last_position = positions[:, -1:]
        self.out = torch.empty((len(rows), 0), dtype=torch.long, device=device)
        self.logps = torch.empty((len(rows), 0), dtype=torch.float32, device=device)
        self.finished = torch.zeros(len(rows), dtype=torch.bool, device=device)
        self.texts = [list(prefix) for _ in rows] if stop_strings is not None else None  # each row's program so far
        self.string_end: dict[int, int] = {}  # row -> its length where a stop string ended it

    @property
    def steps(self) -> int:
        return self.out.shape[1]

    def draw(self, temperature: float, top_p: float, generator: torch.Generator) -> torch.Tensor:
        """Each row's next token (``pad_id`` for a row that has ended), recorded with its log-probability."""
        scores = self.policy.logits(self.hidden[:, -1]).float()  # ℓ_θ(s, ·): Q_θ(s, ·)/α up to a per-state shift
        if temperature == 0:
            log_probs = scores.log_softmax(dim=-1)
            tokens = scores.argmax(dim=-1)
        else:
            warped = warp_scores(scores, temperature, top_p)
            log_probs = warped.log_softmax(dim=-1)
            tokens = torch.multinomial(warped.softmax(dim=-1), 1, generator=generator).squeeze(1)
        # the log-probability of the distribution sampled
        self.logps = torch.cat([self.logps, log_probs.gather(1, tokens[:, None])], dim=1)
        tokens = tokens.masked_fill(self.finished, self.pad_id)
        self.out = torch.cat([self.out, tokens[:, None]], dim=1)
        self.finished |= torch.isin(tokens, self.stop)
        if self.texts is not None:
            for i, (t, done) in enumerate(zip(tokens.tolist(), self.finished.tolist())):
                if not done:
                    self.texts[i].append(t)
                    if self.stop_strings.completed(self.texts[i]):  # it completes a stop string: the row ends
                        self.finished[i] = True
                        self.string_end[i] = self.steps
        return tokens

    def feed(self, tokens: torch.Tensor) -> None:
        """One step of the body on the tokens just drawn (the cache grows by one position)."""
        if self.policy.kind == ENCODER_DECODER:
            self.hidden, self.cache = self.policy.decode(tokens[:, None], encoded=self.encoded, cache=self.cache,
                                                         use_cache=True)
        else:
            self.mask = torch.cat([self.mask, self.mask.new_ones((len(tokens), 1))], dim=1)
            self.last_position = self.last_position + 1
            self.hidden, self.cache = self.policy.decode(tokens[:, None], attention_mask=self.mask,
                                                         position_ids=self.last_position, cache=self.cache,
                                                         use_cache=True)

    def reorder(self, index: torch.Tensor) -> None:
        """Row i becomes a copy of row ``index[i]``: its tokens so far, its KV cache and whether it ended."""
        index = index.to(self.out.device)
        self.cache.reorder_cache(index)
        self.hidden, self.mask = self.hidden[index], self.mask[index]
        self.out, self.logps, self.finished = self.out[index], self.logps[index], self.finished[index]
        if self.encoded is not None:
            self.encoded = self.encoded.select(index)
        else:
            self.last_position = self.last_position[index]
        source = index.tolist()
        if self.texts is not None:
            self.texts = [list(self.texts[j]) for j in source]
        self.string_end = {i: self.string_end[j] for i, j in enumerate(source) if j in self.string_end}

    def programs(self) -> tuple[list[list[int]], list[list[float]]]:
        """Each row's tokens up to its end (the stop token or the stop string's last token included), or all of
        them for a row cut at the length limit, with their log-probabilities."""
        programs, program_logps = [], []
        stop_set = set(self.stop.tolist())
        for r, (row, lp) in enumerate(zip(self.out.tolist(), self.logps.tolist())):
            keep = min(next((i + 1 for i, t in enumerate(row) if t in stop_set), len(row)),
                       self.string_end.get(r, len(row)))
            programs.append(row[:keep])
            program_logps.append(lp[:keep])
        return programs, program_logps


def check_warp(temperature: float, top_p: float, where: str) -> None:
    if temperature < 0 or not 0 < top_p <= 1:
        raise ValueError(f"{where}: temperature={temperature} must be ≥ 0 and top_p={top_p} in (0, 1]")


def stop_id_list(eos_id: int | Sequence[int], where: str) -> list[int]:
    """The ids that end a program, from one id or several (refused when there are none)."""
    stop_list = [int(eos_id)] if isinstance(eos_id, numbers.Integral) else [int(t) for t in eos_id]
    if not stop_list:
        raise ValueError(f"{where}: eos_id names no token that ends a program")
    return stop_list


@torch.no_grad()
def _sample_rows(policy: PolicyLM, rows: Sequence[Sequence[int]], *, max_new_tokens: int,
                 stop: torch.Tensor, pad_id: int, temperature: float, top_p: float,
                 generator: torch.Generator, decoder_prefix: Sequence[int] = (), prefix: Sequence[int] = (),
                 stop_strings: StopStrings | None = None) -> tuple[list[list[int]], list[list[float]]]:
    decoding = Decoding(policy, rows, stop=stop, pad_id=pad_id, decoder_prefix=decoder_prefix, prefix=prefix,
                        stop_strings=stop_strings)
    for _ in range(max_new_tokens):
        tokens = decoding.draw(temperature, top_p, generator)
        if bool(decoding.finished.all()) or decoding.steps == max_new_tokens:
            break
        decoding.feed(tokens)
    return decoding.programs()


def sample_programs(policy: PolicyLM, prompts: Sequence[Sequence[int]], n: int, *, max_new_tokens: int,
                    eos_id: int | Sequence[int],
                    pad_id: int, temperature: float = 1.0, top_p: float = 1.0, seed: int = 0,
                    batch_size: int | None = None, return_logprobs: bool = False,
                    prefix: Sequence[int] = (), stop_strings: StopStrings | None = None):
    """``n`` samples from ``policy`` for every prompt (see the module docstring).

    ``prefix``: program tokens every sample continues (Critic Sampling's seeds); each returned program starts
    with it and has at most ``max_new_tokens`` tokens in all (prefix included). No log-probabilities then.
    ``stop_strings``: a program also ends at the token that completes the first of them."""
    if n < 1 or max_new_tokens < 1:
        raise ValueError(f"sample_programs: n={n} and max_new_tokens={max_new_tokens} must be ≥ 1")
    check_warp(temperature, top_p, "sample_programs")
    for i, p in enumerate(prompts):
        if len(p) == 0:
            raise ValueError(f"sample_programs: prompt {i} is empty")
    prefix = [int(t) for t in prefix]
    stop_list = stop_id_list(eos_id, "sample_programs")
    if prefix and (return_logprobs or len(prefix) >= max_new_tokens or set(stop_list) & set(prefix)):
        raise ValueError(f"sample_programs: a prefix ({len(prefix)} tokens) must be shorter than max_new_tokens="
                         f"{max_new_tokens}, hold no EOS, and comes without log-probabilities")
    if prefix and stop_strings is not None and stop_strings.end(prefix) is not None:
        raise ValueError(f"sample_programs: the prefix ({len(prefix)} tokens) already holds a stop string")
    decoder_prefix = prefix if policy.kind == ENCODER_DECODER else []
    rows = [list(p) + ([] if decoder_prefix else prefix) for p in prompts for _ in range(n)]
    new_tokens = max_new_tokens - len(prefix)
    device = policy.lm.get_output_embeddings().weight.device
    generator = torch.Generator(device=device).manual_seed(seed)
    stop = torch.tensor(stop_list, dtype=torch.long, device=device)
    step = batch_size or max(len(rows), 1)
    programs: list[list[int]] = []
    logprobs: list[list[float]] = []
    was_training = policy.training
    policy.eval()                                           # no dropout while sampling
    try:
        for start in range(0, len(rows), step):
            ids, lps = _sample_rows(policy, rows[start:start + step], max_new_tokens=new_tokens,
                                    stop=stop, pad_id=pad_id, temperature=temperature, top_p=top_p,
                                    generator=generator, decoder_prefix=decoder_prefix, prefix=prefix,
                                    stop_strings=stop_strings)
            programs += [prefix + x for x in ids]
            logprobs += lps
    finally:
        policy.train(was_training)
    per_prompt = [programs[i * n:(i + 1) * n] for i in range(len(prompts))]
    if return_logprobs:
        return per_prompt, [logprobs[i * n:(i + 1) * n] for i in range(len(prompts))]
    return per_prompt
