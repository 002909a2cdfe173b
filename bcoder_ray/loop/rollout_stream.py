"""The rollout actors kept busy without stopping (`run.mode: async`): each actor holds one task at a time and
is handed the next as soon as it replies, so the driver can wait on the learner meanwhile.

    stream = RolloutStream(pool.actors, tasks, sampling, request, policy=lambda: run.policy_ref())
    stream.candidates(eval_tasks, policy, sampling, "validation", ranker, examples, on_done=write_it)
    stream.pump(timeout=0.5, also=learner_refs)   # collect replies, hand out tasks; returns when anything is done
    stream.drain()                                # no new rollout task; the ones in flight land

Candidate jobs (evaluation, the probe set) go before rollout tasks, one task at a time, between the actors'
rollout tasks: an evaluation runs beside the sampling on the policy it was handed. A rollout task samples with
the policy `policy()` returns when it is handed out (the actors load a new one by path between tasks), under its
stable key (`rollout.make_tasks`): a task redone after a failure writes nothing twice. Fault tolerance is the
pool's (`max_restarts`, `max_task_retries`): a call on a restarted actor is retried by Ray. A learner call that
`wait` waits on and that fails raises `CallFailed` at once (the async loop builds the learner again).
"""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import ray

from bcoder_ray.algorithms.base import RankerRef, RolloutRequest
from bcoder_ray.loop.rollout import PolicyRef, Task
from bcoder_ray.model.candidates import SamplingSettings


class CallFailed(RuntimeError):
    """A call `RolloutStream.wait` waited on failed (its actor died, or it raised); the cause is chained."""


@dataclass
class CandidateJob:
    """A finite set of candidates tasks (an evaluation) and what to do with their parts once all are back."""

    tasks: deque
    call: Callable[[Any, Task], Any]
    on_done: Callable[[list[dict]], None]
    parts: dict[int, dict] = field(default_factory=dict)
    total: int = 0


@dataclass
class StreamCounts:
    """What the stream did, for the run's records (reset by `take`)."""

    programs: int = 0
    written: int = 0
    passed: int = 0
    executed: int = 0
    infra: int = 0
    reward_sum: float = 0.0
    tasks: int = 0
    busy_s: float = 0.0  # actor-seconds between handing out a task and its reply (one task per actor at a time)
    since: float = field(default_factory=time.time)  # when these counts began (the last `take`)
    done_keys: list[str] = field(default_factory=list)


class RolloutStream:
    def __init__(self, actors: list, tasks: Iterator[Task], sampling: SamplingSettings, request: RolloutRequest,
                 policy: Callable[[], PolicyRef], split: str = "train",
                 on_rollout: Callable[[Task, dict], None] | None = None):
        self.actors, self.tasks, self.sampling, self.request = list(actors), tasks, sampling, request
        self.policy, self.split, self.on_rollout = policy, split, on_rollout
        self.idle = deque(self.actors)
        self.in_flight: dict[Any, tuple[Any, str, Any, float]] = {}  # ref -> (actor, kind, item, handed out at)
        self.jobs: deque[CandidateJob] = deque()
        self.counts = StreamCounts()
        self.rollouts_open = True

    # -- handing out
    def candidates(self, tasks: list[Task], policy: PolicyRef, sampling: SamplingSettings, split: str,
                   ranker: RankerRef | None, examples: bool, on_done: Callable[[list[dict]], None]) -> None:
        """Queue an evaluation's tasks before the rollout tasks; `on_done(parts)` with the parts in task order."""
        job = CandidateJob(deque(enumerate(tasks)), lambda a, t: a.candidates.remote(t, policy, sampling, split,
                                                                                     ranker, examples),
                           on_done, total=len(tasks))
        if not tasks:
            on_done([])
            return
        self.jobs.append(job)
        self._hand_out()

    def _hand_out(self) -> None:
        while self.idle:
            job = next((j for j in self.jobs if j.tasks), None)
            if job is not None:
                index, task = job.tasks.popleft()
                actor = self.idle.popleft()
                self.in_flight[job.call(actor, task)] = (actor, "candidates", (job, index), time.time())
                continue
            task = next(self.tasks, None) if self.rollouts_open else None
            if task is None:
                self.rollouts_open = False
                return
            actor = self.idle.popleft()
            ref = actor.rollout.remote(task, self.policy(), self.sampling, self.request, self.split)
            self.in_flight[ref] = (actor, "rollout", task, time.time())

    # -- collecting
    def pump(self, timeout: float = 0.5, also: list | None = None) -> None:
        """Hand out tasks to idle actors, then wait up to `timeout` s for a reply (or for one of `also`, the
        learner's refs) and take in every reply that came."""
        self._hand_out()
        refs = list(self.in_flight) + list(also or [])
        if not refs:
            time.sleep(min(timeout, 0.05))
            return
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if not ready:
            return
        done, _ = ray.wait(list(self.in_flight), num_returns=len(self.in_flight), timeout=0) \
            if self.in_flight else ([], [])
        for ref in done:
            actor, kind, item, handed = self.in_flight.pop(ref)
            value = ray.get(ref)  # an actor that failed for good raises here: the run stops with its error
            self.counts.busy_s += time.time() - handed
            self.idle.append(actor)
            if kind == "rollout":
                self._took(item, value)
            else:
                job, index = item
                job.parts[index] = value
                if len(job.parts) == job.total:
                    self.jobs.remove(job)
                    job.on_done([job.parts[i] for i in range(job.total)])
        self._hand_out()

    def _took(self, task: Task, summary: dict) -> None:
        c = self.counts
        c.programs += summary["programs"]
        c.written += summary["written"]
        c.passed += summary["passed"]
        c.executed += summary["executed"]
        c.infra += summary["infra"]
        c.reward_sum += summary["reward_sum"]
        c.tasks += 1
        c.done_keys.append(task.key)
        if self.on_rollout is not None:
            self.on_rollout(task, summary)

    def wait(self, refs: list) -> list:
        """The values of `refs` (the learner's calls), keeping the actors busy until they are all ready. The first
        of them to fail raises `CallFailed` at once: the others may never return (a DDP rank whose peer died waits
        in a collective)."""
        pending = list(refs)
        while pending:
            self.pump(0.5, also=pending)
            ready, pending = ray.wait(pending, num_returns=len(pending), timeout=0)
            try:
                ray.get(ready)
            except ray.exceptions.RayError as e:
                raise CallFailed(str(e)) from e
        return ray.get(list(refs))

    def wait_until(self, condition: Callable[[], bool]) -> None:
        while not condition():
            if not self.in_flight and not self.rollouts_open and not any(j.tasks for j in self.jobs):
                raise RuntimeError("the rollout stream ended before the condition the learner waits for held")
            self.pump(0.5)

    def drain(self) -> None:
        """Hand out no new rollout task; wait until every task in flight and every queued candidate job is back."""
        self.rollouts_open = False
        while self.in_flight or self.jobs:
            self.pump(1.0)

    def take(self) -> StreamCounts:
        """The counts since the last `take`. A task still in flight counts its time up to now here and the rest
        in the next counts, so busy time never exceeds the actors' time since the last `take`."""
        now = time.time()
        for ref, (actor, kind, item, handed) in self.in_flight.items():
            self.counts.busy_s += now - handed
            self.in_flight[ref] = (actor, kind, item, now)
        counts, self.counts = self.counts, StreamCounts(since=now)
        return counts
