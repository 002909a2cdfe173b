"""One Ray Train loop for any algorithm's stage: each stage of an iteration is one `TorchTrainer` run.

    job = StageJob(algorithm="bcoder", algorithm_config=cfg.algorithm, context=ctx, plan=plan,
                   optim=cfg.stage("theta"), seed=3)
    dataset = buffer.ray_dataset(B, job.batches_needed(num_workers), rho_real=plan.rows.rho_real, ...)
    result = train_stage(job, dataset, ScalingSpec(num_workers=2, cpus_per_worker=0.5),
                         storage_path="s3://bucket/runs/r1/train", name="theta-iter1-a0",
                         tensorboard_dir=run_dir / "tensorboard" / "theta", reads_dir=run_dir / "reads" / "theta-iter1-a0")
    result.checkpoint_dir      # what the stage's `StageModule.save` wrote: s3://bucket/runs/r1/train/theta-iter1-a0/final

The job crosses to the workers as it is (Ray pickles it: the algorithm's typed config, the `RunContext`, the
`StagePlan`, the `StageConfig`). Each worker rebuilds the algorithm (`bcoder_ray.algorithms.make_algorithm`, after
importing the modules that register outside algorithms), builds the stage's `StageModule` (`Algorithm.build_stage`),
spreads it over the workers (`bcoder_ray.loop.sharding.distribute`: DDP over exactly its trainable parameters, or
FSDP), reads mini-batches from its shard of the buffer's Ray Data view (`ray.train.get_dataset_shard`), and
optimises with AdamW under the configured schedule, gradient accumulation, mixed precision and clipping. Metrics go
out with `ray.train.report` every `report_every` steps; the last report carries the checkpoint (rank 0 writes it)
and the whole metric history. Ray Train's storage is `storage_path`, a local path or a URI every node reaches (with
its pyarrow filesystem: `bcoder_ray.util.storage.resolve`), and the checkpoint comes back as a location of the same
kind. The workers write nothing else but, under prioritized replay (`StageJob.priority_table`), the generated
rows' |TD errors| into the buffer's priority side table (`PriorityRecorder`): the progress bar, live TensorBoard
scalars and the per-rank read counts go through a `bcoder_ray.loop.stage_channel.StageChannel` actor, and the
driver writes those files. Each rank also counts the policy-version lag of every generated row it reads (against
`StageJob.policy_version`, when the batches carry the `policy_version` column): `StageResult.lags`, and
`lag_mean` in the metric entries.

Every call gets its own Ray Train run name: a reused `RunConfig(name, storage_path)` would silently resume an
old run, so the driver names runs by stage, iteration and attempt.
"""

from __future__ import annotations

import collections
import copy
import io
import math
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any

import pyarrow as pa
import pyarrow.fs as pafs
import torch

from bcoder_ray.algorithms import make_algorithm
from bcoder_ray.algorithms.base import AlgorithmConfig, RunContext, StageModule, StagePlan
from bcoder_ray.config import StageConfig
from bcoder_ray.model.batch import collate
from bcoder_ray.buffer import ReplayBuffer, rows_from_batch
from bcoder_ray.buffer.priorities import PriorityTable
from bcoder_ray.buffer.staleness import LagCounts, PolicyVersion
from bcoder_ray.loop.metric_sinks import MetricSinks
from bcoder_ray.util.quiet import quiet_libraries, quiet_ray_logs
from bcoder_ray.util.storage import is_uri, join_uri, read_bytes, resolve, upload_dir, uri_of, write_bytes
from bcoder_ray.loop.sharding import (distribute, global_grad_norm, gradient_sync, is_sharded, portable_state,
                                 restore_state, saveable)
from bcoder_ray.loop.stage_channel import stage_channel
from bcoder_ray.model.tokenization import pad_id

CHECKPOINT_DIR_NAME = "final"
RESUME_FILE = "resume.pt"  # in a resumable checkpoint: trained parameters, optimiser, scheduler, RNG, step


