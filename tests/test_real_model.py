"""The loop's parts on a real pretrained, instruction-tuned LM (SmolLM2-135M-Instruct, the `converted` fixture of
tests/conftest.py) and two real MBPP problems, as `configs/smollm2_mbpp.yaml` runs them: chat-template prompts with
the answer's opening fence written in, programs that end at the closing fence or at EOS, executed and appended to a
real buffer by the rollout actor's own code; cached targets filled by that actor; one φ step and one θ step of the
decoder-only dueling Q; the published policy reloaded by the actors' loader samples what the stage's network
samples. Programs are cut at 40 tokens to keep the test near a minute on 2 cores."""

from __future__ import annotations

import sys

import envs  # noqa: F401  (registers the suites)
from envs.registry import load_suite
from tests.experiment_scripts import load_experiment

PROMPT_LEN, PROGRAM_LEN = 192, 40  # a longer MBPP prompt keeps its end (the asserts, the template)
FENCE = "```"


class InlinePool:
    """`rollout.ActorPool.fill_targets` served by one `PolicyWorker` in this process (buffer.targets_via: actors)."""

    size = 1  # one actor: `fill_targets` packs its chunks for it

    def __init__(self, worker):
        self.worker = worker

    def fill_targets(self, chunks, job):
        return [self.worker.fill_targets(chunk, job) for chunk in chunks]


