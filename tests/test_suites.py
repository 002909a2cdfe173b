"""Suites and the registry: loading APPS (both layouts), MBPP and HumanEval, prompts, splits, named errors.

No execution here (see tests/test_suites_scoring.py)."""

from __future__ import annotations

import configparser
import json
import shutil
from pathlib import Path

import pytest

import envs  # noqa: F401  (registers the suites)
from envs.problem import SpecError, TestSpec
from envs.registry import UnknownSuiteError, load_suite, register_suite, suite_info, suite_names
from envs.suites import apps, mbpp
from envs.suites.apps import format_apps_prompt, parse_example_tests

ROOT = Path(__file__).resolve().parents[1]
FIXTURES = ROOT / "tests" / "fixtures"
APPS_DIR = FIXTURES / "apps_dir"
APPS_HF = FIXTURES / "apps_hf"
SHARED_MBPP = ROOT / ".." / "shared" / "data" / "mbpp" / "mbpp.jsonl"


@pytest.fixture(scope="module")
def hf_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("hf_cache"))


# -- registry --------------------------------------------------------------------------------------------

def test_registry_lists_the_four_suites_and_names_unknown_ones():
    assert {"apps", "mbpp", "humaneval", "embedded"} <= set(suite_names())
    with pytest.raises(UnknownSuiteError, match="unknown suite 'nope'.*apps"):
        load_suite("nope", "train")
    with pytest.raises(ValueError, match="suite 'humaneval' has no split 'train'"):
        load_suite("humaneval", "train")


def test_a_suite_is_one_loader_and_one_registration_call():
    def load_tiny(split, n=2):
        return [p for p in load_suite("mbpp", "prompt")[:n]]

    register_suite("tiny_test_suite", load_tiny, splits=("prompt",))
    try:
        assert [p.problem_id for p in load_suite("tiny_test_suite", "prompt", n=1)] == ["1"]
    finally:
        from envs import registry
        registry._SUITES.pop("tiny_test_suite")


# -- MBPP ------------------------------------------------------------------------------------------------

def test_mbpp_splits_by_task_id():
    sizes = {split: len(load_suite("mbpp", split)) for split in suite_info("mbpp").splits}
    assert sizes == {"prompt": 10, "test": 500, "validation": 90, "train": 374}
    ids = {split: [int(p.problem_id) for p in load_suite("mbpp", split)] for split in sizes}
    assert (min(ids["prompt"]), max(ids["prompt"])) == (1, 10)
    assert (min(ids["test"]), max(ids["test"])) == (11, 510)
    assert (min(ids["validation"]), max(ids["validation"])) == (511, 600)
    assert (min(ids["train"]), max(ids["train"])) == (601, 974)
    assert ids["validation"] == list(range(511, 601))  # the validation split is task_id 511-600, in order
    assert {p.split for p in load_suite("mbpp", "validation")} == {"validation"}


def test_mbpp_problem_prompt_and_tests():
    p = load_suite("mbpp", "test")[0]
    assert (p.suite, p.problem_id, p.split) == ("mbpp", "11", "test")
    assert p.example_tests is None
    assert p.hidden_tests.style == "assert" and len(p.hidden_tests) == 3
    assert p.prompt.startswith("You are an expert Python programmer, and here is your task: " + p.statement)
    assert p.prompt.endswith("\n".join(p.hidden_tests.asserts) + "\n[BEGIN]\n")
    assert "\r" not in p.references[0] and "def remove_Occ" in p.references[0]
    shot = load_suite("mbpp", "test", shots=(2, 3))[0]
    assert shot.prompt.endswith(p.prompt) and shot.prompt.count("[DONE]") == 2
    assert "def similar_elements" in shot.prompt


def test_mbpp_setup_code_becomes_the_assert_setup():
    by_id = {p.problem_id: p for p in load_suite("mbpp", "train")}
    # task 927's test_setup_code builds trees of the class its reference defines (so it runs after the program)
    assert by_id["927"].hidden_tests.setup.startswith("root = Node(1)")
    assert "class Node" in by_id["927"].references[0]


