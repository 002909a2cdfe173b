"""End to end, CI-sized: the real loop (warm start, human seed, rollout actors, targets via Ray Data, stage φ and
stage θ as TorchTrainer runs with 2 CPU workers, held-out evaluation, table) on experiments/configs/ci_tiny.yaml,
with a rollout actor that dies once right after writing its batch: its task is redone with no duplicate rows."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parent.parent
CI_CONFIG = REPO / "experiments" / "configs" / "ci_tiny.yaml"


def make_crashing_worker(marker: Path):
    from bcoder_ray.rollout import PolicyWorker

    class CrashAfterFirstWrite(PolicyWorker):
        """Dies (hard exit, as a killed process would) after its first buffer write, before replying."""

        def _after_write(self, task):
            if not marker.exists():
                marker.write_text(task.key)
                os._exit(1)

    return CrashAfterFirstWrite


@pytest.fixture(scope="module")
def ray_local():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the test's worker class travels by value
    ray.init(num_cpus=2, object_store_memory=200 * 1024 ** 2, include_dashboard=False)
    yield
    ray.shutdown()


def read_samples(buffer_dir: Path):
    import pyarrow.dataset as ds

    return ds.dataset(str(buffer_dir / "samples"), format="parquet").to_table(
        columns=["sample_id", "source", "iteration", "policy_version", "split", "program_ids"])


def test_tiny_run_end_to_end_with_an_actor_crash(ray_local, tmp_path):
    from bcoder_ray.driver import prepare_run, run

    run_dir = tmp_path / "run"
    marker = tmp_path / "crashed"
    plan = prepare_run(config_path=str(CI_CONFIG), run_dir=str(run_dir), overrides=[
        "--model.warm_start.cache_dir", str(tmp_path / "warm")])
    summary = run(plan, worker_cls=make_crashing_worker(marker))
    cfg = plan.cfg
    state = summary.state

    assert marker.exists(), "the injected actor crash did not happen"
    assert state.completed_iterations == cfg.run.iterations == 2

    # the buffer: every human program once, every iteration's m samples per problem exactly once
    table = read_samples(run_dir / "buffer")
    ids = table.column("sample_id").to_pylist()
    assert len(ids) == len(set(ids)), "duplicate rows in the buffer"
    sources = table.column("source").to_pylist()
    n_train = cfg.suite.max_train_problems
    assert sources.count("human") == state.human_rows >= n_train
    assert sources.count("generated") == cfg.run.iterations * n_train * cfg.rollout.samples_per_problem
    assert set(table.column("split").to_pylist()) == {cfg.suite.train_split}  # held-out never feeds learners
    iterations = [i for i, s in zip(table.column("iteration").to_pylist(), sources) if s == "generated"]
    assert sorted(set(iterations)) == [0, 1]
    versions = {i: v for i, v, s in zip(table.column("iteration").to_pylist(),
                                        table.column("policy_version").to_pylist(), sources) if s == "generated"}
    assert versions == {0: "0", 1: "1"}  # iteration 0 samples θ_ckpt, iteration 1 the θ of iteration 0

    # checkpoints: φ trained once, θ continued; θ loads as a plain LM and as the Q model
    records = state.iterations
    assert "phi" in records[0] and "phi" not in records[1]
    assert records[0]["theta"]["checkpoint"] != records[1]["theta"]["checkpoint"] == state.theta
    from transformers import AutoModelForCausalLM

    from bcoder_ray.q_model import QModel

    AutoModelForCausalLM.from_pretrained(state.theta)
    q = QModel.create(state.theta_ckpt, parts=("theta", "phi"), theta_dir=state.theta, phi_dir=state.phi)
    assert q.theta is not None and q.phi is not None

    # evaluation and the final table
    assert state.baseline is not None and state.baseline["overall"]["n_problems"] == cfg.suite.max_eval_problems
    last = records[-1]["eval"]["overall"]
    assert last["n_candidates"] == cfg.suite.max_eval_problems * cfg.evaluation.samples_per_problem
    assert last["ranked_pass@k"]["1"] is not None
    table_md = (run_dir / "table.md").read_text()
    assert "ranked (last) vs unranked (warm start)" in table_md and "unranked (last) vs unranked" in table_md
    assert summary.table == table_md
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(x)["iteration"] for x in lines] == [0, 1]
    assert any(p.name.startswith("events.out.tfevents") for p in (run_dir / "tensorboard").iterdir())
    for rec in records:
        assert rec["theta"]["train_s"] > 0 and rec["targets_theta"] >= 0
