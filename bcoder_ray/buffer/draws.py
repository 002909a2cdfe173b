"""How a stream of buffer rows is drawn from: the sampler kinds and their probabilities and importance weights.

    spec = SamplerSpec(kind="prioritized", table="theta")
    p, w = draw_distribution(spec, RowIndex(priority, lag, passed, problem))

Kinds (the rule for one stream: the generated rows of a ρ_real-mixed batch, `bcoder_ray.buffer.sampler`):

- `uniform`: every row alike, weight 1 (the shuffled-window stream of `SourceStream`, not drawn from here).
- `prioritized` (Schaul et al., 2016): P(i) ∝ (p_i + ε)^a with p_i the row's last recorded |TD error|
  (`bcoder_ray.buffer.priorities`); a row with none yet gets the largest p of the stream's rows that have one
  (1.0 when none has), so new rows are drawn early. Importance weights w_i = (N·P(i))^−b / max_j (N·P(j))^−b:
  the rarest row of the stream weighs 1, the others less (the max is over the stream, not the batch, so a row's
  weight does not depend on its batch mates).
- `fresh_prioritized`: the same with each score times exp(−age_i/τ), age_i the row's lag in policy versions
  (`current_version` − the version that sampled it, `bcoder_ray.buffer.staleness`: the lag the staleness window
  bounds), so τ means the same in sync mode (one version an iteration) and async mode (a version every
  `publish_every` steps). A generated row without a lag (another run's, sharing the buffer) ages as the oldest row
  of the stream that has one (0 when none has): never preferred to this run's rows, never left out. Importance
  weights from this P as above.
- `balanced`: per problem, passing and failing rows in fixed shares: P(i) = (n_p/N)·s_c/n_{p,c} for row i of
  problem p in class c (passing or not), s_pass = pass_share and s_fail = 1 − pass_share when p has both classes,
  s = 1 for the only class of a problem that has one. Problems keep their share of the stream (n_p/N, as under
  uniform); only the mix inside each problem changes. Weight 1: the rebalancing is the point, not a bias to undo.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np

from bcoder_ray.buffer.staleness import PolicyVersion

SAMPLER_KINDS = ("uniform", "prioritized", "fresh_prioritized", "balanced")
PRIORITIZED_KINDS = ("prioritized", "fresh_prioritized")
SamplerKind = Literal["uniform", "prioritized", "fresh_prioritized", "balanced"]


@dataclass(frozen=True)
class SamplerSpec:
    """One stage's sampler (built from the config's `buffer.sampler` by the driver; see the module docstring)."""

    kind: SamplerKind = "uniform"
    priority_exponent: float = 0.6  # a
    is_exponent: float = 0.4  # b; 0: no correction (every weight 1)
    epsilon: float = 0.01  # ε: a row whose |TD error| is 0 is still drawn
    tau: float = 2.0  # τ of the freshness decay, in policy versions
    current_version: str | None = None  # the version lags count from (the learner's); fresh_prioritized needs it
    pass_share: float = 0.5  # balanced: the passing rows' share of each problem's draws
    table: str | None = None  # the priority table read (the stage's name); prioritized kinds only
    refresh_batches: int = 16  # re-read the files and the priority table every N batches; 0: once

    def __post_init__(self):
        if self.kind not in SAMPLER_KINDS:
            raise ValueError(f"sampler kind {self.kind!r}: one of {SAMPLER_KINDS}")
        if self.kind in PRIORITIZED_KINDS and not self.table:
            raise ValueError(f"sampler kind {self.kind!r} needs the priority table it reads (`table`)")
        if self.kind == "fresh_prioritized" and PolicyVersion.parse(self.current_version) is None:
            raise ValueError(f"sampler kind 'fresh_prioritized' counts ages in policy versions from "
                             f"`current_version`, which must name one ('<run_id>/<k>'), not {self.current_version!r}")
        if self.tau <= 0 or self.epsilon <= 0 or not 0.0 < self.pass_share < 1.0:
            raise ValueError(f"sampler: tau ({self.tau}) and epsilon ({self.epsilon}) must be > 0 and pass_share "
                             f"({self.pass_share}) in (0, 1)")

    @property
    def prioritized(self) -> bool:
        return self.kind in PRIORITIZED_KINDS


@dataclass(frozen=True)
class RowIndex:
    """What the draw rules read of each row of a stream (arrays of one length N)."""

    priority: np.ndarray  # float64, last recorded |TD error|; NaN: none recorded yet
    lag: np.ndarray  # float64, versions between `current_version` and the row's; NaN: none (`lag_array`)
    passed: np.ndarray  # bool, the program passed its tests
    problem: np.ndarray  # int codes of (suite, problem_id)


def draw_distribution(spec: SamplerSpec, rows: RowIndex) -> tuple[np.ndarray, np.ndarray]:
    """(P, w): each row's probability of a draw (summing to 1) and its importance weight (float32)."""
    n = len(rows.priority)
    if n == 0:
        raise ValueError("draw_distribution: no rows")
    if spec.kind == "uniform":
        return np.full(n, 1.0 / n), np.ones(n, np.float32)
    if spec.kind == "balanced":
        return _balanced(spec, rows), np.ones(n, np.float32)
    known = ~np.isnan(rows.priority)
    newest = float(rows.priority[known].max()) if known.any() else 1.0
    score = (np.where(known, rows.priority, newest) + spec.epsilon) ** spec.priority_exponent
    if spec.kind == "fresh_prioritized":
        known = ~np.isnan(rows.lag)
        oldest = float(rows.lag[known].max()) if known.any() else 0.0
        age = np.maximum(np.where(known, rows.lag, oldest), 0.0)
        score = score * np.exp(-age / spec.tau)
    p = score / score.sum()
    w = (n * p) ** -spec.is_exponent
    return p, (w / w.max()).astype(np.float32)


def _balanced(spec: SamplerSpec, rows: RowIndex) -> np.ndarray:
    n = len(rows.problem)
    _, problem = np.unique(rows.problem, return_inverse=True)
    n_p = np.bincount(problem)
    n_pass = np.bincount(problem, weights=rows.passed.astype(np.float64)).astype(np.int64)
    n_fail = n_p - n_pass
    both = (n_pass > 0) & (n_fail > 0)
    share_pass = np.where(both, spec.pass_share, 1.0)
    share_fail = np.where(both, 1.0 - spec.pass_share, 1.0)
    in_class = np.where(rows.passed, n_pass[problem], n_fail[problem])
    share = np.where(rows.passed, share_pass[problem], share_fail[problem])
    return (n_p[problem] / n) * share / in_class
