"""The persistent learner: Ray actors that keep a stage's processes and networks through the whole run
(`run.learner: persistent`, and always in `run.mode: async`), so a stage pays neither a worker group's start-up
nor, when it continues from the checkpoint it saved last, the loading of its networks.

    group = LearnerGroup("theta", ScalingSpec(num_workers=1, cpus_per_worker=1.0))
    result = group.run_stage(job, dataset, storage_path=run_storage + "/train", name="theta-iter0-ab12cd")
    # or step by step (the async loop):
    group.begin(job); group.train(10, SamplerSource(...)); path = group.save(folder)
    group.shutdown()

One group per stage name, `max(1, num_workers)` actors (`LearnerWorker`) with the stage's CPUs and GPUs
(`num_workers: 0`, Ray Train's local mode, becomes one actor that holds no Ray CPU, as the driver process held
none); more than one form a torch.distributed group (gloo, or nccl on GPUs) and train under DDP or FSDP as a
Ray Train worker group does. Each stage run builds a fresh AdamW and schedule over the module (as a per-stage
run does, so the two learners give the same parameters for the same seed and batches); the module itself is
kept when `Algorithm.resumes_from(plan)` names the checkpoint this group saved last (B-Coder's θ continuing,
SFT), and built again otherwise. The steps are `bcoder_ray.loop.learner.StageTrainer`'s, the per-stage loop's.

Batches come from a Ray Dataset split in order over the ranks (sync mode: the dataset a per-stage run reads) or
from a `SamplerSource`, a sampler over the buffer opened by the learner itself (async mode: the rows present
when it opens, new ones included). Rank 0 reports steps and metric entries through the stage's
`StageChannel`, every rank its read counts. Mid-stage checkpoints (`save_resumable`, `begin(job, resume_from)`:
the per-stage loop's resume state, the step being the data position) are taken by the async loop
(`checkpoint_every`), which rebuilds a group that lost a worker and continues it from the last one; a sync run
with this learner runs an interrupted stage again from its start.
"""

from __future__ import annotations

import math
import os
import shutil
import socket
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import torch

from bcoder_ray.algorithms import make_algorithm
from bcoder_ray.buffer.filters import Filters
from bcoder_ray.loop.learner import (CHECKPOINT_DIR_NAME, BuiltStage, ReportWindow, ScalingSpec, StageJob,
                                     StageResult, StageTrainer, _batches, build_stage_here, gathered_resume_state,
                                     in_order_shards, load_resume_folder, write_resume_state)
from bcoder_ray.loop.metric_sinks import MetricSinks
from bcoder_ray.loop.sharding import saveable
from bcoder_ray.loop.stage_channel import stage_channel
from bcoder_ray.loop.target_filling import TargetComputer, TargetJob, fill_targets_here
from bcoder_ray.model.tokenization import pad_id
from bcoder_ray.util.quiet import quiet_libraries, quiet_ray_logs
from bcoder_ray.util.storage import is_uri, join_uri, upload_dir


@dataclass(frozen=True)
class SamplerSource:
    """Mini-batches the learner draws from the buffer itself: a `MixedSampler` opened over the rows (with
    targets) present when it opens, each rank with a stream of its own (`seed`, rank)."""

    uri: str
    batch_size: int
    rho_real: float | None
    filters: Filters
    seed: int
    targets_fingerprint: str | None = None
    extra_columns: tuple[str, ...] = ()

    def open(self, rank: int, buffer: Any = None):
        """The rank's batches, from `buffer` (a `ReplayBuffer` at `uri` kept by the caller: its catalog validated
        the footers of the files it listed before, so this open reads only those added since) or a new one."""
        from bcoder_ray.buffer import ReplayBuffer

        return iter((buffer if buffer is not None else ReplayBuffer(self.uri)).sampler(
            self.batch_size, self.rho_real, self.filters, seed=self.seed * 1009 + rank,
            targets_fingerprint=self.targets_fingerprint, extra_columns=self.extra_columns))


@dataclass
class _Held:
    """What a worker keeps between stage runs: the module, and the checkpoint it last saved it to."""

    name: str
    optim: Any  # the StageConfig it was distributed under
    built: BuiltStage
    saved: str | None = None


