"""Rankers side by side (`bcoder_ray.evaluation.rankers`, `experiments/evaluate.py --rankers`): each ranker on a
fixture whose answer is known, the untrained Q's R̃ against the likelihood it restates, and the command on tiny
models."""

from __future__ import annotations

import json

import pytest
import torch

import envs  # noqa: F401  (registers the suites)
from bcoder_ray.evaluation.metrics import CandidateRecord
from bcoder_ray.evaluation.rankers import (NamedRanker, RankingInputs, build_rankers, compare_rankers,
                                           majority_vote_scores, same_pick)
from bcoder_ray.model.likelihood import LogLikelihoodRanker, TokenLogprobs
from envs.problem import Problem, TestSpec
from envs.result import REWARD, ExecResult, Outcome, TestResult

torch.set_num_threads(1)
EXAMPLES = TestSpec("assert", asserts=("assert f(1) == 2",))


def problem(pid: str, examples: TestSpec | None = EXAMPLES) -> Problem:
    return Problem(suite="toy", problem_id=pid, split="test", statement="f", prompt=f"# {pid}\n",
                   hidden_tests=EXAMPLES, example_tests=examples)


def record(p: Problem, i: int, program: str, passed: bool) -> CandidateRecord:
    outcome = "passed" if passed else "failed"
    return CandidateRecord(suite=p.suite, split=p.split, problem_id=p.problem_id, difficulty=None, sample_index=i,
                           program=program, outcome=outcome, reward=REWARD[Outcome(outcome)], passed=passed,
                           example_passed=None, rtilde=None, model="toy")


def fixed(name: str, by_program: dict[str, float]) -> NamedRanker:
    """A ranker that scores each program text from a table."""
    return NamedRanker(name, lambda c: [by_program[t] for t in c.programs])


def verdict(status: str, error: str | None = None) -> ExecResult:
    outcome = Outcome(status) if status in {o.value for o in Outcome} else Outcome.RUNTIME_ERROR
    return ExecResult(outcome, REWARD.get(outcome), [TestResult(status, error)])


# ---------------------------------------------------------------------------------------------- known answers
def test_random_is_the_mean_pass_rate_exactly_and_rows_read_against_the_baseline():
    a, b = problem("a"), problem("b")
    records = [record(a, i, f"a{i}", i == 0) for i in range(4)] + [record(b, i, f"b{i}", i < 2) for i in range(3)]
    good = {"a0": 1.0, "a1": 0.0, "a2": 0.0, "a3": 0.0, "b0": 1.0, "b1": 0.0, "b2": 0.0}
    rankers = build_rankers(["random"], RankingInputs()) + [fixed("good", good),
                                                           fixed("good_x2", {k: 2 * v for k, v in good.items()})]
    table = compare_rankers([a, b], records, rankers, baseline="good")
    rows = {r.name: r for r in table.rows}
    assert rows["random"].ranked_pass_at_1 == (1 / 4 + 2 / 3) / 2          # exact, no sampling
    assert rows["good"].ranked_pass_at_1 == 1.0 and rows["good"].reading == "baseline"
    assert rows["random"].vs_baseline.mean == pytest.approx((1 / 4 + 2 / 3) / 2 - 1)
    assert rows["random"].reading == "worse than good"
    # a ranker that orders exactly as the baseline does is reported as restating it
    assert rows["good_x2"].same_pick == 1.0 and rows["good_x2"].reading.startswith("restates good")
    assert "| random | 2 | 45.8 |" in table.markdown()


def test_same_pick_is_exact_over_ties():
    programs = ["x", "y", "x", "z"]
    assert same_pick([1, 1, 0, 0], [0, 0, 0, 0], programs) == pytest.approx(0.5 * 0.5 + 0.5 * 0.25)
    assert same_pick([1, 0, 1, 0], [0, 0, 5, 0], programs) == 1.0          # the same text at another index


def test_majority_vote_picks_the_biggest_behaviour_cluster():
    wrong_5 = verdict("failed", "returned 5, expected 2")
    results = [wrong_5, verdict("passed"), wrong_5, verdict("failed", "returned 7, expected 2"), wrong_5,
               verdict("passed"), verdict("compile_error", "SyntaxError"), None]
    assert majority_vote_scores(results) == [3, 2, 3, 1, 3, 2, 0, 0]
    # programs that only raise produced no output to agree on, however many raise alike
    assert majority_vote_scores([verdict("runtime_error", "ZeroDivisionError")] * 3 + [verdict("passed")]) == \
        [0, 0, 0, 1]


