"""The CodeRL plug-in (bcoder_ray/algorithms/coderl/algorithm.py): the actor stage's loss on a hand-made batch, the greedy
baselines' rows and keys from a rollout, the baseline-reward lookup, the critic ranker, the plan, sampling from a
prefix, and the refusal of Critic Sampling where there are no example tests."""

from __future__ import annotations

import dataclasses

import pyarrow as pa
import pytest
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import PreTrainedTokenizerFast

from bcoder_ray.algorithms import make_algorithm
from bcoder_ray.algorithms.base import RunContext
from bcoder_ray.algorithms.coderl.algorithm import (ActorStage, CodeRL, CodeRLConfig, CriticRanker, baseline_rewards,
                                          load_trainable_lm)
from bcoder_ray.algorithms.common import policy_forward
from bcoder_ray.algorithms.coderl.critic import Critic, p_passed
from bcoder_ray.algorithms.coderl.critic_sampling import CriticSamplingRefused
from bcoder_ray.buffer.filters import Filters
from bcoder_ray.model.batch import collate
from tests.learner_fixtures import EOS, PAD, tiny_checkpoint


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return tiny_checkpoint("decoder-only", str(tmp_path_factory.mktemp("gpt2")))


def _rows():
    """Ground-truth human, failing human (in no term), two generated samples with q̂ and r(W^b) targets."""
    return [
        {"prompt_ids": [5, 6, 7], "program_ids": [8, 9, EOS], "reward": 1.0, "is_human": True,
         "q_hat": [0.0] * 3, "r_baseline": [0.0] * 3},
        {"prompt_ids": [12, 13], "program_ids": [17, 18, 19, EOS], "reward": -0.3, "is_human": True,
         "q_hat": [0.0] * 4, "r_baseline": [0.0] * 4},
        {"prompt_ids": [5, 6, 7], "program_ids": [20, 21, 22, 23, EOS], "reward": 1.0, "is_human": False,
         "q_hat": [0.9, 0.8, 0.7, 0.6, 0.5], "r_baseline": [-0.3] * 5},
        {"prompt_ids": [18], "program_ids": [24, 25], "reward": -1.0, "is_human": False,
         "q_hat": [0.2, 0.4], "r_baseline": [-0.6] * 2},
    ]


