"""`run.mode: async`: the actors never wait for the learner (a `driver.Run` hands its train loop to `AsyncLoop`).

setup: as the sync recipe (`driver.Run.setup`); the warm start evaluated before the stream starts
the stream: every actor holds a rollout task of the train problems (round after round of
        `rollout.problems_per_iteration`, keys `<run_id>-a<round>-t<k>`), and is handed the next as it replies,
        with the newest published policy, until `run.budget_programs`
for each round (until `run.iterations`), while the stream runs:
    for each stage the algorithm plans (as in sync mode):
        # targets   the learner fills the cached targets of the rows that arrived, before each chunk of steps
        # learn     `publish_every` optimiser steps at a time, on a sampler over the rows present then
        # publish   after each chunk of a stage whose checkpoint is the policy, and at its end: a new version
    # evaluate  the validation split and the probe set on the actors, between their rollout tasks
    # record    state.json, metrics.jsonl, TensorBoard (busy fractions, programs/s, steps/s)
end: no new rollout task, the ones in flight land; the last policy on the test split; read counts; the table

What differs from sync mode: an iteration is the learner's round, not a rollout; a stage reads whatever rows
(with targets) the buffer holds when each chunk starts, of any policy version; the policy changes every
`publish_every` steps of the policy's stage. A stage's optimiser and schedule are still per round, as in sync
mode (the networks are kept: `bcoder_ray.loop.learner_group`).

Faults (docs/architecture.md, "The asynchronous loop", has the guarantees). A rollout actor that dies is restarted
by Ray and its task retried under its key (`rollout.max_restarts`); a retried task whose rows landed is counted
from them, not sampled again (`ReplayBuffer.batch_rows`). A learner worker that dies loses its group: a new one
continues the stage from its last resumable checkpoint (`stages.<stage>.checkpoint_every`: parameters, optimiser,
schedule, RNG, step; the step is the data position, since each chunk's sampler is seeded by it). Resume
(`--resume` after the driver died): completed rounds are skipped, the interrupted round's finished stages are not
redone and the running one continues from its last resumable checkpoint (`in_progress["resumable"]`); the rollout
tasks recorded as landed (`RunState.rollout_done`) are not handed out again, and one in flight at the
interruption is redone under its key: the buffer writes nothing twice and a task whose rows landed is not
sampled again.

Each chunk opens a new sampler so that it sees the rows that arrived; its first batch fills a fresh shuffle
window (up to 8192 rows a stream, with their targets), about 1-2 ms of CPU a part file read (measured on a
synthetic buffer: 10, 100, 1000 parts of 16 rows 0.02, 0.25, 2.0 s; of 64 rows 0.02, 0.17, 0.8 s). The learner
keeps its `ReplayBuffer`, so the footers (0.3 ms a part, read again by every new one) are read once a file.
"""

from __future__ import annotations

import copy
import itertools
import time
import uuid
from dataclasses import replace
from typing import Any, Iterator

from bcoder_ray.algorithms.base import StagePlan
from bcoder_ray.loop.learner_group import SamplerSource
from bcoder_ray.loop.rollout import Task, iteration_slice, make_tasks
from bcoder_ray.loop.rollout_stream import CallFailed, RolloutStream
from bcoder_ray.loop.run_folder import version_name, write_metrics_lines
from bcoder_ray.loop.run_table import busy_record
from bcoder_ray.loop.stage_channel import stage_channel
from bcoder_ray.util.storage import join_uri
from bcoder_ray.evaluation.reuse import READS_DIR

_PROBE = "\0probe"  # a stand-in checkpoint path: does a stage's checkpoint become the published policy?


