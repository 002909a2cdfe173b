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
  Which names are the program's is decided once per test (`program_names`): only the entry point and the
  other names the test uses without defining them that are neither builtins nor standard-library names
  (what the problem asks the program to write). Builtins, modules and the names the program imports from
  the standard library always resolve to the real ones, whatever the program rebinds: a program that
  redefines `abs`, `set` or `math.isclose` changes only its own code. A builtin is the program's only
  when the test uses nothing else (MBPP 126 asks for a function named `sum`).
  Shapes this cannot express (loops, local variables, helper functions of the test, `and`/`or` around the
  program's calls) run in a process of their own, the *test process* (`harness.run_test_process`): the whole
  check, or every assert of the set, runs there, with the test process's own builtins and modules, and the
  program's names it uses (`candidate`, and only those of `program_names`) are proxies that send their
  arguments to the program's process and receive plain values back (`harness_wire.canonical`); an exception
  the program raises there is the test's runtime error, never an exception the test could catch. The plan
  then has a `test_payload`, which the worker hands to the test process only: no text of the test ever
  reaches the program's process. A helper the prompt defines (HumanEval/32's `poly`) is part of the check's
  text (see `envs/suites/humaneval.py`), so the test uses the prompt's definition, never the program's.
"""

from __future__ import annotations

import ast
import builtins
import functools
import re
import sys
from dataclasses import dataclass, field

from .compare import TRUSTED_NAMES, evaluable
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
    names = program_names(program, tests)
    if tests.style == "assert":
        items, wire_items = _plan_asserts(tests.asserts, names)
        base = {"style": "assert", "program": program, "setup": tests.setup, "names": sorted(names)}
        if all(i.splittable for i in items):
            return Plan("assert", {**base, "items": wire_items}, len(tests.asserts), items=items)
        return Plan("assert", {**base, "serve": True}, len(tests.asserts),
                    test_payload={"kind": "asserts", "asserts": list(tests.asserts), "names": sorted(names),
                                  "imports": trusted_imports(program, tests, names)})
    entry = tests.entry_point
    base = {"style": "check", "program": program, "entry_point": entry, "names": sorted(names)}
    planned = _plan_check(tests.check, names)
    if planned is None:
        return Plan("check", {**base, "serve": True}, 1,
                    test_payload={"kind": "check", "check": tests.check, "entry_point": entry,
                                  "names": sorted(names), "imports": trusted_imports(program, tests, names)})
    check_imports, param, items, wire_items = planned
    return Plan("check", {**base, "imports": check_imports, "param": param, "items": wire_items}, 1, items=items)


# ---------------------------------------------------------------------------------------------- whose names

BUILTIN_NAMES = frozenset(dir(builtins))
STDLIB_MODULES = frozenset(sys.stdlib_module_names)
# Standard-library names a test may use bare for an expected value (`deque([1, 2])`): like builtins, they are
# the real ones even where the program defines its own (unless the test uses no other name of the program).
STDLIB_NAMES = {"deque": "collections", "Counter": "collections", "OrderedDict": "collections",
                "defaultdict": "collections", "namedtuple": "collections", "Fraction": "fractions",
                "Decimal": "decimal", "inf": "math", "pi": "math"}


def program_names(program: str, tests: TestSpec) -> frozenset[str]:
    """The names an assert or check test takes from the program's process: the entry point and what else the
    test uses without defining it, unless that is a builtin, a standard-library module, one of
    `STDLIB_NAMES` or a name the program imports from the standard library (those resolve to the real thing,
    out of the program's reach); for an assert set, also the names its setup code binds (it runs after the
    program, in the program's globals). When an assert set uses no other name, the builtins the program
    redefines are what it was asked to write (MBPP 126: `sum`)."""
    if tests.style == "check":
        free = _free_names((tests.check,))
        return frozenset({tests.entry_point} | _unresolved(free, program))
    free = _free_names(tests.asserts)
    setup = _bound_names(tests.setup) if tests.setup.strip() else frozenset()
    free -= setup
    own = _unresolved(free, program)
    if not own:
        own = free & shadowed_names(program, among=free)
    return frozenset(own | setup)


def trusted_imports(program: str, tests: TestSpec, names: frozenset[str]) -> list[str]:
    """Import statements the test process runs itself for the standard-library names the test uses (a module,
    or a name the program imports from one: `deque`), so that neither resolves to the program's objects."""
    sources = (tests.check,) if tests.style == "check" else tests.asserts
    imported = _stdlib_imports(program)
    out = []
    for name in sorted(_free_names(sources) - names - BUILTIN_NAMES):
        if name in imported:
            out.append(imported[name])
        elif name in STDLIB_MODULES:
            out.append(f"import {name}")
        elif name in STDLIB_NAMES:
            out.append(f"from {STDLIB_NAMES[name]} import {name}")
    return out


def _unresolved(free: frozenset[str], program: str) -> set[str]:
    return set(free - BUILTIN_NAMES - STDLIB_MODULES - STDLIB_NAMES.keys() - _stdlib_imports(program).keys())


@functools.lru_cache(maxsize=4096)
def _free_names(sources: tuple[str, ...]) -> frozenset[str]:
    """Names the test's text loads and binds nowhere (any binding anywhere in it counts, scopes aside)."""
    loaded: set[str] = set()
    bound: set[str] = set()
    for src in sources:
        tree = _parse(src)
        if tree is None:
            continue
        loaded |= {n.id for n in ast.walk(tree) if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
        bound |= _bound_in(tree)
    return frozenset(loaded - bound)


def _bound_names(src: str) -> frozenset[str]:
    tree = _parse(src)
    return frozenset(_bound_in(tree)) if tree is not None else frozenset()


def _bound_in(tree: ast.AST) -> set[str]:
    bound: set[str] = set()
    for n in ast.walk(tree):
        if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load):
            bound.add(n.id)
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(n.name)
        elif isinstance(n, ast.arg):
            bound.add(n.arg)
        elif isinstance(n, (ast.Import, ast.ImportFrom)):
            bound |= {(a.asname or a.name).split(".")[0] for a in n.names if a.name != "*"}
        elif isinstance(n, ast.ExceptHandler) and n.name:
            bound.add(n.name)
    return bound


def _parse(src: str) -> ast.Module | None:
    try:
        return ast.parse(src.strip())
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        return None


@functools.lru_cache(maxsize=4096)
def _stdlib_imports(program: str) -> dict[str, str]:
    """{name: import statement} for the names the program's top level imports from the standard library."""
    if "import" not in program:
        return {}
    tree = _parse(program)
    out: dict[str, str] = {}
    for s in _top_level(tree.body if tree is not None else []):
        if isinstance(s, ast.Import):
            for a in s.names:
                if a.name.split(".")[0] in STDLIB_MODULES:
                    name = a.asname or a.name.split(".")[0]
                    out[name] = f"import {a.name} as {a.asname}" if a.asname else f"import {a.name}"
        elif isinstance(s, ast.ImportFrom) and not s.level and (s.module or "").split(".")[0] in STDLIB_MODULES:
            for a in s.names:
                if a.name != "*":
                    out[a.asname or a.name] = f"from {s.module} import {a.name} as {a.asname or a.name}"
    return out


def _top_level(body: list[ast.stmt]) -> list[ast.stmt]:
    """The statements run at module level: `body` and the blocks of its if/try/with/for/while statements."""
    out, todo = [], list(body)
    while todo:
        s = todo.pop()
        out.append(s)
        if not isinstance(s, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            for field_name in ("body", "orelse", "finalbody", "handlers"):
                todo.extend(getattr(s, field_name, ()) or ())
    return out


@functools.lru_cache(maxsize=4096)
def _plan_asserts(asserts: tuple[str, ...], names: frozenset[str]) -> tuple[tuple[Item, ...], list[dict]]:
    """Memoised per test set (the plan depends on the program only through `names`, those the test takes
    from the program's process); callers never mutate the result. Wire items of unsplittable statements
    are None (the plan then uses the test process)."""
    items, wire_items = [], []
    for src, stmt in zip(asserts, _parse_asserts(asserts)):
        if isinstance(stmt, ast.Assert):
            item, holes = _plan_expr(stmt.test, names, _Source(src.strip()))
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
def _plan_check(check: str, names: frozenset[str]) -> tuple[list[str], str, tuple[Item, ...], list[dict]] | None:
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
        item, holes = _plan_expr(s.test, names | {param}, source)
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


def _plan_expr(test: ast.expr, names: frozenset[str], source: _Source) -> tuple[Item, list[str]]:
    """Split `test` (parsed from `source`) into holes (source texts, evaluated in the child) and a
    parent-side expression. `names` are the program's (and, for an assert set, its setup's): only they make
    a hole; every other name is the parent's (a builtin of `TRUSTED_NAMES`) or makes the test unsplittable."""
    trusted = TRUSTED_NAMES - names  # a builtin is the program's only when it is what the test asks for
    holes: list[str] = []

    marked: set[int] = set()  # ids of the nodes that mention a name of the program

    def mark(n: ast.AST) -> bool:
        hit = isinstance(n, ast.Name) and n.id in names
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
        if _is_hole(n, trusted, names):
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


def _root_name(n: ast.expr) -> str | None:
    """The name an expression such as `a.b(1)[2].c` starts from."""
    while isinstance(n, (ast.Attribute, ast.Subscript, ast.Call)):
        n = n.func if isinstance(n, ast.Call) else n.value
    return n.id if isinstance(n, ast.Name) else None


# Builtins whose result is no plain value (`type(f(x))` is a class): the parent applies them to the value.
_PARENT_ONLY = frozenset({"type", "isinstance"})


def _is_hole(n: ast.expr, trusted: frozenset[str], names: frozenset[str]) -> bool:
    """A hole starts from a name of the program, or applies builtins to such expressions, and holds no
    constant outside the arguments of the program's own calls (so no expected value reaches the child)."""
    if not isinstance(n, (ast.Call, ast.Name, ast.Attribute, ast.Subscript)):
        return False

    def clean(m: ast.AST) -> bool:
        if isinstance(m, ast.Call) and _root_name(m.func) in names:
            return clean(m.func)  # its arguments are the program's inputs
        if isinstance(m, ast.Name):
            return m.id in names or m.id in BUILTIN_NAMES
        if isinstance(m, ast.Constant):
            return False
        if isinstance(m, (ast.Lambda, ast.NamedExpr, ast.Await, ast.Yield, ast.YieldFrom)):
            return False
        return all(clean(c) for c in ast.iter_child_nodes(m))

    if isinstance(n, ast.Call) and _trusted_callee(n.func, trusted):
        if isinstance(n.func, ast.Name) and n.func.id in _PARENT_ONLY:
            return False
        return bool(n.args) and all(clean(a) for a in n.args) and not n.keywords
    return _root_name(n) in names and clean(n)


# Where a name gets bound: def/class NAME, NAME = / NAME: / NAME, (at a line start), import lines,
# `as NAME`, global lines, `for NAME in`, lambda parameters, NAME :=.
_BINDING = re.compile(
    r"\b(?:def|class)\s+(\w+)|^[ \t]*(\w+)\s*(?:=(?!=)|:|,)|^[ \t]*((?:from\s+\S+\s+)?import\b[^\n]*)"
    r"|\bas\s+(\w+)|\bglobal\b([^\n]*)|\bfor\s+(\w+)\s+in\b|\blambda\b([^:\n]*):|\b(\w+)\s*:=", re.M)
_PLAIN_MODULE_IMPORT = re.compile(r"import\s+([\w\s,]+)")


def shadowed_names(program: str, among: frozenset[str] = TRUSTED_NAMES) -> frozenset[str]:
    """The names of `among` (builtins) that the program may rebind: a conservative textual check. Such a name
    is the program's only where the test uses no other name of the program (see `program_names`)."""
    if not any(name in program for name in among):
        return frozenset()
    out: set[str] = set()
    for m in _BINDING.finditer(program):
        imp = m.group(3)
        if imp is not None:
            names = set(re.findall(r"\w+", imp.split("import", 1)[1] if imp.startswith("from") else imp))
            plain = _PLAIN_MODULE_IMPORT.fullmatch(imp.strip())
            if plain:  # `import math` binds the very module the test uses
                names -= STDLIB_MODULES
            out |= names & among
            continue
        for g in m.groups():
            if g:
                out |= set(re.findall(r"\w+", g)) & among
    return frozenset(out)
