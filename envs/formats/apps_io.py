"""APPS and TACO rows: `input_output` is a JSON string {"inputs": [...], "outputs": [...], "fn_name"?}.

APPS (codeparrot/apps): problem_id, question, solutions (JSON list), input_output, difficulty, url, starter_code.
TACO (BAAI/TACO): the same test and solution fields, no problem_id (the row number is the id), plus name,
source, tags / skill_types (Python-literal lists as strings) and time_limit. The conversion of `input_output`
is APPS's own (`envs.suites.apps.hidden_tests_from_input_output`), and example tests come from the statement
as for APPS.
"""

from __future__ import annotations

import ast

from envs.formats.common import field, json_field
from envs.problem import SpecError
from envs.suites.apps import hidden_tests_from_input_output, parse_example_tests


def adapt(row: dict, where: str, index: int) -> dict:
    question = field(row, "question", str, where)
    ident = row.get("problem_id", index)
    io = json_field(row, "input_output", where)
    tests = hidden_tests_from_input_output(io, f"{where}")
    solutions = json_field(row, "solutions", where, required=False) or []
    if not isinstance(solutions, list) or not all(isinstance(s, str) for s in solutions):
        raise SpecError(f"{where}: field 'solutions' must be a JSON list of strings")
    example = parse_example_tests(question, tests.fn_name)
    out = {"id": ident, "prompt": question, "tests": tests.to_json(), "solutions": solutions,
           "starter_code": field(row, "starter_code", str, where, required=False) or "",
           "difficulty": row.get("difficulty") or None, "tags": _tags(row),
           "metadata": {k: row[k] for k in ("url", "name", "source", "time_limit") if row.get(k) is not None}}
    if example is not None:
        out["example_tests"] = example.to_json()
    if row.get("split") is not None:
        out["split"] = row["split"]
    return out


def _tags(row: dict) -> list[str]:
    """TACO stores tags as the text of a Python list ("['Sorting', 'Math']")."""
    tags = []
    for key in ("tags", "skill_types"):
        value = row.get(key)
        if isinstance(value, str) and value.startswith("["):
            try:
                value = ast.literal_eval(value)
            except (ValueError, SyntaxError):
                value = None
        if isinstance(value, list):
            tags += [t for t in value if isinstance(t, str)]
    return tags
