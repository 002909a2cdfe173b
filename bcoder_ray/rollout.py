"""Rollout on Ray: a pool of policy actors that sample programs with Q (Algorithm 2), score them through the
environment's batch path, and write them to the replay buffer; the same actors sample held-out candidates for
evaluation.

    pool = ActorPool(PolicyWorker, ActorSettings(num_actors=2, num_cpus=0.5), worker_args)
    summaries = pool.map("rollout", tasks, policy, sampling)     # each task's rows appended under task.key
    pool.shutdown()

- `PolicyWorker` holds one `QModel` (loaded by checkpoint path: weights never pass through the driver), a
  tokenizer, the problems it may be asked about, an executor, and the buffer. `rollout(task, policy, sampling)`
  samples m programs for each problem of the task, scores them with `envs.scoring.score_programs`, and appends
  the rows to the buffer with `batch_key = task.key`. `candidates(task, policy, sampling, ...)` does the same for
  held-out problems and returns evaluation candidate records instead of writing to the buffer.
- A task's sampling seed is a function of the task alone, and the buffer's `append` writes nothing for a key it
  already holds, so a task that is redone (its actor died, or the driver was restarted) adds no duplicate rows.
- `ActorPool` hands tasks to free actors as they finish (so a slow actor does not hold up the rest); an actor
  that dies is restarted by Ray (`max_restarts`) and its task is resubmitted, up to `max_task_retries` times.
- Executors scale apart from the actors: with `executor_actors = 0` each policy actor runs its own sandbox
  pool of `executor_workers` processes; with N > 0 the pool starts N `ExecutorWorker` actors (each with its own
  CPU share and sandbox processes) shared by all policy actors, e.g. GPU samplers with CPU executors.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Iterable, Sequence

import ray

from envs.problem import Problem


# ---------------------------------------------------------------------------------------------- plain data


@dataclass(frozen=True)
class PolicySpec:
    """Which networks an actor should hold, by checkpoint path (never by value)."""

    checkpoint: str  # θ_ckpt (a local directory or hub name)
    version: int  # policy_version written with each row: 0 = θ_ckpt, k = θ after iteration k-1
    theta_dir: str | None = None  # None: sample from θ_ckpt itself
    phi_dir: str | None = None  # needed to rank with V_θ when θ uses φ
    gamma: float = 0.999  # of R̃ (eq. 20), as the Q model was trained
    label: str = "ckpt"  # how records name this policy (e.g. "warm-start", "theta-iter2")


@dataclass(frozen=True)
class SamplingSpec:
    n: int  # samples per problem (m)
    temperature: float
    top_p: float
    max_new_tokens: int
    prompts_per_call: int = 4

    def as_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


@dataclass(frozen=True)
class Task:
    """A unit of actor work: some problems (indices into the actor's problem list), under a stable key."""

    key: str
    problem_indices: tuple[int, ...]
    iteration: int
    seed: int


@dataclass
class WorkerArgs:
    """Constructor arguments of `PolicyWorker` (plain data, sent once per actor)."""

    problems: dict[str, list[Problem]]  # by split name
    tokenizer_path: str
    source_len: int
    target_len: int
    buffer_uri: str | None
    executor_workers: int | None = None
    executor_options: dict = field(default_factory=dict)
    num_threads: int = 1
    dtype: str = "float32"


@dataclass(frozen=True)
class ActorSettings:
    num_actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_restarts: int = 3
    max_task_retries: int = 3


def quiet_libraries() -> None:
    """No per-load progress bars from transformers inside actors and workers (they would flood the driver)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def stable_seed(*parts: Any) -> int:
    """A 31-bit seed from any JSON-able parts (run seed, iteration, task index)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "big") & 0x7FFFFFFF


