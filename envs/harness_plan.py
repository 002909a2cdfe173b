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
  program's calls) run in a process of their own, the *test process* (`harness.run_test_process`): the whole
  check, or every assert of the set, runs there, and the names of the program it uses (`candidate`, helper
  functions such as HumanEval's `poly`) are proxies that send their arguments to the program's process and
  receive plain values back (`harness_wire.canonical`). The plan then has a `test_payload`, which the worker
  hands to the test process only: no text of the test ever reaches the program's process.
"""

from __future__ import annotations

import ast
import functools
import re
from dataclasses import dataclass, field

from .compare import TRUSTED_MODULES, TRUSTED_NAMES, evaluable
from .problem import Comparison, TestSpec


@dataclass(frozen=True)
class Item:
    """One judged statement: `expr` has the holes replaced by names `__hole_0`, ...; None when it cannot be
    split (the plan then runs the tests in the test process)."""

    expr: ast.expr | None
    n_holes: int = 0

    @property
    def splittable(self) -> bool:
        return self.expr is not None


@dataclass(frozen=True)
class Plan:
    style: str
    payload: dict  # sent to the child; never holds a parent-judged expected value
    n_tests: int
    expected: tuple = ()  # stdio: expected outputs; call: expected returns
    items: tuple[Item, ...] = ()  # assert: one per test; check: all belong to the single test
    test_payload: dict | None = None  # for the test process only (never the program's): tests run there
    compare: Comparison | None = None  # stdio: the comparison rule (None: the default); never sent to the child
    info: dict = field(default_factory=dict)

    @property
    def in_test_process(self) -> bool:
        return self.test_payload is not None


def make_plan(program: str, tests: TestSpec) -> Plan:
    if tests.style == "stdio":
        return Plan("stdio", {"style": "stdio", "program": program,
                              "inputs": [c["input"] for c in tests.cases]},
                    len(tests.cases), expected=tuple(c["output"] for c in tests.cases), compare=tests.compare)
    if tests.style == "call":
        return Plan("call", {"style": "call", "program": program, "fn_name": tests.fn_name,
                             "args": [c["args"] for c in tests.cases]},
                    len(tests.cases), expected=tuple(c["expected"] for c in tests.cases))
    shadowed = shadowed_names(program)
    if tests.style == "assert":
        items, wire_items = _plan_asserts(tests.asserts, shadowed)
        if all(i.splittable for i in items):
            return Plan("assert", {"style": "assert", "program": program, "setup": tests.setup,
                                   "items": wire_items}, len(tests.asserts), items=items)
        return Plan("assert", {"style": "assert", "program": program, "setup": tests.setup, "serve": True},
                    len(tests.asserts), test_payload={"kind": "asserts", "asserts": list(tests.asserts)})
    entry = tests.entry_point
    planned = _plan_check(tests.check, shadowed)
    if planned is None:
        return Plan("check", {"style": "check", "program": program, "entry_point": entry, "serve": True}, 1,
                    test_payload={"kind": "check", "check": tests.check, "entry_point": entry})
    imports, param, items, wire_items = planned
    return Plan("check", {"style": "check", "program": program, "entry_point": entry, "imports": imports,
                          "param": param, "items": wire_items}, 1, items=items)


@functools.lru_cache(maxsize=4096)
def _plan_asserts(asserts: tuple[str, ...], shadowed: frozenset[str]) -> tuple[tuple[Item, ...], list[dict]]:
    """Memoised per test set (the plan depends on the program only through `shadowed`); callers never
    mutate the result. Wire items of unsplittable statements are None (the plan then uses the test process)."""
    items, wire_items = [], []
    for src, stmt in zip(asserts, _parse_asserts(asserts)):
        if isinstance(stmt, ast.Assert):
            item, holes = _plan_expr(stmt.test, shadowed, _Source(src.strip()))
        else:
            item, holes = Item(None), []
        items.append(item)
        wire_items.append({"holes": holes} if item.splittable else None)
    return tuple(items), wire_items


def _parse_asserts(asserts: tuple[str, ...]) -> list[ast.stmt | None]:
    """Each line's single statement (None if it is not exactly one), parsed one by one."""
    out = []
    for src in asserts:
        try:
            body = ast.parse(src.strip()).body
        except (SyntaxError, ValueError):
            body = []
        out.append(body[0] if len(body) == 1 else None)
    return out


# ---------------------------------------------------------------------------------------------- check

@functools.lru_cache(maxsize=4096)
def _plan_check(check: str, shadowed: frozenset[str]) -> tuple[list[str], str, tuple[Item, ...], list[dict]] | None:
    """(imports, parameter name, items, wire items) of a check the parent can judge; None to run it in the
    test process. The child evaluates the holes with the check's parameter bound to the candidate."""
    try:
        module = ast.parse(check)
    except SyntaxError:
        return None
    checks = [s for s in module.body if isinstance(s, ast.FunctionDef) and s.name == "check"]
    if len(checks) != 1 or len(checks[0].args.args) != 1 or checks[0].decorator_list:
        return None
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
            return None
    param = fn.args.args[0].arg
    source = _Source(check)
    items, wire_items = [], []
    for s in fn.body:
        if _is_docstring(s):
            continue
        if not isinstance(s, ast.Assert):
            return None
        used = {n.id for n in ast.walk(s.test) if isinstance(n, ast.Name)}
        if used & module_names:
            return None
        item, holes = _plan_expr(s.test, shadowed, source)
        if not item.splittable:
            return None
        items.append(item)
        wire_items.append({"holes": holes})
    return imports, param, tuple(items), wire_items


def _is_docstring(s: ast.stmt) -> bool:
    return isinstance(s, ast.Expr) and isinstance(s.value, ast.Constant) and isinstance(s.value.value, str)


class _Source:
    """A source text split into lines once, for cutting out the text of many nodes (what
    `ast.get_source_segment` does, without splitting the whole text again for each node)."""

    def __init__(self, text: str):
        self.lines, start = [], 0
        for m in re.finditer(r"\r\n|\r|\n", text):
            self.lines.append(text[start:m.end()])
            start = m.end()
        self.lines.append(text[start:])

    def segment(self, node: ast.AST) -> str:
        first, last = node.lineno - 1, node.end_lineno - 1
        if first == last:
            return self.lines[first].encode()[node.col_offset:node.end_col_offset].decode()
        head = self.lines[first].encode()[node.col_offset:].decode()
        tail = self.lines[last].encode()[:node.end_col_offset].decode()
        return head + "".join(self.lines[first + 1:last]) + tail


def _plan_expr(test: ast.expr, shadowed: frozenset[str], source: _Source) -> tuple[Item, list[str]]:
    """Split `test` (parsed from `source`) into holes (source texts, evaluated in the child) and a
    parent-side expression."""
    trusted = TRUSTED_NAMES - shadowed  # a builtin the program redefines is the program's (as in Python)
    holes: list[str] = []

    marked: set[int] = set()  # ids of the nodes that mention a name outside `trusted`

    def mark(n: ast.AST) -> bool:
        hit = isinstance(n, ast.Name) and n.id not in trusted
        for c in ast.iter_child_nodes(n):
            hit = mark(c) or hit
        if hit:
            marked.add(id(n))
        return hit

    mark(test)

    def untrusted(n: ast.AST) -> bool:
        return id(n) in marked

    def split(n: ast.expr) -> ast.expr | None:
        if not untrusted(n):
            return n  # checked by `evaluable` below, once for the whole expression
        if _is_hole(n, trusted):
            holes.append("(" + source.segment(n) + ")")
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


# Where a name gets bound: def/class NAME, NAME = / NAME: / NAME, (at a line start), import lines,
# `as NAME`, global lines, `for NAME in`, lambda parameters, NAME :=.
_BINDING = re.compile(
    r"\b(?:def|class)\s+(\w+)|^[ \t]*(\w+)\s*(?:=(?!=)|:|,)|^[ \t]*((?:from\s+\S+\s+)?import\b[^\n]*)"
    r"|\bas\s+(\w+)|\bglobal\b([^\n]*)|\bfor\s+(\w+)\s+in\b|\blambda\b([^:\n]*):|\b(\w+)\s*:=", re.M)
_PLAIN_MODULE_IMPORT = re.compile(r"import\s+([\w\s,]+)")


def shadowed_names(program: str) -> frozenset[str]:
    """Trusted names (builtins the parent evaluates itself) that the program may rebind: a conservative
    textual check; in a test, such a name is the program's and is evaluated in the child."""
    if not any(name in program for name in TRUSTED_NAMES):
        return frozenset()
    out: set[str] = set()
    for m in _BINDING.finditer(program):
        imp = m.group(3)
        if imp is not None:
            names = set(re.findall(r"\w+", imp.split("import", 1)[1] if imp.startswith("from") else imp))
            plain = _PLAIN_MODULE_IMPORT.fullmatch(imp.strip())
            if plain:  # `import math` binds the very module the parent uses
                names -= TRUSTED_MODULES
            out |= names & TRUSTED_NAMES
            continue
        for g in m.groups():
            if g:
                out |= set(re.findall(r"\w+", g)) & TRUSTED_NAMES
    return frozenset(out)
