"""The live files of a buffer and reading them: the layer every reader (sampler, compaction, stats, Ray Data
read tasks, the `ReplayBuffer` facade) works on.

`Catalog(store, ledger)` lists an area's live Parquet files (footers validated once per file and cached; sources
of a visible merged file hidden by the ledger), opens them with page checksums on, and reads sample rows of any
schema version as the current schema (`schema.conform`). A read that fails is diagnosed (`Store.read_parquet`):
a file proven damaged goes to quarantine/; one that only could not be read (I/O errors after bounded retries)
stays in place, is skipped this time with a warning, and is read again later.
"""

from __future__ import annotations

from typing import Callable, Iterator, Sequence, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bcoder_ray.buffer.filters import Filters
from bcoder_ray.buffer.ledger import Ledger
from bcoder_ray.buffer.schema import FILE_COLUMNS, PROMPT_SCHEMA, SAMPLE_SCHEMA, conform, prompt_keys
from bcoder_ray.buffer.storage import DamagedFileError, FileEntry, Store, UnreadableFileError
from bcoder_ray.buffer.targets import SIDECAR_KEY_COLUMNS, TARGETS_DIR

T = TypeVar("T")
SAMPLES, EVAL, PROMPTS = "samples", "eval", "prompts"
SAMPLE_AREAS = (SAMPLES, EVAL)
REQUIRED_COLUMNS = {SAMPLES: FILE_COLUMNS, EVAL: FILE_COLUMNS, PROMPTS: PROMPT_SCHEMA.names}