def test_mbpp_ships_inside_the_package_with_its_notice():
    path = mbpp.default_path()
    assert path.is_relative_to(Path(envs.__file__).parent)
    if SHARED_MBPP.exists():
        assert path.read_bytes() == SHARED_MBPP.read_bytes()
    notice = (path.parent / "NOTICE.md").read_text()
    assert "CC BY 4.0" in notice and "google-research" in notice
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    patterns = [s.strip() for s in cfg["options.package_data"]["envs"].split(",")]
    rel = path.relative_to(Path(envs.__file__).parent)
    assert any(rel.match(pat) for pat in patterns), (rel, patterns)


def _write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


GOOD_MBPP = {"task_id": 601, "text": "t", "code": "def f():\r\n  return 1", "test_setup_code": "",
             "test_list": ["assert f() == 1"], "challenge_test_list": []}


@pytest.mark.parametrize("bad, message", [
    ({k: v for k, v in GOOD_MBPP.items() if k != "code"} | {"task_id": 602}, r"line 2 \(task_id=602\): missing field 'code'"),
    (GOOD_MBPP | {"task_id": 602, "test_list": "assert f() == 1"}, r"line 2 \(task_id=602\): field 'test_list' must be list"),
    (GOOD_MBPP | {"task_id": "602"}, r"line 2: field 'task_id' must be int"),
    ("{not json", r"line 2: not valid JSON"),
])
def test_mbpp_bad_rows_name_suite_file_row_and_field(tmp_path, bad, message):
    path = _write_jsonl(tmp_path / "mbpp.jsonl", [GOOD_MBPP, bad])
    with pytest.raises(SpecError, match=r"^mbpp: .*mbpp\.jsonl " + message):
        load_suite("mbpp", "train", path=path)


def test_mbpp_reads_another_copy(tmp_path):
    problems = load_suite("mbpp", "train", path=_write_jsonl(tmp_path / "m.jsonl", [GOOD_MBPP]))
    assert [p.references for p in problems] == [("def f():\n  return 1",)]


# -- HumanEval -------------------------------------------------------------------------------------------

def test_humaneval_has_no_validation_split_and_says_so():
    from envs.suites.humaneval import load_humaneval

    with pytest.raises(ValueError, match="suite 'humaneval' has no split 'validation'; its splits are"):
        load_suite("humaneval", "validation")
    with pytest.raises(ValueError, match="evaluation-only set with no validation split"):
        load_humaneval("validation")


def test_humaneval_problems_are_whole_programs():
    problems = load_suite("humaneval", "test")
    assert len(problems) == 164 and len({p.problem_id for p in problems}) == 164
    p = problems[0]
    assert p.problem_id == "HumanEval/0" and p.hidden_tests.style == "check"
    assert p.hidden_tests.entry_point == "has_close_elements"
    assert p.references[0].startswith(p.starter_code) and "def has_close_elements" in p.references[0]
    assert p.prompt.startswith("\nQUESTION:\n") and p.starter_code in p.prompt
    assert p.prompt.endswith("\nUse Call-Based format\nANSWER:\n")
    assert p.example_tests is None


# -- APPS ------------------------------------------------------------------------------------------------

def test_apps_both_layouts_load_the_same_problems(hf_cache):
    for split, ids in (("train", ["train/0001", "train/2287", "train/2404"]), ("test", ["test/0111", "test/4184"])):
        from_dir = load_suite("apps", split, source=str(APPS_DIR))
        from_hf = load_suite("apps", split, source=str(APPS_HF), cache_dir=hf_cache)
        assert [p.problem_id for p in from_dir] == ids
        assert from_dir == from_hf  # dataclass equality ignores metadata (which names the layout)
        assert {p.metadata["layout"] for p in from_dir} == {"directory"}
        assert {p.metadata["layout"] for p in from_hf} == {"huggingface"}