@dataclass(frozen=True)
class StageJob:
    """Everything one stage's workers need (built by the driver; the workers receive the objects themselves)."""

    algorithm: str  # a registered algorithm's name
    algorithm_config: AlgorithmConfig  # its typed config
    context: RunContext
    plan: StagePlan  # the stage, bound to the algorithm's state (`Algorithm.prepare_stage`)
    optim: StageConfig  # the stage's optimiser settings (`stages.<name>`)
    imports: tuple[str, ...] = ()  # modules that register outside algorithms
    seed: int = 0
    progress: bool = True
    step_offset: int = 0  # the TensorBoard step of this stage's step 0 (stages of earlier iterations before it)
    policy_version: str = ""  # the current policy version, the generated rows' lags are counted from ("": none)
    priority_table: str | None = None
    """Prioritized replay: the buffer's priority table (`bcoder_ray.buffer.priorities`, the stage's name) that
    each worker writes its rows' |TD errors| to (`StageModule.row_td_errors`), at every report; None: nothing."""

    @property
    def steps(self) -> int:
        return self.optim.steps

    @property
    def stage(self) -> str:
        return self.plan.label or self.plan.name

    def batches_needed(self, num_workers: int) -> int:
        """Mini-batches the dataset must hold for `steps` optimiser steps on `num_workers` workers."""
        return self.steps * self.optim.grad_accum * max(1, num_workers)


@dataclass(frozen=True)
class ScalingSpec:
    num_workers: int = 1  # 0: Ray Train's local mode (the loop runs in the calling process; no DDP)
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # with use_gpu; 0: one GPU per worker
    max_failures: int = 1  # Ray Train restarts the worker group this many times on a worker failure


@dataclass
class StageResult:
    checkpoint_dir: str
    metrics: dict[str, Any]  # the last report
    history: list[dict[str, Any]] = field(default_factory=list)  # one entry per report (step, metrics...)
    wall_s: float = 0.0
    lags: LagCounts = field(default_factory=LagCounts)  # of the generated rows every rank read


# ------------------------------------------------------------------------------------------ worker side


