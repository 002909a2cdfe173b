"""The executor: every test style and outcome class, the APPS conventions, the comparison rules, parent-side
judging, the cache and batch API, the shell interface, and the degraded isolation paths."""

from __future__ import annotations

import ast
import gc
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

import psutil
import pytest

from envs import compare
from envs.execute import Executor, cache_key, execute
from envs.harness_plan import make_plan, shadowed_names
from envs.harness_wire import WireError, canonical, decode_value
from envs.problem import TestSpec
from envs.result import OUTCOMES, ExecResult, Outcome

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

STDIO = TestSpec("stdio", cases=({"input": "2 3\n", "output": "5\n"}, {"input": "1 1\n", "output": "2\n"}))
CALL = TestSpec("call", fn_name="f", cases=({"args": [1], "expected": 2}, {"args": [5], "expected": 6}))
ASSERT = TestSpec("assert", setup="K = 1", asserts=("assert f(1) == 2", "assert f(5) == 6"))
CHECK = TestSpec("check", entry_point="f",
                 check="def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(5) == 6\n")

GOOD = {"stdio": "a, b = map(int, input().split())\nprint(a + b)\n", "call": "def f(x):\n    return x + 1\n"}
GOOD["assert"] = GOOD["check"] = GOOD["call"]
SPECS = {"stdio": STDIO, "call": CALL, "assert": ASSERT, "check": CHECK}
WRONG = {"stdio": "a, b = map(int, input().split())\nprint(a * b + 1 if a == 2 else a + b)\n",
         "call": "def f(x):\n    return x + 1 if x == 1 else 0\n"}
WRONG["assert"] = WRONG["check"] = WRONG["call"]
RAISES = {"stdio": "a, b = map(int, input().split())\nprint(a + b)\nif a == 1:\n    raise ValueError('boom')\n",
          "call": "def f(x):\n    if x == 5:\n        raise ValueError('boom')\n    return x + 1\n"}
RAISES["assert"] = RAISES["check"] = RAISES["call"]
SLOW = {"stdio": "import time\ntime.sleep(60)\n", "call": "import time\ndef f(x):\n    time.sleep(60)\n"}
SLOW["assert"] = SLOW["check"] = SLOW["call"]


@pytest.fixture(scope="module")
def ex():
    with Executor(workers=2, cpu_time_per_test=0.5, cpu_time_per_program=1.0, timeout_per_test=1.5,
                  timeout_per_program=4.0) as e:
        yield e


# ---------------------------------------------------------------------------------------------- styles x outcomes

@pytest.mark.parametrize("style", ["stdio", "call", "assert", "check"])
def test_every_outcome_class_in_every_style(ex, style):
    spec = SPECS[style]
    programs = [GOOD[style], WRONG[style], RAISES[style], "def f(x) return 1\n", SLOW[style]]
    passed, failed, raised, broken, slow = ex.run_batch([(p, spec) for p in programs])
    assert (passed.outcome, passed.reward, passed.error) == (Outcome.PASSED, 1.0, None)
    assert [t.status for t in passed.tests] == ["passed"] * len(spec)
    assert (failed.outcome, failed.reward) == (Outcome.FAILED, -0.3)
    assert (raised.outcome, raised.reward, raised.timeout) == (Outcome.RUNTIME_ERROR, -0.6, False)
    assert "boom" in raised.error
    assert (broken.outcome, broken.reward) == (Outcome.COMPILE_ERROR, -1.0)
    assert "SyntaxError" in broken.error
    assert (slow.outcome, slow.reward, slow.timeout) == (Outcome.RUNTIME_ERROR, -0.6, True)
    assert slow.tests[0].status == "timeout"
    for r in (passed, failed, raised, broken, slow):
        assert len(r.tests) == len(spec) and r.wall_time > 0 and not r.cached


def test_load_errors_name_their_cause(ex):
    r = ex.run("import no_such_module_xyz\ndef f(x):\n    return x\n", CALL)
    assert r.outcome == Outcome.RUNTIME_ERROR and "ModuleNotFoundError" in r.error
    assert [t.status for t in r.tests] == ["runtime_error", "not_run"]
    r = ex.run("def g(x):\n    return x\n", CALL)
    assert r.outcome == Outcome.RUNTIME_ERROR and "'f' is not defined" in r.error


