"""Benchmark of cached-target filling (issue 30): `fill_targets` end to end, through the policy actors and through
Ray Data, against a plain no-grad forward of the same networks over the same rows.

The networks are the embedded default's: θ_ckpt is a GPT-2 at `WarmStartConfig`'s sizes (about 2 M parameters)
with a BPE tokenizer trained on the embedded suite's text (untrained weights: a forward costs what a trained
one does), φ a value network initialised from it. The buffer is synthetic (`bcoder_ray.buffer.synthetic`), as
the loop's first fill finds it: the human seed in one file of `--human-rows` (every train problem's human
program), then `--rows` generated rows in files of `--file-rows` (a rollout task's: 16 problems × 4 samples), with
prompt and program lengths drawn around those of the embedded suite's statements and human programs under that
tokenizer. Each path fills a fresh copy of the buffer. The settings are the embedded config's (2 actors of 0.5
CPU, `targets_batch_size` 64; Ray Data: one actor of `targets_cpus`), each overridable.

Prints, per path (`actors`, `ray_data`):
- ``fill_rows_per_s``: rows / the wall time of `fill_targets` (reading the rows lacking targets, dispatch,
  computing, writing the sidecars);
- ``forward_rows_per_s``: rows / the time of a plain no-grad forward (θ_ckpt's logits, and φ's values for stage θ)
  over the same rows in the same batches, in this process with as many torch threads as the path's workers hold
  together (the actors: one per actor; Ray Data: its actor's);
- ``fill_vs_forward``: the ratio of the two (goal ≥ 0.8);
- the breakdown, measured apart in this process over the same rows: ``read_s`` (`missing_targets`), ``compute_s``
  (the target computer, rows in and columns out, with one worker's threads), ``write_s`` (the sidecar writes, in
  the units the path writes), and ``other_s`` = wall − read − (compute + write) / workers: dispatch, model
  loading, waiting.
The last line is ``fill_vs_forward: X``, the worst over the paths run.

    python experiments/bench_targets.py                              # 4,000 + 768 rows, stage θ's targets, both paths
    python experiments/bench_targets.py --human-rows 256 --rows 256 --paths actors   # a quick look at one path
    python experiments/bench_targets.py --stage phi                  # stage φ's targets (θ_ckpt alone)

Timings are wall-clock: other load on the machine slows every part; the load average is printed.
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from bcoder_ray.algorithms import make_algorithm  # noqa: E402
from bcoder_ray.algorithms.base import RunContext, TargetsPlan  # noqa: E402
from bcoder_ray.algorithms.bcoder.q_model import QModel  # noqa: E402
from bcoder_ray.buffer import ReplayBuffer, rows_from_batch  # noqa: E402
from bcoder_ray.buffer.synthetic import synthetic_prompts, synthetic_rows  # noqa: E402
from bcoder_ray.config import load_config  # noqa: E402
from bcoder_ray.loop.target_filling import (AlgorithmRef, TargetComputer, TargetJob, chunk_batches,  # noqa: E402
                                            fill_targets, plan_chunks)
from bcoder_ray.model.batch import collate  # noqa: E402
from bcoder_ray.model.tokenization import pad_id, tokenizer_fingerprint  # noqa: E402
from bcoder_ray.model.warm_start import (WarmStartConfig, build_model, encode_pairs, train_tokenizer,  # noqa: E402
                                         training_pairs)


def build_networks(directory: str, stage: str) -> tuple[str, str | None, tuple[float, float]]:
    """θ_ckpt (and φ for stage θ) at the embedded default's sizes; also the suite's mean prompt and program
    lengths in tokens."""
    import envs  # noqa: F401
    from envs.registry import load_suite

    cfg = WarmStartConfig()
    pairs = training_pairs(load_suite("embedded", "train")[:400])
    tokenizer = train_tokenizer([text for pair in pairs for text in pair], cfg.vocab_size, cfg.pretokenizer)
    torch.manual_seed(0)
    ckpt = os.path.join(directory, "ckpt")
    build_model(cfg, tokenizer).save_pretrained(ckpt)
    tokenizer.save_pretrained(ckpt)
    encoded = encode_pairs(tokenizer, pairs, cfg.max_prompt_len, cfg.max_program_len)
    lengths = (float(np.mean([len(p) for p, _ in encoded])), float(np.mean([len(w) for _, w in encoded])))
    phi = None
    if stage == "theta":
        phi = os.path.join(directory, "phi")
        QModel.create(ckpt, parts=("phi",)).save_phi(phi)
    return ckpt, phi, lengths


def synthetic_buffer(uri: str, args, vocab: int, tokenizer_hash: str, lengths: tuple[float, float]) -> ReplayBuffer:
    """The loop's buffer at its first fill: the human seed as one file of `--human-rows`, then `--rows` generated
    rows in rollout-task files of `--file-rows`."""
    rng = np.random.default_rng(0)
    buffer = ReplayBuffer(uri)
    cfg = WarmStartConfig()
    buffer.put_prompts(synthetic_prompts(rng, args.problems, suite="embedded", tokenizer_hash=tokenizer_hash,
                                         mean_tokens=round(lengths[0]), max_tokens=cfg.max_prompt_len, vocab=vocab))
    common = dict(suite="embedded", n_problems=args.problems, tokenizer_hash=tokenizer_hash,
                  max_tokens=cfg.max_program_len, vocab=vocab)
    if args.human_rows:
        buffer.append(synthetic_rows(rng, args.human_rows, source="human", mean_tokens=lengths[1], **common),
                      batch_key="bench/human")
    for start in range(0, args.rows, args.file_rows):
        rows = synthetic_rows(rng, min(args.file_rows, args.rows - start), start=args.human_rows + start,
                              mean_tokens=args.generated_tokens or lengths[1], **common)
        buffer.append(rows, batch_key=f"bench/{start}")
    return buffer


def targets_plan(ctx: RunContext, stage: str, phi: str | None) -> TargetsPlan:
    """The targets the bcoder algorithm declares for `stage`, through its public interface."""
    algo = make_algorithm("bcoder", {"name": "bcoder"}, ctx)
    phi_plan, theta_plan = algo.plan_iteration(0, {}, "0")
    if stage == "phi":
        return phi_plan.targets
    state: dict = {}
    algo.after_stage(phi_plan, phi, 0, state)
    return algo.prepare_stage(theta_plan, state).targets


def plain_forward(model: QModel, batches) -> None:
    """What the target computation cannot do with less: the frozen networks' bodies over the rows, no grad."""
    with torch.no_grad():
        for batch in batches:
            encoded = model.encode(batch)
            model.ckpt_logits(batch, encoded)
            if model.phi is not None:
                model.phi_raw_values(batch, encoded)