class AsyncLoop:
    """The async train loop of one `driver.Run` (its setup, actors, learners, evaluation and records)."""

    def __init__(self, run: Any):
        self.run, self.cfg, self.state, self.algorithm = run, run.cfg, run.state, run.algorithm
        self.published = int(self.state.policy_version.rpartition("/")[2])  # versions published so far

    def train_loop(self) -> None:
        run, cfg, st = self.run, self.cfg, self.state
        run.baselines()
        self.stream = RolloutStream(run.pool.actors, self.rollout_tasks(), cfg.rollout.settings(cfg.model),
                                    self.algorithm.rollout_request(), policy=run.policy_ref,
                                    on_rollout=self.landed)
        # the first stage mixes generated rows into its batches: it starts once the first rollout task landed
        self.stream.wait_until(lambda: st.programs_sampled > 0)
        for it in range(st.completed_iterations, cfg.run.iterations):
            run.log(f"round {it + 1}/{cfg.run.iterations} ({cfg.algorithm.name}, async; policy "
                    f"{st.policy_version})")
            run.completed(it, self.round(it))
        self.stream.drain()
        st.save(run.run_dir)
        run.finish()

    # ------------------------------------------------------------------------------------------ the actors
    def rollout_tasks(self) -> Iterator[Task]:
        """Rounds of rollout tasks over the train problems, the landed ones left out, until the budget."""
        cfg, st, r = self.cfg, self.state, self.cfg.rollout
        per_problem = r.samples_per_problem + (1 if self.algorithm.rollout_request().greedy_baseline else 0)
        done, handed = set(st.rollout_done), st.programs_sampled
        for rnd in itertools.count():
            indices = iteration_slice(len(self.run.train), r.problems_per_iteration, rnd)
            for task in make_tasks(f"{st.run_id}-a{rnd}", indices, r.problems_per_task, rnd, cfg.run.seed):
                if task.key in done:
                    continue
                if cfg.run.budget_programs is not None:
                    left = (cfg.run.budget_programs - handed) // per_problem
                    if left <= 0:
                        return
                    task = replace(task, problem_indices=task.problem_indices[:left])
                handed += per_problem * len(task.problem_indices)
                yield task

    def landed(self, task: Task, summary: dict) -> None:
        st = self.state
        st.programs_sampled += summary["programs"]
        st.programs_executed += summary["executed"]
        st.infra_failures += summary["infra"]
        st.rollout_done.append(task.key)
        if summary.get("landed"):
            self.run.log(f"rollout task {task.key}: its {summary['programs']} rows had landed before the "
                         f"interruption; counted, not sampled again")
        st.save(self.run.run_dir)

    # ------------------------------------------------------------------------------------------ a round
    def round(self, it: int) -> dict:
        run, cfg, st = self.run, self.cfg, self.state
        started = time.time()
        if st.in_progress is None or st.in_progress["iteration"] != it:
            st.in_progress = {"iteration": it, "algorithm": copy.deepcopy(st.algorithm), "stages": {}, "running": {}}
        record: dict[str, Any] = {"iteration": it, "stages": st.in_progress["stages"]}
        learner_s = steps = 0.0
        for stage in run.pending_stages(it, st.in_progress):
            checkpoint, metrics = self.learn(stage.plan, it)
            run.stage_done(stage, it, checkpoint, metrics)
            self.publish(st.algorithm)
            learner_s += metrics["learner_busy_s"]
            steps += metrics["step"] - metrics["resumed_from_step"]  # the steps this process saw taken
        # evaluate beside the actors, on the policy published now
        split = cfg.suite.validation_split
        if split and (it == cfg.run.iterations - 1 or (it + 1) % cfg.evaluation.every == 0):
            self.evaluate_beside(split, f"iter{it}", it, record)
        probe = run.probe_tasks(it)
        if probe is not None:
            tasks, sampling = probe
            self.stream.candidates(tasks, run.policy_ref(), sampling, "train", None, False,
                                   lambda parts: run.record_probe(it, parts))
        # record: what the actors did during the round
        c, wall = self.stream.take(), time.time() - started
        record["rollout"] = {"programs": c.programs, "written": c.written, "passed": c.passed,
                             "executed": c.executed, "infra": c.infra, "tasks": c.tasks,
                             "pass_rate": c.passed / max(1, c.programs), "reward_mean": c.reward_sum / max(1, c.programs),
                             "programs_per_s": c.programs / max(wall, 1e-9), "policy_version": st.policy_version}
        # the fractions over the stream's window (since its last take), which holds every second counted busy
        record["busy"] = busy_record(time.time() - c.since, c.busy_s, cfg.rollout.num_actors, learner_s, c.programs,
                                     steps)
        run.record_totals(it, record, wall)
        b = record["busy"]
        run.log(f"round {it + 1}: {c.programs} programs sampled beside {steps:.0f} optimiser steps in {wall:.0f}s; "
                f"actors busy {b['actors_busy']:.2f}, learner busy {b['learner_busy']:.2f}")
        return record

    def learn(self, plan: StagePlan, it: int) -> tuple[str, dict]:
        """One stage on the persistent learner, `publish_every` steps at a time, the actors sampling meanwhile. A
        learner worker that dies (or a call that fails) loses its group: a new one is built and the stage continues
        from its last resumable checkpoint (`checkpoint_every`; from its start without one), up to its group's
        `ScalingSpec.max_failures` times (1, as Ray Train restarts a per-stage run's workers); then the run stops,
        and `--resume` continues the stage from that checkpoint too."""
        run, st = self.run, self.state
        label = plan.label or plan.name
        # the stage's folder under train/ (its published steps, resumable checkpoints, final checkpoint), kept in
        # state.json so that a resumed run continues the same one
        name = st.in_progress["running"].setdefault(label, f"{label}-iter{it}-{uuid.uuid4().hex[:6]}")
        st.save(run.run_dir)
        failures = 0
        while True:
            try:
                checkpoint, metrics = self.learn_attempt(plan, it, name)
                break
            except CallFailed as e:
                group = run.learner(plan.name)
                if failures >= group.scaling.max_failures:
                    raise RuntimeError(f"stage {label}: its learner failed {failures + 1} times, the last: {e}; "
                                       f"`--resume {run.run_dir}` continues it from its last resumable checkpoint "
                                       f"(stages.{plan.name}.checkpoint_every)") from e
                failures += 1
                resume = st.in_progress.get("resumable", {}).get(label)
                run.log(f"stage {label}: a learner call failed ({str(e).splitlines()[0][:200]}); the learner is "
                        f"built again and continues from " + (f"step {resume['step']}" if resume else "step 0"))
                run.drop_learner(plan.name)
        st.in_progress["running"].pop(label, None)
        st.in_progress.get("resumable", {}).pop(label, None)
        return checkpoint, {**metrics, "learner_failures": failures}

    def learn_attempt(self, plan: StagePlan, it: int, name: str) -> tuple[str, dict]:
        """The stage from its last resumable checkpoint (recorded in state.json), or from its start."""
        import ray

        run, cfg, st, stream = self.run, self.cfg, self.state, self.stream
        o, label = cfg.stage(plan.name), plan.label or plan.name
        job, group = run.stage_job(plan, it), run.learner(plan.name)
        targets = run.target_job(plan) if plan.targets is not None else None
        is_policy = self.is_policy(plan, it)
        resumable = st.in_progress.setdefault("resumable", {})
        busy = filled = 0
        started = time.time()
        resume = resumable.get(label)
        info = stream.wait(group.begin_async(job, resume["checkpoint"] if resume else None))[0]
        done = checkpointed = info["step"]
        history: list[dict] = info["history"]
        run.log(f"stage {label}: {o.steps} steps, publishing every {cfg.run.publish_every}"
                f"{' (networks kept from the last round)' if info['kept'] else ''}"
                f"{f', continued from step {done}' if done else ''}")
        with stage_channel(o.steps, f"train {label}", progress=cfg.run.progress, step_offset=job.step_offset,
                           tensorboard_dir=run.run_dir / "tensorboard" / label if cfg.run.tensorboard else None,
                           tag=label, reads_dir=run.run_dir / READS_DIR / name, sinks=run.sinks) as channel:
            while done < o.steps:
                n = min(cfg.run.publish_every, o.steps - done)
                t0 = time.time()
                if targets is not None:  # the rows that arrived since the last chunk get their targets first
                    filled += stream.wait(group.fill_targets_async(targets))[0]
                # the data position is the step: a continued stage opens the sampler a chunk from there opens
                source = SamplerSource(run.buffer_uri(), o.batch_size_per_worker, plan.rows.rho_real,
                                       plan.rows.filters, seed=cfg.run.seed * 1_000_003 + it * 10_007 + done,
                                       targets_fingerprint=plan.targets.fingerprint if plan.targets else None,
                                       extra_columns=(*plan.rows.extra_columns, "sample_id", "policy_version"))
                history += stream.wait(group.train_async(n, source, channel))[0]["entries"]
                done += n
                if is_policy and done < o.steps:
                    path = stream.wait(group.save_async(join_uri(run.storage, "train", name, f"step-{done:06d}")))[0]
                    scratch = copy.deepcopy(self.state.algorithm)
                    self.algorithm.after_stage(plan, path, it, scratch)
                    self.publish(scratch)
                every = o.checkpoint_every
                if every and done < o.steps and done // every > checkpointed // every:
                    # at the first chunk's end at or past each checkpoint_every steps; recorded once written whole
                    folder = join_uri(run.storage, "train", name, f"resume-{done:06d}")
                    resumable[label] = {"checkpoint": stream.wait(group.save_resumable_async(folder))[0],
                                        "step": done}
                    checkpointed = done
                    st.save(run.run_dir)
                busy += time.time() - t0
            t0 = time.time()
            checkpoint = stream.wait(group.save_async(join_uri(run.storage, "train", name, "final"), channel))[0]
            busy += time.time() - t0
            lags = ray.get(channel.get_lags.remote())  # against the version current when the stage began
        wall = time.time() - started
        last = history[-1] if history else {}
        run.log(f"stage {label} done in {wall:.0f}s ({filled} rows' targets filled): " +
                ", ".join(f"{k}={v:.4g}" for k, v in last.items() if isinstance(v, float)))
        return checkpoint, {**last, "wall_s": wall, "targets_filled": filled, "learner_busy_s": busy,
                            "staleness": lags.to_json(), "model_kept": float(info["kept"]),
                            "model_setup_s": info["setup_s"], "step": done, "resumed_from_step": info["step"]}

    def is_policy(self, plan: StagePlan, it: int) -> bool:
        """Whether the stage's checkpoint becomes the published policy (B-Coder's θ, not φ)."""
        scratch = copy.deepcopy(self.state.algorithm)
        self.algorithm.after_stage(plan, _PROBE, it, scratch)
        return self.algorithm.policy(scratch) == _PROBE

    def publish(self, algorithm_state: dict) -> None:
        """The policy of `algorithm_state`, when it is new, as the next version: the actors load it by path on
        their next task."""
        st = self.state
        policy = self.algorithm.policy(algorithm_state)
        if policy is None or policy == st.policy:
            return
        self.published += 1
        st.policy, st.policy_version = policy, version_name(st.run_id, self.published)
        st.save(self.run.run_dir)

    def evaluate_beside(self, split: str, label: str, it: int, record: dict) -> None:
        """Queue an evaluation of the policy published now; its result joins the round's record when it is back."""
        run = self.run
        tasks, sampling, ranker = run.evaluation_tasks(split, rank=True)
        policy, started = run.policy_ref(), time.time()

        def done(parts: list[dict]) -> None:
            record["eval"] = run.write_evaluation(parts, split, label, policy, ranker, sampling, started)
            run.eval_scalars(it, record["eval"])
            if any(r is record for r in self.state.iterations):  # recorded before its evaluation came back
                self.state.save(run.run_dir)
                write_metrics_lines(run.run_dir, self.state)

        self.stream.candidates(tasks, policy, sampling, split, ranker, self.cfg.evaluation.filtered, done)
