"""Rollout on Ray: a pool of policy actors that sample programs with the published policy, score them through the
environment's batch path and append them to the replay buffer; the same actors sample held-out candidates for
evaluation and fill cached targets. Nothing here knows which algorithm runs: an actor loads a policy (an LM
folder) and, for ranking, whatever `RankerRef` it is handed.

    pool = ActorPool(PolicyWorker, ActorSettings(num_actors=2, num_cpus=0.5), WorkerArgs(problems, ctx),
                     storage=join_uri(run_storage, "actors"))    # the actors read WorkerArgs from there
    sampling = cfg.rollout.settings(cfg.model)                      # a SamplingSettings, as every sampler takes it
    summaries = pool.rollout(tasks, policy, sampling, request)      # each task's rows appended under task.key
    records = pool.candidates(tasks, policy, sampling, "test", ranker=ref)
    pool.shutdown()

What the actors are handed crosses to them as the typed objects themselves (Ray pickles them): `SamplingSettings`,
`PolicyRef`, `RankerRef`, `RolloutRequest`, `TargetJob`. Their constructor's `WorkerArgs` (the problems, the
`RunContext`) are written once to the run's storage and handed over as `StoredArgs`, their location.

- A task's sampling seed is a function of the task alone (it replaces `SamplingSettings.seed`), and the buffer's
  `append` writes nothing for a key it already holds, so a task that is redone (its actor died, or the driver was
  restarted) adds no duplicate rows; and a redone task whose rows landed is not sampled again: its reply is
  counted from them (`ReplayBuffer.batch_rows`, `landed_summary`).
  A task's greedy baselines (CodeRL) are appended with its samples, under the same key.
- Fault tolerance is Ray's: an actor that dies is restarted (`max_restarts`) and the call it was running is
  retried on it (`max_task_retries`); `ray.util.ActorPool` hands tasks to free actors as they finish. Ray
  rebuilds a restarted actor from its creation arguments, and it keeps no object that a creation argument
  refers to alive for that (ray-project/ray#53727): so they are plain values that refer to nothing, a location
  (`StoredArgs`, re-read by each construction) and the names of the executor actors (looked up by name).
- Executors scale apart from the actors: with `executor_actors = 0` each policy actor runs its own sandbox
  pool (`WorkerArgs.executor`: the Executor's keyword arguments); with N > 0 the pool starts N `ExecutorWorker` actors (each with its own
  CPU share and sandbox processes) shared by all policy actors, e.g. GPU samplers with CPU executors.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import uuid
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Iterable, Sequence

import pyarrow as pa
import ray
from ray.util import ActorPool as RayActorPool

from bcoder_ray.algorithms import load_ranker
from bcoder_ray.algorithms.base import RankerRef, RolloutRequest, RunContext
from bcoder_ray.buffer import ReplayBuffer, make_row
from bcoder_ray.evaluation.metrics import CandidateRecord
from bcoder_ray.loop.target_filling import TargetChunk, TargetComputer, TargetJob
from bcoder_ray.model.candidates import SamplingSettings, load_sampler, sample_and_score
from bcoder_ray.util.quiet import quiet_libraries
from bcoder_ray.util.storage import join_uri, read_bytes, write_bytes
from bcoder_ray.model.tokenization import tokenizer_fingerprint
from envs.problem import Problem
from envs.result import Outcome


# ---------------------------------------------------------------------------------------------- what actors are handed


@dataclass(frozen=True)
class PolicyRef:
    """The policy an actor samples with, by path (weights never pass through the driver)."""

    path: str  # an LM folder (`from_pretrained`): the published policy, or θ_ckpt
    version: str  # policy_version written with each row: "0" = θ_ckpt, "k" = the policy after iteration k-1
    label: str = "ckpt"  # how records name this policy (e.g. "warm-start", "theta-iter2")


@dataclass(frozen=True)
class Task:
    """A unit of actor work: some problems (indices into the actor's problem list), under a stable key."""

    key: str
    problem_indices: tuple[int, ...]
    iteration: int
    seed: int


@dataclass
class WorkerArgs:
    """Constructor arguments of `PolicyWorker` (sent once per actor, kept for its restarts)."""

    problems: dict[str, list[Problem]]  # by split name
    context: RunContext  # the run's tokenizer, lengths, dtype, load options, text format, seed, buffer
    imports: tuple[str, ...] = ()  # modules that register outside algorithms
    run_id: str | None = None
    executor: dict = field(default_factory=dict)  # keyword arguments of envs.execute.Executor
    num_threads: int = 1
    engine: str = "torch"  # rollout.engine: what samples the rollouts (torch or vllm)
    first_failure: bool = False  # rollout.stop_at_first_failure (envs/first_failure.py); evaluation runs every test


@dataclass(frozen=True)
class StoredArgs:
    """A pool's `WorkerArgs`, pickled under the run's storage: what an actor's constructor is handed. A restarted
    actor reads them again from there, which outlives any process (an object in Ray's object store, or a large
    argument that Ray puts there itself, may be gone by then)."""

    uri: str  # a file under the run's storage (a local path on a one-machine run, else a URI every node reads)

    @classmethod
    def write(cls, args: Any, folder: str) -> "StoredArgs":
        """`args` pickled under `folder`, named by its content (the same arguments are written once, and a file
        is never replaced under an actor that may be reading it)."""
        import ray.cloudpickle

        data = ray.cloudpickle.dumps(args)  # Ray's own pickler: classes a test registers by value travel too
        stored = cls(join_uri(folder, f"worker-args-{hashlib.sha256(data).hexdigest()[:16]}.pkl"))
        write_bytes(stored.uri, data)
        return stored

    def load(self) -> WorkerArgs:
        import ray.cloudpickle

        return ray.cloudpickle.loads(read_bytes(self.uri))


def worker_args(args: WorkerArgs | StoredArgs) -> WorkerArgs:
    """The arguments themselves, read from the run's storage when the actor was handed their location."""
    return args.load() if isinstance(args, StoredArgs) else args


@dataclass(frozen=True)
class ActorSettings:
    num_actors: int = 1
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    max_restarts: int = 3
    max_task_retries: int = 3


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


LANDED_COLUMNS = ("outcome", "reward", "decoding")  # what a landed task's summary is counted from


def landed_summary(task: Task, rows: pa.Table, wall_s: float, actor: str) -> dict:
    """The reply of a rollout task whose rows the buffer already holds, counted from them: nothing sampled,
    executed or written now (`landed` marks it; the sandbox failures of the first attempt are not stored)."""
    outcomes, decoding = rows["outcome"].to_pylist(), rows["decoding"].to_pylist()
    return {"key": task.key, "programs": rows.num_rows, "written": 0, "infra": 0,
            "greedy": sum(d == "greedy" for d in decoding), "passed": sum(o == Outcome.PASSED.value for o in outcomes),
            "executed": 0, "reward_sum": float(sum(rows["reward"].to_pylist())), "exec_s": 0.0, "wall_s": wall_s,
            "actor": actor, "landed": True}


# ---------------------------------------------------------------------------------------------- executors


class ExecutorWorker:
    """A Ray actor around one `envs.execute.Executor` (its sandbox processes live with it)."""

    def __init__(self, options: dict):
        from envs.execute import Executor

        self._executor = Executor(**options)
        self._executor.__enter__()

    def run_batch(self, jobs, first_failure: bool = False):
        return self._executor.run_batch(jobs, first_failure=first_failure)


class RemoteExecutor:
    """`run_batch` over a set of `ExecutorWorker` actors: the jobs are split in contiguous chunks, one per actor,
    run in parallel, and gathered in order (so `envs.scoring.score_programs` can use it as its executor)."""

    def __init__(self, handles: Sequence[Any]):
        if not handles:
            raise ValueError("RemoteExecutor needs at least one ExecutorWorker handle")
        self._handles = list(handles)

    def run_batch(self, jobs, first_failure: bool = False):
        jobs = list(jobs)
        if not jobs:
            return []
        size = -(-len(jobs) // len(self._handles))
        refs = [h.run_batch.remote(jobs[i * size:(i + 1) * size], first_failure=first_failure)
                for i, h in enumerate(self._handles) if jobs[i * size:(i + 1) * size]]
        return [r for part in ray.get(refs) for r in part]


# ---------------------------------------------------------------------------------------------- the actor


class PolicyWorker:
    """Holds the current policy and samples + scores programs (used as a Ray actor by `ActorPool`)."""

    def __init__(self, args: WorkerArgs | StoredArgs, executor_names: Sequence[str] = (), actor_name: str = ""):
        """`args`: the arguments, or (as `ActorPool` hands them) their location, read here on every construction,
        a restart's included; `executor_names`: the pool's named `ExecutorWorker` actors (none: an own Executor)."""
        import torch

        args = worker_args(args)
        torch.set_num_threads(max(1, args.num_threads))
        quiet_libraries()
        self.args = args
        self.ctx = args.context
        self.actor_name = actor_name or f"actor-{os.getpid()}"
        self.tokenizer = self.ctx.load_tokenizer()
        self.text_format = self.ctx.text_format()
        self.tokenizer_hash = tokenizer_fingerprint(self.tokenizer, self.text_format)
        self.problems = args.problems
        self._prompt_ids: dict[str, list[list[int]]] = {
            split: [self.text_format.prompt_ids(self.tokenizer, p.prompt, self.ctx.source_len)
                    for p in probs]
            for split, probs in args.problems.items()}
        self._executor_names = tuple(executor_names)
        self._executor = None
        self._buffer = None
        self._loaded: dict[str, tuple[Any, Any]] = {}  # kind -> (reference, loaded object)

    # -- resources, created on first use and kept while their reference is unchanged
    def _get_executor(self):
        if self._executor is None:
            if self._executor_names:  # looked up by name: a handle among the creation arguments is a reference
                self._executor = RemoteExecutor([ray.get_actor(n) for n in self._executor_names])
            else:
                from envs.execute import Executor

                self._executor = Executor(**self.args.executor)
                self._executor.__enter__()
        return self._executor

    def _get_buffer(self) -> ReplayBuffer:
        if self._buffer is None:
            if self.ctx.buffer_uri is None:
                raise RuntimeError("PolicyWorker: the run context has no buffer_uri, cannot write rollouts")
            self._buffer = ReplayBuffer(self.ctx.buffer_uri)
        return self._buffer

    def _cached(self, kind: str, ref: Any, load: Callable[[], Any]) -> Any:
        held = self._loaded.get(kind)
        if held is None or held[0] != ref:
            old = self._loaded.pop(kind, None)  # free the old weights first
            if old is not None and hasattr(old[1], "close"):
                old[1].close()  # a sampler's vLLM engine holds its GPU memory until closed
            del old
            self._loaded[kind] = (ref, load())
        return self._loaded[kind][1]

    def _sampler(self, policy: PolicyRef):
        import torch

        ctx = self.ctx  # the revision in its load options is for θ_ckpt's loads only
        return self._cached("sampler", policy, lambda: load_sampler(
            policy.path, tokenizer=ctx.tokenizer_path, label=policy.label, dtype=getattr(torch, ctx.dtype),
            options=ctx.load_options, checkpoint=ctx.theta_ckpt, eos_token_ids=ctx.eos_token_ids,
            engine=self.args.engine, seed=ctx.seed, text_format=self.text_format))

    def _ranker(self, ref: RankerRef | None):
        if ref is None:
            return None
        return self._cached("ranker", ref, lambda: load_ranker(ref, self.ctx, self.args.imports))

    def _score(self, split: str, task: Task, policy: PolicyRef, sampling: SamplingSettings, *, examples: bool,
               ranker: RankerRef | None = None, logprobs: bool = False, decoding: str = "sample",
               m: int | None = None, first_failure: bool = False):
        """The shared candidates path (`bcoder_ray.model.candidates`) on this actor's models and executor, seeded by
        the task (`m`: programs per problem other than `sampling.m`)."""
        settings = replace(sampling, m=m or sampling.m, seed=task.seed)
        problems = [self.problems[split][i] for i in task.problem_indices]
        prompts = [self._prompt_ids[split][i] for i in task.problem_indices]
        return sample_and_score(problems, self._sampler(policy), self._get_executor(), settings,
                                examples=examples, ranker=self._ranker(ranker), prompt_ids=prompts,
                                logprobs=logprobs, decoding=decoding, first_failure=first_failure)

    def rollout(self, task: Task, policy: PolicyRef, sampling: SamplingSettings, request: RolloutRequest,
                split: str = "train") -> dict:
        """Sample (and, when asked, greedy-decode one program per problem), score and append one task's
        programs to the buffer under `task.key` (idempotent)."""
        t0 = time.time()
        landed = self._get_buffer().batch_rows(task.key, LANDED_COLUMNS)
        if landed is not None:  # a redone task whose rows landed before its actor or the driver died
            return landed_summary(task, landed, time.time() - t0, self.actor_name)
        stop = self.args.first_failure  # the reward needs no test after the first failure (envs/first_failure.py)
        scored = self._score(split, task, policy, sampling, examples=False, logprobs=request.logprobs,
                             first_failure=stop)
        if request.greedy_baseline:
            scored += self._score(split, task, policy, sampling, examples=False, decoding="greedy", m=1,
                                  first_failure=stop)
        infra = sum(c.infra for c in scored)
        scored = [c for c in scored if not c.infra]  # no verdict: never written as a reward
        sampled = asdict(replace(sampling, seed=task.seed))  # the rows' record of how they were sampled
        rows = [make_row(c.problem, c.program, c.program_ids, c.result, source="generated",
                         tokenizer_hash=self.tokenizer_hash, iteration=task.iteration,
                         policy_version=policy.version, actor=self.actor_name,
                         sampling=sampled if c.decoding == "sample" else "{}", decoding=c.decoding,
                         logprobs=c.logprobs, truncated=c.truncated, run_id=self.args.run_id)
                for c in scored]
        written = self._get_buffer().append(rows, batch_key=task.key)
        self._after_write(task)
        results = [c.result for c in scored]
        return {"key": task.key, "programs": len(rows), "written": written, "infra": infra,
                "greedy": sum(c.decoding == "greedy" for c in scored),
                "passed": sum(r.passed for r in results), "executed": sum(not r.cached for r in results),
                "reward_sum": float(sum(r.reward for r in results)),
                "exec_s": float(sum(r.wall_time for r in results)), "wall_s": time.time() - t0,
                "actor": self.actor_name}

    def _after_write(self, task: Task) -> None:
        """Hook between the buffer write and the reply (tests inject a crash here)."""

    def candidates(self, task: Task, policy: PolicyRef, sampling: SamplingSettings, split: str,
                   ranker: RankerRef | None, examples: bool) -> dict:
        """Evaluation candidate records (`bcoder_ray.evaluation.metrics.CandidateRecord`) for held-out problems, scored by
        `ranker` when given (never written to the buffer), and how many candidates had no verdict (the sandbox
        failed on every re-run: left out, not counted as failed)."""
        scored = self._score(split, task, policy, sampling, examples=examples, ranker=ranker)
        return {"records": [CandidateRecord.of(c) for c in scored if not c.infra], "infra": sum(c.infra for c in scored)}

    def fill_targets(self, chunk: TargetChunk, job: TargetJob) -> int:
        """Cached targets for `chunk.table` (rows from `ReplayBuffer.missing_targets`, in the computer's batches),
        written under `chunk.key`, with this actor's torch threads (`rollout.cpus_per_actor`, not the Ray Data
        job's `buffer.targets_cpus`: more threads than the actor's CPUs would slow it and its neighbours)."""
        computer = self._cached("targets", job, lambda: TargetComputer(replace(job, threads=self.args.num_threads)))
        out = computer(chunk.table)
        self._get_buffer().write_targets(out, job.targets.fingerprint, batch_key=chunk.key)
        return out.num_rows


# ---------------------------------------------------------------------------------------------- the pool


class ActorPool:
    """Policy actors (and optional executor actors); typed methods hand tasks to free actors."""

    def __init__(self, worker_cls: type, settings: ActorSettings, args: WorkerArgs, *, storage: str,
                 executor_actors: int = 0, executor_cpus: float = 1.0, name: str = "policy"):
        """`storage`: a folder of the run's storage (every node reads it) where `args` are written for the actors
        (`StoredArgs`)."""
        self.settings = settings
        self.stored_args = StoredArgs.write(args, storage)
        self._executors = []
        self.executor_names: tuple[str, ...] = ()
        if executor_actors > 0:
            prefix = f"{name}-executor-{uuid.uuid4().hex[:12]}"  # unique among the job's named actors
            self.executor_names = tuple(f"{prefix}-{i}" for i in range(executor_actors))
            # the executor's options are a small dict: by value, so a restart needs nothing of the object store
            self._executors = [ray.remote(ExecutorWorker).options(
                name=n, num_cpus=executor_cpus, max_restarts=-1, max_task_retries=-1).remote(args.executor)
                for n in self.executor_names]
        remote_cls = ray.remote(worker_cls).options(
            num_cpus=settings.num_cpus, num_gpus=settings.num_gpus, max_restarts=settings.max_restarts,
            max_task_retries=settings.max_task_retries)
        # creation arguments that refer to nothing (no ObjectRef, no actor handle, small enough to travel in
        # the task itself): a restart rebuilds the actor from them alone (ray-project/ray#53727)
        self.actors = [remote_cls.remote(self.stored_args, self.executor_names, f"{name}-{i}")
                       for i in range(settings.num_actors)]

    def _map(self, call: Callable[[Any, Any], Any], items: Iterable[Any],
             on_result: Callable[[Any, Any], None] | None) -> list[Any]:
        items = list(items)
        results = []
        for item, value in zip(items, RayActorPool(self.actors).map(call, items)):
            results.append(value)
            if on_result is not None:
                on_result(item, value)
        return results

    def rollout(self, tasks: Iterable[Task], policy: PolicyRef, sampling: SamplingSettings, request: RolloutRequest,
                split: str = "train", on_result: Callable[[Task, dict], None] | None = None) -> list[dict]:
        return self._map(lambda a, t: a.rollout.remote(t, policy, sampling, request, split), tasks, on_result)

    def candidates(self, tasks: Iterable[Task], policy: PolicyRef, sampling: SamplingSettings, split: str,
                   ranker: RankerRef | None = None, examples: bool = False,
                   on_result: Callable[[Task, dict], None] | None = None) -> list[dict]:
        return self._map(lambda a, t: a.candidates.remote(t, policy, sampling, split, ranker, examples), tasks,
                         on_result)

    @property
    def size(self) -> int:
        """The policy actors (a fill's work is cut for them: `target_filling.plan_chunks`)."""
        return len(self.actors)

    def fill_targets(self, chunks: Iterable[TargetChunk], job: TargetJob) -> list[int]:
        return self._map(lambda a, c: a.fill_targets.remote(c, job), chunks, None)

    def shutdown(self) -> None:
        for a in self.actors + self._executors:
            ray.kill(a)
        self.actors, self._executors = [], []
