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


@pytest.fixture(scope="module")
def validation() -> list[Problem]:
    return load_embedded("validation")


def _problem_digest(p: Problem) -> str:
    """Every field of a problem: statement, prompt, references, hidden and example tests, metadata."""
    blob = json.dumps([p.suite, p.problem_id, p.split, p.statement, p.prompt, p.starter_code, list(p.references),
                       p.hidden_tests.to_json(), p.example_tests.to_json() if p.example_tests else None,
                       p.difficulty, p.metadata], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _split_digest(problems: list[Problem]) -> str:
    h = hashlib.sha256()
    for p in problems:
        h.update(_problem_digest(p).encode())
    return h.hexdigest()


# Computed on the code before the validation split was added (commit a852db1): train and test must not move.
TRAIN_DIGEST = "885b8c7e21d66e8b9ff7d5017436cf19f199619f8b9e2ddcbf85efdfddcb6e0f"
TEST_DIGEST = "963a958245df520f0d0297015e7628d33e4cef6cd586742b627dc7bbd7b3de82"


def test_train_and_test_splits_are_byte_identical_to_before_validation(train: list[Problem],
                                                                       test: list[Problem]) -> None:
    assert len(train) == 4000 and len(test) == 200
    assert _split_digest(train) == TRAIN_DIGEST
    assert _split_digest(test) == TEST_DIGEST
    # drawing the validation split (of any size) first does not change them
    embedded._generate.cache_clear()
    embedded._generate_validation.cache_clear()
    load_embedded("validation", n_validation=17)
    assert _split_digest(load_embedded("test")) == TEST_DIGEST


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
    with pytest.raises(ValueError, match="embedded.*no split 'valid'.*validation"):
        load_embedded("valid")


def test_validation_split_registered_sized_and_named(train: list[Problem], test: list[Problem],
                                                     validation: list[Problem]) -> None:
    assert embedded.SPLITS == ("train", "test", "validation")
    from envs.registry import suite_info
    assert suite_info("embedded").splits == embedded.SPLITS
    assert len(validation) == embedded.VALIDATION_SIZE == 200
    assert load_suite("embedded", "validation", limit=50) == validation[:50]
    assert {p.split for p in validation} == {"validation"}
    assert [p.problem_id for p in validation[:2]] == ["validation-00000", "validation-00001"]
    assert len({p.key for p in train + test + validation}) == len(train) + len(test) + len(validation)
    assert load_embedded("validation", n_validation=30) == validation[:30]  # a prefix, like the other splits


def test_deterministic_from_seed_across_processes() -> None:
    small = dict(n_train=300, n_test=30, n_validation=30)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from envs.suites.embedded import load_embedded; "
            "from tests.test_embedded import _digest; kw = dict(n_train=300, n_test=30, n_validation=30); "
            "print(_digest(load_embedded('train', **kw) + load_embedded('test', **kw) "
            "+ load_embedded('validation', **kw)))")
    env = dict(os.environ, PYTHONHASHSEED="12345")
    out = subprocess.run([sys.executable, "-c", code, str(ROOT)], env=env, capture_output=True, text=True,
                         check=True, cwd=ROOT)
    here = load_embedded("train", **small) + load_embedded("test", **small) + load_embedded("validation", **small)
    assert out.stdout.strip() == _digest(here)
    assert load_embedded("train", **small) == load_embedded("train")[:300]  # a prefix of the full split
    other = load_embedded("test", seed=1, **small)
    assert _digest(other) != _digest(load_embedded("test", **small))
    assert _digest(load_embedded("validation", seed=1, **small)) != _digest(load_embedded("validation", **small))


def test_problem_shape(train: list[Problem], test: list[Problem], validation: list[Problem]) -> None:
    for p in train[:300] + test + validation:
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
    for split in (test, validation):
        assert {p.difficulty for p in split} == {"easy", "medium", "hard"}
        assert {p.metadata["family"] for p in split} == {"list", "str", "int"}


def _signature(p: Problem) -> str:
    m = p.metadata
    return json.dumps([m["family"], m["operations"], m["constants"], m["phrasings"]], sort_keys=True)


def test_test_split_is_disjoint_from_train(train: list[Problem], test: list[Problem]) -> None:
    train_statements = {(p.metadata["fn_name"], p.statement) for p in train}
    train_references = {p.references[0] for p in train}
    train_prompts = {p.prompt for p in train}
    for p in test:
        assert (p.metadata["fn_name"], p.statement) not in train_statements
        assert p.references[0] not in train_references and p.prompt not in train_prompts

    assert not {_signature(p) for p in test} & {_signature(p) for p in train}


def test_validation_shares_no_signature_with_train_or_test(train: list[Problem], test: list[Problem],
                                                           validation: list[Problem]) -> None:
    signatures = {_signature(p) for p in validation}
    assert len(signatures) == len(validation)
    assert not signatures & {_signature(p) for p in train}
    assert not signatures & {_signature(p) for p in test}
    seen_prompts = {p.prompt for p in train + test}
    seen_references = {p.references[0] for p in train + test}
    for p in validation:
        assert p.prompt not in seen_prompts and p.references[0] not in seen_references
        assert embedded._problem_signature(p) == embedded._signature(
            p.metadata["family"], tuple(embedded.Step(OPERATIONS_BY_NAME[o], tuple(c.items()), ph) for o, c, ph in
                                        zip(p.metadata["operations"], p.metadata["constants"],
                                            p.metadata["phrasings"])))


@pytest.mark.parametrize("held_out_split", ["test", "validation"])
def test_held_out_names_constants_and_pairs_absent_from_train(train: list[Problem], held_out_split: str) -> None:
    test = load_embedded(held_out_split)
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
    # the held-out split does use what it holds out
    assert any(c.get("k") in HELD_OUT_INTS for p in test for c in p.metadata["constants"])
    assert any({c.get("a"), c.get("b")} & HELD_OUT_CHARS for p in test for c in p.metadata["constants"])
    assert any(is_held_out_pair(a, b) for p in test for a, b in zip(p.metadata["operations"],
                                                                      p.metadata["operations"][1:]))


def _phrasing_pattern(template: str) -> re.Pattern:
    parts = re.split(r"\{[kab]\}", template)
    return re.compile(r"\S+".join(re.escape(part) for part in parts))


@pytest.mark.parametrize("held_out_split", ["test", "validation"])
def test_held_out_phrasings_absent_from_train(train: list[Problem], held_out_split: str) -> None:
    test = load_embedded(held_out_split)
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


def test_every_reference_passes_the_executor(train: list[Problem], test: list[Problem],
                                             validation: list[Problem]) -> None:
    from envs.execute import Executor
    from envs.scoring import score_programs

    # the whole test and validation splits and a tenth of train
    problems = test + validation + train[:: max(1, len(train) // 400)]
    with Executor(workers=2) as executor:
        results = score_programs(executor, problems, [p.references[0] for p in problems])
        wrong = score_programs(executor, problems[:50], [p.references[0].replace("return ", "return 1 or ", 1)
                                                         for p in problems[:50]])
    failing = [(p.problem_id, r.outcome.value, r.error) for p, r in zip(problems, results) if not r.passed]
    assert not failing
    assert not any(r.passed for r in wrong)  # the hidden tests do reject a wrong program