def _batch():
    return collate(_rows(), PAD, token_columns=("q_hat", "r_baseline"))


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_actor_stage_loss_is_eq_8_plus_10_on_a_hand_made_batch(gpt2, reduction):
    cfg = CodeRLConfig(ce_weight=1.0, rl_weight=0.5, reduction=reduction)
    stage = ActorStage(load_trainable_lm(gpt2), cfg)
    batch = _batch()
    loss, metrics = stage(batch)
    lp = policy_forward(stage.policy, batch).logprobs.detach()
    rows = _rows()

    def program_sum(b, weights=None):
        n = len(rows[b]["program_ids"])
        w = weights or [1.0] * n
        total = sum(float(lp[b, t]) * w[t] for t in range(n))
        return total / n if reduction == "mean" else total

    l_ce = -program_sum(0)                                           # row 1 (a failing human) is in no term
    l_rl = -((1.0 - -0.3) * program_sum(2, rows[2]["q_hat"]) + (-1.0 - -0.6) * program_sum(3, rows[3]["q_hat"])) / 2
    assert metrics["l_ce"] == pytest.approx(l_ce, rel=1e-5)
    assert metrics["l_rl"] == pytest.approx(l_rl, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(l_ce + 0.5 * l_rl, rel=1e-5)
    assert metrics["n_ground_truth"] == 1 and metrics["n_generated"] == 2
    loss.backward()
    assert all(p.grad is not None for p in stage.trainable_parameters())


def test_actor_stage_without_baseline_and_weights_is_plain_reinforce(gpt2):
    stage = ActorStage(load_trainable_lm(gpt2), CodeRLConfig(use_baseline=False, use_critic_weights=False))
    batch = collate([{k: v for k, v in r.items() if k not in ("q_hat", "r_baseline")} for r in _rows()], PAD)
    loss, metrics = stage(batch)
    lp = policy_forward(stage.policy, batch).logprobs.detach()
    reinforce = -(1.0 * float(lp[2].sum()) + -1.0 * float(lp[3].sum())) / 2
    assert metrics["l_rl"] == pytest.approx(reinforce, rel=1e-5)
    assert float(loss.detach()) == pytest.approx(-float(lp[0].sum()) + reinforce, rel=1e-5)


def _lookup_table():
    rows = [  # sample_id, source, decoding, suite, problem_id, policy_version, outcome, reward
        ("s1", "generated", "sample", "emb", "p1", "0", "passed", 1.0),
        ("s2", "generated", "sample", "emb", "p1", "1", "failed", -0.3),
        ("g1", "generated", "greedy", "emb", "p1", "0", "runtime_error", -0.6),
        ("g2", "generated", "greedy", "emb", "p1", "1", "passed", 1.0),
        ("s3", "generated", None, "emb", "p2", "0", "compile_error", -1.0),   # null decoding reads as sample
        ("h1", "human", "sample", "emb", "p2", "human", "passed", 1.0),
    ]
    names = ["sample_id", "source", "decoding", "suite", "problem_id", "policy_version", "outcome", "reward"]
    return pa.table({n: [r[i] for r in rows] for i, n in enumerate(names)})


def test_baseline_reward_is_the_greedy_decode_of_the_same_problem_by_the_same_policy():
    found = baseline_rewards(_lookup_table(), ["s1", "s2", "s3", "h1", "nope"])
    assert found[0]["baseline"] == -0.6 and found[0]["outcome"] == "passed"     # p1, version 0 → g1
    assert found[1]["baseline"] == 1.0 and found[1]["reward"] == -0.3            # p1, version 1 → g2
    assert found[2]["baseline"] is None and found[2]["outcome"] == "compile_error"  # p2 has no greedy row
    assert found[3] is None and found[4] is None                                 # human / unknown rows


def test_critic_ranker_scores_are_the_pooled_p_passed_in_order(gpt2):
    critic = Critic.create(gpt2, seed=3).eval()
    prompts = [[5, 6, 7], [12], [5, 6, 7]]
    programs = [[8, 9, EOS], [17, 18, 19, 20, EOS], [30]]
    expected = p_passed(critic, collate([{"prompt_ids": p, "program_ids": w, "reward": 0.0, "is_human": False}
                                         for p, w in zip(prompts, programs)], PAD)).tolist()
    for batch_size in (1, 16):
        got = CriticRanker(critic, PAD, "critic", batch_size=batch_size).score(prompts, programs)
        assert got == pytest.approx(expected, abs=1e-6)


def _ctx(path, **kw):
    return RunContext(theta_ckpt=path, tokenizer_path=path, source_len=16, target_len=8, **kw)


def test_plan_critic_once_then_actor_with_targets_bound_to_the_critic(gpt2):
    algo = make_algorithm("coderl", {"name": "coderl"}, _ctx(gpt2, buffer_uri="/tmp/b"))
    assert algo.rollout_request().greedy_baseline
    first = algo.plan_iteration(0, {}, "0")
    assert [p.name for p in first] == ["critic", "critic_test", "actor"]
    assert first[0].rows.filters == Filters(sources=("generated",), decoding=("sample",), iteration_min=0,
                                            iteration_max=0) and first[0].rows.extra_columns == ("outcome",)
    state = {"critic": "/ck/critic", "critic_iteration": 0, "critic_test": "/ck/t", "actor": "/ck/actor"}
    later = algo.plan_iteration(1, state, "1")
    assert [p.name for p in later] == ["actor"] and later[0].spec["actor_dir"] == "/ck/actor"
    bound = algo.prepare_stage(later[0], state)
    assert bound.targets.spec["critic_dir"] == "/ck/critic" and bound.rows.token_columns == ("q_hat", "r_baseline")
    assert bound.targets.rows.filters == bound.rows.filters == Filters(decoding=("sample",), iteration_min=0,
                                                                       iteration_max=0)
    other = algo.prepare_stage(later[0], {**state, "critic": "/ck/critic2"})
    assert other.targets.fingerprint != bound.targets.fingerprint          # the fingerprint covers the critic
    assert algo.policy(state) == "/ck/actor" and algo.ranker(state).spec == {"critic_dir": "/ck/critic"}
    current = make_algorithm("coderl", {"name": "coderl", "rows": "current_policy", "critic_retrain_every": 2},
                             _ctx(gpt2))
    assert current.actor_rows(3).filters.iteration_min == 3
    assert [p.name for p in current.plan_iteration(2, state, "2")][0] == "critic"
    assert make_algorithm("coderl", {"name": "coderl", "rows": "all"},
                          _ctx(gpt2)).actor_rows(3).filters.iteration_min is None
    off = make_algorithm("coderl", {"name": "coderl", "use_baseline": False, "use_critic_weights": False},
                         _ctx(gpt2))
    assert not off.rollout_request().greedy_baseline and off.prepare_stage(later[0], state).targets is None


def _tokenizer_dir(path, extra: str = "") -> str:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "def": 3, "f": 4, **({extra: 5} if extra else {})}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(str(path))
    return str(path)