def test_apps_problem_fields():
    problems = {p.problem_id: p for s in ("train", "test") for p in load_suite("apps", s, source=str(APPS_DIR))}
    stdio, call, codewars = problems["train/0001"], problems["train/2404"], problems["test/4184"]
    assert stdio.difficulty == "interview" and call.difficulty == "introductory"
    assert problems["train/2287"].difficulty == "competition"
    assert stdio.hidden_tests == TestSpec("stdio", cases=({"input": "3\n2 2 3\n4 3 7\n10 1 9\n",
                                                           "output": "1\n6\n-1\n"},))
    assert call.hidden_tests.style == "call" and call.hidden_tests.fn_name == "findKthPositive"
    assert call.hidden_tests.cases[0] == {"args": [[2, 3, 4, 7, 11], 5], "expected": 9}
    assert len(codewars.hidden_tests) == 8 and codewars.hidden_tests.cases[0] == {"args": [1], "expected": [False]}
    assert len(stdio.references) == 24 and len(call.references) == 58
    assert stdio.metadata["url"].startswith("https://codeforces.com/")


def test_apps_prompt_format_as_in_apps_and_coderl():
    problems = {p.problem_id: p for s in ("train", "test") for p in load_suite("apps", s, source=str(APPS_DIR))}
    stdio, call = problems["train/0001"], problems["train/2404"]
    question = (APPS_DIR / "train" / "0001" / "question.txt").read_text()
    assert stdio.prompt == "\nQUESTION:\n" + question + "\nUse Standard Input format\nANSWER:\n"
    starter = (APPS_DIR / "train" / "2404" / "starter_code.py").read_text()
    assert call.starter_code == starter
    assert call.prompt == "\nQUESTION:\n" + call.statement + "\n" + starter + "\nUse Call-Based format\nANSWER:\n"
    assert format_apps_prompt("q", "", call_based=False) == "\nQUESTION:\nq\nUse Standard Input format\nANSWER:\n"


def test_apps_example_tests_parsed_from_statements():
    problems = {p.problem_id: p for s in ("train", "test") for p in load_suite("apps", s, source=str(APPS_DIR))}
    assert problems["train/0001"].example_tests == problems["train/0001"].hidden_tests  # the one sample
    assert problems["test/0111"].example_tests.cases == ({"input": "3 5\n00100\n10110\n11001\n", "output": "5\n"},)
    atcoder = problems["train/2287"].example_tests  # "-----Sample Input-----" blocks; the prose after is not kept
    assert atcoder.cases == ({"input": "5\n1 2\n3 1\n4 3\n3 5\n2\n2 6\n5 7\n", "output": "Yes\n5\n6\n6\n5\n7\n"},)
    leetcode = problems["train/2404"].example_tests  # "Input: arr = [...], k = 5" / "Output: 9"
    assert leetcode == TestSpec("call", fn_name="findKthPositive", cases=(
        {"args": [[2, 3, 4, 7, 11], 5], "expected": 9}, {"args": [[1, 2, 3, 4], 2], "expected": 6}))
    # 4184 (Codewars) shows no examples: 1 of the 5 sample problems yields none
    assert problems["test/4184"].example_tests is None
    assert sum(p.example_tests is None for p in problems.values()) == 1


@pytest.mark.parametrize("question, fn_name, expected", [
    ("Text.\n\n-----Examples-----\nInput\n1 2\n\nOutput\n3\n\nInput\n5 5\n\nOutput\n10\n\n-----Note-----\nx\n",
     None, [{"input": "1 2\n", "output": "3\n"}, {"input": "5 5\n", "output": "10\n"}]),
    ("-----Example-----\nInput:\n2\n1 2\nOutput:\n3\n", None, [{"input": "2\n1 2\n", "output": "3\n"}]),
    ("-----Sample Input 1-----\n4\n-----Sample Output 1-----\n16\n\n-----Sample Input 2-----\n1\n"
     "-----Sample Output 2-----\n1\n", None, [{"input": "4\n", "output": "16\n"}, {"input": "1\n", "output": "1\n"}]),
    ("-----Input-----\nOne line.\n-----Output-----\nOne number.\n", None, None),  # format sections, no examples
    ("-----Examples-----\nInput\n1\n\nOutput\n", None, None),  # an input without its output
    ("Example 1:\nInput: s = \"ab\", flag = true\nOutput: [1,null]\n", "f",
     [{"args": ["ab", True], "expected": [1, None]}]),
    ("Example:\nInput: root = some tree\nOutput: 3\n", "f", None),  # not a literal: skipped
])
def test_parse_example_tests(question, fn_name, expected):
    spec = parse_example_tests(question, fn_name)
    if expected is None:
        assert spec is None
    else:
        assert [dict(c) for c in spec.cases] == expected and spec.style == ("call" if fn_name else "stdio")


