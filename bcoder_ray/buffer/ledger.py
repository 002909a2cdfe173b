"""The compaction ledger: which files a compacted file replaced, and at which row offset.

A record is written before its merged file becomes visible, and is never deleted. Readers use it to hide
sources that a visible merged file already holds; `append` uses it to recognise a retried batch whose file was
compacted away; `write_targets` uses it to find where rows of a compacted file now live.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from bcoder_ray.buffer.storage import Store

LEDGER_DIR = "_meta/compactions"


@dataclass(frozen=True)
class Compaction:
    area: str
    merged: str  # basename of the merged file
    sources: tuple[tuple[str, int, int], ...]  # (basename, first row in merged, rows), in merged order

    def to_json(self) -> bytes:
        return json.dumps({"area": self.area, "merged": self.merged,
                           "sources": [list(s) for s in self.sources]}, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> "Compaction":
        d = json.loads(data)
        return cls(d["area"], d["merged"], tuple((str(n), int(o), int(r)) for n, o, r in d["sources"]))


class Ledger:
    def __init__(self, store: Store):
        self.store = store
        self._records: dict[str, Compaction] = {}  # records are immutable: read each once

    def refresh(self) -> None:
        for info in self.store.list(LEDGER_DIR, suffix=".json"):
            if info.base_name not in self._records:
                rel = f"{LEDGER_DIR}/{info.base_name}"
                self._records[info.base_name] = Compaction.from_json(self.store.read_bytes(rel))

    def record(self, c: Compaction) -> None:
        name = f"{c.area}--{c.merged.removesuffix('.parquet')}.json"
        self.store.write_bytes(f"{LEDGER_DIR}/{name}", c.to_json())
        self._records[name] = c

    def replaced(self, area: str) -> dict[str, tuple[str, int]]:
        """source basename -> (merged basename, offset of its first row there)."""
        out: dict[str, tuple[str, int]] = {}
        for c in self._records.values():
            if c.area == area:
                for name, offset, _ in c.sources:
                    out[name] = (c.merged, offset)
        return out

    def hidden(self, area: str, live: set[str]) -> set[str]:
        """Live files that a live merged file already holds."""
        return {name for c in self._records.values() if c.area == area and c.merged in live
                for name, _, _ in c.sources if name in live}

    def resolve(self, area: str, name: str, live: set[str]) -> tuple[str, int] | None:
        """Where row 0 of file `name` lives now: (live file, row offset), or None if nowhere."""
        replaced = self.replaced(area)
        offset = 0
        seen = set()
        while name not in live:
            if name not in replaced or name in seen:
                return None
            seen.add(name)
            name, extra = replaced[name]
            offset += extra
        return name, offset