class LearnerWorker:
    """One rank of a persistent learner (a Ray actor): a stage module kept across stage runs."""

    def __init__(self, rank: int, world: int, num_threads: int, use_gpu: bool, imports: tuple[str, ...] = ()):
        quiet_libraries()
        quiet_ray_logs()
        torch.set_num_threads(max(1, num_threads))
        self.rank, self.world, self.imports = rank, world, imports
        self.device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")  # Ray sets the visible GPU
        if use_gpu:
            torch.cuda.set_device(self.device)  # nccl's collectives and DDP use the current device
        self.held: _Held | None = None
        self.targets: tuple[TargetJob, TargetComputer] | None = None
        self.tokenizer = None
        self._buffer: Any = None  # the ReplayBuffer the chunks read and fill, kept: footers validated once a file

    def replay_buffer(self, uri: str) -> Any:
        """The replay buffer at `uri`, opened once: reopening it per chunk validated every file's footer again
        (about 0.3 ms of CPU a part file; a new sampler's first batch, ~1-2 ms a part read into its shuffle
        window, is paid either way: `bcoder_ray.loop.async_driver`)."""
        from bcoder_ray.buffer import ReplayBuffer

        if self._buffer is None or self._buffer.uri != uri:
            self._buffer = ReplayBuffer(uri)
        return self._buffer

    # -- the process group
    def address(self) -> tuple[str, int]:
        """This node's address and a free port (rank 0's: the group's rendezvous)."""
        import ray

        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
        return ray.util.get_node_ip_address(), port

    def join(self, host: str, port: int) -> None:
        backend = "nccl" if self.device.type == "cuda" else "gloo"
        torch.distributed.init_process_group(backend, init_method=f"tcp://{host}:{port}", rank=self.rank,
                                             world_size=self.world)

    # -- a stage run
    def begin(self, job: StageJob, resume_from: str | None = None) -> dict:
        """Bind `job`: keep the held module when the stage continues from the checkpoint it saved last, else
        build it; a fresh optimiser and schedule either way, or, with `resume_from` (a folder `save_resumable`
        wrote), the trained parameters, optimiser, schedule, RNG and step saved there. Returns {"kept",
        "setup_s", "step", "history"} (the step and metric history continued from)."""
        started = time.time()
        if self.tokenizer is None:
            self.tokenizer = job.context.load_tokenizer()
        algorithm = make_algorithm(job.algorithm, job.algorithm_config, job.context, job.imports)
        start, held = algorithm.resumes_from(job.plan), self.held
        kept = (held is not None and start is not None and start == held.saved and held.name == job.plan.name
                and held.optim == job.optim)
        if not kept:
            self.held = None  # the old networks go before the new ones are loaded
            self.held = _Held(job.plan.name, job.optim,
                              build_stage_here(algorithm, job, self.device, in_ray_train=False))
        self.algorithm, self.job = algorithm, job
        torch.manual_seed(job.seed)  # as the per-stage loop seeds after its build
        self.trainer = StageTrainer(job, self.held.built, self.device, pad_id(self.tokenizer), rank=self.rank)
        self.window = ReportWindow(job.optim, self.world)
        self.step, self.history, self.batches = 0, [], None
        if resume_from is not None:  # every rank: an FSDP module takes its own shards back
            self.step, self.history = load_resume_folder(resume_from, job, self.trainer.resumable,
                                                         self.held.built.stage)
            self.held.saved = None  # its parameters are no checkpoint's any more
        return {"kept": kept, "setup_s": time.time() - started, "step": self.step, "history": list(self.history)}

    def train(self, steps: int, data: Any = None, channel: Any = None) -> dict:
        """`steps` optimiser steps of the bound stage, from `data` when given (a `DataIterator`, or a
        `SamplerSource` opened now), else from the batches it read last. Returns the new history entries."""
        if data is not None:
            self.batches = (data.open(self.rank, self.replay_buffer(data.uri)) if isinstance(data, SamplerSource)
                            else _batches(data, self.job.optim.batch_size_per_worker))
        if self.window.n == 0:
            self.window.since = time.time()  # rates over the steps, not over the waits between calls
        started, entries = time.time(), []
        rank0 = self.rank == 0
        for step in range(self.step, self.step + steps):
            entry = self.trainer.report(self.window.add(step, self.trainer.step(self.batches)), step)
            if rank0 and channel is not None:
                channel.set_steps.remote(step + 1)
            if entry is not None:
                entries.append(entry)
                if rank0 and channel is not None:
                    channel.add_entry.remote(entry)
        self.step += steps
        self.history += entries
        return {"step": self.step, "entries": entries, "train_s": time.time() - started}

    def save_resumable(self, folder: str) -> str | None:
        """A checkpoint the bound stage can continue from at its current step (`begin(job, resume_from=folder)`):
        the per-stage loop's `resume_state`, written under `folder` (a local path or a URI) by rank 0, whole or
        not at all; every rank calls (FSDP gathers). The data position is the step: the caller opens its next
        batches from it (async mode: a `SamplerSource` seeded by the step)."""
        state = gathered_resume_state(self.rank == 0, self.job, self.step, self.trainer.resumable, self.history,
                                      self.held.built.stage)
        return write_resume_state(folder, state) if self.rank == 0 else None

    def save(self, folder: str, channel: Any = None) -> str | None:
        """Write the stage's checkpoint to `folder` (a local path or a URI; rank 0) and send every rank's read
        counts through `channel`; the held module remembers `folder` (its next stage may continue from it)."""
        import ray

        if channel is not None and self.trainer.reads:  # (a save without a channel keeps counting)
            ray.get(channel.add_reads.remote(self.rank, dict(self.trainer.reads)))
            self.trainer.reads.clear()
        if channel is not None:  # the lags of every generated row read since the stage began
            ray.get(channel.add_lags.remote(self.rank, self.trainer.all_lags()))
        to_save = saveable(self.held.built.stage, rebuild=lambda: self.algorithm.build_stage(self.job.plan),
                           rank0=self.rank == 0)  # FSDP: every rank gathers
        self.held.saved = folder
        if self.rank != 0:
            return None
        if is_uri(folder):
            local = tempfile.mkdtemp(prefix="bcoder-learner-")
            try:
                to_save.save(local, self.tokenizer)
                return upload_dir(local, folder)
            finally:
                shutil.rmtree(local, ignore_errors=True)
        os.makedirs(folder, exist_ok=True)
        to_save.save(folder, self.tokenizer)
        return folder

    def fill_targets(self, job: TargetJob) -> int:
        """The cached targets of the rows lacking them, computed here (rank 0 in async mode; the computer's
        frozen networks are loaded once per targets plan)."""
        if self.targets is None or self.targets[0] != job:
            self.targets = None
            self.targets = (job, TargetComputer(job))
        return fill_targets_here(self.replay_buffer(job.algorithm.context.buffer_uri), job, self.targets[1])


