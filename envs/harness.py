"""Runs one program's tests inside its isolated child process and reports raw observations, never verdicts
it could forge: stdout bytes and exit statuses (stdio), the values that calls return (call, and the call
sides of assert/check lines the parent judges). Tests whose shape the parent cannot split into such calls run
in a separate *test process* (`run_test_process`), never in the program's: there the program's names are
proxies, and the program's process only serves their calls (`_serve`), one plain value at a time.

Stdlib only; loaded by path inside the sandbox worker (see `envs/sandbox_zygote.py`), next to
`harness_wire.py`. The payload the program's process receives never contains an expected value or any
text of a test run in the test process (see `envs/harness_plan.py`).

Conventions of the APPS harness followed here (the comparison rules are in `envs/compare.py`):
- stdio programs whose top level contains `return` (a SyntaxError "'return' outside function") are run
  wrapped in a function, as APPS does (three references of APPS problem 2287 need this). The wrapping is
  done on the syntax tree, so string literals and indentation are untouched.
- call-style programs run with the usual starter-code names already defined (`List`, `Optional`,
  `collections`, `heapq`, ...: `CALL_PRELUDE`), and with `class Solution` looked up first (LeetCode).

Frames sent on `wfd` (program's process -> worker), in order:
    {"k": "compile_error", "e": msg}                      and nothing else, or
    {"k": "compiled"}                                     then
    {"k": "load_error", "e": msg}                         (the top level, setup code or lookup raised), or
    {"k": "loaded"}, then per test i (per check item i), unless the test process runs the tests:
      {"k": "vals", "i": i, "v": [value, ...]}            values of the planned call sides
      {"k": "raised", "i": i, "e": msg}                   evaluating them raised
      {"k": "unshippable", "i": i, "e": msg}              a value was not plain data
      {"k": "ran", "i": i, "rc": int, "sig": int, "out": b64, "over": bool, "err": tail, "timeout": bool}
    {"k": "done"}                                         the sentinel: anything missing means a crash.
Frames of the test process (test process -> worker): per test i {"k": "judged", "i": i, "ok": bool, "e": msg}
or {"k": "raised", "i": i, "e": msg}, a {"k": "tick"} after each call it made (restarts the per-test clocks),
then {"k": "done"}.
Requests of the test process to the program's process, and replies:
    {"op": "names", "names": [...]}  -> {"k": "names", "v": [[name, "callable" | "value" | "opaque", value]]}
                                        (only the plan's `names`: builtins and modules are the test process's)
    {"op": "call", "name": n, "args": [value...], "kwargs": [[key, value]...]}
                                     -> {"k": "vals", "v": [value]} | {"k": "raised", "e", "t"} | {"k": "unshippable", "e"}
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
# The builtins as they were before any program ran (this module is loaded when the worker starts): the
# names a test evaluates in the program's process resolve here, never to what the program rebinds.
_TRUSTED_BUILTINS = dict(builtins.__dict__)


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
    """Writes frames to the worker, which restarts its per-test clocks (CPU and wall) on each frame it
    receives. A frame that comes FLUSH_WINDOW or more after the previous one (it ends a test that took that
    long) goes out at once, with any held before it; the frames of quicker tests are held until FLUSH_WINDOW
    after the first of them, or until a slow one (fewer wake-ups of the worker). So a held frame is always
    from a quick test, and a slow test's clocks include at most about FLUSH_WINDOW of the quick tests before
    it. Frames still held when the program crashes or times out are lost: that only moves the reported
    failure to an earlier test, never changes the outcome."""

    FLUSH_WINDOW = 0.002

    def __init__(self, fd: int):
        self.fd, self.buf, self.since, self.last = fd, [], 0.0, time.monotonic()

    def __call__(self, obj: dict, flush: bool = False) -> None:
        now = time.monotonic()
        slow = now - self.last >= self.FLUSH_WINDOW
        self.last = now
        if not self.buf:
            self.since = now
        self.buf.append(wire.encode_frame(obj))
        if flush or slow or now - self.since >= self.FLUSH_WINDOW:
            self.flush()

    def flush(self) -> None:
        if self.buf:
            data = b"".join(self.buf)
            self.buf.clear()
            wire.write_all(self.fd, data)


def run_child(payload: dict, wfd: int, limits: dict, serve_fds: tuple[int, int] | None = None) -> None:
    """Entry point in the child; returns only by os._exit. `serve_fds` (requests in, replies out): the test
    process's channel, for plans that run their tests there."""
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
            _run_in_process(code, payload, send, serve_fds)
        send({"k": "done"}, flush=True)
    except BaseException:  # a harness failure (or a program that broke the harness): no sentinel
        pass
    os._exit(0)


# ---------------------------------------------------------------------------------------------- stdio

