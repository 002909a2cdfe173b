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
    alpha: float = 1.0
    r_max: float = 1.0
    init_from_lm: bool = True
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
        self._model = None
        self._model_key: tuple | None = None
        self._executor_handles = list(executor_handles or [])
        self._executor = None
        self._buffer = None

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

    def model(self, policy: PolicySpec, ranking: bool = False):
        """The QModel for `policy` (loaded from its checkpoint paths; cached while the policy is unchanged)."""
        import torch

        from bcoder_ray.q_model import QModel

        if policy.theta_dir is None:
            parts = ("ckpt",)
        elif ranking and policy.init_from_lm and policy.phi_dir is not None:
            parts = ("theta", "phi")
        else:
            parts = ("theta",)
        key = (policy, parts)
        if self._model_key != key:
            self._model = None  # free the old weights first
            self._model = QModel.create(policy.checkpoint, parts=parts, theta_dir=policy.theta_dir,
                                        phi_dir=policy.phi_dir if "phi" in parts else None, alpha=policy.alpha,
                                        r_max=policy.r_max, init_from_lm=policy.init_from_lm,
                                        dtype=getattr(torch, self.args.dtype))
            self._model_key = key
        return self._model

    def sample(self, split: str, task: Task, policy: PolicySpec, sampling: SamplingSpec) -> list[list[list[int]]]:
        """Program token ids: per problem of the task, `sampling.n` samples (Algorithm 2)."""
        from bcoder_ray.sampling import sample_programs
        from bcoder_ray.tokenization import eos_id, pad_id

        model = self.model(policy)
        prompts = [self._prompt_ids[split][i] for i in task.problem_indices]
        return sample_programs(model, prompts, sampling.n, max_new_tokens=sampling.max_new_tokens,
                               eos_id=eos_id(self.tokenizer), pad_id=pad_id(self.tokenizer),
                               temperature=sampling.temperature, top_p=sampling.top_p, seed=task.seed,
                               batch_size=sampling.prompts_per_call * sampling.n,
                               network="ckpt" if policy.theta_dir is None else "theta")

    def _score(self, split: str, task: Task, program_ids: list[list[list[int]]]):
        from bcoder_ray.tokenization import decode_program
        from envs.scoring import score_programs

        problems, texts, ids = [], [], []
        for i, per_problem in zip(task.problem_indices, program_ids):
            for prog in per_problem:
                problems.append(self.problems[split][i])
                texts.append(decode_program(self.tokenizer, prog))
                ids.append(prog)
        results = score_programs(self._get_executor(), problems, texts)
        return problems, texts, ids, results

    def rollout(self, task: Task, policy: PolicySpec, sampling: SamplingSpec, split: str = "train") -> dict:
        """Sample, score and append one task's programs to the buffer under `task.key` (idempotent)."""
        from bcoder_ray.replay_buffer import make_row

        t0 = time.time()
        program_ids = self.sample(split, task, policy, sampling)
        t1 = time.time()
        problems, texts, ids, results = self._score(split, task, program_ids)
        t2 = time.time()
        rows = [make_row(p, text, prog, res, source="generated", tokenizer_hash=self.tokenizer_hash,
                         iteration=task.iteration, policy_version=str(policy.version), actor=self.actor_name,
                         sampling=sampling.as_json())
                for p, text, prog, res in zip(problems, texts, ids, results)]
        written = self._get_buffer().append(rows, batch_key=task.key)
        self._after_write(task)
        return {"key": task.key, "programs": len(rows), "written": written,
                "passed": sum(r.passed for r in results), "executed": sum(not r.cached for r in results),
                "reward_sum": float(sum(r.reward for r in results)),
                "sample_s": t1 - t0, "exec_s": t2 - t1, "actor": self.actor_name}

    def _after_write(self, task: Task) -> None:
        """Hook between the buffer write and the reply (tests inject a crash here)."""

    def candidates(self, task: Task, policy: PolicySpec, sampling: SamplingSpec, split: str, rank: bool,
                   gamma: float, with_examples: bool) -> list[dict]:
        """Evaluation candidate records (bcoder_ray.metrics) for the task's held-out problems."""
        from bcoder_ray.ranking import score_programs as rtilde_scores
        from bcoder_ray.tokenization import pad_id
        from envs.scoring import score_programs

        program_ids = self.sample(split, task, policy, sampling)
        problems, texts, ids, results = self._score(split, task, program_ids)
        example_passed: list[bool | None] = [None] * len(texts)
        if with_examples:
            have = [i for i, p in enumerate(problems) if p.example_tests is not None]
            if have:
                ex = score_programs(self._get_executor(), [problems[i] for i in have], [texts[i] for i in have],
                                    which="example")
                for i, r in zip(have, ex):
                    example_passed[i] = r.passed
        rtilde: list[float | None] = [None] * len(texts)
        ranker = None
        if rank and policy.theta_dir is not None:
            model = self.model(policy, ranking=True)
            prompt_of = {p.problem_id: self._prompt_ids[split][i] for i in task.problem_indices
                         for p in [self.problems[split][i]]}
            rtilde = rtilde_scores(model, [prompt_of[p.problem_id] for p in problems], ids, gamma=gamma,
                                   pad_id=pad_id(self.tokenizer), batch_size=max(8, sampling.n))
            ranker = policy.label
        records = []
        index: dict[str, int] = {}
        for p, text, res, ex, score in zip(problems, texts, results, example_passed, rtilde):
            k = index.get(p.problem_id, 0)
            index[p.problem_id] = k + 1
            records.append({"suite": p.suite, "split": p.split, "problem_id": p.problem_id,
                            "difficulty": p.difficulty, "sample_index": k, "program": text,
                            "outcome": res.outcome.value, "reward": res.reward, "passed": res.passed,
                            "example_passed": ex, "rtilde": score, "model": policy.label, "ranker": ranker})
        return records

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
        args_ref = ray.put(args)
        self.actors = [remote_cls.remote(args_ref, self._executors, f"{name}-{i}")
                       for i in range(settings.num_actors)]

    def map(self, method: str, tasks: Iterable[Task], *args: Any,
            on_result: Callable[[Task, Any], None] | None = None) -> list[Any]:
        """Run `actor.method(task, *args)` for every task, results in task order. A task whose actor dies is
        resubmitted (Ray restarts the actor) up to `max_task_retries` times."""
        tasks = list(tasks)
        results: list[Any] = [None] * len(tasks)
        retries = [0] * len(tasks)
        pending = list(range(len(tasks)))[::-1]
        in_flight: dict[Any, tuple[int, Any]] = {}
        free = list(self.actors)
        while pending or in_flight:
            while pending and free:
                i = pending.pop()
                actor = free.pop(0)
                in_flight[getattr(actor, method).remote(tasks[i], *args)] = (i, actor)
            done, _ = ray.wait(list(in_flight), num_returns=1)
            ref = done[0]
            i, actor = in_flight.pop(ref)
            try:
                results[i] = ray.get(ref)
            except (ray.exceptions.RayActorError, ray.exceptions.ActorUnavailableError) as e:
                retries[i] += 1
                if retries[i] > self.settings.max_task_retries:
                    raise RuntimeError(f"task {tasks[i].key}: its actor died {retries[i]} times; last: {e}") from e
                pending.append(i)  # redo it (idempotent by task key); Ray restarts the actor
                free.append(actor)
                continue
            free.append(actor)
            if on_result is not None:
                on_result(tasks[i], results[i])
        return results

    def shutdown(self) -> None:
        for a in self.actors + self._executors:
            ray.kill(a)
        self.actors, self._executors = [], []
