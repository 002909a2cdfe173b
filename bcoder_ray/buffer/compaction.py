"""Merging many small files into fewer, without changing what readers see.

For each group of small files: (1) the ledger record (sources and their row offsets) is written, (2) the
sources' target sidecars are rewritten, per fingerprint, for the merged file with shifted `row_index` (their
columns, whatever the fingerprint's writer declared, kept as they are), (3) the merged file is written
(streamed row group by row group, rows of any schema version written as the current one, a version-1 file's
inline targets dropped) and renamed into place, (4) sources and their old sidecars are deleted. Readers hide a
source as soon as its merged file is visible. Run one compactor at a time.

Works on the storage layer (`catalog.Catalog`), not on the `ReplayBuffer` facade.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Iterator

import pyarrow as pa
import pyarrow.compute as pc

from bcoder_ray.buffer.catalog import SAMPLES, Catalog
from bcoder_ray.buffer.ledger import Compaction
from bcoder_ray.buffer.schema import SAMPLE_SCHEMA
from bcoder_ray.buffer.storage import FileEntry
from bcoder_ray.buffer.targets import SIDECAR_ROW_GROUP, TARGETS_DIR, fingerprint_dir, sample_stem_of, sidecar_name


@dataclass
class CompactionReport:
    area: str
    files_before: int
    files_after: int
    merged: list[str] = field(default_factory=list)
    rows_moved: int = 0


def _groups(files: list[FileEntry], target_rows: int, min_files: int) -> list[list[FileEntry]]:
    groups, current, rows = [], [], 0
    for f in files:
        if f.num_rows >= target_rows:
            continue
        current.append(f)
        rows += f.num_rows
        if rows >= target_rows:
            groups.append(current)
            current, rows = [], 0
    groups.append(current)
    return [g for g in groups if len(g) >= min_files]


def _remap_sidecars(catalog: Catalog, group: list[FileEntry], offsets: dict[str, int], merged_stem: str,
                    fingerprint: str) -> list[str]:
    """Write one sidecar for the merged file from the group's sidecars of `fingerprint`; returns the old paths."""
    store = catalog.store
    stems = {f.stem: f for f in group}
    old = [i.path for i in store.list(fingerprint_dir(fingerprint)) if sample_stem_of(i.base_name) in stems]
    if not old:
        return []
    schema = store.parquet_file(old[0]).schema_arrow

    def tables() -> Iterator[pa.Table]:
        for path in old:
            t = store.parquet_file(path).read().select(schema.names)
            src = stems[sample_stem_of(path.rsplit("/", 1)[1])]
            yield t.set_column(0, "row_index", pc.add(t["row_index"], offsets[src.name]))

    name = sidecar_name(merged_stem, "compaction", ",".join(sorted(stems)))
    store.write_parquet(f"{fingerprint_dir(fingerprint)}/{name}", tables(), schema, SIDECAR_ROW_GROUP)
    return old


def _finish_interrupted(catalog: Catalog, area: str, fingerprints: list[str]) -> None:
    """Delete what an interrupted compaction left: sources (and their old sidecars) of a visible merged file."""
    catalog.ledger.refresh()
    names = {i.base_name for i in catalog.store.list(area)}
    done = catalog.ledger.hidden(area, names)
    stems = {n.removesuffix(".parquet") for n in done}
    for name in done:
        catalog.store.delete(f"{area}/{name}")
    for fp in fingerprints:
        for info in catalog.store.list(fingerprint_dir(fp)):
            if sample_stem_of(info.base_name) in stems:
                catalog.store.fs.delete_file(info.path)


def compact(catalog: Catalog, area: str = SAMPLES, target_rows: int = 65536, min_files: int = 2,
            row_group_size: int = 2048) -> CompactionReport:
    """Merge files of `area` smaller than `target_rows` into files of about `target_rows` rows (written with
    `row_group_size`-row groups); every fingerprint's sidecars follow their rows."""
    fingerprints = [d.removeprefix("fp=") for d in catalog.store.list_dirs(TARGETS_DIR)] if area == SAMPLES else []
    _finish_interrupted(catalog, area, fingerprints)
    files = catalog.files(area)
    report = CompactionReport(area, files_before=len(files), files_after=len(files))
    for group in _groups(files, target_rows, min_files):
        names = [f.name for f in group]
        merged = "compact-" + hashlib.sha256("\n".join(names).encode()).hexdigest()[:32] + ".parquet"
        merged_stem = merged.removesuffix(".parquet")
        offsets, start = {}, 0
        for f in group:
            offsets[f.name] = start
            start += f.num_rows
        catalog.ledger.record(Compaction(area, merged, tuple((f.name, offsets[f.name], f.num_rows) for f in group)))
        old_sidecars = list(itertools.chain.from_iterable(
            _remap_sidecars(catalog, group, offsets, merged_stem, fp) for fp in fingerprints))

        def tables() -> Iterator[pa.Table]:
            for f in group:
                for g in range(catalog.metadata(f).num_row_groups):
                    yield catalog.read_samples(f, None, g)

        catalog.store.write_parquet(f"{area}/{merged}", tables(), SAMPLE_SCHEMA, row_group_size)
        for f in group:
            catalog.store.delete(f"{area}/{f.name}")
        for path in old_sidecars:
            catalog.store.fs.delete_file(path)
        report.merged.append(merged)
        report.rows_moved += start
        report.files_after -= len(group) - 1
    return report
