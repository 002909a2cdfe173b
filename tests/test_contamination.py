"""The contamination report (`envs/contamination.py`): matches by normalised statement, by normalised tests and by
13-gram share, never between unrelated problems; its figures on the shipped MBPP data; the run's report file and
`suite.options.drop_contaminated` (`bcoder_ray.loop.driver.Run.check_contamination`, without Ray)."""

from __future__ import annotations

import json

import pytest

import envs  # noqa: F401  (registers the suites)
from envs.contamination import N, THRESHOLD, contamination_report, ngrams
from envs.problem import Problem, TestSpec
from envs.registry import load_suite

WORDS = ("read a list of integers and print the sum of the even ones that appear after the first negative "
         "number in the list then print how many odd ones there were before it").split()


def problem(pid: str, statement: str, tests: TestSpec | None = None, split: str = "train") -> Problem:
    tests = tests or TestSpec("stdio", cases=({"input": pid, "output": pid},))
    return Problem("t", pid, split, statement, statement, tests)


def stdio(*pairs: tuple[str, str]) -> TestSpec:
    return TestSpec("stdio", cases=tuple({"input": i, "output": o} for i, o in pairs))


def reasons(report, split: str = "test") -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for m in report.matches:
        if m.split == split:
            out.setdefault(m.eval_key, set()).add(f"{m.reason}:{m.train_key}")
    return out


def test_normalised_prompt_and_tests_match():
    train = [problem("a", "Print  the SUM of two numbers.\n"),
             problem("b", "something else entirely", stdio(("1 2\n", "3\n"), ("5 5\n", "10\n"))),
             problem("c", "third", TestSpec("assert", asserts=("assert f('x')==1",)))]
    test = [problem("a2", "print the sum of two   numbers."),                            # case and spacing
            problem("b2", "another statement", stdio(("5  5", "10"), ("1 2", "3 \n"))),   # reordered, spaced
            problem("c2", "fourth", TestSpec("assert", asserts=('assert f("x") == 1',))),  # quotes and spaces
            problem("d", "unrelated", stdio(("1 2\n", "4\n")))]                           # one output differs
    got = reasons(contamination_report(train, {"test": test}))
    assert got == {"t/a2": {"prompt:t/a", "ngram:t/a"}, "t/b2": {"tests:t/b"}, "t/c2": {"tests:t/c"}}


def test_ngram_share_against_the_threshold():
    assert N == 13 and THRESHOLD == 0.5
    base = " ".join(WORDS)                                          # 33 words: 21 13-grams
    train = [problem("long", base + " and nothing more")]
    half = " ".join(WORDS[:25]) + " reversed order instead of sorted output please now"  # 13 of its 21 grams
    few = " ".join(WORDS[:14]) + " but that is where the likeness ends for this one here ok"  # 2 of 24
    short = problem("short", "print the sum")                      # under 13 words: the whole sequence as a gram
    report = contamination_report(train + [short], {"test": [problem("half", half), problem("few", few),
                                                              problem("short2", "Print the sum!")]})
    assert reasons(report) == {"t/half": {"ngram:t/long"}, "t/short2": {"ngram:t/short"}}  # "!": not the same text
    (m,) = [m for m in report.matches if m.eval_key == "t/half"]
    assert m.overlap == round(13 / 21, 3) and len(ngrams(half)) == 21
    assert report.train_keys() == {"t/long", "t/short"}
    data = report.to_json()
    assert data["splits"]["test"] == {"problems": 3, "contaminated": 2, "prompt": 0, "tests": 0, "ngram": 2}
    assert "13-gram share >= 0.5" in report.summary()


def test_shipped_mbpp():
    """MBPP's own splits (envs/data/mbpp): a few test problems restate a training problem (docs/environments.md)."""
    train = load_suite("mbpp", "train")
    report = contamination_report(train, {s: load_suite("mbpp", s) for s in ("validation", "test")})
    assert [len(report.contaminated(s)) for s in ("validation", "test")] == [1, 6]
    assert report.contaminated("test", "prompt") == {"mbpp/216", "mbpp/217", "mbpp/248"}
    assert not report.contaminated("test", "tests") and len(report.train_keys()) == 7


def test_the_run_reports_and_drops(tmp_path):
    from bcoder_ray.config import ConfigError, load_config
    from bcoder_ray.loop.driver import Run

    rows = [{"id": f"p{i}", "split": "train", "prompt": f"Problem number {i}: print {i}.",
             "tests": {"style": "stdio", "cases": [{"input": "", "output": f"{i}\n"}]}} for i in range(4)]
    rows += [{**rows[1], "id": "q1", "split": "test"}, {**rows[2], "id": "q2", "split": "test", "prompt": "new"}]
    source = tmp_path / "problems.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))

    def loaded(*extra: str) -> Run:
        run = Run.__new__(Run)                                     # only its problem lists: no Ray
        run.run_dir = tmp_path
        run.cfg = load_config("ci_tiny", ["--suite.name", "files", "--suite.options.source", str(source),
                                          "--suite.validation_split", "null", "--suite.max_train_problems", "null",
                                          "--suite.options.check_references", "false", *extra], check_paths=False)
        run.load_problems()
        return run

    run = loaded()
    assert [p.problem_id for p in run.train] == ["p0", "p1", "p2", "p3"]
    data = json.loads((tmp_path / "contamination.json").read_text())
    assert data["splits"]["test"]["contaminated"] == 2 and data["train_keys"] == ["files/p1", "files/p2"]
    run = loaded("--suite.options.drop_contaminated", "true")
    assert [p.problem_id for p in run.train] == ["p0", "p3"]
    with pytest.raises(ConfigError, match="drop_contaminated must be true or false"):
        loaded("--suite.options.drop_contaminated", "'yes'")