def test_per_test_verdicts_and_runtime_error_dominates(ex):
    spec = TestSpec("call", fn_name="f", cases=tuple({"args": [i], "expected": i} for i in range(4)))
    r = ex.run("def f(x):\n    if x == 1:\n        return -1\n    if x == 2:\n        raise KeyError(x)\n    return x\n",
               spec)
    assert [t.status for t in r.tests] == ["passed", "failed", "runtime_error", "passed"]
    assert r.outcome == Outcome.RUNTIME_ERROR


def test_program_timeout_stops_remaining_tests(ex):
    spec = TestSpec("call", fn_name="f", cases=tuple({"args": [i], "expected": i} for i in range(12)))
    with Executor(workers=1, timeout_per_test=3.0, timeout_per_program=1.0) as one:
        r = one.run("import time\ndef f(x):\n    time.sleep(0.4)\n    return x\n", spec)
    statuses = [t.status for t in r.tests]
    assert r.timeout and r.outcome == Outcome.RUNTIME_ERROR
    assert "timeout" in statuses and statuses[-1] == "not_run"


def test_memory_cap(ex):
    spec = TestSpec("call", fn_name="f", cases=({"args": [1], "expected": 1},))
    r = ex.run("def f(x):\n    b = bytearray(2 * 1024 ** 3)\n    return x\n", spec)
    assert r.outcome == Outcome.RUNTIME_ERROR and "MemoryError" in r.error


# ---------------------------------------------------------------------------------------------- APPS conventions

def test_stdio_top_level_return_is_wrapped(ex):
    prog = "n = int(input())\nif n == 0:\n    print('zero')\n    return\nprint('s = \"x\"\\n  y')\n"
    spec = TestSpec("stdio", cases=({"input": "0\n", "output": "zero\n"},
                                    {"input": "1\n", "output": 's = "x"\n  y\n'}))
    assert ex.run(prog, spec).outcome == Outcome.PASSED


def test_call_style_has_typing_names_and_solution_class(ex):
    spec = TestSpec("call", fn_name="kth", cases=({"args": [[2, 3, 4, 7, 11], 5], "expected": 9},))
    prog = ("class Solution:\n    def kth(self, arr: List[int], k: int) -> int:\n"
            "        s = set(arr)\n        n = 0\n        while k:\n            n += 1\n"
            "            k -= n not in s\n        return n\n")
    assert ex.run(prog, spec).outcome == Outcome.PASSED


def test_call_style_one_element_list_and_tuples(ex):
    spec = TestSpec("call", fn_name="f", cases=({"args": [1], "expected": [False]}, {"args": [2], "expected": [1, 2]}))
    assert ex.run("def f(x):\n    return False if x == 1 else (1, 2)\n", spec).outcome == Outcome.PASSED
    assert ex.run("def f(x):\n    return False if x == 1 else 1\n", spec).outcome == Outcome.FAILED


def test_assert_program_runs_before_setup(ex):
    spec = TestSpec("assert", setup="p = Pair(1, 2)", asserts=("assert total(p) == 3",))
    prog = "class Pair:\n    def __init__(self, a, b):\n        self.a, self.b = a, b\ndef total(p):\n    return p.a + p.b\n"
    assert ex.run(prog, spec).outcome == Outcome.PASSED


# ---------------------------------------------------------------------------------------------- comparison rules

@pytest.mark.parametrize("actual,expected,ok", [
    ("5\n", "5\n", True), ("5", "5\n", True), ("5  \n\n\n", "5\n", True), ("5\r\n6\r\n", "5\n6\n", True),
    ("1  2 3\n", "1 2 3\n", True), ("5\n", "5\n6\n", False), ("5\n6\n", "5\n", False), ("5\n\n6\n", "5\n6\n", False),
    ("0.3333333\n", "0.333333333\n", True), ("0.334\n", "0.333333\n", False), ("1e-3\n", "0.001\n", True),
    ("3.0\n", "3\n", False), ("yes\n", "Yes\n", False), (b"\xff5\n", "5\n", False), (b"5\n", "5\n", True),
])
def test_stdio_rules(actual, expected, ok):
    assert compare.stdio_output_matches(actual, expected) is ok


@pytest.mark.parametrize("actual,expected,ok", [
    (9, 9, True), (9, [9], True), (False, [False], True), ((1, 2), [1, 2], True), ([(1, 2)], [[1, 2]], True),
    ([1, 2], [[1, 2]], True), (1, [1, 2], False), (True, 1, True), ({"a": (1,)}, {"a": [1]}, True), (None, [], False),
])
def test_call_rules(actual, expected, ok):
    assert compare.call_output_matches(actual, expected) is ok


