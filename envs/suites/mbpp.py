"""MBPP (Austin et al., 2021): 974 short Python problems, each with a reference and three test asserts.

Data: `envs/data/mbpp/mbpp.jsonl` shipped with the package (CC BY 4.0, see `envs/data/mbpp/NOTICE.md`);
`load_mbpp(split, path=...)` reads another copy in the same format.

Splits by task_id, as in the literature (and B-Coder): "prompt" 1-10 (few-shot examples), "test" 11-510,
"validation" 511-600, "train" 601-974.

Prompt (the format of Austin et al., 2021, without the [DONE] delimiter: the program ends at EOS):

    You are an expert Python programmer, and here is your task: {text} Your code should pass these tests:

    {test_list[0]}
    {test_list[1]}
    {test_list[2]}
    [BEGIN]

and the program follows. With `shots=(2, 3, 4)` (the paper's choice) each shot problem is shown first, as its
prompt, its reference code and "\\n[DONE]\\n"; a base model then ends its answer the same way, so a run with shots
sets `model.stop_strings: ["[DONE]"]` (the program is its text before the delimiter). The asserts shown are the
hidden tests themselves, so MBPP has no separate example tests (`example_tests=None`; the filtered setting does
not apply). Hidden tests: an assert TestSpec of `test_list` with `test_setup_code` as its setup. References:
`code`, with "\\r\\n" read as "\\n".
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any, Sequence

from envs.jsonl import iter_jsonl
from envs.problem import Problem, SpecError, TestSpec
from envs.registry import register_suite

SUITE = "mbpp"
SPLIT_TASK_IDS = {"prompt": range(1, 11), "test": range(11, 511), "validation": range(511, 601),
                  "train": range(601, 975)}
SPLITS = tuple(SPLIT_TASK_IDS)
FEW_SHOT_TASK_IDS = (2, 3, 4)  # Austin et al. (2021)


def default_path() -> Path:
    return Path(str(resources.files("envs") / "data" / "mbpp" / "mbpp.jsonl"))


def split_of(task_id: int) -> str | None:
    for split, ids in SPLIT_TASK_IDS.items():
        if task_id in ids:
            return split
    return None


def _field(row: dict, key: str, kind: type, where: str) -> Any:
    if key not in row:
        raise SpecError(f"{where}: missing field {key!r}")
    if not isinstance(row[key], kind):
        raise SpecError(f"{where}: field {key!r} must be {kind.__name__}, got {type(row[key]).__name__}")
    return row[key]


def read_rows(path: Path) -> list[dict]:
    """The rows of an MBPP jsonl file, checked; errors name the file, line, task_id and field."""
    rows = []
    for where, row in iter_jsonl(path, SpecError, where_format=f"{SUITE}: {{path}} line {{line}}"):
        if not isinstance(row, dict):
            raise SpecError(f"{where}: expected a JSON object")
        task_id = _field(row, "task_id", int, where)
        where = f"{where} (task_id={task_id})"
        for key in ("text", "code"):
            _field(row, key, str, where)
        tests = _field(row, "test_list", list, where)
        if not tests or not all(isinstance(t, str) for t in tests):
            raise SpecError(f"{where}: field 'test_list' must be a non-empty list of strings")
        setup = row.get("test_setup_code", "")
        if setup is not None and not isinstance(setup, str):
            raise SpecError(f"{where}: field 'test_setup_code' must be str")
        rows.append(row)
    return rows


def _normalise(code: str) -> str:
    return code.replace("\r\n", "\n")


def format_mbpp_prompt(text: str, tests: Sequence[str]) -> str:
    return (f"You are an expert Python programmer, and here is your task: {text} "
            f"Your code should pass these tests:\n\n" + "\n".join(tests) + "\n[BEGIN]\n")


def load_mbpp(split: str, path: str | Path | None = None, shots: Sequence[int] = (),
              limit: int | None = None) -> list[Problem]:
    """The problems of one MBPP split; `shots` are task_ids shown first in every prompt (few-shot)."""
    if split not in SPLIT_TASK_IDS:
        raise ValueError(f"{SUITE}: unknown split {split!r}; expected one of {SPLITS}")
    path = Path(path) if path is not None else default_path()
    rows = read_rows(path)
    by_id = {r["task_id"]: r for r in rows}
    missing = [t for t in shots if t not in by_id]
    if missing:
        raise SpecError(f"{SUITE}: {path}: few-shot task_id(s) {missing} not found")
    prefix = "".join(format_mbpp_prompt(by_id[t]["text"], by_id[t]["test_list"])
                     + _normalise(by_id[t]["code"]) + "\n[DONE]\n" for t in shots)
    problems = []
    for row in sorted(rows, key=lambda r: r["task_id"]):
        if split_of(row["task_id"]) != split:
            continue
        problems.append(Problem(
            suite=SUITE,
            problem_id=str(row["task_id"]),
            split=split,
            statement=row["text"],
            prompt=prefix + format_mbpp_prompt(row["text"], row["test_list"]),
            hidden_tests=TestSpec("assert", setup=row.get("test_setup_code") or "",
                                  asserts=tuple(row["test_list"])),
            example_tests=None,
            references=(_normalise(row["code"]),),
            metadata={"challenge_test_list": list(row.get("challenge_test_list") or []),
                      "shots": list(shots)},
        ))
    return problems[:limit] if limit is not None else problems


register_suite(SUITE, load_mbpp, splits=SPLITS,
               description="MBPP (Austin et al., 2021), shipped in envs/data/mbpp (CC BY 4.0)")
