"""The real-model loop on a CUDA machine in a few minutes, and one table of what it measured.

    python experiments/gpu_check.py                      # every GPU present; vLLM actors when vllm is installed
    python experiments/gpu_check.py --engine torch       # the torch sampler even with vLLM installed
    python experiments/gpu_check.py --dry-run            # the run's overrides and resources, nothing run

It runs `configs/smollm2_mbpp.yaml` (SmolLM2-135M-Instruct on MBPP) with the GPU override set of
docs/real_model.md, sized for one 10-minute call on a single GPU: bf16 autocast in the learners, DDP over every
GPU present, the rollout actors on a GPU of their own share. Then it measures one stage-θ step and one CE step of
the same LM on the GPU in this process (the step times and the peak GPU memory of each), and prints one table:
programs and tokens sampled per second, θ and φ steps per second in the run, the in-process θ / CE step times and
peak memory, and validation pass@1 of θ_ckpt against the trained policy (the pass rate moved). Without CUDA it
refuses with exit status 2 before loading anything.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # without an install too

CONFIG = "smollm2_mbpp"


def gpu_overrides(gpus: int, engine: str) -> list[str]:
    """docs/real_model.md's GPU override set, at the size of one short check."""
    per_stage = []
    for stage in ("phi", "theta"):
        per_stage += [f"--stages.{stage}.use_gpu", "true", f"--stages.{stage}.num_workers", str(gpus),
                      f"--stages.{stage}.gpus_per_worker", "0.5" if gpus == 1 else "1",
                      f"--stages.{stage}.cpus_per_worker", "2",
                      f"--stages.{stage}.mixed_precision", "bf16", f"--stages.{stage}.batch_size_per_worker", "16"]
    return [
        "--run.progress", "false",
        "--run.iterations", "2", "--suite.max_train_problems", "128", "--rollout.problems_per_iteration", "64",
        "--suite.max_eval_problems", "90", "--rollout.samples_per_problem", "8", "--rollout.prompts_per_call", "32",
        "--evaluation.prompts_per_call", "45", "--rollout.gpus_per_actor", "0.5", "--rollout.cpus_per_actor", "2",
        "--rollout.engine", engine, "--buffer.targets_gpus", "0.5", "--buffer.human_programs", "train",
        "--buffer.targets_batch_size", "64", "--stages.phi.steps", "40", "--stages.theta.steps", "60",
        *per_stage]


def step_times(checkpoint: str, batch_size: int = 16, repeats: int = 5) -> dict[str, float]:
    """One θ step (eq. 17, cached targets) and one CE step of the same LM on the GPU, bf16 autocast: median seconds
    and the peak GPU memory of each (the learner's own loss functions on the bench's random rows)."""
    import torch
    from transformers import AutoConfig

    from bcoder_ray.algorithms.bcoder.losses import theta_loss
    from bcoder_ray.algorithms.bcoder.q_model import QModel
    from experiments.bench_learner import (cached_targets_batch, ce_step, learner_step, make_examples, side_by_side,
                                           theta_learner)

    vocab = AutoConfig.from_pretrained(checkpoint).vocab_size
    examples = make_examples(batch_size, 256, 160, vocab, seed=0)
    frozen = QModel.create(checkpoint, parts=("ckpt", "phi"), device="cuda")
    batch = cached_targets_batch(frozen, examples, "cuda")
    del frozen
    torch.cuda.empty_cache()
    model, opt_q, opt_ce = theta_learner(checkpoint, "cuda")
    out: dict[str, float] = {}
    for name, fn in (("theta", lambda: learner_step(lambda m, b: theta_loss(m, b, gamma=0.999), model, batch, opt_q)),
                     ("ce", lambda: ce_step(model, batch, opt_ce))):
        torch.cuda.reset_peak_memory_stats()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            t, _ = side_by_side(lambda: (fn(), torch.cuda.synchronize()), lambda: None, repeats)
        out[f"{name}_step_s"] = t
        out[f"{name}_peak_gb"] = torch.cuda.max_memory_allocated() / 2 ** 30
    return out


def table(state: dict, steps: dict[str, float], wall_s: float, gpus: int, engine: str) -> str:
    its = state["iterations"]
    roll = [it["rollout"] for it in its]
    programs = sum(r["programs"] for r in roll)
    roll_s = sum(r["wall_s"] for r in roll)
    phi = [it["stages"]["phi"]["steps_per_s"] for it in its]
    theta = [it["stages"]["theta"]["steps_per_s"] for it in its]
    base = state["baseline"]["overall"]["pass@k"]["1"] if state.get("baseline") else float("nan")
    last = its[-1]["eval"]["overall"]["pass@k"]["1"] if "eval" in its[-1] else float("nan")
    rows = [
        ("GPUs / sampler", f"{gpus} / {engine}"),
        ("wall time of the run", f"{wall_s:.0f} s"),
        ("programs sampled / s (rollout)", f"{programs / roll_s:.1f}"),
        ("φ steps / s, θ steps / s (run, per iteration)", f"{phi} / {theta}"),
        ("θ step, CE step (bf16, 16 × 416 tokens)", f"{steps['theta_step_s']:.3f} s, {steps['ce_step_s']:.3f} s "
                                                   f"(ratio {steps['theta_step_s'] / steps['ce_step_s']:.2f})"),
        ("peak GPU memory, θ step / CE step", f"{steps['theta_peak_gb']:.1f} GB / {steps['ce_peak_gb']:.1f} GB"),
        ("validation pass@1, θ_ckpt → policy", f"{100 * base:.1f}% → {100 * last:.1f}%"),
    ]
    return "\n".join(["| measure | value |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--engine", choices=("auto", "torch", "vllm"), default="auto")
    parser.add_argument("--run-dir", default=None, help="default: runs/gpu-check-<time>")
    parser.add_argument("--dry-run", action="store_true")
    args = parser.parse_args()
    import torch

    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here (torch.cuda.is_available() is False); this check needs one. On a CPU "
              "run `python experiments/run.py --config smollm2_mbpp` instead (docs/real_model.md).", file=sys.stderr)
        return 2
    gpus = torch.cuda.device_count()
    engine = args.engine if args.engine != "auto" else ("vllm" if importlib.util.find_spec("vllm") else "torch")
    run_dir = args.run_dir or f"runs/gpu-check-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides = gpu_overrides(gpus, engine)
    if args.dry_run:  # the resolved config and what each phase holds, as run.py --dry-run prints them
        from bcoder_ray.cli.run import main as run_main

        return run_main(["--config", CONFIG, "--dry-run", *overrides])
    from bcoder_ray.loop.driver import prepare_run, run

    plan = prepare_run(config=CONFIG, overrides=overrides, run_dir=run_dir)
    started = time.time()
    summary = run(plan)
    wall_s = time.time() - started
    print(summary.table)
    state = json.loads((Path(summary.run_dir) / "state.json").read_text())
    steps = step_times(state["theta_ckpt"])
    print(table(state, steps, wall_s, gpus, engine))
    return 0


if __name__ == "__main__":
    sys.exit(main())
