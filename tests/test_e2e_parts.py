"""The wiring's small parts, fast: task keys and seeds, iteration slices, the lr schedule, resume checks, and the
actor pool redoing a task whose actor died (with an idempotent store standing in for the buffer)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from bcoder_ray.algorithms.base import RolloutRequest
from bcoder_ray.config import ConfigError
from bcoder_ray.loop.driver import prepare_run
from bcoder_ray.loop.learner import learning_rate_factor
from bcoder_ray.loop.rollout import (ActorPool, ActorSettings, PolicyRef, StoredArgs, iteration_slice, make_tasks,
                                     worker_args)
from bcoder_ray.loop.run_folder import CONFIG_FILE, RunState
from bcoder_ray.model.candidates import SamplingSettings


def test_tasks_are_stable_and_cover_every_problem_once():
    a = make_tasks("it3", range(10), 4, iteration=3, seed=0)
    b = make_tasks("it3", range(10), 4, iteration=3, seed=0)
    assert a == b  # a redone iteration has the same keys and seeds
    assert [t.key for t in a] == ["it3-t0000", "it3-t0001", "it3-t0002"]
    assert sorted(i for t in a for i in t.problem_indices) == list(range(10))
    assert len({t.seed for t in a}) == 3
    assert make_tasks("it3", range(10), 4, 3, seed=1)[0].seed != a[0].seed


def test_iteration_slices_rotate_through_the_train_problems():
    assert iteration_slice(5, None, 2) == [0, 1, 2, 3, 4]
    assert iteration_slice(10, 4, 0) == [0, 1, 2, 3]
    assert iteration_slice(10, 4, 1) == [4, 5, 6, 7]
    assert iteration_slice(10, 4, 2) == [8, 9, 0, 1]


def test_learning_rate_schedules():
    assert [learning_rate_factor(s, 4, "constant", 0) for s in range(4)] == [1.0] * 4
    assert [learning_rate_factor(s, 4, "linear", 0) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert learning_rate_factor(0, 10, "linear", 2) == 0.5 and learning_rate_factor(2, 10, "linear", 2) == 1.0
    with pytest.raises(ValueError, match="cosine"):
        learning_rate_factor(0, 4, "cosine", 0)


def test_prepare_run_refuses_to_reuse_or_redefine_a_run(tmp_path):
    plan = prepare_run(run_dir=str(tmp_path / "r"), overrides=["--run.iterations", "1"])
    assert plan.cfg.run.run_dir == str(tmp_path / "r") and not plan.resumed
    plan.run_dir.mkdir()
    (plan.run_dir / CONFIG_FILE).write_text(plan.cfg.to_yaml())
    RunState(completed_iterations=1).save(plan.run_dir)
    with pytest.raises(ConfigError, match="--resume"):
        prepare_run(run_dir=str(plan.run_dir))
    resumed = prepare_run(resume=str(plan.run_dir), overrides=["--run.iterations", "4"])
    assert resumed.resumed and resumed.cfg.run.iterations == 4
    with pytest.raises(ConfigError, match=r"stages\.theta\.lr"):
        prepare_run(resume=str(plan.run_dir), overrides=["--stages.theta.lr", "1e-3"])
    with pytest.raises(ConfigError, match="not a run folder"):
        prepare_run(resume=str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match="unknown key"):
        prepare_run(run_dir=str(tmp_path / "x"), overrides=["--stages.theta.nope", "1"])
    with pytest.raises(ConfigError, match=r"model\.warm_start\.options.*n_layers"):
        prepare_run(run_dir=str(tmp_path / "x"), overrides=["--model.warm_start.options.n_layers", "2"])
    with pytest.raises(ConfigError, match=r"model\.warm_start\.options\.max_program_len"):
        prepare_run(run_dir=str(tmp_path / "x"), overrides=["--model.warm_start.options.max_program_len", "7"])
    with pytest.raises(ConfigError, match=r"executor\.options.*timeout_per_tset"):
        prepare_run(run_dir=str(tmp_path / "x"), overrides=["--executor.options.timeout_per_tset", "2"])
    assert not (tmp_path / "x").exists()  # nothing was started or written


ACTOR_ARGS_LINE = "has constructor arguments in the object store"  # Ray's error line (ray-project/ray#53727)


class FlakyWorker:
    """Stands in for PolicyWorker: writes its task under the task's key (a file per key, written once, as the
    buffer's append does) and dies after its first write, before replying."""

    def __init__(self, args: StoredArgs, executor_names: tuple[str, ...] = (), actor_name: str = ""):
        self.root = Path(worker_args(args))  # the pool's "arguments" here: a folder

    def rollout(self, task, policy, sampling, request, split="train"):
        target = self.root / f"{task.key}.txt"
        if not target.exists():  # idempotent by key
            target.write_text(",".join(map(str, task.problem_indices)))
        marker = self.root / "died"
        if not marker.exists():
            marker.write_text(task.key)
            os._exit(1)
        return task.key


