"""Critic Sampling (CodeRL, Le et al. 2022, Figure 3; ``docs/baselines.md`` §1) as pure logic over
callables, so that any sampler, executor and critic can drive it (and a scripted critic can test it).

Public API
----------
- ``critic_sampling(n, rounds, sample_fn, example_pass_fn, value_fn, *, seed=0) -> CriticSamplingResult``.
  Callables (programs are lists of token ids, EOS last unless cut at the length limit):
    ``sample_fn(prefixes, counts, seed) -> programs``: ``counts[j]`` complete programs continuing ``prefixes[j]``
      (each starts with its prefix), grouped in the order of ``prefixes``; ``[[]]`` is plain sampling.
    ``example_pass_fn(programs) -> list[bool]``: passes the problem's example tests (the set F).
    ``value_fn(programs) -> list[(p_pass, p_fail)]``: per program, two sequences of its length, entry t =
      p(passed | w_0…w_t, D) and p(failed | w_0…w_t, D) from the binary critic φ_test
      (``critic.p_passed_prefixes``).
- ``cut_point(p_pass, p_fail) -> int``: the length of the seed kept from one program.
- ``allocate(n, seed_values) -> list[int]``: continuations per seed.
- ``pool_order(passes_examples, p_passed) -> list[int]``: the n@k submission order of a pool.
- ``require_example_tests(problem, example_tests)``; ``CriticSamplingRefused`` (a ``ValueError``).
- ``CriticSamplingResult``: ``programs`` (the pool, every round, in sampling order), ``passes_examples``,
  ``p_passed`` (p_pass of the whole program, its last prefix), ``order``, ``rounds`` (``Round`` records),
  ``n_sampled`` (programs sampled in all rounds: the budget), ``submissions(k)``.

The procedure (per problem): round 1 samples N programs. Each later round takes F, the programs of the round
before that pass the example tests; cuts each at ``cut_point`` and resamples N continuations of the seeds
(``allocate``): ⌊N/|F|⌋ per seed and the N mod |F| remaining to the best-valued seeds (p_pass at the seed's last
token; ties go to the earlier-sampled program). With F empty the round is plain sampling. Seeds passed to
``sample_fn`` are ``seed + round index``. All rounds' programs form the pool; the submissions of n@k are the pool's
programs that pass the example tests ordered by p(passed), then the rest by p(passed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable, Sequence

Program = list[int]
SampleFn = Callable[[list[Program], list[int], int], list[Program]]
ExamplePassFn = Callable[[list[Program]], list[bool]]
ValueFn = Callable[[list[Program]], list[tuple[Sequence[float], Sequence[float]]]]


class CriticSamplingRefused(ValueError):
    """Critic Sampling needs example tests (its set F); raised for problems or suites that have none."""


def require_example_tests(problem: str, example_tests: object) -> None:
    """Refuse a problem whose example tests are missing or empty (``Problem.example_tests`` is None there)."""
    if example_tests is None or (hasattr(example_tests, "__len__") and len(example_tests) == 0):
        raise CriticSamplingRefused(f"{problem}: no example tests; Critic Sampling keeps the programs that pass "
                                    f"them (the filtered setting), so it cannot run on this problem")


# ---------------------------------------------------------------------------------------------- pieces
def cut_point(p_pass: Sequence[float], p_fail: Sequence[float]) -> int:
    """Number of leading tokens kept as a seed: min(argmax_t p_pass + 1, first t with p_fail > p_pass), ≤ T-1.

    The seed is the prefix of highest p(passed) (w_0…w_t* inclusive; the first maximum on ties), or the tokens
    before the first one at which p(failed) > p(passed) when that comes earlier. It never includes the program's
    last token, so each continuation samples at least one new token.

    Read literally (as the issue states it), a prefix whose very first token already has p(failed) > p(passed)
    gives an empty seed (value -inf for ``allocate``): with a binary critic whose early-prefix values sit near a
    pass base rate below 1/2, most seeds are empty and a round is close to plain sampling. Report the seed
    lengths (``Round.seeds``) when running it."""
    if len(p_pass) != len(p_fail) or len(p_pass) == 0:
        raise ValueError(f"cut_point: p_pass ({len(p_pass)}) and p_fail ({len(p_fail)}) must be equal, non-empty")
    best = max(range(len(p_pass)), key=lambda t: (p_pass[t], -t))     # first argmax
    length = best + 1
    for t in range(len(p_pass)):
        if p_fail[t] > p_pass[t]:
            length = min(length, t)
            break
    return min(length, len(p_pass) - 1)


def allocate(n: int, seed_values: Sequence[float]) -> list[int]:
    """⌊n/|F|⌋ continuations per seed, one more for each of the (n mod |F|) best-valued seeds; sums to n."""
    if n < 1 or not seed_values:
        raise ValueError(f"allocate: need n ≥ 1 and at least one seed, got n={n}, {len(seed_values)} seeds")
    base, remainder = divmod(n, len(seed_values))
    counts = [base] * len(seed_values)
    best_first = sorted(range(len(seed_values)), key=lambda j: (-seed_values[j], j))
    for j in best_first[:remainder]:
        counts[j] += 1
    return counts


def pool_order(passes_examples: Sequence[bool], p_passed: Sequence[float]) -> list[int]:
    """Indices of the pool: example-passing programs by p(passed) descending, then the rest; ties by index."""
    if len(passes_examples) != len(p_passed):
        raise ValueError(f"pool_order: {len(passes_examples)} verdicts for {len(p_passed)} values")
    return sorted(range(len(p_passed)), key=lambda i: (not passes_examples[i], -p_passed[i], i))


# ---------------------------------------------------------------------------------------------- the loop
@dataclass
class Round:
    """One round: the seeds resampled (``[[]]`` for plain sampling), their counts, and what came out."""
    index: int
    seeds: list[Program]
    counts: list[int]
    programs: list[Program] = field(default_factory=list)
    passes_examples: list[bool] = field(default_factory=list)
    p_pass: list[list[float]] = field(default_factory=list)
    p_fail: list[list[float]] = field(default_factory=list)

    @property
    def plain(self) -> bool:
        return self.seeds == [[]]


@dataclass
class CriticSamplingResult:
    programs: list[Program]
    passes_examples: list[bool]
    p_passed: list[float]
    order: list[int]
    rounds: list[Round]

    @property
    def n_sampled(self) -> int:
        """Programs sampled across all rounds (what the sample budget counts)."""
        return len(self.programs)

    def submissions(self, k: int) -> list[Program]:
        """The first ``k`` programs of the n@k order."""
        return [self.programs[i] for i in self.order[:k]]


def _sample(sample_fn: SampleFn, seeds: list[Program], counts: list[int], seed: int, where: str) -> list[Program]:
    programs = [list(p) for p in sample_fn([list(s) for s in seeds], list(counts), seed)]
    if len(programs) != sum(counts):
        raise ValueError(f"{where}: sample_fn returned {len(programs)} programs for counts {counts} "
                         f"(expected {sum(counts)})")
    i = 0
    for j, (prefix, count) in enumerate(zip(seeds, counts)):
        for program in programs[i:i + count]:
            if not program:
                raise ValueError(f"{where}: sample_fn returned an empty program (program {i})")
            if program[:len(prefix)] != prefix:
                raise ValueError(f"{where}: program {i} does not start with its seed {j} ({len(prefix)} tokens)")
            i += 1
    return programs


def _judge(round_: Round, example_pass_fn: ExamplePassFn, value_fn: ValueFn, where: str) -> None:
    passes = [bool(x) for x in example_pass_fn(round_.programs)]
    values = list(value_fn(round_.programs))
    if len(passes) != len(round_.programs) or len(values) != len(round_.programs):
        raise ValueError(f"{where}: {len(round_.programs)} programs, but example_pass_fn gave {len(passes)} "
                         f"verdicts and value_fn {len(values)} value lists")
    for i, (program, (p_pass, p_fail)) in enumerate(zip(round_.programs, values)):
        if len(p_pass) != len(program) or len(p_fail) != len(program):
            raise ValueError(f"{where}: program {i} has {len(program)} tokens, value_fn gave {len(p_pass)} p_pass "
                             f"and {len(p_fail)} p_fail values")
        round_.p_pass.append([float(v) for v in p_pass])
        round_.p_fail.append([float(v) for v in p_fail])
    round_.passes_examples = passes


def _next_seeds(previous: Round) -> tuple[list[Program], list[float]]:
    """Seeds (cut prefixes) of the previous round's programs in F, with their values; empty when F is empty."""
    seeds, values = [], []
    for program, passed, p_pass, p_fail in zip(previous.programs, previous.passes_examples, previous.p_pass,
                                                previous.p_fail):
        if not passed:
            continue
        length = cut_point(p_pass, p_fail)
        seeds.append(program[:length])
        values.append(p_pass[length - 1] if length > 0 else -math.inf)
    return seeds, values


def critic_sampling(n: int, rounds: int, sample_fn: SampleFn, example_pass_fn: ExamplePassFn, value_fn: ValueFn,
                    *, seed: int = 0) -> CriticSamplingResult:
    """Run ``rounds`` rounds of N programs each (see the module docstring); returns the pool and its n@k order."""
    if n < 1 or rounds < 1:
        raise ValueError(f"critic_sampling: n and rounds must be ≥ 1, got n={n}, rounds={rounds}")
    history: list[Round] = []
    for index in range(rounds):
        seeds, values = _next_seeds(history[-1]) if history else ([], [])
        counts = allocate(n, values) if seeds else [n]
        seeds = seeds if seeds else [[]]                                    # F empty: plain sampling
        where = f"critic sampling round {index}"
        round_ = Round(index, seeds, counts)
        round_.programs = _sample(sample_fn, seeds, counts, seed + index, where)
        _judge(round_, example_pass_fn, value_fn, where)
        history.append(round_)
    programs = [p for r in history for p in r.programs]
    passes = [x for r in history for x in r.passes_examples]
    p_passed = [v[-1] for r in history for v in r.p_pass]                # p(passed | whole program, D)
    return CriticSamplingResult(programs, passes, p_passed, pool_order(passes, p_passed), history)
