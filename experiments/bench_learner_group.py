"""What the persistent learner removes per stage: the same stage θ, iteration after iteration, on the per-stage
learner (a new Ray Train run each time: its workers started, its networks loaded from the previous checkpoint)
and on the persistent learner (`bcoder_ray.loop.learner_group`: one group kept up, its module kept in memory),
side by side in one run, alternating per_stage, persistent, per_stage, ... so load from other processes hits
both alike.

The stage is dueling DQN's θ (B-Coder's θ network and loss without cached targets, so the benchmark needs no
target job) over a buffer of the embedded suite's human programs and a wrong program per problem. Prints a line
per iteration (wall, steps alone, overhead = wall − steps) and at the end:

    startup_removed_s: X   median over iterations ≥ 1 of the per-stage overhead − the persistent overhead
    first_stage_s: A B     the first iteration's overhead of each (the persistent learner builds its module once)

    python experiments/bench_learner_group.py                          # the embedded default's LM (random weights)
    python experiments/bench_learner_group.py --workers 2 --cpus-per-worker 1   # 2 workers under DDP
    python experiments/bench_learner_group.py --checkpoint smollm2-135m-instruct --steps 4 --batch-size 4

`--workers 0` (the default, as the embedded default's stages) is Ray Train's local mode for the per-stage
learner and one actor for the persistent one. `--checkpoint` takes whatever `model.checkpoint` takes.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path


def build_embedded_sized(directory: Path, problems) -> str:
    """A random LM of the embedded default's warm-start shape with a BPE tokenizer of the suite's text."""
    from bcoder_ray.model.warm_start import WarmStartConfig, build_model, train_tokenizer

    cfg = WarmStartConfig()
    texts = [p.prompt for p in problems] + [r for p in problems for r in p.references]
    tok = train_tokenizer(texts, cfg.vocab_size)
    import torch

    torch.manual_seed(0)
    build_model(cfg, tok).save_pretrained(directory)
    tok.save_pretrained(directory)
    return str(directory)


def seeded_buffer(root: Path, tokenizer, problems, prompt_len: int, program_len: int):
    from bcoder_ray.buffer import ReplayBuffer, make_row, prompt_rows
    from bcoder_ray.model.tokenization import encode_program, tokenizer_fingerprint
    from envs.result import REWARD, ExecResult, Outcome

    buf = ReplayBuffer(str(root))
    buf.put_prompts(prompt_rows(problems, tokenizer, max_len=prompt_len))
    rows = []
    for p in problems:
        for program, source, outcome in ((p.references[0], "human", Outcome.PASSED),
                                         ("def f(x):\n    return 0\n", "generated", Outcome.FAILED)):
            rows.append(make_row(p, program, encode_program(tokenizer, program, program_len),
                                 ExecResult(outcome, REWARD[outcome]), source=source,
                                 tokenizer_hash=tokenizer_fingerprint(tokenizer)))
    buf.append(rows, batch_key="seed")
    return buf


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--checkpoint", help="θ_ckpt (default: a random LM of the embedded default's shape)")
    ap.add_argument("--iterations", type=int, default=4)
    ap.add_argument("--steps", type=int, default=10, help="optimiser steps per stage")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--workers", type=int, default=0)
    ap.add_argument("--cpus-per-worker", type=float, default=2.0)
    ap.add_argument("--gpu", action="store_true", help="one GPU per worker")
    ap.add_argument("--problems", type=int, default=256)
    ap.add_argument("--num-cpus", type=float, default=None, help="the local Ray instance's CPUs (default: all)")
    args = ap.parse_args(argv)

    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray

    import envs  # noqa: F401
    from envs.registry import load_suite

    from bcoder_ray.algorithms import make_algorithm
    from bcoder_ray.algorithms.base import RunContext
    from bcoder_ray.config import StageConfig
    from bcoder_ray.loop.learner import ScalingSpec, StageJob, train_stage
    from bcoder_ray.loop.learner_group import LearnerGroup
    from bcoder_ray.model.gguf import resolve_checkpoint
    from bcoder_ray.util.quiet import quiet_libraries

    quiet_libraries()
    problems = [p for p in load_suite("embedded", "train") if p.references][: args.problems]
    with tempfile.TemporaryDirectory(prefix="bench-learner-group-") as tmp:
        root = Path(tmp)
        ckpt = resolve_checkpoint(args.checkpoint) if args.checkpoint else build_embedded_sized(root / "lm", problems)
        ctx = RunContext(theta_ckpt=ckpt, tokenizer_path=ckpt, source_len=192, target_len=128)
        buf = seeded_buffer(root / "buffer", ctx.load_tokenizer(), problems, 192, 128)
        ray.init(num_cpus=args.num_cpus, include_dashboard=False, object_store_memory=300 * 1024 ** 2)
        algo = make_algorithm("dueling_dqn", {"name": "dueling_dqn"}, ctx)
        optim = StageConfig(steps=args.steps, lr=1e-4, schedule="linear", batch_size_per_worker=args.batch_size,
                            num_workers=args.workers, cpus_per_worker=args.cpus_per_worker, use_gpu=args.gpu,
                            report_every=max(1, args.steps))
        scaling = ScalingSpec(num_workers=args.workers, use_gpu=args.gpu, cpus_per_worker=args.cpus_per_worker)
        group = LearnerGroup("theta", scaling)
        states: dict[str, dict] = {"per_stage": {}, "persistent": {}}
        overhead: dict[str, list[float]] = {"per_stage": [], "persistent": []}
        print("| iteration | learner | wall s | steps s | overhead s | networks kept |")
        print("| ---: | --- | ---: | ---: | ---: | --- |")
        try:
            for it in range(args.iterations):
                for kind in ("per_stage", "persistent"):
                    (plan,) = algo.plan_iteration(it, states[kind], "0")
                    job = StageJob("dueling_dqn", algo.config, ctx, plan, optim, seed=it, progress=False)
                    data = buf.ray_dataset(args.batch_size, job.batches_needed(args.workers), rho_real=0.5,
                                           seed=it, num_cpus=0.25)
                    started = time.time()
                    if kind == "per_stage":
                        result = train_stage(job, data, scaling, storage_path=str(root / kind), name=f"theta-{it}")
                    else:
                        result = group.run_stage(job, data, storage_path=str(root / kind), name=f"theta-{it}")
                    wall = time.time() - started
                    steps_s = float(result.metrics["train_s"])
                    overhead[kind].append(wall - steps_s)
                    algo.after_stage(plan, result.checkpoint_dir, it, states[kind])
                    kept = {"per_stage": "–", "persistent": str(bool(result.metrics.get("model_kept")))}[kind]
                    print(f"| {it} | {kind} | {wall:.2f} | {steps_s:.2f} | {wall - steps_s:.2f} | {kept} |",
                          flush=True)
        finally:
            group.shutdown()
            ray.shutdown()
    later = [a - b for a, b in zip(overhead["per_stage"][1:], overhead["persistent"][1:])]
    print(f"first_stage_s: {overhead['per_stage'][0]:.2f} {overhead['persistent'][0]:.2f}")
    if later:
        print(f"startup_removed_s: {statistics.median(later):.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
