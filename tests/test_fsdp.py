"""FSDP against DDP: stage θ of B-Coder on a tiny encoder-decoder with CodeT5's dropout 0.1 (the frozen shared
encoder sharded beside θ's trained decoder; the dropout-free TD targets a second forward inside the sharded one),
two Ray Train workers over gloo, gradient accumulation and clipping; the same batches (and dropout draws) give the
same losses, gradient norms and trained weights under both, and FSDP's resumable checkpoints hold the whole
tensors. Marked `cluster` (two Ray Train runs of ~30 s
start-up each): `.ci/run` runs it as its second step."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file
from test_e2e_parts import seeded_buffer, tiny_t5_checkpoint

pytestmark = pytest.mark.cluster

STEPS = 4


@pytest.fixture(scope="module")
def ray_two_cpus():
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    ray.init(num_cpus=2, object_store_memory=200 * 1024 ** 2, include_dashboard=False)
    yield
    ray.shutdown()


def weights(folder: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(folder, "model.safetensors"))


def test_fsdp_stage_equals_ddp_stage(ray_two_cpus, tmp_path):
    import envs  # noqa: F401
    from envs.registry import load_suite
    from transformers import AutoTokenizer

    from bcoder_ray.algorithms import make_algorithm
    from bcoder_ray.algorithms.base import RunContext
    from bcoder_ray.loop.target_filling import AlgorithmRef, TargetJob, fill_targets
    from bcoder_ray.config import StageConfig
    from bcoder_ray.loop.learner import RESUME_FILE, ScalingSpec, StageJob, train_stage
    from bcoder_ray.model.tokenization import pad_id

    problems = load_suite("embedded", "train")[:6]
    ckpt = tiny_t5_checkpoint(tmp_path / "t5", problems, dropout=0.1)  # CodeT5's: θ's targets take a second pass
    buf = seeded_buffer(tmp_path / "buffer", ckpt, problems)
    pad = pad_id(AutoTokenizer.from_pretrained(ckpt))
    ctx = RunContext(theta_ckpt=ckpt, tokenizer_path=ckpt, source_len=64, target_len=24)
    algo = make_algorithm("bcoder", {"name": "bcoder"}, ctx)
    ref = AlgorithmRef("bcoder", algo.config, ctx)
    storage = str(tmp_path / "train")
    state: dict = {}

    def job(plan, **optim):
        settings = StageConfig(steps=STEPS, lr=1e-3, batch_size_per_worker=2, report_every=1, **optim)
        return StageJob("bcoder", algo.config, ctx, plan, settings, progress=False)

    phi_plan, theta_plan = algo.plan_iteration(0, state, "0")
    fill_targets(buf, TargetJob(ref, phi_plan.targets, pad, batch_size=4))
    phi_job = job(phi_plan, num_workers=0)
    phi = train_stage(phi_job, buf.ray_dataset(2, phi_job.batches_needed(0), targets_fingerprint=phi_plan.targets
                                               .fingerprint), ScalingSpec(num_workers=0),
                      storage_path=storage, name="phi")
    algo.after_stage(phi_plan, phi.checkpoint_dir, 0, state)
    theta_plan = algo.prepare_stage(theta_plan, state)
    fingerprint = theta_plan.targets.fingerprint
    fill_targets(buf, TargetJob(ref, theta_plan.targets, pad, batch_size=4))

    results = {}
    for parallel in ("ddp", "fsdp"):
        theta_job = job(theta_plan, num_workers=2, cpus_per_worker=0.5, grad_accum=2, grad_clip=0.5,
                        parallel=parallel, checkpoint_every=2)  # a resumable checkpoint mid-stage and at its end
        dataset = buf.ray_dataset(2, theta_job.batches_needed(2), targets_fingerprint=fingerprint, num_cpus=0.25)
        results[parallel] = train_stage(theta_job, dataset, ScalingSpec(num_workers=2, cpus_per_worker=0.5),
                                        storage_path=storage, name=f"theta-{parallel}")
    ddp, fsdp = results["ddp"], results["fsdp"]
    assert [h["step"] for h in fsdp.history] == [h["step"] for h in ddp.history] == list(range(1, STEPS + 1))
    for key in ("loss", "l_q", "l_adv", "l_ce", "grad_norm"):
        # the same batches and float32 weights: only the order of the gradient sums differs (all-reduce vs
        # reduce-scatter), a few float32 ulps, which the later steps' losses carry at about that size
        torch.testing.assert_close([h[key] for h in fsdp.history], [h[key] for h in ddp.history],
                                   rtol=1e-4, atol=1e-6, msg=key)
    assert ddp.history[0]["grad_norm"] > 0.5  # clipping acted, under both

    resume = torch.load(os.path.join(fsdp.checkpoint_dir, RESUME_FILE), weights_only=False)
    assert resume["step"] == STEPS and all(  # the gathered state: whole tensors, as DDP's
        tuple(x.shape) == tuple(y.shape) for x, y in zip(resume["state"], torch.load(
            os.path.join(ddp.checkpoint_dir, RESUME_FILE), weights_only=False)["state"]) if torch.is_tensor(x))
    start, a, b = weights(ckpt), weights(ddp.checkpoint_dir), weights(fsdp.checkpoint_dir)
    assert a.keys() == b.keys()
    moved = sum((a[k] - start[k]).pow(2).sum() for k in a if k in start).sqrt()
    apart = sum((a[k] - b[k]).pow(2).sum() for k in a).sqrt()
    worst = max(abs(f[k] - d[k]) / max(abs(d[k]), 1e-12) for f, d in zip(fsdp.history, ddp.history)
                for k in ("loss", "grad_norm"))
    print(f"FSDP vs DDP: largest relative difference of a loss or gradient norm {worst:.2e}; weights apart "
          f"{float(apart):.3e}, moved by training {float(moved):.3e} (ratio {float(apart / moved):.2e})")
    assert moved > 0
    # trained weights: the two runs differ by a small fraction of how far training moved them
    assert apart <= 1e-3 * moved, (float(apart), float(moved))
