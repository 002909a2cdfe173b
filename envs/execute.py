"""The execution oracle: run untrusted programs against their tests and return the reward of eq. 2.

    with Executor(workers=4) as ex:
        result = ex.run(program, tests)                       # -> ExecResult
        results = ex.run_batch([(program, tests), ...])       # order kept, duplicates run once

`Executor` keeps `workers` pre-warmed sandbox workers (`envs/sandbox.py`) busy; each forks one isolated child
per program, which runs all of that program's tests (`envs/harness.py`). A worker holds the next job while it
runs the current one, so it never waits for a round trip to this process. Expected values stay in this
process (`envs/harness_plan.py`) and verdicts are taken here (`envs/harness_judge.py`, `envs/compare.py`).
Results are cached in memory by `cache_key(program, tests)` = (program_hash, tests.content_hash());
`seed_cache` takes results known from elsewhere (the replay buffer).

Defaults: 4 s per test and 20 s per program of wall clock, 1 GiB of address space, 8 MiB of output per test,
64 processes (effective when the worker can give its children their own uid). A program's outcome (eq. 2):
compile error, else runtime error if any test raised, crashed or timed out, else failed if any answer was
wrong, else passed (`envs/harness_judge.py`); comparison rules in `envs/compare.py`.

Workers start lazily, on the first program that is not a cache hit, and stop on `close()`, at the end of a
`with` block, when the Executor is garbage collected, or when this process exits (their stdin closes and a
PID-namespace worker takes every descendant with it). Safe to create inside Ray actors and pytest processes.

Shell interface:
    python -m envs.execute TESTS.json PROGRAM.py          one JSON result (outcome, reward, tests, ...)
    python -m envs.execute --batch JOBS.jsonl [--workers N]
        JOBS.jsonl lines: {"id": ..., "program": "...", "tests": {TESTS.json object}}; prints one JSON line
        per job (id, outcome, reward, ...) in input order and a programs/s summary on stderr.
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

from .harness_judge import crashed, judge
from .harness_plan import make_plan
from .harness_wire import encode_frame
from .problem import SpecError, TestSpec, program_hash
from .result import ExecResult
from .sandbox import Limits, SandboxOptions, Worker, WorkerError, describe

CacheKey = tuple[str, str]
WATCHDOG_SLACK = 10.0  # seconds past timeout_per_program before the parent kills a silent worker
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

    def __init__(self, workers: int | None = None, *, timeout_per_test: float = 4.0,
                 timeout_per_program: float = 20.0, memory_mb: int = 1024, cache: bool = True,
                 max_output_bytes: int = 8 * 1024 * 1024, max_processes: int = 64,
                 namespaces: bool = True, filesystem: bool = True, drop_privileges: bool = True,
                 user_namespace: bool | None = None):
        self.n_workers = int(workers) if workers else default_workers()
        if self.n_workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        self.limits = Limits(timeout_per_test=float(timeout_per_test),
                             timeout_per_program=float(timeout_per_program), memory_mb=int(memory_mb),
                             max_output_bytes=int(max_output_bytes), max_processes=int(max_processes))
        self.options = SandboxOptions(namespaces=namespaces, filesystem=filesystem,
                                      drop_privileges=drop_privileges, user_namespace=user_namespace)
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
        """Add known results (e.g. from the replay buffer), keyed by `cache_key(program, tests)`."""
        with self._lock:
            for key, res in results.items():
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

    def run_batch(self, jobs: Sequence[tuple[str, TestSpec]], progress: bool = False) -> list[ExecResult]:
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
                pending = collections.deque((key, jobs[idx[0]][0], jobs[idx[0]][1]) for key, idx in todo.items())
                for key, res in self._execute(pending, bar):
                    if self.use_cache:
                        self._cache[key] = res
                    first, *rest = todo[key]
                    out[first] = res
                    for j in rest:
                        out[j] = dataclasses.replace(res, cached=True, wall_time=0.0)
                if bar is not None:
                    bar.close()
            return out  # type: ignore[return-value]

    # ------------------------------------------------------------------------------------------ scheduling

    def _ensure_workers(self, n: int) -> None:
        while len(self._workers) < n:
            self._workers.append(None)
        for i in range(n):
            if self._workers[i] is None or not self._workers[i].alive:
                if self._workers[i] is not None:
                    self._workers[i].kill()
                self._workers[i] = Worker(i, self.options)

    def _execute(self, pending: collections.deque, bar) -> Iterable[tuple[CacheKey, ExecResult]]:
        """Keep every worker busy. A worker holds up to PIPELINE jobs: the next small job waits in its
        stdin while the current one runs, so the worker never idles on a round trip to this process.
        The parent's watchdog times the job a worker is running (the head of its queue)."""
        self._ensure_workers(min(self.n_workers, len(pending)))
        workers = [w for w in self._workers[:self.n_workers] if w is not None]
        queues: dict[Worker, collections.deque] = {w: collections.deque() for w in workers}
        deadline: dict[Worker, float] = {}
        limit = self.limits.timeout_per_program + WATCHDOG_SLACK
        while pending or any(queues.values()):
            for w in list(queues):
                while pending and len(queues[w]) < PIPELINE:
                    key, program, tests = pending[0]
                    plan = make_plan(program, tests)
                    frame = encode_frame({"id": next(self._job_ids), "payload": plan.payload,
                                          "limits": self.limits.for_style(plan.style)})
                    if queues[w] and len(frame) > PIPELINE_MAX_FRAME:
                        break  # a large job would block on the pipe: send it when the worker is free
                    pending.popleft()
                    try:
                        w.submit(frame)
                    except WorkerError:
                        pending.appendleft((key, program, tests))
                        yield from self._fail_worker(w, queues, deadline, pending, "the sandbox worker died")
                        break
                    queues[w].append((key, program, tests, plan, time.monotonic()))
                    if len(queues[w]) == 1:
                        deadline[w] = time.monotonic() + limit
            busy = [w for w in queues if queues[w]]
            if not busy:
                continue
            wait = max(0.0, min(deadline[w] for w in busy) - time.monotonic())
            ready, _, _ = select.select(busy, [], [], wait)
            for w in ready:
                replies = w.read_replies()
                if replies is None:  # the worker died: the program killed it, or it crashed
                    yield from self._fail_worker(w, queues, deadline, pending, "the sandbox worker died")
                    continue
                for reply in replies:
                    key, _, _, plan, _ = queues[w].popleft()
                    deadline[w] = time.monotonic() + limit
                    if bar is not None:
                        bar.update(1)
                    yield key, judge(plan, reply)
            now = time.monotonic()
            for w in [w for w in busy if w in queues and queues[w] and deadline[w] <= now]:
                yield from self._fail_worker(w, queues, deadline, pending,
                                             "wall-clock limit exceeded (sandbox worker unresponsive)", True)

    def _fail_worker(self, w: Worker, queues: dict, deadline: dict, pending: collections.deque, message: str,
                     timeout: bool = False) -> Iterable[tuple[CacheKey, ExecResult]]:
        """Replace a dead or hung worker: its running job gets `message`; its queued jobs go back to
        `pending` (they never started)."""
        jobs = queues.pop(w)
        deadline.pop(w, None)
        queues[self._replace(w)] = collections.deque()
        if jobs:
            key, program, tests, plan, t0 = jobs.popleft()
            yield key, crashed(plan, message, time.monotonic() - t0, timeout=timeout)
        for key, program, tests, _, _ in reversed(jobs):
            pending.appendleft((key, program, tests))

    def _replace(self, w: Worker) -> Worker:
        w.kill()
        new = Worker(w.index, self.options)
        self._workers[w.index] = new
        return new


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
    ap.add_argument("--timeout-per-test", type=float, default=4.0)
    ap.add_argument("--timeout-per-program", type=float, default=20.0)
    ap.add_argument("--memory-mb", type=int, default=1024)
    ap.add_argument("--no-namespaces", action="store_true", help="degraded isolation (testing)")
    ap.add_argument("--isolation", action="store_true", help="print the isolation in force on stderr")
    args = ap.parse_args(argv)
    kw = dict(timeout_per_test=args.timeout_per_test, timeout_per_program=args.timeout_per_program,
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
