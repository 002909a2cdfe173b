"""Every registered algorithm (and a toy one registered from this folder) through the real loop, in-process:
one Ray instance, a warm start cached once, one iteration, Ray Train's local mode for the stages."""

from __future__ import annotations

import json
import os
import warnings

import pytest

import tests.toy_algorithm  # noqa: F401  (registers "toy_ce" as an outside algorithm would)
from bcoder_ray.algorithms import algorithm_class, algorithm_names

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ray_instance():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=2, object_store_memory=200 * 1024 ** 2, include_dashboard=False,
             runtime_env={"env_vars": {"PYTHONPATH": os.pathsep.join(
                 [os.path.dirname(os.path.dirname(os.path.abspath(__file__))), os.environ.get("PYTHONPATH", "")])}})
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def warm_cache(tmp_path_factory):
    return str(tmp_path_factory.mktemp("warm"))


def overrides(name: str, warm: str) -> list[str]:
    out = ["--algorithm.name", name, "--run.iterations", "1", "--run.progress", "false",
           "--run.tensorboard", "false", "--suite.validation_split", "null", "--suite.max_train_problems", "8",
           "--suite.max_eval_problems", "2", "--evaluation.samples_per_problem", "1", "--evaluation.ks", "[1]",
           "--evaluation.warm_start_baseline", "false", "--model.warm_start.cache_dir", warm]
    for stage in algorithm_class(name).stage_names:
        out += [f"--stages.{stage}.num_workers", "0", f"--stages.{stage}.steps", "2",
                f"--stages.{stage}.cpus_per_worker", "0.5", f"--stages.{stage}.batch_size_per_worker", "4"]
    return out


@pytest.mark.parametrize("name", algorithm_names())
def test_algorithm_runs_one_iteration_of_the_real_loop(name, ray_instance, warm_cache, tmp_path, capfd):
    from bcoder_ray.loop.driver import prepare_run, run
    from bcoder_ray.loop.run_folder import load_run

    imports = ["tests.toy_algorithm"] if name == "toy_ce" else []
    plan = prepare_run(config="ci_tiny", overrides=overrides(name, warm_cache), run_dir=str(tmp_path / name),
                       imports=imports)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning, whatever filters pytest (setup.cfg) and Ray installed
        summary = run(plan)
    # a healthy run says nothing at error level (Ray prints this line, once per process, when it creates an actor
    # whose constructor arguments a restart could lose: ray-project/ray#53727) and uses no deprecated Ray option
    assert "has constructor arguments in the object store" not in capfd.readouterr().err
    assert not [w for w in caught if "exclude_resources" in str(w.message)]
    state = summary.state
    assert state.completed_iterations == 1 and state.programs_sampled > 0
    record = state.iterations[0]
    assert set(record["stages"]) <= set(algorithm_class(name).stage_names) and record["stages"]
    skipped = all(s.get("skipped") for s in record["stages"].values())  # ReST-EM with no passing sample
    assert (state.policy is None) == skipped  # None: θ_ckpt stays the published policy
    policy = state.policy or state.theta_ckpt
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(policy)  # the published policy loads as a plain LM
    assert state.final_test["overall"]["n_problems"] == 2
    ranked = state.final_test["overall"].get("ranked_pass@k") or {}
    has_ranker = load_run(tmp_path / name).algorithm().ranker(state.algorithm) is not None
    assert has_ranker == (name in ("bcoder", "bcoder_optimality", "dueling_dqn", "coderl"))  # R̃ / the critic
    assert (ranked.get("1") is not None) == has_ranker                 # ranked evaluation iff a ranker is published
    table = (tmp_path / name / "table.md").read_text()
    assert f": {name} on embedded" in table and "\n| 0 |" in table
    assert json.loads((tmp_path / name / "state.json").read_text())["algorithm"]
    # off-policy reuse: every row an optimiser step consumed is counted once (2 steps × 4 rows a stage)
    learned = [s for s in record["stages"].values() if not s.get("skipped")]
    reuse = state.reuse
    assert reuse["generated_reads"] + reuse["other_reads"] == 2 * 4 * len(learned)
    assert reuse["generated_rows"] == record["rollout"]["written"]


def test_list_algorithms_includes_an_outside_one_given_by_import():
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, str(repo / "experiments" / "run.py"), "--import", "tests.toy_algorithm",
                          "--list-algorithms"], capture_output=True, text=True, cwd=repo, check=True).stdout
    assert "toy_ce" in out.split() and "bcoder" in out.split()


def test_bcoder_with_the_whole_train_splits_human_programs(ray_instance, warm_cache, tmp_path):
    """`buffer.human_programs: train` (the embedded default): the warm start's problems' human programs are
    buffer rows too, labelled by execution like the loop's, while the rollout samples the loop's problems only."""
    from bcoder_ray.buffer import ReplayBuffer
    from bcoder_ray.loop.driver import prepare_run, run
    from envs.registry import load_suite

    extra = ["--buffer.human_programs", "train"]
    plan = prepare_run(config="ci_tiny", overrides=overrides("bcoder", warm_cache) + extra,
                       run_dir=str(tmp_path / "run"))
    state = run(plan).state
    train = load_suite("embedded", "train")
    loop = {p.problem_id for p in train[:8]}
    rows = ReplayBuffer(str(tmp_path / "run" / "buffer")).read(columns=["problem_id", "source", "outcome"])
    human = [r for r in rows.to_pylist() if r["source"] == "human"]
    assert state.human_rows == len(human) == sum(len(p.references) for p in train)
    assert {r["problem_id"] for r in human} == {p.problem_id for p in train}
    generated = {r["problem_id"] for r in rows.to_pylist() if r["source"] == "generated"}
    assert generated and generated <= loop


def test_bcoder_with_prioritized_replay_records_its_td_errors_and_reads_them(ray_instance, warm_cache, tmp_path):
    """`buffer.sampler.kind: fresh_prioritized` through the real loop: each stage's learner writes the |TD errors|
    of the generated rows it trained on to the buffer's priority side table (its own table per stage), the
    batches carry importance weights, and the data files are never rewritten."""
    import math

    from bcoder_ray.buffer import ReplayBuffer
    from bcoder_ray.loop.driver import prepare_run, run

    extra = ["--buffer.sampler.kind", "fresh_prioritized", "--buffer.sampler.refresh_batches", "1"]
    plan = prepare_run(config="ci_tiny", overrides=overrides("bcoder", warm_cache) + extra,
                       run_dir=str(tmp_path / "run"))
    state = run(plan).state
    assert state.completed_iterations == 1 and set(state.iterations[0]["stages"]) == {"phi", "theta"}
    buf = ReplayBuffer(str(tmp_path / "run" / "buffer"))
    rows = buf.read(columns=["sample_id", "source"]).to_pylist()
    generated = {r["sample_id"] for r in rows if r["source"] == "generated"}
    for stage in ("phi", "theta"):
        ids, values = buf.priorities(stage).read()
        # 2 steps × 4 rows, half of them generated (ρ_real 0.5), drawn with replacement: 1 to 4 distinct rows
        assert 1 <= len(ids) <= 4 and set(ids.to_pylist()) <= generated
        assert all(math.isfinite(v) and v >= 0 for v in values)
    assert len(list((tmp_path / "run" / "buffer" / "priorities" / "theta").iterdir())) == 1  # one report: 1 file
