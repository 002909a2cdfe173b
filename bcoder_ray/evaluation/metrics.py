"""pass@k, n@k, ranked and filtered pass@k, from candidate records saved one JSON line per sampled program.

Every number of an evaluation is a function of its candidates file alone (`metrics_from_candidates`), so it can
be recomputed, or computed differently, without sampling again.

The candidate record (one JSON object per line of `candidates.jsonl`):

    suite, split, problem_id   which problem (the three together identify it)
    difficulty                 APPS: introductory / interview / competition; embedded: easy / medium / hard;
                               null where the suite has none
    sample_index               0..m-1 within the problem (unique per problem)
    program                    the decoded program text
    outcome, reward, passed    its verdict on the hidden tests (`envs.result.Outcome` value, eq. 2 reward)
    example_passed             whether it passes the example tests; null where the problem has none
    rtilde                     R̃(W) of eq. 19–20 from the ranking model; null where no Q model scored it
    model                      label of the checkpoint that sampled the program
    ranker                     label of the Q checkpoint that computed rtilde; null where none

The metrics (section 9 of docs/bcoder.md):

- pass@k, the unbiased estimator 1 - C(n-c, k)/C(n, k) over the n samples of a problem of which c pass, averaged
  over problems (`pass_at_k`).
- n@k, n submissions chosen by a score from k samples, in expectation over which k of the m samples were drawn
  (`n_at_k`). Every other metric here is a special case of it:
  - pass@k is k@k (all k samples submitted);
  - ranked pass@k (the CodeT protocol the paper uses) is k@m by R̃: rank the m candidates by R̃, submit the top k;
  - filtered pass@k drops (never submits) candidates that fail the problem's example tests, then submits k of
    the rest at random; filtered ranked pass@k submits the top k of the rest by R̃ (Table 2). A problem none of
    whose candidates pass the example tests gets nothing submitted and counts as a failure. A problem without
    example tests (example_passed null) is not filtered.
- Ties in the score are broken uniformly at random and the metric is the exact expectation over that choice,
  so ranking by a constant score gives back plain pass@k, and identical programs (equal R̃) never depend on
  their sample order.
- Every metric is reported overall, per difficulty (where problems have one) and per suite (where more than one
  suite is present), as a fraction in [0, 1], with a percentile-bootstrap confidence interval over problems for
  each @1 metric (`bootstrap_ci`): resample the problems with replacement, take the mean of their per-problem
  values, read the interval off the quantiles. Problems are the random unit (each problem's value already
  averages over its samples); with few problems the interval is rough, and one problem gives a zero-width one.
"""

from __future__ import annotations

import json
import math
import os
from collections import defaultdict
from dataclasses import asdict, dataclass, fields
from fractions import Fraction
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Sequence

import numpy as np

from envs.jsonl import iter_jsonl
from envs.result import OUTCOMES, Outcome

if TYPE_CHECKING:  # only for the annotation: the metrics need no torch
    from bcoder_ray.model.candidates import ScoredCandidate

CANDIDATES_FILE = "candidates.jsonl"
METRICS_FILE = "metrics.json"
METRICS_SCHEMA = "bcoder-ray/metrics/v1"
DIFFICULTY_ORDER = ("introductory", "interview", "competition", "easy", "medium", "hard")  # APPS, embedded

# metric name -> (use R̃ to choose submissions, drop candidates failing the example tests)
VARIANTS: dict[str, tuple[bool, bool]] = {
    "pass": (False, False),
    "ranked_pass": (True, False),
    "filtered_pass": (False, True),
    "filtered_ranked_pass": (True, True),
}


class CandidateError(ValueError):
    """A malformed or inconsistent candidate record; the message names the file, line and field at fault."""


# ----------------------------------------------------------------------------------------------------------
# The candidate record and its JSONL file


