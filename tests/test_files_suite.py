"""The `files` suite (`envs/suites/files.py`): the documented schema read from JSONL, JSON and Parquet with a
split column or one file per split; malformed rows refused with the file, row and field; problems whose
references all fail left out; every format adapter on its fixture (tests/fixtures/formats, built by
tests/fixtures/files_build.py); the APPS adapter against the APPS suite on the shipped sample; the validate
command."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import pytest

import envs  # noqa: F401  (registers the suites)
from envs.problem import Comparison, SpecError
from envs.registry import load_suite
from envs.validate import main as validate_main

FIXTURES = Path(__file__).resolve().parent / "fixtures"
NATIVE = FIXTURES / "files" / "problems.jsonl"
FORMATS = FIXTURES / "formats"
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"


def rows() -> list[dict]:
    return [json.loads(line) for line in NATIVE.read_text().splitlines()]


def load(split: str, source, **options):
    options.setdefault("check_references", False)
    return load_suite("files", split, source=str(source), **options)


def test_native_jsonl_split_column():
    train, test = load("train", NATIVE), load("test", NATIVE)
    assert (len(train), len(test), len(load("validation", NATIVE))) == (22, 4, 4)
    assert {p.hidden_tests.style for p in train} == {"stdio", "call", "assert", "check"}
    p = next(p for p in train if p.problem_id == "mul2")
    assert p.starter_code == "def mul(x):\n" and p.references and p.difficulty == "easy"
    assert p.prompt.startswith("\nQUESTION:\n") and "Use Call-Based format" in p.prompt
    assert load("train", NATIVE, prompt_format="plain")[0].prompt == rows()[0]["prompt"]
    assert not {p.problem_id for p in train} & {p.problem_id for p in test}


def test_json_and_parquet_one_file_per_split(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    data = [r for r in rows() if r["split"] == "train"]
    (tmp_path / "json").mkdir()
    (tmp_path / "json" / "train.json").write_text(json.dumps({"rows": data}))
    (tmp_path / "pq").mkdir()
    flat = [{**{k: v for k, v in r.items() if k != "split"}, "tests": json.dumps(r["tests"])} for r in data]
    half = len(flat) // 2  # sharded as the hub writes Parquet
    pq.write_table(pa.Table.from_pylist(flat[:half]), tmp_path / "pq" / "train-00000-of-00002.parquet")
    pq.write_table(pa.Table.from_pylist(flat[half:]), tmp_path / "pq" / "train-00001-of-00002.parquet")
    want = [(p.problem_id, p.hidden_tests) for p in load("train", NATIVE)]
    assert [(p.problem_id, p.hidden_tests) for p in load("train", tmp_path / "json")] == want
    assert [(p.problem_id, p.hidden_tests) for p in load("train", tmp_path / "pq")] == want
    with pytest.raises(ValueError, match="no file for split 'test'"):
        load("test", tmp_path / "json")


@pytest.mark.parametrize("change, message", [
    (lambda r: r.pop("prompt"), "line 2 (id={id}): missing field 'prompt'"),
    (lambda r: r.update(solution=["x"]), "line 2 (id={id}): unknown field(s) ['solution']"),
    (lambda r: r.update(tests={"style": "stdio", "cases": [{"input": "1"}]}),
     "line 2 (id={id}): field 'tests'.cases[0]: missing field 'output'"),
    (lambda r: r.update(tests="{not json"), "line 2 (id={id}): field 'tests' is a string but not JSON"),
    (lambda r: r.update(solutions=["ok", 3]), "line 2 (id={id}): field 'solutions'[1] must be a string"),
    (lambda r: r.update(id="add1"), "line 2 (id=add1): field 'id': 'add1' is also the id of"),
    (lambda r: r.update(tags="math"), "line 2 (id={id}): field 'tags' must be list"),
    (lambda r: r.update(tests={"style": "stdio", "cases": [], "compare": "float"}), "field 'tests' holds no tests"),
    (lambda r: r.update(tests={"style": "stdio", "cases": [{"input": "", "output": ""}],
                               "compare": {"rule": "checker", "checker_file": "nope.py"}}), "nope.py' does not exist"),
])
def test_malformed_rows_name_file_row_and_field(tmp_path, change, message):
    data = [r for r in rows() if r["split"] == "train"][:3]
    ident = data[1]["id"]
    change(data[1])
    message = message.format(id=ident)
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    with pytest.raises(SpecError) as e:
        load("train", path)
    assert str(path) in str(e.value) and message in str(e.value), str(e.value)


def test_missing_split_and_bad_json(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text(json.dumps({k: v for k, v in rows()[0].items() if k != "split"}) + "\n{oops\n")
    with pytest.raises(SpecError, match=r"mine.jsonl line 1 \(id=add1\)|mine.jsonl line 1: missing field 'split'"):
        load("train", path)
    path.write_text(json.dumps(rows()[0]) + "\n{oops\n")
    with pytest.raises(SpecError, match="mine.jsonl line 2: not valid JSON"):
        load("train", path)


def test_problems_whose_references_all_fail_are_left_out(tmp_path, caplog, monkeypatch):
    monkeypatch.setenv("BCODER_CACHE", str(tmp_path / "cache"))
    data = [r for r in rows() if r["split"] == "train"][:3]
    data[0]["solutions"] = ["print('wrong')\n", "raise SystemExit(1)\n"]  # all fail: left out
    data[1]["solutions"] = ["print('wrong')\n", data[1]["solutions"][0]]  # one passes: kept
    data[2]["solutions"] = []  # none to check: kept
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    kept = load_suite("files", "train", source=str(path), workers=1)
    assert [p.problem_id for p in kept] == [data[1]["id"], data[2]["id"]]
    assert "add1" in caplog.text and "all 2 reference solution(s) fail" in caplog.text
    assert len(list((tmp_path / "cache" / "envs" / "reference_checks").glob("*.json"))) == 1
    out = io.StringIO()
    validate_main(["files", "--source", str(path), "--split", "train", "--workers", "1"], out=out)
    text = out.getvalue()
    assert "all references fail: files/add1" in text and "1 have references that all fail" in text
    assert text.strip().splitlines()[-1] == "reference pass rate: 1/4 (25.00%)"
    # a second load takes every verdict from the cache: nothing runs (the Executor is never built)
    import envs.execute

    monkeypatch.setattr(envs.execute, "Executor", None)
    assert [p.problem_id for p in load_suite("files", "train", source=str(path))] == [p.problem_id for p in kept]
    monkeypatch.undo()
    monkeypatch.setenv("BCODER_CACHE", str(tmp_path / "cache"))
    # an edited problem is checked again, the others are not: add1 gets a reference that passes
    from envs.reference_check import broken_references

    data[0]["solutions"].append("print(int(input()) + 1)\n")
    path.write_text("".join(json.dumps(r) + "\n" for r in data))
    assert broken_references(load("train", path), str(path), "train", workers=1) == ({}, 1)


def test_suite_option_compare_applies_to_stdio_tests_without_a_rule():
    train = load("train", NATIVE, compare={"rule": "float", "abs_tol": 1e-3})
    stdio = [p for p in train if p.hidden_tests.style == "stdio"]
    assert stdio and all(p.hidden_tests.rule == Comparison("float", abs_tol=1e-3) for p in stdio)


# ---------------------------------------------------------------------------------------------- adapters

def test_apps_and_taco():
    train, test = load("train", FORMATS / "apps.jsonl", format="apps"), load("test", FORMATS / "apps.jsonl", format="apps")
    assert [p.problem_id for p in train] == ["17"] and train[0].hidden_tests.style == "stdio"
    assert train[0].example_tests is not None and train[0].example_tests.cases[0]["output"] == "3\n"
    assert test[0].hidden_tests.fn_name == "double" and test[0].hidden_tests.cases[0]["expected"] == [2]
    taco = load("train", FORMATS / "taco.jsonl", format="taco")[0]
    assert taco.problem_id == "1" and taco.metadata["tags"] == ["Sorting", "Greedy algorithms", "Sorting"]


def test_apps_adapter_matches_the_apps_suite_on_the_shipped_sample(tmp_path):
    sys.path.insert(0, str(FIXTURES))
    from apps_build import hf_row

    sample = SHARED / "apps_sample" / "train"
    path = tmp_path / "train.jsonl"
    path.write_text("".join(json.dumps(hf_row(d)) + "\n" for d in sorted(sample.iterdir())))
    ours = load("train", path, format="apps")
    theirs = load_suite("apps", "train", source=str(SHARED / "apps_sample"))
    assert len(ours) == len(theirs) == 5
    for a, b in zip(ours, theirs):
        assert (a.hidden_tests, a.example_tests, a.references, a.prompt, a.difficulty) == \
               (b.hidden_tests, b.example_tests, b.references, b.prompt, b.difficulty)


def test_codecontests():
    p = load("train", FORMATS / "codecontests.jsonl", format="codecontests")[0]
    assert p.problem_id == "1000_A. Sum" and len(p.hidden_tests) == 4 and len(p.example_tests) == 1
    assert p.references == ("a, b = map(int, input().split())\nprint(a + b)\n",)  # PYTHON3 only
    assert p.difficulty == "7" and p.metadata["tags"] == ["math"]


def test_livecodebench_stdin_functional_and_compressed_private_tests():
    stdin, functional = load("test", FORMATS / "livecodebench.jsonl", format="livecodebench")
    assert stdin.hidden_tests.style == "stdio" and len(stdin.hidden_tests) == 2  # the private one decompressed
    assert functional.hidden_tests.fn_name == "addAll"
    assert functional.hidden_tests.cases[0] == {"args": [[1, 2, 3], 2], "expected": [3, 4, 5]}
    assert functional.starter_code.startswith("class Solution")


def test_livecodebench_refuses_pickled_globals(tmp_path):
    import base64
    import pickle
    import zlib

    row = json.loads((FORMATS / "livecodebench.jsonl").read_text().splitlines()[0])
    row["private_test_cases"] = base64.b64encode(zlib.compress(pickle.dumps(print))).decode()
    path = tmp_path / "test.jsonl"
    path.write_text(json.dumps(row) + "\n")
    with pytest.raises(SpecError, match="private_test_cases.*refused global"):
        load("test", path, format="livecodebench")


def test_verification_info():
    problems = load("train", FORMATS / "verification_info.jsonl", format="verification_info")
    assert [p.problem_id for p in problems] == ["vcu_1", "vcu_2"]  # the Rust row is skipped
    assert problems[0].references == ("n = int(input())\nprint(n * n)\n",)  # the code of the Markdown fence
    assert problems[1].hidden_tests.fn_name == "sum_digits" and problems[1].difficulty is None


def test_every_adapter_fixture_passes_its_references():
    out = io.StringIO()
    for fmt in ("apps", "taco", "codecontests", "verification_info"):
        validate_main(["files", "--source", str(FORMATS / f"{fmt}.jsonl"), "--format", fmt, "--workers", "1"],
                      out=out)
    lines = [line for line in out.getvalue().splitlines() if line.startswith("reference pass rate")]
    assert lines == ["reference pass rate: 2/2 (100.00%)", "reference pass rate: 1/1 (100.00%)",
                     "reference pass rate: 1/1 (100.00%)", "reference pass rate: 2/2 (100.00%)"], out.getvalue()


def test_hub_source_goes_through_datasets(monkeypatch):
    calls = []

    class FakeDatasets:
        @staticmethod
        def load_dataset(source, split, streaming, cache_dir):
            calls.append((source, split, streaming))
            return iter([{k: v for k, v in r.items() if k != "split"} for r in rows()[:2]])

    monkeypatch.setitem(sys.modules, "datasets", FakeDatasets)
    problems = load("train", "someone/problems", streaming=True)
    assert calls == [("someone/problems", "train", True)] and len(problems) == 2
