"""Rankers side by side: one set of candidates ranked by several rankers, one table, each ranker's ranked pass@1
with a paired interval against the policy's likelihood (`experiments/evaluate.py --rankers`).

    inputs = RankingInputs(executor=executor, sampler=sampler, runs=("runs/bcoder", "runs/coderl"))
    rankers = build_rankers(["random", "sum_loglik", "mean_loglik", "majority_vote", "run", "run_untrained"],
                            inputs)
    table = compare_rankers(problems, records, rankers, baseline="sum_loglik")
    print(table.markdown())

A ranker here is a name and a `ScoreFn`: the candidates of one problem in, one score per candidate out (higher
is better), or None where it does not apply to that problem (majority vote on a problem without example tests).
`RANKERS` maps names to factories that build them from what is at hand (`RankingInputs`); a factory that lacks
an input returns its rows with `score=None` and the reason, so the table says why a row is empty rather than
leaving it out. The factories of rankers that need an algorithm (`run`, `run_untrained`) are registered by
`bcoder_ray.loop.run_rankers`, since this layer never imports one.

Every number is exact given the scores: ranked pass@1 of a problem is `metrics.n_at_k(scores, passed, 1, m)`
(ties broken uniformly at random, in expectation), so `random` (a constant score) is unranked pass@1 exactly;
intervals are `metrics.bootstrap_ci` over problems, paired for the difference to the baseline.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Callable, Hashable, Iterable, Sequence

import numpy as np

from bcoder_ray.evaluation.metrics import CandidateError, CandidateRecord, bootstrap_ci, group_by_problem, n_at_k
from bcoder_ray.model.candidates import Sampler
from bcoder_ray.model.likelihood import LogLikelihoodRanker, TokenLogprobs
from bcoder_ray.model.ranker import Ranker
from bcoder_ray.model.tokenization import TextFormat, encode_program, pad_id
from envs import scoring
from envs.problem import Problem
from envs.result import ExecResult, Outcome

RANKERS_MD = "rankers.md"
RANKERS_JSON = "rankers.json"
# A ranker whose pick is the baseline's own on this share of problems (and whose paired interval holds 0) only
# restates the baseline: the table calls it that rather than "no measurable difference".
RESTATES_AGREEMENT = 0.9


@dataclass(frozen=True)
class ProblemCandidates:
    """The candidates of one problem (sorted by sample_index) with the problem they answer."""

    problem: Problem
    records: tuple[CandidateRecord, ...]

    @property
    def programs(self) -> list[str]:
        return [r.program for r in self.records]


ScoreFn = Callable[[ProblemCandidates], "Sequence[float] | None"]
"""One score per candidate of the problem (higher is better), or None: the ranker does not apply to it."""


@dataclass(frozen=True)
class NamedRanker:
    """A row of the table: its name, what it computes (`note`), and its scores; `score` None: it could not be
    built here, and `note` says why."""

    name: str
    score: ScoreFn | None
    note: str = ""
    not_applicable: str = "does not apply"
    """What the table says of the problems where `score` returned None."""


@dataclass
class RankingInputs:
    """What the ranker factories may draw on (each takes what it needs and says what is missing)."""

    executor: Any | None = None
    """Runs the programs on the example tests (majority vote)."""
    sampler: Sampler | None = None
    """The policy that sampled the candidates: its LM's log-likelihoods (`sum_loglik`, `mean_loglik`)."""
    runs: tuple[str, ...] = ()
    """Run folders whose algorithms' rankers join the table (`run`, `run_untrained`)."""
    device: str | None = None
    max_prompt_len: int = 600
    max_program_len: int = 512
    shared: dict = field(default_factory=dict, repr=False)
    """What several rankers share (one likelihood pass for the sum and the mean)."""


RankerFactory = Callable[[RankingInputs], list[NamedRanker]]
RANKERS: dict[str, RankerFactory] = {}


def register_ranker(name: str, factory: RankerFactory) -> RankerFactory:
    """Make `name` a ranker of `--rankers`; the factory builds its rows (one or more) from `RankingInputs`."""
    if name in RANKERS and RANKERS[name] is not factory:
        raise ValueError(f"ranker {name!r} is already registered")
    RANKERS[name] = factory
    return factory


def build_rankers(names: Iterable[str], inputs: RankingInputs) -> list[NamedRanker]:
    """The rows of `names` ("all": every registered ranker, in registration order)."""
    names = list(names)
    if "all" in names:
        names = list(RANKERS)
    unknown = [n for n in names if n not in RANKERS]
    if unknown:
        raise ValueError(f"unknown ranker(s) {unknown}; registered: {sorted(RANKERS)} (or 'all')")
    return [row for name in dict.fromkeys(names) for row in RANKERS[name](inputs)]