def test_parent_evaluator_restricted():
    tree = ast.parse("abs(__hole_0 - 0.5) < 1e-6 and 1", mode="eval").body
    assert not compare.evaluable(tree, holes=1)  # `and` is not a judged shape
    tree = ast.parse("math.isclose(__hole_0, 1.5, rel_tol=1e-3)", mode="eval").body
    assert compare.evaluable(tree, holes=1) and compare.evaluate(tree, [1.5001])
    assert not compare.evaluable(ast.parse("__import__('os')", mode="eval").body)
    assert not compare.evaluable(ast.parse("2 ** __hole_0", mode="eval").body, holes=1)


# ---------------------------------------------------------------------------------------------- parent-side judging

def test_expected_values_never_reach_the_child():
    spec = TestSpec("assert", asserts=("assert f(1) == 'SECRET-A'", "assert abs(g(2) - 0.123456) < 1e-6",
                                       "assert math.isclose(h(3), 4.56789)", "assert sorted(k(4)) == [77, 88]"))
    plan = make_plan("def f(x): pass", spec)
    wire = json.dumps(plan.payload)
    for secret in ("SECRET-A", "0.123456", "4.56789", "77"):
        assert secret not in wire
    assert [i["holes"] for i in plan.payload["items"]] == [["(f(1))"], ["(g(2))"], ["(h(3))"], ["(sorted(k(4)))"]]
    assert all(i.splittable for i in plan.items) and not plan.in_test_process
    for style, spec in (("stdio", STDIO), ("call", CALL)):
        wire = json.dumps(make_plan("x", spec).payload)
        assert "5\\n" not in wire and '"expected"' not in wire


def test_holes_keep_their_source_text(ex):
    check = ("def check(c):\n    assert c('héllo wörld',\n             2) == 'hé'\n"
             "    assert c('ünï', 1) \\\n        == 'ü'\n")
    spec = TestSpec("check", entry_point="g", check=check)
    plan = make_plan("def g(s, n):\n    return s[:n]\n", spec)
    assert [i["holes"] for i in plan.payload["items"]] == [["(c('héllo wörld',\n             2))"],
                                                             ["(c('ünï', 1))"]]
    assert plan.payload["param"] == "c"
    assert ex.run("def g(s, n):\n    return s[:n]\n", spec).outcome == Outcome.PASSED


LOOPED = TestSpec("check", entry_point="f", check=(
    "CASES = [(0, 1), (1, 2), (2, 3)]  # SECRET-CASES\n\ndef helper(n):\n    return n + 1\n\n"
    "def check(candidate):\n    expected = {i: helper(i) for i in range(3)}  # SECRET-LOCALS\n"
    "    for i, want in CASES:\n        assert candidate(i) == want == expected[i]\n"))


def test_tests_that_cannot_be_split_run_in_the_test_process(ex):
    plan = make_plan(GOOD["call"], LOOPED)
    assert plan.in_test_process and plan.payload["serve"]
    assert "SECRET" not in json.dumps(plan.payload) and "SECRET" in json.dumps(plan.test_payload)
    r = ex.run(GOOD["call"], LOOPED)
    assert (r.outcome, r.tests[0].status) == (Outcome.PASSED, "passed")
    assert ex.run(WRONG["call"], LOOPED).outcome == Outcome.FAILED
    assert ex.run(RAISES["call"], TestSpec("check", entry_point="f", check=(
        "def check(candidate):\n    for i in (1, 5):\n        assert candidate(i) == i + 1\n"))).outcome \
        == Outcome.RUNTIME_ERROR
    spec = TestSpec("assert", asserts=("assert f(1) == 2 or f(2) == 9", "assert f(5) == 6"))
    assert make_plan(GOOD["call"], spec).in_test_process
    assert [t.status for t in ex.run(GOOD["call"], spec).tests] == ["passed", "passed"]
    assert [t.status for t in ex.run(WRONG["call"], spec).tests] == ["passed", "failed"]
    # names of the program the test uses (a HumanEval prompt's helper) are proxies too
    helper = TestSpec("check", entry_point="f", check=(
        "def check(candidate):\n    for i in range(3):\n        assert candidate(i) == g(i) + 1\n"))
    assert ex.run("def g(x):\n    return x\ndef f(x):\n    return x + 1\n", helper).outcome == Outcome.PASSED
    assert ex.run("g = 'not callable'\ndef f(x):\n    return x + 1\n", helper).outcome == Outcome.RUNTIME_ERROR


