"""How numbers appear in tables and logs: one helper for a share as a percentage."""

from __future__ import annotations


def pct(x: float | None, digits: int = 1, missing: str = "–") -> str:
    """0.1234 -> "12.3%" (`digits` after the point); None -> `missing`."""
    return missing if x is None else f"{100 * x:.{digits}f}%"