def token_score_fn(ranker: Ranker, tokenizer: Any, text_format: TextFormat = TextFormat(), *,
                   max_prompt_len: int = 600, max_program_len: int = 512) -> ScoreFn:
    """A token-level `Ranker` (any algorithm's, or the likelihood) as a `ScoreFn`: the prompt in the ranker's
    own format and the programs' text encoded with its own tokenizer, as `evaluate.rank_candidates_file` does,
    so candidates sampled by another model (or read from a file) are scored the same way."""

    def score(candidates: ProblemCandidates) -> list[float]:
        prompt = text_format.prompt_ids(tokenizer, candidates.problem.prompt, max_prompt_len)
        programs = [encode_program(tokenizer, text, max_program_len) for text in candidates.programs]
        return list(ranker.score([prompt] * len(programs), programs))

    return score


# ---------------------------------------------------------------------------------------------- built-in rankers
def _random(inputs: RankingInputs) -> list[NamedRanker]:
    # a constant score: n_at_k breaks the all-way tie uniformly at random, exactly, so this row is pass@1
    return [NamedRanker("random", lambda c: [0.0] * len(c.records),
                        "unranked pass@1: the exact expectation over a uniform choice")]


def _likelihood(reduction: str) -> RankerFactory:
    def factory(inputs: RankingInputs) -> list[NamedRanker]:
        name = f"{reduction}_loglik"
        what = "Σ_t log p(w_t | s_t)" if reduction == "sum" else "Σ_t log p(w_t | s_t) / T (per token)"
        sampler = inputs.sampler
        if sampler is None or sampler.lm is None:
            return [NamedRanker(name, None, "needs the sampling LM (--checkpoint or --run-dir, torch engine)")]
        if "logprobs" not in inputs.shared:  # one teacher-forced pass serves the sum and the mean
            inputs.shared["logprobs"] = TokenLogprobs(sampler.lm, pad_id(sampler.tokenizer))
        ranker = LogLikelihoodRanker(inputs.shared["logprobs"], reduction)
        score = token_score_fn(ranker, sampler.tokenizer, sampler.text_format,
                               max_prompt_len=inputs.max_prompt_len, max_program_len=inputs.max_program_len)
        return [NamedRanker(name, score, f"{what} under {sampler.label}, the LM's own distribution (T = 1)")]

    return factory


def behaviour(result: ExecResult | None) -> Hashable | None:
    """A program's behaviour on a problem's example tests, as the judge reports it: per test, "passed" (its output
    is the expected one), or the status with the judge's message (a wrong output: "returned 5, expected 6",
    "wrong output: got ...", "assertion failed with [...]", each cut at 120-200 characters by the judge; an
    exception's message; a timeout). None: nothing to agree on (not run, no verdict, did not compile, or no test
    produced an output)."""
    if result is None or result.is_infra or result.outcome == Outcome.COMPILE_ERROR:
        return None
    produced = {Outcome.PASSED.value, Outcome.FAILED.value}
    if not any(t.status in produced for t in result.tests):
        return None
    return tuple((t.status, None if t.passed else t.error) for t in result.tests)


def majority_vote_scores(results: Sequence[ExecResult | None]) -> list[float]:
    """CodeT-style agreement: each program scores the number of the problem's programs that behave exactly as it
    does on the example tests (its cluster's size, itself included); a program with no behaviour scores 0."""
    signatures = [behaviour(r) for r in results]
    sizes = Counter(s for s in signatures if s is not None)
    return [float(sizes[s]) if s is not None else 0.0 for s in signatures]


def _majority_vote(inputs: RankingInputs) -> list[NamedRanker]:
    name, note = "majority_vote", "size of the cluster of programs with the same outputs on the example tests"
    if inputs.executor is None:
        return [NamedRanker(name, None, "needs an executor to run the example tests")]
    executor = inputs.executor

    def score(candidates: ProblemCandidates) -> list[float] | None:
        problem = candidates.problem
        if problem.example_tests is None:
            return None  # nothing public to agree on: the table says so rather than voting on nothing
        # the same programs' example results are the executor's cache hits after sampling
        results = scoring.score_examples(executor, [problem] * len(candidates.records), candidates.programs)
        return majority_vote_scores(results)

    return [NamedRanker(name, score, note, not_applicable="no example tests")]


