"""Value-guided search against plain sampling + ranking at an equal number of generated tokens: the table of
`experiments/value_search.py`, from per-problem outcomes alone (no model here).

    pools = [PlainPool(scores=[...], passed=[...], tokens=[...]), ...]         # m_max plain samples per problem
    runs = {"k=8 n=16 keep=2 refill": [SearchOutcome(tokens=212, pass_at_1=1.0, value_tokens=640), ...]}
    table = budget_table(pools, ms=(1, 2, 4, 8), searches=runs)
    print(table.markdown())

Plain sampling of m programs + R̃ ranking, for every m up to m_max, comes from one pool of m_max samples per
problem: its pass@1 is `metrics.n_at_k(scores, passed, 1, m)`, the exact expectation over the m-subsets of the pool
(the CodeT protocol), and its generated tokens are m times the pool's mean program length (over all problems).
Between two m the curve is linear (a mixture of the two budgets), from (0 tokens, pass@1 0).

Per search row: its mean tokens per problem; pass@1 of the program it chose, with a percentile-bootstrap
interval over problems; the paired difference to plain sampling at the same tokens (each problem's plain pass@1
read off its own curve at m = the search's tokens / the mean program length; none past m_max); the tokens plain
sampling needs to reach the search's pass@1 on the mean curve, and the share of them the search saves. The goal
line compares the best plain row (the highest pass@1 of the m asked for) with the cheapest search row that reaches
its pass@1: the goal is met when that row needs at most half the plain row's tokens.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from bcoder_ray.evaluation.metrics import bootstrap_ci, n_at_k
from bcoder_ray.evaluation.rankers import Paired

GOAL_RATIO = 0.5  # issue 26: plain sampling's ranked pass@1 with at most half its generated tokens


@dataclass(frozen=True)
class PlainPool:
    """One problem's plain samples: the ranker's score and the verdict of each program with a verdict, and the
    tokens of every program sampled (those left without a verdict were generated too)."""

    scores: tuple[float, ...]
    passed: tuple[bool, ...]
    tokens: tuple[int, ...]

    def __post_init__(self) -> None:
        if len(self.scores) != len(self.passed):
            raise ValueError(f"PlainPool: {len(self.scores)} scores but {len(self.passed)} verdicts")

    def pass_at_1(self, m: int) -> float:
        """Ranked pass@1 of m programs drawn from the pool (m capped at the programs with a verdict; 0 without)."""
        if m == 0 or not self.scores:
            return 0.0
        return n_at_k(list(self.scores), list(self.passed), 1, min(m, len(self.scores)))


@dataclass(frozen=True)
class SearchOutcome:
    """One problem searched once: tokens generated, the probability that the program chosen passes (exact over
    ties), and the program tokens the value read."""

    tokens: int
    pass_at_1: float
    value_tokens: int = 0


@dataclass(frozen=True)
class BudgetRow:
    method: str
    """"plain" (m samples + ranking) or "search"."""
    settings: str
    tokens: float
    """Mean generated tokens per problem."""
    value_tokens: float | None
    pass_at_1: float
    interval: tuple[float, float]
    vs_plain: Paired | None = None
    """Search rows: the paired difference to plain sampling at the same tokens (None past m_max)."""
    plain_m: float | None = None
    """Search rows: the m of plain sampling with the same tokens."""
    plain_tokens: float | None = None
    """Search rows: the tokens plain sampling needs to reach this pass@1 (None: not within m_max)."""

    @property
    def saved(self) -> float | None:
        """The share of plain sampling's tokens at equal pass@1 that the search does without."""
        return None if not self.plain_tokens else 1.0 - self.tokens / self.plain_tokens