class Catalog:
    """Live, validated files of a buffer's areas (see the module docstring)."""

    def __init__(self, store: Store, ledger: Ledger | None = None):
        self.store = store
        self.ledger = ledger if ledger is not None else Ledger(store)
        self.uri = store.uri
        self._footers: dict[str, tuple[int, pq.FileMetaData]] = {}

    def check(self) -> None:
        """Validate every file not seen yet (footer and columns); damaged ones go to quarantine/."""
        for area in (SAMPLES, EVAL, PROMPTS):
            self.files(area)
        for d in self.store.list_dirs(TARGETS_DIR):
            self.files(f"{TARGETS_DIR}/{d}")

    def files(self, area: str) -> list[FileEntry]:
        """Live, validated Parquet files of an area, sorted by name (sources of a visible merged file hidden)."""
        required = REQUIRED_COLUMNS.get(area, SIDECAR_KEY_COLUMNS)
        entries = []
        for info in self.store.list(area):
            cached = self._footers.get(info.path)
            if cached is None or cached[0] != info.size:
                try:
                    meta = self.store.footer(info.path, required)
                except FileNotFoundError:
                    continue  # compacted away since the listing
                except DamagedFileError as e:
                    self.store.quarantine(f"{area}/{info.base_name}", str(e))
                    continue
                except UnreadableFileError as e:
                    self.store.warn(f"skipped {area}/{info.base_name} for now (not moved): {e}")
                    continue
                self._footers[info.path] = cached = (info.size, meta)
            entries.append(FileEntry(info.base_name, info.path, info.size, cached[1].num_rows))
        if area in SAMPLE_AREAS:
            self.ledger.refresh()
            hidden = self.ledger.hidden(area, {e.name for e in entries})
            entries = [e for e in entries if e.name not in hidden]
        return entries

    def metadata(self, entry: FileEntry) -> pq.FileMetaData:
        cached = self._footers.get(entry.path)
        return cached[1] if cached else self.store.footer(entry.path, ())

    def parquet_file(self, entry: FileEntry) -> pq.ParquetFile:
        return pq.ParquetFile(self.store.fs.open_input_file(entry.path), metadata=self.metadata(entry),
                              page_checksum_verification=True)

    def quarantine_file(self, entry: FileEntry, reason: str) -> None:
        area = entry.path[len(self.store.root) + 1:].rsplit("/", 1)[0]
        self.store.quarantine(f"{area}/{entry.name}", reason)
        self._footers.pop(entry.path, None)

    def guarded(self, entry: FileEntry, what: str, read: Callable[[], T]) -> T | None:
        """`read()` of one file for a reader that carries on without it: None when the file is gone (compacted
        away), proven damaged (moved to quarantine/) or unreadable for now (left in place, warned)."""
        try:
            return read()
        except FileNotFoundError:
            return None
        except DamagedFileError as e:
            self.quarantine_file(entry, f"{what} failed: {e}")
        except UnreadableFileError as e:
            self.store.warn(f"skipped {entry.name} ({what}) for now (not moved): {e}")
        return None

    def read_table(self, entry: FileEntry, columns: Sequence[str] | None = None,
                   row_group: int | None = None) -> pa.Table:
        """Columns of a file (or one row group) as stored; transient errors retried, damage proven before
        DamagedFileError (`Store.read_parquet`)."""
        cols = list(columns) if columns is not None else None

        def read(pf: pq.ParquetFile) -> pa.Table:
            if row_group is None:
                return pf.read(columns=cols)
            return pf.read_row_group(row_group, columns=cols, use_threads=False)

        return self.store.read_parquet(entry.path, read, self._footers.get(entry.path, (0, None))[1])

    def read_samples(self, entry: FileEntry, columns: Sequence[str] | None = None,
                     row_group: int | None = None) -> pa.Table:
        """Rows of a sample file (or one row group of it) as `columns` of the current schema, whatever the
        file's schema version (`schema.conform`)."""
        wanted = list(SAMPLE_SCHEMA.names if columns is None else columns)
        present = set(self.metadata(entry).schema.to_arrow_schema().names)
        return conform(self.read_table(entry, [c for c in wanted if c in present], row_group), wanted)

    def scan(self, area: str = SAMPLES, columns: Sequence[str] | None = None,
             filters: Filters | dict | None = None) -> Iterator[tuple[FileEntry, pa.Table]]:
        """(file, rows) per live file of `area`, optionally projected and filtered; damaged files quarantined.
        Sample rows come as the current schema (`read_samples`); `columns` must include what `filters` reads."""
        expr = Filters.coerce(filters).expression()
        for entry in self.files(area):
            if area in SAMPLE_AREAS:
                t = self.guarded(entry, "reading", lambda: self.read_samples(entry, columns))
            else:
                t = self.guarded(entry, "reading", lambda: self.read_table(entry, columns))
            if t is None:
                continue
            yield entry, (t.filter(expr) if expr is not None else t)

    def read(self, area: str = SAMPLES, columns: Sequence[str] | None = None,
             filters: Filters | dict | None = None) -> pa.Table:
        """A whole area as one table: for tests and small buffers (the sampler streams instead)."""
        needed = None if columns is None else sorted(set(columns) | set(Filters.coerce(filters).columns()))
        parts = [t for _, t in self.scan(area, needed, filters)]
        if parts:
            table = pa.concat_tables(parts)
        elif area in SAMPLE_AREAS:
            table = conform(SAMPLE_SCHEMA.empty_table(), needed)
        else:
            table = PROMPT_SCHEMA.empty_table()
        return table.select(list(columns)) if columns is not None else table

    def prompts(self, suite: str | None = None, tokenizer_hash: str | None = None) -> pa.Table:
        """The prompts table (one row per key; the first file in name order wins a duplicate)."""
        parts = [t for _, t in self.scan(PROMPTS)]
        table = pa.concat_tables(parts) if parts else PROMPT_SCHEMA.empty_table()
        if table.num_rows:
            _, first = np.unique(prompt_keys(table).to_numpy(zero_copy_only=False), return_index=True)
            table = table.take(np.sort(first))
        if suite is not None:
            table = table.filter(pc.equal(table["suite"], suite))
        if tokenizer_hash is not None:
            table = table.filter(pc.equal(table["tokenizer_hash"], tokenizer_hash))
        return table
