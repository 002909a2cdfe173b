"""The two learner stages on Ray Train: stage φ (eq. 12) and stage θ (eq. 17), each one `TorchTrainer` run.

    job = StageJob(stage="theta", checkpoint=ckpt_dir, tokenizer_path=ckpt_dir, theta_dir=prev_theta, ...)
    dataset = buffer.ray_dataset(job.batch_size_per_worker, job.batches_needed(num_workers), rho_real=0.5,
                                 seed=..., targets_fingerprint=fp)
    result = train_stage(job, dataset, ScalingSpec(num_workers=2, use_gpu=False, cpus_per_worker=0.5),
                         storage_path=run_dir / "train", name="theta-iter1-a0")
    result.checkpoint_dir      # loads with QModel.create(..., theta_dir=...) (or phi_dir= for stage φ)

Each worker builds the networks its stage holds (`QModel.create(parts=("phi",) | ("theta",))`; the frozen
targets come cached in the batches, see `bcoder_ray.targets`), wraps the stage's loss in a module so that
`ray.train.torch.prepare_model` gives DDP over exactly the trained parameters, reads ρ_real-mixed mini-batches
from its shard of the buffer's Ray Data view (`ray.train.get_dataset_shard`), and optimises with AdamW under
the configured schedule, gradient accumulation, mixed precision and clipping. Metrics go out with
`ray.train.report` every `report_every` steps; the last report carries the checkpoint (rank 0 writes it) and the
whole metric history, which the driver turns into TensorBoard scalars.

Every call gets its own Ray Train run name: a reused `RunConfig(name, storage_path)` would silently resume an
old run, so the driver names runs by stage, iteration and attempt.
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

STAGES = ("phi", "theta")
CHECKPOINT_DIR_NAME = "final"


@dataclass(frozen=True)
class StageJob:
    """Everything one stage's workers need (plain data; built by the driver from the config)."""

    stage: str  # "phi" or "theta"
    checkpoint: str  # θ_ckpt
    tokenizer_path: str
    theta_dir: str | None = None  # stage θ: continue from this θ (None: initialise from θ_ckpt, eq. 9-11, 16)
    phi_dir: str | None = None  # stage φ: continue from this φ (None: fresh V head)
    # the algorithm
    alpha: float = 1.0
    r_max: float = 1.0
    gamma: float = 0.999
    beta_adv: float = 0.1
    beta_ce: float = 0.5
    operator: str = "conservative"
    aux_reduction: str = "sum"
    init_from_lm: bool = True
    # optimisation
    steps: int = 100
    lr: float = 1e-5
    schedule: str = "constant"
    warmup_steps: int = 0
    weight_decay: float = 0.05
    adam_betas: tuple[float, float] = (0.9, 0.999)
    batch_size_per_worker: int = 16
    grad_accum: int = 1
    mixed_precision: str = "no"
    grad_clip: float | None = 1.0
    report_every: int = 10
    threads_per_worker: int = 1
    seed: int = 0
    progress: bool = True

    def __post_init__(self) -> None:
        if self.stage not in STAGES:
            raise ValueError(f"StageJob.stage must be one of {STAGES}, got {self.stage!r}")

    def batches_needed(self, num_workers: int) -> int:
        """Mini-batches the dataset must hold for `steps` optimiser steps on `num_workers` workers."""
        return self.steps * self.grad_accum * max(1, num_workers)


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


class StageLoss(nn.Module):
    """The stage's loss as a module (forward(batch) -> (loss, metrics)), so DDP wraps exactly what is trained."""

    def __init__(self, model: nn.Module, job: StageJob):
        super().__init__()
        self.model = model
        self.job = job

    def forward(self, batch):
        from bcoder_ray.losses import phi_loss, theta_loss

        j = self.job
        if j.stage == "phi":
            return phi_loss(self.model, batch, gamma=j.gamma)  # eq. 12
        return theta_loss(self.model, batch, gamma=j.gamma, beta_adv=j.beta_adv, beta_ce=j.beta_ce,
                          operator=j.operator, aux_reduction=j.aux_reduction)  # eq. 17


def build_stage_model(job: StageJob, device: torch.device | str | None = None):
    """The QModel holding the stage's trainable network (targets come cached in the batches)."""
    from bcoder_ray.q_model import QModel

    if job.stage == "phi":
        return QModel.create(job.checkpoint, parts=("phi",), phi_dir=job.phi_dir, alpha=job.alpha,
                             r_max=job.r_max, seed=job.seed, device=device)
    return QModel.create(job.checkpoint, parts=("theta",), theta_dir=job.theta_dir, alpha=job.alpha,
                         r_max=job.r_max, init_from_lm=job.init_from_lm, seed=job.seed, device=device)


