"""Evaluation on tiny models: sample + execute + rank, saved candidates, Table 3 ranking, generation, export, CLIs."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM, GPT2Config, GPT2LMHeadModel

import envs  # noqa: F401  (registers the suites)
from bcoder_ray.algorithms import make_algorithm
from bcoder_ray.algorithms.base import RunContext
from bcoder_ray.algorithms.bcoder.q_model import QModel
from bcoder_ray.model.candidates import SamplingSettings, load_sampler, sample_and_score
from bcoder_ray.evaluation.evaluate import adhoc_problem, evaluate, generate, rank_candidates_file, recompute_metrics
from bcoder_ray.evaluation.metrics import CandidateRecord, read_candidates
from bcoder_ray.evaluation.report import load_metrics
from bcoder_ray.algorithms.bcoder.ranking import score_programs
from bcoder_ray.model.tokenization import encode_program, encode_prompt, pad_id
from bcoder_ray.model.warm_start import train_tokenizer
from envs.execute import Executor
from envs.registry import load_suite
from learner_fixtures import perturb

torch.set_num_threads(1)
SETTINGS = SamplingSettings(m=4, temperature=1.0, top_p=1.0, max_prompt_len=200, max_new_tokens=12, seed=3)


@pytest.fixture(scope="module")
def problems():
    return load_suite("embedded", "test", limit=3)


@pytest.fixture(scope="module")
def system(tmp_path_factory, problems):
    """θ_ckpt (a tiny GPT-2 with its own BPE tokenizer), and a 'trained' θ and φ saved with the learner's save functions."""
    root = tmp_path_factory.mktemp("eval_models")
    tokenizer = train_tokenizer([p.prompt + p.references[0] for p in problems], vocab_size=300)
    torch.manual_seed(0)
    config = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=2, n_positions=256,
                        bos_token_id=tokenizer.eos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(config).save_pretrained(root / "ckpt")
    tokenizer.save_pretrained(root / "ckpt")
    trained = QModel.create(str(root / "ckpt"), parts=("phi", "theta"))
    perturb(trained.freeze_for_stage("theta"), scale=0.5, seed=7)
    perturb(trained.freeze_for_stage("phi"), scale=0.5, seed=8)
    trained.freeze_for_stage("none")
    trained.save_theta(str(root / "theta"), tokenizer)
    trained.save_phi(str(root / "phi"), tokenizer)
    return {"root": root, "ckpt": str(root / "ckpt"), "theta": str(root / "theta"), "phi": str(root / "phi"),
            "trained": trained, "tokenizer": tokenizer}


@pytest.fixture(scope="module")
def q_models(system):
    """θ as the sampler (a plain LM folder) and B-Coder's R̃ from θ and φ as the ranker."""
    ctx = RunContext(theta_ckpt=system["ckpt"], tokenizer_path=system["ckpt"], source_len=200, target_len=64)
    ranker = make_algorithm("bcoder", {"name": "bcoder"}, ctx).load_ranker(
        {"theta_dir": system["theta"], "phi_dir": system["phi"]}, "theta-test")
    return load_sampler(system["theta"], label="theta-test"), ranker


def rtilde_of(ranker, prompts, programs):
    return ranker.score(prompts, programs)


@pytest.fixture(scope="module")
def run_folder(tmp_path_factory, system):
    """A run folder as experiments/run.py leaves it: config.yaml and state.json naming θ_ckpt, θ and φ."""
    from bcoder_ray.config import load_config
    from bcoder_ray.loop.run_folder import CONFIG_FILE, RunState

    root = tmp_path_factory.mktemp("run")
    (root / CONFIG_FILE).write_text(load_config("ci_tiny").to_yaml())
    RunState(theta_ckpt=system["ckpt"], algorithm={"theta": system["theta"], "phi": system["phi"]},
             policy=system["theta"], policy_version="1").save(root)
    return root


@pytest.fixture(scope="module")
def executor():
    with Executor(workers=1) as ex:
        yield ex


def hand_written(problem) -> dict[str, str]:
    """Programs of known outcome for one embedded problem."""
    reference = problem.references[0]
    name = problem.metadata.get("name") or reference.split("def ", 1)[1].split("(", 1)[0]
    return {"passed": reference,
            "failed": f"def {name}(*args):\n    return 'surely wrong'\n",
            "runtime_error": f"def {name}(*args):\n    raise ValueError('no')\n",
            "compile_error": f"def {name}(:\n    return\n"}


