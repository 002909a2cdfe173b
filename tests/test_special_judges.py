"""The comparison rules of stdio tests (`envs/compare.py`, `envs.problem.Comparison`) and checker programs
(`envs/checker.py`): each rule on outputs it must accept and reject; a checker run through the sandbox on
outputs that try to fool it (its acceptance text, huge output, malformed output, a program hunting for the
checker), and a broken checker. The executor tests share one one-worker Executor."""

from __future__ import annotations

import pytest

from envs.compare import stdio_matches
from envs.execute import Executor
from envs.problem import Comparison, SpecError, TestSpec

FLOAT = Comparison("float", abs_tol=1e-4, rel_tol=1e-4)


@pytest.mark.parametrize("rule, actual, expected, ok", [
    (None, "1 2\r\n", "1  2\n", True),  # the default: whitespace and line ends
    (None, "3.0\n", "3\n", False),
    (Comparison("exact"), "a  b \n", "a  b \n", True),
    (Comparison("exact"), "a b\n", "a  b \n", False),
    (Comparison("exact"), "x", "x\n", False),
    (FLOAT, "3.00004\n", "3\n", True),  # integers expected: numbers all the same
    (FLOAT, "1.33333\n", "1.333333333\n", True),
    (FLOAT, "1.3\n", "1.333333333\n", False),
    (FLOAT, "1e6\n", "1000000.5\n", True),  # relative error
    (FLOAT, "nan\n", "1.0\n", False),
    (FLOAT, "inf\n", "inf\n", True),  # an identical token
    (FLOAT, "1_0\n", "10\n", False),  # float() would read it; a judge must not
    (FLOAT, "YES 1.0\n", "YES 1\n", True),
    (FLOAT, "yes 1.0\n", "YES 1\n", False),  # words stay exact
    (FLOAT, "1.0 2.0\n", "1.0\n", False),  # extra tokens
    (Comparison("unordered_lines"), "2\n1 \n3\n", "1\n2\n3\n", True),
    (Comparison("unordered_lines"), "1\n1\n3\n", "1\n2\n3\n", False),  # a multiset, not a set
    (Comparison("unordered_lines"), "1\n2\n", "1\n2\n3\n", False),
    (Comparison("case_insensitive"), "Yes\nnO\n", "YES\nNO\n", True),
    (Comparison("case_insensitive"), "Yes!\n", "YES\n", False),
    (Comparison("case_insensitive"), b"\xff\n", "YES\n", False),  # not UTF-8: every rule fails it
])
def test_rules(rule, actual, expected, ok):
    assert stdio_matches(actual.encode() if isinstance(actual, str) else actual, expected, rule) is ok


def test_spec_json_round_trip_and_hash():
    plain = TestSpec("stdio", cases=({"input": "", "output": "1"},))
    assert TestSpec.from_json({**plain.to_json(), "compare": "whitespace"}).content_hash() == plain.content_hash()
    ruled = TestSpec.from_json({**plain.to_json(), "compare": {"rule": "float", "abs_tol": 0.01}})
    assert ruled.rule == Comparison("float", abs_tol=0.01)
    assert TestSpec.from_json(ruled.to_json()) == ruled and ruled.content_hash() != plain.content_hash()
    for bad, field in ((({"rule": "fuzzy"}), "unknown comparison rule"), ({"rule": "checker"}, "needs the checker"),
                       ({"rule": "float", "abs_tol": "x"}, "abs_tol"), ({"rule": "float", "tol": 1}, "unknown field")):
        with pytest.raises(SpecError, match=field):
            TestSpec.from_json({**plain.to_json(), "compare": bad})
    with pytest.raises(SpecError, match="stdio tests only"):
        TestSpec.from_json({"style": "call", "fn_name": "f", "cases": [], "compare": "exact"})


CHECKER = """\
def check(input, output, expected):
    n = int(input)
    parts = output.split()
    return len(parts) == 2 and all(p.isdigit() for p in parts) and sum(map(int, parts)) == n
"""
ECHO_CHECKER = "def check(input, output, expected):\n    return output.strip()\n"  # truthy, never True
RAISING_CHECKER = "def check(input, output, expected):\n    return float(output) == float(expected)\n"


def spec(checker: str = CHECKER) -> TestSpec:
    return TestSpec("stdio", cases=({"input": "5\n", "output": "1 4\n"}, {"input": "2\n", "output": "1 1\n"}),
                    compare=Comparison("checker", checker=checker))


@pytest.fixture(scope="module")
def executor():
    with Executor(workers=1) as ex:
        yield ex


@pytest.mark.parametrize("program, outcome, note", [
    ("n = int(input())\nprint(n - 1, 1)", "passed", None),  # a different answer than the expected, accepted
    ("print(1, 1)", "failed", "rejected"),
    ("print('True')", "failed", "rejected"),  # the checker's acceptance, as text: only its code decides
    ("print('ACCEPTED')\nimport sys; sys.exit(0)", "failed", "rejected"),
    ("import sys\nsys.stdout.write('1 ' * (9 * 2 ** 20))", "runtime_error", "output limit"),  # huge output
    ("import sys\nsys.stdout.buffer.write(b'\\xff\\xfe 4\\n')", "failed", "UTF-8"),  # malformed output
    ("import sys\nprint(sys.stdin.read().count('check'), 0)", "failed", "rejected"),  # no checker text in sight
    ("raise SystemExit(2)", "runtime_error", "exit status 2"),
])
def test_checker_verdicts(executor, program, outcome, note):
    res = executor.run(program, spec())
    assert res.outcome.value == outcome, res
    assert note is None or note in (res.error or ""), res.error
    assert all(t.status != "checking" for t in res.tests)


def test_checker_that_misbehaves_accepts_nothing(executor):
    good = "n = int(input())\nprint(n - 1, 1)"
    assert not executor.run(good, spec(ECHO_CHECKER)).passed  # a truthy non-True return is no acceptance
    res = executor.run("print('x y')", spec(RAISING_CHECKER))  # output crafted to crash the checker
    assert res.outcome.value == "failed" and "ValueError" in res.error
    assert not executor.run(good, spec("def check(:\n")).passed  # a checker that does not compile


def test_checker_results_are_cached(executor):
    program = "n = int(input())\nprint(1, n - 1)"
    first = executor.run(program, spec())
    again = executor.run(program, spec())
    assert first.passed and again.passed and again.cached
