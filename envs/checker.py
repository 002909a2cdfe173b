"""Checker programs: the special judges that ship with a data set, for stdio tests whose right answers are not
one text (any valid path, any optimal schedule, a float printed in any form).

A checker is Python source defining `check(input: str, output: str, expected: str) -> bool` (the test's input,
the program's output decoded as UTF-8, the data set's expected output). Only a return value equal to True
accepts the output; False, any other value, an exception, a timeout or a checker that does not compile reject it.

Where it runs, and why there: never in the program's process, and never in this (the trusted) process either,
since it is code from a data file. The Executor first runs the program as for any stdio test; the tests whose
output the program produced cleanly (exit status 0, within the output limit, valid UTF-8) are left `checking`
(`envs/harness_judge.py`, never a pass). Then it runs the checker as a program of its own in the sandbox, as a
call-style job whose cases are `check(input, output, expected)` for those tests, and folds the checker's
verdicts into the program's result (`fold`). So the program never sees the checker's text or the expected
output, and the program's output reaches the checker only as a string argument: printing the checker's
acceptance text, or anything else, can only be judged by the checker's own code.
"""

from __future__ import annotations

import base64
import dataclasses

from .harness_judge import CHECKING, FAILED, PASSED, result_of
from .problem import TestSpec
from .result import ExecResult, TestResult, infra_result

ENTRY = "check"


def has_checker(tests: TestSpec) -> bool:
    return tests.style == "stdio" and tests.compare is not None and tests.compare.rule == "checker"


def pending(result: ExecResult) -> list[int]:
    """Indices of the tests awaiting the checker."""
    return [i for i, t in enumerate(result.tests) if t.status == CHECKING]


def pending_outputs(reply: dict, indices: list[int]) -> dict[int, str]:
    """The program's output of each pending test, from the worker's reply (already checked by `judge_reply`,
    which left a test pending only when its frame was a well-formed, clean run with UTF-8 output)."""
    wanted, out = set(indices), {}
    for f in reply.get("frames") or []:
        if type(f) is dict and f.get("k") == "ran" and f.get("i") in wanted:
            out[f["i"]] = base64.b64decode(str(f["out"]).encode("ascii"), validate=True).decode("utf-8")
    missing = wanted - set(out)
    if missing:  # cannot happen after judge_reply accepted the frames; never guess a verdict
        raise ValueError(f"no output frame for pending test(s) {sorted(missing)}")
    return out


def checker_job(tests: TestSpec, outputs: dict[int, str]) -> tuple[str, TestSpec]:
    """(checker source, call-style spec): one case per pending test, in index order."""
    assert tests.compare is not None
    cases = tuple({"args": [tests.cases[i]["input"], outputs[i], tests.cases[i]["output"]], "expected": True}
                  for i in sorted(outputs))
    return tests.compare.checker, TestSpec("call", fn_name=ENTRY, cases=cases)


def fold(result: ExecResult, outputs: dict[int, str], verdict: ExecResult) -> ExecResult:
    """The program's result with each pending test decided by the checker's run (`verdict`)."""
    if verdict.is_infra:  # the sandbox failed while checking: no verdict about the program either
        return infra_result(f"checker: {verdict.infra_error}", len(result.tests), result.wall_time,
                            attempts=result.attempts)
    tests = list(result.tests)
    for k, i in enumerate(sorted(outputs)):
        t = verdict.tests[k] if k < len(verdict.tests) else TestResult("not_run")
        if t.passed:
            tests[i] = TestResult(PASSED)
        elif t.status == FAILED:
            tests[i] = TestResult(FAILED, "the checker rejected the output")
        else:  # the checker raised, timed out or did not compile: the output is not accepted
            tests[i] = TestResult(FAILED, f"the checker did not accept the output ({t.status}: {t.error})"[:500])
    judged = result_of(tests, result.wall_time)
    return dataclasses.replace(result, outcome=judged.outcome, reward=judged.reward, tests=tests, error=judged.error,
                               wall_time=result.wall_time + verdict.wall_time,
                               cpu_time=result.cpu_time + verdict.cpu_time)
