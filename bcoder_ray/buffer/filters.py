"""Which rows a reader wants: suite, split, outcome, iteration window, tokenizer (stale token ids are excluded
by asking for the current tokenizer's hash), policy versions, decoding, source, and whether log-probabilities
are present.

The iteration window applies to generated rows: human programs were produced by no iteration's policy and stay
in (as Appendix H mixes all of them into every batch). `policy_versions` instead selects generated rows of those
versions only, human rows left out: what an on-policy reader wants. A staleness window (`current_version` with
`min_staleness` / `max_staleness`) also selects generated rows only: those whose policy version lags the current
one by min..max versions (`bcoder_ray.buffer.staleness.allowed_versions`), human rows kept; it becomes a set of
version names, so it prunes and pushes down like `policy_versions`. Rows of version-1 files read `decoding` null as
"sample" and have no log-probabilities (`schema.conform`), and the masks here see them that way.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from bcoder_ray.buffer.schema import DECODINGS, SOURCES
from bcoder_ray.buffer.staleness import allowed_versions


def _names(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        return (value,)
    return tuple(str(v) for v in value)


@dataclass(frozen=True)
class Filters:
    suites: tuple[str, ...] | None = None
    splits: tuple[str, ...] | None = None  # the learner-facing area holds "train" only; useful on eval/
    outcomes: tuple[str, ...] | None = None
    iteration_min: int | None = None  # inclusive; the window selects generated rows (human rows always pass)
    iteration_max: int | None = None  # inclusive
    tokenizer_hash: str | None = None
    policy_versions: tuple[str, ...] | None = None  # generated rows of these versions; excludes human rows
    decoding: tuple[str, ...] | None = None  # e.g. ("sample",) leaves out greedy baseline rows
    sources: tuple[str, ...] | None = None  # ("human",) or ("generated",)
    require_logprobs: bool = False  # only rows whose sampling log-probabilities are stored
    # the staleness window: generated rows min..max versions older than current_version (human rows always pass)
    current_version: str | None = None
    min_staleness: int = 0
    max_staleness: int | None = None  # None: unbounded

    _ALIASES = {"suite": "suites", "split": "splits", "outcome": "outcomes", "policy_version": "policy_versions",
                "source": "sources"}
    _TUPLES = ("suites", "splits", "outcomes", "policy_versions", "decoding", "sources")

    def __post_init__(self) -> None:
        for name in self._TUPLES:
            object.__setattr__(self, name, _names(getattr(self, name)))
        for name, allowed in (("sources", SOURCES), ("decoding", DECODINGS)):
            bad = [v for v in getattr(self, name) or () if v not in allowed]
            if bad:
                raise ValueError(f"filter {name}: {bad} not in {allowed}")
        if self.min_staleness < 0 or (self.max_staleness is not None and self.max_staleness < 0):
            raise ValueError(f"filter min_staleness / max_staleness must be >= 0, got {self.min_staleness} / "
                             f"{self.max_staleness}")
        if self.max_staleness is not None and self.min_staleness > self.max_staleness:
            raise ValueError(f"filter min_staleness {self.min_staleness} > max_staleness {self.max_staleness}: "
                             f"no row can be both")
        if self.bounded:
            if self.current_version is None:
                raise ValueError("filter min_staleness / max_staleness need current_version (the lag is counted "
                                 "from it)")
            allowed_versions(self.current_version)  # ValueError naming it when it is no version

    @property
    def bounded(self) -> bool:
        """Whether the staleness window leaves any generated row out."""
        return self.min_staleness > 0 or self.max_staleness is not None

    def generated_versions(self) -> tuple[str, ...] | None:
        """The versions the staleness window lets generated rows have; None: any (no window)."""
        if not self.bounded:
            return None
        return allowed_versions(str(self.current_version), self.min_staleness, self.max_staleness)

    @classmethod
    def coerce(cls, value: "Filters | Mapping[str, Any] | None") -> "Filters":
        """Accepts a Filters, None, or a dict with the field names (or the singular suite / split / outcome /
        policy_version / source, and iterations=(lo, hi))."""
        if value is None:
            return cls()
        if isinstance(value, Filters):
            return value
        d = dict(value)
        for short, long in cls._ALIASES.items():
            if short in d:
                d[long] = d.pop(short)
        if "iterations" in d:
            d["iteration_min"], d["iteration_max"] = d.pop("iterations")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown filter(s) {unknown}; expected some of {sorted(known)}")
        return cls(**d)

    def columns(self) -> list[str]:
        """The sample columns the filters read."""
        cols = [c for c, used in (("suite", self.suites), ("split", self.splits), ("outcome", self.outcomes),
                                  ("tokenizer_hash", self.tokenizer_hash), ("decoding", self.decoding),
                                  ("source", self.sources)) if used is not None]
        if self.iteration_min is not None or self.iteration_max is not None:
            cols += ["iteration", "source"]
        if self.policy_versions is not None or self.bounded:
            cols += ["policy_version", "source"]
        if self.require_logprobs:
            cols.append("logprobs")
        return sorted(set(cols))

    def expression(self) -> pc.Expression | None:
        """The filters as a dataset expression, for rows as `schema.conform` gives them."""
        parts = []
        for column, values in (("suite", self.suites), ("split", self.splits), ("outcome", self.outcomes),
                               ("decoding", self.decoding), ("source", self.sources)):
            if values is not None:
                parts.append(pc.field(column).isin(pa.array(values, pa.string())))
        window = []
        if self.iteration_min is not None:
            window.append(pc.field("iteration") >= self.iteration_min)
        if self.iteration_max is not None:
            window.append(pc.field("iteration") <= self.iteration_max)
        if window:  # human programs belong to no iteration's policy: the window selects generated rows only
            inside = window[0] if len(window) == 1 else window[0] & window[1]
            parts.append((pc.field("source") == "human") | inside)
        if self.policy_versions is not None:
            parts.append((pc.field("source") == "generated")
                         & pc.field("policy_version").isin(pa.array(self.policy_versions, pa.string())))
        window = self.generated_versions()
        if window is not None:  # human programs have no lag: the window selects generated rows only
            parts.append((pc.field("source") == "human")
                         | pc.field("policy_version").isin(pa.array(window, pa.string())))
        if self.tokenizer_hash is not None:
            parts.append(pc.field("tokenizer_hash") == self.tokenizer_hash)
        if self.require_logprobs:
            parts.append(pc.field("logprobs").is_valid())
        if not parts:
            return None
        expr = parts[0]
        for p in parts[1:]:
            expr = expr & p
        return expr

    def mask(self, table: pa.Table) -> pa.ChunkedArray | None:
        """Boolean mask of the rows of `table` that match (nulls count as no match); None when all may."""
        parts = []
        for column, values in (("suite", self.suites), ("split", self.splits), ("outcome", self.outcomes),
                               ("decoding", self.decoding), ("source", self.sources)):
            if values is not None:
                parts.append(pc.is_in(table[column], value_set=pa.array(values, pa.string())))
        if self.iteration_min is not None or self.iteration_max is not None:
            inside = pc.and_(pc.greater_equal(table["iteration"], self.iteration_min or 0),
                             pc.less_equal(table["iteration"], self.iteration_max if self.iteration_max
                                           is not None else np.iinfo(np.int32).max))
            parts.append(pc.or_(pc.equal(table["source"], "human"), inside))
        if self.policy_versions is not None:
            parts.append(pc.and_(pc.equal(table["source"], "generated"),
                                 pc.is_in(table["policy_version"],
                                          value_set=pa.array(self.policy_versions, pa.string()))))
        window = self.generated_versions()
        if window is not None:
            parts.append(pc.or_(pc.equal(table["source"], "human"),
                                pc.is_in(table["policy_version"], value_set=pa.array(window, pa.string()))))
        if self.tokenizer_hash is not None:
            parts.append(pc.equal(table["tokenizer_hash"], self.tokenizer_hash))
        if self.require_logprobs:
            parts.append(pc.is_valid(table["logprobs"]))
        if not parts:
            return None
        out = parts[0]
        for p in parts[1:]:
            out = pc.and_(out, p)
        return pc.fill_null(out, False)

    def row_group_may_match(self, stats: Mapping[str, tuple[Any, Any]], source: str | None = None) -> bool:
        """False when a row group's min/max statistics rule it out (the pruning of a scan). `source`: the
        source a stream reads (None: any). Columns without statistics (a version-1 file's `decoding`) never
        rule a group out."""
        def excluded(column: str, allowed: tuple | None) -> bool:
            if allowed is None or column not in stats:
                return False
            lo, hi = stats[column]
            return lo == hi and lo not in allowed

        if excluded("suite", self.suites) or excluded("split", self.splits) or excluded("outcome", self.outcomes):
            return False
        if excluded("tokenizer_hash", None if self.tokenizer_hash is None else (self.tokenizer_hash,)):
            return False
        if excluded("decoding", self.decoding) or excluded("source", self.sources):
            return False
        if source is not None and (excluded("source", (source,)) or
                                   (self.sources is not None and source not in self.sources)):
            return False
        if self.policy_versions is not None:
            if source == "human" or excluded("source", ("generated",)):
                return False
            if excluded("policy_version", self.policy_versions):
                return False
        window = self.generated_versions()
        only_generated = source == "generated" or (source is None and excluded("source", ("human",)))
        if window is not None and only_generated and excluded("policy_version", window):
            return False
        # the window selects generated rows only: a group that may hold human rows is not ruled out by it
        if "iteration" in stats and (source == "generated" or (source is None and excluded("source", ("human",)))):
            lo, hi = stats["iteration"]
            if self.iteration_min is not None and hi < self.iteration_min:
                return False
            if self.iteration_max is not None and lo > self.iteration_max:
                return False
        return True
