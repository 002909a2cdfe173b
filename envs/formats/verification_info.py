"""PrimeIntellect verifiable-coding rows (PrimeIntellect/verifiable-coding-problems, SYNTHETIC-1's code tasks).

Fields relied on: problem_id (else in_source_id), prompt, gold_standard_solution (a Markdown answer: the code
of its last fenced block is the reference), verification_info (a JSON string: {"language": "python",
"test_cases": [{"type": "stdin_stdout", "input": str, "output": str} or {"type": "function_call", "fn_name": str,
"input": [args], "output": value}]}), metadata (a JSON string; "difficulty" and "tags" are read when present).
A function_call output stored as a one-element list matches the plain value too (the APPS convention of
`envs/compare.py`). Rows whose language is not Python are skipped.
"""

from __future__ import annotations

from envs.formats.common import Skip, field, json_field, strip_fences
from envs.problem import SpecError, TestSpec


def adapt(row: dict, where: str, index: int) -> dict:
    prompt = field(row, "prompt", str, where)
    ident = row.get("problem_id") or row.get("in_source_id") or index
    info = json_field(row, "verification_info", where)
    if not isinstance(info, dict):
        raise SpecError(f"{where}: field 'verification_info' must be a JSON object")
    language = info.get("language", "python")
    if not isinstance(language, str) or not language.lower().startswith("python"):
        raise Skip(f"language {language!r}")
    cases = info.get("test_cases")
    if not isinstance(cases, list) or not cases:
        raise SpecError(f"{where}: field 'verification_info': 'test_cases' must be a non-empty list")
    tests = _spec(cases, f"{where}: field 'verification_info'")
    meta = json_field(row, "metadata", where, required=False) or {}
    if not isinstance(meta, dict):
        raise SpecError(f"{where}: field 'metadata' must be a JSON object")
    gold = field(row, "gold_standard_solution", str, where, required=False)
    out = {"id": ident, "prompt": prompt, "tests": tests.to_json(),
           "solutions": [strip_fences(gold)] if gold else [],
           "difficulty": meta.get("difficulty") if isinstance(meta.get("difficulty"), (str, int)) else None,
           "tags": [t for t in meta.get("tags") or [] if isinstance(t, str)],
           "metadata": {k: row[k] for k in ("source", "task_type", "in_source_id") if row.get(k) is not None}}
    if row.get("split") is not None:
        out["split"] = row["split"]
    return out


def _spec(cases: list, where: str) -> TestSpec:
    kinds = set()
    for i, c in enumerate(cases):
        if not isinstance(c, dict) or c.get("type") not in ("stdin_stdout", "function_call"):
            raise SpecError(f"{where}: test_cases[{i}]: 'type' must be 'stdin_stdout' or 'function_call'")
        kinds.add(c["type"])
    if len(kinds) > 1:
        raise SpecError(f"{where}: test_cases mix stdin_stdout and function_call tests")
    if kinds == {"stdin_stdout"}:
        for i, c in enumerate(cases):
            if not isinstance(c.get("input"), str) or not isinstance(c.get("output"), str):
                raise SpecError(f"{where}: test_cases[{i}]: 'input' and 'output' must be strings")
        return TestSpec("stdio", cases=tuple({"input": c["input"], "output": c["output"]} for c in cases))
    names = {c.get("fn_name") for c in cases}
    if len(names) != 1 or not isinstance(next(iter(names)), str):
        raise SpecError(f"{where}: function_call test_cases must all name the same 'fn_name'")
    for i, c in enumerate(cases):
        if not isinstance(c.get("input"), list):
            raise SpecError(f"{where}: test_cases[{i}]: 'input' of a function_call must be a list of arguments")
        if "output" not in c:
            raise SpecError(f"{where}: test_cases[{i}]: missing 'output'")
    return TestSpec("call", fn_name=names.pop(), cases=tuple({"args": c["input"], "expected": c["output"]}
                                                            for c in cases))