def save_stage(model, job: StageJob, directory: str, tokenizer=None) -> None:
    if job.stage == "phi":
        model.save_phi(directory, tokenizer)
    else:
        model.save_theta(directory, tokenizer)


def _batches(shard, batch_size: int):
    """Endless pyarrow mini-batches from a dataset shard (a new epoch when one ends)."""
    while True:
        empty = True
        for batch in shard.iter_batches(batch_size=batch_size, batch_format="pyarrow", prefetch_batches=1):
            empty = False
            yield batch
        if empty:
            raise RuntimeError("learner: the training dataset shard is empty (no buffer rows with targets?)")


def train_loop_per_worker(config: dict) -> None:
    """Ray Train's per-worker function: one stage, `job.steps` optimiser steps, then a checkpoint."""
    import ray.train
    import ray.train.torch
    from transformers import AutoTokenizer

    from bcoder_ray.batch import collate
    from bcoder_ray.replay_buffer import rows_from_batch
    from bcoder_ray.tokenization import pad_id

    from bcoder_ray.rollout import quiet_libraries

    entered = time.time()
    from bcoder_ray.driver import quiet_ray_logs

    job = StageJob(**config["job"])
    quiet_libraries()
    quiet_ray_logs()
    torch.set_num_threads(max(1, job.threads_per_worker))
    torch.manual_seed(job.seed)
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    tokenizer = AutoTokenizer.from_pretrained(job.tokenizer_path)
    pad = pad_id(tokenizer)

    model = build_stage_model(job)
    params = model.freeze_for_stage(job.stage)
    model.train()
    loss_module = ray.train.torch.prepare_model(StageLoss(model, job))
    optimizer = torch.optim.AdamW(params, lr=job.lr, weight_decay=job.weight_decay, betas=tuple(job.adam_betas))
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: learning_rate_factor(s, job.steps, job.schedule, job.warmup_steps))
    use_amp = job.mixed_precision != "no"
    amp_dtype = torch.bfloat16 if job.mixed_precision == "bf16" else torch.float16
    scaler = torch.amp.GradScaler("cuda") if job.mixed_precision == "fp16" else None

    model_ready = time.time()
    batches = _batches(ray.train.get_dataset_shard("train"), job.batch_size_per_worker)
    progress = config.get("progress_counter") if rank == 0 else None  # the driver draws the bar
    history: list[dict] = []
    window: dict[str, float] = {}
    n_window = 0
    started = last_report = time.time()
    for step in range(job.steps):
        step_metrics: dict[str, float] = {}
        for micro in range(job.grad_accum):
            batch = collate(rows_from_batch(next(batches)), pad).to(device)
            sync = micro == job.grad_accum - 1 or not hasattr(loss_module, "no_sync")
            with (contextlib.nullcontext() if sync else loss_module.no_sync()), \
                    torch.autocast(device_type=device.type, dtype=amp_dtype, enabled=use_amp):
                loss, metrics = loss_module(batch)
            loss = loss / job.grad_accum
            (scaler.scale(loss) if scaler else loss).backward()
            for k, v in metrics.items():
                step_metrics[k] = step_metrics.get(k, 0.0) + v / job.grad_accum
        if scaler:
            scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, job.grad_clip if job.grad_clip else math.inf)
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
        last = step == job.steps - 1
        if (step + 1) % job.report_every == 0 or last:
            now = time.time()
            entry = {k: v / n_window for k, v in window.items()}
            entry.update(step=step + 1, steps_per_s=n_window / max(now - last_report, 1e-9),
                         programs_per_s=n_window * job.grad_accum * job.batch_size_per_worker * world
                         / max(now - last_report, 1e-9))
            history.append(entry)
            window, n_window, last_report = {}, 0, now
            if not last:
                ray.train.report({**entry, "stage": job.stage})
    final = {**(history[-1] if history else {}), "stage": job.stage, "history": history,
             "train_s": time.time() - started, "model_setup_s": model_ready - entered,
             "worker_entered_at": entered}
    if config.get("local_checkpoint_dir"):  # Ray Train's local mode keeps no copy: save in place
        save_stage(model, job, config["local_checkpoint_dir"], tokenizer)
        ray.train.report(final, checkpoint=ray.train.Checkpoint.from_directory(config["local_checkpoint_dir"]))
        return
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            save_stage(model, job, tmp, tokenizer)
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


# ------------------------------------------------------------------------------------------ cached targets