def test_two_mbpp_problems_through_rollout_targets_phi_theta_and_the_published_policy(converted, ray_local,
                                                                                       tmp_path):
    import torch

    from bcoder_ray.algorithms import make_algorithm
    from bcoder_ray.algorithms.base import RolloutRequest, RunContext
    from bcoder_ray.algorithms.bcoder.q_model import QModel
    from bcoder_ray.buffer import ReplayBuffer, prompt_rows
    from bcoder_ray.buffer.human_seed import human_rows
    from bcoder_ray.config import StageConfig
    from bcoder_ray.loop.learner import ScalingSpec, StageJob, train_stage
    from bcoder_ray.loop.rollout import PolicyRef, PolicyWorker, WorkerArgs, make_tasks
    from bcoder_ray.loop.target_filling import AlgorithmRef, TargetJob, fill_targets
    from bcoder_ray.model.candidates import SamplingSettings, load_sampler
    from bcoder_ray.model.sampling import sample_programs
    from bcoder_ray.model.tokenization import pad_id
    from envs.execute import Executor

    folder = converted.folder
    problems = load_suite("mbpp", "train")[:2]
    ctx = RunContext(theta_ckpt=folder, tokenizer_path=folder, source_len=PROMPT_LEN, target_len=PROGRAM_LEN,
                     buffer_uri=str(tmp_path / "buffer"), chat_template=True, stop_strings=(FENCE,),
                     response_prefix="```python\n")
    fmt = ctx.text_format()
    worker = PolicyWorker(WorkerArgs(problems={"train": problems}, context=ctx, run_id="real",
                                     executor={"workers": 1}))
    tok = worker.tokenizer
    buf = ReplayBuffer(ctx.buffer_uri)

    # 1. prompts: one chat turn, the template's generation prompt, then the opening fence; EOS is <|im_end|>
    rows = prompt_rows(problems, tok, max_len=PROMPT_LEN, text_format=fmt)
    text = tok.decode(rows[0]["prompt_ids"])
    assert text.startswith("<|im_start|>") and "<|im_start|>user\n" in text
    assert text.endswith("<|im_start|>assistant\n```python\n") and tok.eos_token == "<|im_end|>"
    buf.put_prompts(rows)
    with Executor(workers=1) as ex:
        seed, _ = human_rows(problems, tok, PROGRAM_LEN, ex, run_id="real", text_format=fmt)
    buf.append(seed, batch_key="seed")

    # 2. rollout: two sampled programs a problem, each ended at the fence, at EOS or at the length limit
    settings = SamplingSettings(m=2, temperature=1.0, top_p=0.95, max_prompt_len=PROMPT_LEN,
                                max_new_tokens=PROGRAM_LEN, prompts_per_call=2)
    task = make_tasks("it0", range(2), 2, iteration=0, seed=0)[0]
    out = worker.rollout(task, PolicyRef(folder, "0"), settings, RolloutRequest())
    assert out["programs"] == out["written"] == 4 and out["infra"] == 0
    generated = [r for r in buf.read().to_pylist() if r["source"] == "generated"]
    assert len(generated) == 4
    stop = {tok.eos_token_id}
    for r in generated:
        ids = r["program_ids"]
        ended = ids[-1] in stop or tok.decode(ids[-2:]).find(FENCE) >= 0
        assert ended != r["truncated"] and (r["truncated"] or len(ids) <= PROGRAM_LEN)
        assert FENCE not in r["program"] and r["outcome"] in ("passed", "failed", "runtime_error", "compile_error")

    # 3. φ then θ, one step each, on those rows; their targets filled by the actor's own code
    algo = make_algorithm("bcoder", {"name": "bcoder", "alpha": 1.0}, ctx)
    ref = AlgorithmRef("bcoder", algo.config, ctx)
    pool, state, storage = InlinePool(worker), {}, str(tmp_path / "train")
    optim = StageConfig(steps=1, lr=1e-5, batch_size_per_worker=4, report_every=1)
    phi_plan, theta_plan = algo.plan_iteration(0, state, "0")
    assert fill_targets(buf, TargetJob(ref, phi_plan.targets, pad_id(tok), batch_size=4), pool=pool) == 6
    phi_job = StageJob("bcoder", algo.config, ctx, phi_plan, optim, progress=False)
    phi = train_stage(phi_job, buf.ray_dataset(4, phi_job.batches_needed(0),
                                               targets_fingerprint=phi_plan.targets.fingerprint),
                      ScalingSpec(num_workers=0), storage_path=storage, name="phi-real")
    algo.after_stage(phi_plan, phi.checkpoint_dir, 0, state)
    theta_plan = algo.prepare_stage(theta_plan, state)
    assert fill_targets(buf, TargetJob(ref, theta_plan.targets, pad_id(tok), batch_size=4), pool=pool) == 6
    theta_job = StageJob("bcoder", algo.config, ctx, theta_plan, optim, progress=False)
    theta = train_stage(theta_job, buf.ray_dataset(4, theta_job.batches_needed(0),
                                                   targets_fingerprint=theta_plan.targets.fingerprint),
                        ScalingSpec(num_workers=0), storage_path=storage, name="theta-real")
    for stage in (phi, theta):
        assert len(stage.history) == 1 and all(v == v for v in stage.history[0].values())  # finite (not NaN)
    algo.after_stage(theta_plan, theta.checkpoint_dir, 0, state)

    # 4. the published policy, loaded as the actors load it, samples what θ's network itself samples
    published = algo.policy(state)
    q = QModel.create(folder, parts=("theta",), theta_dir=published)
    assert q.kind == "decoder-only"
    sampler = load_sampler(published, tokenizer=folder, text_format=fmt)
    prompt = [fmt.prompt_ids(tok, problems[0].prompt, PROMPT_LEN)]

    def sample(lm):
        with torch.no_grad():
            return sample_programs(lm, prompt, 2, max_new_tokens=12, eos_id=sampler.stop_ids, pad_id=pad_id(tok),
                                   temperature=1.0, top_p=0.95, seed=7)

    assert sample(sampler.lm) == sample(q.theta)
    base = load_sampler(folder, text_format=fmt).lm.lm.get_output_embeddings().weight
    moved = (sampler.lm.lm.get_output_embeddings().weight - base).abs().max().item()
    assert moved > 0  # θ's step reached the published LM (its head is tied to its own input embedding)


def test_the_gpu_check_refuses_without_cuda_and_its_overrides_make_a_valid_config(monkeypatch, capsys):
    import torch

    from bcoder_ray.config import load_config

    gpu_check = load_experiment("gpu_check")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(sys, "argv", ["gpu_check.py"])
    assert gpu_check.main() == 2 and "no CUDA device" in capsys.readouterr().err
    for gpus, engine in ((1, "torch"), (8, "vllm")):
        cfg = load_config(gpu_check.CONFIG, gpu_check.gpu_overrides(gpus, engine))
        assert cfg.stages["theta"].use_gpu and cfg.stages["theta"].num_workers == gpus
        assert cfg.rollout.engine == engine and cfg.model.response_prefix == "```python\n"
