"""One Ray Train loop for any algorithm's stage: each stage of an iteration is one `TorchTrainer` run.

    job = StageJob(algorithm="bcoder", algorithm_config=cfg.algorithm.model_dump(), context=asdict(ctx),
                   plan=asdict(plan), optim=cfg.stage("theta").model_dump(), seed=3)
    dataset = buffer.ray_dataset(B, job.batches_needed(num_workers), rho_real=plan.rows.rho_real, ...)
    result = train_stage(job, dataset, ScalingSpec(num_workers=2, cpus_per_worker=0.5),
                         storage_path=run_dir / "train", name="theta-iter1-a0")
    result.checkpoint_dir      # what the stage's `StageModule.save` wrote

Each worker rebuilds the algorithm from plain data (`bcoder_ray.algorithms.make_algorithm`, after importing the
modules that register outside algorithms), builds the stage's `StageModule` (`Algorithm.build_stage`), wraps it
with `ray.train.torch.prepare_model` (DDP over exactly its trainable parameters), reads mini-batches from its
shard of the buffer's Ray Data view (`ray.train.get_dataset_shard`), and optimises with AdamW under the
configured schedule, gradient accumulation, mixed precision and clipping. Metrics go out with
`ray.train.report` every `report_every` steps; the last report carries the checkpoint (rank 0 writes it) and the
whole metric history, which the driver turns into TensorBoard scalars.

Every call gets its own Ray Train run name: a reused `RunConfig(name, storage_path)` would silently resume an
old run, so the driver names runs by stage, iteration and attempt.
"""

from __future__ import annotations

import collections
import contextlib
import json
import math
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from types import SimpleNamespace
from typing import Any

import torch

from bcoder_ray.algorithms import make_algorithm
from bcoder_ray.algorithms.base import Rows, StagePlan, TargetsPlan
from bcoder_ray.batch import collate
from bcoder_ray.buffer import rows_from_batch
from bcoder_ray.io import atomic_write_text
from bcoder_ray.quiet import quiet_libraries, quiet_ray_logs
from bcoder_ray.tokenization import load_tokenizer, pad_id

CHECKPOINT_DIR_NAME = "final"
READS_FILE = "reads-rank{rank}.json"  # {sample_id: reads}: the buffer rows one rank's optimiser steps consumed


@dataclass(frozen=True)
class StageJob:
    """Everything one stage's workers need (plain data, built by the driver)."""

    algorithm: str  # a registered algorithm's name
    algorithm_config: dict  # its config (AlgorithmConfig.model_dump())
    context: dict  # RunContext fields
    plan: dict  # the StagePlan (dataclasses.asdict)
    optim: dict  # StageConfig fields
    imports: tuple[str, ...] = ()  # modules that register outside algorithms
    seed: int = 0
    progress: bool = True
    tensorboard_dir: str | None = None  # rank 0 streams its metrics there while the stage runs
    step_offset: int = 0  # the TensorBoard step of this stage's step 0 (stages of earlier iterations before it)
    reads_dir: str | None = None  # each rank writes there how often it read each buffer row (READS_FILE)

    @property
    def steps(self) -> int:
        return int(self.optim["steps"])

    @property
    def stage(self) -> str:
        return self.plan.get("label") or self.plan["name"]

    def batches_needed(self, num_workers: int) -> int:
        """Mini-batches the dataset must hold for `steps` optimiser steps on `num_workers` workers."""
        return self.steps * int(self.optim["grad_accum"]) * max(1, num_workers)


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


def plan_from_dict(data: dict) -> StagePlan:
    """A `StagePlan` back from `dataclasses.asdict` (what crossed to the workers)."""
    rows = Rows(**{**data["rows"], "filters": dict(data["rows"]["filters"]),
                   "extra_columns": tuple(data["rows"]["extra_columns"]),
                   "token_columns": tuple(data["rows"]["token_columns"])})
    targets = None
    if data.get("targets"):
        t = data["targets"]
        targets = TargetsPlan(t["fingerprint"], tuple(t["columns"]), dict(t["spec"]),
                              Rows(**{**t["rows"], "extra_columns": tuple(t["rows"]["extra_columns"]),
                                      "token_columns": tuple(t["rows"]["token_columns"])}))
    return StagePlan(data["name"], rows, targets, dict(data["spec"]), data.get("label", ""))


def _batches(shard, batch_size: int):
    """Endless pyarrow mini-batches from a dataset shard (a new epoch when one ends)."""
    while True:
        empty = True
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", prefetch_batches=1):
            empty = False
            yield batch
        if empty:
            raise RuntimeError("learner: the training dataset shard is empty (no buffer rows with targets?)")