def test_a_critic_checkpoint_with_another_tokenizer_is_refused_before_work(tmp_path):
    actor, other = _tokenizer_dir(tmp_path / "actor"), _tokenizer_dir(tmp_path / "other", extra="return")
    with pytest.raises(ValueError, match="differs from the actor"):
        make_algorithm("coderl", {"name": "coderl", "critic_checkpoint": other}, _ctx(actor))
    make_algorithm("coderl", {"name": "coderl", "critic_checkpoint": _tokenizer_dir(tmp_path / "same")}, _ctx(actor))
    with pytest.raises(ValueError, match="not a directory"):
        CodeRLConfig(critic_checkpoint=str(tmp_path / "missing"))


# ---------------------------------------------------------------------------------------------- rollout
def test_greedy_baselines_are_stored_once_per_problem_under_the_tasks_key(tmp_path):
    from bcoder_ray.algorithms.base import RolloutRequest
    from bcoder_ray.buffer import ReplayBuffer, prompt_rows
    from bcoder_ray.model.candidates import ScoredCandidate
    from bcoder_ray.loop.rollout import PolicyRef, PolicyWorker, WorkerArgs, make_tasks
    from bcoder_ray.model.candidates import SamplingSettings
    from envs.registry import load_suite
    from envs.result import REWARD, ExecResult, Outcome

    problems = load_suite("embedded", "train")[:3]
    tok_dir = _tokenizer_dir(tmp_path / "tok")
    calls = []

    class StubWorker(PolicyWorker):
        def _score(self, split, task, policy, sampling, *, examples, ranker=None, logprobs=False,
                   decoding="sample", m=None, first_failure=False):
            calls.append((task.key, decoding, m))
            out = []
            for i in task.problem_indices:
                for j in range(m or sampling.m):
                    outcome = Outcome.PASSED if decoding == "greedy" else Outcome.FAILED
                    ids = [3, 4 + j, 1] if decoding == "sample" else [3, 1]
                    out.append(ScoredCandidate(problem=problems[i], sample_index=j, prompt_ids=[3],
                                               program_ids=ids, program=f"def f{j} {decoding}",
                                               result=ExecResult(outcome, REWARD[outcome]), example_result=None,
                                               rtilde=None, model="stub", ranker=None, decoding=decoding))
            return out

    buffer = ReplayBuffer(str(tmp_path / "buffer"))
    from transformers import AutoTokenizer

    buffer.put_prompts(prompt_rows(problems, AutoTokenizer.from_pretrained(tok_dir), max_len=16))
    worker = StubWorker(WorkerArgs(problems={"train": problems},
                                   context=RunContext(theta_ckpt=tok_dir, tokenizer_path=tok_dir, source_len=16,
                                                      target_len=8, buffer_uri=str(tmp_path / "buffer"))))
    tasks = make_tasks("it0", range(3), 2, 0, seed=0)
    assert tasks == make_tasks("it0", range(3), 2, 0, seed=0)                     # a redone task: same key
    policy = PolicyRef(path="ckpt", version="0")
    sampling = SamplingSettings(m=2, temperature=1.0, top_p=1.0, max_new_tokens=8)
    request = CodeRL(CodeRLConfig(), None).rollout_request()
    assert request == RolloutRequest(greedy_baseline=True)
    first = [worker.rollout(t, policy, sampling, request) for t in tasks]
    again = [worker.rollout(t, policy, sampling, request) for t in tasks]
    assert [s["greedy"] for s in first] == [2, 1] and [s["written"] for s in first] == [6, 3]
    assert [s["written"] for s in again] == [0, 0]                               # nothing twice
    assert ("it0-t0000", "greedy", 1) in calls
    rows = buffer.read(columns=["problem_id", "decoding", "policy_version", "iteration", "reward"]).to_pylist()
    greedy = [r for r in rows if r["decoding"] == "greedy"]
    assert sorted(r["problem_id"] for r in greedy) == sorted(p.problem_id for p in problems)
    assert all(r["policy_version"] == "0" and r["iteration"] == 0 for r in rows)
    assert sum(r["decoding"] == "sample" for r in rows) == 6