register_ranker("random", _random)
register_ranker("sum_loglik", _likelihood("sum"))
register_ranker("mean_loglik", _likelihood("mean"))
register_ranker("majority_vote", _majority_vote)


# ---------------------------------------------------------------------------------------------- the comparison
@dataclass(frozen=True)
class Paired:
    """Mean over the problems both rankers rank of (this ranker's ranked pass@1 - the baseline's), with its
    percentile-bootstrap interval over those problems."""

    n_problems: int
    mean: float
    low: float
    high: float


@dataclass(frozen=True)
class RankerRow:
    name: str
    note: str
    n_problems: int
    """Problems the ranker ranked (those where it does not apply are left out of its figures)."""
    ranked_pass_at_1: float | None
    interval: tuple[float, float] | None
    vs_baseline: Paired | None
    same_pick: float | None
    """Probability, averaged over problems, that it submits the very program (text) the baseline submits."""
    reading: str


@dataclass(frozen=True)
class RankersTable:
    baseline: str
    level: float
    n_problems: int
    m_min: int
    m_max: int
    rows: tuple[RankerRow, ...]

    def to_json(self) -> dict:
        return {"baseline": self.baseline, "level": self.level, "n_problems": self.n_problems,
                "m_min": self.m_min, "m_max": self.m_max,
                "method": "ranked pass@1 = n@k(scores, 1, m), exact over ties; percentile bootstrap over problems, "
                          "paired against the baseline",
                "rows": [_row_json(r) for r in self.rows]}

    def markdown(self) -> str:
        pct = int(round(100 * self.level))
        m = f"m={self.m_max}" if self.m_min == self.m_max else f"m={self.m_min}..{self.m_max}"
        lines = [f"Rankers side by side on the same candidates: {self.n_problems} problems, {m}; ranked pass@1 in "
                 f"%, {pct}% percentile bootstrap over problems; vs {self.baseline}: paired over problems.", "",
                 f"| ranker | problems | ranked pass@1 | {pct}% interval | vs {self.baseline} (paired) "
                 f"| same pick as {self.baseline} (%) | reading |",
                 "| --- | ---: | ---: | ---: | ---: | ---: | --- |"]
        for r in self.rows:
            lines.append("| " + " | ".join([r.name, str(r.n_problems), _pct(r.ranked_pass_at_1),
                                            _interval(r.interval), _paired(r.vs_baseline), _pct(r.same_pick),
                                            r.reading]) + " |")
        lines += ["", "What each row is:", ""] + [f"- {r.name}: {r.note}" for r in self.rows]
        return "\n".join(lines) + "\n"


def _row_json(r: RankerRow) -> dict:
    return {"name": r.name, "note": r.note, "n_problems": r.n_problems, "ranked_pass@1": r.ranked_pass_at_1,
            "interval": list(r.interval) if r.interval else None, "same_pick": r.same_pick, "reading": r.reading,
            "vs_baseline": None if r.vs_baseline is None else vars(r.vs_baseline)}


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}"


def _interval(x: tuple[float, float] | None) -> str:
    return "–" if x is None else f"[{100 * x[0]:.1f}, {100 * x[1]:.1f}]"


def _paired(p: Paired | None) -> str:
    return "–" if p is None else f"{100 * p.mean:+.1f} [{100 * p.low:+.1f}, {100 * p.high:+.1f}]"


def pick_probabilities(scores: Sequence[float], programs: Sequence[str]) -> dict[str, float]:
    """Which program text a ranker submits at pass@1: the top score's candidates, tie broken uniformly."""
    best = max(scores)
    top = [p for s, p in zip(scores, programs) if s == best]
    out: dict[str, float] = {}
    for p in top:
        out[p] = out.get(p, 0.0) + 1.0 / len(top)
    return out


def same_pick(a: Sequence[float], b: Sequence[float], programs: Sequence[str]) -> float:
    """Probability that two rankers, breaking their ties independently, submit the same program text."""
    pa, pb = pick_probabilities(a, programs), pick_probabilities(b, programs)
    return float(sum(q * pb.get(p, 0.0) for p, q in pa.items()))


def problem_groups(problems: Iterable[Problem], records: Iterable[CandidateRecord]) -> list[ProblemCandidates]:
    """The candidates of each problem with their problem; every record's problem must be among `problems`."""
    by_key = {(p.suite, p.split, p.problem_id): p for p in problems}
    groups = []
    for key, rs in sorted(group_by_problem(records).items()):
        if key not in by_key:
            raise CandidateError(f"candidates of problem {'/'.join(key)}, which is not among the problems loaded "
                                 f"(give the --suite, --split and --suite-option the candidates were sampled on)")
        groups.append(ProblemCandidates(by_key[key], tuple(rs)))
    if not groups:
        raise CandidateError("no candidates to rank")
    return groups


