"""The iteration loop: seed the buffer, then per iteration rollout -> targets -> stage φ / stage θ -> publish ->
evaluate -> record; `experiments/run.py` is a thin command line over `prepare_run` and `run`.

    plan = prepare_run(config_path=None, overrides=["--run.iterations", "3"], run_dir=None, resume=None)
    summary = run(plan)          # RunSummary: .table (markdown), .state (RunState), .run_dir
    print(summary.table)

One iteration (issue 6):
1. (once per run) the train split's human programs are executed and appended (source "human"), with prompts.
2. Rollout: the policy actors sample m programs per training problem (iteration 0 from θ_ckpt, later from the
   latest θ), score them with `envs.scoring.score_programs`, and append them under keys `it<k>-t<j>`.
3. Targets: rows lacking cached targets for the current fingerprint get them from a Ray Data `map_batches` job.
4. Learn: stage φ (first iteration, or every `phi.retrain_every` iterations; then V_φ targets are refilled
   under a new fingerprint) then stage θ, each a Ray Train `TorchTrainer` run with its own name.
5. Publish: the actors are handed the new checkpoint path; they load it on their next task.
6. Evaluate on the held-out split: pass@k unranked and ranked by R̃ (`evaluation.metrics_from_candidates`).
7. Record: state.json (atomic) says which iterations are complete and where their checkpoints are;
   metrics.jsonl, TensorBoard scalars, table.md.

Run folder:
    config.yaml        the resolved config (a resume reads it back)
    state.json         completed iterations, checkpoints, per-iteration records
    buffer/            the replay buffer (unless buffer.uri points elsewhere)
    train/             Ray Train runs: phi-iter0-<id>/, theta-iter<k>-<id>/ (checkpoints inside)
    eval/<label>/      candidates.jsonl + metrics.json per evaluation (warm-start, iter0, ...)
    tensorboard/       scalars
    metrics.jsonl      one line per completed iteration
    table.md           the final table

Resume (`--resume RUN_DIR`): iterations listed complete in state.json are skipped; the interrupted iteration is
redone from its start. Its rollout tasks have the same keys and seeds, so the buffer's idempotent `append`
writes nothing for a task that already landed (no row lost or duplicated); target writes are keyed the same
way; Ray Train runs get fresh names (an old partial run is never silently resumed).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import json
import math
import os
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bcoder_ray.config import Config, ConfigError, config_from_dict, load_config, read_yaml, apply_overrides, \
    validate

STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"
TABLE_FILE = "table.md"
METRICS_FILE = "metrics.jsonl"
# Sections a resume may change; the rest define the run and must stay as recorded.
RESUME_MUTABLE = ("run.iterations", "run.progress", "run.tensorboard", "ray.", "executor.", "evaluation.every")


# ------------------------------------------------------------------------------------------ run folder state


@dataclass
class RunState:
    completed_iterations: int = 0
    seeded: bool = False
    theta_ckpt: str | None = None  # θ_ckpt path (given or warm-started)
    phi: str | None = None  # latest φ checkpoint
    phi_iteration: int | None = None
    theta: str | None = None  # latest θ checkpoint (the published policy)
    programs_executed: int = 0  # cumulative, generated programs run in the sandbox
    human_rows: int = 0
    baseline: dict | None = None  # evaluation of θ_ckpt (warm start) before the first iteration
    iterations: list[dict] = field(default_factory=list)

    @classmethod
    def load(cls, run_dir: Path) -> "RunState":
        path = run_dir / STATE_FILE
        if not path.exists():
            return cls()
        data = json.loads(path.read_text())
        return cls(**data)

    def save(self, run_dir: Path) -> None:
        tmp = run_dir / f".{STATE_FILE}.{os.getpid()}.tmp"
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2, default=str) + "\n")
        os.replace(tmp, run_dir / STATE_FILE)


@dataclass
class RunPlan:
    cfg: Config
    run_dir: Path
    resumed: bool = False


@dataclass
class RunSummary:
    run_dir: Path
    state: RunState
    table: str


def _default_run_dir(cfg: Config) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.run.name}-{stamp}-{uuid.uuid4().hex[:4]}"


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v) and not key.endswith("options"):
            out.update(_flatten(v, key + "."))
        else:
            out[key] = v
    return out


def warm_start_config(cfg: Config):
    """The warm start's `WarmStartConfig` from model.warm_start.options, with the run's lengths
    and seed; ConfigError naming the option at fault."""
    from bcoder_ray.warm_start import WarmStartConfig

    m = cfg.model
    options = dict(m.warm_start.options)
    for key, value in (("max_prompt_len", m.source_len), ("max_program_len", m.target_len)):
        if options.setdefault(key, value) != value:
            raise ConfigError(f"model.warm_start.options.{key} = {options[key]} differs from the run's length "
                              f"{value} (model.source_len / target_len); leave it out")
    options.setdefault("seed", cfg.run.seed)
    known = {f.name for f in dataclasses.fields(WarmStartConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"model.warm_start.options: unknown key(s) {unknown}; known: {sorted(known)}")
    try:
        return WarmStartConfig(**options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.warm_start.options: {e}") from None


def check_component_options(cfg: Config) -> None:
    """Options passed through to components (executor, warm start) must be ones they take: checked before work."""
    import inspect

    from envs.execute import Executor

    params = inspect.signature(Executor.__init__).parameters
    unknown = sorted(set(cfg.executor.options) - set(params) - {"workers"})
    if unknown or "workers" in cfg.executor.options:
        raise ConfigError(f"executor.options: unknown key(s) {unknown or ['workers']} (use executor.workers for "
                          f"the pool size); envs.execute.Executor takes {sorted(set(params) - {'self'})}")
    if cfg.model.checkpoint is None:
        warm_start_config(cfg)


def prepare_run(config_path: str | None = None, overrides: list[str] | None = None, run_dir: str | None = None,
                resume: str | None = None) -> RunPlan:
    """Load and validate the config and choose the run folder; no work is started (errors: ConfigError)."""
    overrides = list(overrides or [])
    if resume is not None:
        folder = Path(resume)
        if not (folder / CONFIG_FILE).is_file():
            raise ConfigError(f"--resume {resume}: not a run folder (no {CONFIG_FILE})")
        if config_path is not None:
            raise ConfigError("--resume uses the run's own config.yaml; give only overrides, not --config")
        if run_dir is not None and Path(run_dir).resolve() != folder.resolve():
            raise ConfigError("--resume and --run-dir name different folders")
        recorded = config_from_dict(read_yaml(folder / CONFIG_FILE), where=str(folder / CONFIG_FILE))
        cfg = apply_overrides(recorded, overrides)
        validate(cfg)
        check_component_options(cfg)
        check_local_cpu_budget(cfg)
        before, after = _flatten(recorded.to_dict()), _flatten(cfg.to_dict())
        changed = [k for k in after if before.get(k) != after[k] and not k.startswith(RESUME_MUTABLE)]
        if changed:
            raise ConfigError(f"--resume cannot change {changed}: they define the run (may change: "
                              f"{list(RESUME_MUTABLE)})")
        return RunPlan(cfg, folder, resumed=True)
    cfg = load_config(config_path, overrides)
    check_component_options(cfg)
    check_local_cpu_budget(cfg)
    folder = Path(run_dir or cfg.run.run_dir or _default_run_dir(cfg))
    if (folder / STATE_FILE).exists():
        raise ConfigError(f"run folder {folder} already holds a run; continue it with --resume {folder}")
    cfg = dataclasses.replace(cfg, run=dataclasses.replace(cfg.run, run_dir=str(folder)))
    return RunPlan(cfg, folder, resumed=False)


# ------------------------------------------------------------------------------------------ Ray


# Ray loggers whose routine messages would bury the run's own progress lines: a line per ray.train.report, and
# a warning every few seconds from Train's placement-group cleaner when the state API is off (no dashboard).
QUIET_LOGGERS = {"ray.train.v2._internal.execution.context": "WARNING",
                 "ray.train.v2._internal.execution.controller.placement_group_cleaner": "ERROR"}


# Ray Train settings for small shared machines: a worker group may take more than the default 60 s to start
# when the CPUs are busy, and the controller's 2 s poll adds idle time to every short stage.
RAY_TRAIN_ENV = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def quiet_ray_logs() -> None:
    """Raise the level of `QUIET_LOGGERS` (a `worker_process_setup_hook` of the local Ray instance, and called
    by the train loop). Some of those modules name their logger after their file, so both names are set."""
    import importlib
    import logging
    import warnings

    warnings.filterwarnings("ignore", message=".*exclude_resources.*")  # Ray Data's own deprecation notice
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
        try:
            logging.getLogger(importlib.import_module(name).__file__).setLevel(level)
        except ImportError:  # another Ray version: nothing to quiet
            pass


def _quiet_ray_data() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the run shows its own bars
    ctx.print_on_execution_start = False


def _pythonpath_with_repo() -> str:
    """PYTHONPATH for local Ray workers: this checkout first (the setup hook imports bcoder_ray before the
    driver's sys.path reaches the worker), then whatever was set."""
    repo = str(Path(__file__).resolve().parent.parent)
    rest = os.environ.get("PYTHONPATH", "")
    return repo + (os.pathsep + rest if rest else "")


@contextlib.contextmanager
def ray_session(cfg: Config):
    """Join RAY_ADDRESS / ray.address when given (ray job submit), else start a local instance with a capped
    object store; shut down only what this function started."""
    import ray

    for name, value in RAY_TRAIN_ENV.items():  # Ray Train passes these on to its controller
        os.environ.setdefault(name, value)
    if ray.is_initialized():
        _quiet_ray_data()
        yield
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)  # a job's own runtime env (working dir) stays as submitted
    else:
        ray.init(num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus,
                 object_store_memory=cfg.ray.object_store_mb * 1024 ** 2,
                 include_dashboard=cfg.ray.include_dashboard,
                 runtime_env={"worker_process_setup_hook": "bcoder_ray.driver.quiet_ray_logs",
                              "env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1",
                                           "PYTHONPATH": _pythonpath_with_repo()}})
    _quiet_ray_data()
    try:
        yield
    finally:
        ray.shutdown()