def write_reads(path: str, reads: collections.Counter) -> None:
    atomic_write_text(path, json.dumps(dict(sorted(reads.items()))))


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's per-worker function: one stage, `steps` optimiser steps, then a checkpoint."""
    import ray.train
    import ray.train.torch

    entered = time.time()
    job = StageJob(**config["job"])
    o = SimpleNamespace(**job.optim)
    quiet_libraries()
    quiet_ray_logs()
    torch.set_num_threads(max(1, math.ceil(o.cpus_per_worker)))
    torch.manual_seed(job.seed)
    ctx = ray.train.get_context()
    world = ctx.get_world_size()
    device = ray.train.torch.get_device()
    algorithm = make_algorithm(job.algorithm, job.algorithm_config, job.context, job.imports)
    plan = plan_from_dict(job.plan)
    tokenizer = load_tokenizer(algorithm.ctx.tokenizer_path)
    pad = pad_id(tokenizer)
    token_columns = plan.rows.token_columns
    info_columns = tuple(c for c in plan.rows.extra_columns if c not in token_columns)

    stage = algorithm.build_stage(plan)
    params = stage.trainable_parameters()
    stage.train()
    loss_module = ray.train.torch.prepare_model(stage)
    optimizer = torch.optim.AdamW(params, lr=o.lr, weight_decay=o.weight_decay, betas=tuple(o.adam_betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: learning_rate_factor(s, o.steps, o.schedule, o.warmup_steps))
    use_amp = o.mixed_precision != "no"
    amp_dtype = torch.bfloat16 if o.mixed_precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if o.mixed_precision == "fp16" else None

    model_ready = time.time()
    batches = _batches(ray.train.get_dataset_shard("train"), o.batch_size_per_worker)
    progress = config.get("progress_counter") if ctx.get_world_rank() == 0 else None  # the driver draws the bar
    writer = None
    if job.tensorboard_dir and ctx.get_world_rank() == 0:
        from torch.utils.tensorboard import SummaryWriter

        writer = SummaryWriter(job.tensorboard_dir)
    reads: collections.Counter[str] = collections.Counter()  # off-policy reuse: reads of each buffer row
    history: list[dict] = []
    window: dict[str, float] = {}
    n_window = 0
    started = last_report = time.time()
    for step in range(o.steps):
        step_metrics: dict[str, float] = {}
        for micro in range(o.grad_accum):
            table = next(batches)
            if "sample_id" in table.column_names:
                reads.update(table["sample_id"].to_pylist())
            batch = collate(rows_from_batch(table), pad, token_columns=token_columns,
                            info_columns=info_columns).to(device)
            sync = micro == o.grad_accum - 1 or not hasattr(loss_module, "no_sync")
            with (contextlib.nullcontext() if sync else loss_module.no_sync()), \
                    torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
                loss, metrics = loss_module(batch)
            loss = loss / o.grad_accum
            (scaler.scale(loss) if scaler else loss).backward()
            for k, v in metrics.items():
                step_metrics[k] = step_metrics.get(k, 0.0) + v / o.grad_accum
        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, o.grad_clip if o.grad_clip else math.inf)
        step_metrics["grad_norm"] = float(grad_norm)
        if scaler:
            scaler.step(optimizer)
            scaler.update()
        else:
            optimizer.step()
        step_metrics["lr"] = scheduler.get_last_lr()[0]
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        for k, v in step_metrics.items():
            window[k] = window.get(k, 0.0) + v
        n_window += 1
        if progress is not None:
            progress.set.remote(step + 1)
        last = step == o.steps - 1
        if (step + 1) % o.report_every == 0 or last:
            now = time.time()
            entry = {k: v / n_window for k, v in window.items()}
            entry.update(step=step + 1, steps_per_s=n_window / max(now - last_report, 1e-9),
                         programs_per_s=n_window * o.grad_accum * o.batch_size_per_worker * world
                         / max(now - last_report, 1e-9))
            history.append(entry)
            if writer is not None:  # live: visible in TensorBoard while the stage runs
                for k, v in entry.items():
                    if k != "step":
                        writer.add_scalar(f"{job.stage}/{k}", float(v), job.step_offset + step + 1)
                writer.flush()
            window, n_window, last_report = {}, 0, now
            if not last:
                ray.train.report({**entry, "stage": job.stage})
    if writer is not None:
        writer.close()
    if job.reads_dir and reads:
        write_reads(os.path.join(job.reads_dir, READS_FILE.format(rank=ctx.get_world_rank())), reads)
    final = {**(history[-1] if history else {}), "stage": job.stage, "history": history,
             "train_s": time.time() - started, "model_setup_s": model_ready - entered,
             "worker_entered_at": entered}
    if config.get("local_checkpoint_dir"):  # Ray Train's local mode keeps no copy: save in place
        stage.save(config["local_checkpoint_dir"], tokenizer)
        ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(config["local_checkpoint_dir"]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if ctx.get_world_rank() == 0:
            stage.save(tmp, tokenizer)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(final, checkpoint=checkpoint, checkpoint_dir_name=CHECKPOINT_DIR_NAME)


# ------------------------------------------------------------------------------------------ driver side


class StepCounter:
    """Rank 0's optimiser steps, for the driver's progress bar (a Ray actor with no CPU). The bar is drawn by the
    driver from this count: bars drawn from worker log lines outlive workers that Ray Train stops."""

    def __init__(self) -> None:
        self.steps = 0

    def set(self, steps: int) -> None:
        self.steps = steps

    def get(self) -> int:
        return self.steps


@contextlib.contextmanager
def driver_progress_bar(total: int, desc: str, enabled: bool):
    """Yield a `StepCounter` actor handle for the workers (None when disabled) while a thread draws its count."""
    if not enabled:
        yield None
        return
    import ray
    from tqdm.auto import tqdm

    counter = ray.remote(num_cpus=0)(StepCounter).remote()
    stop = threading.Event()
    bar = tqdm(total=total, desc=desc, file=sys.stderr, leave=False)

    def refresh() -> None:
        try:
            steps = ray.get(counter.get.remote(), timeout=10)
        except Exception:  # noqa: BLE001 - a missed refresh of a progress bar is not an error
            return
        if steps != bar.n:
            bar.update(steps - bar.n)

    def poll() -> None:
        while not stop.wait(1.0):
            refresh()

    thread = threading.Thread(target=poll, name=f"progress-{desc}", daemon=True)
    thread.start()
    try:
        yield counter
    finally:
        stop.set()
        thread.join()
        refresh()  # the final count, so a finished stage ends its bar at its total
        bar.close()
        ray.kill(counter)


def train_stage(job: StageJob, dataset, scaling: ScalingSpec, *, storage_path: str, name: str) -> StageResult:
    """Run one stage as a `TorchTrainer` (fresh run `name` under `storage_path`) and return its checkpoint."""
    from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    if os.path.exists(os.path.join(storage_path, name)):
        raise FileExistsError(f"Ray Train run {name!r} already exists under {storage_path}; it would be resumed")
    resources = {"CPU": scaling.cpus_per_worker}
    if scaling.use_gpu:
        resources["GPU"] = scaling.gpus_per_worker or 1
    loop_config: dict[str, Any] = {"job": asdict(job)}
    if scaling.num_workers == 0:  # Ray Train's local mode: the loop runs in this process, no worker group
        loop_config["local_checkpoint_dir"] = os.path.join(os.path.abspath(storage_path), name, CHECKPOINT_DIR_NAME)
        os.makedirs(loop_config["local_checkpoint_dir"])
    started = time.time()
    with driver_progress_bar(job.steps, f"train {job.stage}", job.progress) as counter:
        loop_config["progress_counter"] = counter
        trainer = TorchTrainer(
            train_loop_per_worker,
            train_loop_config=loop_config,
            scaling_config=ScalingConfig(num_workers=scaling.num_workers, use_gpu=scaling.use_gpu,
                                         resources_per_worker=resources),
            run_config=RunConfig(name=name, storage_path=os.path.abspath(storage_path),
                                 failure_config=FailureConfig(max_failures=scaling.max_failures),
                                 checkpoint_config=CheckpointConfig(num_to_keep=1),
                                 logging_config=LoggingConfig(log_level="WARNING")),
            datasets={"train": dataset},
        )
        result = trainer.fit()
    finished = time.time()
    if result.checkpoint is None:
        raise RuntimeError(f"Ray Train run {name!r} finished without a checkpoint")
    metrics = dict(result.metrics or {})
    history = metrics.pop("history", [])
    if "worker_entered_at" in metrics:  # how long Ray Train took to start the workers
        metrics["worker_start_s"] = metrics.pop("worker_entered_at") - started
    return StageResult(checkpoint_dir=result.checkpoint.path, metrics=metrics, history=history,
                       wall_s=finished - started)
