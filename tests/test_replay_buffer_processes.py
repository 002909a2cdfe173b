"""Several writer processes at once, and a writer killed in the middle of a file."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bcoder_ray.buffer.schema import rows_to_table
from bcoder_ray.buffer.synthetic import synthetic_rows
from bcoder_ray.buffer import ReplayBuffer

REPO = Path(__file__).resolve().parents[1]
WRITERS, BATCHES, ROWS = 4, 4, 50


def batch_rows(writer: int, batch: int):
    return synthetic_rows(np.random.default_rng([writer, batch]), ROWS, mean_tokens=10, max_tokens=30,
                          start=1000 * writer + batch)


def writer_process(root: str, writer: int, barrier) -> None:
    buf = ReplayBuffer(root)
    barrier.wait()
    for b in range(BATCHES):
        buf.append(batch_rows(writer, b), f"writer-{writer}/batch-{b}")
        buf.append(batch_rows(99, 0), "shared-batch")  # every writer retries the same batch, concurrently


def test_concurrent_appends_lose_and_duplicate_nothing(tmp_path):
    root = str(tmp_path / "buf")
    ctx = mp.get_context("spawn")
    barrier = ctx.Barrier(WRITERS)
    procs = [ctx.Process(target=writer_process, args=(root, w, barrier)) for w in range(WRITERS)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    expected = [rows_to_table(batch_rows(w, b), f"writer-{w}/batch-{b}") for w in range(WRITERS)
                for b in range(BATCHES)] + [rows_to_table(batch_rows(99, 0), "shared-batch")]
    got = ReplayBuffer(root).read()
    assert got.num_rows == (WRITERS * BATCHES + 1) * ROWS
    assert pc.count_distinct(got["sample_id"]).as_py() == got.num_rows
    assert got.sort_by("sample_id").equals(pa.concat_tables(expected).sort_by("sample_id"))
    assert not [f for f in os.listdir(os.path.join(root, "samples")) if not f.endswith(".parquet")]


SLOW_WRITER = textwrap.dedent("""
    import sys, time
    import numpy as np
    import pyarrow.parquet as pq
    from bcoder_ray.buffer.synthetic import synthetic_rows
    from bcoder_ray.buffer import ReplayBuffer

    original = pq.ParquetWriter.write_table

    def write_half_then_stall(self, table, row_group_size=None):
        half = table.num_rows // 2
        original(self, table.slice(0, half), row_group_size=row_group_size)
        self.file_handle.flush() if getattr(self, "file_handle", None) else None
        print("HALF WRITTEN", flush=True)
        time.sleep(120)
        original(self, table.slice(half), row_group_size=row_group_size)

    pq.ParquetWriter.write_table = write_half_then_stall
    buf = ReplayBuffer(sys.argv[1], row_group_size=64)
    buf.append(synthetic_rows(np.random.default_rng(0), 2000, mean_tokens=30), "doomed-batch")
""")


def test_killed_writer_leaves_no_visible_partial_file(tmp_path):
    root = tmp_path / "buf"
    buf = ReplayBuffer(str(root))
    buf.append(synthetic_rows(np.random.default_rng(1), 40, mean_tokens=10), "survivor")
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen([sys.executable, "-c", SLOW_WRITER, str(root)], stdout=subprocess.PIPE, env=env,
                             text=True)
    try:
        assert child.stdout.readline().strip() == "HALF WRITTEN"
        partial = [p for p in (root / "samples").iterdir() if p.name.startswith("_tmp-")]
        assert len(partial) == 1 and partial[0].stat().st_size > 0  # bytes are on disk, under a hidden name
        os.kill(child.pid, signal.SIGKILL)
    finally:
        child.kill()
        child.wait(timeout=30)
    assert child.returncode == -signal.SIGKILL
    visible = sorted(p.name for p in (root / "samples").iterdir() if not p.name.startswith("_"))
    assert len(visible) == 1  # only the survivor
    reopened = ReplayBuffer(str(root))
    assert reopened.read().num_rows == 40
    assert pq.ParquetDataset(str(root / "samples")).read().num_rows == 40
    assert reopened.clean_tmp(older_than_s=3600) == 0  # a young temporary file may belong to a live writer
    assert reopened.clean_tmp(older_than_s=0) == 1
    assert [p.name for p in (root / "samples").iterdir()] == visible
    # the restarted actor redoes its batch, which now lands once
    assert reopened.append(synthetic_rows(np.random.default_rng(0), 2000, mean_tokens=30), "doomed-batch") == 2000
    assert reopened.append(synthetic_rows(np.random.default_rng(0), 2000, mean_tokens=30), "doomed-batch") == 0