# ------------------------------------------------------------------------------------------ the run


def _threads(cpus: float) -> int:
    return max(1, math.ceil(cpus))


class Run:
    """One run of the loop (state in the run folder; this object only holds handles for its lifetime)."""

    def __init__(self, plan: RunPlan, worker_cls: type | None = None):
        self.worker_cls = worker_cls
        self.cfg = plan.cfg
        self.run_dir = plan.run_dir
        self.state = RunState.load(self.run_dir)
        self.writer = None
        self.pool = None
        self.log_lines: list[str] = []

    # -- small helpers
    def log(self, msg: str) -> None:
        line = f"[bcoder {time.strftime('%H:%M:%S')}] {msg}"
        print(line, file=sys.stderr, flush=True)

    def scalar(self, tag: str, value: float | None, step: int) -> None:
        if self.writer is not None and value is not None and not (isinstance(value, float) and math.isnan(value)):
            self.writer.add_scalar(tag, value, step)

    def bar(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not self.cfg.run.progress, file=sys.stderr, leave=False)

    # -- setup
    def load_problems(self):
        import envs  # noqa: F401  (registers the suites)
        from envs.registry import load_suite

        s = self.cfg.suite
        all_train = load_suite(s.name, s.train_split, **s.options)
        held_out = load_suite(s.name, s.eval_split, **s.options)
        if not all_train:
            raise ConfigError(f"suite {s.name!r} split {s.train_split!r} has no problems")
        train = all_train if s.max_train_problems is None else all_train[: s.max_train_problems]
        if s.max_eval_problems is not None:
            held_out = held_out[: s.max_eval_problems]
        return all_train, train, held_out

    def resolve_checkpoint(self, train_problems) -> str:
        m = self.cfg.model
        if m.checkpoint is not None:
            return m.checkpoint
        if self.state.theta_ckpt and os.path.isdir(self.state.theta_ckpt):
            return self.state.theta_ckpt
        from bcoder_ray.warm_start import warm_start

        ws_cfg = warm_start_config(self.cfg)
        cache = m.warm_start.cache_dir or os.environ.get("BCODER_CACHE") or \
            os.path.join(os.path.expanduser("~"), ".cache", "bcoder-ray", "warm_start")
        self.log(f"warm start: {len(train_problems)} problems, cache {cache}")
        started = time.time()
        path = str(warm_start(train_problems, ws_cfg, cache, progress=self.cfg.run.progress))
        self.log(f"warm start ready in {time.time() - started:.0f}s: {path}")
        return path

    def buffer_uri(self) -> str:
        return self.cfg.buffer.uri or str((self.run_dir / "buffer").resolve())

    def seed_buffer(self, buffer, tokenizer, tokenizer_hash: str, train_problems) -> None:
        """Prompts of every problem (train and held-out), and the train split's human programs (executed)."""
        from bcoder_ray.replay_buffer import make_row, prompt_rows
        from bcoder_ray.tokenization import encode_program
        from envs.execute import Executor
        from envs.scoring import score_programs

        m = self.cfg.model
        buffer.put_prompts(prompt_rows(train_problems, tokenizer, max_len=m.source_len))
        pairs = [(p, ref) for p in train_problems for ref in p.references]
        if not pairs:
            raise ConfigError(f"suite {self.cfg.suite.name!r}: the train problems have no human programs")
        with Executor(workers=self.cfg.executor.workers, **self.cfg.executor.options) as ex:
            results = score_programs(ex, [p for p, _ in pairs], [r for _, r in pairs])
        rows = [make_row(p, ref, encode_program(tokenizer, ref, m.target_len), res, source="human",
                         tokenizer_hash=tokenizer_hash, iteration=0, policy_version="human", actor="seed",
                         sampling="{}")
                for (p, ref), res in zip(pairs, results)]
        buffer.append(rows, batch_key="human-seed")
        passed = sum(r.passed for r in results)
        self.state.human_rows = len(rows)
        self.log(f"buffer seeded: {len(rows)} human programs ({passed} pass their tests)")

    # -- pieces of an iteration
    def policy(self, version: int, theta_dir: str | None, label: str):
        from bcoder_ray.rollout import PolicySpec

        return PolicySpec(checkpoint=self.state.theta_ckpt, version=version, theta_dir=theta_dir,
                          phi_dir=self.state.phi, gamma=self.cfg.algorithm.gamma, label=label)

    def sampling(self, section) -> Any:
        from bcoder_ray.rollout import SamplingSpec

        return SamplingSpec(n=section.samples_per_problem, temperature=section.temperature, top_p=section.top_p,
                            max_new_tokens=section.max_new_tokens or self.cfg.model.target_len,
                            prompts_per_call=section.prompts_per_call)

    def rollout(self, iteration: int, policy, n_train: int) -> dict:
        from bcoder_ray.rollout import iteration_slice, make_tasks

        r = self.cfg.rollout
        sampling = self.sampling(r)
        indices = iteration_slice(n_train, r.problems_per_iteration, iteration)
        tasks = make_tasks(f"it{iteration}", indices, r.problems_per_task, iteration, self.cfg.run.seed)
        started = time.time()
        bar = self.bar(len(indices) * sampling.n, f"rollout it{iteration} (sample+execute)")
        summaries = self.pool.map("rollout", tasks, policy, sampling, "train",
                                  on_result=lambda task, s: bar.update(s["programs"]))
        bar.close()
        wall = time.time() - started
        out = {"programs": sum(s["programs"] for s in summaries), "written": sum(s["written"] for s in summaries),
               "passed": sum(s["passed"] for s in summaries), "executed": sum(s["executed"] for s in summaries),
               "reward_mean": sum(s["reward_sum"] for s in summaries) / max(1, sum(s["programs"] for s in summaries)),
               "exec_s": sum(s["exec_s"] for s in summaries), "wall_s": wall}
        out["pass_rate"] = out["passed"] / max(1, out["programs"])
        out["programs_per_s"] = out["programs"] / max(wall, 1e-9)
        return out

    def targets_fingerprint(self, tokenizer, with_phi: bool) -> str:
        from bcoder_ray.targets import targets_fingerprint

        m, a = self.cfg.model, self.cfg.algorithm
        return targets_fingerprint(self.state.theta_ckpt, tokenizer, max_prompt_len=m.source_len,
                                   max_program_len=m.target_len, alpha=a.alpha,
                                   phi_checkpoint=self.state.phi if with_phi else None, dtype=m.dtype)

    def fill_targets(self, buffer, fingerprint: str, with_phi: bool) -> int:
        from bcoder_ray.learner import TargetSpec, fill_targets

        b, a = self.cfg.buffer, self.cfg.algorithm
        spec = TargetSpec(checkpoint=self.state.theta_ckpt, tokenizer_path=self.state.theta_ckpt,
                          phi_dir=self.state.phi if with_phi else None, alpha=a.alpha, r_max=a.r_max,
                          batch_size=b.targets_batch_size, threads=_threads(b.targets_cpus))
        started = time.time()
        n = fill_targets(buffer, fingerprint, spec, num_cpus=b.targets_cpus, num_gpus=b.targets_gpus,
                         pool=self.pool if b.targets_via == "actors" else None)
        self.log(f"targets: {n} rows filled ({'with' if with_phi else 'without'} V_φ) in "
                 f"{time.time() - started:.0f}s")
        return n

    def train(self, stage: str, iteration: int, buffer, fingerprint: str, start_dir: str | None):
        from bcoder_ray.learner import ScalingSpec, StageJob, train_stage

        st = self.cfg.phi if stage == "phi" else self.cfg.theta
        a = self.cfg.algorithm
        job = StageJob(stage=stage, checkpoint=self.state.theta_ckpt, tokenizer_path=self.state.theta_ckpt,
                       theta_dir=start_dir if stage == "theta" else None,
                       phi_dir=start_dir if stage == "phi" else None,
                       alpha=a.alpha, r_max=a.r_max, gamma=a.gamma, beta_adv=a.beta_adv, beta_ce=a.beta_ce,
                       operator=a.operator, aux_reduction=a.aux_reduction, init_from_lm=a.init_from_lm,
                       steps=st.steps, lr=st.lr, schedule=st.schedule, warmup_steps=st.warmup_steps,
                       weight_decay=st.weight_decay, adam_betas=tuple(st.adam_betas),
                       batch_size_per_worker=st.batch_size_per_worker, grad_accum=st.grad_accum,
                       mixed_precision=st.mixed_precision, grad_clip=st.grad_clip, report_every=st.report_every,
                       threads_per_worker=_threads(st.cpus_per_worker), seed=self.cfg.run.seed + iteration,
                       progress=self.cfg.run.progress)
        dataset = buffer.ray_dataset(st.batch_size_per_worker, job.batches_needed(st.num_workers),
                                     rho_real=a.rho_real, seed=self.cfg.run.seed * 1000 + iteration,
                                     targets_fingerprint=fingerprint, num_cpus=self.cfg.buffer.dataset_cpus)
        scaling = ScalingSpec(num_workers=st.num_workers, use_gpu=st.use_gpu, cpus_per_worker=st.cpus_per_worker,
                              gpus_per_worker=st.gpus_per_worker)
        name = f"{stage}-iter{iteration}-{uuid.uuid4().hex[:6]}"
        self.log(f"stage {stage}: {st.steps} steps × {st.batch_size_per_worker}×{st.num_workers}×{st.grad_accum} "
                 f"programs ({name})")
        result = train_stage(job, dataset, scaling, storage_path=str((self.run_dir / "train").resolve()),
                             name=name)
        base = iteration * st.steps
        for entry in result.history:
            for k, v in entry.items():
                if k != "step" and isinstance(v, (int, float)):
                    self.scalar(f"{stage}/{k}", float(v), base + int(entry["step"]))
        last = result.history[-1] if result.history else {}
        self.log(f"stage {stage} done in {result.wall_s:.0f}s: " +
                 ", ".join(f"{k}={v:.4g}" for k, v in last.items() if isinstance(v, float)))
        return result

    def evaluate(self, policy, held_out, label: str, rank: bool) -> dict:
        """Held-out candidates from the policy actors, written with `evaluation.write_evaluation` (candidates.jsonl +
        metrics.json under eval/<label>/); never appended to the learners' buffer."""
        from bcoder_ray.evaluation import write_evaluation
        from bcoder_ray.rollout import make_tasks

        ev = self.cfg.evaluation
        sampling = self.sampling(ev)
        # the same task keys and seeds for every evaluation of the run (common random numbers: the checkpoints
        # compared in the final table draw their candidates with the same sampler seeds, problem by problem)
        tasks = make_tasks("eval", range(len(held_out)), self.cfg.rollout.problems_per_task, -1, self.cfg.run.seed)
        started = time.time()
        bar = self.bar(len(held_out) * sampling.n, f"evaluate {label}")
        parts = self.pool.map("candidates", tasks, policy, sampling, self.cfg.suite.eval_split, rank, ev.filtered,
                              on_result=lambda task, recs: bar.update(len(recs)))
        bar.close()
        folder = self.run_dir / "eval" / label
        metrics = write_evaluation(folder, [r for part in parts for r in part], ks=ev.ks, ci_level=ev.confidence,
                                   seed=self.cfg.run.seed,
                                   meta={"label": label, "policy": dataclasses.asdict(policy),
                                         "sampling": dataclasses.asdict(sampling)})
        o = metrics["overall"]
        self.log(f"evaluation {label} ({time.time() - started:.0f}s): {o['n_problems']} problems × "
                 f"{sampling.n} samples: pass@1 {_pct(_get(o, 'pass', 1))}"
                 + (f", ranked pass@1 {_pct(_get(o, 'ranked_pass', 1))}" if rank else ""))
        return {"label": label, "dir": str(folder), "overall": o, "by_difficulty": metrics.get("by_difficulty", {}),
                "wall_s": time.time() - started}

    def buffer_rows(self, buffer) -> int:
        """Rows the learners read (train split: human + generated)."""
        return int(buffer.stats().samples.rows)

    # -- the loop
    def iteration(self, it: int, buffer, tokenizer, train, held_out) -> dict:
        cfg, st = self.cfg, self.state
        record: dict[str, Any] = {"iteration": it, "started": time.time()}
        from_ckpt = st.theta is None or (it == 0 and cfg.rollout.sample_iteration_zero_from == "ckpt")
        policy = self.policy(0 if from_ckpt else it, None if from_ckpt else st.theta,
                             "warm-start" if from_ckpt else f"theta-iter{it - 1}")
        roll = self.rollout(it, policy, len(train))
        st.programs_executed += roll["executed"]
        record["rollout"] = roll
        self.log(f"rollout it{it}: {roll['programs']} programs ({roll['written']} new rows), pass rate "
                 f"{roll['pass_rate']:.3f}, {roll['programs_per_s']:.1f} programs/s")

        # stage φ: once (first iteration), or every phi.retrain_every iterations; not used without LM init
        a = cfg.algorithm
        if a.init_from_lm and (st.phi is None or (cfg.phi.retrain_every and it % cfg.phi.retrain_every == 0
                                                  and st.phi_iteration != it)):
            fp = self.targets_fingerprint(tokenizer, with_phi=False)
            record["targets_phi"] = self.fill_targets(buffer, fp, with_phi=False)
            phi = self.train("phi", it, buffer, fp, start_dir=None)
            st.phi, st.phi_iteration = phi.checkpoint_dir, it
            record["phi"] = {"checkpoint": phi.checkpoint_dir, "wall_s": phi.wall_s,
                             **{k: v for k, v in phi.metrics.items() if isinstance(v, (int, float))}}

        # stage θ, continuing from the previous θ
        fp = self.targets_fingerprint(tokenizer, with_phi=a.init_from_lm)
        record["targets_theta"] = self.fill_targets(buffer, fp, with_phi=a.init_from_lm)
        start = st.theta if cfg.theta.continue_across_iterations else None
        theta = self.train("theta", it, buffer, fp, start_dir=start)
        record["theta"] = {"checkpoint": theta.checkpoint_dir, "wall_s": theta.wall_s,
                           **{k: v for k, v in theta.metrics.items() if isinstance(v, (int, float))}}
        new_theta = theta.checkpoint_dir  # published: the actors load it by path on their next task

        # evaluation of the new θ on held-out problems
        last = it == cfg.run.iterations - 1
        if held_out and (last or (it + 1) % cfg.evaluation.every == 0):
            pol = dataclasses.replace(self.policy(it + 1, new_theta, f"theta-iter{it}"))
            record["eval"] = self.evaluate(pol, held_out, f"iter{it}", rank=cfg.evaluation.rank)

        st.theta = new_theta
        record["buffer_rows"] = self.buffer_rows(buffer)
        record["programs_executed_total"] = st.programs_executed
        record["wall_s"] = time.time() - record.pop("started")
        self.record_scalars(it, record)
        return record

    def record_scalars(self, it: int, record: dict) -> None:
        roll = record["rollout"]
        self.scalar("buffer/rows", record.get("buffer_rows"), it)
        self.scalar("rollout/pass_rate", roll["pass_rate"], it)
        self.scalar("rollout/reward_mean", roll["reward_mean"], it)
        self.scalar("rollout/programs_per_s", roll["programs_per_s"], it)
        self.scalar("rollout/programs_executed_total", record["programs_executed_total"], it)
        if "eval" in record:
            o = record["eval"]["overall"]
            for k in self.cfg.evaluation.ks:
                self.scalar(f"eval/pass@{k}", _get(o, "pass", k), it)
                self.scalar(f"eval/ranked_pass@{k}", _get(o, "ranked_pass", k), it)
        self.scalar("time/iteration_s", record["wall_s"], it)

    def execute(self) -> RunSummary:
        cfg = self.cfg
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / CONFIG_FILE).write_text(cfg.to_yaml())
        from transformers import AutoTokenizer

        from bcoder_ray.replay_buffer import ReplayBuffer
        from bcoder_ray.rollout import ActorPool, ActorSettings, PolicyWorker, WorkerArgs
        from bcoder_ray.tokenization import tokenizer_fingerprint

        all_train, train, held_out = self.load_problems()
        self.state.theta_ckpt = self.resolve_checkpoint(all_train)  # the warm start learns from every train problem
        self.state.save(self.run_dir)
        tokenizer_path = cfg.model.tokenizer or self.state.theta_ckpt
        tokenizer = AutoTokenizer.from_pretrained(tokenizer_path)
        buffer = ReplayBuffer(self.buffer_uri())
        if not self.state.seeded:
            self.seed_buffer(buffer, tokenizer, tokenizer_fingerprint(tokenizer), train)
            self.state.seeded = True
            self.state.save(self.run_dir)
        if cfg.run.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
        with ray_session(cfg):
            import ray

            check_cpu_budget(cfg, ray.cluster_resources().get("CPU", 0.0))
            r = cfg.rollout
            args = WorkerArgs(problems={"train": train, cfg.suite.eval_split: held_out},
                              tokenizer_path=tokenizer_path, source_len=cfg.model.source_len,
                              target_len=cfg.model.target_len, buffer_uri=self.buffer_uri(),
                              executor_workers=cfg.executor.workers, executor_options=cfg.executor.options,
                              num_threads=_threads(r.cpus_per_actor), dtype=cfg.model.dtype)
            self.pool = ActorPool(self.worker_cls or PolicyWorker, ActorSettings(num_actors=r.num_actors, num_cpus=r.cpus_per_actor,
                                                              num_gpus=r.gpus_per_actor,
                                                              max_restarts=r.max_restarts,
                                                              max_task_retries=r.max_restarts),
                                  args, executor_actors=cfg.executor.num_actors,
                                  executor_cpus=cfg.executor.cpus_per_actor)
            try:
                if cfg.evaluation.warm_start_baseline and self.state.baseline is None and held_out:
                    self.state.baseline = self.evaluate(self.policy(0, None, "warm-start"), held_out,
                                                        "warm-start", rank=False)
                    self.state.save(self.run_dir)
                for it in range(self.state.completed_iterations, cfg.run.iterations):
                    self.log(f"iteration {it + 1}/{cfg.run.iterations}")
                    record = self.iteration(it, buffer, tokenizer, train, held_out)
                    self.state.iterations.append(record)
                    self.state.completed_iterations = it + 1
                    self.state.save(self.run_dir)
                    write_metrics_lines(self.run_dir, self.state)
            finally:
                self.pool.shutdown()
                if self.writer is not None:
                    self.writer.close()
        table = final_table(self.state, cfg)
        (self.run_dir / TABLE_FILE).write_text(table)
        return RunSummary(self.run_dir, self.state, table)


