"""The persistent learner (`bcoder_ray.loop.learner_group`) against the per-stage Ray Train learner: the same
parameters after the same steps on the same batches, across two iterations of a stage that continues from its
own checkpoint (kept in memory by the persistent learner, reloaded by the per-stage one)."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file
from test_e2e_parts import seeded_buffer, tiny_t5_checkpoint


def _tensors(folder) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("**/*.safetensors")):
        out.update({f"{path.relative_to(folder)}:{k}": v for k, v in load_file(str(path)).items()})
    assert out, f"no weights saved under {folder}"
    return out


def test_the_persistent_learner_keeps_its_module_and_trains_it_as_the_per_stage_learner_does(ray_local, tmp_path):
    import envs  # noqa: F401
    from envs.registry import load_suite

    from bcoder_ray.algorithms import make_algorithm
    from bcoder_ray.algorithms.base import RunContext
    from bcoder_ray.config import StageConfig
    from bcoder_ray.loop.learner import ScalingSpec, StageJob, train_stage
    from bcoder_ray.loop.learner_group import LearnerGroup

    problems = load_suite("embedded", "train")[:6]
    ckpt = tiny_t5_checkpoint(tmp_path / "t5", problems)
    buf = seeded_buffer(tmp_path / "buffer", ckpt, problems)
    ctx = RunContext(theta_ckpt=ckpt, tokenizer_path=ckpt, source_len=64, target_len=24)
    # dueling DQN: stage θ alone, no cached targets, continuing from the previous θ every iteration
    algo = make_algorithm("dueling_dqn", {"name": "dueling_dqn"}, ctx)
    optim = StageConfig(steps=3, lr=1e-3, schedule="linear", batch_size_per_worker=4, grad_accum=2,
                        report_every=1, num_workers=0, cpus_per_worker=1)

    def two_iterations(run) -> list:
        state: dict = {}
        results = []
        for it in range(2):
            (plan,) = algo.plan_iteration(it, state, "0")
            assert plan.name == "theta" and plan.targets is None
            job = StageJob("dueling_dqn", algo.config, ctx, plan, optim, seed=7 + it, progress=False)
            # one read task: the same batches in the same order whoever reads them (Ray Train's local mode
            # does not keep the order of several read tasks' blocks)
            dataset = buf.ray_dataset(4, job.batches_needed(1), rho_real=0.5, seed=100 + it, parallelism=1)
            result = run(job, dataset, f"theta-iter{it}")
            algo.after_stage(plan, result.checkpoint_dir, it, state)
            results.append(result)
        return results

    per_stage = two_iterations(lambda job, data, name: train_stage(
        job, data, ScalingSpec(num_workers=0), storage_path=str(tmp_path / "per_stage"), name=name))
    group = LearnerGroup("theta", ScalingSpec(num_workers=0, cpus_per_worker=1))
    try:
        persistent = two_iterations(lambda job, data, name: group.run_stage(
            job, data, storage_path=str(tmp_path / "persistent"), name=name))
    finally:
        group.shutdown()

    # built once, then kept: the second iteration continues from the checkpoint the group itself saved
    assert [r.metrics["model_kept"] for r in persistent] == [0.0, 1.0]
    for a, b in zip(per_stage, persistent):
        assert [h["step"] for h in a.history] == [h["step"] for h in b.history] == [1, 2, 3]
        # the same code on the same batches, seeds and thread count: equal to the last bit, not approximately
        assert [h["loss"] for h in a.history] == [h["loss"] for h in b.history]
        assert [h["lr"] for h in a.history] == [h["lr"] for h in b.history]
    from pathlib import Path

    final_a, final_b = _tensors(Path(per_stage[1].checkpoint_dir)), _tensors(Path(persistent[1].checkpoint_dir))
    assert final_a.keys() == final_b.keys()
    start = _tensors(Path(per_stage[0].checkpoint_dir))
    assert any(not torch.equal(start[k], final_a[k]) for k in start)  # the second iteration did train
    for k in final_a:
        assert torch.equal(final_a[k], final_b[k]), k


def test_a_stage_that_does_not_continue_from_the_groups_checkpoint_is_built_again(tmp_path):
    """`resumes_from` decides: B-Coder's φ (built from θ_ckpt each time) is never kept; θ continues from θ."""
    from learner_fixtures import tiny_context

    from bcoder_ray.algorithms import make_algorithm

    algo = make_algorithm("bcoder", {"name": "bcoder", "theta_continue": True}, tiny_context(tmp_path))
    phi, theta = algo.plan_iteration(0, {}, "0")
    assert algo.resumes_from(phi) is None and algo.resumes_from(theta) is None  # θ starts from θ_ckpt
    (theta1,) = algo.plan_iteration(1, {"phi": "/p", "theta": "/t0"}, "1")
    assert algo.resumes_from(theta1) == "/t0"
    restart = make_algorithm("bcoder", {"name": "bcoder", "theta_continue": False}, algo.ctx)
    assert restart.resumes_from(restart.plan_iteration(1, {"phi": "/p", "theta": "/t0"}, "1")[0]) is None