# Programs that look for the looped check's cases or locals inside their own process, or return rigged
# objects. Each would pass if the test ran in its process (a control below shows the memory scan works).
# No program source holds the needle whole: the worker reads each program's source, and what it once held
# is in the memory of the processes it forks later.
_SCAN = ("import ctypes, re, sys\ndef scan(needle):\n"
         "    own = id(needle) + sys.getsizeof(b'') - 1  # the needle's own bytes do not count\n"
         "    pattern = re.compile(re.escape(needle))\n    with open('/proc/self/maps') as maps:\n"
         "        regions = [line.split() for line in maps]\n    for parts in regions:\n"
         "        if not parts[1].startswith('r') or parts[-1] in ('[vvar]', '[vsyscall]', '[vvar_vclock]'):\n"
         "            continue\n        lo, hi = (int(x, 16) for x in parts[0].split('-'))\n"
         "        for m in pattern.finditer((ctypes.c_char * (hi - lo)).from_address(lo)):\n"
         "            if lo + m.start() != own:\n                return True\n    return False\n")
PEEKERS = {
    "frames": ("import sys\ndef f(x):\n    fr = sys._getframe(1)\n    while fr is not None:\n"
               "        for k, v in list(fr.f_locals.items()) + list(fr.f_globals.items()):\n"
               "            if k in ('CASES', 'want', 'expected'):\n                return dict(v)[x] if k != 'want' else v\n"
               "        fr = fr.f_back\n    return None\n"),
    "gc": ("import gc\ndef f(x):\n    for o in gc.get_objects():\n"
           "        if isinstance(o, list) and o and all(isinstance(t, tuple) and len(t) == 2 for t in o):\n"
           "            d = dict(o)\n            if x in d:\n                return d[x]\n"
           "        if isinstance(o, str) and 'SECRET-' + 'CASES' in o:\n            return x + 1\n    return None\n"),
    "memory": _SCAN + "def f(x):\n    return x + 1 if scan(b'SECRET-' + b'CASES') else None\n",
    "rigged_eq": ("class A:\n    def __eq__(self, o):\n        return True\n    __hash__ = object.__hash__\n"
                  "def f(x):\n    return A()\n"),
    "rigged_int": ("class I(int):\n    def __eq__(self, o):\n        return True\n    def __add__(self, o):\n"
                   "        return self\n    __hash__ = int.__hash__\ndef f(x):\n    return I(0)\n"),
}


@pytest.mark.parametrize("name", list(PEEKERS))
def test_looped_check_cannot_be_read_or_rigged_by_the_program(ex, name):
    r = ex.run(PEEKERS[name], LOOPED)
    assert r.outcome == Outcome.FAILED, (name, r.error)


def test_memory_scan_control_finds_what_is_in_the_process(ex):
    """The scan of `PEEKERS['memory']` finds a string that is in the program's process (the program's own
    source, built at run time so that the needle is not a constant of the scan)."""
    prog = _SCAN + "MARK = 'MARK-' + 'IN-PROCESS'\ndef f(x):\n    return x + 1 if scan(MARK.encode()) else None\n"
    assert ex.run(prog, LOOPED).outcome == Outcome.PASSED


def test_redefined_builtin_is_the_programs():
    assert shadowed_names("def sum(a, b):\n    return a - b\n") == {"sum"}
    assert shadowed_names("import math\nx = len([1])\n") == frozenset()
    plan = make_plan("def sum(a, b):\n    return a - b\n", TestSpec("assert", asserts=("assert sum(10, 15) == -5",)))
    assert plan.payload["items"] == [{"holes": ["(sum(10, 15))"]}]


