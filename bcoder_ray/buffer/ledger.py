"""The compaction ledger: which files a compacted file replaced, and at which row offset.

A record is written (whole, fsynced, renamed, its directory fsynced) before its merged file is written, and its
compaction commits when the merged file becomes visible; from then on the record is kept for ever. Readers use
it to hide sources that a visible merged file already holds; `append` uses it to recognise a retried batch whose
file was compacted away; `write_targets` uses it to find where rows of a compacted file now live. A record whose
merged file never appeared is deleted by the next compaction (under the compaction lock). A record that does not
parse (zero bytes or cut short: a filesystem that lost unsynced data) was never complete, so its compaction never
committed: it is moved to quarantine/ with a warning naming it and treated as never written.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from bcoder_ray.buffer.storage import Store, UnreadableFileError

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
        """Read records not seen yet (I/O errors retried; a record still unreadable is tried next time)."""
        for info in self.store.list(LEDGER_DIR, suffix=".json"):
            if info.base_name not in self._records:
                self._read(info.base_name)

    def _read(self, name: str) -> None:
        rel = f"{LEDGER_DIR}/{name}"
        try:
            data = self.store.read_bytes(rel)
        except FileNotFoundError:
            return  # a dead record deleted by a compaction since the listing
        except UnreadableFileError as e:
            self.store.warn(f"compaction record {rel} could not be read now, tried again later: {e}")
            return
        try:
            self._records[name] = Compaction.from_json(data)
        except (ValueError, KeyError, TypeError) as e:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
            self.store.quarantine(rel, f"unfinished compaction record ({len(data)} bytes: {e}); treated as never "
                                       f"written")

    @staticmethod
    def name_of(c: Compaction) -> str:
        return f"{c.area}--{c.merged.removesuffix('.parquet')}.json"

    def record(self, c: Compaction) -> None:
        name = self.name_of(c)
        self.store.write_bytes(f"{LEDGER_DIR}/{name}", c.to_json())
        self._records[name] = c

    def forget(self, c: Compaction) -> None:
        """Delete the record of a compaction that never committed (its merged file never appeared); only the
        holder of the compaction lock may."""
        name = self.name_of(c)
        self.store.delete(f"{LEDGER_DIR}/{name}")
        self._records.pop(name, None)

    def records(self, area: str) -> list[Compaction]:
        return [c for c in self._records.values() if c.area == area]

    def replaced(self, area: str) -> dict[str, tuple[str, int]]:
        """source basename -> (merged basename, offset of its first row there)."""
        out: dict[str, tuple[str, int]] = {}
        for c in self._records.values():
            if c.area == area:
                for name, offset, _ in c.sources:
                    out[name] = (c.merged, offset)
        return out

    def hidden(self, area: str, live: set[str]) -> set[str]:
        """Live files whose rows a live file already holds: sources of a committed compaction, found through
        the chain of merged files (a merged file may have been merged again since). Such a live source is
        one not deleted yet, or a late copy of a batch written again after its first file was compacted."""
        replaced = self.replaced(area)
        return {name for name in live if name in replaced
                and self.resolve(area, replaced[name][0], live, replaced) is not None}

    def resolve(self, area: str, name: str, live: set[str],
                replaced: dict[str, tuple[str, int]] | None = None) -> tuple[str, int] | None:
        """Where row 0 of file `name` lives now: (live file, row offset), or None if nowhere."""
        replaced = self.replaced(area) if replaced is None else replaced
        offset = 0
        seen = set()
        while name not in live:
            if name not in replaced or name in seen:
                return None
            seen.add(name)
            name, extra = replaced[name]
            offset += extra
        return name, offset
