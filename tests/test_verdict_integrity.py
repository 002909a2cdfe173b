"""Verdicts no program can bend and correct programs judged correct (issue 28, items 1, 2, 6 and 10).

Every program runs in one batch on one worker (module fixture); each test checks the verdicts of its group.
- Item 1: a test resolves builtins and modules to the real ones and a prompt's helpers to the prompt's own
  definitions; only the entry point (and what else the problem asks for) is the program's.
- Item 2: an exception raised by the program's code is the test's runtime error, even where the test's own
  expression would take it for the end of an iteration (StopIteration inside `map`).
- Item 6: a returned value too costly for the parent to rebuild or compare (set members sharing a hash value,
  a huge Fraction) is the program's runtime error; honest large values and duplicates still pass.
- Item 10: `math.isclose` in an assert set run by the test process, `type(f(x)) == int` and `deque` expected
  values pass; a wrong answer of more than 4,300 digits fails (it is no runtime error).
"""

from __future__ import annotations

import collections
import json

import pytest

from envs.execute import Executor
from envs.harness_plan import make_plan
from envs.harness_wire import canonical, decode_value
from envs.problem import TestSpec
from envs.suites.humaneval import load_humaneval, prompt_helpers

HUMANEVAL = {p.problem_id: p for p in load_humaneval()}


def _assert(*lines: str, setup: str = "") -> TestSpec:
    return TestSpec("assert", setup=setup, asserts=lines)


def _check(body: str, entry: str = "f") -> TestSpec:
    return TestSpec("check", entry_point=entry, check="def check(candidate):\n" + body)


LOOP = "x = 1\n"  # a statement the parent cannot split: the assert set runs in the test process

# name: (program, tests, outcome)
SHADOWING = {
    "abs_in_a_check": ("abs = lambda v: 0\ndef f(x):\n    return 99\n",
                       _check("    assert abs(candidate(1) - 2) < 1e-6\n"), "failed"),
    "set_in_an_assert": ("def set(*a):\n    return 1\ndef f(a, b):\n    return 99\n",
                         _assert("assert set(f((3, 4), (4, 5))) == set((4, 5))"), "runtime_error"),
    "builtins_module_set": ("import builtins\nbuiltins.set = lambda *a: 1\ndef f(a, b):\n    return (9,)\n",
                            _assert("assert set(f((3, 4), (4, 5))) == set((4, 5))"), "failed"),
    "abs_in_the_test_process": ("abs = lambda v: 0\ndef f(x):\n    return 99\n",
                                _assert(LOOP + "assert abs(f(x) - 2) < 1e-6"), "failed"),
    "math_isclose_in_the_test_process": ("import math\nmath.isclose = lambda *a, **k: True\ndef f(x):\n"
                                         "    return 99\n", _assert(LOOP + "assert math.isclose(f(x), 2.0)"),
                                         "failed"),
    "deque_of_the_program": ("def deque(*a):\n    return 0\ndef f(x):\n    return 0\n",
                             _assert(LOOP + "assert f(x) == deque([2])"), "failed"),
    "poly_of_humaneval_32": ("def poly(xs, x):\n    return 0\ndef find_zero(xs):\n    return 0.0\n",
                             HUMANEVAL["HumanEval/32"].hidden_tests, "failed"),
    "encode_cyclic_of_humaneval_38": ("def encode_cyclic(s):\n    return s\ndef decode_cyclic(s):\n    return s\n",
                                      HUMANEVAL["HumanEval/38"].hidden_tests, "failed"),
    "encode_shift_of_humaneval_50": ("def encode_shift(s):\n    return s\ndef decode_shift(s):\n    return s\n",
                                     HUMANEVAL["HumanEval/50"].hidden_tests, "failed"),
}
STOP_ITERATION = "def f(x):\n    raise StopIteration\n"
RAISING = {
    "map_in_a_split_assert": (STOP_ITERATION, _assert("assert all(map(f, XS))", setup="XS = [1, 2, 3]"),
                              "runtime_error"),
    "map_over_constants": (STOP_ITERATION, _assert("assert all(map(f, [1, 2, 3]))"), "runtime_error"),
    "map_in_the_test_process": (STOP_ITERATION, _check("    xs = [1, 2]\n    assert all(map(candidate, xs))\n"),
                                "runtime_error"),
    "caught_by_the_test": ("def f(x):\n    raise ValueError('no')\n",
                           _check("    for x in (1, 2):\n        try:\n            candidate(x)\n"
                                  "        except Exception:\n            pass\n"), "runtime_error"),
}
CORRECT = {
    "isclose_in_the_test_process": ("import math\ndef f(x):\n    return x / 3\n",
                                    _assert("assert math.isclose(f(1), 1 / 3)", LOOP + "assert f(x) == 1 / 3"),
                                    "passed"),
    "type_is_int": ("def f(x):\n    return x + 1\n", _assert("assert type(f(1)) == int",
                                                            "assert isinstance(f(2), int)"), "passed"),
    "deque_expected": ("from collections import deque\ndef f(x):\n    return deque([x, x + 1])\n",
                       _assert("assert f(1) == deque([1, 2])"), "passed"),
    "deque_expected_in_a_check": ("import collections\ndef f(x):\n    return collections.deque([x])\n",
                                  _check("    import collections\n    for x in (1, 2):\n"
                                         "        assert candidate(x) == collections.deque([x])\n"), "passed"),
    "huge_wrong_answer_assert": ("def f(x):\n    return 10 ** 5000\n", _assert("assert f(1) == 3"), "failed"),
    "huge_wrong_answer_call": ("def f(x):\n    return 10 ** 5000\n",
                               TestSpec("call", fn_name="f", cases=({"args": [1], "expected": 3},)), "failed"),
}
COLLIDING = "P = (1 << 61) - 1  # ints that differ by multiples of P share one hash value\n"
COSTLY = {
    "colliding_set": (COLLIDING + "def f(x):\n    return {P * i for i in range(1, 2000)}\n",
                      TestSpec("call", fn_name="f", cases=({"args": [1], "expected": [1]},)), "runtime_error"),
    "colliding_set_in_the_test_process": (COLLIDING + "def f(x):\n    return {P * i for i in range(1, 2000)}\n",
                                          _assert(LOOP + "assert f(x) == {1}"), "runtime_error"),
    "colliding_list_made_a_set_by_the_test": (COLLIDING + "def f(x):\n    return [P * i for i in range(1, 3000)]\n",
                                              _assert("assert set(f(1) + [0]) == {0}"), "runtime_error"),
    "huge_fraction": ("from fractions import Fraction\ndef f(x):\n    return Fraction(3 ** 70000, 2 ** 110000 + 1)\n",
                      _assert("assert f(1) == 1"), "runtime_error"),
    "duplicates_made_a_set_by_the_test": ("def f(x):\n    return [1] * 100000\n",
                                          _assert("assert set(f(1) + [1]) == {1}"), "passed"),
    "honest_big_set_and_fraction": ("from fractions import Fraction\ndef f(x):\n    return set(range(50000))\n"
                                    "def g(x):\n    return Fraction(x, 3)\n",
                                    _assert("assert f(1) == set(range(50000))", "assert g(1) == Fraction(1, 3)"),
                                    "passed"),
}
CASES = {**SHADOWING, **RAISING, **CORRECT, **COSTLY}