# ---------------------------------------------------------------------------------------------- sampling
@pytest.mark.parametrize("kind", ["decoder-only", "encoder-decoder"])
def test_sampling_from_a_prefix_continues_it(tmp_path, kind):
    from bcoder_ray.algorithms.bcoder.q_model import QModel
    from bcoder_ray.model.sampling import sample_programs

    model = QModel.create(tiny_checkpoint(kind, str(tmp_path / kind)), parts=("ckpt",))
    prompts = [[5, 6, 7]]
    kw = dict(max_new_tokens=6, eos_id=EOS, pad_id=PAD)
    model = model.ckpt
    greedy = sample_programs(model, prompts, 1, temperature=0.0, **kw)[0][0]
    assert len(greedy) >= 3
    # greedy decoding from the greedy program's own first tokens gives the same program
    assert sample_programs(model, prompts, 1, temperature=0.0, prefix=greedy[:2], **kw)[0][0] == greedy
    sampled = sample_programs(model, prompts, 4, temperature=1.0, seed=3, prefix=[9, 10], **kw)[0]
    assert all(p[:2] == [9, 10] and 3 <= len(p) <= 6 for p in sampled)
    with pytest.raises(ValueError, match="prefix"):
        sample_programs(model, prompts, 1, prefix=[9] * 6, **kw)


def test_critic_sampling_is_refused_without_example_tests():
    from bcoder_ray.algorithms.coderl.inference import require_examples
    from envs.registry import load_suite

    problems = load_suite("embedded", "test")[:2]
    bare = [dataclasses.replace(p, example_tests=None) for p in problems]
    with pytest.raises(CriticSamplingRefused, match="carry no example tests"):
        require_examples(bare)
    with pytest.raises(CriticSamplingRefused, match="no example tests"):
        require_examples([problems[0], bare[1]])
    if all(p.example_tests for p in problems):
        require_examples(problems)


def _word_tokenizer(path) -> str:
    words = ["<pad>", "<eos>", "<unk>", "def", "return", "f", "x", "(", ")", ":", "+", "1", "=", "assert", "==",
             "s", "[", "]", ",", "'", "a", "b", "for", "in", "if", "not"]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(str(path))
    return str(path)


def test_critic_sampling_beside_plain_sampling_at_the_same_budget(gpt2, tmp_path):
    from bcoder_ray.model.candidates import SamplingSettings, load_sampler
    from bcoder_ray.algorithms.coderl.critic import BINARY_CLASSES
    from bcoder_ray.algorithms.coderl.inference import compare_with_plain, summary_lines
    from bcoder_ray.evaluation.metrics import read_candidates
    from envs.execute import Executor
    from envs.registry import load_suite

    problems = load_suite("embedded", "test")[:2]
    sampler = load_sampler(gpt2, tokenizer=_word_tokenizer(tmp_path / "tok"), label="tiny")
    critic = Critic.create(gpt2, classes=BINARY_CLASSES, seed=1).eval()
    settings = SamplingSettings(m=3, temperature=1.0, top_p=1.0, max_prompt_len=32, max_new_tokens=8, seed=5)
    with Executor(workers=1) as ex:
        out = compare_with_plain(problems, sampler, ex, settings, critic, n=3, rounds=2, out_dir=tmp_path / "cs",
                                 ks=(1,))
    assert out["budget"] == 6
    for arm in ("critic_sampling", "plain"):
        records = read_candidates(tmp_path / "cs" / arm)
        assert len(records) == 2 * 6 and all(r.rtilde is not None and r.example_passed is not None for r in records)
        assert set(out[arm]["overall"]["n@k"]) == {"1@6", "5@6"}
    rounds = out["critic_sampling"]["rounds"]
    assert [sum(r["counts"]) for p in rounds for r in p["rounds"]] == [3, 3, 3, 3]
    assert len(summary_lines(out)) == 2