@dataclass
class Breakdown:
    rows: int
    read_s: float
    compute_s: float
    write_s: float
    forward_s: float


def measure_parts(buffer_dir: str, scratch: str, job: TargetJob, actors: int, threads: int, workers: int
                  ) -> Breakdown:
    """The path's parts, each timed alone in this process over the same rows (see the module docstring)."""
    shutil.copytree(buffer_dir, scratch)
    buffer = ReplayBuffer(scratch)
    start = time.perf_counter()
    chunks = plan_chunks(buffer, job, actors=actors)
    read_s = time.perf_counter() - start
    torch.set_num_threads(threads)  # one worker's
    computer = TargetComputer(replace(job, threads=threads))
    start = time.perf_counter()
    outs = [computer(chunk.table) for chunk in chunks]
    compute_s = time.perf_counter() - start
    start = time.perf_counter()
    for chunk, out in zip(chunks, outs):
        buffer.write_targets(out, job.targets.fingerprint, batch_key=chunk.key)
    write_s = time.perf_counter() - start
    t = job.targets
    model = QModel.create(job.algorithm.context.theta_ckpt, parts=("ckpt", "phi") if t.spec.get("phi_dir") else ("ckpt",),
                          phi_dir=t.spec.get("phi_dir"))
    batches = [collate(rows_from_batch(b.append_column("reward", pa.array([0.0] * b.num_rows))), job.pad_id)
               for chunk in chunks for b in chunk_batches(chunk.table)]  # the very batches the fill computes
    torch.set_num_threads(threads * workers)  # the path's workers together
    plain_forward(model, batches[:1])  # warm-up
    start = time.perf_counter()
    plain_forward(model, batches)
    forward_s = time.perf_counter() - start
    shutil.rmtree(scratch)
    return Breakdown(sum(x.program_ids.shape[0] for x in batches), read_s, compute_s, write_s, forward_s)


