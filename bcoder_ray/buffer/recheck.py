"""Re-checking quarantined files and restoring the ones that read back whole (`python -m bcoder_ray.buffer
recheck PATH`): files moved aside by an error that was not damage (before reads told the two apart, a single
transient I/O error quarantined a file), or damage repaired by hand.

A file is restored when its bytes parse in full (footer, required columns, every page's checksum; a compaction
record: its JSON), no live file has its name, and none of its rows is readable elsewhere now: a source of a
committed compaction stays (its rows are in the merged file), and so does a merged file whose sources are live
or were merged again, or whose ledger record is gone (nothing tells where its rows are). Works on the storage
layer (`catalog.Catalog`), not on the facade.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bcoder_ray.buffer.catalog import REQUIRED_COLUMNS, SAMPLE_AREAS, Catalog
from bcoder_ray.buffer.ledger import LEDGER_DIR, Compaction
from bcoder_ray.buffer.storage import QUARANTINE, DamagedFileError, UnreadableFileError
from bcoder_ray.buffer.targets import SIDECAR_KEY_COLUMNS


@dataclass
class RecheckReport:
    restored: list[str] = field(default_factory=list)  # paths under the root, back where they were
    damaged: dict[str, str] = field(default_factory=dict)  # still damaged: path -> why
    kept: dict[str, str] = field(default_factory=dict)  # readable, left in quarantine: path -> why

    def format(self) -> str:
        lines = [f"restored {p}" for p in self.restored]
        lines += [f"damaged  {p}: {why}" for p, why in self.damaged.items()]
        lines += [f"kept     {p}: {why}" for p, why in self.kept.items()]
        return "\n".join(lines or ["quarantine is empty"])


def recheck(catalog: Catalog) -> RecheckReport:
    """Check every file under quarantine/ and restore those that read back whole (see the module docstring)."""
    store = catalog.store
    report = RecheckReport()
    catalog.ledger.refresh()
    sel = pafs.FileSelector(store.path(QUARANTINE), allow_not_found=True, recursive=True)
    for info in sorted(store.fs.get_file_info(sel), key=lambda i: i.path):
        if info.type != pafs.FileType.File:
            continue
        rel = info.path[len(store.path(QUARANTINE)) + 1:]  # where it lived: samples/x.parquet, _meta/...
        try:
            _verify(catalog, rel)
        except DamagedFileError as e:
            report.damaged[rel] = str(e)
            continue
        except UnreadableFileError as e:
            report.kept[rel] = f"could not be read now: {e}"
            continue
        why = _elsewhere(catalog, rel)
        if why is not None:
            report.kept[rel] = why
        elif store.restore(rel):
            report.restored.append(rel)
        else:
            report.kept[rel] = "a live file has its name"
    catalog.ledger.refresh()
    return report


def _verify(catalog: Catalog, rel: str) -> None:
    """DamagedFileError (or UnreadableFileError) unless the quarantined copy of `rel` reads back in full."""
    store = catalog.store
    path = store.path(f"{QUARANTINE}/{rel}")
    if rel.startswith(f"{LEDGER_DIR}/"):
        data = store.read_path_bytes(path)
        try:
            Compaction.from_json(data)
        except (ValueError, KeyError, TypeError) as e:
            raise DamagedFileError(f"{path}: not a complete compaction record ({len(data)} bytes: {e})") from e
        return
    area = rel.rsplit("/", 1)[0]
    required = REQUIRED_COLUMNS.get(area, SIDECAR_KEY_COLUMNS)

    def read_all(pf: pq.ParquetFile) -> pq.FileMetaData:
        for g in range(pf.metadata.num_row_groups):
            pf.read_row_group(g, use_threads=False)  # every page, checksums verified
        return pf.metadata

    names = set(store.read_parquet(path, read_all).schema.to_arrow_schema().names)
    missing = [c for c in required if c not in names]
    if missing:
        raise DamagedFileError(f"{path}: lacks column(s) {missing}")


def _elsewhere(catalog: Catalog, rel: str) -> str | None:
    """Why restoring the sample file `rel` would show rows readable elsewhere now (None: it would not)."""
    area, name = rel.rsplit("/", 1) if "/" in rel else ("", rel)
    if area not in SAMPLE_AREAS:
        return None
    ledger = catalog.ledger
    live = {i.base_name for i in catalog.store.list(area)}
    replaced = ledger.replaced(area)
    if name in replaced and ledger.resolve(area, replaced[name][0], live, replaced) is not None:
        return f"its rows are in {ledger.resolve(area, replaced[name][0], live, replaced)[0]} now"
    record = next((c for c in ledger.records(area) if c.merged == name), None)
    if record is None:
        return "no compaction record names it: where its sources' rows are cannot be told" \
            if name.startswith("compact-") else None
    for source, _, _ in record.sources:
        if source in live or replaced.get(source, (name,))[0] != name:
            return f"its source {source} is live or was merged into another file"
    return None
