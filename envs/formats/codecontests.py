"""DeepMind CodeContests rows (deepmind/code_contests).

Fields relied on: name, description, public_tests / private_tests / generated_tests (each {"input": [str],
"output": [str]}), solutions ({"language": [int], "solution": [str]}; language 3 is PYTHON3, the only one kept
as a reference), difficulty (an enum as an int), cf_tags, source, cf_rating, time_limit. Hidden tests are the
public, private and generated tests, in that order (as CodeContests is judged); example tests the public ones.
"""

from __future__ import annotations

from envs.formats.common import Skip, field, json_field
from envs.problem import SpecError, TestSpec

PYTHON3 = 3
TEST_FIELDS = ("public_tests", "private_tests", "generated_tests")


def adapt(row: dict, where: str, index: int) -> dict:
    name = field(row, "name", str, where)
    description = field(row, "description", str, where)
    cases = {key: _cases(row, key, where) for key in TEST_FIELDS}
    hidden = [c for key in TEST_FIELDS for c in cases[key]]
    if not hidden:
        raise Skip("no tests")
    solutions = json_field(row, "solutions", where, required=False) or {"language": [], "solution": []}
    if not isinstance(solutions, dict):
        raise SpecError(f"{where}: field 'solutions' must be an object with lists 'language' and 'solution'")
    languages, programs = solutions.get("language") or [], solutions.get("solution") or []
    if len(languages) != len(programs):
        raise SpecError(f"{where}: field 'solutions' has {len(languages)} languages for {len(programs)} solutions")
    out = {"id": name, "prompt": description, "tests": TestSpec("stdio", cases=tuple(hidden)).to_json(),
           "solutions": [s for lang, s in zip(languages, programs) if lang == PYTHON3 and isinstance(s, str)],
           "difficulty": row.get("difficulty"), "tags": [t for t in row.get("cf_tags") or [] if isinstance(t, str)],
           "metadata": {k: row[k] for k in ("source", "cf_rating", "time_limit") if row.get(k) is not None}}
    if cases["public_tests"]:
        out["example_tests"] = TestSpec("stdio", cases=tuple(cases["public_tests"])).to_json()
    if row.get("split") is not None:
        out["split"] = row["split"]
    return out


def _cases(row: dict, key: str, where: str) -> list[dict]:
    tests = json_field(row, key, where, required=False)
    if tests is None:
        return []
    if not isinstance(tests, dict):
        raise SpecError(f"{where}: field {key!r} must be an object with lists 'input' and 'output'")
    inputs, outputs = tests.get("input") or [], tests.get("output") or []
    if not isinstance(inputs, list) or not isinstance(outputs, list) or len(inputs) != len(outputs):
        raise SpecError(f"{where}: field {key!r}: 'input' and 'output' must be lists of the same length")
    for i, (a, b) in enumerate(zip(inputs, outputs)):
        if not isinstance(a, str) or not isinstance(b, str):
            raise SpecError(f"{where}: field {key!r}: test {i} must have string input and output")
    return [{"input": a, "output": b} for a, b in zip(inputs, outputs)]