def learning_rate_factor(step: int, steps: int, schedule: str, warmup_steps: int) -> float:
    """Multiplier of the peak lr at optimiser step `step` (0-based): linear warm-up, then constant or a linear
    decay to 0 at `steps` (the paper: φ constant, θ linear decay with no warm-up)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    if schedule == "linear":
        span = max(1, steps - warmup_steps)
        return max(0.0, 1.0 - (step - warmup_steps) / span)
    raise ValueError(f"unknown lr schedule {schedule!r}")


def _batches(shard, batch_size: int):
    """Endless pyarrow mini-batches from a dataset shard (a new epoch when one ends)."""
    while True:
        empty = True
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", prefetch_batches=1):
            empty = False
            yield batch
        if empty:
            raise RuntimeError("learner: the training dataset shard is empty (no buffer rows with targets?)")


class PriorityRecorder:
    """Collects the |TD error| of each generated row a worker trains on and writes them to the buffer's priority
    table (one small file per `flush`): the learner's own TD errors become the rows' priorities."""

    def __init__(self, table: PriorityTable, writer: str):
        self.table, self.writer = table, writer
        self.ids: list[str] = []
        self.values: list[float] = []

    def add(self, rows: pa.Table, td_errors: torch.Tensor | None, where: str) -> None:
        """`rows`: the batch as read (with sample_id and is_human); `td_errors`: [B], in the same order."""
        if td_errors is None:
            raise RuntimeError(f"{where}: prioritized replay needs per-row TD errors, and this stage's module "
                               f"returned none (StageModule.row_td_errors)")
        if "sample_id" not in rows.column_names:
            raise RuntimeError(f"{where}: prioritized replay needs the batches' sample_id column")
        generated = ~rows["is_human"].to_numpy(zero_copy_only=False)
        values = td_errors.detach().float().cpu().numpy()
        self.ids += [sid for sid, g in zip(rows["sample_id"].to_pylist(), generated) if g]
        self.values += values[generated].tolist()

    def flush(self, step: int) -> int:
        """Write what was collected (one file); the rows written."""
        written = self.table.write(self.ids, self.values, f"{self.writer}-step{step}")
        self.ids, self.values = [], []
        return written


class StageTrainer:
    """One stage's optimisation in this process: the `StageModule` spread over the workers (`distribute`), AdamW
    under the stage's schedule, mixed precision and clipping. `step(batches)` takes one optimiser step over
    `grad_accum` mini-batches drawn from `batches` (pyarrow tables) and counts the buffer rows it read. The
    per-stage Ray Train loop below and the persistent learner (`bcoder_ray.loop.learner_group`) both run it, so
    a stage's steps are the same code whichever learner runs them."""

    def __init__(self, job: StageJob, built: "BuiltStage", device: torch.device, pad: int, rank: int = 0):
        o = job.optim
        params = built.params
        self.job, self.stage, self.loss_module, self.params, self.device, self.pad = \
            job, built.stage, built.loss_module, params, device, pad
        self.token_columns = job.plan.rows.token_columns
        self.info_columns = tuple(c for c in job.plan.rows.extra_columns if c not in self.token_columns)
        self.optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.adam_betas))
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda s: learning_rate_factor(s, o.steps, o.schedule, o.warmup_steps))
        self.use_amp = o.mixed_precision != "no"
        self.amp_dtype = torch.bfloat16 if o.mixed_precision == "bf16" else torch.float16
        self.scaler = torch.amp.GradScaler("cuda") if o.mixed_precision == "fp16" else None
        self.resumable = [*params, self.optimizer, self.scheduler, self.scaler]
        self.reads: collections.Counter[str] = collections.Counter()  # off-policy reuse: reads of each buffer row
        self.current = PolicyVersion.parse(job.policy_version)
        self.lags, self.window_lags = LagCounts(), LagCounts()  # the stage's, and those since the last report
        self.recorder = None
        if job.priority_table is not None:
            if not job.context.buffer_uri:
                raise RuntimeError(f"stage {job.stage!r}: prioritized replay needs the run's buffer "
                                   f"(RunContext.buffer_uri is not set)")
            table = ReplayBuffer(job.context.buffer_uri, validate=False).priorities(job.priority_table)
            self.recorder = PriorityRecorder(table, f"{job.stage}-rank{rank}")

    def _next(self, batches) -> pa.Table:
        table = next(batches)
        if "sample_id" in table.column_names:
            self.reads.update(table["sample_id"].to_pylist())
        if self.current is not None and "policy_version" in table.column_names:
            self.window_lags.add(table["policy_version"].to_pylist(), table["is_human"].to_pylist(), self.current)
        return table

    def skip(self, batches, steps: int) -> None:
        """Consume the batches `steps` optimiser steps read (a resumed stage's data position)."""
        for _ in range(steps * self.job.optim.grad_accum):
            self._next(batches)
        self.lags, self.window_lags = self.lags.merge(self.window_lags), LagCounts()

    def report(self, entry: dict[str, float] | None, step: int) -> dict[str, float] | None:
        """At a report (`entry` not None): the lags read since the last one (`lag_mean`) and, under prioritized
        replay, the TD errors recorded since then written to the priority table."""
        if entry is None:
            return None
        if self.window_lags.rows:
            entry["lag_mean"] = self.window_lags.summary().mean
        self.lags, self.window_lags = self.lags.merge(self.window_lags), LagCounts()
        if self.recorder is not None:
            self.recorder.flush(step + 1)
        return entry

    def all_lags(self) -> LagCounts:
        """The lags of every generated row this trainer read."""
        return self.lags.merge(self.window_lags)

    def step(self, batches) -> dict[str, float]:
        """One optimiser step; its metrics averaged over the micro-batches, with grad_norm and lr."""
        o, scaler, optimizer = self.job.optim, self.scaler, self.optimizer
        step_metrics: dict[str, float] = {}
        for micro in range(o.grad_accum):
            table = self._next(batches)
            batch = collate(rows_from_batch(table), self.pad, token_columns=self.token_columns,
                            info_columns=self.info_columns).to(self.device)
            with gradient_sync(self.loss_module, sync=micro == o.grad_accum - 1):
                with torch.autocast(device_type=self.device.type, dtype=self.amp_dtype, enabled=self.use_amp):
                    loss, metrics = self.loss_module(batch)
                if self.recorder is not None:
                    self.recorder.add(table, self.stage.row_td_errors(),
                                      f"stage {self.job.stage!r} ({self.job.algorithm})")
                loss = loss / o.grad_accum
                (scaler.scale(loss) if scaler else loss).backward()
            for k, v in metrics.items():
                step_metrics[k] = step_metrics.get(k, 0.0) + v / o.grad_accum
        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, o.grad_clip if o.grad_clip else math.inf)
        step_metrics["grad_norm"] = global_grad_norm(grad_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        step_metrics["lr"] = self.scheduler.get_last_lr()[0]
        self.scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        return step_metrics


class ReportWindow:
    """The metric entries of a stage's history: each optimiser step's metrics averaged over `report_every` steps,
    with steps/s and programs/s over the window."""

    def __init__(self, optim: StageConfig, world: int):
        self.optim, self.world = optim, world
        self.window: dict[str, float] = {}
        self.n = 0
        self.since = time.time()

    def add(self, step: int, metrics: dict[str, float]) -> dict[str, float] | None:
        """Add optimiser step `step`'s (0-based) metrics; the window's entry when a report is due, else None."""
        for k, v in metrics.items():
            self.window[k] = self.window.get(k, 0.0) + v
        self.n += 1
        o = self.optim
        if (step + 1) % o.report_every and step != o.steps - 1:
            return None
        now = time.time()
        elapsed = max(now - self.since, 1e-9)
        entry = {k: v / self.n for k, v in self.window.items()}
        entry.update(step=step + 1, steps_per_s=self.n / elapsed,
                     programs_per_s=self.n * o.grad_accum * o.batch_size_per_worker * self.world / elapsed)
        self.window, self.n, self.since = {}, 0, now
        return entry


@dataclass
class BuiltStage:
    """A stage's module on this worker, spread over the workers: what its steps call and what they train."""

    stage: StageModule
    loss_module: torch.nn.Module  # the stage itself, or its DDP wrapper
    params: list[torch.nn.Parameter]  # the trained parameters, in the order of `trainable_parameters()`


def build_stage_here(algorithm, job: StageJob, device: torch.device, *, in_ray_train: bool = True) -> BuiltStage:
    """The algorithm's `StageModule` for `job`, built with the global RNG seeded by `job.seed` and distributed
    (DDP or FSDP, `bcoder_ray.loop.sharding.distribute`). The caller seeds the RNG again before the first step
    (`torch.manual_seed(job.seed)`), so the steps draw the same random numbers whether the module was built
    now or kept by a persistent learner from an earlier stage."""
    torch.manual_seed(job.seed)
    stage = algorithm.build_stage(job.plan)
    stage.train()
    loss_module, params = distribute(stage, job.optim.parallel, device, in_ray_train=in_ray_train)
    return BuiltStage(stage, loss_module, params)


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's per-worker function: one stage, `steps` optimiser steps, then a checkpoint."""
    import ray.train
    import ray.train.torch

    entered = time.time()
    job: StageJob = config["job"]
    o = job.optim
    quiet_libraries()
    quiet_ray_logs()
    torch.set_num_threads(max(1, math.ceil(o.cpus_per_worker)))
    ctx = ray.train.get_context()
    world = ctx.get_world_size()
    device = ray.train.torch.get_device()
    tokenizer = job.context.load_tokenizer()
    algorithm = make_algorithm(job.algorithm, job.algorithm_config, job.context, job.imports)
    built = build_stage_here(algorithm, job, device)
    stage = built.stage
    torch.manual_seed(job.seed)
    trainer = StageTrainer(job, built, device, pad_id(tokenizer), rank=ctx.get_world_rank())
    resumable = trainer.resumable
    # a worker-group restart (Ray Train's max_failures) or a resumed run continues from the last checkpoint
    start_step, history = load_resume_state(ray.train.get_checkpoint(), job, resumable, device, stage)

    model_ready = time.time()
    batches = _batches(ray.train.get_dataset_shard("train"), o.batch_size_per_worker)
    channel = config["channel"]  # to the driver: steps and metric entries (rank 0), read counts (every rank)
    rank0 = ctx.get_world_rank() == 0
    trainer.skip(batches, start_step)  # the data position: the batches the steps before consumed
    window = ReportWindow(o, world)
    started = time.time()
    for step in range(start_step, o.steps):
        entry = trainer.report(window.add(step, trainer.step(batches)), step)
        if rank0:
            channel.set_steps.remote(step + 1)
        if entry is not None:
            history.append(entry)
            if rank0:  # live: the driver writes it to TensorBoard while the stage runs
                channel.add_entry.remote(entry)
        last = step == o.steps - 1
        if not last and o.checkpoint_every and (step + 1) % o.checkpoint_every == 0:
            report_resumable(rank0, job, step + 1, resumable, history, {**(history[-1] if history else {}),
                                                                         "stage": job.stage}, stage)
        elif not last and ((step + 1) % o.report_every == 0):
            ray.train.report({**history[-1], "stage": job.stage})
    if trainer.reads:
        ray.get(channel.add_reads.remote(ctx.get_world_rank(), dict(trainer.reads)))
    ray.get(channel.add_lags.remote(ctx.get_world_rank(), trainer.all_lags()))
    final = {**(history[-1] if history else {}), "stage": job.stage, "history": history,
             "train_s": time.time() - started, "model_setup_s": model_ready - entered,
             "worker_entered_at": entered}
    if config.get("local_checkpoint_dir"):  # Ray Train's local mode keeps no copy: save in place
        stage.save(config["local_checkpoint_dir"], tokenizer)
        ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(config["local_checkpoint_dir"]))
        return
    to_save = saveable(stage, rebuild=lambda: algorithm.build_stage(job.plan), rank0=rank0)  # every rank calls
    # a run resumed after its last report finds a finished stage
    state = gathered_resume_state(rank0, job, o.steps, resumable, history, stage) if o.checkpoint_every else None
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank0:
            to_save.save(tmp, tokenizer)
            if state is not None:
                write_resume_state(tmp, state)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(final, checkpoint=checkpoint, checkpoint_dir_name=CHECKPOINT_DIR_NAME)


