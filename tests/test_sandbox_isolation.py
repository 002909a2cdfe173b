"""Isolation of the sandbox against a program that attacks the harness's channel, other executors' programs
or the host (issue 28: items 3, 4, 5, 7, 8). Each test names the class it guards."""

from __future__ import annotations

import pytest

from envs.execute import Executor
from envs.problem import TestSpec

CALL = TestSpec("call", fn_name="f", cases=({"args": [1], "expected": 2}, {"args": [5], "expected": 6}))

# A program that spins past its per-test CPU limit while writing well-formed frames to every descriptor it
# holds (the harness's report pipe among them), hoping each frame restarts its per-test clock. FRAME is the
# JSON text of the frame it forges; {i} is the index of the test being run.
_FORGER = '''
import json, os, struct, time
calls = [0]
def _forge(i):
    data = ({frame!r}).replace("I", str(i)).encode()
    for fd in range(3, 64):
        try:
            os.write(fd, struct.pack(">I", len(data)) + data)
        except OSError:
            pass
def f(x):
    i = calls[0]
    calls[0] += 1
    t0 = last = time.process_time()
    while time.process_time() - t0 < 3.0:
        if time.process_time() - last > 0.2:
            _forge(i)
            last = time.process_time()
    return x + 1
'''


@pytest.mark.parametrize("frame", ['{"k":"tick"}', '{"k":"vals","i":I,"v":[0]}', '{"k":"loaded"}'])
def test_frames_the_program_writes_never_restart_its_clock(frame):
    """Item 3: a test that spins for 3 s of CPU against a limit of 0.6 s gets no pass and no more time, whatever
    frames the program writes on the report pipe it shares a process with: a frame that is not the harness's
    next step stops it at once; one that is (a forged answer for the test it runs) commits that answer."""
    with Executor(workers=1, cpu_time_per_test=0.6, cpu_time_per_program=20.0, timeout_per_test=30.0,
                  timeout_per_program=60.0) as ex:
        res = ex.run(_FORGER.format(frame=frame), CALL)
    assert not res.passed and not res.is_infra, res
    assert res.cpu_time < 1.5, (res.cpu_time, res.limit, res.error)  # the 0.6 s clock was restarted once at most
