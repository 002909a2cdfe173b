"""Stop at the first failing test (`envs/first_failure.py`): large stdio / call test sets run in stages; the
outcome is the full run's (pass or not always; the reward too, but for a wrong answer before a crash); the
tests after the stopping stage are not run; small sets and assert / check sets run as before; the cache holds a
staged result under the whole set's key only when every test ran."""

from __future__ import annotations

import pytest

from envs.execute import Executor, cache_key
from envs.first_failure import FIRST_STAGE, assemble, over_budget, stages
from envs.problem import Comparison, Problem, TestSpec
from envs.result import ExecResult, Outcome, TestResult
from envs.scoring import score_programs

N = 45  # stages of 10, 20 and 15 tests
TESTS = TestSpec("stdio", cases=tuple({"input": f"{i}\n", "output": f"{2 * i}\n"} for i in range(N)))
RIGHT = "print(2 * int(input()))\n"
WRONG = "print(3 * int(input()))\n"  # wrong from test 1 (test 0 is 0 either way)
LATE = "n = int(input())\nprint(2 * n if n < 15 else -1)\n"  # wrong from test 15, the second stage
CRASH_LATER = "n = int(input())\nassert n < 40\nprint(2 * n if n else 1)\n"  # wrong on test 0, crashes on 40+


@pytest.fixture(scope="module")
def ex():
    with Executor(workers=2) as executor:
        yield executor


def test_stages():
    assert [len(s) for s in stages(TESTS)] == [10, 20, 15] and FIRST_STAGE == 10
    big = TestSpec("stdio", cases=TESTS.cases * 5)
    assert [len(s) for s in stages(big)] == [10, 20, 40, 80, 75]
    assert [s.cases for s in stages(big)][1] == big.cases[10:30]
    assert stages(TestSpec("stdio", cases=TESTS.cases[:10])) == [TestSpec("stdio", cases=TESTS.cases[:10])]
    asserts = TestSpec("assert", asserts=tuple(f"assert f({i}) == {i}" for i in range(50)))
    assert stages(asserts) == [asserts]
    compare = TestSpec("stdio", cases=TESTS.cases, compare=Comparison("float"))  # the rule goes with each stage
    assert all(s.compare == compare.compare for s in stages(compare))


def test_same_outcome_fewer_tests(ex):
    programs = [RIGHT, WRONG, LATE, "print(", CRASH_LATER]
    full = ex.run_batch([(p, TESTS) for p in programs])
    ex._cache.clear()
    staged = ex.run_batch([(p, TESTS) for p in programs], first_failure=True)
    assert [r.outcome for r in full] == [Outcome.PASSED, Outcome.FAILED, Outcome.FAILED, Outcome.COMPILE_ERROR,
                                         Outcome.RUNTIME_ERROR]
    # the one documented difference: a wrong answer before a crash that never ran
    assert [r.outcome for r in staged] == [r.outcome for r in full[:4]] + [Outcome.FAILED]
    assert [r.passed for r in staged] == [r.passed for r in full]
    ran = [sum(t.status != "not_run" for t in r.tests) for r in staged]
    assert ran == [N, 10, 30, N, 10] and all(len(r.tests) == N for r in staged)
    assert staged[0].tests == full[0].tests and staged[3].tests == full[3].tests  # every test ran: the same
    assert [sum(t.passed for t in r.tests) for r in staged] == [N, 1, 15, 0, 9]
    assert [sum(t.passed for t in r.tests) for r in full] == [N, 1, 15, 0, 39]  # what evaluation counts
    # cached under the whole set's key only when every test ran; a full run after a staged one runs all tests
    assert cache_key(RIGHT, TESTS) in ex._cache and cache_key(WRONG, TESTS) not in ex._cache
    again = ex.run_batch([(WRONG, TESTS)])[0]
    assert not again.cached and all(t.status != "not_run" for t in again.tests)
    assert ex.run_batch([(WRONG, TESTS)], first_failure=True)[0].cached  # the whole set's result now serves both


def test_scoring_passes_it_on(ex):
    problem = Problem("t", "x", "train", "double n", "double n", TESTS)
    (r,) = score_programs(ex, [problem], [WRONG + "# other\n"], first_failure=True)
    assert r.outcome == Outcome.FAILED and sum(t.status == "not_run" for t in r.tests) == N - 10


def test_the_stages_share_one_program_budget():
    part = ExecResult(Outcome.PASSED, 1.0, [TestResult("passed")] * 10, wall_time=20.0, cpu_time=12.0)
    assert over_budget([part, part], cpu_limit=30, wall_limit=120) is None
    assert over_budget([part, part, part], cpu_limit=30, wall_limit=120) == "cpu_time_per_program"
    stopped = assemble(45, [part, part, part], "cpu_time_per_program")
    assert stopped.outcome == Outcome.RUNTIME_ERROR and stopped.timeout and stopped.limit == "cpu_time_per_program"
    assert [t.status for t in stopped.tests[29:32]] == ["passed", "timeout", "not_run"]
