"""Merging many small files into fewer, without changing what readers see.

For each group of small files: (1) the ledger record (sources and their row offsets) is written, (2) the
sources' target sidecars are rewritten for the merged file with shifted `row_index`, (3) the merged file is
written (streamed row group by row group) and renamed into place, (4) sources and their old sidecars are
deleted. Readers of this module hide a source as soon as its merged file is visible. Run one compactor at a time.
"""

from __future__ import annotations

import hashlib
import itertools
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Iterator

import pyarrow as pa
import pyarrow.compute as pc

from bcoder_ray.buffer.ledger import Compaction
from bcoder_ray.buffer.schema import SAMPLE_SCHEMA, TARGET_COLUMNS
from bcoder_ray.buffer.storage import FileEntry
from bcoder_ray.buffer.targets import (SIDECAR_ROW_GROUP, SIDECAR_SCHEMA, TARGETS_DIR, TargetsJoin,
                                       fingerprint_dir, sample_stem_of, sidecar_name)

if TYPE_CHECKING:
    from bcoder_ray.replay_buffer import ReplayBuffer


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


def _remap_sidecars(buffer: "ReplayBuffer", group: list[FileEntry], offsets: dict[str, int], merged_stem: str,
                    fingerprint: str, keep_inline_only: bool) -> list[str]:
    """Write one sidecar for the merged file from the group's sidecars of `fingerprint`; returns the old paths.
    With `keep_inline_only` (this fingerprint is being folded inline) only rows that keep another
    fingerprint's inline targets stay in the sidecar."""
    store = buffer.store
    stems = {f.stem: f for f in group}
    old = [i.path for i in store.list(fingerprint_dir(fingerprint)) if sample_stem_of(i.base_name) in stems]
    if not old:
        return []

    def tables() -> Iterator[pa.Table]:
        for path in old:
            t = store.parquet_file(path).read()
            src = stems[sample_stem_of(path.rsplit("/", 1)[1])]
            if keep_inline_only:
                inline = buffer.parquet_file(src).read(columns=["targets_fingerprint"])["targets_fingerprint"]
                t = t.filter(pc.is_valid(inline.take(t["row_index"])))
            yield t.set_column(0, "row_index", pc.add(t["row_index"], offsets[src.name]))

    nonempty = (t for t in tables() if t.num_rows)
    first = next(nonempty, None)
    if first is not None:  # (all rows folded inline: no sidecar left to write)
        name = sidecar_name(merged_stem, "compaction", ",".join(sorted(stems)))
        store.write_parquet(f"{fingerprint_dir(fingerprint)}/{name}", itertools.chain([first], nonempty),
                            SIDECAR_SCHEMA, SIDECAR_ROW_GROUP)
    return old


def _finish_interrupted(buffer: "ReplayBuffer", area: str, fingerprints: list[str]) -> None:
    """Delete what an interrupted compaction left: sources (and their old sidecars) of a visible merged file."""
    buffer.ledger.refresh()
    names = {i.base_name for i in buffer.store.list(area)}
    done = buffer.ledger.hidden(area, names)
    stems = {n.removesuffix(".parquet") for n in done}
    for name in done:
        buffer.store.delete(f"{area}/{name}")
    for fp in fingerprints:
        for info in buffer.store.list(fingerprint_dir(fp)):
            if sample_stem_of(info.base_name) in stems:
                buffer.store.fs.delete_file(info.path)


def compact(buffer: "ReplayBuffer", area: str = "samples", target_rows: int = 65536, min_files: int = 2,
            inline_targets: str | None = None) -> CompactionReport:
    """Merge files of `area` smaller than `target_rows` into files of about `target_rows` rows. With
    `inline_targets` (samples only), that fingerprint's sidecar targets are folded into the merged rows that
    have no inline targets, so later reads need no join."""
    fingerprints = [d.removeprefix("fp=") for d in buffer.store.list_dirs(TARGETS_DIR)] if area == "samples" else []
    _finish_interrupted(buffer, area, fingerprints)
    files = buffer.files(area)
    report = CompactionReport(area, files_before=len(files), files_after=len(files))
    for group in _groups(files, target_rows, min_files):
        names = [f.name for f in group]
        merged = "compact-" + hashlib.sha256("\n".join(names).encode()).hexdigest()[:32] + ".parquet"
        merged_stem = merged.removesuffix(".parquet")
        offsets, start = {}, 0
        for f in group:
            offsets[f.name] = start
            start += f.num_rows
        buffer.ledger.record(Compaction(area, merged, tuple((f.name, offsets[f.name], f.num_rows) for f in group)))
        old_sidecars = []
        for fp in fingerprints:
            old_sidecars += _remap_sidecars(buffer, group, offsets, merged_stem, fp, fp == inline_targets)
        join = TargetsJoin.open(buffer.store, inline_targets) if inline_targets else None

        def tables() -> Iterator[pa.Table]:
            for f in group:
                pf = buffer.parquet_file(f)
                row = 0
                for g in range(pf.metadata.num_row_groups):
                    t = pf.read_row_group(g)
                    if join is not None:
                        joined, has = join.attach(t, f.stem, row)
                        fold = pc.and_(pc.is_null(t["targets_fingerprint"]), has)  # never replace other inline
                        for c in TARGET_COLUMNS + ("targets_fingerprint",):
                            new = joined[c] if c != "targets_fingerprint" else pa.scalar(inline_targets)
                            t = t.set_column(t.schema.get_field_index(c), c, pc.if_else(fold, new, t[c]))
                    row += t.num_rows
                    yield t

        buffer.store.write_parquet(f"{area}/{merged}", tables(), SAMPLE_SCHEMA, buffer.row_group_size)
        for f in group:
            buffer.store.delete(f"{area}/{f.name}")
        for path in old_sidecars:
            buffer.store.fs.delete_file(path)
        report.merged.append(merged)
        report.rows_moved += start
        report.files_after -= len(group) - 1
    return report
