"""End to end, CI-sized, on the shipped ci_tiny config: the real loop (warm start, human seed, rollout
actors, cached targets, stage φ and stage θ as TorchTrainer runs with 2 CPU workers, held-out evaluation, final
table), interrupted and resumed:

1. `python experiments/run.py` is killed (SIGKILL of its whole session, Ray included) in the middle of its
   second iteration, after that iteration's first rollout batch reached the buffer;
2. the run is resumed (`--resume RUN_DIR` semantics, in this process) with a rollout actor that dies once
   right after writing a batch, before replying: its task is redone;
3. the finished run holds every human program once and exactly m samples per training problem per iteration
   (no row lost or duplicated), φ trained once, θ continued, checkpoints that load, metrics, TensorBoard
   scalars and the final table.

One test, so the suite pays for one tiny run instead of three."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest
from driver_process import kill_session, start_driver

pytestmark = pytest.mark.slow

CI_CONFIG = "ci_tiny"


def batch_written(buffer_dir: Path, batch_key: str) -> bool:
    from bcoder_ray.buffer import part_name

    return (buffer_dir / "samples" / part_name(batch_key)).exists()


def make_crashing_worker(marker: Path):
    from bcoder_ray.loop.rollout import PolicyWorker

    class CrashAfterFirstWrite(PolicyWorker):
        """Dies (hard exit, as a killed process would) once its first task's rows are in the buffer, before
        replying: written now, or found there (the task that landed before the driver was killed, which a resumed
        run counts from the buffer instead of sampling it again). Ray restarts it and retries the call."""

        def rollout(self, task, *args, **kwargs):
            reply = super().rollout(task, *args, **kwargs)
            if not marker.exists():
                marker.write_text(task.key)
                os._exit(1)
            return reply

    return CrashAfterFirstWrite


def kill_in_second_iteration(run_dir: Path, tmp_path: Path, overrides: list[str]) -> None:
    log = tmp_path / "first.log"
    first = start_driver(["--config", CI_CONFIG, "--run-dir", str(run_dir), *overrides], log)
    state_file = run_dir / "state.json"
    deadline = time.time() + 600
    try:
        while time.time() < deadline:
            if first.poll() is not None:
                pytest.fail(f"the driver ended before it was killed:\n{log.read_text()[-3000:]}")
            state = json.loads(state_file.read_text()) if state_file.exists() else {}
            if state.get("completed_iterations") == 1 \
                    and batch_written(run_dir / "buffer", f"{state['run_id']}-it1-t0000"):
                break
            time.sleep(0.5)
        else:
            pytest.fail(f"iteration 1 never wrote rows:\n{log.read_text()[-3000:]}")
    finally:
        kill_session(first)


def read_samples(buffer_dir: Path):
    import pyarrow.dataset as ds

    return ds.dataset(str(buffer_dir / "samples"), format="parquet").to_table(
        columns=["sample_id", "source", "iteration", "policy_version", "split"])


@pytest.mark.long  # about two minutes: CI's second step runs it (-m "cluster or long")
def test_tiny_run_killed_resumed_and_checked(tmp_path):
    run_dir = tmp_path / "run"
    kill_in_second_iteration(run_dir, tmp_path, ["--model.warm_start.cache_dir", str(tmp_path / "warm")])
    state = json.loads((run_dir / "state.json").read_text())
    assert state["completed_iterations"] == 1  # killed inside iteration 1
    theta_before = state["algorithm"]["theta"]

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray.cloudpickle

    from bcoder_ray.loop.driver import prepare_run, run

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test's worker class travels by value
    marker = tmp_path / "actor-crashed"
    plan = prepare_run(resume=str(run_dir))
    summary = run(plan, worker_cls=make_crashing_worker(marker))
    cfg, state = plan.cfg, summary.state
    assert marker.exists(), "the injected actor crash did not happen"
    assert state.completed_iterations == cfg.run.iterations == 2

    # the buffer: every human program once; every iteration's m samples per problem exactly once
    table = read_samples(run_dir / "buffer")
    ids = table.column("sample_id").to_pylist()
    assert len(ids) == len(set(ids)), "duplicate rows in the buffer"
    sources = table.column("source").to_pylist()
    n_train, m = cfg.suite.max_train_problems, cfg.rollout.samples_per_problem
    assert sources.count("human") == state.human_rows >= n_train
    generated = [(i, v) for i, v, s in zip(table.column("iteration").to_pylist(),
                                           table.column("policy_version").to_pylist(), sources) if s == "generated"]
    rid = state.run_id  # policy versions carry the run's id: unique in a buffer shared by runs
    assert sorted(generated) == [(0, f"{rid}/0")] * (n_train * m) + [(1, f"{rid}/1")] * (n_train * m)  # θ_ckpt, θ_0
    assert set(table.column("split").to_pylist()) == {cfg.suite.train_split}  # held-out rows never go there

    # φ trained once; θ continued from the checkpoint recorded before the kill; both load
    records = state.iterations
    assert [r["iteration"] for r in records] == [0, 1]
    assert set(records[0]["stages"]) == {"phi", "theta"} and set(records[1]["stages"]) == {"theta"}
    theta, phi = state.algorithm["theta"], state.algorithm["phi"]
    assert records[0]["stages"]["theta"]["checkpoint"] == theta_before != theta == \
        records[1]["stages"]["theta"]["checkpoint"]
    assert state.policy == theta and state.policy_version == f"{rid}/2"
    from transformers import AutoModelForCausalLM

    from bcoder_ray.algorithms.bcoder.q_model import QModel

    AutoModelForCausalLM.from_pretrained(theta)  # the published policy loads as a plain LM
    q = QModel.create(state.theta_ckpt, parts=("theta", "phi"), theta_dir=theta, phi_dir=phi)
    assert q.theta is not None and q.phi is not None

    # evaluation (validation during the run, the test split once at the end), metrics, TensorBoard, the table
    assert state.baseline["split"] == cfg.suite.validation_split and state.baseline_test["split"] == "test"
    assert state.baseline["overall"]["n_problems"] == cfg.suite.max_eval_problems
    last = records[-1]["eval"]
    assert last["split"] == cfg.suite.validation_split
    assert last["overall"]["n_candidates"] == cfg.suite.max_eval_problems * cfg.evaluation.samples_per_problem
    assert last["overall"]["ranked_pass@k"]["1"] is not None
    assert state.final_test["split"] == "test" and state.final_test["overall"]["ranked_pass@k"]["1"] is not None
    for rec in records:
        assert rec["stages"]["theta"]["train_s"] > 0 and rec["buffer_rows"] > 0
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines] == [0, 1]
    # staleness: the lag of every generated row a stage read behind the version the rollout sampled with; half of
    # each batch is generated (ρ_real 0.5): φ 4 steps × 8 rows, θ 4 steps × 8 rows × 2 workers
    lags = [{label: s["staleness"] for label, s in json.loads(x)["stages"].items()} for x in lines]
    assert lags[0]["phi"]["counts"] == {"0": 4 * 8 // 2} and lags[0]["theta"]["counts"] == {"0": 4 * 8 * 2 // 2}
    assert lags[1]["theta"]["rows"] == 4 * 8 * 2 // 2 and set(lags[1]["theta"]["counts"]) <= {"0", "1"}
    assert lags[0]["theta"]["unknown"] == lags[1]["theta"]["unknown"] == 0
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run_dir / "tensorboard"))  # the driver's scalars (iteration 0's may be lost
    events.Reload()                                           # with the killed driver's unflushed writer)
    assert 1 in [e.step for e in events.Scalars("staleness/theta/mean")]
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "tensorboard").iterdir())
    for stage in ("phi", "theta"):  # streamed by rank 0 while each stage ran
        assert list((run_dir / "tensorboard" / stage).glob("events.out.tfevents*")), stage
    table_md = (run_dir / "table.md").read_text()
    assert summary.table == table_md
    assert "ranked (last) vs unranked (warm start)" in table_md and "unranked (last) vs unranked" in table_md
    assert "lag read (mean / p90 / max)" in table_md and "| 0.00 / 0 / 0 |" in table_md  # iteration 0: all lag 0