def test_actor_targets_read_outcomes_and_greedy_rewards_from_the_buffer(gpt2, tmp_path):
    from bcoder_ray.algorithms.coderl.algorithm import ActorTargets
    from bcoder_ray.algorithms.coderl.critic import FOUR_CLASSES, outcome_labels, token_values
    from bcoder_ray.buffer import ReplayBuffer, make_row
    from envs.registry import load_suite
    from envs.result import REWARD, ExecResult, Outcome

    p0, p1 = load_suite("embedded", "train")[:2]
    buffer = ReplayBuffer(str(tmp_path / "buffer"))

    def row(problem, ids, outcome, version, decoding="sample", source="generated"):
        return make_row(problem, "x", ids, ExecResult(outcome, REWARD[outcome]), source=source, tokenizer_hash="t",
                        iteration=int(version) if version.isdigit() else 0, policy_version=version, actor="a",
                        sampling="{}", decoding=decoding)

    buffer.append([row(p0, [3, 4, EOS], Outcome.FAILED, "0"), row(p0, [5, EOS], Outcome.COMPILE_ERROR, "0"),
                   row(p0, [6, EOS], Outcome.RUNTIME_ERROR, "0", "greedy"), row(p1, [7, EOS], Outcome.PASSED, "0"),
                   row(p0, [8, 9, EOS], Outcome.PASSED, "human", source="human")], batch_key="it0-t0000")
    critic_dir = str(tmp_path / "critic")
    Critic.create(gpt2, seed=2).save(critic_dir)
    targets = ActorTargets({"critic_dir": critic_dir, "use_critic": True, "use_baseline": True},
                           str(tmp_path / "buffer"))

    def batch_of(wanted):
        table = buffer.read(columns=["sample_id", "source", "program_ids", "reward", "policy_version", "problem_id",
                                     "decoding"]).to_pylist()
        rows = [r for r in table if wanted(r)]
        return rows, collate([{**r, "prompt_ids": [3, 4]} for r in rows], PAD, info_columns=("sample_id", "source"))

    rows, batch = batch_of(lambda r: r["problem_id"] == p0.problem_id and r["decoding"] == "sample")
    out = targets(batch)
    for b, r in enumerate(rows):
        n = len(r["program_ids"])
        if r["source"] == "human":
            assert out["q_hat"][b] == [0.0] * n and out["r_baseline"][b] == [0.0] * n
            continue
        assert out["r_baseline"][b] == [REWARD[Outcome.RUNTIME_ERROR]] * n       # the greedy row of p0, v0
        u = "failed" if r["reward"] == REWARD[Outcome.FAILED] else "compile_error"
        q = token_values(targets.critic, batch, outcome_labels([u] * batch.size, FOUR_CLASSES))[b, :n].tolist()
        assert out["q_hat"][b] == pytest.approx(q, abs=1e-6)
    _, lone = batch_of(lambda r: r["problem_id"] == p1.problem_id)
    with pytest.raises(ValueError, match="no greedy row"):
        targets(lone)
    # rows appended after the lookup was read (a later iteration) are found: the lookup reloads on a miss
    buffer.append([row(p1, [9, EOS], Outcome.FAILED, "1"), row(p1, [10, EOS], Outcome.PASSED, "1", "greedy")],
                  batch_key="it1-t0000")
    _, later = batch_of(lambda r: r["policy_version"] == "1" and r["decoding"] == "sample")
    assert targets(later)["r_baseline"] == [[1.0, 1.0]]