def test_actor_pool_redoes_the_task_of_a_dead_actor(ray_local, tmp_path, capfd):
    pool = ActorPool(FlakyWorker, ActorSettings(num_actors=2, num_cpus=0.25, max_restarts=2, max_task_retries=2),
                     str(tmp_path), storage=str(tmp_path / "storage"))
    assert ACTOR_ARGS_LINE not in capfd.readouterr().err  # printed (once per process) as an actor is created
    try:
        tasks = make_tasks("it0", range(6), 2, iteration=0, seed=0)
        seen = []
        results = pool.rollout(tasks, PolicyRef("ckpt", "0"),
                               SamplingSettings(m=1, temperature=1.0, top_p=1.0, max_new_tokens=8), RolloutRequest(),
                               on_result=lambda t, r: seen.append(t.key))
    finally:
        pool.shutdown()
    assert results == [t.key for t in tasks]
    assert sorted(seen) == sorted(results)
    assert (tmp_path / "died").exists()
    written = sorted(p.name for p in tmp_path.glob("it0-*.txt"))
    assert written == [f"{t.key}.txt" for t in tasks]


class KilledWorker:
    """Stands in for PolicyWorker as `ActorPool` starts it: each construction reads the stored arguments (a
    folder) and notes its process there; a task notes that it started, then waits for the test's go-ahead."""

    def __init__(self, args: StoredArgs, executor_names: tuple[str, ...] = (), actor_name: str = ""):
        self.root = Path(worker_args(args))
        with (self.root / "constructed").open("a") as f:
            f.write(f"{os.getpid()}\n")

    def rollout(self, task, policy, sampling, request, split="train") -> tuple[str, int]:
        (self.root / f"started-{os.getpid()}").write_text(task.key)
        while not (self.root / "go").exists():
            time.sleep(0.05)
        return task.key, os.getpid()


def wait_for(condition, what: str, seconds: float = 60.0) -> None:
    deadline = time.time() + seconds
    while not condition():
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


def test_a_killed_actor_restarts_from_the_run_storage_and_finishes_its_task(ray_local, tmp_path, capfd):
    """ray-project/ray#53727: a restarted actor is rebuilt from its creation arguments, and Ray keeps nothing
    they refer to alive for that. The pool hands its actors only their arguments' location under the run's
    storage, so Ray has no reason to say (at error level) that a restart could fail, and a SIGKILLed actor,
    killed in the middle of its task, comes back from that file and finishes the task."""
    import signal
    import threading

    pool = ActorPool(KilledWorker, ActorSettings(num_actors=1, num_cpus=0.25, max_restarts=1, max_task_retries=1),
                     str(tmp_path), storage=str(tmp_path / "storage"))
    results: list = []
    try:
        assert pool.stored_args.uri.startswith(str(tmp_path / "storage"))
        task = make_tasks("it0", range(2), 2, iteration=0, seed=0)[0]
        runner = threading.Thread(target=lambda: results.extend(pool.rollout(
            [task], PolicyRef("ckpt", "0"), SamplingSettings(m=1, temperature=1.0, top_p=1.0, max_new_tokens=8),
            RolloutRequest())))
        runner.start()
        wait_for(lambda: list(tmp_path.glob("started-*")), "the task to start")
        first = int(next(tmp_path.glob("started-*")).name.split("-")[1])
        os.kill(first, signal.SIGKILL)  # the actor's process, mid-task
        wait_for(lambda: len(list(tmp_path.glob("started-*"))) == 2, "the task to start again on a restarted actor")
        (tmp_path / "go").write_text("")
        runner.join(timeout=60)
    finally:
        (tmp_path / "go").write_text("")
        pool.shutdown()
    constructed = [int(x) for x in (tmp_path / "constructed").read_text().split()]
    assert len(constructed) == 2 and constructed[0] == first  # built, then rebuilt from the stored arguments
    assert results == [(task.key, constructed[1])] and constructed[1] != first  # the task finished on the new one
    assert ACTOR_ARGS_LINE not in capfd.readouterr().err


