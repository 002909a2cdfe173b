"""Which rows a reader wants: suite, split, outcome, iteration window, tokenizer (stale token ids are excluded
by asking for the current tokenizer's hash). The iteration window applies to generated rows: human programs
were produced by no iteration's policy and stay in (as Appendix H mixes all of them into every batch)."""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Mapping

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


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

    @classmethod
    def coerce(cls, value: "Filters | Mapping[str, Any] | None") -> "Filters":
        """Accepts a Filters, None, or a dict with the field names (or suite / split / outcome / iterations=(lo, hi))."""
        if value is None:
            return cls()
        if isinstance(value, Filters):
            return value
        d = dict(value)
        aliases = {"suite": "suites", "split": "splits", "outcome": "outcomes"}
        for short, long in aliases.items():
            if short in d:
                d[long] = d.pop(short)
        if "iterations" in d:
            d["iteration_min"], d["iteration_max"] = d.pop("iterations")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(d) - known)
        if unknown:
            raise ValueError(f"unknown filter(s) {unknown}; expected some of {sorted(known)}")
        for k in ("suites", "splits", "outcomes"):
            d[k] = _names(d.get(k))
        return cls(**d)

    def expression(self) -> pc.Expression | None:
        parts = []
        for column, values in (("suite", self.suites), ("split", self.splits), ("outcome", self.outcomes)):
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
        if self.tokenizer_hash is not None:
            parts.append(pc.field("tokenizer_hash") == self.tokenizer_hash)
        if not parts:
            return None
        expr = parts[0]
        for p in parts[1:]:
            expr = expr & p
        return expr

    def mask(self, table: pa.Table) -> pa.ChunkedArray | None:
        """Boolean mask of the rows of `table` that match (nulls count as no match); None when all may."""
        parts = []
        for column, values in (("suite", self.suites), ("split", self.splits), ("outcome", self.outcomes)):
            if values is not None:
                parts.append(pc.is_in(table[column], value_set=pa.array(values, pa.string())))
        if self.iteration_min is not None or self.iteration_max is not None:
            inside = pc.and_(pc.greater_equal(table["iteration"], self.iteration_min or 0),
                             pc.less_equal(table["iteration"], self.iteration_max if self.iteration_max
                                           is not None else np.iinfo(np.int32).max))
            parts.append(pc.or_(pc.equal(table["source"], "human"), inside))
        if self.tokenizer_hash is not None:
            parts.append(pc.equal(table["tokenizer_hash"], self.tokenizer_hash))
        if not parts:
            return None
        out = parts[0]
        for p in parts[1:]:
            out = pc.and_(out, p)
        return pc.fill_null(out, False)

    def row_group_may_match(self, stats: Mapping[str, tuple[Any, Any]], source: str | None = None) -> bool:
        """False when a row group's min/max statistics rule it out (the pruning of a scan)."""
        def excluded(column: str, allowed: tuple | None) -> bool:
            if allowed is None or column not in stats:
                return False
            lo, hi = stats[column]
            return lo == hi and lo not in allowed

        if excluded("suite", self.suites) or excluded("split", self.splits) or excluded("outcome", self.outcomes):
            return False
        if excluded("tokenizer_hash", None if self.tokenizer_hash is None else (self.tokenizer_hash,)):
            return False
        if source is not None and excluded("source", (source,)):
            return False
        if "iteration" in stats and source != "human":
            lo, hi = stats["iteration"]
            if self.iteration_min is not None and hi < self.iteration_min:
                return False
            if self.iteration_max is not None and lo > self.iteration_max:
                return False
        return True
