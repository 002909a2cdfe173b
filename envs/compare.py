"""How a program's observed behaviour is compared with a test's expectation: the executor's judging rules.
Everything here runs in the parent, on plain values only (see `envs/harness_wire.py`).

stdio (`stdio_output_matches`), as strict as correctness allows:
1. Output must be valid UTF-8 (else the test fails).
2. Line ends `\\r\\n` and `\\r` count as `\\n`; trailing whitespace on each line and trailing empty lines are
   ignored (so a missing or extra final newline does not matter).
3. The remaining lines must correspond one to one: a correct prefix, or correct output plus extra non-empty
   lines, fails. Within a line, tokens are compared after splitting on whitespace (the amount of
   spacing between tokens does not matter).
4. A token matches if it is identical, or if the expected token is a decimal literal with a fraction or an
   exponent (e.g. `0.333333`, `1e-3`) and the output token parses as a float within 1e-6 absolute or
   relative error. Integers and words must match exactly (`3` vs `3.0` fails).

Other stdio rules (`stdio_matches(actual, expected, rule)`, the rule a `Comparison` of the test spec names;
rule 1 applies to all of them): "exact" (the text as is), "float" (numbers within the spec's tolerances),
"unordered_lines" (lines as a multiset), "case_insensitive" (tokens compared case-folded). A "checker" rule is
no comparison here: the test's verdict waits for the checker's (`envs/checker.py`).

call (`call_output_matches`), following the APPS harness:
1. Expected values come from JSON, which has no tuples, so tuples in the returned value count as lists.
2. The value must equal the expected one (Python `==` on plain data; `True == 1` as in Python).
3. APPS stores some expected returns wrapped in a one-element list (problem 4184 gives `[False]`, while
   2404 gives `9`), so a value equal to the only element of a one-element expected list also matches.
   Longer expected lists are never unwrapped.

assert / check (`evaluate`): the test's own expression, evaluated here with the child's values in its holes
(see `envs/harness_plan.py`), with Python's semantics, restricted to literals, arithmetic (no `**` on
program values), comparisons, `not`, subscripts and the pure builtins of `TRUSTED_NAMES`. The test passes
iff the expression is truthy; an exception here is the program's runtime error, as it would be in Python.
`set`, `frozenset` and `dict` refuse members whose shared hash values would make building them quadratic
(`harness_wire.check_hashes`): the program's values must not hold the parent up.
"""

from __future__ import annotations

import ast
import math
import operator
import re
from typing import Callable

from .harness_wire import check_hashes
from .problem import Comparison

FLOAT_TOLERANCE = 1e-6

# ---------------------------------------------------------------------------------------------- stdio


def stdio_matches(actual: bytes | str, expected: str, rule: Comparison | None = None) -> bool:
    """Does the output match under `rule` (None: the default)? Never called for the "checker" rule."""
    rule = rule or Comparison()
    if rule.rule == "whitespace":
        return stdio_output_matches(actual, expected)
    text = _decode(actual)
    if text is None:
        return False
    if rule.rule == "exact":
        return text == expected
    if rule.rule == "float":
        return _token_lines_match(text, expected, lambda x, y: x == y or _numbers_close(x, y, rule))
    if rule.rule == "case_insensitive":
        return _token_lines_match(text, expected, lambda x, y: x.casefold() == y.casefold() or _float_close(x, y))
    if rule.rule == "unordered_lines":
        return sorted(_normal_lines(text)) == sorted(_normal_lines(expected))
    raise ValueError(f"rule {rule.rule!r} is not judged by comparison (a checker runs in its own process)")


def _decode(actual: bytes | str) -> str | None:
    if isinstance(actual, str):
        return actual
    try:
        return actual.decode("utf-8")
    except UnicodeDecodeError:
        return None


def _normal_lines(text: str) -> list[str]:
    """The lines as the default rule sees them: tokens joined by one space, trailing empty lines dropped."""
    return [" ".join(line.split()) for line in _lines(text)]


def _token_lines_match(actual: str, expected: str, same: Callable[[str, str], bool]) -> bool:
    a, e = _lines(actual), _lines(expected)
    if len(a) != len(e):
        return False
    for la, le in zip(a, e):
        ta, te = la.split(), le.split()
        if len(ta) != len(te) or not all(same(x, y) for x, y in zip(ta, te)):
            return False
    return True