def resume_state(job: StageJob, step: int, resumable: list, history: list[dict],
                 module: torch.nn.Module | None = None) -> dict:
    """What continuing the stage after optimiser step `step` needs: the trained parameters (in the order of
    `trainable_parameters()`), the optimiser's, scheduler's and grad scaler's states, the RNG states (every rank
    is seeded alike) and the metric history. The data position is `step` itself: each rank's shard yields the
    same batches in the same order on every attempt (the dataset is read in order, `DataConfig`). For an FSDP
    `module` the states are gathered whole (`bcoder_ray.loop.sharding.portable_state`): every rank must call."""
    rng = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    return {"stage": job.stage, "steps": job.steps, "step": step, "history": history, "rng": rng,
            "state": [None if x is None else portable_state(x, module) for x in resumable]}


def gathered_resume_state(rank0: bool, job: StageJob, step: int, resumable: list, history: list[dict],
                          module: torch.nn.Module) -> dict | None:
    """`resume_state` where rank 0 needs it to write a checkpoint: on rank 0, and on every rank of an FSDP
    `module` (gathering the shards is a collective); None on the other ranks."""
    return resume_state(job, step, resumable, history, module) if rank0 or is_sharded(module) else None


def write_resume_state(folder: str, state: dict) -> str:
    """`state` as <folder>/RESUME_FILE, a local path or a URI, whole or not at all (`write_bytes`); `folder`."""
    data = io.BytesIO()
    torch.save(state, data)
    write_bytes(join_uri(folder, RESUME_FILE), data.getvalue())
    return folder


