"""Off-policy reuse of a run's buffer: how often the learners read each row the run generated.

Every learning stage's ranks write `reads/<stage run>/reads-rank<r>.json` under the run folder (the sample ids
their optimiser steps consumed, with counts; `bcoder_ray.loop.learner`). `reuse_stats` sums them over the run's
stages and relates them to the rows the run generated (`source == "generated"` and `run_id` the run's, the
greedy baselines included): the mean and maximum reads per generated row, and the share never read. An
on-policy method reads each iteration's rows during that iteration only; a value-based off-policy one keeps
reading old rows.
"""

from __future__ import annotations

import collections
import json
from pathlib import Path

from bcoder_ray.buffer import ReplayBuffer

READS_DIR = "reads"


def read_counts(run_dir: str | Path) -> collections.Counter[str]:
    """Reads per sample id, summed over every stage and rank of the run."""
    total: collections.Counter[str] = collections.Counter()
    for path in sorted((Path(run_dir) / READS_DIR).glob("*/reads-rank*.json")):
        try:
            total.update(json.loads(path.read_text()))
        except (OSError, ValueError) as e:
            raise ValueError(f"{path}: not a reads file of bcoder_ray.loop.learner ({e})") from e
    return total


def reuse_stats(run_dir: str | Path, buffer: ReplayBuffer, run_id: str) -> dict:
    """{generated_rows, reads_mean, reads_max, never_read_share, generated_reads, other_reads} of a run
    (other_reads: reads of human rows and of other runs' rows)."""
    reads = read_counts(run_dir)
    rows = buffer.read(columns=["sample_id", "run_id"], filters={"sources": ("generated",)})
    ids = {sid for sid, rid in zip(rows["sample_id"].to_pylist(), rows["run_id"].to_pylist()) if rid == run_id}
    counts = [reads.get(i, 0) for i in ids]
    n = len(counts)
    return {"generated_rows": n,
            "reads_mean": sum(counts) / n if n else None,
            "reads_max": max(counts) if n else None,
            "never_read_share": sum(c == 0 for c in counts) / n if n else None,
            "generated_reads": sum(counts),
            "other_reads": sum(reads.values()) - sum(counts)}  # human rows (and other runs' rows)
