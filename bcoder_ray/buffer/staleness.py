"""Policy versions in order, and how stale the generated rows a learner reads are.

A generated row's `policy_version` names the policy that sampled it: "<run_id>/<k>", the run's k-th published
policy (0: θ_ckpt; `version_name`). The integer k orders one run's versions, whatever advances it (the synchronous
loop publishes once per iteration; an asynchronous learner may publish every few optimiser steps), so nothing here
assumes k is an iteration. A resumed run keeps its run id and its recorded current version, so its numbering goes
on. The lag of a row read while version (r, k) is current is k − j for a row of version (r, j).

Rows without a lag: human rows (`policy_version` "human") are no policy's samples; they are never counted and no
bound applies to them. Generated rows of another run sharing the buffer, or whose name is no version of this form
(a hand-written buffer's "" or "v3"), have no lag against this run's versions: they are counted as `unknown`, and
any bound leaves them out (how old they are is not known).

    current = PolicyVersion.parse("ab12/7")
    current.lag_of("ab12/4")          # 3
    lags = LagCounts()
    lags.add(["ab12/7", "ab12/4", "human"], [False, False, True], current)
    lags.summary()                    # rows 2, mean 1.5, p50 0, p90 3, max 3, counts {0: 1, 3: 1}
    lag_array(table["policy_version"], "ab12/7")   # per row, float64, NaN without a lag (the freshness sampler)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


@dataclass(frozen=True, order=True)
class PolicyVersion:
    """One run's k-th published policy (`step` = k; 0: θ_ckpt)."""

    run_id: str
    step: int

    @property
    def name(self) -> str:
        """The buffer's `policy_version` string ("<run_id>/<k>", or "<k>" for an empty run id)."""
        return f"{self.run_id}/{self.step}" if self.run_id else str(self.step)

    @classmethod
    def parse(cls, name: str | None) -> "PolicyVersion | None":
        """The version a `policy_version` string names; None for "human", "" or any other name."""
        if not name:
            return None
        run_id, _, tail = str(name).rpartition("/")
        if not (tail.isascii() and tail.isdigit()):
            return None
        return cls(run_id, int(tail))

    def lag_of(self, name: str | None) -> int | None:
        """How many versions before this one `name` is (negative: after it); None when it has no lag (another
        run's version, or no version at all)."""
        other = PolicyVersion.parse(name)
        if other is None or other.run_id != self.run_id:
            return None
        return self.step - other.step


def version_name(run_id: str, k: int) -> str:
    """The buffer's `policy_version` of a run's k-th policy (0: θ_ckpt): unique across runs sharing a buffer."""
    return PolicyVersion(run_id, k).name


def _current(current: str) -> PolicyVersion:
    now = PolicyVersion.parse(current)
    if now is None:
        raise ValueError(f"current policy version {current!r} is not of the form '<run_id>/<k>': no lag can be "
                         f"measured against it")
    return now


def allowed_versions(current: str, min_staleness: int = 0, max_staleness: int | None = None) -> tuple[str, ...]:
    """The version names whose lag against `current` lies in [min_staleness, max_staleness] (None: unbounded),
    oldest first: a finite set, since a run's versions start at 0. Empty when `current` is younger than
    `min_staleness` versions. ValueError when `current` names no version."""
    now = _current(current)
    oldest = 0 if max_staleness is None else max(0, now.step - max_staleness)
    return tuple(PolicyVersion(now.run_id, k).name for k in range(oldest, now.step - min_staleness + 1))


def lag_array(names: pa.Array | pa.ChunkedArray, current: str) -> np.ndarray:
    """Each row's lag against `current` (float64; NaN where a row has none: human rows, another run's versions,
    names of no version), from a `policy_version` column: one parse per distinct name, not per row."""
    now = _current(current)
    if isinstance(names, pa.ChunkedArray):
        names = names.combine_chunks()
    encoded = pc.dictionary_encode(names)
    per_name = np.array([np.nan if (lag := now.lag_of(n)) is None else float(lag)
                         for n in encoded.dictionary.to_pylist()] + [np.nan])
    # a null name takes the appended NaN
    return per_name[encoded.indices.fill_null(len(per_name) - 1).to_numpy(zero_copy_only=False)]


