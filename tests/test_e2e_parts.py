"""The wiring's small parts, fast: task keys and seeds, iteration slices, the lr schedule, resume checks, and the
actor pool redoing a task whose actor died (with an idempotent store standing in for the buffer)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from bcoder_ray.config import ConfigError
from bcoder_ray.driver import CONFIG_FILE, RunState, prepare_run
from bcoder_ray.learner import learning_rate_factor
from bcoder_ray.rollout import ActorPool, ActorSettings, iteration_slice, make_tasks


def test_tasks_are_stable_and_cover_every_problem_once():
    a = make_tasks("it3", range(10), 4, iteration=3, seed=0)
    b = make_tasks("it3", range(10), 4, iteration=3, seed=0)
    assert a == b  # a redone iteration has the same keys and seeds
    assert [t.key for t in a] == ["it3-t0000", "it3-t0001", "it3-t0002"]
    assert sorted(i for t in a for i in t.problem_indices) == list(range(10))
    assert len({t.seed for t in a}) == 3
    assert make_tasks("it3", range(10), 4, 3, seed=1)[0].seed != a[0].seed


def test_iteration_slices_rotate_through_the_train_problems():
    assert iteration_slice(5, None, 2) == [0, 1, 2, 3, 4]
    assert iteration_slice(10, 4, 0) == [0, 1, 2, 3]
    assert iteration_slice(10, 4, 1) == [4, 5, 6, 7]
    assert iteration_slice(10, 4, 2) == [8, 9, 0, 1]


def test_learning_rate_schedules():
    assert [learning_rate_factor(s, 4, "constant", 0) for s in range(4)] == [1.0] * 4
    assert [learning_rate_factor(s, 4, "linear", 0) for s in range(4)] == [1.0, 0.75, 0.5, 0.25]
    assert learning_rate_factor(0, 10, "linear", 2) == 0.5 and learning_rate_factor(2, 10, "linear", 2) == 1.0
    with pytest.raises(ValueError, match="cosine"):
        learning_rate_factor(0, 4, "cosine", 0)


def test_prepare_run_refuses_to_reuse_or_redefine_a_run(tmp_path):
    plan = prepare_run(run_dir=str(tmp_path / "r"), overrides=["--run.iterations", "1"])
    assert plan.cfg.run.run_dir == str(tmp_path / "r") and not plan.resumed
    plan.run_dir.mkdir()
    (plan.run_dir / CONFIG_FILE).write_text(plan.cfg.to_yaml())
    RunState(completed_iterations=1).save(plan.run_dir)
    with pytest.raises(ConfigError, match="--resume"):
        prepare_run(run_dir=str(plan.run_dir))
    resumed = prepare_run(resume=str(plan.run_dir), overrides=["--run.iterations", "4"])
    assert resumed.resumed and resumed.cfg.run.iterations == 4
    with pytest.raises(ConfigError, match=r"theta\.lr"):
        prepare_run(resume=str(plan.run_dir), overrides=["--theta.lr", "1e-3"])
    with pytest.raises(ConfigError, match="not a run folder"):
        prepare_run(resume=str(tmp_path / "nothing"))
    with pytest.raises(ConfigError, match="unknown key"):
        prepare_run(run_dir=str(tmp_path / "x"), overrides=["--theta.nope", "1"])


class FlakyWorker:
    """Stands in for PolicyWorker: writes its task under the task's key (a file per key, written once, as the
    buffer's append does) and dies after its first write, before replying."""

    def __init__(self, args, executor_handles=None, actor_name=""):
        self.root = Path(args)

    def rollout(self, task):
        target = self.root / f"{task.key}.txt"
        if not target.exists():  # idempotent by key
            target.write_text(",".join(map(str, task.problem_indices)))
        marker = self.root / "died"
        if not marker.exists():
            marker.write_text(task.key)
            os._exit(1)
        return task.key


@pytest.fixture(scope="module")
def ray_local():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    ray.init(num_cpus=2, object_store_memory=200 * 1024 ** 2, include_dashboard=False)
    yield
    ray.shutdown()


def test_actor_pool_redoes_the_task_of_a_dead_actor(ray_local, tmp_path):
    pool = ActorPool(FlakyWorker, ActorSettings(num_actors=2, num_cpus=0.25, max_restarts=2, max_task_retries=2),
                     str(tmp_path))
    try:
        tasks = make_tasks("it0", range(6), 2, iteration=0, seed=0)
        seen = []
        results = pool.map("rollout", tasks, on_result=lambda t, r: seen.append(t.key))
    finally:
        pool.shutdown()
    assert results == [t.key for t in tasks]
    assert sorted(seen) == sorted(results)
    assert (tmp_path / "died").exists()
    written = sorted(p.name for p in tmp_path.glob("it0-*.txt"))
    assert written == [f"{t.key}.txt" for t in tasks]