_NUMBER = re.compile(r"[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?")  # what float() reads, less "1_0", "nan", "inf"


def _numbers_close(actual: str, expected: str, rule: Comparison) -> bool:
    """Both tokens finite numbers (ints included) within the rule's absolute or relative tolerance."""
    if not (_NUMBER.fullmatch(actual) and _NUMBER.fullmatch(expected)):
        return False
    pair = _finite_pair(actual, expected)  # "nan" or "inf" must be written as expected (the identical-token case)
    return pair is not None and (abs(pair[0] - pair[1]) <= rule.abs_tol
                                 or abs(pair[0] - pair[1]) <= rule.rel_tol * abs(pair[1]))


def stdio_output_matches(actual: bytes | str, expected: str) -> bool:
    """The default rule ("whitespace"), as described above."""
    actual = _decode(actual)
    if actual is None:
        return False
    a, e = _lines(actual), _lines(expected)
    if a == e:
        return True
    if len(a) != len(e):
        return False
    for la, le in zip(a, e):
        ta, te = la.split(), le.split()
        if len(ta) != len(te):
            return False
        if not all(x == y or _float_close(x, y) for x, y in zip(ta, te)):
            return False
    return True


def _lines(text: str) -> list[str]:
    lines = [line.rstrip() for line in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")]
    while lines and not lines[-1]:
        lines.pop()
    return lines


def _float_close(actual: str, expected: str) -> bool:
    if not any(c in expected for c in ".eE"):
        return False
    pair = _finite_pair(actual, expected)
    return pair is not None and abs(pair[0] - pair[1]) <= FLOAT_TOLERANCE * max(1.0, abs(pair[1]))


def _finite_pair(actual: str, expected: str) -> tuple[float, float] | None:
    """Both tokens as finite floats, or None."""
    try:
        a, e = float(actual), float(expected)
    except ValueError:
        return None
    return (a, e) if math.isfinite(a) and math.isfinite(e) else None


# ---------------------------------------------------------------------------------------------- call


def call_output_matches(actual: object, expected: object) -> bool:
    actual = _tuples_to_lists(actual)
    try:
        if actual == expected:
            return True
        return isinstance(expected, list) and len(expected) == 1 and actual == expected[0]
    except (TypeError, ValueError, RecursionError):
        return False


def _tuples_to_lists(x: object) -> object:
    if isinstance(x, (tuple, list)):
        return [_tuples_to_lists(v) for v in x]
    if isinstance(x, dict):
        return {k: _tuples_to_lists(v) for k, v in x.items()}
    return x


# ---------------------------------------------------------------------------------------------- assert / check

def _hash_checked(kind: type) -> Callable:
    """`kind` (set, frozenset), refusing members whose shared hash values would make building it quadratic."""
    def build(*args):
        items = list(args[0]) if args else []
        check_hashes(items)
        return kind(items)
    build.__name__ = kind.__name__
    return build


def _checked_dict(*args, **kwargs) -> dict:
    """dict(...), refusing keys whose shared hash values would make building it quadratic (a dict argument
    was checked when it was decoded)."""
    if not args or isinstance(args[0], dict):
        return dict(*args, **kwargs)
    items = list(args[0])
    check_hashes([p[0] for p in items if type(p) in (tuple, list) and len(p) == 2])
    return dict(items, **kwargs)


_FUNCTIONS = {f.__name__: f for f in (abs, round, len, sorted, tuple, list, sum, min, max,
                                      all, any, int, float, str, bool, repr, isinstance, type, reversed,
                                      enumerate, zip, chr, ord, divmod, complex, bytes)}
# Building a set or dict from the program's values in the parent is bounded like decoding one.
_FUNCTIONS.update(set=_hash_checked(set), frozenset=_hash_checked(frozenset), dict=_checked_dict)
_MATH = {name: getattr(math, name) for name in ("isclose", "fabs", "floor", "ceil", "sqrt", "isnan", "isinf",
                                                "isfinite", "pi", "e", "inf", "nan", "trunc", "log", "exp")}
TRUSTED_MODULES = frozenset({"math"})
TRUSTED_NAMES = frozenset(_FUNCTIONS) | TRUSTED_MODULES
_NONE_TYPE = type(None)

_BINOPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
           ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod, ast.Pow: operator.pow,
           ast.BitAnd: operator.and_, ast.BitOr: operator.or_, ast.BitXor: operator.xor,
           ast.LShift: operator.lshift, ast.RShift: operator.rshift}