@dataclass(frozen=True)
class CandidateRecord:
    suite: str
    split: str
    problem_id: str
    difficulty: str | None
    sample_index: int
    program: str
    outcome: str
    reward: float
    passed: bool
    example_passed: bool | None
    rtilde: float | None
    model: str
    ranker: str | None = None

    @property
    def problem_key(self) -> tuple[str, str, str]:
        return (self.suite, self.split, self.problem_id)

    @classmethod
    def of(cls, c: ScoredCandidate) -> "CandidateRecord":
        """The record of a scored candidate (one with a verdict)."""
        if c.result is None or c.result.is_infra:
            raise ValueError(f"{c.problem.key} sample {c.sample_index}: no verdict, no candidate record")
        return cls(
            suite=c.problem.suite, split=c.problem.split, problem_id=c.problem.problem_id,
            difficulty=c.problem.difficulty, sample_index=c.sample_index, program=c.program,
            outcome=c.result.outcome.value, reward=c.result.reward, passed=c.result.passed,
            example_passed=None if c.example_result is None else c.example_result.passed,
            rtilde=c.rtilde, model=c.model, ranker=c.ranker if c.rtilde is not None else None)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, d: Any, where: str = "candidate") -> "CandidateRecord":
        if not isinstance(d, dict):
            raise CandidateError(f"{where}: expected a JSON object, got {type(d).__name__}")
        unknown = sorted(set(d) - {f.name for f in fields(cls)})
        if unknown:
            raise CandidateError(f"{where}: unknown field(s) {unknown}")

        def get(key: str, kinds: tuple[type, ...], nullable: bool = False, default: Any = ...) -> Any:
            if key not in d:
                if default is not ...:
                    return default
                raise CandidateError(f"{where}: missing field {key!r}")
            value = d[key]
            if value is None and nullable:
                return None
            if isinstance(value, bool) and bool not in kinds:
                raise CandidateError(f"{where}: field {key!r} must be {'/'.join(k.__name__ for k in kinds)}, "
                                     f"got bool")
            if not isinstance(value, kinds):
                raise CandidateError(f"{where}: field {key!r} must be {'/'.join(k.__name__ for k in kinds)}"
                                     f"{' or null' if nullable else ''}, got {type(value).__name__}")
            return value

        outcome = get("outcome", (str,))
        if outcome not in OUTCOMES:
            raise CandidateError(f"{where}: field 'outcome' is {outcome!r}; expected one of {OUTCOMES}")
        passed = get("passed", (bool,))
        if passed != (outcome == Outcome.PASSED.value):
            raise CandidateError(f"{where}: 'passed' is {passed} but 'outcome' is {outcome!r}")
        rtilde = get("rtilde", (int, float), nullable=True)
        if rtilde is not None and not math.isfinite(rtilde):
            raise CandidateError(f"{where}: field 'rtilde' must be finite, got {rtilde}")
        index = get("sample_index", (int,))
        if index < 0:
            raise CandidateError(f"{where}: field 'sample_index' must be >= 0, got {index}")
        return cls(
            suite=get("suite", (str,)), split=get("split", (str,)), problem_id=get("problem_id", (str,)),
            difficulty=get("difficulty", (str,), nullable=True), sample_index=index,
            program=get("program", (str,)), outcome=outcome, reward=float(get("reward", (int, float))),
            passed=passed, example_passed=get("example_passed", (bool,), nullable=True),
            rtilde=None if rtilde is None else float(rtilde), model=get("model", (str,)),
            ranker=get("ranker", (str,), nullable=True, default=None),
        )


