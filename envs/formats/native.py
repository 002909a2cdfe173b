"""The documented row schema of the `files` suite, and the one place a row becomes a `Problem`.

A row (one JSON object, or one Parquet row; every adapter of `envs/formats/` produces this same shape):

    id            str | int   required; unique within its split
    prompt        str         required; the problem statement
    tests         object      required; a TestSpec in its JSON form (`envs/problem.py`: stdio, call, assert or
                              check; a stdio spec may carry its comparison rule in "compare"), or that JSON
                              as a string
    example_tests object      optional; tests shown in the statement, same form
    starter_code  str         optional
    solutions     [str]       optional; human reference solutions (checked by `python -m envs.validate files`)
    difficulty    str | int   optional
    tags          [str]       optional
    split         str         optional; the split column (one file per split needs none)
    metadata      object      optional; anything else, kept on the problem

A stdio spec's `compare` may name its checker by file instead of inline: {"rule": "checker", "checker_file":
"checkers/x.py"}, resolved against the folder of the data file. Any other field is refused (a misspelt
`solution` would otherwise silently drop the references), as is a field of the wrong type; every message
names the file, the row and the field.
"""

from __future__ import annotations

import json
from pathlib import Path

from envs.formats.common import field
from envs.problem import Comparison, Problem, SpecError, TestSpec

FIELDS = ("id", "prompt", "tests", "example_tests", "starter_code", "solutions", "difficulty", "tags", "split",
          "metadata")
PROMPT_FORMATS = ("apps", "plain")


def parse_row(row: dict, where: str, *, suite: str, split: str, prompt_format: str = "apps",
              base_dir: Path | None = None, default_compare: Comparison | None = None) -> Problem:
    """One row of the schema above as a Problem (`where` names the file and row in every error)."""
    ident = row.get("id")
    if isinstance(ident, bool) or not isinstance(ident, (str, int)) or str(ident) == "":
        raise SpecError(f"{where}: field 'id' must be a non-empty string or an integer, got {ident!r}")
    where = f"{where} (id={ident})"
    unknown = sorted(set(row) - set(FIELDS))
    if unknown:
        raise SpecError(f"{where}: unknown field(s) {unknown}; the schema's fields are {list(FIELDS)} "
                        f"(put anything else under 'metadata', or pick an adapter with suite.options.format)")
    prompt = field(row, "prompt", str, where)
    starter = field(row, "starter_code", str, where, required=False) or ""
    hidden = _tests(row, "tests", where, base_dir, default_compare, required=True)
    example = _tests(row, "example_tests", where, base_dir, default_compare)
    solutions = field(row, "solutions", list, where, required=False) or []
    for i, s in enumerate(solutions):
        if not isinstance(s, str):
            raise SpecError(f"{where}: field 'solutions'[{i}] must be a string, got {type(s).__name__}")
    difficulty = row.get("difficulty")
    if difficulty is not None and (isinstance(difficulty, bool) or not isinstance(difficulty, (str, int))):
        raise SpecError(f"{where}: field 'difficulty' must be a string or an integer, got {type(difficulty).__name__}")
    tags = field(row, "tags", list, where, required=False) or []
    if not all(isinstance(t, str) for t in tags):
        raise SpecError(f"{where}: field 'tags' must be a list of strings")
    metadata = dict(field(row, "metadata", dict, where, required=False) or {})
    if prompt_format not in PROMPT_FORMATS:
        raise SpecError(f"prompt_format must be one of {PROMPT_FORMATS}, got {prompt_format!r}")
    return Problem(suite=suite, problem_id=str(ident), split=split, statement=prompt,
                   prompt=format_prompt(prompt, starter, hidden, prompt_format), hidden_tests=hidden,
                   example_tests=example, starter_code=starter, references=tuple(solutions),
                   difficulty=None if difficulty is None else str(difficulty),
                   metadata={**metadata, "tags": list(tags), "where": where})


def format_prompt(statement: str, starter: str, tests: TestSpec, prompt_format: str) -> str:
    """"apps": the APPS / CodeRL frame every shipped suite's model knows (QUESTION ... ANSWER); "plain": the
    statement (and starter code) as written."""
    if prompt_format == "plain":
        return statement + ("\n" + starter if starter else "")
    from envs.suites.apps import format_apps_prompt  # the one definition of the frame

    return format_apps_prompt(statement, starter, call_based=tests.style != "stdio")


def _tests(row: dict, key: str, where: str, base_dir: Path | None, default_compare: Comparison | None,
           required: bool = False) -> TestSpec | None:
    value = row.get(key)
    if value is None:
        if required:
            raise SpecError(f"{where}: missing field {key!r}")
        return None
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise SpecError(f"{where}: field {key!r} is a string but not JSON ({e.msg})") from None
    if isinstance(value, dict) and isinstance(value.get("compare"), dict) and "checker_file" in value["compare"]:
        value = {**value, "compare": _read_checker(value["compare"], f"{where}: field {key!r}", base_dir)}
    spec = TestSpec.from_json(value, f"{where}: field {key!r}")
    if len(spec) == 0:
        raise SpecError(f"{where}: field {key!r} holds no tests")
    if spec.style == "stdio" and spec.compare is None and default_compare is not None:
        spec = TestSpec("stdio", cases=spec.cases, compare=default_compare)
    return spec


def _read_checker(compare: dict, where: str, base_dir: Path | None) -> dict:
    name = compare["checker_file"]
    if not isinstance(name, str):
        raise SpecError(f"{where}.compare: 'checker_file' must be a path string")
    path = (base_dir or Path(".")) / name
    if not path.is_file():
        raise SpecError(f"{where}.compare: checker_file {str(path)!r} does not exist")
    out = {k: v for k, v in compare.items() if k != "checker_file"}
    out["checker"] = path.read_text(encoding="utf-8")
    return out