def load_resume_state(checkpoint, job: StageJob, resumable: list, device,
                      module: torch.nn.Module | None = None) -> tuple[int, list[dict]]:
    """(the step to continue from, the metric history so far) from a checkpoint `resume_state` wrote, restoring
    `resumable` in place (an FSDP `module`'s shards from the whole tensors); (0, []) without one."""
    if checkpoint is None:
        return 0, []
    with checkpoint.as_directory() as folder:
        path = os.path.join(folder, RESUME_FILE)
        if not os.path.exists(path):
            raise RuntimeError(f"Ray Train run of stage {job.stage!r}: its checkpoint {checkpoint.path} has no "
                               f"{RESUME_FILE} (written by another version, or checkpoint_every was 0)")
        saved = torch.load(path, map_location="cpu", weights_only=False)
    return restore_resume_state(saved, f"{checkpoint.path}/{RESUME_FILE}", job, resumable, module)


def load_resume_folder(folder: str, job: StageJob, resumable: list,
                       module: torch.nn.Module | None = None) -> tuple[int, list[dict]]:
    """`load_resume_state` from a folder `write_resume_state` wrote (a local path or a URI): the persistent
    learner's resumable checkpoints."""
    path = join_uri(folder, RESUME_FILE)
    saved = torch.load(io.BytesIO(read_bytes(path)), map_location="cpu", weights_only=False)
    return restore_resume_state(saved, path, job, resumable, module)


