"""Stop at the first failing test: large test sets (CodeContests' hundreds of generated tests) run in stages,
and a program's run ends with the first stage where a test does not pass.

Why in stages and not inside the program's run: the program's process never sees an expected output
(`envs/harness_plan.py`), so it cannot know which test failed; the verdicts are taken in the trusted process,
after its run. So the Executor (`envs.execute.Executor.run_batch` with `first_failure=True`) runs a test set of
more than `FIRST_STAGE` stdio or call tests as consecutive slices, each an ordinary job (its own cache key, its
own sandboxed run, checkers included): the first `FIRST_STAGE` tests, then twice as many each time
(10, 20, 40, 80, ... : a program that passes all 200 tests runs 5 jobs instead of 1, a wrong one usually 1).
Other test sets (assert, check, and small stdio / call sets: every MBPP, HumanEval and embedded problem) run as
they always do.

The outcome is the eq. 2 rule over the tests that ran (`harness_judge.result_of`), the tests after the stopping
stage are `not_run` (`compile_error` after a compile error, as a full run marks them). It equals the full run's
outcome, hence its reward, for every program except one that answers a test wrong and would crash or time out
on a later, unrun test: the full run says runtime error (-0.6), this says failed (-0.3); pass or not is the same
for every program. The per-program limits (`cpu_time_per_program`, `timeout_per_program`) count the stages
together: a program whose stages exceed them is stopped as a full run would be (a runtime error with `timeout`).
Because tests go unrun, `ExecResult.tests` then counts fewer passes than a full run: evaluation, and whatever
counts tests, runs every test (the default); rollouts may stop early (`rollout.stop_at_first_failure`). A
result is cached under the whole test set's key only when every test ran; the stages' own results are cached
under their keys, so a rerun repeats nothing.
"""

from __future__ import annotations

import dataclasses
from typing import Sequence

from .harness_judge import COMPILE, result_of
from .problem import TestSpec
from .result import ExecResult, Outcome, TestResult, infra_result

FIRST_STAGE = 10  # tests in the first stage; each later stage is twice the one before


def stages(tests: TestSpec, first: int = FIRST_STAGE) -> list[TestSpec]:
    """The slices a test set runs in (the whole set, alone, where it is not staged)."""
    if tests.style not in ("stdio", "call") or len(tests) <= first:
        return [tests]
    out, start, size = [], 0, first
    while start < len(tests.cases):
        out.append(dataclasses.replace(tests, cases=tests.cases[start:start + size]))
        start, size = start + size, size * 2
    return out


def over_budget(parts: Sequence[ExecResult], cpu_limit: float, wall_limit: float) -> str | None:
    """The per-program limit the stages run so far exceed together, if any (each stage had the whole budget)."""
    if sum(p.cpu_time for p in parts) > cpu_limit:
        return "cpu_time_per_program"
    if sum(p.wall_time for p in parts) > wall_limit:
        return "timeout_per_program"
    return None


def assemble(n_tests: int, parts: Sequence[ExecResult], limit: str | None = None) -> ExecResult:
    """One result for the whole test set from its stages' results, in order (`limit`: the per-program limit
    the stages exceeded together, which stops the program as in a full run)."""
    wall = sum(p.wall_time for p in parts)
    cpu = sum(p.cpu_time for p in parts)
    attempts = max(p.attempts for p in parts)
    infra = next((p for p in parts if p.is_infra), None)
    if infra is not None:
        return infra_result(infra.infra_error or "the sandbox failed", n_tests, wall, infra.limit, attempts)
    ran = [t for p in parts for t in p.tests]
    if limit is not None:
        ran.append(TestResult("timeout", f"CPU time limit exceeded ({limit})" if limit.startswith("cpu")
                              else f"wall-clock limit exceeded ({limit})"))
    judged = result_of(ran, wall)
    rest = COMPILE if judged.outcome == Outcome.COMPILE_ERROR else "not_run"
    tests = ran[:n_tests] + [TestResult(rest, judged.error if rest == COMPILE else None)
                             for _ in range(n_tests - len(ran))]
    return ExecResult(judged.outcome, judged.reward, tests, timeout=judged.timeout, error=judged.error,
                      wall_time=wall, limit=limit or next((p.limit for p in reversed(parts) if p.limit), None),
                      cpu_time=cpu, attempts=attempts)

