"""`experiments/run.py` as a separate process that a test can kill as a crash would (helper module, not a test
file)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def start_driver(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, str(REPO / "experiments" / "run.py"), *args], cwd=REPO, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the driver and every process of its session (the local Ray it started: Ray's workers sit in
    process groups of their own, but in the driver's session), as a machine crash would."""
    import psutil

    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)
    for p in psutil.process_iter():
        try:
            if os.getsid(p.pid) == proc.pid:
                p.kill()
        except (ProcessLookupError, PermissionError, psutil.Error):
            pass