_UNARY = {ast.Not: operator.not_, ast.USub: operator.neg, ast.UAdd: operator.pos, ast.Invert: operator.invert}
_CMPS = {ast.Eq: operator.eq, ast.NotEq: operator.ne, ast.Lt: operator.lt, ast.LtE: operator.le,
         ast.Gt: operator.gt, ast.GtE: operator.ge, ast.Is: operator.is_, ast.IsNot: operator.is_not,
         ast.In: lambda a, b: a in b, ast.NotIn: lambda a, b: a not in b}


def evaluable(node: ast.AST, holes: int = 0) -> bool:
    """Can `evaluate` handle this expression (with `holes` hole names)?"""
    hole_names = {f"__hole_{i}" for i in range(holes)}
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            if n.id not in TRUSTED_NAMES and n.id not in hole_names:
                return False
        elif isinstance(n, ast.Attribute):
            if not (isinstance(n.value, ast.Name) and n.value.id in TRUSTED_MODULES and n.attr in _MATH):
                return False
        elif isinstance(n, ast.BinOp):
            if type(n.op) not in _BINOPS:
                return False
            if isinstance(n.op, (ast.Pow, ast.LShift)) and not (_constant(n.left) and _constant(n.right)):
                return False
        elif isinstance(n, ast.Call):
            if any(isinstance(a, ast.Starred) for a in n.args) or any(k.arg is None for k in n.keywords):
                return False
        elif not isinstance(n, (ast.Constant, ast.Tuple, ast.List, ast.Set, ast.Dict, ast.UnaryOp, ast.Compare,
                                ast.Subscript, ast.Slice, ast.Load, ast.keyword, ast.expr_context, ast.operator,
                                ast.unaryop, ast.cmpop)):
            return False
        if isinstance(n, ast.UnaryOp) and type(n.op) not in _UNARY:
            return False
    return True


def _constant(n: ast.AST) -> bool:
    return all(isinstance(m, (ast.Constant, ast.UnaryOp, ast.unaryop)) for m in ast.walk(n))


def evaluate(node: ast.expr, holes: list) -> object:
    """Evaluate a planned test expression; `holes[i]` is the child's value for `__hole_i`."""
    ev = lambda n: evaluate(n, holes)  # noqa: E731
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name):
        if node.id.startswith("__hole_"):
            return holes[int(node.id[7:])]
        if node.id in _FUNCTIONS:
            return _FUNCTIONS[node.id]
        if node.id == "math":
            return _MATH
        raise NameError(node.id)
    if isinstance(node, ast.Attribute):
        return _MATH[node.attr]
    if isinstance(node, ast.Tuple):
        return tuple(ev(e) for e in node.elts)
    if isinstance(node, ast.List):
        return [ev(e) for e in node.elts]
    if isinstance(node, ast.Set):
        return {ev(e) for e in node.elts}
    if isinstance(node, ast.Dict):
        return {ev(k): ev(v) for k, v in zip(node.keys, node.values)}
    if isinstance(node, ast.UnaryOp):
        return _UNARY[type(node.op)](ev(node.operand))
    if isinstance(node, ast.BinOp):
        return _BINOPS[type(node.op)](ev(node.left), ev(node.right))
    if isinstance(node, ast.Compare):
        left = ev(node.left)
        for op, comp in zip(node.ops, node.comparators):
            right = ev(comp)
            if not _CMPS[type(op)](left, right):
                return False
            left = right
        return True
    if isinstance(node, ast.Subscript):
        return ev(node.value)[ev(node.slice)]
    if isinstance(node, ast.Slice):
        return slice(*(None if p is None else ev(p) for p in (node.lower, node.upper, node.step)))
    if isinstance(node, ast.Call):
        fn = ev(node.func)
        return fn(*[ev(a) for a in node.args], **{k.arg: ev(k.value) for k in node.keywords})
    raise TypeError(f"cannot evaluate {type(node).__name__}")