def make_tasks(prefix: str, indices: Sequence[int], per_task: int, iteration: int, seed: int) -> list[Task]:
    """Split problem indices into tasks of `per_task` problems with keys `<prefix>-t<k>` (stable: the same
    arguments give the same keys and seeds, so a redone task writes nothing new)."""
    indices = list(indices)
    tasks = []
    for k, start in enumerate(range(0, len(indices), per_task)):
        tasks.append(Task(key=f"{prefix}-t{k:04d}", problem_indices=tuple(indices[start:start + per_task]),
                          iteration=iteration, seed=stable_seed(seed, prefix, k)))
    return tasks


def iteration_slice(n_problems: int, per_iteration: int | None, iteration: int) -> list[int]:
    """The train problems an iteration rolls out on: all, or the iteration-th window of `per_iteration`
    (wrapping around), so successive iterations see new problems."""
    if per_iteration is None or per_iteration >= n_problems:
        return list(range(n_problems))
    start = (iteration * per_iteration) % n_problems
    return [(start + j) % n_problems for j in range(per_iteration)]


# ---------------------------------------------------------------------------------------------- executors


class ExecutorWorker:
    """A Ray actor around one `envs.execute.Executor` (its sandbox processes live with it)."""

    def __init__(self, workers: int | None, options: dict):
        from envs.execute import Executor

        self._executor = Executor(workers=workers, **options)
        self._executor.__enter__()

    def run_batch(self, jobs):
        return self._executor.run_batch(jobs)


