"""Kill the driver (`python experiments/run.py`) in the middle of its second iteration, then `--resume` it: the
run completes, and the buffer holds every row exactly once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
CI_CONFIG = REPO / "experiments" / "configs" / "ci_tiny.yaml"


def run_cmd(args: list[str], log: Path) -> subprocess.Popen:
    env = dict(os.environ, RAY_AUTH_MODE="disabled", PYTHONUNBUFFERED="1")
    env.pop("RAY_ADDRESS", None)
    return subprocess.Popen([sys.executable, str(REPO / "experiments" / "run.py"), *args], cwd=REPO, env=env,
                            stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def batch_written(buffer_dir: Path, batch_key: str) -> bool:
    from bcoder_ray.replay_buffer import part_name

    return (buffer_dir / "samples" / part_name(batch_key)).exists()


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL the driver's whole session (the driver and the local Ray it started), as a crash would."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=60)


def test_kill_mid_iteration_then_resume(tmp_path):
    run_dir = tmp_path / "run"
    common = ["--model.warm_start.cache_dir", str(tmp_path / "warm")]
    first = run_cmd(["--config", str(CI_CONFIG), "--run-dir", str(run_dir), *common], tmp_path / "first.log")
    state_file = run_dir / "state.json"
    deadline = time.time() + 480
    try:
        # wait until iteration 0 is recorded and iteration 1 has written rollout rows, then kill
        while time.time() < deadline:
            if first.poll() is not None:
                pytest.fail(f"the driver ended before it was killed:\n{(tmp_path / 'first.log').read_text()[-3000:]}")
            if state_file.exists():
                state = json.loads(state_file.read_text())
                if state["completed_iterations"] == 1 and batch_written(run_dir / "buffer", "it1-t0000"):
                    break
            time.sleep(0.5)
        else:
            pytest.fail("iteration 1 never started writing rows")
    finally:
        kill_group(first)
    state = json.loads(state_file.read_text())
    assert state["completed_iterations"] == 1  # killed inside iteration 1

    second = run_cmd(["--resume", str(run_dir)], tmp_path / "second.log")
    try:
        assert second.wait(timeout=480) == 0, (tmp_path / "second.log").read_text()[-3000:]
    finally:
        kill_group(second)

    state = json.loads(state_file.read_text())
    assert state["completed_iterations"] == 2
    assert [r["iteration"] for r in state["iterations"]] == [0, 1]
    import pyarrow.dataset as ds

    from bcoder_ray.config import load_config

    cfg = load_config(CI_CONFIG)
    table = ds.dataset(str(run_dir / "buffer" / "samples"), format="parquet").to_table(
        columns=["sample_id", "source", "iteration"])
    ids = table.column("sample_id").to_pylist()
    assert len(ids) == len(set(ids))
    generated = [i for i, s in zip(table.column("iteration").to_pylist(), table.column("source").to_pylist())
                 if s == "generated"]
    per_iteration = cfg.suite.max_train_problems * cfg.rollout.samples_per_problem
    assert sorted(generated) == [0] * per_iteration + [1] * per_iteration
    assert (run_dir / "table.md").exists()