@dataclass(frozen=True)
class BudgetTable:
    n_problems: int
    m_max: int
    tokens_per_program: float
    level: float
    ranker: str
    rows: tuple[BudgetRow, ...]

    @property
    def goal(self) -> dict:
        """Plain sampling's best row (the highest pass@1; of equals, the fewest tokens) and the cheapest search row
        that reaches its pass@1."""
        best = min((r for r in self.rows if r.method == "plain"), key=lambda r: (-r.pass_at_1, r.tokens))
        reaching = [r for r in self.rows if r.method == "search" and r.pass_at_1 >= best.pass_at_1]
        cheapest = min(reaching, key=lambda r: r.tokens, default=None)
        ratio = None if cheapest is None else cheapest.tokens / best.tokens
        return {"plain": best.settings, "plain_pass@1": best.pass_at_1, "plain_tokens": best.tokens,
                "search": None if cheapest is None else cheapest.settings,
                "search_tokens": None if cheapest is None else cheapest.tokens, "token_ratio": ratio,
                "met": ratio is not None and ratio <= GOAL_RATIO}

    def to_json(self) -> dict:
        return {"n_problems": self.n_problems, "m_max": self.m_max, "tokens_per_program": self.tokens_per_program,
                "level": self.level, "ranker": self.ranker, "goal": self.goal,
                "method": "plain: 1@m of an m_max pool (exact over m-subsets and ties), tokens m x mean program "
                          "length; search: the surviving program with the best ranker score; percentile bootstrap "
                          "over problems, paired against plain at equal tokens (linear between integer m)",
                "rows": [_row_json(r) for r in self.rows]}

    def markdown(self) -> str:
        pct = int(round(100 * self.level))
        lines = [f"Value-guided search against plain sampling + {self.ranker} ranking: {self.n_problems} problems; "
                 f"tokens are generated program tokens per problem (plain: {self.tokens_per_program:.1f} per "
                 f"program); pass@1 of the program chosen, in %, {pct}% percentile bootstrap over problems.", "",
                 f"| method | settings | tokens | value-read tokens | pass@1 | {pct}% interval "
                 f"| vs plain at equal tokens (paired) | plain tokens for equal pass@1 | tokens saved |",
                 "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
        for r in self.rows:
            plain_eq = "–" if r.method == "plain" else (
                f"not within m={self.m_max}" if r.plain_tokens is None else f"{r.plain_tokens:.0f}")
            vs = "–" if r.vs_plain is None else (f"{100 * r.vs_plain.mean:+.1f} [{100 * r.vs_plain.low:+.1f}, "
                                                 f"{100 * r.vs_plain.high:+.1f}] (m={r.plain_m:.2f})")
            if r.method == "search" and r.vs_plain is None:
                vs = f"past m={self.m_max}"
            lines.append("| " + " | ".join([
                r.method, r.settings, f"{r.tokens:.0f}", "–" if r.value_tokens is None else f"{r.value_tokens:.0f}",
                f"{100 * r.pass_at_1:.1f}", f"[{100 * r.interval[0]:.1f}, {100 * r.interval[1]:.1f}]", vs,
                plain_eq, "–" if r.saved is None else f"{100 * r.saved:.0f}%"]) + " |")
        g = self.goal
        if g["search"] is None:
            verdict = (f"no search row reaches plain {g['plain']}'s {100 * g['plain_pass@1']:.1f}% "
                       f"({g['plain_tokens']:.0f} tokens): goal not met")
        else:
            verdict = (f"{g['search']} reaches plain {g['plain']}'s {100 * g['plain_pass@1']:.1f}% with "
                       f"{g['search_tokens']:.0f} of its {g['plain_tokens']:.0f} tokens ({100 * g['token_ratio']:.0f}%): "
                       f"goal (≤ {100 * GOAL_RATIO:.0f}%) {'met' if g['met'] else 'not met'}")
        return "\n".join(lines + ["", f"Goal: {verdict} (point estimates; the intervals are above)."]) + "\n"


def _row_json(r: BudgetRow) -> dict:
    return {"method": r.method, "settings": r.settings, "tokens": r.tokens, "value_tokens": r.value_tokens,
            "pass@1": r.pass_at_1, "interval": list(r.interval), "plain_m": r.plain_m,
            "vs_plain": None if r.vs_plain is None else vars(r.vs_plain), "plain_tokens": r.plain_tokens,
            "saved": r.saved}


def plain_curves(pools: Sequence[PlainPool], m_max: int) -> np.ndarray:
    """[problems, m_max + 1]: each problem's ranked pass@1 of m = 0 … m_max programs from its pool."""
    return np.array([[pool.pass_at_1(m) for m in range(m_max + 1)] for pool in pools], dtype=np.float64)


def at_m(curves: np.ndarray, m: float) -> np.ndarray | None:
    """Each problem's curve read at a real m (linear between integers); None past the curves' end."""
    m_max = curves.shape[1] - 1
    if m < 0 or m > m_max:
        return None
    low = min(int(math.floor(m)), m_max - 1) if m_max > 0 else 0
    frac = m - low
    return curves[:, low] if frac == 0 else (1 - frac) * curves[:, low] + frac * curves[:, low + 1]


def tokens_to_reach(mean_curve: Sequence[float], tokens_per_program: float, target: float) -> float | None:
    """The fewest tokens at which the (linear between integer m) mean curve reaches `target`; None: never."""
    if target <= mean_curve[0]:
        return 0.0
    for m in range(1, len(mean_curve)):
        if mean_curve[m] >= target:
            before, after = mean_curve[m - 1], mean_curve[m]
            return (m - 1 + (target - before) / (after - before)) * tokens_per_program
    return None


def budget_table(pools: Sequence[PlainPool], ms: Sequence[int], searches: Mapping[str, Sequence[SearchOutcome]], *,
                 level: float = 0.95, seed: int = 0, ranker: str = "R̃") -> BudgetTable:
    """The table of the module docstring; `searches` maps each search's settings to one outcome per problem, in
    the pools' order."""
    if not pools:
        raise ValueError("budget_table: no problems")
    if not ms or min(ms) < 1:
        raise ValueError(f"budget_table: the plain sample sizes must be ≥ 1, got {list(ms)}")
    for name, outcomes in searches.items():
        if len(outcomes) != len(pools):
            raise ValueError(f"budget_table: search {name!r} has {len(outcomes)} outcomes for {len(pools)} problems")
    m_max = max(ms)
    sampled = [t for pool in pools for t in pool.tokens]
    if len(sampled) != m_max * len(pools):
        raise ValueError(f"budget_table: {len(sampled)} plain programs for {len(pools)} problems × m_max={m_max}")
    per_program = float(np.mean(sampled))
    curves = plain_curves(pools, m_max)
    mean_curve = curves.mean(axis=0)

    def summary(values: Sequence[float]) -> tuple[float, tuple[float, float]]:
        return float(np.mean(values)), bootstrap_ci(values, level=level, seed=seed)

    rows = []
    for m in sorted(set(ms)):
        mean, interval = summary(curves[:, m])
        rows.append(BudgetRow("plain", f"m={m}", m * per_program, None, mean, interval))
    for name, outcomes in searches.items():
        values = [o.pass_at_1 for o in outcomes]
        tokens = float(np.mean([o.tokens for o in outcomes]))
        mean, interval = summary(values)
        plain_m = tokens / per_program if per_program > 0 else math.inf
        plain = at_m(curves, plain_m)
        paired = None
        if plain is not None:
            diffs = np.asarray(values) - plain
            low, high = bootstrap_ci(diffs, level=level, seed=seed)
            paired = Paired(len(values), float(diffs.mean()), low, high)
        rows.append(BudgetRow("search", name, tokens, float(np.mean([o.value_tokens for o in outcomes])), mean,
                              interval, paired, plain_m, tokens_to_reach(mean_curve, per_program, mean)))
    return BudgetTable(len(pools), m_max, per_program, level, ranker, tuple(rows))