class RemoteExecutor:
    """`run_batch` over a set of `ExecutorWorker` actors: the jobs are split in contiguous chunks, one per actor,
    run in parallel, and gathered in order (so `envs.scoring.score_programs` can use it as its executor)."""

    def __init__(self, handles: Sequence[Any]):
        if not handles:
            raise ValueError("RemoteExecutor needs at least one ExecutorWorker handle")
        self._handles = list(handles)

    def run_batch(self, jobs):
        jobs = list(jobs)
        if not jobs:
            return []
        n = len(self._handles)
        size = -(-len(jobs) // n)
        refs = [h.run_batch.remote(jobs[i * size:(i + 1) * size])
                for i, h in enumerate(self._handles) if jobs[i * size:(i + 1) * size]]
        out = []
        for part in ray.get(refs):
            out.extend(part)
        return out


# ---------------------------------------------------------------------------------------------- the actor


class PolicyWorker:
    """Holds the current policy and samples + scores programs (used as a Ray actor by `ActorPool`)."""

    def __init__(self, args: WorkerArgs, executor_handles: Sequence[Any] | None = None, actor_name: str = ""):
        import torch
        from transformers import AutoTokenizer

        from bcoder_ray.tokenization import encode_prompt, tokenizer_fingerprint

        torch.set_num_threads(max(1, args.num_threads))
        quiet_libraries()
        self.args = args
        self.actor_name = actor_name or f"actor-{os.getpid()}"
        self.tokenizer = AutoTokenizer.from_pretrained(args.tokenizer_path)
        self.tokenizer_hash = tokenizer_fingerprint(self.tokenizer)
        self.problems = args.problems
        self._prompt_ids: dict[str, list[list[int]]] = {
            split: [encode_prompt(self.tokenizer, p.prompt, args.source_len) for p in probs]
            for split, probs in args.problems.items()}
        self._models = None
        self._models_policy: PolicySpec | None = None
        self._executor_handles = list(executor_handles or [])
        self._executor = None
        self._buffer = None
        self._targets = None
        self._targets_spec = None

    # -- resources, created on first use
    def _get_executor(self):
        if self._executor is None:
            if self._executor_handles:
                self._executor = RemoteExecutor(self._executor_handles)
            else:
                from envs.execute import Executor

                self._executor = Executor(workers=self.args.executor_workers, **self.args.executor_options)
                self._executor.__enter__()
        return self._executor

    def _get_buffer(self):
        if self._buffer is None:
            from bcoder_ray.replay_buffer import ReplayBuffer

            if self.args.buffer_uri is None:
                raise RuntimeError("PolicyWorker: no buffer_uri, cannot write rollouts")
            self._buffer = ReplayBuffer(self.args.buffer_uri)
        return self._buffer

    def models(self, policy: PolicySpec, rank: bool = False):
        """`evaluation.LoadedModels` for `policy`, loaded from its checkpoint paths and kept while the policy is
        unchanged (a ranking load serves plain sampling too)."""
        import torch

        from bcoder_ray.evaluation import load_models

        cached = self._models
        if cached is not None and self._models_policy == policy and (cached.ranker is not None or not rank):
            return cached
        self._models = None  # free the old weights first
        self._models = load_models(policy.checkpoint, theta_dir=policy.theta_dir,
                                   phi_dir=policy.phi_dir if rank else None, tokenizer=self.args.tokenizer_path,
                                   label=policy.label, gamma=policy.gamma, rank=rank,
                                   dtype=getattr(torch, self.args.dtype))
        self._models_policy = policy
        return self._models

    def _sample_and_score(self, split: str, task: Task, policy: PolicySpec, sampling: SamplingSpec, *,
                          examples: bool, rank: bool):
        """The one path from problems to scored candidates (`evaluation.sample_and_score`), on this actor's
        models and executor, seeded by the task."""
        from bcoder_ray.evaluation import SamplingSettings, sample_and_score

        settings = SamplingSettings(m=sampling.n, temperature=sampling.temperature, top_p=sampling.top_p,
                                    max_prompt_len=self.args.source_len, max_new_tokens=sampling.max_new_tokens,
                                    seed=task.seed, prompts_per_call=sampling.prompts_per_call)
        problems = [self.problems[split][i] for i in task.problem_indices]
        prompts = [self._prompt_ids[split][i] for i in task.problem_indices]
        return sample_and_score(problems, self.models(policy, rank=rank), self._get_executor(), settings,
                                examples=examples, rank=rank, prompt_ids=prompts,
                                rank_batch_size=max(16, sampling.n))

    def rollout(self, task: Task, policy: PolicySpec, sampling: SamplingSpec, split: str = "train") -> dict:
        """Sample, score and append one task's programs to the buffer under `task.key` (idempotent)."""
        from bcoder_ray.replay_buffer import make_row

        t0 = time.time()
        scored = self._sample_and_score(split, task, policy, sampling, examples=False, rank=False)
        rows = [make_row(c.problem, c.program, c.program_ids, c.result, source="generated",
                         tokenizer_hash=self.tokenizer_hash, iteration=task.iteration,
                         policy_version=str(policy.version), actor=self.actor_name, sampling=sampling.as_json())
                for c in scored]
        written = self._get_buffer().append(rows, batch_key=task.key)
        self._after_write(task)
        results = [c.result for c in scored]
        return {"key": task.key, "programs": len(rows), "written": written,
                "passed": sum(r.passed for r in results), "executed": sum(not r.cached for r in results),
                "reward_sum": float(sum(r.reward for r in results)),
                "exec_s": float(sum(r.wall_time for r in results)), "wall_s": time.time() - t0,
                "actor": self.actor_name}

    def _after_write(self, task: Task) -> None:
        """Hook between the buffer write and the reply (tests inject a crash here)."""

    def candidates(self, task: Task, policy: PolicySpec, sampling: SamplingSpec, split: str, rank: bool,
                   examples: bool) -> list:
        """Evaluation candidate records (`bcoder_ray.metrics.CandidateRecord`) for held-out problems; ranked by
        R̃ when `rank` and the policy is a θ (never written to the buffer)."""
        rank = rank and policy.theta_dir is not None
        scored = self._sample_and_score(split, task, policy, sampling, examples=examples, rank=rank)
        return [c.record() for c in scored]

    def fill_targets(self, chunk, spec, fingerprint: str) -> int:
        """Cached targets for `chunk.table` (rows from `ReplayBuffer.missing_targets`), written under `chunk.key`."""
        from bcoder_ray.learner import TargetComputer, compute_targets_table

        if self._targets_spec != spec:
            self._targets = None
            self._targets = TargetComputer(spec)
            self._targets_spec = spec
        out = compute_targets_table(self._targets, chunk.table, spec.batch_size)
        self._get_buffer().write_targets(out, fingerprint, batch_key=chunk.key)
        return out.num_rows

    def ping(self) -> str:
        return self.actor_name


# ---------------------------------------------------------------------------------------------- the pool


class ActorPool:
    """Policy actors (and optional executor actors) with fault-tolerant dynamic task scheduling."""

    def __init__(self, worker_cls: type, settings: ActorSettings, args: WorkerArgs, executor_actors: int = 0,
                 executor_cpus: float = 1.0, name: str = "policy"):
        self.settings = settings
        self._executors = []
        if executor_actors > 0:
            remote_exec = ray.remote(ExecutorWorker).options(num_cpus=executor_cpus, max_restarts=-1,
                                                             max_task_retries=-1)
            self._executors = [remote_exec.remote(args.executor_workers, args.executor_options)
                               for _ in range(executor_actors)]
        remote_cls = ray.remote(worker_cls).options(
            num_cpus=settings.num_cpus, num_gpus=settings.num_gpus, max_restarts=settings.max_restarts,
            max_task_retries=0)
        self._args_ref = ray.put(args)  # held for the pool's life: a restarted actor is rebuilt from it
        self.actors = [remote_cls.remote(self._args_ref, self._executors, f"{name}-{i}")
                       for i in range(settings.num_actors)]

    def map(self, method: str, tasks: Iterable[Task], *args: Any,
            on_result: Callable[[Task, Any], None] | None = None) -> list[Any]:
        """Run `actor.method(task, *args)` for every task, results in task order, handing each task to the next
        free actor. A task whose actor dies goes back to the queue (any actor may redo it: writes are idempotent
        by task key), up to `max_task_retries` times; the dead actor is restarted by Ray and rejoins the pool once
        it answers a ping."""
        tasks = list(tasks)
        results: list[Any] = [None] * len(tasks)
        retries = [0] * len(tasks)
        pending = list(range(len(tasks)))[::-1]
        in_flight: dict[Any, tuple[str, int, Any]] = {}
        pings: dict[Any, int] = {}
        free = list(self.actors)
        dead = (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError)
        while pending or any(kind == "task" for kind, _, _ in in_flight.values()):
            while pending and free:
                i = pending.pop()
                actor = free.pop(0)
                in_flight[getattr(actor, method).remote(tasks[i], *args)] = ("task", i, actor)
            if not in_flight:
                raise RuntimeError(f"{method}: no live actor left for {len(pending)} task(s)")
            done, _ = ray.wait(list(in_flight), num_returns=1)
            kind, i, actor = in_flight.pop(done[0])
            try:
                value = ray.get(done[0])
            except dead as e:
                if kind == "task":
                    retries[i] += 1
                    if retries[i] > self.settings.max_task_retries:
                        raise RuntimeError(f"task {tasks[i].key}: its actor died {retries[i]} times; "
                                           f"last: {e}") from e
                    pending.append(i)
                else:
                    pings[actor] = pings.get(actor, 0) + 1
                    if pings[actor] > 60:
                        raise RuntimeError(f"an actor did not come back after dying: {e}") from e
                    time.sleep(1.0)
                in_flight[actor.ping.remote()] = ("ping", -1, actor)  # rejoins the pool when it answers
                continue
            if kind == "ping":
                pings.pop(actor, None)
                free.append(actor)
                continue
            results[i] = value
            free.append(actor)
            if on_result is not None:
                on_result(tasks[i], value)
        return results  # pings still in flight (actors still restarting) are simply dropped

    def shutdown(self) -> None:
        for a in self.actors + self._executors:
            ray.kill(a)
        self.actors, self._executors = [], []