def test_value_codec_is_strict():
    for v in [1, -2 ** 70, 10 ** 5000, 1.5, float("inf"), "s\udc80", b"\x00", None, True, (1, [2, {3: (4,)}]),
              {1, 2}, frozenset({(1, 2)}), {(1, 2): {"a": None}}, 2 + 3j]:
        assert decode_value(json.loads(json.dumps(canonical(v)))) == v
    from collections import Counter, namedtuple
    assert decode_value(canonical(Counter("aab"))) == {"a": 2, "b": 1}
    assert type(decode_value(canonical(namedtuple("P", "x y")(1, 2)))) is tuple
    with pytest.raises(TypeError):
        canonical(object())
    for bad in [{"x": 1}, {"t": 1}, {"s": [[1]]}, {"d": [[1]]}, {"t": [], "s": []}]:
        with pytest.raises(WireError):
            decode_value(bad)


# ---------------------------------------------------------------------------------------------- API

def test_batch_order_dedup_and_cache(ex):
    jobs = [(GOOD["call"], CALL), (WRONG["call"], CALL), (GOOD["call"], CALL), (GOOD["stdio"], STDIO)]
    fresh = Executor(workers=2)
    try:
        res = fresh.run_batch(jobs)
        assert [r.outcome for r in res] == [Outcome.PASSED, Outcome.FAILED, Outcome.PASSED, Outcome.PASSED]
        assert [r.cached for r in res] == [False, False, True, False]  # the duplicate ran once
        again = fresh.run(GOOD["call"], CALL)
        assert again.cached and again.wall_time == 0.0 and again.outcome == Outcome.PASSED
        assert fresh.cache_key(GOOD["call"], CALL) == cache_key(GOOD["call"], CALL)
    finally:
        fresh.close()


def test_seed_cache_and_no_cache():
    fake = ExecResult(Outcome.FAILED, -0.3)
    with Executor(workers=1) as e:
        e.seed_cache({cache_key(GOOD["call"], CALL): fake})
        r = e.run(GOOD["call"], CALL)
        assert r.outcome == Outcome.FAILED and r.cached
        assert e.worker_pids == []  # a cache hit starts no worker
    with Executor(workers=1, cache=False) as e:
        a, b = e.run_batch([(GOOD["call"], CALL), (GOOD["call"], CALL)])
        assert a.outcome == b.outcome == Outcome.PASSED


def test_workers_stop_on_close_and_on_garbage_collection():
    e = Executor(workers=2)
    e.run_batch([(GOOD["call"], CALL), (GOOD["stdio"], STDIO)])
    pids = e.worker_pids
    assert len(pids) == 2 and all(psutil.pid_exists(p) for p in pids)
    procs = [psutil.Process(p) for p in pids]
    del e
    gc.collect()
    gone, alive = psutil.wait_procs(procs, timeout=10)
    assert not alive
    with Executor(workers=1) as e2:
        e2.run(GOOD["call"], CALL)
        procs = [psutil.Process(p) for p in e2.worker_pids]
    assert not psutil.wait_procs(procs, timeout=10)[1]
    with pytest.raises(RuntimeError):
        e2.run(GOOD["call"], CALL)


def test_empty_spec_and_wrong_types_are_rejected(ex):
    with pytest.raises(ValueError, match="job 1"):
        ex.run_batch([(GOOD["call"], CALL), (GOOD["stdio"], TestSpec("stdio"))])
    with pytest.raises(TypeError):
        ex.run_batch([(GOOD["call"], CALL.to_json())])
    assert ex.run_batch([]) == []


def test_execute_convenience():
    assert execute(GOOD["stdio"], STDIO).outcome == Outcome.PASSED


def test_isolation_is_reported_and_logged_once(caplog):
    import envs.sandbox as sandbox
    sandbox._LOGGED.clear()
    with caplog.at_level(logging.INFO, logger="envs.sandbox"):
        with Executor(workers=2) as e:
            e.run_batch([(GOOD["call"], CALL), (WRONG["call"], CALL)])
            iso = e.isolation
    assert len([r for r in caplog.records if "isolation in force" in r.getMessage()]) == 1
    if shutil.which("unshare"):
        assert iso["pid_namespace"] and iso["network_namespace"]
        assert iso["filesystem"] == "private read-only root"
        if os.geteuid() == 0:
            assert iso["uid"] is not None


# ---------------------------------------------------------------------------------------------- degraded paths

DEGRADED_PROGRAMS = [
    (GOOD["stdio"], STDIO, "passed"), (WRONG["call"], CALL, "failed"), (RAISES["check"], CHECK, "runtime_error"),
    ("def f(x)\n", ASSERT, "compile_error"), ("def f(x):\n    import os\n    os._exit(0)\n", CALL, "runtime_error"),
    ("import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
     "        os.execv('/bin/sleep', ['sleep', '4343.5151'])\n    os._exit(0)\n" + GOOD["stdio"], STDIO, "passed"),
    ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n" + GOOD["stdio"], STDIO, "runtime_error"),
]