def test_a_sampler_source_reopened_on_a_kept_buffer_reads_only_the_new_files_footers_and_sees_their_rows(tmp_path):
    """Async mode opens a `SamplerSource` per chunk of steps on the learner's kept `ReplayBuffer`: the rows
    appended since the last chunk are drawn, and only their file's footer is read."""
    import numpy as np

    from bcoder_ray.buffer import Filters, ReplayBuffer, part_name
    from bcoder_ray.buffer.synthetic import synthetic_prompts, synthetic_rows
    from bcoder_ray.loop.learner_group import LearnerWorker, SamplerSource

    rng = np.random.default_rng(0)
    writer = ReplayBuffer(str(tmp_path / "buf"))  # the actors' side
    writer.put_prompts(synthetic_prompts(rng, 5, mean_tokens=6, max_tokens=12))

    def append(part: int) -> None:
        writer.append(synthetic_rows(rng, 6, start=6 * part, n_problems=5, mean_tokens=5, max_tokens=9), f"p{part}")

    for part in range(3):
        append(part)
    worker = LearnerWorker.__new__(LearnerWorker)  # its buffer only: no process group, no module
    worker._buffer = None
    kept = worker.replay_buffer(writer.uri)  # the learner's side: every footer validated once, here
    assert worker.replay_buffer(writer.uri) is kept
    footers = []
    store_footer = kept.store.footer
    kept.store.footer = lambda path, required: footers.append(path) or store_footer(path, required)

    def drawn_ids(rows: int) -> set:  # one batch of every row present: the shuffle window holds them all
        source = SamplerSource(kept.uri, rows, None, Filters(), seed=1, extra_columns=("sample_id",))
        return set(next(source.open(0, kept))["sample_id"].to_pylist())

    assert len(drawn_ids(18)) == 18 and footers == []
    append(3)
    assert drawn_ids(24) == set(writer.read(columns=["sample_id"])["sample_id"].to_pylist())
    assert [f.rpartition("/")[2] for f in footers] == [part_name("p3")]


@pytest.mark.parametrize("name", ["ppo", "grpo"])
def test_on_policy_algorithms_are_refused_in_async_mode(name):
    from bcoder_ray.config import ConfigError, load_config

    with pytest.raises(ConfigError, match=f"run.mode: async: algorithm '{name}'"):
        load_config("ci_tiny", ["--algorithm.name", name, "--run.mode", "async"])
    for ok in ("bcoder", "bcoder_optimality", "dueling_dqn", "sft"):
        assert load_config("ci_tiny", ["--algorithm.name", ok, "--run.mode", "async"]).run.learner_kind() == \
            "persistent"
    with pytest.raises(ConfigError, match="learner: per_stage runs in mode: sync only"):
        load_config("ci_tiny", ["--run.mode", "async", "--run.learner", "per_stage"])
    with pytest.raises(ConfigError, match="keeps no mid-stage checkpoints"):
        load_config("ci_tiny", ["--run.learner", "persistent", "--stages.theta.checkpoint_every", "2"])
    # the async loop's persistent learner writes resumable checkpoints (bcoder_ray.loop.async_driver)
    assert load_config("ci_tiny", ["--run.mode", "async", "--stages.theta.checkpoint_every", "2"]) \
        .stage("theta").checkpoint_every == 2


def test_a_persistent_learner_continued_from_its_resumable_checkpoint_ends_as_the_uninterrupted_one(tmp_path):
    """`LearnerWorker.save_resumable` then `begin(job, resume_from)` in a new worker (as the async loop does after a
    learner died, or after `--resume`): the same parameters as the run that never stopped, bit for bit, when the
    chunk after the checkpoint reads the sampler its step seeds."""
    import envs  # noqa: F401
    from envs.registry import load_suite

    from bcoder_ray.algorithms import make_algorithm
    from bcoder_ray.algorithms.base import RunContext
    from bcoder_ray.config import StageConfig
    from bcoder_ray.loop.learner import StageJob
    from bcoder_ray.loop.learner_group import LearnerWorker, SamplerSource

    problems = load_suite("embedded", "train")[:6]
    ckpt = tiny_t5_checkpoint(tmp_path / "t5", problems)
    seeded_buffer(tmp_path / "buffer", ckpt, problems)
    ctx = RunContext(theta_ckpt=ckpt, tokenizer_path=ckpt, source_len=64, target_len=24)
    algo = make_algorithm("dueling_dqn", {"name": "dueling_dqn"}, ctx)
    (plan,) = algo.plan_iteration(0, {}, "0")
    optim = StageConfig(steps=4, lr=1e-3, schedule="linear", batch_size_per_worker=4, report_every=1, num_workers=0,
                        cpus_per_worker=1)
    job = StageJob("dueling_dqn", algo.config, ctx, plan, optim, seed=7, progress=False)

    def chunk(worker: LearnerWorker, done: int) -> dict:  # as the async loop: a sampler seeded by the step
        source = SamplerSource(str(tmp_path / "buffer"), 4, 0.5, plan.rows.filters, seed=100 + done,
                               extra_columns=("sample_id",))
        return worker.train(2, source)

    def params(worker: LearnerWorker) -> list[torch.Tensor]:
        return [p.detach().clone() for p in worker.trainer.params]

    through = LearnerWorker(0, 1, 1, False)
    through.begin(job)
    chunk(through, 0)
    after_two = params(through)
    chunk(through, 2)

    first = LearnerWorker(0, 1, 1, False)
    first.begin(job)
    chunk(first, 0)
    folder = first.save_resumable(str(tmp_path / "resume-000002"))
    continued = LearnerWorker(0, 1, 1, False)  # a new process's worker: the module built again from θ_ckpt
    info = continued.begin(job, resume_from=folder)
    assert info["step"] == 2 and [h["step"] for h in info["history"]] == [1, 2]
    assert all(torch.equal(a, b) for a, b in zip(params(continued), after_two))
    chunk(continued, 2)
    assert continued.step == through.step == 4
    assert [h["loss"] for h in continued.history] == [h["loss"] for h in through.history]
    assert [h["lr"] for h in continued.history] == [h["lr"] for h in through.history]  # the schedule went on
    assert any(not torch.equal(a, b) for a, b in zip(params(through), after_two))  # the last chunk did train
    for a, b in zip(params(continued), params(through)):
        assert torch.equal(a, b)