@dataclass
class LagCounts:
    """The lags of the generated rows a reader read: {lag: rows}, and the generated rows without a lag
    (`unknown`). Summed over batches, ranks and stages with `merge`; crosses from the learner workers to the
    driver as it is."""

    counts: dict[int, int] = field(default_factory=dict)
    unknown: int = 0

    def add(self, versions: Sequence[str | None], is_human: Sequence[bool], current: PolicyVersion) -> None:
        """Count one batch: its rows' `policy_version` and `is_human` columns, read while `current` was current."""
        for name, human in zip(versions, is_human):
            if human:
                continue
            lag = current.lag_of(name)
            if lag is None:
                self.unknown += 1
            else:
                self.counts[lag] = self.counts.get(lag, 0) + 1

    def merge(self, *others: "LagCounts") -> "LagCounts":
        out = LagCounts(dict(self.counts), self.unknown)
        for other in others:
            for lag, n in other.counts.items():
                out.counts[lag] = out.counts.get(lag, 0) + n
            out.unknown += other.unknown
        return out

    @property
    def rows(self) -> int:
        """Generated rows with a lag."""
        return sum(self.counts.values())

    def summary(self) -> "StalenessSummary":
        return StalenessSummary.of(self)

    def to_json(self) -> dict[str, Any]:
        """The summary and the counts as JSON-able data (lags as string keys), as metrics.jsonl holds them."""
        return self.summary().to_json()

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> "LagCounts":
        """The counts back from `to_json`'s output (the statistics are recomputed from them)."""
        return cls({int(k): int(v) for k, v in (data.get("counts") or {}).items()}, int(data.get("unknown", 0)))


@dataclass(frozen=True)
class StalenessSummary:
    """The lag distribution of a `LagCounts`: mean, nearest-rank p50 and p90 (the smallest lag with at least
    50% / 90% of the rows at or below it), max, the counts per lag; statistics are None without rows."""

    rows: int
    unknown: int
    mean: float | None
    p50: int | None
    p90: int | None
    max: int | None
    counts: dict[int, int]

    @classmethod
    def of(cls, lags: LagCounts) -> "StalenessSummary":
        counts = dict(sorted(lags.counts.items()))
        n = sum(counts.values())
        if n == 0:
            return cls(0, lags.unknown, None, None, None, None, {})
        mean = sum(lag * c for lag, c in counts.items()) / n
        return cls(n, lags.unknown, mean, _nearest_rank(counts, n, 1, 2), _nearest_rank(counts, n, 9, 10),
                   max(counts), counts)

    def to_json(self) -> dict[str, Any]:
        return {"rows": self.rows, "unknown": self.unknown, "mean": self.mean, "p50": self.p50, "p90": self.p90,
                "max": self.max, "counts": {str(k): v for k, v in self.counts.items()}}

    def scalars(self) -> dict[str, float]:
        """The statistics that exist, as floats (for TensorBoard and the trackers)."""
        return {k: float(v) for k, v in (("mean", self.mean), ("p50", self.p50), ("p90", self.p90),
                                          ("max", self.max), ("rows", self.rows), ("unknown", self.unknown))
                if v is not None}


def _nearest_rank(counts: Mapping[int, int], n: int, num: int, den: int) -> int:
    """The lag of rank ceil(n·num/den) in sorted order (integer arithmetic: no rounding of n·q)."""
    rank = max(1, -(-n * num // den))
    seen = 0
    for lag, c in counts.items():
        seen += c
        if seen >= rank:
            return lag
    raise AssertionError("unreachable: rank <= n")


def merged(records: Iterable[Mapping[str, Any] | None]) -> LagCounts:
    """The counts of several `to_json` records summed (None and records without counts add nothing)."""
    return LagCounts().merge(*(LagCounts.from_json(r) for r in records if r))