@pytest.mark.parametrize("options", [{"namespaces": False}, {"filesystem": False}, {"user_namespace": True}],
                         ids=["no-namespaces", "host-filesystem", "user-namespace"])
def test_degraded_isolation_paths(options):
    if options.get("user_namespace") and not shutil.which("unshare"):
        pytest.skip("no unshare")
    with Executor(workers=1, timeout_per_test=2.0, **options) as e:
        iso = e.isolation
        res = e.run_batch([(p, s) for p, s, _ in DEGRADED_PROGRAMS])
        assert [r.outcome.value for r in res] == [o for _, _, o in DEGRADED_PROGRAMS]
        top = psutil.Process(e.worker_pids[0])
        assert len(top.children(recursive=True)) == (1 if iso["namespaces"] else 0)
    assert not any("4343.5151" in " ".join(p.info["cmdline"] or []) for p in psutil.process_iter(["cmdline"]))
    if options.get("namespaces") is False:
        assert not iso["pid_namespace"] and iso["subreaper"]
    if options.get("user_namespace"):
        assert iso["user_namespace"] and iso["drop_caps"]


def _reachable_as_others(paths: list[str], stage: str) -> str:
    """Shell commands (for a private mount namespace) that make `paths` reachable by any user without changing
    the host: each directory on the way that others cannot enter (e.g. root's 0700 home holding a virtual
    environment) is covered with a world-enterable tmpfs, and the paths inside it are bound back."""
    blocked: dict[str, list[str]] = {}
    for path in sorted({os.path.abspath(p) for p in paths}):
        ancestors = [path]
        while ancestors[-1] != "/":
            ancestors.append(os.path.dirname(ancestors[-1]))
        shut = [a for a in reversed(ancestors[1:]) if not os.stat(a).st_mode & 0o001]
        if shut:
            blocked.setdefault(shut[0], []).append(path)
    tops = [b for b in blocked if not any(b != o and b.startswith(o.rstrip("/") + "/") for o in blocked)]
    cmds, k = [], 0
    for top in tops:
        inside = sorted({p for b, ps in blocked.items() if b == top or b.startswith(top + "/") for p in ps})
        inside = [p for p in inside if not any(p != q and p.startswith(q + "/") for q in inside)]
        saved = []
        for p in inside:
            cmds.append(f"mkdir -p {stage}/{k} && mount --bind {p} {stage}/{k}")
            saved.append((f"{stage}/{k}", p))
            k += 1
        cmds.append(f"mount -t tmpfs -o mode=755 tmpfs {top}")
        cmds += [f"mkdir -p {p} && mount --bind {s} {p}" for s, p in saved]
    return "".join(c + " && " for c in cmds)


@pytest.mark.skipif(os.geteuid() != 0 or not shutil.which("setpriv") or not shutil.which("unshare"),
                    reason="needs root to become an ordinary user")