@dataclass(frozen=True)
class TargetSpec:
    """What a target-filling worker loads: θ_ckpt (â_{t+1}, A_ckpt) and, for stage θ, the frozen φ (v_φ)."""

    checkpoint: str
    tokenizer_path: str
    phi_dir: str | None = None  # None: no v_phi column (stage φ's targets)
    alpha: float = 1.0
    r_max: float = 1.0
    batch_size: int = 16
    threads: int = 1


class TargetComputer:
    """A Ray Data `map_batches` class: buffer rows lacking targets in, the same rows' cached targets out."""

    def __init__(self, spec: TargetSpec):
        from transformers import AutoTokenizer

        from bcoder_ray.q_model import QModel
        from bcoder_ray.tokenization import pad_id

        from bcoder_ray.rollout import quiet_libraries

        torch.set_num_threads(max(1, spec.threads))
        quiet_libraries()
        self.spec = spec
        parts = ("ckpt", "phi") if spec.phi_dir else ("ckpt",)
        self.model = QModel.create(spec.checkpoint, parts=parts, phi_dir=spec.phi_dir, alpha=spec.alpha,
                                   r_max=spec.r_max)
        self.pad = pad_id(AutoTokenizer.from_pretrained(spec.tokenizer_path))

    def __call__(self, batch):
        import pyarrow as pa

        from bcoder_ray.batch import collate
        from bcoder_ray.replay_buffer import rows_from_batch
        from bcoder_ray.targets import compute_frozen_targets

        rows = rows_from_batch(batch)
        for row in rows:
            row.setdefault("reward", 0.0)  # collate wants one; the frozen targets do not depend on it
        with_v_phi = self.spec.phi_dir is not None
        targets = compute_frozen_targets(self.model, collate(rows, self.pad), with_v_phi=with_v_phi)
        columns = {name: batch.column(name) for name in batch.column_names
                   if name not in ("prompt_ids", "program_ids", "target_actions", "a_ckpt", "v_phi")}
        columns["target_actions"] = pa.array([t["target_actions"] for t in targets], type=pa.list_(pa.int32()))
        columns["a_ckpt"] = pa.array([t["a_ckpt"] for t in targets], type=pa.list_(pa.float32()))
        # stage φ's targets have no V_φ (φ is what it trains); the buffer stores a value per token, so NaN
        # marks "not computed under this fingerprint" (stage φ's loss never reads it)
        columns["v_phi"] = pa.array([t["v_phi"] if with_v_phi else [math.nan] * len(t["a_ckpt"]) for t in targets],
                                    type=pa.list_(pa.float32()))
        return pa.table(columns)


def targets_batch_key(table) -> str:
    """The write key of a batch of targets: a hash of its sample ids (a redone batch maps to the same key)."""
    import hashlib

    ids = "\n".join(map(str, table.column("sample_id").to_pylist()))
    return hashlib.sha256(ids.encode()).hexdigest()[:16]


def compute_targets_table(computer: TargetComputer, table, batch_size: int):
    """`computer` over `table` in slices of `batch_size` rows, concatenated."""
    import pyarrow as pa

    return pa.concat_tables([computer(table.slice(start, batch_size))
                             for start in range(0, table.num_rows, batch_size)])


@dataclass(frozen=True)
class TargetChunk:
    """Rows lacking targets, as `ReplayBuffer.missing_targets` gives them, handed to a policy actor."""

    key: str
    table: Any


def fill_targets(buffer, fingerprint: str, spec: TargetSpec, *, num_cpus: float = 1.0, num_gpus: float = 0.0,
                 pool=None) -> int:
    """Compute and store the cached targets of every buffer row lacking them for `fingerprint`. With no `pool`:
    a Ray Data `map_batches` job (one actor holding the frozen networks, `num_cpus`/`num_gpus`); with a
    `rollout.ActorPool`: its policy actors, already running, compute and write them (`PolicyWorker.fill_targets`).
    Writes are keyed by the rows' sample ids, so a repeated call (a resumed run) writes nothing twice. Returns the
    number of rows filled."""
    import ray.data

    tables = [t for t in buffer.missing_targets(fingerprint) if t.num_rows]
    if not tables:
        return 0
    if pool is not None:
        chunks = [TargetChunk(targets_batch_key(t), t) for t in tables]
        return sum(pool.map("fill_targets", chunks, spec, fingerprint))
    dataset = ray.data.from_arrow(tables).map_batches(
        TargetComputer, fn_constructor_args=(spec,), batch_size=spec.batch_size, batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(size=1), num_cpus=num_cpus, num_gpus=num_gpus)
    filled = 0
    for out in dataset.iter_batches(batch_size=None, batch_format="pyarrow"):
        buffer.write_targets(out, fingerprint, batch_key=targets_batch_key(out))
        filled += out.num_rows
    return filled