def test_a_target_filling_job_whose_actor_died_is_followed_by_one_over_the_rows_still_missing(monkeypatch):
    """The Ray Data job's actor is not restarted (Ray Data hands it its arguments through the object store):
    `fill_targets` runs a new job over the rows still lacking targets, a bounded number of times. Here the
    buffer and the jobs are stand-ins; `test_stages_on_a_tiny_encoder_decoder...` runs the real job."""
    import pyarrow as pa
    import ray.exceptions

    from bcoder_ray.algorithms.base import TargetsPlan
    from bcoder_ray.loop import target_filling
    from bcoder_ray.loop.target_filling import RAY_DATA_ATTEMPTS, TargetJob, fill_targets

    class Buffer:  # rows lack their targets until written, as ReplayBuffer's
        def __init__(self):
            self.missing, self.written = {f"s{i}" for i in range(6)}, []

        def missing_targets(self, fingerprint, filters=None, columns=()):
            return [pa.table({"sample_id": sorted(self.missing)})]

        def write_targets(self, table, fingerprint, batch_key):
            ids = table.column("sample_id").to_pylist()
            self.written += ids
            self.missing -= set(ids)

    jobs: list[int] = []  # rows handed to each job
    deaths = {"jobs": 1}  # how many jobs lose their actor after their first batch

    class Job:
        def __init__(self, tables):
            self.rows = pa.concat_tables(tables)

        def iter_batches(self, batch_size, batch_format):
            yield self.rows.slice(0, 2)
            if len(jobs) <= deaths["jobs"]:
                raise ray.exceptions.ActorDiedError()
            yield self.rows.slice(2)

    def ray_data_job(tables, job, num_cpus, num_gpus):
        jobs.append(sum(t.num_rows for t in tables))
        return Job(tables)

    monkeypatch.setattr(target_filling, "_ray_data_job", ray_data_job)
    job = TargetJob(None, TargetsPlan("fp", ("t",)), pad_id=0, batch_size=2)
    buffer = Buffer()
    assert fill_targets(buffer, job) == 6
    assert jobs == [6, 4] and sorted(buffer.written) == [f"s{i}" for i in range(6)]  # every row once
    jobs.clear()
    deaths["jobs"] = RAY_DATA_ATTEMPTS
    buffer = Buffer()
    with pytest.raises(ray.exceptions.ActorDiedError):  # bounded: an actor that always dies fails the fill
        fill_targets(buffer, job)
    assert len(jobs) == RAY_DATA_ATTEMPTS and jobs[0] == 6


# ------------------------------------------------------------------------------------------ learner stages