@pytest.fixture(scope="module")
def verdicts():
    with Executor(workers=1) as ex:
        names = list(CASES)
        yield dict(zip(names, ex.run_batch([CASES[n][:2] for n in names])))


def _check_group(verdicts, group: dict, name: str) -> None:
    res = verdicts[name]
    assert res.outcome.value == group[name][2], (name, res.error)
    assert not res.is_infra and res.attempts == 1  # judged on the first worker, no crash and retry


@pytest.mark.parametrize("name", list(SHADOWING))
def test_program_cannot_redefine_what_the_test_relies_on(verdicts, name):
    _check_group(verdicts, SHADOWING, name)


def test_prompt_helpers_are_part_of_the_check():
    """HumanEval's check starts with the prompt's helpers, and the test process takes only the entry point
    from the program; the canonical solutions still pass (tests/test_suites_scoring.py, 164/164)."""
    p32 = HUMANEVAL["HumanEval/32"]
    helpers = prompt_helpers(p32.starter_code, "find_zero")
    assert helpers.startswith("import math") and "def poly(" in helpers and "def find_zero" not in helpers
    assert p32.hidden_tests.check.startswith(helpers)
    plan = make_plan(p32.references[0], p32.hidden_tests)
    assert plan.in_test_process and plan.test_payload["names"] == ["find_zero"]
    assert prompt_helpers(HUMANEVAL["HumanEval/0"].starter_code, "has_close_elements") == ""


@pytest.mark.parametrize("name", list(RAISING))
def test_program_exception_is_a_runtime_error_wherever_the_test_sits(verdicts, name):
    _check_group(verdicts, RAISING, name)
    assert "StopIteration" in verdicts[name].error or "ValueError" in verdicts[name].error


@pytest.mark.parametrize("name", list(CORRECT))
def test_correct_programs_are_judged_correct(verdicts, name):
    _check_group(verdicts, CORRECT, name)


@pytest.mark.parametrize("name", list(COSTLY))
def test_value_too_costly_to_judge_is_a_runtime_error(verdicts, name):
    _check_group(verdicts, COSTLY, name)
    if COSTLY[name][2] != "passed":
        assert "too costly to judge" in verdicts[name].error


def test_deque_travels_as_a_deque():
    value = decode_value(json.loads(json.dumps(canonical(collections.deque([1, (2, 3)])))))
    assert type(value) is collections.deque and value == collections.deque([1, (2, 3)])
