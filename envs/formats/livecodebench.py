"""LiveCodeBench code-generation rows (livecodebench/code_generation_lite).

Fields relied on: question_id, question_title, question_content, platform, contest_date, starter_code,
difficulty, public_test_cases and private_test_cases (a JSON list of {"input", "output", "testtype"} with
testtype "stdin" or "functional"; the private list is often stored compressed: base64 of zlib of a pickled
JSON string), metadata (a JSON string; "func_name" names the method of a functional problem, "fn_name" is
taken too). A functional test's input is one JSON value per line (the arguments) and its output one JSON value,
as LiveCodeBench's runner reads them. Hidden tests are the public then the private ones; example tests the
public ones. LiveCodeBench ships no reference solutions.

The compressed form needs pickle; it is read by an unpickler that refuses every global, so a crafted row can
only yield plain data (LiveCodeBench's rows hold a pickled str).
"""

from __future__ import annotations

import base64
import binascii
import io
import json
import pickle
import zlib

from envs.formats.common import field, json_field
from envs.problem import SpecError, TestSpec


def adapt(row: dict, where: str, index: int) -> dict:
    content = field(row, "question_content", str, where)
    ident = row.get("question_id") or index
    meta = json_field(row, "metadata", where, required=False) or {}
    if not isinstance(meta, dict):
        raise SpecError(f"{where}: field 'metadata' must be a JSON object")
    public = _cases(row, "public_test_cases", where)
    private = _cases(row, "private_test_cases", where)
    fn_name = meta.get("func_name") or meta.get("fn_name")
    hidden = _spec(public + private, fn_name, where, "public_test_cases/private_test_cases")
    out = {"id": ident, "prompt": content, "tests": hidden.to_json(),
           "starter_code": field(row, "starter_code", str, where, required=False) or "",
           "difficulty": row.get("difficulty"),
           "metadata": {k: row[k] for k in ("question_title", "platform", "contest_id", "contest_date")
                        if row.get(k) is not None}}
    if public:
        out["example_tests"] = _spec(public, fn_name, where, "public_test_cases").to_json()
    if row.get("split") is not None:
        out["split"] = row["split"]
    return out


def _cases(row: dict, key: str, where: str) -> list[dict]:
    value = row.get(key)
    if value is None or value == "":
        return []
    if isinstance(value, str):
        value = _decode(value, f"{where}: field {key!r}")
    if not isinstance(value, list):
        raise SpecError(f"{where}: field {key!r} must be a list of test cases")
    for i, case in enumerate(value):
        if not isinstance(case, dict):
            raise SpecError(f"{where}: field {key!r}[{i}] must be an object")
        for k in ("input", "output", "testtype"):
            if not isinstance(case.get(k), str):
                raise SpecError(f"{where}: field {key!r}[{i}]: missing or non-string {k!r}")
        if case["testtype"] not in ("stdin", "functional"):
            raise SpecError(f"{where}: field {key!r}[{i}]: testtype must be 'stdin' or 'functional', "
                            f"got {case['testtype']!r}")
    return value


def _decode(text: str, where: str) -> object:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        pass
    try:
        raw = zlib.decompress(base64.b64decode(text.encode("ascii"), validate=True))
        inner = _PlainUnpickler(io.BytesIO(raw)).load()
    except (binascii.Error, zlib.error, ValueError, pickle.UnpicklingError, EOFError) as e:
        raise SpecError(f"{where}: neither JSON nor LiveCodeBench's compressed form ({e})") from None
    if not isinstance(inner, str):
        raise SpecError(f"{where}: the compressed test cases must hold a JSON string")
    try:
        return json.loads(inner)
    except json.JSONDecodeError as e:
        raise SpecError(f"{where}: the decompressed test cases are not JSON ({e.msg})") from None


class _PlainUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):  # no global may be loaded: plain data only
        raise pickle.UnpicklingError(f"refused global {module}.{name}")


def _spec(cases: list[dict], fn_name: str | None, where: str, what: str) -> TestSpec:
    if not cases:
        raise SpecError(f"{where}: fields {what} hold no tests")
    kinds = {c["testtype"] for c in cases}
    if len(kinds) > 1:
        raise SpecError(f"{where}: fields {what} mix stdin and functional tests")
    if kinds == {"stdin"}:
        return TestSpec("stdio", cases=tuple({"input": c["input"], "output": c["output"]} for c in cases))
    if not isinstance(fn_name, str) or not fn_name:
        raise SpecError(f"{where}: field 'metadata' must name the function of functional tests ('func_name')")
    out = []
    for i, c in enumerate(cases):
        try:
            args = [json.loads(line) for line in c["input"].split("\n") if line.strip()]
            expected = json.loads(c["output"])
        except json.JSONDecodeError as e:
            raise SpecError(f"{where}: fields {what}: functional test {i} is not JSON per line ({e.msg})") from None
        out.append({"args": args, "expected": expected})
    return TestSpec("call", fn_name=fn_name, cases=tuple(out))
