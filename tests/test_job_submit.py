"""`ray start --head` a real local cluster (own --temp-dir, free ports), `ray job submit` a tiny run to it, check
the run's result, and stop that cluster.

The cluster is stopped by ending the `ray start --head --block` process this test started (it takes down the
processes it launched). A bare `ray stop` is not used: it stops every Ray process on the machine, other users'
included."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.long]  # 2-2.5 min: CI's second step (setup.cfg)

REPO = Path(__file__).resolve().parent.parent
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for_dashboard(address: str, env: dict, proc: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.time() + timeout
    while time.time() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"ray start exited with {proc.returncode}")
        probe = subprocess.run([RAY, "job", "list", "--address", address], env=env, capture_output=True, text=True)
        if probe.returncode == 0:
            return
        time.sleep(2)
    raise TimeoutError(f"the Ray dashboard at {address} did not come up in {timeout}s")


def test_ray_job_submit_runs_the_loop(tmp_path):
    # a short temp dir: Ray's socket paths must stay under the 107-byte limit of AF_UNIX
    temp_dir = Path(tempfile.mkdtemp(prefix="rj-", dir="/tmp"))
    gcs_port, dash_port = free_port(), free_port()
    address = f"http://127.0.0.1:{dash_port}"
    env = dict(os.environ, RAY_AUTH_MODE="disabled")
    env.pop("RAY_ADDRESS", None)
    head = subprocess.Popen(
        [RAY, "start", "--head", "--block", f"--temp-dir={temp_dir}", f"--port={gcs_port}",
         "--num-cpus=2", f"--object-store-memory={200 * 1024 ** 2}", "--include-dashboard=true",
         "--dashboard-host=127.0.0.1", f"--dashboard-port={dash_port}", "--disable-usage-stats"],
        env=env, stdout=(tmp_path / "head.log").open("w"), stderr=subprocess.STDOUT, start_new_session=True)
    run_dir = tmp_path / "run"
    try:
        wait_for_dashboard(address, env, head)
        submit = subprocess.run(
            [RAY, "job", "submit", "--address", address, "--runtime-env", "runtime_env.yaml", "--",
             sys.executable, "experiments/run.py", "--config", "ci_tiny",
             "--run-dir", str(run_dir), "--run.iterations", "1",
             "--buffer.targets_via", "ray_data",  # the map_batches path (the e2e test covers the actor path)
             "--model.warm_start.cache_dir", str(tmp_path / "warm")],
            env=env, capture_output=True, text=True, timeout=540, cwd=REPO)  # the shipped runtime env
        assert submit.returncode == 0, submit.stdout[-4000:] + submit.stderr[-2000:]
        assert "succeeded" in submit.stdout.lower()
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)
    state = json.loads((run_dir / "state.json").read_text())
    assert state["completed_iterations"] == 1
    assert state["iterations"][0]["eval"]["overall"]["n_problems"] == 6
    assert state["final_test"]["overall"]["n_problems"] == 6
    assert "validation ranked pass@1" in (run_dir / "table.md").read_text()
    # the cluster this test started is gone: no process still names its temp dir
    import psutil

    time.sleep(2)
    left = []
    for p in psutil.process_iter(["cmdline"]):
        try:
            if any(str(temp_dir) in part for part in (p.info["cmdline"] or [])):
                left.append(p)
        except psutil.Error:
            pass
    for p in left:  # do not leave them behind even when failing
        p.kill()
    assert not left, f"processes of the test's cluster still running: {[p.pid for p in left]}"
