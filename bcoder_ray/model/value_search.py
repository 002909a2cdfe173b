"""Value-guided search at inference: k programs of one prompt sampled side by side (the KV cache of
`bcoder_ray.model.sampling.Decoding`), and every n tokens a learned value of their prefixes (`PrefixValue`) decides
which go on.

    result = value_guided_search(policy, prompt_ids, value, SearchSettings(particles=8, every=16, keep=2),
                                 max_new_tokens=512, eos_id=stop_ids, pad_id=pad, temperature=0.6, seed=0)
    result.programs            # the programs that survived (ended, or cut at max_new_tokens)
    result.generated_tokens    # every token sampled, those of particles later dropped included

A selection, every `every` tokens, looks at the particles still being sampled (the active ones; those that ended
have left and keep their programs):
1. a particle whose value is below `threshold` is stopped for good (early stop: its program is dropped);
2. of the rest, the `keep` best by value survive (ties: the lower row first);
3. the others are pruned: with `refill` each is replaced by a copy of a survivor (best first, round robin; the copy
   shares the survivor's tokens and cache and then samples on its own: sequential Monte Carlo with selection by
   rank), without `refill` it is stopped for good (k prefixes screened, the `keep` best finished).
With `keep >= particles`, no threshold and `refill`, nothing is ever pruned and the search is `sample_programs` of
k programs for the same seed, token for token (the value is not even asked: nothing to decide). The value is
asked only when there is something to decide (more active particles than `keep`, or a threshold).

Counting (`SearchResult`): `generated_tokens` is one per token drawn for an active particle (a copy's shared
prefix was drawn once and counts once; an ended particle draws no more); `value_tokens` the program tokens the
value read (each call reads every active prefix in full: a teacher-forced pass, no cache of its own).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

from bcoder_ray.model.lm import PolicyLM, eval_mode
from bcoder_ray.model.prefix_value import PrefixValue
from bcoder_ray.model.sampling import Decoding, check_warp, stop_id_list
from bcoder_ray.model.tokenization import StopStrings


@dataclass(frozen=True)
class SearchSettings:
    """One value-guided search: how many particles, how often the value selects, what survives a selection."""

    particles: int = 8
    """k: programs sampled side by side (the batch)."""
    every: int = 16
    """n: tokens between selections (at n, 2n, ... tokens of the programs)."""
    keep: int = 2
    """Survivors of a selection among the active particles (≥ particles: rank never prunes)."""
    refill: bool = True
    """A pruned particle is replaced by a copy of a survivor (true) or stopped for good (false)."""
    threshold: float | None = None
    """An active particle valued below this is stopped for good at a selection (None: never)."""

    def __post_init__(self) -> None:
        if self.particles < 1 or self.every < 1 or self.keep < 1:
            raise ValueError(f"SearchSettings: particles, every and keep must be ≥ 1, got {self}")
        if self.threshold is not None and math.isnan(self.threshold):
            raise ValueError("SearchSettings: threshold is NaN")

    @property
    def name(self) -> str:
        """A short name for tables: `k=8 n=16 keep=2 refill` (and `stop<-0.5` with a threshold)."""
        parts = [f"k={self.particles}", f"n={self.every}", f"keep={self.keep}", "refill" if self.refill else "drop"]
        if self.threshold is not None:
            parts.append(f"stop<{self.threshold:g}")
        return " ".join(parts)


@dataclass
class SearchResult:
    programs: list[list[int]]
    """The surviving particles' programs, in row order: each up to its stop id (or stop string), or cut at
    max_new_tokens (none); empty list when every particle was stopped."""
    generated_tokens: int
    """Tokens sampled in all, those of particles pruned or stopped later included."""
    value_tokens: int
    """Program tokens the value read (every call reads each active prefix in full)."""
    selections: int
    """Calls of the value."""
    stopped: int
    """Particles stopped for good (below the threshold, or pruned without refill)."""


def select(values: Sequence[float], keep: int, refill: bool,
           threshold: float | None = None) -> tuple[list[int], list[bool]]:
    """One selection over the active particles' values: (source, stopped), one entry per particle; particle i
    continues as a copy of particle `source[i]` (itself when it survives), unless `stopped[i]`."""
    if any(math.isnan(v) for v in values):
        raise ValueError(f"value-guided search: the value returned NaN for a prefix ({list(values)})")
    eligible = [i for i, v in enumerate(values) if threshold is None or v >= threshold]
    survivors = sorted(eligible, key=lambda i: (-values[i], i))[:keep]
    source = list(range(len(values)))
    stopped = [i not in eligible for i in range(len(values))]
    pruned = [i for i in eligible if i not in survivors]
    for j, i in enumerate(pruned):
        if refill:
            source[i] = survivors[j % len(survivors)]
        else:
            stopped[i] = True
    return source, stopped


@torch.no_grad()
def value_guided_search(policy: PolicyLM, prompt_ids: Sequence[int], value: PrefixValue, settings: SearchSettings,
                        *, max_new_tokens: int, eos_id: int | Sequence[int], pad_id: int, temperature: float = 1.0,
                        top_p: float = 1.0, seed: int = 0,
                        stop_strings: StopStrings | None = None) -> SearchResult:
    """The search of the module docstring on one prompt; sampling as `sample_programs` samples (temperature, then
    top-p; one `torch.Generator` seeded by `seed`)."""
    if not prompt_ids:
        raise ValueError("value_guided_search: the prompt is empty")
    if max_new_tokens < 1:
        raise ValueError(f"value_guided_search: max_new_tokens={max_new_tokens} must be ≥ 1")
    check_warp(temperature, top_p, "value_guided_search")
    device = policy.lm.get_output_embeddings().weight.device
    stop = torch.tensor(stop_id_list(eos_id, "value_guided_search"), dtype=torch.long, device=device)
    generator = torch.Generator(device=device).manual_seed(seed)
    k = settings.particles
    stopped = torch.zeros(k, dtype=torch.bool, device=device)
    generated = value_tokens = selections = 0
    with eval_mode(policy):                                  # no dropout while sampling
        decoding = Decoding(policy, [list(prompt_ids)] * k, stop=stop, pad_id=pad_id, stop_strings=stop_strings)
        for _ in range(max_new_tokens):
            generated += int((~decoding.finished).sum())       # the rows that draw a real token now
            tokens = decoding.draw(temperature, top_p, generator)
            if bool(decoding.finished.all()) or decoding.steps == max_new_tokens:
                break
            active = torch.nonzero(~decoding.finished).flatten().tolist()
            decide = len(active) > settings.keep or settings.threshold is not None
            if decoding.steps % settings.every == 0 and decide:
                prefixes = [decoding.out[i].tolist() for i in active]   # an active row holds no padding yet
                values = [float(v) for v in value.values(prompt_ids, prefixes)]
                if len(values) != len(prefixes):
                    raise ValueError(f"value {value.label!r}: {len(values)} values for {len(prefixes)} prefixes")
                selections += 1
                value_tokens += sum(len(w) for w in prefixes)
                source, stop_now = select(values, settings.keep, settings.refill, settings.threshold)
                index = torch.arange(k)
                index[active] = torch.tensor([active[j] for j in source])
                decoding.reorder(index)
                now = torch.tensor([active[i] for i, s in enumerate(stop_now) if s], dtype=torch.long)
                stopped[now.to(device)] = True
                decoding.finished |= stopped                  # a stopped row draws no more (pad, not counted)
                tokens = decoding.out[:, -1]                  # the reordered rows' last tokens go in next
                if bool(decoding.finished.all()):
                    break
            decoding.feed(tokens)
    programs, _ = decoding.programs()
    kept = [w for w, s in zip(programs, stopped.tolist()) if not s]
    return SearchResult(kept, generated, value_tokens, selections, int(stopped.sum()))