class ScriptedExecutor:
    """Returns each program's example verdict from a table (the executor's batch interface)."""

    def __init__(self, by_program: dict[str, ExecResult]):
        self.by_program, self.jobs = by_program, 0

    def run_batch(self, jobs):
        self.jobs += len(jobs)
        return [self.by_program[program] for program, _ in jobs]


def test_majority_vote_through_the_table_says_where_there_are_no_examples():
    with_examples, without = problem("a"), problem("b", examples=None)
    wrong = verdict("failed", "returned 5, expected 2")
    executor = ScriptedExecutor({"a0": verdict("passed"), "a1": wrong, "a2": wrong, "a3": verdict("passed"),
                                 "a4": wrong})
    records = ([record(with_examples, i, f"a{i}", i in (0, 3)) for i in range(5)]
               + [record(without, i, f"b{i}", i == 0) for i in range(2)])
    rankers = build_rankers(["random", "majority_vote"], RankingInputs(executor=executor))
    rows = {r.name: r for r in compare_rankers([with_examples, without], records, rankers, baseline="random").rows}
    vote = rows["majority_vote"]
    assert vote.n_problems == 1 and vote.ranked_pass_at_1 == 0.0          # the wrong cluster of 3 wins
    assert "no example tests on 1 of 2 problems" in vote.note and executor.jobs == 5
    only_without = [r for r in records if r.problem_id == "b"]
    rows = {r.name: r for r in compare_rankers([without], only_without, rankers, baseline="random").rows}
    assert rows["majority_vote"].ranked_pass_at_1 is None
    assert rows["majority_vote"].reading == "no example tests on any problem"
    no_executor = build_rankers(["majority_vote"], RankingInputs())[0]
    assert no_executor.score is None and "executor" in no_executor.note


class StubLogprobs:
    """Per-token log-probs fixed by program length: 2 tokens at -1 each, 10 tokens at -0.5 each."""

    def __call__(self, prompts, programs):
        return [[-1.0] * len(w) if len(w) == 2 else [-0.5] * len(w) for w in programs]


def test_sum_and_mean_loglik_differ_on_lengths():
    short, long = [1, 2], list(range(10))
    by_sum = LogLikelihoodRanker(StubLogprobs(), "sum").score([[0], [0]], [short, long])
    by_mean = LogLikelihoodRanker(StubLogprobs(), "mean").score([[0], [0]], [short, long])
    assert by_sum == [-2.0, -5.0] and by_mean == [-1.0, -0.5]             # the sum prefers the short one
    with pytest.raises(ValueError, match="reduction must be one of"):
        LogLikelihoodRanker(StubLogprobs(), "max")


# ---------------------------------------------------------------------------------------------- tiny models
@pytest.fixture(scope="module")
def system(tmp_path_factory):
    """θ_ckpt (a tiny GPT-2 with its own tokenizer), a B-Coder run folder (θ, φ perturbed) and a CodeRL one."""
    from envs.registry import load_suite
    from learner_fixtures import tiny_run_folders

    problems = load_suite("embedded", "test", limit=3)
    return {"problems": problems, **tiny_run_folders(tmp_path_factory.mktemp("rankers"), problems)}


def test_token_logprobs_are_the_lms_own(system):
    from bcoder_ray.model.lm import PolicyLM, load_lm

    policy = PolicyLM(load_lm(system["ckpt"]))
    prompt, program = [5, 17, 42], [8, 99, 3, 0]
    got = TokenLogprobs(policy, pad_id=0)([prompt, prompt[1:]], [program, program[:2]])
    with torch.no_grad():
        logits = policy.lm(torch.tensor([prompt + program])).logits[0].log_softmax(-1)
    direct = [float(logits[len(prompt) - 1 + t, w]) for t, w in enumerate(program)]
    assert got[0] == pytest.approx(direct, abs=1e-5) and len(got[1]) == 2


