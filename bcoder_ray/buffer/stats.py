"""What is in a buffer: rows by suite, source, outcome and iteration, pass rates, cached-target rows per
fingerprint, files and bytes on disk. Works on the storage layer (`catalog.Catalog`), not on the facade."""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field

import pyarrow.compute as pc

from bcoder_ray.buffer.catalog import Catalog
from bcoder_ray.buffer.storage import QUARANTINE
from bcoder_ray.buffer.targets import TARGETS_DIR
from bcoder_ray.util.formatting import pct

_COUNTED = ("suite", "source", "outcome", "iteration")


@dataclass
class AreaStats:
    rows: int = 0
    by_suite: dict[str, int] = field(default_factory=dict)
    by_source: dict[str, int] = field(default_factory=dict)
    by_outcome: dict[str, int] = field(default_factory=dict)
    by_iteration: dict[str, int] = field(default_factory=dict)
    passed_by_source: dict[str, int] = field(default_factory=dict)

    def pass_rate(self, source: str | None = None) -> float | None:
        if source is None:
            n, p = self.rows, sum(self.passed_by_source.values())
        else:
            n, p = self.by_source.get(source, 0), self.passed_by_source.get(source, 0)
        return p / n if n else None


@dataclass
class BufferStats:
    uri: str
    samples: AreaStats
    eval: AreaStats
    prompts: int
    targets_rows: dict[str, int]  # fingerprint -> sidecar rows (rows with targets for it)
    files: dict[str, int]  # area -> files
    bytes_on_disk: dict[str, int]  # area -> bytes
    quarantined: int

    def to_json(self) -> dict:
        d = asdict(self)
        for area in ("samples", "eval"):
            s = getattr(self, area)
            d[area]["pass_rate"] = s.pass_rate()
            d[area]["pass_rate_generated"] = s.pass_rate("generated")
        return d

    def format(self) -> str:
        mb = sum(self.bytes_on_disk.values()) / 2**20
        lines = [f"replay buffer {self.uri}",
                 f"size on disk: {mb:.1f} MiB in {sum(self.files.values())} files "
                 + ", ".join(f"{a} {self.files[a]} ({self.bytes_on_disk[a] / 2**20:.1f} MiB)" for a in self.files),
                 f"prompts: {self.prompts};  quarantined files: {self.quarantined}"]
        for area in ("samples", "eval"):
            s: AreaStats = getattr(self, area)
            label = "samples (train, learner-facing)" if area == "samples" else "eval (kept apart)"
            rate = s.pass_rate()
            share = {"digits": 2, "missing": "n/a"}
            lines.append(f"{label}: {s.rows} rows; pass rate {pct(rate, **share)} "
                         f"(generated {pct(s.pass_rate('generated'), **share)}, "
                         f"human {pct(s.pass_rate('human'), **share)})")
            if not s.rows:
                continue
            for title, counts in (("suite", s.by_suite), ("source", s.by_source), ("outcome", s.by_outcome),
                                  ("iteration", s.by_iteration)):
                keys = sorted(counts, key=lambda k: (len(k), k) if title == "iteration" else k)
                lines.append(f"  by {title}: " + ", ".join(f"{k}={counts[k]}" for k in keys))
        if self.targets_rows:
            lines.append("cached targets: " + ", ".join(f"fp={k}: {v} rows" for k, v in sorted(self.targets_rows.items())))
        return "\n".join(lines)


def _area_stats(catalog: Catalog, area: str) -> AreaStats:
    counts = {c: Counter() for c in _COUNTED}
    passed: Counter = Counter()
    rows = 0
    for _, t in catalog.scan(area, columns=list(_COUNTED)):
        rows += t.num_rows
        for c in _COUNTED:
            for item in pc.value_counts(t[c]).to_pylist():
                counts[c][str(item["values"])] += item["counts"]
        ok = t.filter(pc.equal(t["outcome"], "passed"))
        for item in pc.value_counts(ok["source"]).to_pylist():
            passed[item["values"]] += item["counts"]
    return AreaStats(rows, dict(counts["suite"]), dict(counts["source"]), dict(counts["outcome"]),
                     dict(counts["iteration"]), dict(passed))


def compute_stats(catalog: Catalog) -> BufferStats:
    targets: Counter = Counter()
    samples = _area_stats(catalog, "samples")
    evals = _area_stats(catalog, "eval")
    for fp_dir in catalog.store.list_dirs(TARGETS_DIR):
        targets[fp_dir.removeprefix("fp=")] += sum(f.num_rows for f in catalog.files(f"{TARGETS_DIR}/{fp_dir}"))
    files, size = {}, {}
    for area in ("samples", "eval", "prompts", TARGETS_DIR, QUARANTINE):
        files[area], size[area] = catalog.store.disk_usage(area)
    quarantined = files.pop(QUARANTINE)
    size.pop(QUARANTINE)
    return BufferStats(catalog.uri, samples, evals, catalog.prompts().num_rows, dict(targets), files, size,
                       quarantined)


def to_json_text(stats: BufferStats) -> str:
    return json.dumps(stats.to_json(), indent=1, sort_keys=True)
