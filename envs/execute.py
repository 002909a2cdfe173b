"""The execution oracle: run untrusted programs against their tests and return the reward of eq. 2.

    with Executor(workers=4) as ex:
        result = ex.run(program, tests)                       # -> ExecResult
        results = ex.run_batch([(program, tests), ...])       # order kept, duplicates run once

`Executor` keeps `workers` pre-warmed sandbox workers (`envs/sandbox.py`) busy; each forks one isolated child
per program, which runs all of that program's tests (`envs/harness.py`). A worker holds the next job while it
runs the current one, so it never waits for a round trip to this process. Expected values stay in this
process (`envs/harness_plan.py`) and verdicts are taken here (`envs/harness_judge.py`, `envs/compare.py`).
Results are cached in memory by `cache_key(program, tests)` = (program_hash, tests.content_hash());
`seed_cache` takes results known from elsewhere (the replay buffer). `run_batch(jobs, first_failure=True)`
runs large stdio / call test sets in stages and stops at the first failing one (`envs/first_failure.py`).

Limits (Executor keys, defaults): `cpu_time_per_test` 15 s and `cpu_time_per_program` 30 s of CPU time of the
program's whole process tree (descendants included; load does not change them). Every reference-passing MBPP
and HumanEval program fits with at least 2x to spare: the slowest, MBPP 123, spends 5.2-6.1 s of CPU on one
assert (6.2 s in all). Wall-clock backstops `timeout_per_test` 60 s and `timeout_per_program` 120 s (for
programs that sleep or block), `memory_mb` 1 GiB of address space, 8 MiB of output per test, 64 processes
(effective when the worker can give its children their own uid). `ExecResult.limit` names the limit that fired. A program's outcome (eq. 2):
compile error, else runtime error if any test raised, crashed or timed out, else failed if any answer was
wrong, else passed (`envs/harness_judge.py`); comparison rules in `envs/compare.py`.

Infrastructure failures are not verdicts: a worker that dies or is killed from outside, a fork or pipe that
fails, a process killed by the OOM killer, a wall-clock backstop that fires while the program was runnable but
not scheduled (`/proc/PID/schedstat`). The job is then retried on a fresh worker, up to `infra_retries` (2)
times. A process death that reproduces on every fresh worker is the program's own doing and is its runtime
error; anything else comes back as `ExecResult.is_infra` (`outcome` `Outcome.INFRA_ERROR`, `reward` None,
`infra_error` the message), which is never cached (nor taken by `seed_cache`) and must never become a reward.
`Executor.infra_stats` counts retries and infrastructure results.

Workers start lazily, on the first program that is not a cache hit, and stop on `close()`, at the end of a
`with` block, when the Executor is garbage collected, or when this process exits (their stdin closes and a
PID-namespace worker takes every descendant with it). Safe to create inside Ray actors and pytest processes.

Shell interface:
    python -m envs.execute TESTS.json PROGRAM.py          one JSON result (outcome, reward, tests, ...)
    python -m envs.execute --batch JOBS.jsonl [--workers N]
        JOBS.jsonl lines: {"id": ..., "program": "...", "tests": {TESTS.json object}}; prints one JSON line
        per job (id, outcome, reward, ..., infra_error) in input order and a programs/s summary on stderr.
        An infrastructure failure has outcome "infra_error" (never one of the four program outcomes), reward
        null and the message in infra_error.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import json
import os
import select
import sys
import threading
import time
import weakref
from typing import Iterable, Mapping, Sequence

from . import checker, first_failure
from .harness_judge import crashed, judge_reply
from .harness_plan import make_plan
from .harness_wire import encode_frame
from .problem import SpecError, TestSpec, program_hash
from .result import ExecResult, infra_result
from .sandbox import Limits, SandboxOptions, Worker, WorkerError, describe

CacheKey = tuple[str, str]
WATCHDOG_SLACK = 10.0  # seconds past timeout_per_program before the parent kills a silent worker
PROGRAM_KINDS = {"child", "worker"}  # suspects that are the program's doing when every fresh worker sees them
PIPELINE = 2  # jobs a worker holds: the one it runs and the next
PIPELINE_MAX_FRAME = 32 * 1024  # larger jobs are sent only to an idle worker (a pipe holds 64 KiB)


def cache_key(program: str, tests: TestSpec) -> CacheKey:
    return (program_hash(program), tests.content_hash())


def default_workers() -> int:
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:
        return max(1, os.cpu_count() or 1)


class Executor:
    """A pool of sandbox workers with an execution cache. Thread-safe (calls are serialised)."""

    def __init__(self, workers: int | None = None, *, cpu_time_per_test: float = Limits.cpu_time_per_test,
                 cpu_time_per_program: float = Limits.cpu_time_per_program,
                 timeout_per_test: float = Limits.timeout_per_test,
                 timeout_per_program: float = Limits.timeout_per_program, memory_mb: int = 1024, cache: bool = True,
                 max_output_bytes: int = 8 * 1024 * 1024, max_processes: int = 64, infra_retries: int = 2,
                 namespaces: bool = True, filesystem: bool = True, drop_privileges: bool = True,
                 user_namespace: bool | None = None, cgroup: str = "auto", fault: str | None = None):
        self.n_workers = int(workers) if workers else default_workers()
        if self.n_workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        for name, v in (("cpu_time_per_test", cpu_time_per_test), ("cpu_time_per_program", cpu_time_per_program),
                        ("timeout_per_test", timeout_per_test), ("timeout_per_program", timeout_per_program)):
            if not float(v) > 0:
                raise ValueError(f"{name} must be > 0 seconds, got {v!r}")
        if int(infra_retries) < 0:
            raise ValueError(f"infra_retries must be >= 0, got {infra_retries!r}")
        self.limits = Limits(cpu_time_per_test=float(cpu_time_per_test),
                             cpu_time_per_program=float(cpu_time_per_program),
                             timeout_per_test=float(timeout_per_test),
                             timeout_per_program=float(timeout_per_program), memory_mb=int(memory_mb),
                             max_output_bytes=int(max_output_bytes), max_processes=int(max_processes))
        self.options = SandboxOptions(namespaces=namespaces, filesystem=filesystem,
                                      drop_privileges=drop_privileges, user_namespace=user_namespace,
                                      cgroup=cgroup, fault=fault)
        self.infra_retries = int(infra_retries)
        self.infra_stats: collections.Counter = collections.Counter()  # "retries", "infra_results"
        self.use_cache = cache
        self._cache: dict[CacheKey, ExecResult] = {}
        self._workers: list[Worker | None] = []
        self._lock = threading.RLock()
        self._closed = False
        self._job_ids = iter(range(1 << 62))
        self._finalizer = weakref.finalize(self, _shutdown, self._workers)

    # ------------------------------------------------------------------------------------------ public

    cache_key = staticmethod(cache_key)

    def __enter__(self) -> "Executor":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        with self._lock:
            self._closed = True
            self._finalizer()

    def seed_cache(self, results: Mapping[CacheKey, ExecResult]) -> None:
        """Add known results (e.g. from the replay buffer), keyed by `cache_key(program, tests)`; results that
        are no verdict (`is_infra`) are left out."""
        with self._lock:
            for key, res in results.items():
                if not res.is_infra:
                    self._cache[tuple(key)] = res

    def cached(self, program: str, tests: TestSpec) -> ExecResult | None:
        res = self._cache.get(cache_key(program, tests)) if self.use_cache else None
        return None if res is None else dataclasses.replace(res, cached=True, wall_time=0.0)

    @property
    def isolation(self) -> dict:
        """What isolation the workers have (starts one worker if none is running)."""
        with self._lock:
            self._ensure_workers(1)
            return dict(next(w for w in self._workers if w is not None).isolation)

    @property
    def worker_pids(self) -> list[int]:
        """Host pids of the running workers' top processes (`unshare`, or the worker itself)."""
        return [w.proc.pid for w in self._workers if w is not None and w.proc is not None]

    def run(self, program: str, tests: TestSpec) -> ExecResult:
        return self.run_batch([(program, tests)])[0]

    def run_batch(self, jobs: Sequence[tuple[str, TestSpec]], progress: bool = False,
                  first_failure: bool = False) -> list[ExecResult]:
        """Results in job order. `first_failure`: large stdio / call test sets run in stages and stop at the
        first stage with a test that does not pass (`envs/first_failure.py`: for rollouts, never evaluation)."""
        if first_failure:
            return self._run_first_failure(jobs, progress)
        with self._lock:
            if self._closed:
                raise RuntimeError("Executor is closed")
            out: list[ExecResult | None] = [None] * len(jobs)
            todo: dict[CacheKey, list[int]] = {}
            for i, (program, tests) in enumerate(jobs):
                if not isinstance(program, str) or not isinstance(tests, TestSpec):
                    raise TypeError(f"job {i}: expected (str, TestSpec), got ({type(program).__name__}, "
                                    f"{type(tests).__name__})")
                if len(tests) == 0:
                    raise ValueError(f"job {i}: the {tests.style} test spec has no tests (nothing could fail)")
                key = cache_key(program, tests)
                hit = self._cache.get(key) if self.use_cache else None
                if hit is not None:
                    out[i] = dataclasses.replace(hit, cached=True, wall_time=0.0)
                else:
                    todo.setdefault(key, []).append(i)
            if todo:
                bar = _progress(len(todo)) if progress else None
                pending = collections.deque(_Job(key, jobs[idx[0]][0], jobs[idx[0]][1]) for key, idx in todo.items())
                outputs: dict[CacheKey, dict[int, str]] = {}
                results = dict(self._execute(pending, bar, outputs))
                if outputs:  # stdio tests judged by a checker: run the checkers, then decide (envs/checker.py)
                    results.update(self._run_checkers({key: jobs[todo[key][0]][1] for key in outputs}, outputs,
                                                      results))
                for key, res in results.items():
                    if self.use_cache and not res.is_infra:
                        self._cache[key] = res
                    first, *rest = todo[key]
                    out[first] = res
                    for j in rest:
                        out[j] = dataclasses.replace(res, cached=True, wall_time=0.0)
                if bar is not None:
                    bar.close()
            return out  # type: ignore[return-value]

    def _run_first_failure(self, jobs: Sequence[tuple[str, TestSpec]], progress: bool) -> list[ExecResult]:
        """Rounds of stages: round k runs stage k of every program still passing, all in one batch (so the
        workers stay busy across programs); a whole set's cached result is used as it is."""
        out: list[ExecResult | None] = [None] * len(jobs)
        plans: dict[int, list[TestSpec]] = {}
        for i, (program, tests) in enumerate(jobs):
            split = first_failure.stages(tests) if isinstance(tests, TestSpec) else [tests]
            hit = self.cached(program, tests) if len(split) > 1 and isinstance(program, str) else None
            if hit is not None:
                out[i] = hit
            elif len(split) > 1:
                plans[i] = split
        whole = [i for i in range(len(jobs)) if out[i] is None and i not in plans]
        for i, res in zip(whole, self.run_batch([jobs[i] for i in whole], progress) if whole else []):
            out[i] = res
        parts: dict[int, list[ExecResult]] = {i: [] for i in plans}
        active = sorted(plans)
        while active:
            results = self.run_batch([(jobs[i][0], plans[i][len(parts[i])]) for i in active], progress)
            still = []
            for i, res in zip(active, results):
                parts[i].append(res)
                limit = first_failure.over_budget(parts[i], self.limits.cpu_time_per_program,
                                                  self.limits.timeout_per_program)
                if res.passed and limit is None and len(parts[i]) < len(plans[i]):
                    still.append(i)
                    continue
                out[i] = first_failure.assemble(len(jobs[i][1]), parts[i], limit)
                if self.use_cache and len(parts[i]) == len(plans[i]) and limit is None and not out[i].is_infra:
                    with self._lock:  # every test ran: the full run's result
                        self._cache[cache_key(*jobs[i])] = out[i]
            active = still
        return out  # type: ignore[return-value]

    def _run_checkers(self, specs: dict[CacheKey, TestSpec], outputs: dict[CacheKey, dict[int, str]],
                      results: dict[CacheKey, ExecResult]) -> dict[CacheKey, ExecResult]:
        """Each checker as a sandboxed call-style job of its own (one per program, a case per pending test)."""
        keys = list(outputs)
        verdicts = self.run_batch([checker.checker_job(specs[k], outputs[k]) for k in keys])
        return {k: checker.fold(results[k], outputs[k], v) for k, v in zip(keys, verdicts)}

    # ------------------------------------------------------------------------------------------ scheduling

    def _ensure_workers(self, n: int) -> None:
        while len(self._workers) < n:
            self._workers.append(None)
        for i in range(n):
            if self._workers[i] is None or not self._workers[i].alive:
                if self._workers[i] is not None:
                    self._workers[i].kill()
                self._workers[i] = Worker(i, self.options)

    def _execute(self, pending: collections.deque, bar,
                 outputs: dict | None = None) -> Iterable[tuple[CacheKey, ExecResult]]:
        """Keep every worker busy. A worker holds up to PIPELINE jobs: the next small job waits in its
        stdin while the current one runs, so the worker never idles on a round trip to this process.
        The parent's watchdog times the job a worker is running (the head of its queue). A job whose run
        may have been the sandbox's failure is retried first thing on a fresh worker (`fresh`). The outputs of
        stdio tests awaiting a checker go into `outputs` under the job's key."""
        self._ensure_workers(min(self.n_workers, len(pending)))
        workers = [w for w in self._workers[:self.n_workers] if w is not None]
        queues: dict[Worker, collections.deque] = {w: collections.deque() for w in workers}
        fresh: dict[Worker, _Job] = {}
        deadline: dict[Worker, float] = {}
        limit = self.limits.timeout_per_program + WATCHDOG_SLACK
        while pending or fresh or any(queues.values()):
            for w in list(queues):
                while (pending or w in fresh) and len(queues[w]) < PIPELINE:
                    retry = w in fresh
                    job = fresh.pop(w) if retry else pending.popleft()
                    plan = make_plan(job.program, job.tests)
                    head = {"id": next(self._job_ids), "payload": plan.payload,
                            "limits": self.limits.for_style(plan.style)}
                    if plan.in_test_process:
                        head["test_process"] = True
                    frame = encode_frame(head)
                    if plan.in_test_process:  # read by the test process itself, never by the worker
                        frame += encode_frame(plan.test_payload)
                    if queues[w] and len(frame) > PIPELINE_MAX_FRAME:
                        if retry:
                            fresh[w] = job
                        else:
                            pending.appendleft(job)
                        break  # a large job would block on the pipe: send it when the worker is free
                    try:
                        w.submit(frame)
                    except WorkerError:
                        queues[w].append((job, plan, time.monotonic()))
                        yield from self._fail_worker(w, queues, deadline, pending, fresh, "the sandbox worker died")
                        break
                    queues[w].append((job, plan, time.monotonic()))
                    if len(queues[w]) == 1:
                        deadline[w] = time.monotonic() + limit
            busy = [w for w in queues if queues[w]]
            if not busy:
                continue
            wait = max(0.0, min(deadline[w] for w in busy) - time.monotonic())
            ready, _, _ = select.select(busy, [], [], wait)
            for w in ready:
                replies = w.read_replies()
                if replies is None:  # the worker died: the program killed it, it crashed, or it was killed
                    yield from self._fail_worker(w, queues, deadline, pending, fresh, "the sandbox worker died")
                    continue
                for reply in replies:
                    job, plan, _ = queues[w].popleft()
                    deadline[w] = time.monotonic() + limit
                    res, suspect = judge_reply(plan, reply)
                    if suspect is not None or reply.get("fatal"):
                        out = self._suspect(w, job, res, suspect or "infra", queues, deadline, pending, fresh)
                        if out is not None:
                            if bar is not None:
                                bar.update(1)
                            yield job.key, out
                        break  # w was replaced; its other replies (none: it ran one job at a time) are void
                    if bar is not None:
                        bar.update(1)
                    res.attempts = job.attempts + 1
                    waiting = checker.pending(res)
                    if waiting and outputs is not None:
                        outputs[job.key] = checker.pending_outputs(reply, waiting)
                    yield job.key, res
            now = time.monotonic()
            for w in [w for w in busy if w in queues and queues[w] and deadline[w] <= now]:
                yield from self._fail_worker(w, queues, deadline, pending, fresh,
                                             "wall-clock limit exceeded (sandbox worker unresponsive)", hung=True)

    def _suspect(self, w: Worker, job: "_Job", res: ExecResult, kind: str, queues: dict, deadline: dict,
                 pending: collections.deque, fresh: dict) -> ExecResult | None:
        """A run that may have been the sandbox's failure: replace the worker and retry the job on the new
        one, or, with the retries spent, decide. Returns the final result, or None when retried."""
        job.kinds.append(kind)
        job.attempts += 1
        job.wall += float(res.wall_time or 0.0)
        new = self._replace_in(w, queues, deadline, pending)
        # retries are bounded in time as well as count: a job whose suspect runs took one program's wall-clock
        # backstop in all holds a worker no longer (each starved run costs a full backstop)
        if job.attempts <= self.infra_retries and job.wall < self.limits.timeout_per_program:
            self.infra_stats["retries"] += 1
            fresh[new] = job
            return None
        if set(job.kinds) <= PROGRAM_KINDS:  # the same on every fresh worker: the program's doing
            res.attempts = job.attempts
            return res
        self.infra_stats["infra_results"] += 1
        if res.is_infra:
            res.attempts = job.attempts
            return res
        return infra_result(f"{res.error} (on {job.attempts} fresh workers: {', '.join(job.kinds)})",
                            len(res.tests), res.wall_time, attempts=job.attempts)

    def _replace_in(self, w: Worker, queues: dict, deadline: dict, pending: collections.deque) -> Worker:
        """Replace worker `w`; the jobs it still held (never started) go back to the front of `pending`."""
        jobs = queues.pop(w)
        deadline.pop(w, None)
        for job, _, _ in reversed(jobs):
            pending.appendleft(job)
        new = self._replace(w)
        queues[new] = collections.deque()
        return new

    def _fail_worker(self, w: Worker, queues: dict, deadline: dict, pending: collections.deque, fresh: dict,
                     message: str, hung: bool = False) -> Iterable[tuple[CacheKey, ExecResult]]:
        """A dead or hung worker: its running job is a suspect ("worker": the program may have killed it;
        "hung": the worker's own clocks failed, never the program's); its queued jobs go back to `pending`."""
        running = queues[w].popleft() if queues[w] else None
        if running is None:
            self._replace_in(w, queues, deadline, pending)
            return
        job, plan, t0 = running
        res = crashed(plan, message, time.monotonic() - t0, timeout=hung)
        out = self._suspect(w, job, res, "hung" if hung else "worker", queues, deadline, pending, fresh)
        if out is not None:
            yield job.key, out

    def _replace(self, w: Worker) -> Worker:
        w.kill()
        new = Worker(w.index, self.options)
        self._workers[w.index] = new
        return new


