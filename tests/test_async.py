"""`run.mode: async` end to end on ci_tiny, in-process: the actors sample while the persistent learner (φ on one
actor, θ on two under DDP over gloo) trains and publishes every 2 steps; evaluations run between rollout tasks.
The buffer must hold each landed task's rows exactly once, and the actors must have sampled with more than one
published policy."""

from __future__ import annotations

import collections
import json
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def waiting_worker(state_file: Path):
    """A policy actor whose second rollout task, once written, waits for the first published policy before it
    replies: its next task is then handed out with a newer policy, whatever the machine's load (the learner
    starts once the first task landed, so nothing deadlocks)."""
    from bcoder_ray.loop.rollout import PolicyWorker

    class WaitsForAPolicy(PolicyWorker):
        tasks_done = 0

        def _after_write(self, task):
            self.tasks_done += 1
            deadline = time.time() + 600
            while self.tasks_done == 2 and time.time() < deadline:
                if not json.loads(state_file.read_text())["policy_version"].endswith("/0"):
                    return
                time.sleep(0.2)

    return WaitsForAPolicy


def test_an_async_run_appends_every_row_once_while_the_policy_advances(ray_local, tmp_path):
    import pyarrow.dataset as ds

    from bcoder_ray.loop.driver import prepare_run, run
    from bcoder_ray.loop.rollout import iteration_slice, make_tasks
    from bcoder_ray.loop.run_folder import version_name

    run_dir = tmp_path / "run"
    # 4 tasks of 8 problems × 2 samples; the learner keeps training on them after the actors stop
    plan = prepare_run(config="ci_tiny", run_dir=str(run_dir), overrides=[
        "--run.mode", "async", "--run.publish_every", "2", "--run.tensorboard", "false",
        "--run.budget_programs", "64", "--evaluation.warm_start_baseline", "false",
        "--model.warm_start.cache_dir", str(tmp_path / "warm")])
    summary = run(plan, worker_cls=waiting_worker(run_dir / "state.json"))
    st, cfg = summary.state, plan.cfg
    assert st.completed_iterations == 2 and st.in_progress is None

    # θ publishes after steps 2 and 4 of each round (φ's checkpoint is no policy): 4 versions after θ_ckpt's
    assert st.policy_version == version_name(st.run_id, 4)
    assert st.policy == st.algorithm["theta"]
    assert [r["stages"].keys() for r in st.iterations] == [{"phi", "theta"}, {"theta"}]
    assert st.iterations[1]["stages"]["theta"]["model_kept"] == 1.0  # round 2's θ continued in memory

    rows = ds.dataset(str(run_dir / "buffer" / "samples"), format="parquet").to_table(
        columns=["sample_id", "source", "iteration", "problem_id", "policy_version", "run_id"]).to_pylist()
    generated = [r for r in rows if r["source"] == "generated"]
    assert len({r["sample_id"] for r in rows}) == len(rows)  # no row twice
    # every landed task's problems hold exactly m samples of its round, and nothing else was written
    m, per_task = cfg.rollout.samples_per_problem, cfg.rollout.problems_per_task
    expected = collections.Counter()
    landed = set(st.rollout_done)
    assert len(landed) == len(st.rollout_done)
    train = train_problem_ids(run_dir)
    for rnd in range(max(int(k.rsplit("-a", 1)[1].split("-")[0]) for k in landed) + 1):
        indices = iteration_slice(len(train), cfg.rollout.problems_per_iteration, rnd)
        for task in make_tasks(f"{st.run_id}-a{rnd}", indices, per_task, rnd, cfg.run.seed):
            if task.key in landed:
                for i in task.problem_indices:
                    expected[(rnd, train[i])] += m
    assert collections.Counter((r["iteration"], r["problem_id"]) for r in generated) == expected
    assert st.programs_sampled == len(generated) == 64
    # the actors picked up published policies between tasks
    versions = {r["policy_version"] for r in generated}
    assert versions <= {version_name(st.run_id, k) for k in range(5)}
    assert len(versions) >= 2, versions

    # evaluations ran beside the actors on published policies; the throughput is recorded
    assert all(r["eval"]["label"].startswith("policy-") for r in st.iterations)
    busy = st.iterations[0]["busy"]
    assert 0 < busy["actors_busy"] <= 1.0 + 1e-6 and 0 < busy["learner_busy"] <= 1.0 + 1e-6
    assert busy["optimizer_steps"] == 8  # φ's 4 and θ's 4
    assert "async mode, persistent learner" in summary.table
    assert json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])["busy"]["optimizer_steps"] == 4
    assert st.final_test["overall"]["n_problems"] == cfg.suite.max_eval_problems


def train_problem_ids(run_dir) -> list[str]:
    """The run's train problems' ids, in the order the actors index them."""
    import envs  # noqa: F401
    from envs.registry import load_suite

    from bcoder_ray.loop.run_folder import load_run

    cfg = load_run(run_dir).cfg
    return [p.problem_id for p in load_suite(cfg.suite.name, cfg.suite.train_split)[: cfg.suite.max_train_problems]]