def restore_resume_state(saved: dict, where: str, job: StageJob, resumable: list,
                         module: torch.nn.Module | None = None) -> tuple[int, list[dict]]:
    """Restore what `resume_state` saved (read from `where`) into `resumable` and the RNG; (step, history)."""
    if (saved["stage"], saved["steps"], len(saved["state"])) != (job.stage, job.steps, len(resumable)):
        raise RuntimeError(f"{where}: stage {saved['stage']!r} of {saved['steps']} steps "
                           f"with {len(saved['state'])} states; this is {job.stage!r} of {job.steps} steps with "
                           f"{len(resumable)}")
    for target, state in zip(resumable, saved["state"]):
        if target is not None:
            restore_state(target, state, module)
    torch.set_rng_state(saved["rng"]["cpu"])
    if saved["rng"]["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(saved["rng"]["cuda"])
    return int(saved["step"]), list(saved["history"])


def report_resumable(rank0: bool, job: StageJob, step: int, resumable: list, history: list[dict],
                     metrics: dict, module: torch.nn.Module) -> None:
    """Report a checkpoint the stage can continue from (gathered on every rank when sharded, rank 0 writes it;
    every rank reports)."""
    import ray.train

    state = gathered_resume_state(rank0, job, step, resumable, history, module)
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank0:
            write_resume_state(tmp, state)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step-{step:06d}")


# ------------------------------------------------------------------------------------------ driver side


def in_order_options():
    """Ray Data's execution options as they are, reading in order (`in_order_data_config`)."""
    from ray.data import DataContext

    # DataContext's options as they are, as `DataConfig.default_ingest_options()` would carry them over; not by
    # calling it, since it passes `exclude_resources` to ExecutionOptions, which warns (deprecated) even when
    # unset. A copy keeps them all (label_selector, its replacement, included) and sets none through the setter.
    options = copy.deepcopy(DataContext.get_current().execution_options)
    options.preserve_order = True
    return options


def in_order_data_config():
    """Ray Train's ingest defaults, read in order and split without regard to locality: each rank's shard yields
    the same batches in the same order on every attempt, so a resumed stage's data position is its step. (The
    batches are token ids, small beside a step's compute: locality saves little.)"""
    from ray.train import DataConfig

    return DataConfig(execution_options=in_order_options(), enable_shard_locality=False)


def in_order_shards(dataset, world: int) -> list:
    """`dataset` split into one in-order `DataIterator` per rank, as Ray Train's `in_order_data_config` splits
    it for its workers (the persistent learner's ranks read the same batches a per-stage run's would)."""
    dataset = dataset.copy(dataset)
    dataset.context.execution_options = in_order_options()
    return dataset.streaming_split(world, equal=True)


def train_stage(job: StageJob, dataset, scaling: ScalingSpec, *, storage_path: str, name: str,
                tensorboard_dir: str | os.PathLike | None = None,
                reads_dir: str | os.PathLike | None = None, resume: bool = False,
                sinks: MetricSinks | None = None) -> StageResult:
    """Run one stage as a `TorchTrainer` (run `name` under `storage_path`, a local path or a URI) and return its
    checkpoint's location (a URI when `storage_path` is one). The driver writes rank 0's metrics under
    `tensorboard_dir` (and to `sinks`: MLflow, W&B) while the stage runs and every rank's read counts under
    `reads_dir`. `name` must be new unless `resume`: then an interrupted run of that name continues from its last
    checkpoint (Ray Train restores it; `checkpoint_every` steps apart)."""
    import ray
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    fs, root = resolve(str(storage_path))
    run_root = f"{root}/{name}"
    if not resume and fs.get_file_info(run_root).type != pafs.FileType.NotFound:
        raise FileExistsError(f"Ray Train run {name!r} already exists under {storage_path}; it would be resumed")
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker or 1
    loop_config: dict[str, Any] = {"job": job}
    local_copy = None
    if scaling.num_workers == 0:  # Ray Train's local mode: the loop runs in this process, no worker group
        if is_uri(str(storage_path)):  # saved here, uploaded after the stage
            local_copy = tempfile.mkdtemp(prefix=f"bcoder-{name}-")
            loop_config["local_checkpoint_dir"] = os.path.join(local_copy, CHECKPOINT_DIR_NAME)
        else:
            loop_config["local_checkpoint_dir"] = os.path.join(run_root, CHECKPOINT_DIR_NAME)
        os.makedirs(loop_config["local_checkpoint_dir"], exist_ok=resume)
    started = time.time()
    with stage_channel(job.steps, f"train {job.stage}", progress=job.progress, tensorboard_dir=tensorboard_dir,
                       step_offset=job.step_offset, tag=job.stage, reads_dir=reads_dir, sinks=sinks) as channel:
        loop_config["channel"] = channel
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(name=name, storage_path=root, storage_filesystem=fs,
                                 failure_config=FailureConfig(max_failures=scaling.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=1),
                                 logging_config=LoggingConfig(log_level="WARNING")),
            datasets={"train": dataset},
            dataset_config=in_order_data_config(),
        )
        result = trainer.fit()
        lags = ray.get(channel.get_lags.remote())
    finished = time.time()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {name!r} finished without a checkpoint")
    checkpoint = uri_of(result.checkpoint.path, like=str(storage_path))
    if local_copy is not None:
        checkpoint = upload_dir(loop_config["local_checkpoint_dir"],
                                join_uri(str(storage_path), name, CHECKPOINT_DIR_NAME))
        shutil.rmtree(local_copy, ignore_errors=True)
    metrics = dict(result.metrics or {})
    history = metrics.pop("history", [])
    if "worker_entered_at" in metrics:  # how long Ray Train took to start the workers
        metrics["worker_start_s"] = metrics.pop("worker_entered_at") - started
    return StageResult(checkpoint_dir=checkpoint, metrics=metrics, history=history, wall_s=finished - started,
                       lags=lags)