def write_metrics_lines(run_dir: Path, state: RunState) -> None:
    """metrics.jsonl: one line per completed iteration, rewritten from state.json (so a resume never doubles one)."""
    tmp = run_dir / f".{METRICS_FILE}.tmp"
    tmp.write_text("".join(json.dumps(r, default=str) + "\n" for r in state.iterations))
    os.replace(tmp, run_dir / METRICS_FILE)


def cpu_budget(cfg: Config) -> dict[str, float]:
    """Logical CPUs each phase holds at once (actors stay up during training), to check against the cluster."""
    r, e, b = cfg.rollout, cfg.executor, cfg.buffer
    actors = r.num_actors * r.cpus_per_actor + e.num_actors * e.cpus_per_actor
    stages = {name: st.num_workers * st.cpus_per_worker + b.dataset_cpus
              for name, st in (("phi", cfg.phi), ("theta", cfg.theta))}
    budget = {f"rollout actors + stage {name} workers + a Ray Data read task": actors + need
              for name, need in stages.items()}
    if b.targets_via == "ray_data":
        budget["rollout actors + the target-filling Ray Data actor"] = actors + b.targets_cpus
    return budget


def check_cpu_budget(cfg: Config, cluster_cpus: float) -> None:
    """A phase that needs more logical CPUs than the cluster has would wait forever: stop with a message."""
    for phase, need in cpu_budget(cfg).items():
        if need > cluster_cpus + 1e-9:
            raise ConfigError(
                f"{phase} need {need:g} CPUs but the Ray cluster has {cluster_cpus:g}: lower rollout.cpus_per_actor, "
                f"phi/theta.cpus_per_worker or buffer.dataset_cpus (fractions are fine), or raise ray.num_cpus")


