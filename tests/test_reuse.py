"""Off-policy reuse statistics of a run: reads per generated row from the learners' per-rank reads files."""

from __future__ import annotations

import json

import numpy as np
import pyarrow as pa
import pytest

from bcoder_ray.buffer import ReplayBuffer
from bcoder_ray.buffer.synthetic import synthetic_rows
from bcoder_ray.loop.stage_channel import READS_FILE, write_reads
from bcoder_ray.evaluation.reuse import READS_DIR, read_counts, reuse_stats


def _rows(rng, n, source, run_id, start):
    t = synthetic_rows(rng, n, source=source, start=start, mean_tokens=8, max_tokens=20, n_problems=5)
    return t.append_column("run_id", pa.array([run_id] * n, pa.string()))


def test_reads_per_generated_row_of_this_run(tmp_path):
    rng = np.random.default_rng(0)
    buf = ReplayBuffer(str(tmp_path / "buf"))
    buf.append(_rows(rng, 4, "human", None, 0), "human")
    buf.append(_rows(rng, 5, "generated", "run-a", 100), "a")
    buf.append(_rows(rng, 3, "generated", "run-b", 200), "b")
    rows = buf.read(columns=["sample_id", "source", "run_id"]).to_pylist()
    human = [r["sample_id"] for r in rows if r["source"] == "human"]
    mine = [r["sample_id"] for r in rows if r["run_id"] == "run-a"]
    other = [r["sample_id"] for r in rows if r["run_id"] == "run-b"]
    assert len(mine) == 5 and len(other) == 3
    run_dir = tmp_path / "run"
    # two stages; the second on two ranks: row 0 read 1+2+1 = 4 times, row 1 once, row 2 twice, rows 3-4 never
    from collections import Counter
    write_reads(str(run_dir / READS_DIR / "phi-iter0-x" / READS_FILE.format(rank=0)),
                Counter({mine[0]: 1, mine[2]: 2, human[0]: 7}))
    write_reads(str(run_dir / READS_DIR / "theta-iter0-y" / READS_FILE.format(rank=0)),
                Counter({mine[0]: 2, mine[1]: 1, other[0]: 3}))
    write_reads(str(run_dir / READS_DIR / "theta-iter0-y" / READS_FILE.format(rank=1)), Counter({mine[0]: 1}))
    assert read_counts(run_dir)[mine[0]] == 4
    stats = reuse_stats(run_dir, buf, "run-a")
    assert stats["generated_rows"] == 5
    assert stats["reads_mean"] == pytest.approx((4 + 1 + 2) / 5)
    assert stats["reads_max"] == 4
    assert stats["never_read_share"] == pytest.approx(2 / 5)
    assert stats["generated_reads"] == 7 and stats["other_reads"] == 10


def test_a_run_that_read_nothing_and_a_damaged_file(tmp_path):
    buf = ReplayBuffer(str(tmp_path / "buf"))
    buf.append(_rows(np.random.default_rng(1), 3, "generated", "run-a", 0), "a")
    stats = reuse_stats(tmp_path / "run", buf, "run-a")
    assert (stats["generated_rows"], stats["reads_mean"], stats["reads_max"], stats["never_read_share"]) == (3, 0, 0, 1)
    bad = tmp_path / "run" / READS_DIR / "s" / "reads-rank0.json"
    bad.parent.mkdir(parents=True)
    bad.write_text("{not json")
    with pytest.raises(ValueError, match="reads-rank0.json"):
        read_counts(tmp_path / "run")
    assert json.loads(json.dumps(reuse_stats(tmp_path / "none", buf, "run-b")))["generated_rows"] == 0