def test_untrained_rtilde_is_the_likelihood_less_the_best_tokens_plus_value_terms(system):
    """R̃ of the Q initialised from θ_ckpt = α·Σ_t [log p(w_t|s_t) − max_a log p(a|s_t)] + V(s_0) + (1−γ)·Σ V(s_t)."""
    from bcoder_ray.algorithms import make_algorithm
    from bcoder_ray.algorithms.base import RunContext
    from bcoder_ray.algorithms.bcoder import ranking
    from bcoder_ray.model.lm import PolicyLM, load_lm

    ctx = RunContext(theta_ckpt=system["ckpt"], tokenizer_path=system["ckpt"], source_len=200, target_len=64)
    algorithm = make_algorithm("bcoder", {"name": "bcoder", "alpha": 2.0}, ctx)
    ref = algorithm.untrained_ranker()
    assert "θ_ckpt's sum log-likelihood" in ref.description
    ranker = algorithm.load_ranker(ref.spec, ref.label)
    prompt, program = [5, 17, 42], [8, 99, 3, 0]
    scores = ranking.token_scores(ranker.model, [prompt], [program], gamma=0.999, pad_id=0)[0]
    policy = PolicyLM(load_lm(system["ckpt"]))
    with torch.no_grad():
        logp = policy.lm(torch.tensor([prompt + program])).logits[0].log_softmax(-1)[len(prompt) - 1:-1]
    taken = sum(float(logp[t, w]) for t, w in enumerate(program))
    best = float(logp.max(-1).values.sum())
    value_terms = scores.value[0] + (1 - 0.999) * sum(scores.value[1:])
    assert scores.total == pytest.approx(2.0 * (taken - best) + value_terms, abs=1e-4)


def test_cli_ranks_one_set_of_candidates_by_every_ranker(tmp_path, system, capsys):
    from bcoder_ray.cli import evaluate as evaluate_cli
    from bcoder_ray.evaluation.report import load_metrics

    common = ["--suite", "embedded", "--split", "test", "--limit", "3", "--m", "4", "--ks", "1",
              "--temperature", "1.0", "--top-p", "1.0", "--max-new-tokens", "12", "--max-prompt-len", "200",
              "--workers", "1", "--run-dir", system["bcoder"], "--rankers", "all", "--rank-with", system["coderl"]]
    assert evaluate_cli.main(common + ["--out", str(tmp_path / "r")]) == 0
    printed = capsys.readouterr().out
    table = json.loads((tmp_path / "r" / "rankers.json").read_text())
    rows = {r["name"]: r for r in table["rows"]}
    assert list(rows) == ["random", "sum_loglik", "mean_loglik", "majority_vote", "bcoder:run_bcoder",
                          "coderl:run_coderl", "bcoder:run_bcoder untrained", "coderl:run_coderl untrained"]
    assert table["baseline"] == "sum_loglik" and table["n_problems"] == 3 and table["m_max"] == 4
    unranked = load_metrics(tmp_path / "r")["overall"]["pass@k"]["1"]      # the candidates, saved once
    assert rows["random"]["ranked_pass@1"] == pytest.approx(unranked, abs=1e-12)
    built = [r for name, r in rows.items() if name != "coderl:run_coderl untrained"]
    assert all(r["ranked_pass@1"] is not None and r["vs_baseline"]["n_problems"] == 3 for r in built)
    assert rows["coderl:run_coderl untrained"]["reading"] == "not built"
    assert "θ_ckpt's sum log-likelihood" in rows["bcoder:run_bcoder untrained"]["note"]
    assert "CodeRL's critic" in rows["coderl:run_coderl"]["note"]
    assert printed.startswith("Rankers side by side") and "| sum_loglik | 3 |" in printed
    # the same candidates read back give the same table; several --rank-with runs are refused outside --rankers
    assert evaluate_cli.main(common + ["--candidates", str(tmp_path / "r"), "--out", str(tmp_path / "again")]) == 0
    assert json.loads((tmp_path / "again" / "rankers.json").read_text()) == table
    with pytest.raises(SystemExit, match="several only with --rankers"):
        evaluate_cli.main(common[:-4] + ["--rank-with", system["bcoder"], system["coderl"], "--out", str(tmp_path)])


def test_a_baseline_that_cannot_be_built_says_why():
    a = problem("a")
    rankers = build_rankers(["random", "sum_loglik"], RankingInputs())  # no sampler: no likelihood
    with pytest.raises(ValueError, match="'sum_loglik': it could not be built: needs the sampling LM"):
        compare_rankers([a], [record(a, 0, "a0", True)], rankers)
    with pytest.raises(ValueError, match="not among the rankers asked for"):
        compare_rankers([a], [record(a, 0, "a0", True)], rankers[:1])