def _copy_dir_fixture(tmp_path: Path) -> Path:
    root = tmp_path / "apps"
    shutil.copytree(APPS_DIR, root)
    for f in root.rglob("*"):
        f.chmod(0o755 if f.is_dir() else 0o644)
    return root


@pytest.mark.parametrize("file, content, message", [
    ("input_output.json", "{not json", r"train/0001: field 'input_output' is not valid JSON"),
    ("input_output.json", '{"inputs": ["1\\n"], "outputs": []}', r"train/0001: field 'input_output' has 1 inputs but 0"),
    ("solutions.json", '{"a": 1}', r"train/0001: field 'solutions' must be a JSON list of strings"),
    ("metadata.json", "[1]", r"train/0001: field 'metadata.json' must be a JSON object"),
])
def test_apps_directory_bad_files_name_suite_problem_and_field(tmp_path, file, content, message):
    root = _copy_dir_fixture(tmp_path)
    (root / "train" / "0001" / file).write_text(content)
    with pytest.raises(SpecError, match=r"^apps: .*" + message):
        load_suite("apps", "train", source=str(root))


def _hf_copy(tmp_path: Path, split: str, edit) -> Path:
    root = tmp_path / "apps_hf"
    root.mkdir()
    rows = [json.loads(line) for line in (APPS_HF / f"{split}.jsonl").read_text().splitlines()]
    edit(rows)
    _write_jsonl(root / f"{split}.jsonl", rows)
    return root


def test_apps_hf_bad_rows_name_suite_row_and_field(tmp_path, hf_cache):
    def break_io(rows):
        rows[1]["input_output"] = '{"inputs": [[1]], "outputs": [1], "fn_name": 7}'
    root = _hf_copy(tmp_path, "train", break_io)
    with pytest.raises(SpecError, match=r"^apps: .*\[train\] row 1 \(problem_id=2287\): field 'input_output': 'fn_name'"):
        load_suite("apps", "train", source=str(root), cache_dir=hf_cache)


def test_apps_hf_missing_column_is_named(tmp_path, hf_cache):
    def drop(rows):
        for r in rows:
            del r["starter_code"]
    root = _hf_copy(tmp_path, "test", drop)
    with pytest.raises(SpecError, match=r"missing column\(s\) \['starter_code'\]"):
        load_suite("apps", "test", source=str(root), cache_dir=hf_cache)


def test_apps_rows_without_tests_are_skipped_or_refused(tmp_path, hf_cache):
    def empty(rows):
        rows[0]["input_output"] = ""
    root = _hf_copy(tmp_path, "test", empty)
    assert [p.problem_id for p in load_suite("apps", "test", source=str(root), cache_dir=hf_cache)] == ["test/4184"]
    with pytest.raises(SpecError, match=r"problem_id=111\): field 'input_output' is empty"):
        load_suite("apps", "test", source=str(root), cache_dir=hf_cache, skip_untested=False)


