"""Split a TestSpec into what the untrusted child may see (the payload) and what only the parent keeps
(expected values and the judging expressions). This is what makes forged passes impossible wherever the
test's shape allows: expected values never enter the program's process.

- stdio: the child gets the inputs; expected outputs stay here (compared by `compare.stdio_output_matches`).
- call: the child gets `fn_name` and the argument lists; expected returns stay here
  (`compare.call_output_matches`).
- assert (MBPP) and check (HumanEval): each `assert E` is split into *holes*, the smallest subexpressions
  that mention the program (its functions, `candidate`, setup names) and contain no constant other than
  the arguments of the program's own calls, e.g. `f(1, 2)` or `sorted(candidate([3, 1]))`. The child
  evaluates only the holes and ships their plain values; the parent evaluates the rest of `E` (the
  comparison, `abs(... - 0.5) < 1e-6`, `math.isclose(..., 1.5)`, literals) with `compare.evaluate`.
  A builtin name the program redefines (MBPP 126 defines `sum`) counts as the program's.
  Shapes this cannot express (loops, local variables, helper functions of the test, `and`/`or` around the
  program's calls) are run whole in the child, and their TestResult is
  marked `judged_in_parent=False`.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass, field

from .compare import TRUSTED_MODULES, TRUSTED_NAMES, evaluable
from .problem import TestSpec


@dataclass(frozen=True)
class Item:
    """One judged statement: `expr` has the holes replaced by names `__hole_0`, ...; None when child-judged."""

    expr: ast.expr | None
    n_holes: int = 0

    @property
    def child_judged(self) -> bool:
        return self.expr is None


@dataclass(frozen=True)
class Plan:
    style: str
    payload: dict  # sent to the child; never holds a parent-judged expected value
    n_tests: int
    expected: tuple = ()  # stdio: expected outputs; call: expected returns
    items: tuple[Item, ...] = ()  # assert: one per test; check: all belong to the single test
    child_judged_check: bool = False  # check style run whole in the child
    info: dict = field(default_factory=dict)


def make_plan(program: str, tests: TestSpec) -> Plan:
    if tests.style == "stdio":
        return Plan("stdio", {"style": "stdio", "program": program,
                              "inputs": [c["input"] for c in tests.cases]},
                    len(tests.cases), expected=tuple(c["output"] for c in tests.cases))
    if tests.style == "call":
        return Plan("call", {"style": "call", "program": program, "fn_name": tests.fn_name,
                             "args": [c["args"] for c in tests.cases]},
                    len(tests.cases), expected=tuple(c["expected"] for c in tests.cases))
    shadowed = shadowed_names(program)
    if tests.style == "assert":
        items, wire_items = [], []
        for src in tests.asserts:
            item, holes = _plan_assert_source(src, shadowed)
            items.append(item)
            wire_items.append({"stmt": src} if item.child_judged else {"holes": holes})
        return Plan("assert", {"style": "assert", "program": program, "setup": tests.setup,
                               "items": wire_items}, len(tests.asserts), items=tuple(items))
    return _plan_check(program, tests, shadowed)


# ---------------------------------------------------------------------------------------------- check

def _plan_check(program: str, tests: TestSpec, shadowed: frozenset[str]) -> Plan:
    whole = Plan("check", {"style": "check", "program": program, "entry_point": tests.entry_point,
                           "check_source": tests.check}, 1, child_judged_check=True)
    try:
        module = ast.parse(tests.check)
    except SyntaxError:
        return whole
    checks = [s for s in module.body if isinstance(s, ast.FunctionDef) and s.name == "check"]
    if len(checks) != 1 or len(checks[0].args.args) != 1 or checks[0].decorator_list:
        return whole
    fn = checks[0]
    imports, module_names = [], set()
    for s in module.body:
        if s is fn or _is_docstring(s):
            continue
        if isinstance(s, (ast.Import, ast.ImportFrom)):
            imports.append(ast.unparse(s))
        elif isinstance(s, (ast.Assign, ast.AnnAssign, ast.FunctionDef, ast.ClassDef)):
            module_names |= {n.id for n in ast.walk(s) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Store)}
            if isinstance(s, (ast.FunctionDef, ast.ClassDef)):
                module_names.add(s.name)
        else:
            return whole
    param = fn.args.args[0].arg
    items, wire_items = [], []
    for s in fn.body:
        if _is_docstring(s):
            continue
        if not isinstance(s, ast.Assert):
            return whole
        used = {n.id for n in ast.walk(s.test) if isinstance(n, ast.Name)}
        if used & module_names:
            return whole
        test = _rename(s.test, param, "candidate")
        item, holes = _plan_expr(test, shadowed)
        if item.child_judged:
            return whole
        items.append(item)
        wire_items.append({"holes": holes})
    payload = {"style": "check", "program": program, "entry_point": tests.entry_point,
               "imports": imports, "items": wire_items}
    return Plan("check", payload, 1, items=tuple(items))


def _is_docstring(s: ast.stmt) -> bool:
    return isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) and isinstance(s.value.value, str)


def _rename(node: ast.expr, old: str, new: str) -> ast.expr:
    class R(ast.NodeTransformer):
        def visit_Name(self, n: ast.Name) -> ast.Name:
            return ast.copy_location(ast.Name(new, n.ctx), n) if n.id == old else n
    return R().visit(_copy(node))


def _copy(node: ast.AST) -> ast.AST:
    return ast.parse(ast.unparse(node), mode="eval").body


# ---------------------------------------------------------------------------------------------- asserts

def _plan_assert_source(src: str, shadowed: frozenset[str]) -> tuple[Item, list[str]]:
    try:
        module = ast.parse(src.strip())
    except SyntaxError:
        return Item(None), []
    if len(module.body) != 1 or not isinstance(module.body[0], ast.Assert):
        return Item(None), []
    return _plan_expr(module.body[0].test, shadowed)


def _plan_expr(test: ast.expr, shadowed: frozenset[str]) -> tuple[Item, list[str]]:
    """Split `test` into holes (source texts, evaluated in the child) and a parent-side expression."""
    trusted = TRUSTED_NAMES - shadowed  # a builtin the program redefines is the program's (as in Python)
    holes: list[str] = []

    def untrusted(n: ast.AST) -> bool:
        return any(isinstance(m, ast.Name) and m.id not in trusted for m in ast.walk(n))

    def split(n: ast.expr) -> ast.expr | None:
        if not untrusted(n):
            return n if evaluable(n) else None
        if _is_hole(n, trusted):
            holes.append(ast.unparse(n))
            return ast.Name(f"__hole_{len(holes) - 1}", ast.Load())
        if isinstance(n, ast.Compare):
            if any(untrusted(c) for c in n.comparators[1:]):
                return None  # a chained comparison may never evaluate later operands
            parts = [split(n.left)] + [split(c) for c in n.comparators]
            return None if None in parts else ast.Compare(parts[0], n.ops, parts[1:])
        if isinstance(n, ast.UnaryOp):
            o = split(n.operand)
            return None if o is None else ast.UnaryOp(n.op, o)
        if isinstance(n, ast.BinOp):
            if isinstance(n.op, ast.Pow):
                return None
            left, right = split(n.left), split(n.right)
            return None if left is None or right is None else ast.BinOp(left, n.op, right)
        if isinstance(n, ast.Subscript):
            v, s = split(n.value), split(n.slice)
            return None if v is None or s is None else ast.Subscript(v, s, ast.Load())
        if isinstance(n, (ast.Tuple, ast.List, ast.Set)):
            elts = [split(e) for e in n.elts]
            if None in elts:
                return None
            return ast.Set(elts) if isinstance(n, ast.Set) else type(n)(elts=elts, ctx=ast.Load())
        if isinstance(n, ast.Call) and _trusted_callee(n.func, trusted):
            if any(isinstance(a, ast.Starred) for a in n.args) or any(k.arg is None for k in n.keywords):
                return None
            args = [split(a) for a in n.args]
            kws = [(k.arg, split(k.value)) for k in n.keywords]
            if None in args or any(v is None for _, v in kws):
                return None
            return ast.Call(n.func, args, [ast.keyword(k, v) for k, v in kws])
        return None

    expr = split(test)
    if expr is None:
        return Item(None), []
    expr = ast.fix_missing_locations(ast.Expression(expr)).body
    if not evaluable(expr, holes=len(holes)):
        return Item(None), []
    return Item(expr, len(holes)), holes


def _trusted_callee(func: ast.expr, trusted: frozenset[str]) -> bool:
    if isinstance(func, ast.Name):
        return func.id in trusted
    return isinstance(func, ast.Attribute) and isinstance(func.value, ast.Name) and func.value.id in trusted


def _is_hole(n: ast.expr, trusted: frozenset[str]) -> bool:
    """A hole mentions the program and holds no constant outside the arguments of the program's calls."""
    if not isinstance(n, (ast.Call, ast.Name, ast.Attribute, ast.Subscript)):
        return False

    def clean(m: ast.AST) -> bool:
        if isinstance(m, ast.Call) and not _trusted_callee(m.func, trusted):
            return clean(m.func)  # its arguments are the program's inputs
        if isinstance(m, ast.Constant):
            return False
        if isinstance(m, (ast.Lambda, ast.NamedExpr, ast.Await, ast.Yield, ast.YieldFrom)):
            return False
        return all(clean(c) for c in ast.iter_child_nodes(m))

    if isinstance(n, ast.Call) and _trusted_callee(n.func, trusted):
        return bool(n.args) and all(clean(a) for a in n.args) and not n.keywords
    return clean(n)


_BIND = r"(?:\bdef\s+{0}\b|\bclass\s+{0}\b|^[ \t]*{0}\s*(?:=[^=]|:|,)|\bimport\b[^\n]*\b{0}\b|" \
        r"\bas\s+{0}\b|\bglobal\b[^\n]*\b{0}\b|\bfor\s+{0}\s+in\b|\blambda\b[^:\n]*\b{0}\b|\b{0}\s*:=)"


def shadowed_names(program: str) -> frozenset[str]:
    """Trusted names (builtins the parent evaluates itself) that the program may rebind: a conservative
    textual check; in a test, such a name is the program's and is evaluated in the child."""
    present = {name for name in TRUSTED_NAMES if name in program}
    out = set()
    for n in present:
        for m in re.finditer(_BIND.format(re.escape(n)), program, re.M):
            if n in TRUSTED_MODULES and re.fullmatch(rf"import\s+(\w+\s*,\s*)*{n}", m.group(0).strip()):
                continue  # `import math` binds the very module the parent uses
            out.add(n)
            break
    return frozenset(out)