def check_local_cpu_budget(cfg: Config) -> None:
    """Before any work: the CPU budget against the local instance this run would start (none is joined)."""
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return  # checked against the cluster once connected
    if cfg.ray.num_cpus is not None:
        cpus = float(cfg.ray.num_cpus)
    else:
        try:
            from ray._private.utils import get_num_cpus  # what a local ray.init() would detect

            cpus = float(get_num_cpus())
        except ImportError:  # pragma: no cover - another Ray version
            cpus = float(os.cpu_count() or 1)
    check_cpu_budget(cfg, cpus)


def run(plan: RunPlan, worker_cls: type | None = None) -> RunSummary:
    """Run (or resume) the loop described by `plan`; returns the final table and state. `worker_cls`: a
    `rollout.PolicyWorker` subclass for the actors (tests inject faults with it)."""
    return Run(plan, worker_cls).execute()


# ------------------------------------------------------------------------------------------ the final table


def _get(group: dict, variant: str, k: int) -> float | None:
    return (group.get(f"{variant}@k") or {}).get(str(k))


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{100 * x:.1f}%"


def paired_difference(dir_a: str, variant_a: str, dir_b: str, variant_b: str, k: int, level: float,
                      seed: int = 0) -> dict:
    """Mean over the problems both evaluations share of (a's variant@k - b's variant@k), with a percentile
    bootstrap interval over problems (per-problem values and a bootstrap)."""
    from bcoder_ray.metrics import (CANDIDATES_FILE, bootstrap_ci, group_by_problem, problem_variant_value,
                                    read_candidates)

    a = group_by_problem(read_candidates(Path(dir_a) / CANDIDATES_FILE))
    b = group_by_problem(read_candidates(Path(dir_b) / CANDIDATES_FILE))
    diffs = []
    for key in sorted(set(a) & set(b)):
        va, vb = problem_variant_value(a[key], variant_a, k), problem_variant_value(b[key], variant_b, k)
        if va is not None and vb is not None:
            diffs.append(va - vb)
    if not diffs:
        return {"n_problems": 0, "mean": None, "low": None, "high": None}
    low, high = bootstrap_ci(diffs, level=level, seed=seed)
    return {"n_problems": len(diffs), "mean": sum(diffs) / len(diffs), "low": low, "high": high}


