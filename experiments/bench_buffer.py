"""Replay-buffer benchmark: append rows/s, ρ_real-mixed sampling rows/s, peak RSS while sampling.

A synthetic buffer of `--rows` programs (default 1M) of realistic length (bcoder_ray.buffer.synthetic: ~250
tokens on average, at most 512 as in Appendix H, ~4 characters of text per token), appended in actor batches of
`--batch-rows` rows, 5% of them human, each batch's per-token cached targets (target_actions, A_ckpt, V_φ) then
written as a sidecar (`write_targets`, not counted in the append rate).
Sampling (ρ_real = 0.5, batch 256, prompts and targets joined) is measured in a fresh subprocess at two buffer
sizes (after `--small` rows, and after all rows), with that subprocess's peak RSS. A plain
`pyarrow.parquet.write_table` (default options) of a quarter of the same batches is timed alongside as the
reference. Rates are wall-clock (the CPU may be shared: the load average is printed), with rows per CPU-second
of the measuring process alongside (less sensitive to other load). Everything is written to a temporary
directory that is deleted at the end.

    python experiments/bench_buffer.py            # 1M rows; last line: sample_rows_per_s: X
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import resource
import shutil
import sys
import tempfile
import time

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from bcoder_ray.buffer import ReplayBuffer, part_name, rows_from_batch  # noqa: E402
from bcoder_ray.buffer.schema import sample_ids  # noqa: E402
from bcoder_ray.buffer.synthetic import synthetic_prompts, synthetic_rows, synthetic_targets  # noqa: E402

N_PROBLEMS = 5000  # APPS train has 5000 problems
FINGERPRINT = "bench-ckpt"


def _sample_worker(root: str, rows: int, batch_size: int, out: mp.Queue) -> None:
    buffer = ReplayBuffer(root)
    it = iter(buffer.sampler(batch_size, rho_real=0.5, seed=1, targets_fingerprint=FINGERPRINT))
    for _ in range(8):  # warm-up: first windows, prompt table
        next(it)
    done = human = 0
    t0, c0 = time.perf_counter(), time.process_time()
    while done < rows:
        b = next(it)
        done += b.num_rows
        human += sum(b["is_human"].to_pylist())
    seconds, cpu_seconds = time.perf_counter() - t0, time.process_time() - c0
    converted, t1 = 0, time.perf_counter()
    while converted < rows // 10:
        converted += len(rows_from_batch(next(it)))
    out.put({"rows": done, "seconds": seconds, "cpu_seconds": cpu_seconds, "human_fraction": human / done,
             "dict_rows_per_s": converted / (time.perf_counter() - t1),
             "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def measure_sampling(root: str, rows: int, batch_size: int) -> dict:
    ctx = mp.get_context("spawn")
    q = ctx.Queue()
    p = ctx.Process(target=_sample_worker, args=(root, rows, batch_size, q))
    p.start()
    res = q.get()
    p.join()
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=1_000_000)
    ap.add_argument("--small", type=int, default=250_000, help="buffer size of the first sampling measurement")
    ap.add_argument("--batch-rows", type=int, default=4096, help="rows per append (one actor batch, one file)")
    ap.add_argument("--sample-rows", type=int, default=200_000, help="rows sampled per measurement")
    ap.add_argument("--sample-batch", type=int, default=256)
    ap.add_argument("--dir", default=None, help="parent of the temporary buffer directory")
    args = ap.parse_args()

    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix="bench_buffer_", dir=args.dir)
    try:
        root = os.path.join(tmp, "buffer")
        plain = os.path.join(tmp, "plain.parquet")
        buffer = ReplayBuffer(root)
        rng = np.random.default_rng(0)
        buffer.put_prompts(synthetic_prompts(rng, N_PROBLEMS))
        n_batches = -(-args.rows // args.batch_rows)
        small = -(-args.small // args.batch_rows) * args.batch_rows
        append_s = append_cpu_s = plain_s = 0.0
        written, plain_rows, sampling = 0, 0, []
        print(f"buffer {root}: {args.rows} rows in batches of {args.batch_rows}; {os.cpu_count()} CPUs "
              f"(shared), load average {os.getloadavg()[0]:.1f}", flush=True)
        for b in range(n_batches):
            n = min(args.batch_rows, args.rows - written)
            table = synthetic_rows(rng, n, start=written, iteration=b * 8 // n_batches, n_problems=N_PROBLEMS,
                                   source="human" if b % 20 == 0 else "generated")
            t0, c0 = time.perf_counter(), time.process_time()
            buffer.append(table, batch_key=f"bench/{b}")
            append_s += time.perf_counter() - t0
            append_cpu_s += time.process_time() - c0
            targets = synthetic_targets(rng, table["program_ids"])  # rows are in batch order in their file
            for name, col in (("sample_file", pa.array([part_name(f"bench/{b}")] * n)),
                              ("row_index", pa.array(np.arange(n, dtype=np.int64))),
                              ("sample_id", sample_ids(f"bench/{b}", table))):
                targets = targets.append_column(name, col)
            buffer.write_targets(targets, FINGERPRINT, batch_key=f"bench-targets/{b}")
            if b % 4 == 0:
                t0 = time.perf_counter()
                pq.write_table(table, plain)
                plain_s += time.perf_counter() - t0
                plain_rows += n
            written += n
            if written == small or b == n_batches - 1:
                res = measure_sampling(root, args.sample_rows, args.sample_batch)
                res["buffer_rows"] = written
                sampling.append(res)
                print(f"  buffer of {written} rows: sampling {res['rows'] / res['seconds']:.0f} rows/s "
                      f"({res['rows'] / res['cpu_seconds']:.0f} rows per CPU-second) "
                      f"(human fraction {res['human_fraction']:.3f}); as collate dicts "
                      f"{res['dict_rows_per_s']:.0f} rows/s; peak RSS {res['peak_rss_mib']:.0f} MiB; "
                      f"load average {os.getloadavg()[0]:.1f}", flush=True)
        keys = buffer.read(columns=["program_hash", "tests_hash"], filters={"iterations": (0, 0)}).slice(0, 1000)
        t0 = time.perf_counter()
        found = buffer.lookup_results(zip(keys["program_hash"].to_pylist(), keys["tests_hash"].to_pylist()))
        lookup_s = time.perf_counter() - t0
        assert len(found) == keys.num_rows
        size = sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(root) for f in fs)
        print(f"on disk: {size / 2**30:.2f} GiB for {written} rows ({size / written:.0f} B/row)")
        print(f"lookup_results of {keys.num_rows} keys in a {written}-row buffer: {lookup_s:.2f} s")
        print(f"append_rows_per_s: {written / append_s:.0f} ({written / append_cpu_s:.0f} rows per CPU-second)")
        print(f"plain_pyarrow_write_rows_per_s: {plain_rows / plain_s:.0f} (reference: same batches, default options)")
        for res in sampling:
            print(f"peak_rss_mib_while_sampling[{res['buffer_rows']} rows]: {res['peak_rss_mib']:.0f}")
        print(f"sample_rows_per_s: {sampling[-1]['rows'] / sampling[-1]['seconds']:.0f}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