def test_exported_theta_loads_with_plain_from_pretrained_and_ranks_the_same(system, q_models, problems):
    lm = AutoModelForCausalLM.from_pretrained(system["theta"])
    ids = torch.tensor([[5, 17, 42, 8, 99]])
    with torch.no_grad():
        assert torch.allclose(lm(ids).logits, system["trained"].theta.lm(ids).logits, atol=1e-6)
    tok = system["tokenizer"]
    prompts = [encode_prompt(tok, problems[0].prompt, 200)] * 4
    programs = [encode_program(tok, text, 64) for text in hand_written(problems[0]).values()]
    reloaded = rtilde_of(q_models[1], prompts, programs)
    in_memory = score_programs(system["trained"], prompts, programs, gamma=0.999, pad_id=pad_id(tok))
    assert reloaded == pytest.approx(in_memory, abs=1e-5)
    assert len(set(round(x, 6) for x in reloaded)) == 4  # a perturbed Q tells the programs apart


def test_evaluate_saves_candidates_whose_metrics_recompute_exactly(tmp_path, q_models, problems, executor):
    sampler, ranker = q_models
    live = evaluate(problems, sampler, executor, SETTINGS, tmp_path / "eval", ks=(1, 2), n_at_k_pairs=[(1, 3)],
                    ranker=ranker)
    records = read_candidates(tmp_path / "eval")
    assert len(records) == 3 * SETTINGS.m
    assert [r.sample_index for r in records[:4]] == [0, 1, 2, 3]
    assert all(r.rtilde is not None and r.ranker == "theta-test" and r.model == "theta-test" for r in records)
    assert all(r.example_passed is not None for r in records)  # embedded problems show example tests
    recomputed = recompute_metrics(tmp_path / "eval")
    assert recomputed == {k: live[k] for k in recomputed}
    assert load_metrics(tmp_path / "eval") == live
    assert {"pass@k", "ranked_pass@k", "filtered_pass@k", "filtered_ranked_pass@k", "n@k"} <= set(live["overall"])
    assert live["sampling"]["m"] == SETTINGS.m and live["label"] == "theta-test"
    assert "statement" in live["rtilde_order"]
    # the same call samples the same candidates; their R̃ is that of the ranker on the sampled token ids
    again = sample_and_score(problems, sampler, executor, SETTINGS, ranker=ranker)
    assert [CandidateRecord.of(c) for c in again] == records
    direct = rtilde_of(ranker, [c.prompt_ids for c in again], [c.program_ids for c in again])
    assert [r.rtilde for r in records] == pytest.approx(direct, rel=1e-5, abs=1e-5)


def test_plain_lm_is_evaluated_without_rtilde(tmp_path, system, problems, executor):
    plain = load_sampler(system["ckpt"], label="ckpt")
    metrics = evaluate(problems[:2], plain, executor, SETTINGS, tmp_path / "plain", ks=(1,), examples=False)
    records = read_candidates(tmp_path / "plain")
    assert all(r.rtilde is None and r.ranker is None and r.example_passed is None for r in records)
    assert set(k for k in metrics["overall"] if k.endswith("@k")) == {"pass@k"}


def test_ranking_another_models_candidates(tmp_path, q_models, problems, executor):
    """Table 3: a JSONL of programs (no verdicts) is executed, scored by R̃ and ranked."""
    path = tmp_path / "other-model.jsonl"
    expected = {}
    with open(path, "w") as f:
        for p in problems[:2]:
            for outcome, program in hand_written(p).items():
                f.write(json.dumps({"problem_id": p.problem_id, "program": program}) + "\n")
                expected[(p.problem_id, program)] = outcome
    sampler, ranker = q_models
    metrics = rank_candidates_file(path, problems, ranker, sampler.tokenizer, executor, tmp_path / "ranked",
                                   ks=(1, 2))
    records = read_candidates(tmp_path / "ranked")
    assert [(r.problem_id, r.sample_index) for r in records[:4]] == [(problems[0].problem_id, i) for i in range(4)]
    assert {(r.problem_id, r.program): r.outcome for r in records} == expected
    assert all(r.model == "other-model" and r.ranker == "theta-test" for r in records)
    tok = sampler.tokenizer
    direct = rtilde_of(ranker, [encode_prompt(tok, problems[0].prompt, 600)] * 4,
                       [encode_program(tok, r.program, 512) for r in records[:4]])
    assert [r.rtilde for r in records[:4]] == pytest.approx(direct, rel=1e-5, abs=1e-5)
    assert metrics["overall"]["pass@k"]["1"] == pytest.approx(0.25)
    # filtered: only the reference passes the example tests, so it is the one submission
    assert metrics["overall"]["filtered_ranked_pass@k"]["1"] == pytest.approx(1.0)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"problem_id": "nope", "program": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"bad\.jsonl:1: problem embedded/test/nope is not among"):
        rank_candidates_file(bad, problems, ranker, tok, executor, tmp_path / "bad")