def final_table(state: RunState, cfg: Config) -> str:
    """The markdown table per iteration, and the two comparisons of the last iteration against the warm start."""
    ev = cfg.evaluation
    lines = [f"# {cfg.run.name}: {cfg.suite.name} ({cfg.suite.train_split} → held-out {cfg.suite.eval_split})", "",
             "| iteration | buffer rows | programs executed (total) | rollout pass rate | held-out pass@1 "
             "| held-out ranked pass@1 |",
             "| --- | ---: | ---: | ---: | ---: | ---: |"]
    if state.baseline:
        o = state.baseline["overall"]
        lines.append(f"| warm start (θ_ckpt) | {state.human_rows} | 0 | – | {_pct(_get(o, 'pass', 1))} | – |")
    for rec in state.iterations:
        o = (rec.get("eval") or {}).get("overall") or {}
        lines.append(f"| {rec['iteration']} | {rec.get('buffer_rows', '–')} | {rec['programs_executed_total']} | "
                     f"{rec['rollout']['pass_rate']:.3f} | {_pct(_get(o, 'pass', 1))} | "
                     f"{_pct(_get(o, 'ranked_pass', 1))} |")
    last = next((r for r in reversed(state.iterations) if r.get("eval")), None)
    if state.baseline and last is not None:
        o_last, o_base = last["eval"]["overall"], state.baseline["overall"]
        lines += ["", f"Held-out split: {o_last.get('n_problems')} problems × {ev.samples_per_problem} samples "
                  f"(temperature {ev.temperature}, top-p {ev.top_p}); {int(ev.confidence * 100)}% percentile "
                  f"bootstrap intervals over problems of the paired difference.", "",
                  "| comparison (pass@1) | last iteration | warm start | difference | interval |",
                  "| --- | ---: | ---: | ---: | --- |"]
        for name, variant in (("ranked (last) vs unranked (warm start)", "ranked_pass"),
                              ("unranked (last) vs unranked (warm start)", "pass")):
            d = paired_difference(last["eval"]["dir"], variant, state.baseline["dir"], "pass", 1, ev.confidence,
                                  seed=cfg.run.seed)
            interval = "–" if d["low"] is None else f"[{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] pts"
            diff = "–" if d["mean"] is None else f"{100 * d['mean']:+.1f} pts"
            lines.append(f"| {name} | {_pct(_get(o_last, variant, 1))} | {_pct(_get(o_base, 'pass', 1))} | "
                         f"{diff} | {interval} |")
    if last is not None:
        lines += ["", "Per difficulty (percent; the layout of the paper's Table 1):", "", _difficulty_tables(state, last, ev.ks)]
    return "\n".join(lines) + "\n"


def _difficulty_tables(state: RunState, last: dict, ks: list[int]) -> str:
    from bcoder_ray.report import load_metrics, table1_markdown

    last_metrics = load_metrics(last["eval"]["dir"])
    unranked = ([("warm start", load_metrics(state.baseline["dir"]))] if state.baseline else []) + \
        [(f"iteration {last['iteration']}", last_metrics)]
    out = table1_markdown(unranked, ks=ks, variant="pass")
    if last_metrics["overall"].get("ranked_pass@k"):
        out += "\n" + table1_markdown([(f"iteration {last['iteration']}", last_metrics)], ks=ks,
                                       variant="ranked_pass")
    return out
