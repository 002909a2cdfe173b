"""What a learning stage's workers send the driver while the stage runs, and the files the driver writes from it.

    with stage_channel(job.steps, "train theta", progress=True, tensorboard_dir=run_dir / "tensorboard/theta",
                       step_offset=0, tag="theta", reads_dir=run_dir / "reads/theta-iter0-ab12cd") as channel:
        ...   # the workers call channel.set_steps / add_entry (rank 0) and add_reads (every rank)

The workers may run on any node of a cluster, so they write nothing into the driver's run folder: rank 0 sends its
optimiser steps (the progress bar) and its metric entries (TensorBoard, live: the driver's thread writes them
every second while the stage trains), and every rank sends, at its end, how often it read each buffer row
(`reads/<stage run>/reads-rank<r>.json`, what `bcoder_ray.evaluation.reuse` sums) and the policy-version lags of
the generated rows it read (`bcoder_ray.buffer.staleness.LagCounts`; the driver sums the ranks' with `lags`). The channel is a Ray actor with no CPU;
the driver kills it when the stage ends.
"""

from __future__ import annotations

import collections
import contextlib
import json
import os
import sys
import threading
from pathlib import Path
from typing import Iterator

from bcoder_ray.buffer.staleness import LagCounts
from bcoder_ray.util.atomic import atomic_write_text
from bcoder_ray.loop.metric_sinks import MetricSinks

READS_FILE = "reads-rank{rank}.json"  # {sample_id: reads}: the buffer rows one rank's optimiser steps consumed


class StageChannel:
    """The actor: rank 0's step count and metric entries, every rank's read counts and lags."""

    def __init__(self) -> None:
        self.steps = 0
        self.entries: list[dict] = []
        self.reads: dict[int, dict[str, int]] = {}
        self.lags: dict[int, LagCounts] = {}

    def set_steps(self, steps: int) -> None:
        self.steps = steps

    def add_entry(self, entry: dict) -> None:
        self.entries.append(entry)

    def add_reads(self, rank: int, reads: dict[str, int]) -> None:
        self.reads[rank] = reads  # a rank restarted by Ray Train replaces what its failed attempt sent

    def add_lags(self, rank: int, lags: LagCounts) -> None:
        self.lags[rank] = lags  # as add_reads: a restarted rank's count replaces its failed attempt's

    def get_lags(self) -> LagCounts:
        """The lags of every rank's reads, summed."""
        return LagCounts().merge(*self.lags.values())

    def drain(self) -> tuple[int, list[dict]]:
        """The step count and the entries sent since the last drain."""
        entries, self.entries = self.entries, []
        return self.steps, entries

    def get_reads(self) -> dict[int, dict[str, int]]:
        return self.reads


def write_reads(path: str | Path, reads: collections.Counter | dict[str, int]) -> None:
    atomic_write_text(Path(path), json.dumps(dict(sorted(reads.items()))))


@contextlib.contextmanager
def stage_channel(total_steps: int, desc: str, *, progress: bool, tensorboard_dir: str | Path | None = None,
                  step_offset: int = 0, tag: str = "", reads_dir: str | Path | None = None,
                  sinks: MetricSinks | None = None) -> Iterator:
    """Yield a `StageChannel` actor handle for the workers while a thread draws the progress bar and writes the
    entries as TensorBoard scalars (`<tag>/<metric>` at step `step_offset + step`) and to `sinks` (MLflow, W&B);
    at the end write the read counts under `reads_dir`."""
    import ray

    channel = ray.remote(num_cpus=0)(StageChannel).remote()
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=total_steps, desc=desc, file=sys.stderr, leave=False)
    writer = None
    if tensorboard_dir is not None:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(str(tensorboard_dir))
    stop = threading.Event()

    def refresh() -> None:
        try:
            steps, entries = ray.get(channel.drain.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - a missed refresh is retried on the next one
            return
        if bar is not None and steps != bar.n:
            bar.update(steps - bar.n)
        for entry in entries:
            step = step_offset + int(entry["step"])
            metrics = {k: v for k, v in entry.items() if k != "step"}
            if writer is not None:
                for key, value in metrics.items():
                    writer.add_scalar(f"{tag}/{key}", float(value), step)
            if sinks:
                sinks.log(tag, metrics, step)
        if writer is not None and entries:
            writer.flush()

    def poll() -> None:
        while not stop.wait(1.0):
            refresh()

    thread = threading.Thread(target=poll, name=f"stage-channel-{desc}", daemon=True)
    thread.start()
    try:
        yield channel
        if reads_dir is not None:
            for rank, reads in ray.get(channel.get_reads.remote()).items():
                write_reads(os.path.join(reads_dir, READS_FILE.format(rank=rank)), reads)
    finally:
        stop.set()
        thread.join()
        refresh()  # the last count and entries, so a finished stage ends its bar at its total
        if bar is not None:
            bar.refresh()  # drawn even when the last update came within tqdm's minimum interval
            bar.close()
        if writer is not None:
            writer.close()
        ray.kill(channel)