def test_generate_filters_on_examples_and_ranks_by_rtilde(q_models, problems, executor):
    sampler, ranker = q_models
    untested = adhoc_problem(problems[0].prompt)
    result = generate(untested, sampler, SETTINGS, ranker=ranker)
    assert result.sampled == SETTINGS.m and result.dropped_by_examples == 0
    scores = [c.rtilde for c in result.ranked]
    assert scores == sorted(scores, reverse=True) and result.best.rtilde == max(scores)
    assert all(c.result is None for c in result.ranked)  # nothing to execute against
    tested = generate(problems[0], sampler, SETTINGS, executor=executor, ranker=ranker)
    assert tested.sampled == SETTINGS.m
    kept = {c.sample_index for c in tested.ranked}
    assert tested.dropped_by_examples == SETTINGS.m - len(kept)
    assert all(c.example_result.passed for c in tested.ranked)


def test_cli_evaluate_table_recompute_figures_and_generate(tmp_path, system, run_folder, capsys):
    from bcoder_ray.cli import evaluate as evaluate_cli
    from bcoder_ray.cli import generate as generate_cli

    common = ["--suite", "embedded", "--split", "test", "--limit", "2", "--m", "3",
              "--ks", "1", "2", "--temperature", "1.0", "--top-p", "1.0", "--max-new-tokens", "10",
              "--max-prompt-len", "200", "--workers", "1"]
    assert evaluate_cli.main(common + ["--run-dir", str(run_folder), "--label", "B",
                                       "--out", str(tmp_path / "q"), "--plots"]) == 0
    assert (tmp_path / "q" / "fig3_rtilde_density.png").stat().st_size > 0
    assert (tmp_path / "q" / "fig5_ranking_gain.png").stat().st_size > 0
    assert evaluate_cli.main(common + ["--checkpoint", system["ckpt"], "--label", "ckpt",
                                       "--out", str(tmp_path / "c")]) == 0
    # another model's policy ranked by the run's ranker (--rank-with), the same candidates as unranked
    assert evaluate_cli.main(common + ["--checkpoint", system["ckpt"], "--rank-with", str(run_folder),
                                       "--out", str(tmp_path / "cr")]) == 0
    assert [r.program for r in read_candidates(tmp_path / "cr")] == \
        [r.program for r in read_candidates(tmp_path / "c")]
    assert all(r.rtilde is not None for r in read_candidates(tmp_path / "cr"))
    saved = load_metrics(tmp_path / "q")
    assert evaluate_cli.main(["--recompute", str(tmp_path / "q"), "--ks", "1", "2"]) == 0
    assert load_metrics(tmp_path / "q") == saved
    capsys.readouterr()
    assert evaluate_cli.main(["--table", str(tmp_path / "q"), str(tmp_path / "c"), "--ks", "1", "2",
                              "--table-out", str(tmp_path / "table.md")]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].startswith("| model | pass@1 ") and table[0].endswith(" | pass@2 all |")
    assert table[2].startswith("| B (ranked by") and table[3].startswith("| ckpt (pass@k, m=3")
    assert (tmp_path / "table.md").read_text().splitlines() == table
    assert generate_cli.main(["--run-dir", str(run_folder),
                              "--statement", "Write a function `f(x)`. Return x + 1.", "--m", "3",
                              "--max-new-tokens", "8", "--max-prompt-len", "200"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("# sampled 3 candidates with theta") and "ranked by theta" in out and "score = " in out