class LearnerGroup:
    """The driver's handle on one stage name's persistent learner (`LearnerWorker` actors)."""

    def __init__(self, stage: str, scaling: ScalingSpec, imports: tuple[str, ...] = ()):
        import ray

        self.stage, self.scaling = stage, scaling
        world = max(1, scaling.num_workers)
        # local mode (0 workers) held no Ray resources (the loop ran in the driver): neither does its actor
        cpus = scaling.cpus_per_worker if scaling.num_workers else 0
        gpus = (scaling.gpus_per_worker or 1) if scaling.use_gpu else 0
        threads = max(1, math.ceil(scaling.cpus_per_worker))
        remote = ray.remote(LearnerWorker).options(num_cpus=cpus, num_gpus=gpus, max_restarts=0)
        self.workers = [remote.remote(rank, world, threads, scaling.use_gpu, imports) for rank in range(world)]
        if world > 1:
            host, port = ray.get(self.workers[0].address.remote())
            ray.get([w.join.remote(host, port) for w in self.workers])

    @property
    def world(self) -> int:
        return len(self.workers)

    def begin_async(self, job: StageJob, resume_from: str | None = None) -> list:
        """Bind `job` on every rank (continued from `resume_from`, a `save_resumable` folder, when given); the refs
        (rank 0's first) of their {"kept", "setup_s", "step", "history"}."""
        return [w.begin.remote(job, resume_from) for w in self.workers]

    def save_resumable_async(self, folder: str) -> list:
        """A checkpoint the stage continues from (`LearnerWorker.save_resumable`); rank 0's ref first."""
        return [w.save_resumable.remote(folder) for w in self.workers]

    def begin(self, job: StageJob) -> dict:
        import ray

        return ray.get(self.begin_async(job))[0]

    def train_async(self, steps: int, data: Any = None, channel: Any = None) -> list:
        """Start `steps` optimiser steps on every rank; the object refs (rank 0's first) to wait on. `data`: a
        `SamplerSource`, or a Ray Dataset (split in order over the ranks)."""
        if data is not None and not isinstance(data, SamplerSource):
            shards = in_order_shards(data, self.world)
            return [w.train.remote(steps, s, channel) for w, s in zip(self.workers, shards)]
        return [w.train.remote(steps, data, channel) for w in self.workers]

    def train(self, steps: int, data: Any = None, channel: Any = None) -> dict:
        import ray

        return ray.get(self.train_async(steps, data, channel))[0]

    def save_async(self, folder: str, channel: Any = None) -> list:
        return [w.save.remote(folder, channel) for w in self.workers]

    def save(self, folder: str, channel: Any = None) -> str:
        import ray

        return ray.get(self.save_async(folder, channel))[0]

    def fill_targets_async(self, job: TargetJob) -> list:
        return [self.workers[0].fill_targets.remote(job)]

    def run_stage(self, job: StageJob, dataset, *, storage_path: str, name: str,
                  tensorboard_dir: str | os.PathLike | None = None, reads_dir: str | os.PathLike | None = None,
                  sinks: MetricSinks | None = None) -> StageResult:
        """One whole stage, as `bcoder_ray.loop.learner.train_stage` runs it (the same dataset, channel, files and
        result; the checkpoint at <storage_path>/<name>/final), on this group's kept processes."""
        import ray

        started = time.time()
        with stage_channel(job.steps, f"train {job.stage}", progress=job.progress, tensorboard_dir=tensorboard_dir,
                           step_offset=job.step_offset, tag=job.stage, reads_dir=reads_dir, sinks=sinks) as channel:
            info = self.begin(job)
            out = self.train(job.steps, dataset, channel)
            checkpoint = self.save(join_uri(str(storage_path), name, CHECKPOINT_DIR_NAME), channel)
            lags = ray.get(channel.get_lags.remote())
        history = out["entries"]
        metrics = {**(history[-1] if history else {}), "stage": job.stage, "train_s": out["train_s"],
                   "model_setup_s": info["setup_s"], "model_kept": float(info["kept"])}
        return StageResult(checkpoint_dir=checkpoint, metrics=metrics, history=history,
                           wall_s=time.time() - started, lags=lags)

    def shutdown(self) -> None:
        import ray

        for w in self.workers:
            ray.kill(w)
        self.workers = []