def tiny_t5_checkpoint(directory: Path, problems, dropout: float = 0.0) -> str:
    """An encoder-decoder stand-in for CodeT5 (the paper's θ_ckpt): a tiny T5 and a BPE tokenizer trained on
    the problems' text, saved together (CodeT5 itself has dropout 0.1)."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from bcoder_ray.model.warm_start import train_tokenizer

    tok = train_tokenizer([p.prompt for p in problems] + [r for p in problems for r in p.references], 300)
    torch.manual_seed(0)
    config = T5Config(vocab_size=len(tok), d_model=32, d_kv=16, d_ff=64, num_layers=1, num_heads=2,
                      dropout_rate=dropout, pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      decoder_start_token_id=tok.pad_token_id)
    T5ForConditionalGeneration(config).save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


SEEDED_VERSION = "run0/0"  # the generated rows' policy version in `seeded_buffer`


def seeded_buffer(root: Path, checkpoint: str, problems):
    """A buffer with each problem's human program (passes) and a wrong program (fails), sampled by the policy
    version `SEEDED_VERSION`."""
    from transformers import AutoTokenizer

    from bcoder_ray.buffer import ReplayBuffer, make_row, prompt_rows
    from bcoder_ray.model.tokenization import encode_program, tokenizer_fingerprint
    from envs.result import REWARD, ExecResult, Outcome

    tok = AutoTokenizer.from_pretrained(checkpoint)
    buf = ReplayBuffer(str(root))
    buf.put_prompts(prompt_rows(problems, tok, max_len=64))
    rows = []
    for p in problems:
        for program, source, outcome in ((p.references[0], "human", Outcome.PASSED),
                                         ("def f(x):\n    return 0\n", "generated", Outcome.FAILED)):
            rows.append(make_row(p, program, encode_program(tok, program, 24), ExecResult(outcome, REWARD[outcome]),
                                 source=source, tokenizer_hash=tokenizer_fingerprint(tok),
                                 policy_version="human" if source == "human" else SEEDED_VERSION))
    buf.append(rows, batch_key="seed")
    return buf


@pytest.mark.slow
def test_a_stages_bar_scalars_and_reads_are_written_by_the_driver_from_what_the_workers_send(ray_local, capsys,
                                                                                          tmp_path):
    import ray
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from bcoder_ray.loop.metric_sinks import MetricSinks
    from bcoder_ray.loop.stage_channel import READS_FILE, stage_channel

    class Recorder:  # stands in for MLflow / W&B (bcoder_ray.loop.metric_sinks)
        logged: list = []

        def log(self, tag, metrics, step):
            self.logged.append((tag, dict(metrics), step))

        def close(self):
            pass

    recorder = Recorder()

    @ray.remote(num_cpus=0)
    def worker(channel, rank: int) -> None:
        for step in range(1, 4):
            if rank == 0:
                ray.get(channel.set_steps.remote(step))
                ray.get(channel.add_entry.remote({"step": step, "loss": 1.0 / step}))
        ray.get(channel.add_reads.remote(rank, {f"s{rank}": rank + 1, "h": 2}))

    with stage_channel(3, "train test", progress=True, tensorboard_dir=tmp_path / "tb", step_offset=10, tag="theta",
                       reads_dir=tmp_path / "reads", sinks=MetricSinks([recorder])) as channel:
        ray.get([worker.remote(channel, r) for r in (0, 1)])
    err = capsys.readouterr().err
    assert "train test: 100%" in err and "3/3" in err  # the final count is drawn before the bar closes
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [(e.step, e.value) for e in events.Scalars("theta/loss")] == [(11, 1.0), (12, 0.5), (13, pytest.approx(1 / 3))]
    assert recorder.logged == [("theta", {"loss": 1.0}, 11), ("theta", {"loss": 0.5}, 12),
                               ("theta", {"loss": 1 / 3}, 13)]
    assert json.loads((tmp_path / "reads" / READS_FILE.format(rank=1)).read_text()) == {"h": 2, "s1": 2}
    assert json.loads((tmp_path / "reads" / READS_FILE.format(rank=0)).read_text()) == {"h": 2, "s0": 1}
    # the channel actor is gone with its stage; ray.kill is asynchronous, so a call sent at once may still be served
    deadline = time.monotonic() + 30
    with pytest.raises(ray.exceptions.RayActorError):
        while time.monotonic() < deadline:
            ray.get(channel.drain.remote(), timeout=30)
            time.sleep(0.1)


def test_stages_on_a_tiny_encoder_decoder_with_the_papers_options(ray_local, tmp_path, capfd):
    """apps_codet5.yaml's pieces on tiny stand-ins, through the algorithm interface: an encoder-decoder θ_ckpt,
    bf16 autocast, gradient accumulation, clipping, φ constant lr then θ linear decay, targets filled by the Ray
    Data job; the stages run in Ray Train's local mode (no worker group) to stay fast."""
    import envs  # noqa: F401
    from envs.registry import load_suite

    from bcoder_ray.algorithms import make_algorithm
    from bcoder_ray.algorithms.base import RunContext
    from bcoder_ray.algorithms.bcoder.q_model import QModel
    from bcoder_ray.loop.target_filling import AlgorithmRef, TargetJob, fill_targets
    from bcoder_ray.config import StageConfig
    from bcoder_ray.loop.learner import ScalingSpec, StageJob, train_stage
    from bcoder_ray.model.tokenization import pad_id
    from transformers import AutoTokenizer

    problems = load_suite("embedded", "train")[:6]
    ckpt = tiny_t5_checkpoint(tmp_path / "t5", problems)
    buf = seeded_buffer(tmp_path / "buffer", ckpt, problems)
    tok = AutoTokenizer.from_pretrained(ckpt)
    storage = str(tmp_path / "train")
    ctx = RunContext(theta_ckpt=ckpt, tokenizer_path=ckpt, source_len=64, target_len=24)
    config = {"name": "bcoder"}
    algo = make_algorithm("bcoder", config, ctx)
    ref = AlgorithmRef("bcoder", algo.config, ctx)
    state: dict = {}

    def job(plan, schedule):
        optim = StageConfig(steps=3, lr=1e-3, schedule=schedule, batch_size_per_worker=4, grad_accum=2,
                            mixed_precision="bf16", grad_clip=1.0, weight_decay=0.05, report_every=2)
        return StageJob("bcoder", algo.config, ctx, plan, optim, progress=False, policy_version="run0/1")

    phi_plan, theta_plan = algo.plan_iteration(0, state, "0")
    assert (phi_plan.name, theta_plan.name) == ("phi", "theta")
    targets = TargetJob(ref, phi_plan.targets, pad_id(tok), batch_size=4)
    assert fill_targets(buf, targets) == 12
    assert fill_targets(buf, targets) == 0  # cached: nothing twice
    assert ACTOR_ARGS_LINE not in capfd.readouterr().err  # Ray Data's actor: created without restarts
    phi_job = job(phi_plan, "constant")
    phi = train_stage(phi_job, buf.ray_dataset(4, phi_job.batches_needed(0),
                                               targets_fingerprint=phi_plan.targets.fingerprint),
                      ScalingSpec(num_workers=0), storage_path=storage, name="phi-a")
    assert [h["step"] for h in phi.history] == [2, 3] and all(h["lr"] == 1e-3 for h in phi.history)
    algo.after_stage(phi_plan, phi.checkpoint_dir, 0, state)

    theta_plan = algo.prepare_stage(theta_plan, state)  # θ's targets need the φ just trained
    assert theta_plan.targets.spec["phi_dir"] == phi.checkpoint_dir
    assert theta_plan.targets.fingerprint != phi_plan.targets.fingerprint
    assert fill_targets(buf, TargetJob(ref, theta_plan.targets, pad_id(tok), batch_size=4)) == 12
    theta_job = job(theta_plan, "linear")
    fp_theta = theta_plan.targets.fingerprint
    theta = train_stage(theta_job, buf.ray_dataset(4, theta_job.batches_needed(0), targets_fingerprint=fp_theta,
                                                   rho_real=0.5, extra_columns=("policy_version",)),
                        ScalingSpec(num_workers=0), storage_path=storage, name="theta-a")
    # every generated row read (2 of each 4-row batch, 3 steps × 2 micro-batches) is one version behind "run0/1";
    # the worker counted them, the stage channel brought them back (φ's batches carried no versions: none)
    assert (theta.lags.counts, theta.lags.unknown, phi.lags.rows) == ({1: 3 * 2 * 2}, 0, 0)
    assert [h["lag_mean"] for h in theta.history] == [1.0, 1.0]
    lrs = [h["lr"] for h in theta.history]
    assert lrs[0] > lrs[-1] > 0  # linear decay
    assert all(h["grad_norm"] >= 0 and h["loss"] == h["loss"] for h in theta.history)  # finite (not NaN)
    algo.after_stage(theta_plan, theta.checkpoint_dir, 0, state)
    assert algo.policy(state) == theta.checkpoint_dir
    q = QModel.create(ckpt, parts=("theta", "phi"), theta_dir=theta.checkpoint_dir, phi_dir=phi.checkpoint_dir)
    assert q.kind == "encoder-decoder"
    with pytest.raises(FileExistsError, match="resumed"):
        train_stage(theta_job, buf.ray_dataset(4, 6, targets_fingerprint=fp_theta), ScalingSpec(num_workers=0),
                    storage_path=storage, name="theta-a")


def test_runs_sharing_a_buffer_write_under_keys_and_versions_of_their_own():
    from bcoder_ray.loop.run_folder import version_name

    assert version_name("runa", 1) != version_name("runb", 1)
    a = make_tasks("runa-it0", range(4), 2, iteration=0, seed=0)
    b = make_tasks("runb-it0", range(4), 2, iteration=0, seed=0)
    assert not {t.key for t in a} & {t.key for t in b}  # a second run's batches are not skipped as written