def _run_stdio(code: object, payload: dict, send, wfd: int, limits: dict) -> None:
    _become_subreaper()  # so that what one test leaves running is killed before the next test starts
    send({"k": "loaded"})
    cap = int(limits["max_output_bytes"])
    # The worker enforces the limits (CPU time across the process tree, and the wall-clock backstop) and
    # fires first; this clock only keeps one test from outliving a worker that failed to.
    per_test = float(limits["timeout_per_test"]) + 2.0
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

def _run_in_process(code, payload: dict, send, serve_fds: tuple[int, int] | None = None) -> None:
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
    if payload.get("serve"):
        send.flush()
        _serve(g, *serve_fds)
        return
    ns = _hole_namespace(g, payload)
    if style == "check":
        ns[payload.get("param", "candidate")] = _guard(fn)
    for stmt in payload.get("imports", ()):
        try:
            exec(compile(stmt, "<check>", "exec"), ns)
        except BaseException as e:
            send({"k": "raised", "i": 0, "e": _err(e)})
            return
    for i, item in enumerate(payload["items"]):
        codes = [compile(h, "<test>", "eval") for h in item["holes"]]
        _import_modules(ns, codes)
        _send_values(send, i, lambda codes=codes: [eval(c, ns) for c in codes])


class _ProgramRaised(BaseException):
    """The program's code raised while a test called it. A BaseException, so that no part of the test (an
    `except Exception`, or `map` and `all`, which take a StopIteration for the end of the data) can absorb
    it: it is the test's runtime error."""


def _guard(v: object) -> object:
    """`v` itself, or for a function of the program, a wrapper that turns its exceptions into _ProgramRaised."""
    if not callable(v) or isinstance(v, type):
        return v  # a class stays one (isinstance(x, C) in a test); its instances' methods are not wrapped

    def guarded(*args, **kwargs):
        try:
            return v(*args, **kwargs)
        except _ProgramRaised:
            raise
        except BaseException as e:
            raise _ProgramRaised(_err(e)) from None
    return guarded


def _hole_namespace(g: dict, payload: dict) -> dict:
    """Where the holes are evaluated: the program's names (`payload["names"]`, guarded), its other globals
    (inputs such as a setup's objects) except those that rebind a builtin, and the builtins as they were
    before the program ran."""
    ns = {k: v for k, v in g.items() if type(k) is str and k not in _TRUSTED_BUILTINS}
    for name in payload.get("names", ()):
        if name in g:
            ns[name] = _guard(g[name])
    ns["__builtins__"] = _TRUSTED_BUILTINS
    return ns


def _serve(g: dict, req_fd: int, rep_fd: int) -> None:
    """Answer the test process's requests with plain values until it closes its end."""
    while True:
        try:
            req = wire.read_frame(req_fd)
        except (OSError, ValueError):
            return
        if type(req) is not dict:
            return
        if req.get("op") == "names":
            out = []
            for name in req.get("names", ()):
                if name not in g:
                    continue
                v = g[name]
                if callable(v):
                    out.append([name, "callable", None])
                    continue
                try:
                    out.append([name, "value", wire.canonical(v)])
                except BaseException:
                    out.append([name, "opaque", None])
            reply = {"k": "names", "v": out}
        else:
            reply = _call_reply(g, req)
        try:
            wire.write_frame(rep_fd, reply)
        except OSError:
            return


def _call_reply(g: dict, req: dict) -> dict:
    try:
        fn = g[req["name"]]
        args = [wire.decode_value(a) for a in req["args"]]
        kwargs = {k: wire.decode_value(v) for k, v in req["kwargs"]}
    except BaseException as e:
        return {"k": "raised", "e": _err(e), "t": type(e).__name__}
    try:
        value = fn(*args, **kwargs)
    except BaseException as e:
        return {"k": "raised", "e": _err(e), "t": type(e).__name__}
    try:
        return {"k": "vals", "v": [wire.canonical(value)]}
    except wire.Unshippable as e:
        return {"k": "unshippable", "e": str(e)}
    except BaseException as e:  # a look-alike whose conversion raised
        return {"k": "unshippable", "e": _err(e)}


def _lookup_callable(g: dict, name: str):
    sol = g.get("Solution")
    if isinstance(sol, type) and hasattr(sol, name):
        return getattr(sol(), name)
    fn = g.get(name)
    if not callable(fn):
        raise NameError(f"function {name!r} is not defined")
    return fn


def _import_modules(ns: dict, codes: list) -> None:
    """Bind the standard-library modules the holes name (`f(math.pi)`) that the program did not import."""
    for code in codes:
        for name in code.co_names:
            if name not in ns and name in sys.stdlib_module_names:
                try:
                    ns[name] = _TRUSTED_BUILTINS["__import__"](name)
                except Exception:  # not importable here: the hole's NameError
                    pass


def _send_values(send, i: int, compute) -> None:
    try:
        values = compute()
    except _ProgramRaised as e:
        send({"k": "raised", "i": i, "e": str(e.args[0])})
        return
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


# ---------------------------------------------------------------------------------------------- test process

class _Unjudgeable(BaseException):
    """A value of the program that is not plain data (a BaseException, so a test's `except Exception` cannot
    swallow it)."""