def collect_scores(groups: Sequence[ProblemCandidates], rankers: Sequence[NamedRanker]
                   ) -> dict[str, list[list[float] | None]]:
    """Per ranker (by name), per problem (in `groups`' order): the scores, or None where it does not apply."""
    names = [r.name for r in rankers]
    if len(set(names)) != len(names):
        raise ValueError(f"ranker names repeat: {names}")
    out: dict[str, list[list[float] | None]] = {}
    for ranker in rankers:
        if ranker.score is None:
            continue
        per_problem: list[list[float] | None] = []
        for g in groups:
            scores = ranker.score(g)
            if scores is not None and len(scores) != len(g.records):
                raise ValueError(f"ranker {ranker.name!r}: {len(scores)} scores for the {len(g.records)} candidates "
                                 f"of {g.problem.key}")
            per_problem.append(None if scores is None else [float(s) for s in scores])
        out[ranker.name] = per_problem
    return out


def _reading(ranker: NamedRanker, baseline: str, paired: Paired | None, agreement: float | None,
             n_problems: int) -> str:
    """What the row says about the ranker, in words, against the baseline."""
    if n_problems == 0:
        return f"{ranker.not_applicable} on any problem"
    if ranker.name == baseline:
        return "baseline"
    if paired is None:
        return f"no problem shared with {baseline}"
    if paired.low > 0:
        return f"beats {baseline}"
    if paired.high < 0:
        return f"worse than {baseline}"
    if agreement is not None and agreement >= RESTATES_AGREEMENT:
        return f"restates {baseline} (same pick on ≥{RESTATES_AGREEMENT:.0%})"
    return f"no measurable difference from {baseline}"


def compare_rankers(problems: Iterable[Problem], records: Iterable[CandidateRecord],
                    rankers: Sequence[NamedRanker], *, baseline: str = "sum_loglik", level: float = 0.95,
                    seed: int = 0) -> RankersTable:
    """Rank the same candidates by every ranker; each row's ranked pass@1 with its interval, the paired difference
    to `baseline` (over the problems both rank) and how often it submits the baseline's own pick."""
    groups = problem_groups(problems, records)
    scores = collect_scores(groups, rankers)
    if baseline not in scores:
        unbuilt = {r.name: r.note for r in rankers if r.score is None}
        why = (f"it could not be built: {unbuilt[baseline]}" if baseline in unbuilt else
               f"it is not among the rankers asked for {[r.name for r in rankers]}")
        raise ValueError(f"the baseline ranker {baseline!r}: {why}; add what it needs, or choose another baseline "
                         f"(--baseline-ranker)")
    passed = [[r.passed for r in g.records] for g in groups]
    programs = [g.programs for g in groups]
    base = scores[baseline]

    def row(ranker: NamedRanker) -> RankerRow:
        mine = scores.get(ranker.name)
        if mine is None:  # not built: an empty row that says why
            return RankerRow(ranker.name, ranker.note, 0, None, None, None, None, "not built")
        ranked = [i for i, s in enumerate(mine) if s is not None]
        values = {i: n_at_k(mine[i], passed[i], 1, len(passed[i])) for i in ranked}
        shared = [i for i in ranked if base[i] is not None]
        paired = agreement = None
        if shared:
            diffs = [values[i] - n_at_k(base[i], passed[i], 1, len(passed[i])) for i in shared]
            low, high = bootstrap_ci(diffs, level=level, seed=seed)
            paired = Paired(len(shared), float(np.mean(diffs)), low, high)
            agreement = float(np.mean([same_pick(mine[i], base[i], programs[i]) for i in shared]))
        note = ranker.note
        if len(ranked) < len(groups):
            note += f" ({ranker.not_applicable} on {len(groups) - len(ranked)} of {len(groups)} problems)"
        mean = float(np.mean(list(values.values()))) if ranked else None
        interval = bootstrap_ci(list(values.values()), level=level, seed=seed) if ranked else None
        return RankerRow(ranker.name, note, len(ranked), mean, interval, paired, agreement,
                         _reading(ranker, baseline, paired, agreement, len(ranked)))

    sizes = [len(g.records) for g in groups]
    return RankersTable(baseline, level, len(groups), min(sizes), max(sizes), tuple(row(r) for r in rankers))
