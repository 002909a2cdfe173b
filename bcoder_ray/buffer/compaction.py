"""Merging many small files into fewer, without changing what readers see.

For each group of small files: (1) the ledger record (sources and their row offsets) is written, (2) the
sources' target sidecars are rewritten, per fingerprint, for the merged file with shifted `row_index` (their
columns, whatever the fingerprint's writer declared, kept as they are), (3) the merged file is written
(streamed row group by row group, rows of any schema version written as the current one, a version-1 file's
inline targets dropped) and renamed into place: the commit point, (4) sources and their old sidecars are
deleted. Every write is fsynced before its rename, so the record is on disk before the merged file exists.
Readers hide a source as soon as its merged file is visible.

Compactions exclude each other across processes and nodes with the store's compaction lock
(`Store.lock`: flock on local and NFS roots, a lease on S3); each first finishes what a killed one left: the
sources of a committed compaction are deleted, a record whose merged file never appeared is deleted (its
sources are grouped afresh). A source proven damaged while merging is quarantined and its group dropped.

Works on the storage layer (`catalog.Catalog`), not on the `ReplayBuffer` facade.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from typing import Callable, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from bcoder_ray.buffer.catalog import SAMPLES, Catalog
from bcoder_ray.buffer.ledger import Compaction
from bcoder_ray.buffer.schema import SAMPLE_SCHEMA
from bcoder_ray.buffer.storage import QUARANTINE, DamagedFileError, FileEntry, UnreadableFileError
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
    schema = store.read_parquet(old[0], lambda pf: pf.schema_arrow)

    def tables() -> Iterator[pa.Table]:
        for path in old:
            try:
                t = store.read_parquet(path, lambda pf: pf.read()).select(schema.names)
            except DamagedFileError as e:  # its rows lack targets again: missing_targets lists them
                store.quarantine(path[len(store.root) + 1:], f"reading targets for compaction failed: {e}")
                continue
            src = stems[sample_stem_of(path.rsplit("/", 1)[1])]
            yield t.set_column(0, "row_index", pc.add(t["row_index"], offsets[src.name]))

    name = sidecar_name(merged_stem, "compaction", ",".join(sorted(stems)))
    store.write_parquet(f"{fingerprint_dir(fingerprint)}/{name}", tables(), schema, SIDECAR_ROW_GROUP)
    return old


def _finish_interrupted(catalog: Catalog, area: str, fingerprints: list[str]) -> None:
    """Finish what a killed compaction left (under the lock): delete the sources (and their old sidecars) of a
    visible merged file; forget records that never committed (their merged file never appeared: it is neither
    live, nor merged again, nor in quarantine), and those whose merged file was quarantined while its sources are
    all still live; their sources are grouped afresh, so no source is ever named by two records."""
    catalog.ledger.refresh()
    names = {i.base_name for i in catalog.store.list(area)}
    _delete_files(catalog, area, catalog.ledger.hidden(area, names), fingerprints)
    names = {i.base_name for i in catalog.store.list(area)}
    replaced = catalog.ledger.replaced(area)
    for record in catalog.ledger.records(area):
        if record.merged in names or record.merged in replaced:
            continue  # committed
        quarantined = catalog.store.exists(f"{QUARANTINE}/{area}/{record.merged}")
        if quarantined and not all(n in names for n, _, _ in record.sources):
            # committed, its merged file damaged since, some sources deleted: kept, it tells which rows were
            # lost; its live sources are never grouped again (`_stuck`), so no other record names them
            continue
        _delete_files(catalog, area, set(), fingerprints, {record.merged.removesuffix(".parquet")})
        catalog.ledger.forget(record)


def _delete_files(catalog: Catalog, area: str, names: set[str], fingerprints: list[str],
                  extra_stems: set[str] = frozenset()) -> None:
    """Delete files of `area` and every sidecar of theirs (and of `extra_stems`)."""
    stems = {n.removesuffix(".parquet") for n in names} | set(extra_stems)
    for name in names:
        catalog.store.delete(f"{area}/{name}")
    for fp in fingerprints:
        for info in catalog.store.list(fingerprint_dir(fp)):
            if sample_stem_of(info.base_name) in stems:
                catalog.store.delete(info.path[len(catalog.store.root) + 1:])


def compact(catalog: Catalog, area: str = SAMPLES, target_rows: int = 65536, min_files: int = 2,
            row_group_size: int = 2048, lock_timeout_s: float = 600.0) -> CompactionReport:
    """Merge files of `area` smaller than `target_rows` into files of about `target_rows` rows (written with
    `row_group_size`-row groups); every fingerprint's sidecars follow their rows. Holds the compaction lock
    (BufferError when another compactor keeps it for `lock_timeout_s`)."""
    with catalog.store.lock("compaction", lock_timeout_s) as lease:
        check = lease.check if lease is not None else (lambda: None)
        return _compact_locked(catalog, area, target_rows, min_files, row_group_size, check)


def _compact_locked(catalog: Catalog, area: str, target_rows: int, min_files: int, row_group_size: int,
                    check: Callable[[], None]) -> CompactionReport:
    fingerprints = [d.removeprefix("fp=") for d in catalog.store.list_dirs(TARGETS_DIR)] if area == SAMPLES else []
    _finish_interrupted(catalog, area, fingerprints)
    files = catalog.files(area)
    stuck = _stuck(catalog, area, {f.name for f in files})
    files = [f for f in files if f.name not in stuck]
    report = CompactionReport(area, files_before=len(files), files_after=len(files))
    for group in _groups(files, target_rows, min_files):
        if _merge(catalog, area, group, fingerprints, row_group_size, check):
            report.merged.append(_merged_name(group))
            report.rows_moved += sum(f.num_rows for f in group)
            report.files_after -= len(group) - 1
    return report


def _stuck(catalog: Catalog, area: str, live: set[str]) -> set[str]:
    """Live sources of a kept record whose merged file is not live (it was quarantined after some sources were
    deleted): grouping them again would make two records name them."""
    replaced = catalog.ledger.replaced(area)
    return {n for r in catalog.ledger.records(area) if r.merged not in live and r.merged not in replaced
            for n, _, _ in r.sources if n in live}


def _merged_name(group: list[FileEntry]) -> str:
    return "compact-" + hashlib.sha256("\n".join(f.name for f in group).encode()).hexdigest()[:32] + ".parquet"


def _merge(catalog: Catalog, area: str, group: list[FileEntry], fingerprints: list[str], row_group_size: int,
           check: Callable[[], None]) -> bool:
    """Merge one group (see the module docstring); False when a source could not be read (the group is
    dropped; a source proven damaged is quarantined). `check()` runs before each step that writes or deletes:
    it stops a compactor whose lock was taken over."""
    merged = _merged_name(group)
    merged_stem = merged.removesuffix(".parquet")
    offsets, start = {}, 0
    for f in group:
        offsets[f.name] = start
        start += f.num_rows
    record = Compaction(area, merged, tuple((f.name, offsets[f.name], f.num_rows) for f in group))
    check()
    catalog.ledger.record(record)
    old_sidecars = list(itertools.chain.from_iterable(
        _remap_sidecars(catalog, group, offsets, merged_stem, fp) for fp in fingerprints))
    reading: list[FileEntry] = []

    def tables() -> Iterator[pa.Table]:
        for f in group:
            reading[:] = [f]
            for g in range(catalog.metadata(f).num_row_groups):
                yield catalog.read_samples(f, None, g)

    check()
    try:
        catalog.store.write_parquet(f"{area}/{merged}", tables(), SAMPLE_SCHEMA, row_group_size)
    except (DamagedFileError, UnreadableFileError) as e:
        if isinstance(e, DamagedFileError):
            catalog.quarantine_file(reading[0], f"reading for compaction failed: {e}")
        else:
            catalog.store.warn(f"compaction skipped a group: {e}")
        _delete_files(catalog, area, set(), fingerprints, {merged_stem})
        catalog.ledger.forget(record)  # never committed: its merged file never appeared
        return False
    check()
    for f in group:
        catalog.store.delete(f"{area}/{f.name}")
    for path in old_sidecars:
        catalog.store.delete(path[len(catalog.store.root) + 1:])
    return True