@pytest.mark.parametrize("source", ["dir", "hf"])
def test_apps_validation_is_a_seeded_slice_of_train_that_train_then_excludes(source, hf_cache):
    opts = dict(source=str(APPS_DIR)) if source == "dir" else dict(source=str(APPS_HF), cache_dir=hf_cache)
    whole = load_suite("apps", "train", **opts)
    assert [p.problem_id for p in whole] == ["train/0001", "train/2287", "train/2404"]  # as published
    validation = load_suite("apps", "validation", validation_size=1, **opts)
    train = load_suite("apps", "train", validation_size=1, **opts)
    assert len(validation) == 1 and len(train) == 2
    assert {p.split for p in validation} == {"validation"} and {p.split for p in train} == {"train"}
    ids = {p.problem_id for p in validation}
    assert not ids & {p.problem_id for p in train}
    assert ids | {p.problem_id for p in train} == {p.problem_id for p in whole}
    assert ids == apps.validation_slice([p.problem_id for p in whole], 1, 0)
    # the same problem as in train, but for its split
    original = next(p for p in whole if p.problem_id in ids)
    assert validation[0].hidden_tests == original.hidden_tests and validation[0].references == original.references
    # deterministic; the seed decides; filters apply after the slice is drawn, so they do not move it
    assert load_suite("apps", "validation", validation_size=1, **opts) == validation
    slices = {frozenset(apps.validation_slice([p.problem_id for p in whole], 1, seed)) for seed in range(20)}
    assert len(slices) > 1
    for difficulty in ("introductory", "interview", "competition"):
        kept = load_suite("apps", "validation", validation_size=1, difficulties=[difficulty], **opts)
        assert [p.problem_id for p in kept] == [p.problem_id for p in validation if p.difficulty == difficulty]


def test_apps_validation_needs_its_size(hf_cache):
    with pytest.raises(ValueError, match="validation split is a seeded slice of the train split.*validation_size"):
        load_suite("apps", "validation", source=str(APPS_DIR))
    with pytest.raises(ValueError, match="validation_size=3 leaves no train problems"):
        load_suite("apps", "train", source=str(APPS_DIR), validation_size=3)
    with pytest.raises(ValueError, match="validation_size must be a positive integer"):
        load_suite("apps", "validation", source=str(APPS_DIR), validation_size=0)
    # the test split does not depend on it
    assert load_suite("apps", "test", source=str(APPS_DIR), validation_size=1) == \
        load_suite("apps", "test", source=str(APPS_DIR))


def test_apps_hub_name_goes_through_load_dataset(monkeypatch):
    """The hub name is read with `datasets.load_dataset("codeparrot/apps", split=...)` (mocked: no network)."""
    import datasets

    rows = [json.loads(line) for line in (APPS_HF / "train.jsonl").read_text().splitlines()]
    calls = []

    def fake_load_dataset(path, split=None, **kwargs):
        calls.append((path, split, kwargs.get("data_files")))
        if path == apps.HUB_NAME:  # datasets >= 4 refuses the repository's loading script
            raise RuntimeError("Dataset scripts are no longer supported, but found apps.py")
        return datasets.Dataset.from_list(rows)

    monkeypatch.setattr(datasets, "load_dataset", fake_load_dataset)
    problems = load_suite("apps", "train", limit=2, difficulties=["interview", "competition"])
    assert [p.problem_id for p in problems] == ["train/0001", "train/2287"]
    assert calls == [("codeparrot/apps", "train", None),
                     ("json", "train", {"train": "hf://datasets/codeparrot/apps/train.jsonl"})]


def test_validate_skips_a_split_that_needs_an_option_unless_asked_for(monkeypatch):
    """`python -m envs.validate apps` reports APPS "validation" as skipped without validation_size (no execution:
    the executor and scoring are stubbed; tests/test_suites_scoring.py runs the real report)."""
    import io

    import envs.execute
    from envs import validate

    class NoExecutor:
        def __init__(self, *args, **kwargs):
            pass

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(envs.execute, "Executor", NoExecutor)
    monkeypatch.setattr(validate, "score_programs",
                        lambda executor, problems, programs: [type("R", (), {"passed": True})() for _ in programs])
    out = io.StringIO()
    assert validate.main(["apps", "--opt", f"source={APPS_DIR}"], out=out) == 1.0
    text = out.getvalue()
    assert "apps/train: 92/92" in text and "apps/test: 9/9" in text
    assert "apps/validation: skipped (apps: the validation split is a seeded slice" in text
    out = io.StringIO()
    validate.main(["apps", "--opt", f"source={APPS_DIR}", "--opt", "validation_size=1"], out=out)
    assert "apps/validation: " in out.getvalue() and "skipped" not in out.getvalue()
    with pytest.raises(ValueError, match="validation_size"):
        validate.main(["apps", "--split", "validation", "--opt", f"source={APPS_DIR}"], out=io.StringIO())