class _ProgramGone(BaseException):
    """The program's process stopped answering."""


class _Opaque:
    """A global of the program that is not plain data: any use of it fails the test."""

    def __init__(self, name: str):
        object.__setattr__(self, "_name", name)

    def _fail(self, *a, **k):
        raise _Unjudgeable(f"the program's {object.__getattribute__(self, '_name')!r} is not plain data")

    __getattr__ = __call__ = __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __bool__ = __len__ = _fail
    __iter__ = __getitem__ = __contains__ = __add__ = __sub__ = __mul__ = __hash__ = _fail


class _Channel:
    """The test process's end of the program's process: a proxy call sends plain arguments, gets a plain value."""

    def __init__(self, req_fd: int, rep_fd: int, send):
        self.req_fd, self.rep_fd, self.send = req_fd, rep_fd, send

    def ask(self, request: dict) -> dict:
        try:
            wire.write_frame(self.req_fd, request)
            reply = wire.read_frame(self.rep_fd)
        except (OSError, ValueError, RecursionError):
            reply = None
        if type(reply) is not dict or type(reply.get("k")) is not str:
            raise _ProgramGone("the program's process stopped answering")
        return reply

    def proxy(self, name: str):
        def call(*args, **kwargs):
            try:
                request = {"op": "call", "name": name, "args": [wire.canonical(a) for a in args],
                           "kwargs": [[str(k), wire.canonical(v)] for k, v in kwargs.items()]}
            except wire.Unshippable as e:
                raise _Unjudgeable(f"an argument for the program's {name!r} is not plain data: {e}") from None
            reply = self.ask(request)
            self.send({"k": "tick"})
            k = reply["k"]
            if k == "vals" and type(reply.get("v")) is list and len(reply["v"]) == 1:
                try:
                    return wire.decode_value(reply["v"][0])
                except wire.TooCostly as e:
                    raise _ProgramRaised(f"the program's value is too costly to judge: {e}") from None
                except (wire.WireError, RecursionError) as e:
                    raise _ProgramGone(f"malformed value from the program's process: {e}") from None
            if k == "unshippable":
                raise _Unjudgeable(f"result cannot be judged: {reply.get('e')}")
            if k == "raised":  # never re-raised as itself: a StopIteration would end the test's `map`
                raise _ProgramRaised(str(reply.get("e", "error")))
            raise _ProgramGone(f"unexpected reply {k!r} from the program's process")
        call.__name__ = call.__qualname__ = name
        return call


def run_test_process(payload: dict, req_fd: int, rep_fd: int, wfd: int) -> None:
    """Entry point of the test process (a trusted process of the sandbox, never the program's): run the
    whole check, or every assert of the set, with the program's names bound to proxies; report one verdict
    per test on `wfd`. Returns only by os._exit."""
    send = _Sender(wfd)
    try:
        kind = payload["kind"]
        sources = [payload["check"]] if kind == "check" else list(payload["asserts"])
        chan = _Channel(req_fd, rep_fd, send)
        try:  # only the names the plan gives the program; builtins and modules are this process's own
            reply = chan.ask({"op": "names", "names": list(payload["names"])})
        except _ProgramGone:
            os._exit(0)  # the program did not load (its own frames say why) or crashed: no verdicts
        g: dict = {"__name__": "__main__", "__builtins__": builtins}
        for stmt in payload.get("imports", ()):
            try:
                exec(compile(stmt, "<test>", "exec"), g)
            except ImportError:
                pass  # the test's NameError, as where the program did not import it either
        for name, what, value in reply.get("v", ()):
            if name not in payload["names"]:
                continue
            if what == "callable":
                g[name] = chan.proxy(name)
            elif what == "value":
                g[name] = wire.decode_value(value)
            else:
                g[name] = _Opaque(name)
        if kind == "check":
            entry = payload["entry_point"]

            def run_check() -> None:
                exec(compile(payload["check"], "<check>", "exec"), g)
                g["check"](chan.proxy(entry))
            _judged(send, 0, run_check)
        else:
            for i, src in enumerate(sources):
                if not _judged(send, i, lambda src=src: exec(compile(src.strip(), "<test>", "exec"), g)):
                    break
        send({"k": "done"}, flush=True)
    except BaseException:  # no sentinel: the parent reports the test process's failure
        pass
    os._exit(0)


def _judged(send, i: int, run) -> bool:
    """Run one test; False when the program's process is gone (no verdict sent)."""
    try:
        run()
    except _ProgramGone:
        send.flush()
        return False
    except AssertionError as e:
        send({"k": "judged", "i": i, "ok": False, "e": _err(e)})
    except _Unjudgeable as e:
        send({"k": "judged", "i": i, "ok": False, "e": str(e)})
    except _ProgramRaised as e:
        send({"k": "raised", "i": i, "e": str(e.args[0])})
    except BaseException as e:
        send({"k": "raised", "i": i, "e": _err(e)})
    else:
        send({"k": "judged", "i": i, "ok": True})
    return True