def test_works_as_an_ordinary_user(tmp_path):
    """Run the shell interface as `nobody`: the worker then uses a user namespace and drops every capability.
    Wherever this Python environment and the checkout live (a virtual environment under root's home, say),
    a private mount namespace makes them reachable for `nobody`."""
    work = tmp_path / "work"
    work.mkdir()
    (work / "t.json").write_text(json.dumps(STDIO.to_json()))
    (work / "p.py").write_text(GOOD["stdio"])
    needed = [sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable)),
              os.path.dirname(sys.executable), REPO, str(work)]
    needed += [p for p in sys.path if p and os.path.isdir(p) and not p.startswith(str(tmp_path))]
    stage = tempfile.mkdtemp(prefix="bcoder-stage-", dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        mounts = _reachable_as_others(needed, stage)
        assert f"tmpfs {os.path.dirname(stage)}" not in mounts  # the staging place itself stays visible
        os.chmod(work, 0o777)
        cmd = (f"{mounts}cd {work} && setpriv --reuid=65534 --regid=65534 --clear-groups env "
               f"PYTHONPATH={REPO} HOME={work} {sys.executable} -m envs.execute --isolation t.json p.py")
        out = subprocess.run(["unshare", "--mount", "sh", "-c", cmd], capture_output=True, text=True,
                             timeout=120)
    finally:
        shutil.rmtree(stage, ignore_errors=True)
    assert out.returncode == 0, (cmd, out.stderr)
    assert json.loads(out.stdout)["outcome"] == "passed"
    assert "user namespace" in out.stderr and "all capabilities dropped" in out.stderr


# ---------------------------------------------------------------------------------------------- shell interface

def _cli(*args: str, timeout: float = 120) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": REPO}
    return subprocess.run([sys.executable, "-m", "envs.execute", *args], capture_output=True, text=True,
                          timeout=timeout, env=env, cwd=REPO)


def test_cli_single_and_batch(tmp_path):
    (tmp_path / "tests.json").write_text(json.dumps(CALL.to_json()))
    (tmp_path / "prog.py").write_text(GOOD["call"])
    out = _cli(str(tmp_path / "tests.json"), str(tmp_path / "prog.py"))
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert res["outcome"] == "passed" and res["reward"] == 1.0
    jobs = [{"id": "a", "program": GOOD["stdio"], "tests": STDIO.to_json()},
            {"id": 7, "program": "x = (", "tests": ASSERT.to_json()},
            {"id": "c", "program": WRONG["check"], "tests": CHECK.to_json()}]
    (tmp_path / "jobs.jsonl").write_text("".join(json.dumps(j) + "\n" for j in jobs))
    out = _cli("--batch", str(tmp_path / "jobs.jsonl"), "--workers", "2")
    assert out.returncode == 0, out.stderr
    lines = [json.loads(line) for line in out.stdout.splitlines()]
    assert [(r["id"], r["outcome"], r["reward"]) for r in lines] == [
        ("a", "passed", 1.0), (7, "compile_error", -1.0), ("c", "failed", -0.3)]
    assert "programs/s" in out.stderr


def test_cli_reports_bad_input(tmp_path):
    (tmp_path / "tests.json").write_text(json.dumps({"style": "call", "cases": []}))
    (tmp_path / "prog.py").write_text("x = 1")
    out = _cli(str(tmp_path / "tests.json"), str(tmp_path / "prog.py"))
    assert out.returncode == 2 and "fn_name" in out.stderr and "tests.json" in out.stderr


# ---------------------------------------------------------------------------------------------- limits

SPIN = "def f(x):\n    while True:\n        pass\n"
SPIN_IN_DESCENDANT = ("import os, time\ndef f(x):\n    if os.fork() == 0:\n        while True:\n            pass\n"
                      "    time.sleep(10 ** 6)\n")


def test_cpu_time_limits_fire_first_and_count_descendants():
    """CPU limits far below the wall backstops: the CPU limit is what stops a busy program, including one
    whose CPU time is spent by a process it forked while it sleeps itself."""
    many = TestSpec("call", fn_name="f", cases=tuple({"args": [i], "expected": i} for i in range(8)))
    burn = "def f(x):\n    import time\n    t = time.process_time()\n    while time.process_time() - t < 0.3:\n" \
           "        pass\n    return x\n"
    with Executor(workers=1, cpu_time_per_test=0.5, cpu_time_per_program=1.0, timeout_per_test=20.0,
                  timeout_per_program=40.0) as e:
        spin, desc, prog = e.run_batch([(SPIN, CALL), (SPIN_IN_DESCENDANT, CALL), (burn, many)])
    for r, limit in ((spin, "cpu_time_per_test"), (desc, "cpu_time_per_test"), (prog, "cpu_time_per_program")):
        assert (r.outcome, r.timeout, r.limit, r.is_infra) == (Outcome.RUNTIME_ERROR, True, limit, False), r
        assert "CPU time limit exceeded" in r.error
    assert spin.cpu_time >= 0.5 and desc.cpu_time >= 0.5 and prog.cpu_time >= 1.0
    assert [t.status for t in prog.tests][:3] == ["passed"] * 3 and prog.tests[-1].status == "not_run"


def test_programs_that_sleep_or_block_are_stopped_by_the_wall_clock(ex):
    blocks = "import os\ndef f(x):\n    r, w = os.pipe()\n    os.read(r, 1)\n"
    for prog, spec in ((SLOW["call"], CALL), (blocks, CALL), ("import os\nr, w = os.pipe()\nos.read(r, 1)\n", STDIO),
                       ("import time\ntime.sleep(10 ** 6)\n", STDIO)):
        r = ex.run(prog, spec)
        assert (r.outcome, r.timeout, r.limit, r.is_infra) == \
            (Outcome.RUNTIME_ERROR, True, "timeout_per_test", False), (prog, r)


# ---------------------------------------------------------------------------------------------- infrastructure

def test_a_fork_that_fails_is_an_infrastructure_error_never_cached():
    with Executor(workers=1, fault="fork", infra_retries=2) as e:
        r = e.run(GOOD["call"], CALL)
        assert r.is_infra and r.outcome == Outcome.INFRA_ERROR and r.outcome.value not in OUTCOMES
        assert r.reward is None and not r.passed and "BlockingIOError" in r.infra_error
        assert r.attempts == 3 and e.infra_stats == {"retries": 2, "infra_results": 1}
        again = e.run(GOOD["call"], CALL)  # not cached: it runs (and fails) again
        assert again.is_infra and not again.cached and e.infra_stats["infra_results"] == 2
        e.seed_cache({cache_key(GOOD["call"], CALL): r})  # nor can the buffer bring it back
        assert not e.run(GOOD["call"], CALL).cached
        checked = e.run(GOOD["call"], LOOPED)  # the test process's fork fails the same way
        assert checked.is_infra and checked.attempts == 3
    d = r.to_json()
    assert d["outcome"] == "infra_error" and d["reward"] is None and d["infra_error"] == r.infra_error
    assert ExecResult.from_json(json.loads(json.dumps(d))).is_infra
    with Executor(workers=1, fault="fork", infra_retries=0) as e:
        assert e.run(GOOD["call"], CALL).attempts == 1 and e.infra_stats == {"infra_results": 1}


def test_a_starved_program_is_an_infrastructure_timeout():
    """`fault="starve"` makes the run-queue check say the program waited for a CPU all along."""
    with Executor(workers=1, fault="starve", timeout_per_test=0.5, infra_retries=1) as e:
        r = e.run(SLOW["call"], CALL)
        assert r.is_infra and r.limit == "timeout_per_test" and "not scheduled" in r.infra_error
        assert r.attempts == 2 and not e.run(SLOW["call"], CALL).cached
        assert e.run(GOOD["call"], CALL).outcome == Outcome.PASSED  # no backstop fired: a verdict


def _kill_when_running(e: Executor, target: str, times: int) -> threading.Thread:
    """Kill (SIGKILL, from outside) the worker, or the program's process, once a job is running in it;
    `times` times, each on a fresh worker."""
    def run():
        killed: set[int] = set()
        while len(killed) < times:
            for top in list(e.worker_pids):
                if top in killed:
                    continue
                try:
                    tree = psutil.Process(top).children(recursive=True)
                except psutil.NoSuchProcess:
                    continue
                programs = [p for p in tree if p.ppid() != top and p.ppid() != os.getpid()]
                if programs and all(p.status() == psutil.STATUS_SLEEPING for p in programs):
                    victim = top if target == "worker" else programs[-1].pid
                    try:
                        os.kill(victim, signal.SIGKILL)
                    except ProcessLookupError:
                        continue
                    killed.add(top)
            time.sleep(0.01)
    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


NAPS = "import time\ndef f(x):\n    time.sleep(0.5)\n    return x + 1\n"


@pytest.mark.parametrize("target", ["worker", "program"])
def test_a_kill_from_outside_is_retried_on_a_fresh_worker(target):
    with Executor(workers=1, infra_retries=2) as e:
        first = e.worker_pids
        killer = _kill_when_running(e, target, 1)
        e.isolation  # start the worker, so the killer sees it
        r = e.run(NAPS, CALL)
        killer.join(timeout=30)
        assert not killer.is_alive()
        assert (r.outcome, r.attempts, r.is_infra) == (Outcome.PASSED, 2, False), r
        assert e.infra_stats == {"retries": 1} and e.worker_pids != first


def test_a_kill_on_every_fresh_worker_is_the_programs_runtime_error():
    with Executor(workers=1, infra_retries=1) as e:
        e.isolation
        killer = _kill_when_running(e, "program", 2)
        r = e.run(NAPS, CALL)
        killer.join(timeout=30)
        assert (r.outcome, r.attempts, r.is_infra) == (Outcome.RUNTIME_ERROR, 2, False), r
        assert "killed by signal 9" in r.error