def run_path(path: str, buffer_dir: str, work: str, job: TargetJob, cfg, ctx: RunContext) -> float:
    """The wall time of `fill_targets` over a fresh copy of the buffer (the actors or Ray Data job started first,
    as the loop has them: the actors are up before the fill, Ray Data starts its own)."""
    from bcoder_ray.loop.rollout import ActorPool, ActorSettings, PolicyWorker, WorkerArgs

    copy = os.path.join(work, f"buffer-{path}")
    shutil.copytree(buffer_dir, copy)
    buffer = ReplayBuffer(copy)
    job = replace(job, algorithm=replace(job.algorithm, context=replace(ctx, buffer_uri=copy)))
    pool = None
    if path == "actors":
        r = cfg.rollout
        pool = ActorPool(PolicyWorker, ActorSettings(num_actors=r.num_actors, num_cpus=r.cpus_per_actor),
                         WorkerArgs(problems={}, context=job.algorithm.context,
                                    num_threads=max(1, math.ceil(r.cpus_per_actor))),
                         storage=os.path.join(work, f"actors-{path}"))
        import ray

        ray.get([a.__ray_ready__.remote() for a in pool.actors])  # constructed, as in the loop
    try:
        start = time.perf_counter()
        filled = fill_targets(buffer, job, num_cpus=cfg.buffer.targets_cpus, pool=pool)
        wall = time.perf_counter() - start
    finally:
        if pool is not None:
            pool.shutdown()
    if filled != job_rows(buffer_dir):
        raise RuntimeError(f"{path}: filled {filled} rows of {job_rows(buffer_dir)}")
    return wall


def job_rows(buffer_dir: str) -> int:
    return sum(e.num_rows for e in ReplayBuffer(buffer_dir).files("samples"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--human-rows", type=int, default=4000, help="rows of the human seed's file (0: none)")
    parser.add_argument("--rows", type=int, default=768, help="generated rows (an iteration's: 192 problems × 4)")
    parser.add_argument("--file-rows", type=int, default=64, help="rows per generated file (a rollout task's)")
    parser.add_argument("--generated-tokens", type=float, default=0.0,
                        help="mean generated program length (default: the human programs')")
    parser.add_argument("--problems", type=int, default=192)
    parser.add_argument("--stage", choices=("phi", "theta"), default="theta")
    parser.add_argument("--paths", default="actors,ray_data")
    parser.add_argument("overrides", nargs="*", help="embedded config overrides, e.g. --buffer.targets_batch_size 32")
    args, rest = parser.parse_known_args()
    cfg = load_config("embedded", [*args.overrides, *rest])
    from bcoder_ray.loop.ray_session import ray_session

    work = tempfile.mkdtemp(prefix="bench_targets_")
    try:
        ckpt, phi, lengths = build_networks(work, args.stage)
        ctx = RunContext(theta_ckpt=ckpt, tokenizer_path=ckpt, source_len=cfg.model.source_len,
                         target_len=cfg.model.target_len)
        tokenizer = ctx.load_tokenizer()
        buffer_dir = os.path.join(work, "buffer")
        synthetic_buffer(buffer_dir, args, len(tokenizer), tokenizer_fingerprint(tokenizer, ctx.text_format()),
                         lengths)
        b = cfg.buffer
        job = TargetJob(AlgorithmRef("bcoder", make_algorithm("bcoder", {"name": "bcoder"}, ctx).config, ctx),
                        targets_plan(ctx, args.stage, phi), pad_id(tokenizer), batch_size=b.targets_batch_size,
                        threads=max(1, math.ceil(b.targets_cpus)))
        print(f"{args.human_rows} human rows in one file, {args.rows} generated in files of {args.file_rows}; "
              f"prompt/program tokens ≈ {lengths[0]:.0f}/{lengths[1]:.0f}; stage {args.stage} ({', '.join(job.targets.columns)}); batch {job.batch_size}; "
              f"load average {os.getloadavg()[0]:.1f}", flush=True)
        worst = math.inf
        with ray_session(cfg):
            for path in args.paths.split(","):
                if path == "actors":
                    threads, workers = max(1, math.ceil(cfg.rollout.cpus_per_actor)), cfg.rollout.num_actors
                else:
                    threads, workers = job.threads, 1
                wall = run_path(path, buffer_dir, work, job, cfg, ctx)
                parts = measure_parts(buffer_dir, os.path.join(work, f"scratch-{path}"), job,
                                      workers if path == "actors" else 0, threads, workers)
                fill_rate, forward_rate = parts.rows / wall, parts.rows / parts.forward_s
                other = wall - parts.read_s - (parts.compute_s + parts.write_s) / workers
                ratio = fill_rate / forward_rate
                worst = min(worst, ratio)
                print(f"[{path}] workers={workers}x{threads} thread(s)  fill_rows_per_s={fill_rate:.1f} "
                      f"(wall {wall:.1f} s)  forward_rows_per_s={forward_rate:.1f}  fill_vs_forward={ratio:.3f} "
                      f"(goal >= 0.8)  read_s={parts.read_s:.2f}  compute_s={parts.compute_s:.2f}  "
                      f"write_s={parts.write_s:.2f}  other_s={other:.2f}  load average "
                      f"{os.getloadavg()[0]:.1f}", flush=True)
        print(f"fill_vs_forward: {worst:.3f}")
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
