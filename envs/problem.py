"""A programming problem and its unit tests: the one problem type every suite produces.

`TestSpec` is what the executor runs a program against. Its JSON form is the TESTS.json accepted by
`python -m envs.execute`:

    {"style": "stdio",  "cases": [{"input": "...", "output": "..."}], "compare": {"rule": "float", "abs_tol": 1e-4}}
    {"style": "call",   "fn_name": "f", "cases": [{"args": [...], "expected": ...}]}
    {"style": "assert", "setup": "...", "asserts": ["assert f(1) == 2", ...]}
    {"style": "check",  "entry_point": "f", "check": "def check(candidate): ..."}

A stdio spec's optional `compare` is its comparison rule (`Comparison`; a bare rule name is short for
`{"rule": NAME}`); without it, the default rule ("whitespace") applies and the spec's JSON form and hash are
what they were before rules existed.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

STYLES = ("stdio", "call", "assert", "check")
# How a stdio test's output is compared with the expected one (implemented in `envs/compare.py`).
COMPARE_RULES = ("whitespace", "exact", "float", "unordered_lines", "case_insensitive", "checker")
DEFAULT_RULE = "whitespace"


class SpecError(ValueError):
    """A malformed test specification or problem row; the message names where it came from."""


def _require(d: dict, key: str, kind: type | tuple[type, ...], where: str) -> Any:
    if key not in d:
        raise SpecError(f"{where}: missing field {key!r}")
    value = d[key]
    if not isinstance(value, kind):
        names = kind.__name__ if isinstance(kind, type) else "/".join(k.__name__ for k in kind)
        raise SpecError(f"{where}: field {key!r} must be {names}, got {type(value).__name__}")
    return value


@dataclass(frozen=True)
class Comparison:
    """The comparison rule of a stdio test set (the special judge). Rules (see `envs/compare.py`):

    - "whitespace" (the default): line ends and trailing whitespace ignored, tokens split on whitespace,
      decimal expected tokens within 1e-6;
    - "exact": the output's text must equal the expected text character for character;
    - "float": as "whitespace", but every pair of tokens that both parse as finite numbers matches within
      `abs_tol` absolute or `rel_tol` relative error (integers included: `2` matches `2.0000`);
    - "unordered_lines": the lines, each normalised as "whitespace" does, as a multiset (any order);
    - "case_insensitive": as "whitespace", tokens compared case-insensitively (`YES` matches `yes`);
    - "checker": `checker` is Python source defining `check(input, output, expected) -> bool`, shipped with the
      data; it runs in a sandboxed process of its own, after the program's (`envs/checker.py`), and only a
      return value equal to True accepts.
    """

    rule: str = DEFAULT_RULE
    abs_tol: float = 1e-6
    rel_tol: float = 1e-6
    checker: str = ""

    def __post_init__(self) -> None:
        if self.rule not in COMPARE_RULES:
            raise SpecError(f"unknown comparison rule {self.rule!r}; expected one of {COMPARE_RULES}")
        if self.rule == "checker" and not self.checker.strip():
            raise SpecError("comparison rule 'checker' needs the checker's source in 'checker'")
        if self.rule != "checker" and self.checker:
            raise SpecError(f"comparison rule {self.rule!r} takes no 'checker' (use rule 'checker')")
        if not (self.abs_tol >= 0 and self.rel_tol >= 0):
            raise SpecError(f"comparison tolerances must be >= 0, got abs_tol={self.abs_tol}, rel_tol={self.rel_tol}")

    @property
    def is_default(self) -> bool:
        return self == Comparison()

    def to_json(self) -> dict:
        out: dict[str, Any] = {"rule": self.rule}
        if self.rule == "float":
            out.update(abs_tol=self.abs_tol, rel_tol=self.rel_tol)
        if self.rule == "checker":
            out["checker"] = self.checker
        return out

    @classmethod
    def from_json(cls, d: Any, where: str = "compare") -> "Comparison":
        if isinstance(d, str):
            d = {"rule": d}
        if not isinstance(d, dict):
            raise SpecError(f"{where}: expected a rule name or a JSON object, got {type(d).__name__}")
        unknown = set(d) - {"rule", "abs_tol", "rel_tol", "checker"}
        if unknown:
            raise SpecError(f"{where}: unknown field(s) {sorted(unknown)}; expected rule, abs_tol, rel_tol, checker")
        rule = _require(d, "rule", str, where)
        kwargs: dict[str, Any] = {"rule": rule}
        for key in ("abs_tol", "rel_tol"):
            if key in d:
                value = d[key]
                if isinstance(value, bool) or not isinstance(value, (int, float)):
                    raise SpecError(f"{where}: field {key!r} must be a number, got {type(value).__name__}")
                kwargs[key] = float(value)
        if "checker" in d:
            kwargs["checker"] = _require(d, "checker", str, where)
        try:
            return cls(**kwargs)
        except SpecError as e:
            raise SpecError(f"{where}: {e}") from None


@dataclass(frozen=True, eq=True)
class TestSpec:
    """The unit tests of one problem, in one of the four styles of `STYLES`."""

    __test__ = False  # not a pytest test class

    style: str
    cases: tuple[dict, ...] = ()  # stdio: {"input", "output"}; call: {"args", "expected"}
    fn_name: str | None = None  # call style: function (or `class Solution` method) name
    setup: str = ""  # assert style: test_setup_code, run after the program
    asserts: tuple[str, ...] = ()  # assert style: one `assert ...` line per test
    check: str = ""  # check style: source defining `check(candidate)`
    entry_point: str | None = None  # check style: the function handed to `check`
    compare: Comparison | None = None  # stdio style: the comparison rule (None: the default, "whitespace")

    def __post_init__(self) -> None:
        if self.style not in STYLES:
            raise SpecError(f"unknown test style {self.style!r}; expected one of {STYLES}")
        if self.compare is not None:
            if self.style != "stdio":
                raise SpecError(f"a comparison rule applies to stdio tests only, not to {self.style!r} tests")
            if self.compare.is_default:  # one spelling of the default, so hashes and cache keys never differ
                object.__setattr__(self, "compare", None)

    @property
    def rule(self) -> Comparison:
        """The comparison rule of a stdio spec (the default when none was given)."""
        return self.compare or Comparison()

    def __len__(self) -> int:
        """Number of individual tests (a HumanEval `check` counts as one)."""
        if self.style in ("stdio", "call"):
            return len(self.cases)
        if self.style == "assert":
            return len(self.asserts)
        return 1

    def to_json(self) -> dict:
        if self.style == "stdio":
            out = {"style": "stdio", "cases": [dict(c) for c in self.cases]}
            if self.compare is not None:
                out["compare"] = self.compare.to_json()
            return out
        if self.style == "call":
            return {"style": "call", "fn_name": self.fn_name, "cases": [dict(c) for c in self.cases]}
        if self.style == "assert":
            return {"style": "assert", "setup": self.setup, "asserts": list(self.asserts)}
        return {"style": "check", "entry_point": self.entry_point, "check": self.check}

    @classmethod
    def from_json(cls, d: dict, where: str = "tests") -> "TestSpec":
        if not isinstance(d, dict):
            raise SpecError(f"{where}: expected a JSON object, got {type(d).__name__}")
        style = _require(d, "style", str, where)
        if style != "stdio" and d.get("compare") is not None:
            raise SpecError(f"{where}: field 'compare' applies to stdio tests only, not to {style!r} tests")
        cases = d.get("cases") if style in ("stdio", "call") and isinstance(d.get("cases"), list) else []
        for i, c in enumerate(cases):
            if not isinstance(c, dict):
                raise SpecError(f"{where}.cases[{i}]: expected a JSON object, got {type(c).__name__}")
        if style == "stdio":
            cases = _require(d, "cases", list, where)
            for i, c in enumerate(cases):
                _require(c, "input", str, f"{where}.cases[{i}]")
                _require(c, "output", str, f"{where}.cases[{i}]")
            compare = Comparison.from_json(d["compare"], f"{where}.compare") if d.get("compare") is not None else None
            return cls("stdio", cases=tuple({"input": c["input"], "output": c["output"]} for c in cases),
                       compare=compare)
        if style == "call":
            fn = _require(d, "fn_name", str, where)
            cases = _require(d, "cases", list, where)
            for i, c in enumerate(cases):
                _require(c, "args", list, f"{where}.cases[{i}]")
                if "expected" not in c:
                    raise SpecError(f"{where}.cases[{i}]: missing field 'expected'")
            return cls("call", fn_name=fn, cases=tuple({"args": c["args"], "expected": c["expected"]} for c in cases))
        if style == "assert":
            asserts = _require(d, "asserts", list, where)
            for i, a in enumerate(asserts):
                if not isinstance(a, str):
                    raise SpecError(f"{where}.asserts[{i}]: must be str, got {type(a).__name__}")
            setup = d.get("setup", "") or ""
            if not isinstance(setup, str):
                raise SpecError(f"{where}: field 'setup' must be str")
            return cls("assert", setup=setup, asserts=tuple(asserts))
        if style == "check":
            return cls("check", entry_point=_require(d, "entry_point", str, where),
                       check=_require(d, "check", str, where))
        raise SpecError(f"{where}: unknown test style {style!r}; expected one of {STYLES}")

    def content_hash(self) -> str:
        """sha256 of the canonical JSON form: half of the executor's cache key."""
        blob = json.dumps(self.to_json(), sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        return hashlib.sha256(blob.encode("utf-8")).hexdigest()


def program_hash(program: str) -> str:
    """sha256 of a program's text: the other half of the executor's cache key."""
    return hashlib.sha256(program.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class Problem:
    """One programming problem of a suite, with everything the system needs to train or evaluate on it."""

    suite: str
    problem_id: str
    split: str
    statement: str  # the natural-language description, as given by the data set
    prompt: str  # the text the model is conditioned on (suite-specific format, see each suite's module)
    hidden_tests: TestSpec  # the tests that decide the reward (eq. 2)
    example_tests: TestSpec | None = None  # tests shown in the statement (filtered setting); None if none
    starter_code: str = ""
    references: tuple[str, ...] = ()  # human (ground-truth) solutions
    difficulty: str | None = None
    metadata: dict = field(default_factory=dict, compare=False)

    @property
    def key(self) -> str:
        return f"{self.suite}/{self.problem_id}"
