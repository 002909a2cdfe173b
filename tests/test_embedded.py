"""The embedded suite: deterministic, held-out test split, references that pass the real executor."""

from __future__ import annotations

import hashlib
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from envs.problem import Problem, TestSpec
from envs.registry import load_suite, suite_names
from envs.suites import embedded
from envs.suites.embedded import (ARG_NAMES, FUNCTION_NOUNS, FUNCTION_VERBS, HELD_OUT_CHARS, HELD_OUT_INTS,
                                  OPERATIONS, OPERATIONS_BY_NAME, is_held_out_pair, load_embedded)

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def train() -> list[Problem]:
    return load_embedded("train")


@pytest.fixture(scope="module")
def test() -> list[Problem]:
    return load_embedded("test")


def _digest(problems: list[Problem]) -> str:
    h = hashlib.sha256()
    for p in problems:
        h.update(json.dumps([p.problem_id, p.prompt, p.references, p.hidden_tests.to_json(), p.difficulty,
                             p.metadata], sort_keys=True).encode())
    return h.hexdigest()


def test_registered_and_sized(train: list[Problem], test: list[Problem]) -> None:
    assert "embedded" in suite_names()
    assert len(train) == embedded.TRAIN_SIZE and len(test) == embedded.TEST_SIZE
    assert load_suite("embedded", "test", limit=embedded.EVAL_SIZE) == test[: embedded.EVAL_SIZE]
    assert {p.split for p in train} == {"train"} and {p.split for p in test} == {"test"}
    assert len({p.problem_id for p in train + test}) == len(train) + len(test)
    with pytest.raises(ValueError, match="embedded"):
        load_embedded("validation")


def test_deterministic_from_seed_across_processes() -> None:
    small = dict(n_train=300, n_test=30)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from envs.suites.embedded import load_embedded; "
            "from tests.test_embedded import _digest; "
            "print(_digest(load_embedded('train', n_train=300, n_test=30) + load_embedded('test', n_train=300, n_test=30)))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], env=env, capture_output=True, text=True,
                         check=True, cwd=ROOT)
    here = load_embedded("train", **small) + load_embedded("test", **small)
    assert out.stdout.strip() == _digest(here)
    assert load_embedded("train", **small) == load_embedded("train")[:300]  # a prefix of the full split
    other = load_embedded("test", seed=1, **small)
    assert _digest(other) != _digest(load_embedded("test", **small))


def test_problem_shape(train: list[Problem], test: list[Problem]) -> None:
    for p in train[:300] + test:
        hidden, examples = p.hidden_tests, p.example_tests
        assert isinstance(examples, TestSpec)
        assert hidden.style == "assert" and hidden.setup == "" and len(hidden) == embedded.N_HIDDEN
        assert examples.asserts == hidden.asserts[: embedded.N_EXAMPLES]
        assert len(set(hidden.asserts)) == len(hidden.asserts)
        assert p.prompt == embedded.prompt_text(p.statement, examples.asserts)
        name, arg = p.metadata["fn_name"], p.metadata["arg"]
        assert f"`{name}({arg})`" in p.statement
        assert p.references[0].startswith(f"def {name}({arg}):\n")
        assert all(a.startswith(f"assert {name}(") for a in hidden.asserts)
        assert p.difficulty == embedded.DIFFICULTY[p.metadata["depth"]] == embedded.DIFFICULTY[
            len(p.metadata["operations"])]
        assert p.references[0].count("\n") == p.metadata["depth"] + 1  # one line per operation
    assert {p.difficulty for p in test} == {"easy", "medium", "hard"}
    assert {p.metadata["family"] for p in test} == {"list", "str", "int"}


def test_test_split_is_disjoint_from_train(train: list[Problem], test: list[Problem]) -> None:
    train_statements = {(p.metadata["fn_name"], p.statement) for p in train}
    train_references = {p.references[0] for p in train}
    train_prompts = {p.prompt for p in train}
    for p in test:
        assert (p.metadata["fn_name"], p.statement) not in train_statements
        assert p.references[0] not in train_references and p.prompt not in train_prompts

    def signature(p: Problem) -> str:
        m = p.metadata
        return json.dumps([m["family"], m["operations"], m["constants"], m["phrasings"]], sort_keys=True)

    assert not {signature(p) for p in test} & {signature(p) for p in train}


def test_held_out_names_constants_and_pairs_absent_from_train(train: list[Problem], test: list[Problem]) -> None:
    test_verbs, test_nouns = set(FUNCTION_VERBS[1]), set(FUNCTION_NOUNS[1])
    test_args = {a for pools in ARG_NAMES.values() for a in pools[1]}
    for p in train:
        m = p.metadata
        verb, noun = m["fn_name"].split("_")[:2]
        assert verb not in test_verbs and noun not in test_nouns and m["arg"] not in test_args
        for consts in m["constants"]:
            assert consts.get("k") not in HELD_OUT_INTS
            assert not {consts.get("a"), consts.get("b")} & HELD_OUT_CHARS
        assert not any(is_held_out_pair(a, b) for a, b in zip(m["operations"], m["operations"][1:]))
    held_out_names = 0
    for p in test:  # a problem's names are all held out or all from the train pools
        verb, noun = p.metadata["fn_name"].split("_")[:2]
        held = {verb in test_verbs, noun in test_nouns, p.metadata["arg"] in test_args}
        assert len(held) == 1
        held_out_names += held == {True}
    assert 0.02 * len(test) < held_out_names < 0.3 * len(test)
    # the test split does use what it holds out
    assert any(c.get("k") in HELD_OUT_INTS for p in test for c in p.metadata["constants"])
    assert any(is_held_out_pair(a, b) for p in test for a, b in zip(p.metadata["operations"],
                                                                      p.metadata["operations"][1:]))


def _phrasing_pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{[kab]\}", template)
    return re.compile(r"\S+".join(re.escape(part) for part in parts))


def test_held_out_phrasings_absent_from_train(train: list[Problem], test: list[Problem]) -> None:
    train_text = "\n".join(p.statement for p in train)
    test_text = "\n".join(p.statement for p in test)
    used_in_test = 0
    for op in OPERATIONS:
        pattern = _phrasing_pattern(op.phrasings[-1])
        assert not pattern.search(train_text), f"{op.name}: held-out phrasing {op.phrasings[-1]!r} in train"
        used_in_test += bool(pattern.search(test_text))
        for p in train:
            if op.name in p.metadata["operations"]:
                assert p.metadata["phrasings"][p.metadata["operations"].index(op.name)] < len(op.phrasings) - 1
    assert used_in_test >= len(OPERATIONS) // 4
    assert set(OPERATIONS_BY_NAME) == {op.name for op in OPERATIONS}


def test_every_reference_passes_the_executor(train: list[Problem], test: list[Problem]) -> None:
    from envs.execute import Executor
    from envs.scoring import score_programs

    problems = test + train[:: max(1, len(train) // 400)]  # the whole test split and a tenth of train
    with Executor(workers=2) as executor:
        results = score_programs(executor, problems, [p.references[0] for p in problems])
        wrong = score_programs(executor, problems[:50], [p.references[0].replace("return ", "return 1 or ", 1)
                                                         for p in problems[:50]])
    failing = [(p.problem_id, r.outcome.value, r.error) for p, r in zip(problems, results) if not r.passed]
    assert not failing
    assert not any(r.passed for r in wrong)  # the hidden tests do reject a wrong program