@dataclasses.dataclass(eq=False)
class _Job:
    key: CacheKey
    program: str
    tests: TestSpec
    attempts: int = 0  # runs that ended in a suspected sandbox failure
    kinds: list = dataclasses.field(default_factory=list)  # their suspect kinds
    wall: float = 0.0  # seconds those runs took


def _shutdown(workers: list) -> None:
    for w in workers:
        if w is not None:
            w.close()
    workers.clear()


def _progress(total: int):
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="executing", unit="prog")


def execute(program: str, tests: TestSpec, **kwargs) -> ExecResult:
    """Run one program with a one-worker Executor (kwargs as for Executor)."""
    kwargs.setdefault("workers", 1)
    with Executor(**kwargs) as ex:
        return ex.run(program, tests)


# ---------------------------------------------------------------------------------------------- CLI

def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m envs.execute", description=__doc__.split("\n\n")[0])
    ap.add_argument("tests", nargs="?", help="TESTS.json")
    ap.add_argument("program", nargs="?", help="PROGRAM.py")
    ap.add_argument("--batch", metavar="JOBS.jsonl", help='lines of {"id", "program", "tests"}')
    ap.add_argument("--workers", type=int, default=None)
    ap.add_argument("--cpu-time-per-test", type=float, default=Limits.cpu_time_per_test, help="CPU seconds")
    ap.add_argument("--cpu-time-per-program", type=float, default=Limits.cpu_time_per_program, help="CPU seconds")
    ap.add_argument("--timeout-per-test", type=float, default=Limits.timeout_per_test, help="wall-clock backstop")
    ap.add_argument("--timeout-per-program", type=float, default=Limits.timeout_per_program,
                    help="wall-clock backstop")
    ap.add_argument("--memory-mb", type=int, default=1024)
    ap.add_argument("--infra-retries", type=int, default=2, help="retries on a fresh worker after a sandbox failure")
    ap.add_argument("--no-namespaces", action="store_true", help="degraded isolation (testing)")
    ap.add_argument("--isolation", action="store_true", help="print the isolation in force on stderr")
    args = ap.parse_args(argv)
    kw = dict(cpu_time_per_test=args.cpu_time_per_test, cpu_time_per_program=args.cpu_time_per_program,
              infra_retries=args.infra_retries,
              timeout_per_test=args.timeout_per_test, timeout_per_program=args.timeout_per_program,
              memory_mb=args.memory_mb, namespaces=not args.no_namespaces)
    if args.batch:
        if args.tests or args.program:
            ap.error("--batch takes no positional arguments")
        return _main_batch(args.batch, args.workers, kw, args.isolation)
    if not (args.tests and args.program):
        ap.error("give TESTS.json and PROGRAM.py, or --batch JOBS.jsonl")
    try:
        with open(args.tests, encoding="utf-8") as f:
            tests = TestSpec.from_json(json.load(f), where=args.tests)
        with open(args.program, encoding="utf-8") as f:
            program = f.read()
    except (OSError, ValueError, SpecError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    with Executor(workers=1, **kw) as ex:
        if args.isolation:
            print(describe(ex.isolation), file=sys.stderr)
        print(json.dumps(ex.run(program, tests).to_json()))
    return 0


def _main_batch(path: str, workers: int | None, kw: dict, show_isolation: bool) -> int:
    ids, jobs = [], []
    try:
        with open(path, encoding="utf-8") as f:
            for n, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{path}:{n}"
                row = json.loads(line)
                if not isinstance(row, dict) or not isinstance(row.get("program"), str):
                    raise SpecError(f"{where}: expected an object with a string 'program'")
                ids.append(row.get("id", n))
                jobs.append((row["program"], TestSpec.from_json(row.get("tests"), where=f"{where}.tests")))
    except (OSError, ValueError, SpecError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    t0 = time.monotonic()
    with Executor(workers=workers, **kw) as ex:
        if show_isolation:
            print(describe(ex.isolation), file=sys.stderr)
        results = ex.run_batch(jobs)
        n_workers = ex.n_workers
    secs = time.monotonic() - t0
    for id_, res in zip(ids, results):
        print(json.dumps({"id": id_, **res.to_json()}))
    counts = collections.Counter(r.outcome.value for r in results)
    print(f"{len(jobs)} programs in {secs:.2f} s with {n_workers} workers: {len(jobs) / max(secs, 1e-9):.1f} "
          f"programs/s; " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items())), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
