"""The iteration loop, for any registered algorithm; `experiments/run.py` is a thin command line over it.

    plan = prepare_run(config="ci_tiny", overrides=["--algorithm.name", "bcoder_optimality"])
    summary = run(plan)          # RunSummary: .table (markdown), .state (RunState), .run_dir
    print(summary.table)

setup: config → problems → θ_ckpt (given or warm-started) → buffer seeded with human programs → algorithm
       → Ray session → policy actors; the warm start evaluated on the validation and test splits
each iteration (until `run.iterations` or `run.budget_programs`):
    # 1. rollout   actors sample with the published policy, execute, append (keys make it idempotent)
    # 2. targets   fill the cached targets the algorithm's next stage declares
    # 3. learn     one Ray Train run per stage the algorithm plans, on the rows it reads
    # 4. publish   the algorithm's policy checkpoint, by path
    # 5. evaluate  the validation split (every `evaluation.every`), the probe set (Figure 1)
    # 6. record    state.json (atomic), metrics, TensorBoard
end: the last policy on the test split (once), the final table

`run.mode: async` (the actors sample while the learner trains): `bcoder_ray.loop.async_driver`, with the same
setup and records; `run.learner: persistent` (learners kept through the run): `bcoder_ray.loop.learner_group`.
The run folder and the resume rules: `bcoder_ray.loop.run_folder`; the Ray session: `bcoder_ray.loop.ray_session`; the
table: `bcoder_ray.loop.run_table`.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

from bcoder_ray.util.formatting import pct
from bcoder_ray.algorithms import make_algorithm
from bcoder_ray.algorithms.base import Rows, StagePlan
from bcoder_ray.buffer import ReplayBuffer, prompt_rows
from bcoder_ray.loop.target_filling import AlgorithmRef, TargetJob, fill_targets
from bcoder_ray.loop.components import (check_components, executor_kwargs, run_context, suite_loader_options,
                                        warm_start_cache, warm_start_config)
from bcoder_ray.config import Config, ConfigError
from bcoder_ray.evaluation.evaluate import write_evaluation
from bcoder_ray.buffer.human_seed import human_rows, prompted_problems, seeded_problems, stopped_references
from bcoder_ray.loop.learner import ScalingSpec, StageJob, train_stage
from bcoder_ray.loop.async_driver import AsyncLoop
from bcoder_ray.loop.learner_group import LearnerGroup
from bcoder_ray.loop.metric_sinks import MetricSinks, metric_sinks
from bcoder_ray.evaluation.reuse import READS_DIR, reuse_stats
from bcoder_ray.loop.ray_session import ray_session
from bcoder_ray.loop.resources import cluster_need, describe, local_cluster, plan_schedule
from bcoder_ray.loop.rollout import (ActorPool, ActorSettings, PolicyRef, PolicyWorker, WorkerArgs, iteration_slice,
                                make_tasks)
from bcoder_ray.loop.run_folder import (CONFIG_FILE, CONTAMINATION_FILE, TABLE_FILE, RunPlan, RunState,
                                        prepare_run as _prepare_run, version_name, write_metrics_lines)
from bcoder_ray.evaluation.plots import plot_budget_curve
from bcoder_ray.loop.run_table import busy_record, final_table, probe_points
from bcoder_ray.loop.staleness import (WindowedStage, bounded, human_rows_while_none_is_old_enough, window_text,
                                       write_lags)
from bcoder_ray.buffer.staleness import LagCounts
from bcoder_ray.util.atomic import atomic_write_text
from bcoder_ray.util.storage import is_dir, is_local_path, join_uri, upload_dir
from bcoder_ray.loop.storage_probe import check_every_node_sees
from bcoder_ray.model.gguf import is_gguf_source, resolve_checkpoint as resolve_gguf
from bcoder_ray.model.tokenization import pad_id, require_chat_template, tokenizer_fingerprint
from bcoder_ray.model.warm_start import warm_start
from envs.execute import Executor
from envs.contamination import contamination_report
from envs.registry import load_suite


PROBE_FIGURE = "probe_curve.png"  # Figure 1 of the run: the probe set's pass rate per iteration


@dataclass
class RunSummary:
    run_dir: Path
    state: RunState
    table: str


def check_run(cfg: Config) -> None:
    """Everything that can be checked before any work: components, and the schedule on the local instance."""
    check_components(cfg)
    cluster = local_cluster(cfg)
    if cluster is not None:
        plan_schedule(cfg, _algorithm_class(cfg).stage_names, cluster)


def _algorithm_class(cfg: Config):
    from bcoder_ray.algorithms import algorithm_class

    return algorithm_class(cfg.algorithm.name)


def prepare_run(config: str | None = None, overrides: list[str] | None = None, run_dir: str | None = None,
                resume: str | None = None, imports: list[str] | tuple[str, ...] = ()) -> RunPlan:
    """Load and validate the config and choose the run folder; no work is started (errors: ConfigError)."""
    return _prepare_run(config, overrides, run_dir, resume, imports, check=check_run)


def _get(group: dict, variant: str, k: int) -> float | None:
    return (group.get(f"{variant}@k") or {}).get(str(k))


class Run:
    """One run of the loop (state in the run folder; this object only holds handles for its lifetime)."""

    def __init__(self, plan: RunPlan, worker_cls: type | None = None):
        self.worker_cls = worker_cls or PolicyWorker
        self.cfg = plan.cfg
        self.run_dir = plan.run_dir
        self.state = RunState.load(self.run_dir)
        self.writer = None
        self.sinks = MetricSinks()  # MLflow, W&B when configured (bcoder_ray.loop.metric_sinks)
        # what every node reads: Ray Train's runs, θ_ckpt, the buffer (bcoder_ray.util.storage)
        storage = self.cfg.run.storage_uri
        self.storage = join_uri(storage, self.run_dir.name) if storage else str(self.run_dir.resolve())
        self.learners: dict[str, LearnerGroup] = {}  # run.learner: persistent, by stage name

    # ------------------------------------------------------------------------------------------ helpers
    def log(self, msg: str) -> None:
        print(f"[bcoder {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)

    def scalar(self, tag: str, value: float | None, step: int) -> None:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return
        if self.writer is not None:
            self.writer.add_scalar(tag, value, step)
        section, _, key = tag.rpartition("/")
        self.sinks.log(section, {key: value}, step)

    def bar(self, total: int, desc: str):
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, disable=not self.cfg.run.progress, file=sys.stderr, leave=False)

    def policy_ref(self, label: str | None = None) -> PolicyRef:
        st = self.state
        return PolicyRef(path=st.policy or st.theta_ckpt, version=st.policy_version,
                         label=label or ("warm-start" if st.policy is None
                                        else f"policy-{st.policy_version.rpartition('/')[2]}"))

    # ------------------------------------------------------------------------------------------ setup
    def setup(self, stack: contextlib.ExitStack) -> None:
        cfg, st = self.cfg, self.state
        self.run_dir.mkdir(parents=True, exist_ok=True)
        (self.run_dir / CONFIG_FILE).write_text(cfg.to_yaml())
        if not st.run_id:  # a new run: its policy versions carry its id (unique in a shared buffer)
            st.run_id = cfg.run.id or uuid.uuid4().hex[:12]
            st.policy_version = version_name(st.run_id, 0)
        stack.enter_context(ray_session(cfg))
        # before any work: on a cluster, every node must see where the run's shared files go
        check_every_node_sees({"run.storage_uri": self.storage, "buffer.uri": self.buffer_uri()})
        self.load_problems()
        st.theta_ckpt = self.resolve_checkpoint()
        check_every_node_sees({}, folders={"model.checkpoint": st.theta_ckpt} if is_dir(st.theta_ckpt) else {})
        self.ctx = run_context(cfg, st.theta_ckpt, self.buffer_uri(), tokenizer_path=self.resolve_tokenizer())
        self.algorithm = make_algorithm(cfg.algorithm.name, cfg.algorithm, self.ctx, cfg.imports)
        st.save(self.run_dir)
        self.tokenizer = self.ctx.load_tokenizer()
        if self.ctx.chat_template:
            try:
                require_chat_template(self.tokenizer)
            except ValueError as e:
                raise ConfigError(str(e)) from None
        self.tokenizer_hash = tokenizer_fingerprint(self.tokenizer, self.ctx.text_format())  # the rows' scope
        self.buffer = ReplayBuffer(self.buffer_uri())
        if not st.seeded:
            self.seed_buffer()
            st.seeded = True
            st.save(self.run_dir)
        if cfg.run.tensorboard:
            from torch.utils.tensorboard import SummaryWriter

            self.writer = stack.enter_context(contextlib.closing(SummaryWriter(str(self.run_dir / "tensorboard"))))
        self.sinks = stack.enter_context(contextlib.closing(
            metric_sinks(cfg.run, self.run_dir, st.run_id, params=cfg.model_dump(mode="json"))))
        import ray

        self.schedule = plan_schedule(cfg, self.algorithm.stage_names, cluster_need(ray.cluster_resources()))
        for line in describe(self.schedule):
            self.log(line)
        self.pool = None
        stack.callback(self.stop_pool)
        stack.callback(self.stop_learners)
        self.start_pool()

    def start_pool(self) -> None:
        cfg, r, e = self.cfg, self.cfg.rollout, self.cfg.executor
        splits = {"train": self.train, **self.eval_sets}
        args = WorkerArgs(problems=splits, context=self.ctx, imports=tuple(cfg.imports), run_id=self.state.run_id,
                          executor=executor_kwargs(cfg), num_threads=max(1, math.ceil(r.cpus_per_actor)),
                          engine=r.engine, first_failure=r.stop_at_first_failure)
        self.pool = ActorPool(self.worker_cls, ActorSettings(num_actors=r.num_actors, num_cpus=r.cpus_per_actor,
                                                             num_gpus=r.gpus_per_actor, max_restarts=r.max_restarts,
                                                             max_task_retries=r.max_restarts),
                              args, storage=join_uri(self.storage, "actors"),  # a restarted actor reads it there
                              executor_actors=e.num_actors, executor_cpus=e.cpus_per_actor)

    def stop_pool(self) -> None:
        if self.pool is not None:
            self.pool.shutdown()
            self.pool = None

    def load_problems(self) -> None:
        """The RL loop's train problems (the first `max_train_problems`), the warm start's (the rest of the train
        split: the loop rolls out on problems whose solutions the warm start never saw), the evaluation splits."""
        s = self.cfg.suite
        options, drop = suite_loader_options(s.options)
        all_train = load_suite(s.name, s.train_split, **options)
        if not all_train:
            raise ConfigError(f"suite {s.name!r} split {s.train_split!r} has no problems")
        self.eval_sets = {}
        for split in dict.fromkeys(x for x in (s.validation_split, s.test_split) if x):
            problems = load_suite(s.name, split, **options)
            self.eval_sets[split] = problems if s.max_eval_problems is None else problems[: s.max_eval_problems]
        all_train = self.check_contamination(all_train, drop)
        n = s.max_train_problems
        self.train = all_train if n is None else all_train[:n]
        self.warm_start_problems = all_train if n is None or n >= len(all_train) else all_train[n:]
        if self.cfg.buffer.human_programs == "warm_start" and \
                not seeded_problems(self.train, self.warm_start_problems, "warm_start"):
            raise ConfigError(f"buffer.human_programs: warm_start seeds the human programs of the train problems the "
                              f"loop never rolls out on, and there are none: suite.max_train_problems ({n}) leaves "
                              f"none of the {len(all_train)} problems of {s.train_split!r} to the warm start alone; "
                              f"set it below {len(all_train)}")

    def check_contamination(self, train: list, drop: bool) -> list:
        """The contamination report of the evaluated problems against the whole train split (the warm start's
        problems included: it learns from them too), printed and written to the run folder
        (`CONTAMINATION_FILE`); with `drop`, the train split without the problems it names."""
        report = contamination_report(train, self.eval_sets)
        for line in report.summary().splitlines():
            self.log(line)
        atomic_write_text(self.run_dir / CONTAMINATION_FILE, json.dumps(report.to_json(), indent=1) + "\n")
        if not drop or not report.matches:
            return train
        dropped = report.train_keys()
        kept = [p for p in train if p.key not in dropped]
        self.log(f"suite.options.drop_contaminated: {len(train) - len(kept)} training problems left out")
        if not kept:
            raise ConfigError(f"suite.options.drop_contaminated leaves no training problem of {len(train)}")
        return kept

    def resolve_checkpoint(self) -> str:
        """θ_ckpt: the recorded one (a resume), the given one, or a warm start; a GGUF file or a packaged checkpoint
        is converted once into a Hugging Face folder first (`bcoder_ray.model.gguf.resolve_checkpoint`); a local
        folder is uploaded to <run storage>/models/theta_ckpt when run.storage_uri is set, so every node loads it."""
        m, st = self.cfg.model, self.state
        if st.theta_ckpt and is_dir(st.theta_ckpt):
            return st.theta_ckpt
        if m.checkpoint is not None:
            path = resolve_gguf(m.checkpoint, log=self.log)  # anything but a GGUF source comes back as it is
        else:
            cache = warm_start_cache(self.cfg)
            self.log(f"warm start: {len(self.warm_start_problems)} problems, cache {cache}")
            started = time.time()
            path = str(warm_start(self.warm_start_problems, warm_start_config(self.cfg), cache,
                                  progress=self.cfg.run.progress))
            self.log(f"warm start ready in {time.time() - started:.0f}s: {path}")
        return self.shared_folder(path, "theta_ckpt")

    def shared_folder(self, path: str, name: str) -> str:
        """`path`, or its copy at <run storage>/models/<name> when run.storage_uri is set and it is a local folder."""
        if self.cfg.run.storage_uri and is_local_path(path) and Path(path).expanduser().is_dir():
            path = upload_dir(str(Path(path).expanduser()), join_uri(self.storage, "models", name))
            self.log(f"{'θ_ckpt' if name == 'theta_ckpt' else name} uploaded to {path}")
        return path

    def resolve_tokenizer(self) -> str | None:
        """model.tokenizer when it names a GGUF file or a packaged checkpoint: θ_ckpt's folder for the same source,
        else its own converted folder (shared like θ_ckpt's); None otherwise (`run_context` decides)."""
        m = self.cfg.model
        if not is_gguf_source(m.tokenizer):
            return None
        if m.tokenizer == m.checkpoint:
            return self.state.theta_ckpt
        return self.shared_folder(resolve_gguf(m.tokenizer, log=self.log), "tokenizer")

    def buffer_uri(self) -> str:
        return self.cfg.buffer.uri or join_uri(self.storage, "buffer")

    def seed_buffer(self) -> None:
        """Prompts of every problem, and the human programs of the loop's problems (of the whole train split
        with `buffer.human_programs: train`; of the warm start's problems only, none of the loop's, with
        `warm_start`), executed as stored: a program longer than `model.target_len` is stored cut at the limit,
        and its reward is that of the cut text."""
        m, tok, mode = self.cfg.model, self.tokenizer, self.cfg.buffer.human_programs
        fmt = self.ctx.text_format()
        seeded = seeded_problems(self.train, self.warm_start_problems, mode)
        everything = prompted_problems(self.train, seeded, [p for probs in self.eval_sets.values() for p in probs])
        self.buffer.put_prompts(prompt_rows(everything, tok, max_len=m.source_len, text_format=fmt))
        if not any(p.references for p in seeded):
            raise ConfigError(f"suite {self.cfg.suite.name!r}: the train problems have no human programs")
        with Executor(**executor_kwargs(self.cfg)) as ex:
            rows, infra = human_rows(seeded, tok, m.target_len, ex, run_id=self.state.run_id, text_format=fmt)
        stopped = stopped_references(seeded, fmt)
        if stopped:
            self.log(f"{stopped} human programs hold a stop string of model.stop_strings {list(fmt.stop_strings)}: "
                     f"left out (no episode reaches past one)")
        if infra:
            self.log(f"{infra} human programs got no verdict (sandbox failures on every re-run): not written")
        self.state.infra_failures += infra
        # one seed per suite and tokenizer: a second run sharing the buffer (buffer.uri) adds nothing twice
        scope = "" if mode != "warm_start" and len(seeded) == len(self.train) else f"-{mode}{len(seeded)}"
        self.buffer.append(rows, batch_key=f"human-seed-{self.cfg.suite.name}{scope}-{self.tokenizer_hash[:12]}")
        self.state.human_rows = len(rows)
        passed, cut = sum(r["outcome"] == "passed" for r in rows), sum(r["truncated"] for r in rows)
        self.state.human_truncated = cut
        self.log(f"buffer seeded: {len(rows)} human programs ({passed} pass their tests as stored; {cut} cut at "
                 f"{m.target_len} tokens, labelled by the cut text)")

    # ------------------------------------------------------------------------------------------ the steps
    def rollout(self, it: int) -> dict | None:
        """Sample and score programs of this iteration's train problems into the buffer, within the budget."""
        cfg, st = self.cfg, self.state
        r, sampling, request = cfg.rollout, cfg.rollout.settings(cfg.model), self.algorithm.rollout_request()
        indices = iteration_slice(len(self.train), r.problems_per_iteration, it)
        per_problem = sampling.m + (1 if request.greedy_baseline else 0)
        if cfg.run.budget_programs is not None:
            left = cfg.run.budget_programs - st.programs_sampled
            indices = indices[: max(0, left // per_problem)]
        if not indices:
            return None
        tasks = make_tasks(f"{st.run_id}-it{it}", indices, r.problems_per_task, it, cfg.run.seed)
        started = time.time()
        bar = self.bar(len(indices) * per_problem, f"rollout it{it} (sample+execute)")
        summaries = self.pool.rollout(tasks, self.policy_ref(), sampling, request,
                                      on_result=lambda task, s: bar.update(s["programs"]))
        bar.close()
        wall = time.time() - started
        total = {k: sum(s[k] for s in summaries)
                 for k in ("programs", "written", "passed", "executed", "greedy", "infra")}
        out = {**total, "reward_mean": sum(s["reward_sum"] for s in summaries) / max(1, total["programs"]),
               "exec_s": sum(s["exec_s"] for s in summaries), "wall_s": wall,
               "tasks_wall_s": sum(s["wall_s"] for s in summaries),
               "pass_rate": total["passed"] / max(1, total["programs"]),
               "programs_per_s": total["programs"] / max(wall, 1e-9), "policy_version": st.policy_version}
        self.log(f"rollout it{it}: {out['programs']} programs ({out['written']} new rows), pass rate "
                 f"{out['pass_rate']:.3f}, {out['programs_per_s']:.1f} programs/s"
                 + (f"; {out['infra']} without a verdict (sandbox failures: not written)" if out["infra"] else ""))
        return out

    def scoped(self, plan: StagePlan) -> StagePlan:
        """The plan's rows (and its targets' rows) restricted to this run's suite and tokenizer: a buffer shared
        by several runs (`buffer.uri`) may hold other suites' rows, and rows of another tokenizer's token ids (a
        plan that names its own suites or tokenizer hash keeps them)."""

        def within(rows: Rows) -> Rows:
            f = rows.filters
            return dataclasses.replace(rows, filters=dataclasses.replace(
                f, suites=(self.cfg.suite.name,) if f.suites is None else f.suites,
                tokenizer_hash=self.tokenizer_hash if f.tokenizer_hash is None else f.tokenizer_hash))

        targets = plan.targets and dataclasses.replace(plan.targets, rows=within(plan.targets.rows))
        return dataclasses.replace(plan, rows=within(plan.rows), targets=targets)

    def fill_targets(self, plan: StagePlan) -> int:
        if plan.targets is None:
            return 0
        b = self.cfg.buffer
        job = self.target_job(plan)
        started = time.time()
        n = fill_targets(self.buffer, job, num_cpus=b.targets_cpus, num_gpus=b.targets_gpus,
                         pool=self.pool if b.targets_via == "actors" else None)
        self.log(f"targets for {plan.label or plan.name}: {n} rows filled ({', '.join(plan.targets.columns)}) in "
                 f"{time.time() - started:.0f}s")
        return n

    def target_job(self, plan: StagePlan) -> TargetJob:
        b, cfg = self.cfg.buffer, self.cfg
        return TargetJob(AlgorithmRef(cfg.algorithm.name, cfg.algorithm, self.ctx, tuple(cfg.imports)), plan.targets,
                         pad_id(self.tokenizer), batch_size=b.targets_batch_size,
                         threads=max(1, math.ceil(b.targets_cpus)))

    def sampler_spec(self, plan: StagePlan):
        """The configured sampler draws the generated rows of ρ_real-mixed stages (ages counted from the policy
        version being learned from); unmixed ones (on-policy readers, ReST-EM) read uniformly whatever it says
        (None)."""
        mixed = plan.rows.rho_real is not None
        return self.cfg.buffer.sampler.spec(plan.name, self.state.policy_version) if mixed else None

    def stage_job(self, plan: StagePlan, it: int, prioritized: bool = False) -> StageJob:
        cfg, st = self.cfg, self.cfg.stage(plan.name)
        return StageJob(algorithm=cfg.algorithm.name, algorithm_config=cfg.algorithm, context=self.ctx, plan=plan,
                        optim=st, imports=tuple(cfg.imports), seed=cfg.run.seed + it, progress=cfg.run.progress,
                        step_offset=it * st.steps, policy_version=self.state.policy_version,
                        # a stage's priorities are its own TD errors
                        priority_table=plan.name if prioritized else None)

    def learn(self, plan: StagePlan, it: int, running: dict[str, str]):
        """Train one stage; `running` ({label: Ray Train run name}, saved in state.json before the stage starts)
        names the run an interrupted attempt left, which continues from its last checkpoint."""
        cfg = self.cfg
        st = cfg.stage(plan.name)
        label = plan.label or plan.name
        resume = label in running
        name = running.setdefault(label, f"{label}-iter{it}-{uuid.uuid4().hex[:6]}")
        self.state.save(self.run_dir)
        rows = plan.rows
        sampler = self.sampler_spec(plan)
        job = self.stage_job(plan, it, prioritized=sampler is not None and sampler.prioritized)
        dataset = self.buffer.ray_dataset(
            st.batch_size_per_worker, job.batches_needed(st.num_workers), rho_real=rows.rho_real,
            filters=rows.filters, seed=cfg.run.seed * 1000 + it,
            targets_fingerprint=plan.targets.fingerprint if plan.targets else None,
            # sample_id: the read counts; policy_version: the lags of the generated rows read
            extra_columns=(*rows.extra_columns, "sample_id", "policy_version"), num_cpus=cfg.buffer.dataset_cpus,
            sampler=sampler)
        scaling = ScalingSpec(num_workers=st.num_workers, use_gpu=st.use_gpu, cpus_per_worker=st.cpus_per_worker,
                              gpus_per_worker=st.gpus_per_worker)
        workers = max(1, st.num_workers)  # 0: Ray Train's local mode, one process
        persistent = cfg.run.learner_kind() == "persistent"  # it runs an interrupted stage again from its start
        again = ", run again from its start" if persistent else ", continued from its last checkpoint"
        self.log(f"stage {label}: {st.steps} steps × {st.batch_size_per_worker}×{workers}×{st.grad_accum} "
                 f"programs ({name}{again if resume else ''})")
        files = dict(storage_path=join_uri(self.storage, "train"), name=name, reads_dir=self.run_dir / READS_DIR / name,
                     tensorboard_dir=self.run_dir / "tensorboard" / label if cfg.run.tensorboard else None,
                     sinks=self.sinks)
        if persistent:
            result = self.learner(plan.name).run_stage(job, dataset, **files)
        else:
            result = train_stage(job, dataset, scaling, resume=resume, **files)
        del running[label]
        last = result.history[-1] if result.history else {}
        self.log(f"stage {label} done in {result.wall_s:.0f}s: " +
                 ", ".join(f"{k}={v:.4g}" for k, v in last.items() if isinstance(v, float)))
        return result

    def learner(self, stage: str) -> LearnerGroup:
        """The persistent learner of `stage` (`run.learner: persistent`), started on first use, kept to the end."""
        if stage not in self.learners:
            st = self.cfg.stage(stage)
            self.learners[stage] = LearnerGroup(stage, ScalingSpec(
                num_workers=st.num_workers, use_gpu=st.use_gpu, cpus_per_worker=st.cpus_per_worker,
                gpus_per_worker=st.gpus_per_worker), tuple(self.cfg.imports))
        return self.learners[stage]

    def drop_learner(self, stage: str) -> None:
        """Kill the persistent learner of `stage` (one of its workers died): `learner(stage)` starts a new one."""
        group = self.learners.pop(stage, None)
        if group is not None:
            group.shutdown()

    def stop_learners(self) -> None:
        for group in self.learners.values():
            group.shutdown()
        self.learners = {}

    def evaluate(self, split: str, label: str, rank: bool) -> dict:
        """Candidates of the published policy on an evaluation split (ranked by the algorithm's ranker when it
        has one and `rank`), written under eval/<label>/; never appended to the learners' buffer."""
        tasks, sampling, ranker = self.evaluation_tasks(split, rank)
        policy, started = self.policy_ref(), time.time()
        bar = self.bar(len(self.eval_sets[split]) * sampling.m, f"evaluate {label}")
        parts = self.pool.candidates(tasks, policy, sampling, split, ranker=ranker,
                                     examples=self.cfg.evaluation.filtered,
                                     on_result=lambda task, out: bar.update(len(out["records"])))
        bar.close()
        return self.write_evaluation(parts, split, label, policy, ranker, sampling, started)

    def evaluation_tasks(self, split: str, rank: bool):
        """(tasks, sampling settings, ranker or None) of an evaluation of `split`."""
        ev, problems = self.cfg.evaluation, self.eval_sets[split]
        ranker = self.algorithm.ranker(self.state.algorithm) if rank and ev.rank else None
        # the same task keys and seeds for every evaluation of a split (common random numbers: the policies
        # compared in the final table draw their candidates with the same sampler seeds, problem by problem)
        tasks = make_tasks(f"eval-{split}", range(len(problems)), self.cfg.rollout.problems_per_task, -1,
                           self.cfg.run.seed)
        return tasks, ev.settings(self.cfg.model), ranker

    def write_evaluation(self, parts: list[dict], split: str, label: str, policy: PolicyRef, ranker, sampling,
                         started: float) -> dict:
        """eval/<label>/ from the actors' candidate parts of `policy`; the record the run keeps."""
        ev = self.cfg.evaluation
        infra = sum(part["infra"] for part in parts)
        self.state.infra_failures += infra
        folder = self.run_dir / "eval" / label
        metrics = write_evaluation(folder, [r for part in parts for r in part["records"]], ks=ev.ks,
                                   ci_level=ev.confidence, seed=self.cfg.run.seed,
                                   meta={"label": label, "split": split, "policy": dataclasses.asdict(policy),
                                         "infra_failures": infra,
                                         "ranker": None if ranker is None else ranker.label,
                                         "sampling": dataclasses.asdict(sampling)})
        o = metrics["overall"]
        self.log(f"evaluation {label} ({time.time() - started:.0f}s): {o['n_problems']} problems × {sampling.m} "
                 f"samples: pass@1 {pct(_get(o, 'pass', 1))}"
                 + (f", ranked pass@1 {pct(_get(o, 'ranked_pass', 1))}" if ranker is not None else ""))
        return {"label": policy.label, "split": split, "dir": str(folder), "overall": o,
                "by_difficulty": metrics.get("by_difficulty", {}), "wall_s": time.time() - started}

    def probe(self, it: int) -> None:
        """Pass rate of the published policy on a fixed probe set of train problems (Figure 1), outside the
        budget and never written to the buffer; iteration -1 is the warm start."""
        job = self.probe_tasks(it)
        if job is not None:
            tasks, sampling = job
            self.record_probe(it, self.pool.candidates(tasks, self.policy_ref(), sampling, "train"))

    def probe_tasks(self, it: int):
        """(tasks, sampling) of the probe after iteration `it`, or None (no probe set, or probed already)."""
        n = min(self.cfg.run.probe_problems, len(self.train))
        if n == 0 or any(p["iteration"] == it for p in self.state.probe):
            return None
        r = self.cfg.rollout
        sampling = dataclasses.replace(r.settings(self.cfg.model), m=self.cfg.run.probe_samples)
        return make_tasks("probe", range(n), r.problems_per_task, -1, self.cfg.run.seed), sampling

    def record_probe(self, it: int, parts: list[dict]) -> None:
        records = [x for part in parts for x in part["records"]]
        rate = sum(x.passed for x in records) / max(1, len(records))
        self.state.probe.append({"iteration": it, "pass_rate": rate, "programs": len(records)})
        self.scalar("probe/pass_rate", rate, it + 1)
        self.log(f"probe set ({min(self.cfg.run.probe_problems, len(self.train))} train problems × "
                 f"{self.cfg.run.probe_samples}): pass rate {rate:.3f}")

    def iteration(self, it: int) -> dict | None:
        cfg, st, algo = self.cfg, self.state, self.algorithm
        started = time.time()
        # 1. rollout
        roll = self.rollout(it)
        if roll is None:
            self.log(f"budget of {cfg.run.budget_programs} programs used: the run ends before iteration {it}")
            return None
        st.programs_sampled += roll["programs"]
        st.programs_executed += roll["executed"]
        st.infra_failures += roll["infra"]
        if st.in_progress is None or st.in_progress["iteration"] != it:  # (else: resumed inside this iteration)
            st.in_progress = {"iteration": it, "algorithm": copy.deepcopy(st.algorithm), "stages": {}, "running": {}}
        progress = st.in_progress
        record: dict[str, Any] = {"iteration": it, "rollout": roll, "stages": progress["stages"]}
        if self.schedule.release_actors:
            self.stop_pool()  # their GPUs go to the learners (bcoder_ray.loop.resources)
        learner_s = steps = 0.0
        for stage in self.pending_stages(it, progress):
            plan = stage.plan
            # 2. targets
            targets_started = time.time()
            filled = self.fill_targets(plan)
            targets_s = time.time() - targets_started  # a phase of its own (experiments/estimate_async.py)
            # 3. learn
            result = self.learn(plan, it, progress["running"])
            self.stage_done(stage, it, result.checkpoint_dir, {"wall_s": result.wall_s, "targets_filled": filled,
                                                              "targets_s": targets_s,
                                                              "staleness": result.lags.to_json(),
                                                              **result.metrics})
            learner_s += result.wall_s
            steps += cfg.stage(plan.name).steps
        # 4. publish: the actors load the new policy by path on their next task
        st.policy, st.policy_version = algo.policy(st.algorithm), version_name(st.run_id, it + 1)
        if self.pool is None:
            self.start_pool()
        # 5. evaluate
        split = cfg.suite.validation_split
        if split and (it == cfg.run.iterations - 1 or (it + 1) % cfg.evaluation.every == 0):
            record["eval"] = self.evaluate(split, f"iter{it}", rank=True)
        self.probe(it)
        # 6. record (the actors are busy through the rollout's tasks and the evaluations; the learner through
        # its stages)
        wall = time.time() - started
        actors_s = roll["tasks_wall_s"] + cfg.rollout.num_actors * (record.get("eval") or {}).get("wall_s", 0.0)
        record["busy"] = busy_record(wall, actors_s, cfg.rollout.num_actors, learner_s, roll["programs"], steps)
        self.record_totals(it, record, wall)
        return record

    def pending_stages(self, it: int, progress: dict) -> Iterator[WindowedStage]:
        """The stages of iteration `it` still to run, bound (`prepare_stage`), scoped and within the staleness
        window (human rows only while no generated row is old enough); a stage finished before an interruption is
        not redone, and a `skip_if_empty` stage with no rows is recorded as skipped."""
        algo, st = self.algorithm, self.state
        for plan in algo.plan_iteration(it, copy.deepcopy(progress["algorithm"]), st.policy_version):
            plan = bounded(self.scoped(algo.prepare_stage(plan, st.algorithm)), self.cfg.algorithm, st.policy_version)
            label = plan.label or plan.name
            if label in progress["stages"]:
                self.log(f"stage {label}: finished before the interruption; not redone")
                continue
            if plan.skip_if_empty and not self.buffer.read(columns=["sample_id"], filters=plan.rows.filters).num_rows:
                self.log(f"stage {label}: no buffer rows match {plan.rows.filters}; skipped")
                algo.after_stage(plan, None, it, st.algorithm)
                progress["stages"][label] = {"skipped": True}
                st.save(self.run_dir)
                continue
            stage = human_rows_while_none_is_old_enough(plan, self.buffer)
            if stage.human_rows_only:
                self.log(f"stage {label}: no generated row is {window_text(plan.rows.filters)} yet: its batches "
                         f"are human rows only")
            yield stage

    def stage_done(self, stage: WindowedStage, it: int, checkpoint: str, metrics: dict) -> None:
        """Record a finished stage: its checkpoint in the algorithm's state, its numbers in the iteration's."""
        st, plan = self.state, stage.plan
        self.algorithm.after_stage(plan, checkpoint, it, st.algorithm)
        st.in_progress["stages"][plan.label or plan.name] = {
            "checkpoint": checkpoint,
            **({"human_rows_only": True} if stage.human_rows_only else {}),
            **{k: v for k, v in metrics.items() if isinstance(v, (int, float)) or k == "staleness"}}
        st.save(self.run_dir)  # a resume continues after this stage

    def record_totals(self, it: int, record: dict, wall: float) -> None:
        st = self.state
        record["buffer_rows"] = int(self.buffer.stats().samples.rows)
        record["programs_sampled_total"] = st.programs_sampled
        record["programs_executed_total"] = st.programs_executed
        record["wall_s"] = wall
        self.record_scalars(it, record)

    def record_scalars(self, it: int, record: dict) -> None:
        roll = record["rollout"]
        self.scalar("buffer/rows", record.get("buffer_rows"), it)
        for key in ("pass_rate", "reward_mean", "programs_per_s"):
            self.scalar(f"rollout/{key}", roll[key], it)
        self.scalar("rollout/programs_sampled_total", record["programs_sampled_total"], it)
        self.scalar("rollout/programs_executed_total", record["programs_executed_total"], it)
        if "eval" in record:
            self.eval_scalars(it, record["eval"])
        for key in ("actors_busy", "learner_busy", "programs_per_s", "optimizer_steps_per_s"):
            self.scalar(f"throughput/{key}", record["busy"].get(key), it)
        self.scalar("time/iteration_s", record["wall_s"], it)
        for label, stage in record["stages"].items():
            if stage.get("staleness"):
                write_lags(self.scalar, self.writer, label, LagCounts.from_json(stage["staleness"]), it)

    def eval_scalars(self, it: int, result: dict) -> None:
        o = result["overall"]
        for k in self.cfg.evaluation.ks:
            self.scalar(f"eval/pass@{k}", _get(o, "pass", k), it)
            self.scalar(f"eval/ranked_pass@{k}", _get(o, "ranked_pass", k), it)

    # ------------------------------------------------------------------------------------------ the loop
    def train_loop(self) -> None:
        cfg, st = self.cfg, self.state
        if cfg.run.mode == "async":  # the actors never wait for the learner: bcoder_ray.loop.async_driver
            AsyncLoop(self).train_loop()
            return
        self.baselines()
        for it in range(st.completed_iterations, cfg.run.iterations):
            self.log(f"iteration {it + 1}/{cfg.run.iterations} ({cfg.algorithm.name})")
            record = self.iteration(it)
            if record is None:
                break
            self.completed(it, record)
        self.finish()

    def baselines(self) -> None:
        """θ_ckpt on the validation and test splits and the probe set, once, before the first iteration."""
        cfg, st = self.cfg, self.state
        su, ev = cfg.suite, cfg.evaluation
        if ev.warm_start_baseline and st.completed_iterations == 0 and st.policy is None:
            if su.validation_split and st.baseline is None:
                st.baseline = self.evaluate(su.validation_split, "warm-start", rank=False)
            if st.baseline_test is None:
                st.baseline_test = self.evaluate(su.test_split, "warm-start-test", rank=False)
            self.probe(-1)
            st.save(self.run_dir)

    def completed(self, it: int, record: dict) -> None:
        st = self.state
        st.iterations.append(record)
        st.completed_iterations = it + 1
        st.in_progress = None
        st.save(self.run_dir)
        write_metrics_lines(self.run_dir, st)

    def finish(self) -> None:
        """The last policy on the test split (once) and the read counts of the run's rows."""
        st = self.state
        if st.final_test is None and st.iterations:
            st.final_test = self.evaluate(self.cfg.suite.test_split, "final-test", rank=True)
            st.save(self.run_dir)
        if st.iterations:
            st.reuse = reuse_stats(self.run_dir, self.buffer, st.run_id)
            st.save(self.run_dir)

    def execute(self) -> RunSummary:
        with contextlib.ExitStack() as stack:
            self.setup(stack)
            self.train_loop()
        table = final_table(self.state, self.cfg)
        (self.run_dir / TABLE_FILE).write_text(table)
        if self.state.probe:
            plot_budget_curve({self.cfg.algorithm.name: [probe_points(self.state)]}, self.run_dir / PROBE_FIGURE)
        return RunSummary(self.run_dir, self.state, table)


def run(plan: RunPlan, worker_cls: type | None = None) -> RunSummary:
    """Run (or resume) the loop described by `plan`; returns the final table and state. `worker_cls`: a
    `rollout.PolicyWorker` subclass for the actors (tests inject faults with it)."""
    return Run(plan, worker_cls).execute()
