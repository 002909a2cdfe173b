"""Scoring suites' problems through the executor: references pass, broken ones are listed, example tests for the
filtered setting, and the `python -m envs.validate` report."""

from __future__ import annotations

import io
from pathlib import Path

import pytest

import envs  # noqa: F401
from envs.execute import Executor
from envs.registry import load_suite
from envs.result import REWARD, Outcome
from envs.scoring import score_examples, score_program, score_programs, select_tests
from envs.validate import main as validate_main
from envs.validate import validate_problems

APPS_DIR = Path(__file__).resolve().parent / "fixtures" / "apps_dir"


@pytest.fixture(scope="module")
def executor():
    # the default limits (CPU time, so load does not matter): APPS 4184's reference 5 sieves to 10^7, about 1.5 s
    with Executor(workers=2) as ex:
        yield ex


@pytest.fixture(scope="module")
def apps_problems():
    return {p.problem_id: p for s in ("train", "test") for p in load_suite("apps", s, source=str(APPS_DIR))}


def test_every_apps_fixture_reference_passes(executor, apps_problems):
    report = validate_problems(executor, list(apps_problems.values()), "apps", "fixtures")
    assert (report.passed, report.references, report.broken) == (101, 101, [])
    assert report.problems_with_passing_reference == 5
    assert report.problems_without_example_tests == 1  # 4184 (Codewars) shows no examples


def test_mbpp_known_broken_references_are_listed(executor):
    by_id = {p.problem_id: p for s in ("test", "validation", "train") for p in load_suite("mbpp", s)}
    problems = [by_id[i] for i in ("11", "341", "367", "596", "642", "927")]
    report = validate_problems(executor, problems, "mbpp", "some")
    assert sorted(key for key, _, _ in report.broken) == ["mbpp/341", "mbpp/596", "mbpp/642"]
    assert all(r.outcome == Outcome.FAILED for _, _, r in report.broken)
    # 367 and 927 put a class their code defines in test_setup_code: they pass as setup runs after the program
    assert report.passed == 3


def test_validate_command_prints_counts_and_the_rate_last(capsys):
    out = io.StringIO()
    rate = validate_main(["humaneval", "--workers", "2"], out=out)
    lines = out.getvalue().splitlines()
    assert rate == 1.0
    assert lines[-2] == "humaneval/test: 164/164 references pass; 164/164 problems have a passing reference"
    assert lines[-1] == "reference pass rate: 164/164 (100.00%)"


def test_validate_command_lists_broken_references(tmp_path):
    path = tmp_path / "mbpp.jsonl"
    shared = Path(envs.__file__).parent / "data" / "mbpp" / "mbpp.jsonl"
    path.write_text("".join(line for line in shared.read_text().splitlines(keepends=True)
                            if '"task_id": 341,' in line or '"task_id": 12,' in line))
    out = io.StringIO()
    validate_main(["mbpp", "--split", "test", "--workers", "1", "--opt", f"path={path}"], out=out)
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("  broken: mbpp/341 reference 0: failed: ")
    assert lines[1] == "  all references fail: mbpp/341"
    assert lines[2] == ("mbpp/test: 1/2 references pass; 1/2 problems have a passing reference; "
                        "1 have references that all fail")
    assert lines[-1] == "reference pass rate: 1/2 (50.00%)"


def test_score_programs_gives_eq2_rewards_in_order(executor):
    problem = load_suite("mbpp", "test", limit=1)[0]  # remove_Occ(s, ch)
    programs = [problem.references[0],
                "def remove_Occ(s, ch):\n    return s\n",
                "def remove_Occ(s, ch):\n    return 1 / 0\n",
                "def remove_Occ(s, ch)\n    return s\n"]
    results = score_programs(executor, [problem] * 4, programs)
    assert [r.outcome for r in results] == [Outcome.PASSED, Outcome.FAILED, Outcome.RUNTIME_ERROR,
                                           Outcome.COMPILE_ERROR]
    assert [r.reward for r in results] == [1.0, -0.3, -0.6, -1.0] == [REWARD[r.outcome] for r in results]
    assert len(results[1].tests) == 3
    assert score_program(executor, problem, programs[1]).outcome == Outcome.FAILED
    with pytest.raises(ValueError, match="1 problems but 2 programs"):
        score_programs(executor, [problem], programs[:2])


def test_example_tests_for_the_filtered_setting(executor, apps_problems):
    stdio, call, none = apps_problems["test/0111"], apps_problems["train/2404"], apps_problems["test/4184"]
    wrong = "print(0)\n"
    results = score_examples(executor, [stdio, stdio, call, none], [stdio.references[0], wrong,
                                                                     call.references[0], none.references[0]])
    assert [r.outcome if r else None for r in results] == [Outcome.PASSED, Outcome.FAILED, Outcome.PASSED, None]
    assert len(results[2].tests) == 2  # the statement's two examples, not the hidden test
    assert select_tests(none, "example") is None and select_tests(none, "hidden") is none.hidden_tests
    with pytest.raises(ValueError, match="apps/test/4184: has no example tests"):
        score_programs(executor, [none], [wrong], which="example")
    with pytest.raises(ValueError, match="unknown test set 'visible'"):
        select_tests(none, "visible")


def test_infrastructure_failures_come_back_from_scoring_as_no_verdict(apps_problems):
    """score_programs hands the executor's infrastructure status on unchanged: no outcome, no reward."""
    problem = next(iter(apps_problems.values()))
    with Executor(workers=1, fault="fork", infra_retries=0) as ex:
        results = score_programs(ex, [problem] * 2, [problem.references[0], "x = ("])
    assert all(r.is_infra and r.outcome == Outcome.INFRA_ERROR and r.reward is None for r in results)
    assert [r.outcome for r in results if not r.is_infra] == []
