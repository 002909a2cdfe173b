"""The one path from (problem, program) pairs to verdicts and eq. 2 rewards, through the executor's batch API.

Rollout workers, evaluation, `envs.validate` and the gymnasium env's terminal reward all call
`score_programs`, so a reward means the same thing everywhere. A result with `is_infra` (outcome
`Outcome.INFRA_ERROR`, reward None, `infra_error` the message) is no verdict: the sandbox failed on every
fresh worker it was retried on. Callers drop it (never write it to the buffer as a reward), count it, and
re-run the program if they need its verdict.

    with Executor(workers=2) as ex:
        results = score_programs(ex, [problem] * len(programs), programs)            # hidden tests: eq. 2
        examples = score_examples(ex, [problem] * len(programs), programs)           # filtered setting
"""

from __future__ import annotations

from typing import Protocol, Sequence

from envs.problem import Problem, TestSpec
from envs.result import ExecResult

WHICH_TESTS = ("hidden", "example")


class BatchExecutor(Protocol):
    """What scoring needs of `envs.execute.Executor`."""

    def run_batch(self, jobs: Sequence[tuple[str, TestSpec]]) -> list[ExecResult]: ...
    # and, where `first_failure` is asked for: run_batch(jobs, first_failure=True) (envs/first_failure.py)


def select_tests(problem: Problem, which: str = "hidden") -> TestSpec | None:
    """The problem's hidden tests (the reward) or its example tests (None where the statement shows none)."""
    if which == "hidden":
        return problem.hidden_tests
    if which == "example":
        return problem.example_tests
    raise ValueError(f"unknown test set {which!r}; expected one of {WHICH_TESTS}")


def score_programs(executor: BatchExecutor, problems: Sequence[Problem], programs: Sequence[str],
                   which: str = "hidden", first_failure: bool = False) -> list[ExecResult]:
    """Run `programs[i]` against the `which` tests of `problems[i]`, all in one executor batch, in order.
    Results with `is_infra` are passed on as they are (see the module's docstring). `first_failure`: large test
    sets stop at the first failing stage (`envs/first_failure.py`: the same pass or not, fewer tests counted;
    for rollouts, never for evaluation)."""
    if len(problems) != len(programs):
        raise ValueError(f"score_programs: {len(problems)} problems but {len(programs)} programs")
    jobs = []
    for problem, program in zip(problems, programs):
        tests = select_tests(problem, which)
        if tests is None:
            raise ValueError(f"{problem.key}: has no {which} tests; use score_examples for the filtered setting")
        jobs.append((program, tests))
    if not jobs:
        return []
    return executor.run_batch(jobs, first_failure=True) if first_failure else executor.run_batch(jobs)


def score_program(executor: BatchExecutor, problem: Problem, program: str, which: str = "hidden") -> ExecResult:
    """One program on one problem: `score_programs` with a batch of one (the gymnasium env's terminal reward)."""
    return score_programs(executor, [problem], [program], which)[0]


def score_examples(executor: BatchExecutor, problems: Sequence[Problem],
                   programs: Sequence[str]) -> list[ExecResult | None]:
    """Example-test verdicts for the filtered setting; None where a problem has no example tests."""
    if len(problems) != len(programs):
        raise ValueError(f"score_examples: {len(problems)} problems but {len(programs)} programs")
    index = [i for i, p in enumerate(problems) if p.example_tests is not None]
    results = score_programs(executor, [problems[i] for i in index], [programs[i] for i in index], "example")
    out: list[ExecResult | None] = [None] * len(problems)
    for i, r in zip(index, results):
        out[i] = r
    return out