def write_candidates(path: str | os.PathLike, records: Iterable[CandidateRecord | Mapping],
                     append: bool = False) -> int:
    """Write records as JSON lines (validated first); returns how many were written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = [r if isinstance(r, CandidateRecord) else CandidateRecord.from_json(dict(r), f"record {i}")
            for i, r in enumerate(records)]
    with open(path, "a" if append else "w", encoding="utf-8") as f:
        for r in rows:
            f.write(json.dumps(r.to_json(), ensure_ascii=False) + "\n")
    return len(rows)


def read_candidates(path: str | os.PathLike) -> list[CandidateRecord]:
    """Read a candidates JSONL file, or the `candidates.jsonl` of an evaluation folder."""
    path = Path(path)
    if path.is_dir():
        path = path / CANDIDATES_FILE
    return [CandidateRecord.from_json(d, where) for where, d in iter_jsonl(path, CandidateError)]


def as_candidate_records(source: str | os.PathLike | Iterable[CandidateRecord | Mapping]
                         ) -> list[CandidateRecord]:
    """Records from a candidates file or folder, or from records / dicts (validated)."""
    if isinstance(source, (str, os.PathLike)):
        return read_candidates(source)
    return [r if isinstance(r, CandidateRecord) else CandidateRecord.from_json(dict(r), f"record {i}")
            for i, r in enumerate(source)]


def group_by_problem(records: Iterable[CandidateRecord]) -> dict[tuple[str, str, str], list[CandidateRecord]]:
    """The candidates of each problem, sorted by sample_index; a repeated sample_index is an error."""
    groups: dict[tuple[str, str, str], list[CandidateRecord]] = defaultdict(list)
    for r in records:
        groups[r.problem_key].append(r)
    for key, rs in groups.items():
        rs.sort(key=lambda r: r.sample_index)
        for a, b in zip(rs, rs[1:]):
            if a.sample_index == b.sample_index:
                raise CandidateError(f"problem {'/'.join(key)}: sample_index {a.sample_index} appears twice")
        if len({r.difficulty for r in rs}) > 1:
            raise CandidateError(f"problem {'/'.join(key)}: candidates disagree on difficulty "
                                 f"{sorted({str(r.difficulty) for r in rs})}")
    return dict(groups)


# ----------------------------------------------------------------------------------------------------------
# Estimators for one problem


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one problem from n samples of which c pass: 1 - C(n-c, k)/C(n, k).

    Computed as 1 - prod_{i=n-c+1}^{n} (1 - k/i), which never forms the (huge) binomials.
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k needs 0 <= c <= n, got n={n}, c={c}")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k needs 1 <= k <= n (k samples out of the n drawn), got n={n}, k={k}")
    if n - c < k:
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1, dtype=np.float64)))


def n_at_k(scores: Sequence[float], passed: Sequence[bool], n: int, k: int) -> float:
    """n@k of one problem: the probability that, when k of its m candidates are drawn uniformly at random and the
    n of them with the highest score are submitted (ties broken uniformly at random), one submission passes.

    Exact. Order the candidates by score (best first) in a random order within ties; the submissions all fail
    exactly when the n-th drawn candidate sits at a failing position q with n-1 drawn failing candidates before
    it and k-n drawn candidates after it: C(F_<q, n-1)·C(m-1-q, k-n) of the C(m, k) draws, with F_<q the number
    of failing candidates before q. Within a tie group of g candidates of which f fail, the j-th failing one sits
    at offset i with probability C(i, j)·C(g-1-i, f-1-j)/C(g, f).

    Special cases: k@k is pass@k; k@m is ranked pass@k (CodeT). A candidate that must never be submitted (it
    failed the example tests in the filtered setting) is passed with score -inf and passed=False.
    """
    m = len(scores)
    if len(passed) != m:
        raise ValueError(f"n_at_k: {m} scores but {len(passed)} pass labels")
    if not 1 <= n <= k <= m:
        raise ValueError(f"n_at_k needs 1 <= n <= k <= m, got n={n}, k={k}, m={m}")
    if any(math.isnan(s) for s in scores):
        raise ValueError("n_at_k: a score is NaN")
    if len(set(scores)) == 1:  # all tied: n chosen uniformly at random from the m
        return pass_at_k(m, m - sum(1 for p in passed if not p), n)
    # tie groups, best score first: score -> [size g, failing count f]
    groups: dict[float, list[int]] = defaultdict(lambda: [0, 0])
    for s, p in zip(scores, passed):
        groups[float(s)][0] += 1
        groups[float(s)][1] += 0 if p else 1
    failing_draws = Fraction(0)  # k-draws whose n submissions all fail, in expectation over tie orders
    start = 0  # position of the group's first candidate in the ordering
    failing_before = 0  # F_<q at the start of the group
    for score in sorted(groups, reverse=True):
        g, f = groups[score]
        group_sum = 0
        for j in range(f):  # the j-th failing candidate of the group ...
            ways_before = math.comb(failing_before + j, n - 1)
            if ways_before == 0:
                continue
            for i in range(j, j + (g - f) + 1):  # ... at offset i of the group
                arrangements = math.comb(i, j) * math.comb(g - 1 - i, f - 1 - j)
                group_sum += arrangements * ways_before * math.comb(m - 1 - (start + i), k - n)
        failing_draws += Fraction(group_sum, math.comb(g, f))
        start += g
        failing_before += f
    return float(1 - failing_draws / math.comb(m, k))


def problem_variant_value(candidates: Sequence[CandidateRecord], variant: str, k: int) -> float | None:
    """One problem's value of a metric of `VARIANTS` at k; None where it is undefined (fewer than k candidates,
    or a ranked variant without R̃ on every candidate)."""
    use_rtilde, filtered = VARIANTS[variant]
    m = len(candidates)
    if k > m:
        return None
    if use_rtilde and any(c.rtilde is None for c in candidates):
        return None
    if not use_rtilde and not filtered:
        return pass_at_k(m, sum(c.passed for c in candidates), k)
    scores, passed = [], []
    for c in candidates:
        dropped = filtered and c.example_passed is False
        scores.append(-math.inf if dropped else (c.rtilde if use_rtilde else 0.0))
        passed.append(c.passed and not dropped)
    return n_at_k(scores, passed, n=k, k=m)


# ----------------------------------------------------------------------------------------------------------
# Averages over problems


def bootstrap_ci(values: Sequence[float], level: float = 0.95, n_resamples: int = 2000,
                 seed: int = 0) -> tuple[float, float]:
    """Percentile-bootstrap interval of the mean of `values` (one per problem), resampling problems."""
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        raise ValueError("bootstrap_ci: no values")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_ci: level must be in (0, 1), got {level}")
    rng = np.random.default_rng(seed)
    means = x[rng.integers(0, x.size, size=(n_resamples, x.size))].mean(axis=1)
    alpha = (1 - level) / 2
    return float(np.quantile(means, alpha)), float(np.quantile(means, 1 - alpha))


def _group_metrics(problems: Sequence[Sequence[CandidateRecord]], ks: Sequence[int], ci_level: float,
                   n_resamples: int, seed: int) -> dict:
    has_rtilde = all(c.rtilde is not None for cs in problems for c in cs)
    has_examples = any(c.example_passed is not None for cs in problems for c in cs)
    out: dict[str, Any] = {
        "n_problems": len(problems),
        "n_candidates": sum(len(cs) for cs in problems),
        "m_min": min(len(cs) for cs in problems),
        "m_max": max(len(cs) for cs in problems),
        "sample_pass_rate": sum(c.passed for cs in problems for c in cs) / sum(len(cs) for cs in problems),
    }
    for variant, (use_rtilde, filtered) in VARIANTS.items():
        if (use_rtilde and not has_rtilde) or (filtered and not has_examples):
            continue
        values: dict[str, float | None] = {}
        for k in ks:
            per_problem = [problem_variant_value(cs, variant, k) for cs in problems]
            if any(v is None for v in per_problem):
                values[str(k)] = None  # some problem has fewer than k candidates
                continue
            values[str(k)] = float(np.mean(per_problem))
            if k == 1:
                lo, hi = bootstrap_ci(per_problem, ci_level, n_resamples, seed)
                out[f"{variant}@1_ci"] = {"low": lo, "high": hi, "level": ci_level,
                                          "method": "percentile bootstrap over problems",
                                          "n_resamples": n_resamples, "seed": seed}
        out[f"{variant}@k"] = values
    return out


def _difficulty_sort_key(d: str) -> tuple[int, str]:
    return (DIFFICULTY_ORDER.index(d), "") if d in DIFFICULTY_ORDER else (len(DIFFICULTY_ORDER), d)


def metrics_from_candidates(source: str | os.PathLike | Iterable[CandidateRecord | Mapping],
                            ks: Sequence[int] = (1, 5), ci_level: float = 0.95, n_resamples: int = 2000,
                            seed: int = 0, n_at_k_pairs: Sequence[tuple[int, int]] = ()) -> dict:
    """All metrics of one evaluation (one sampling model, one ranker) from its candidate records or file.

    Returns a JSON-ready dict: {"schema", "model", "ranker", "suites", "splits", "ks", "overall": {...},
    "by_difficulty": {difficulty: {...}}, "by_suite": {suite: {...}}}. Each group holds n_problems,
    n_candidates, m_min, m_max, sample_pass_rate, and for each metric of `VARIANTS` that the records support
    "<variant>@k": {str(k): value or null} and "<variant>@1_ci": {"low", "high", ...}. `n_at_k_pairs` adds
    "n@k": {"<n>@<k>": value} (n chosen by R̃, at random without R̃, after dropping example-test failures) per
    group.
    """
    records = as_candidate_records(source)
    if not records:
        where = source if isinstance(source, (str, os.PathLike)) else "the records given"
        raise CandidateError(f"no candidate records in {where}")
    models = sorted({r.model for r in records})
    rankers = sorted({str(r.ranker) for r in records})
    if len(models) > 1 or len(rankers) > 1:
        raise CandidateError(f"candidates mix models {models} / rankers {rankers}; evaluate each separately")
    if sorted(set(ks)) != sorted(ks) or any(k < 1 for k in ks):
        raise ValueError(f"ks must be distinct positive integers, got {list(ks)}")
    by_problem = group_by_problem(records)
    keys = sorted(by_problem)

    def group(selected: list[tuple[str, str, str]]) -> dict:
        problems = [by_problem[k] for k in selected]
        out = _group_metrics(problems, ks, ci_level, n_resamples, seed)
        for n, k in n_at_k_pairs:
            out.setdefault("n@k", {})[f"{n}@{k}"] = _mean_n_at_k(problems, n, k)
        return out

    result: dict[str, Any] = {
        "schema": METRICS_SCHEMA,
        "model": models[0],
        "ranker": records[0].ranker,
        "suites": sorted({k[0] for k in keys}),
        "splits": sorted({k[1] for k in keys}),
        "ks": list(ks),
        "n_at_k_pairs": [[n, k] for n, k in n_at_k_pairs],
        "overall": group(keys),
        "by_difficulty": {},
        "by_suite": {},
    }
    difficulties = sorted({by_problem[k][0].difficulty for k in keys} - {None}, key=_difficulty_sort_key)
    for d in difficulties:
        result["by_difficulty"][d] = group([k for k in keys if by_problem[k][0].difficulty == d])
    if len(result["suites"]) > 1:
        for s in result["suites"]:
            result["by_suite"][s] = group([k for k in keys if k[0] == s])
    return result


def _mean_n_at_k(problems: Sequence[Sequence[CandidateRecord]], n: int, k: int) -> float | None:
    """Mean over problems of n@k, choosing by R̃ where every candidate has one (at random otherwise), after
    dropping example-test failures where the records say so."""
    values = []
    for cs in problems:
        if k > len(cs):
            return None
        use_rtilde = all(c.rtilde is not None for c in cs)
        scores = [-math.inf if c.example_passed is False else (c.rtilde if use_rtilde else 0.0) for c in cs]
        passed = [c.passed and c.example_passed is not False for c in cs]
        values.append(n_at_k(scores, passed, n, k))
    return float(np.mean(values))


def ranking_gain(source: str | os.PathLike | Iterable[CandidateRecord | Mapping], ks: Sequence[int] = (1, 5),
                 ms: Sequence[int] | None = None, filtered: bool = False) -> dict:
    """Figure 5: how much ranking by R̃ adds to pass@k as the number m of candidates grows.

    For each m and k, in expectation over which m of a problem's saved samples are drawn: ranked pass@k (submit
    the top k of the m by R̃, i.e. k@m by R̃) and its baseline (submit k of the m at random, which is plain
    pass@k), both after dropping example-test failures when `filtered`; the gain is their difference, averaged
    over problems. `ms` defaults to 1, 2, 4, ... and the smallest number of candidates of a problem. Returns
    {"ms", "filtered", "ranked": {str(k): [...]}, "baseline": {...}, "gain": {...}}, fractions; null where m < k.
    """
    records = as_candidate_records(source)
    if any(r.rtilde is None for r in records):
        raise CandidateError("ranking_gain needs rtilde on every candidate")
    problems = list(group_by_problem(records).values())
    if not problems:
        raise CandidateError("ranking_gain: no candidate records")
    m_min = min(len(cs) for cs in problems)
    if ms is None:
        ms = sorted({2 ** i for i in range(int(math.log2(m_min)) + 1)} | {m_min})
    if any(not 1 <= m <= m_min for m in ms):
        raise ValueError(f"ranking_gain: every m must be in 1..{m_min} (the fewest candidates of a problem), "
                         f"got {list(ms)}")
    out: dict[str, Any] = {"ms": list(ms), "filtered": filtered, "ranked": {}, "baseline": {}, "gain": {}}
    for k in ks:
        ranked_k: list[float | None] = []
        baseline_k: list[float | None] = []
        for m in ms:
            if m < k:
                ranked_k.append(None)
                baseline_k.append(None)
                continue
            ranked, baseline = [], []
            for cs in problems:
                dropped = [filtered and c.example_passed is False for c in cs]
                passed = [c.passed and not d for c, d in zip(cs, dropped)]
                ranked.append(n_at_k([-math.inf if d else c.rtilde for c, d in zip(cs, dropped)], passed, k, m))
                baseline.append(n_at_k([-math.inf if d else 0.0 for d in dropped], passed, k, m))
            ranked_k.append(float(np.mean(ranked)))
            baseline_k.append(float(np.mean(baseline)))
        out["ranked"][str(k)] = ranked_k
        out["baseline"][str(k)] = baseline_k
        out["gain"][str(k)] = [None if r is None else r - b for r, b in zip(ranked_k, baseline_k)]
    return out


def rtilde_outcome_order(source: str | os.PathLike | Iterable[CandidateRecord | Mapping]) -> dict:
    """Figure 3's claim, checked on saved candidates: does mean R̃ order passed > failed > runtime_error >
    compile_error?

    Uses the candidates that have R̃. Returns {"means": {outcome: mean or null}, "counts", "centred_means"
    (means of R̃ minus its problem's mean R̃: V(s_0) is shared by a problem's candidates, so this removes the
    problem-level offset), "present" (outcomes seen, in the expected order), "holds" (the strict order of the
    means among the present outcomes; null with fewer than two present), "holds_centred", "statement"}.
    """
    records = [r for r in as_candidate_records(source) if r.rtilde is not None]
    values: dict[str, list[float]] = {o: [] for o in OUTCOMES}
    centred: dict[str, list[float]] = {o: [] for o in OUTCOMES}
    for cs in group_by_problem(records).values():
        mean = float(np.mean([c.rtilde for c in cs]))
        for c in cs:
            values[c.outcome].append(c.rtilde)
            centred[c.outcome].append(c.rtilde - mean)
    present = [o for o in OUTCOMES if values[o]]
    means = {o: float(np.mean(values[o])) if values[o] else None for o in OUTCOMES}
    centred_means = {o: float(np.mean(centred[o])) if centred[o] else None for o in OUTCOMES}

    def strictly_ordered(ms: dict[str, float | None]) -> bool | None:
        if len(present) < 2:
            return None
        return all(ms[a] > ms[b] for a, b in zip(present, present[1:]))

    holds, holds_centred = strictly_ordered(means), strictly_ordered(centred_means)
    observed = sorted(present, key=lambda o: -means[o])
    parts = [f"{o} ({means[o]:.4f}, n={len(values[o])})" for o in observed]
    missing = [o for o in OUTCOMES if not values[o]]
    if holds is None:
        statement = (f"Mean R̃ cannot order the outcomes: only {present or 'none'} present "
                     f"among {len(records)} scored candidates.")
    else:
        statement = (f"Mean R̃ {'orders' if holds else 'does NOT order'} the outcomes as the paper expects "
                     f"(passed > failed > runtime_error > compile_error): observed " + " > ".join(parts) + "."
                     f" With R̃ centred per problem the order {'holds' if holds_centred else 'does not hold'}.")
        if missing:
            statement += f" Absent outcomes (not checked): {', '.join(missing)}."
    return {"means": means, "counts": {o: len(values[o]) for o in OUTCOMES}, "centred_means": centred_means,
            "present": present, "holds": holds, "holds_centred": holds_centred, "statement": statement}
