"""The gymnasium token-level MDP: check_env on the four ids, random and scripted episodes, and agreement of the
env's terminal reward with the batch scoring path."""

from __future__ import annotations

import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env
from transformers import ByT5Tokenizer, PreTrainedTokenizerFast

import envs  # noqa: F401  (registers the ids)
from envs.execute import Executor
from envs.registry import load_suite
from envs.result import REWARD, Outcome
from envs.scoring import score_programs
from envs.token_env import TokenEnv
from envs.tokenization import decode_program, encode_program, encode_prompt

APPS_DIR = str(Path(__file__).resolve().parent / "fixtures" / "apps_dir")
SMALL_EMBEDDED = {"n_train": 12, "n_test": 6}
GYM_IDS = {
    "bcoder/APPS-v0": {"suite_options": {"source": APPS_DIR}},
    "bcoder/MBPP-v0": {},
    "bcoder/HumanEval-v0": {},
    "bcoder/Embedded-v0": {"suite_options": SMALL_EMBEDDED},
}


@pytest.fixture(scope="module")
def executor():
    with Executor(workers=2) as ex:
        yield ex


@pytest.fixture(scope="module")
def tokenizer():
    return ByT5Tokenizer()


def play(env: TokenEnv, actions, options=None, seed=None):
    """Step through `actions` (stopping at the end of the episode); return rewards and the last step."""
    obs, info = env.reset(seed=seed, options=options)
    rewards = []
    for a in actions:
        obs, reward, terminated, truncated, info = env.step(a)
        rewards.append(reward)
        if terminated or truncated:
            return rewards, (obs, terminated, truncated, info)
    raise AssertionError("episode did not end")


@pytest.mark.parametrize("gym_id", sorted(GYM_IDS))
def test_check_env_passes_on_every_registered_id(gym_id, tokenizer):
    # no shared executor here: check_env re-makes the env from its spec, deep-copying the kwargs
    env = gym.make(gym_id, tokenizer=tokenizer, max_prompt_len=256, max_program_len=64, **GYM_IDS[gym_id])
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checker's warnings too
        check_env(env.unwrapped)
    env.close()


def test_ids_pick_their_suite_and_default_split(executor, tokenizer):
    expected = {"bcoder/APPS-v0": ("apps", "train"), "bcoder/MBPP-v0": ("mbpp", "train"),
                "bcoder/HumanEval-v0": ("humaneval", "test"), "bcoder/Embedded-v0": ("embedded", "train")}
    for gym_id, (suite, split) in expected.items():
        env = gym.make(gym_id, tokenizer=tokenizer, executor=executor, **GYM_IDS[gym_id]).unwrapped
        assert {(p.suite, p.split) for p in env.problems} == {(suite, split)}
        env.close()


def test_random_policy_episode_gets_the_reward_of_its_program(executor, tokenizer):
    env = TokenEnv("mbpp", "test", suite_options={"limit": 5}, tokenizer=tokenizer, executor=executor,
                   max_program_len=40)
    env.action_space.seed(7)
    obs, info = env.reset(seed=3)
    problem = env.problem
    assert info["problem_id"] == problem.problem_id
    assert list(obs["prompt_ids"][: obs["prompt_length"]]) == encode_prompt(tokenizer, problem.prompt, 1024)
    rewards, steps = [], 0
    while True:
        action = env.action_space.sample()
        obs, reward, terminated, truncated, info = env.step(action)
        steps += 1
        rewards.append(reward)
        assert obs["program_length"] == steps and obs["program_ids"][steps - 1] == action
        if terminated:
            break
    assert not truncated and rewards[:-1] == [0.0] * (steps - 1)
    program = decode_program(tokenizer, obs["program_ids"][:steps])
    assert info["program"] == program
    with Executor(workers=1, cache=False) as fresh:
        expected = score_programs(fresh, [problem], [program])[0]
    assert rewards[-1] == expected.reward == REWARD[Outcome(info["outcome"])]
    assert info["outcome"] == expected.outcome.value
    assert info["length_limit"] == (tokenizer.eos_token_id not in obs["program_ids"][:steps])
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(0)


def _scripted(problem, tokenizer, executor, max_program_len=2048):
    env = TokenEnv(problems=[problem], tokenizer=tokenizer, executor=executor, max_program_len=max_program_len)
    ids = encode_program(tokenizer, problem.references[0], max_program_len)
    return ids, play(env, ids)


@pytest.mark.parametrize("suite, split, options, problem_id", [
    ("mbpp", "test", {}, "11"),
    ("humaneval", "test", {}, "HumanEval/0"),
    ("apps", "train", {"source": APPS_DIR}, "train/0001"),  # standard input
    ("apps", "train", {"source": APPS_DIR}, "train/2404"),  # call-based, class Solution
    ("embedded", "test", SMALL_EMBEDDED, None),
])
def test_typing_a_reference_token_by_token_earns_plus_one(suite, split, options, problem_id, tokenizer, executor):
    problems = load_suite(suite, split, **options)
    problem = next(p for p in problems if problem_id in (None, p.problem_id))
    ids, (rewards, (obs, terminated, truncated, info)) = _scripted(problem, tokenizer, executor)
    assert len(rewards) == len(ids) and ids[-1] == tokenizer.eos_token_id
    assert rewards == [0.0] * (len(ids) - 1) + [1.0]
    assert terminated and not truncated and not info["length_limit"]
    assert info["outcome"] == "passed" and info["program"] == problem.references[0]
    assert info["tests"] and all(t["status"] == "passed" for t in info["tests"])


def test_length_limit_ends_the_episode_and_scores_the_prefix(tokenizer, executor):
    problem = load_suite("mbpp", "test", limit=1)[0]
    ids, (rewards, (obs, terminated, truncated, info)) = _scripted(problem, tokenizer, executor, max_program_len=30)
    assert len(ids) == 30 and tokenizer.eos_token_id not in ids and len(rewards) == 30
    assert terminated and info["length_limit"] and info["program"] == problem.references[0].encode()[:30].decode()
    assert info["outcome"] == "compile_error" and rewards[-1] == -1.0


def test_env_terminal_reward_equals_the_batch_path(tokenizer, executor):
    """Programs typed through the env get exactly what `score_programs` gives them in one batch."""
    mbpp = load_suite("mbpp", "test", limit=2)
    apps_problem = next(p for p in load_suite("apps", "train", source=APPS_DIR) if p.problem_id == "train/0001")
    cases = [(mbpp[0], mbpp[0].references[0]), (mbpp[0], "def remove_Occ(s, ch):\n    return s\n"),
             (mbpp[1], "def max_Sum(x):\n    return x[0]\n"), (mbpp[1], "def (:\n"),
             (apps_problem, "print(-1)\n"), (apps_problem, apps_problem.references[2]),
             (apps_problem, "x = int(input())\nprint(1 // (x - x))\n")]
    env = TokenEnv(problems=[p for p, _ in cases], tokenizer=tokenizer, executor=executor, max_program_len=4096)
    from_env = []
    for i, (problem, program) in enumerate(cases):
        rewards, (_, _, _, info) = play(env, encode_program(tokenizer, program, 4096), options={"problem_index": i})
        from_env.append((rewards[-1], info["outcome"], [t["status"] for t in info["tests"]]))
    with Executor(workers=2, cache=False) as fresh:
        batch = score_programs(fresh, [p for p, _ in cases], [prog for _, prog in cases])
    assert from_env == [(r.reward, r.outcome.value, [t.status for t in r.tests]) for r in batch]
    assert {o for _, o, _ in from_env} == {"passed", "failed", "runtime_error", "compile_error"}


def test_observations_are_fresh_arrays_in_the_space(tokenizer, executor):
    env = TokenEnv("humaneval", "test", tokenizer=tokenizer, executor=executor, max_prompt_len=64,
                   max_program_len=8)
    obs0, _ = env.reset(seed=0, options={"problem_id": "HumanEval/3"})
    assert env.problem.problem_id == "HumanEval/3"
    obs1, *_ = env.step(100)
    obs2, *_ = env.step(101)
    assert obs0 in env.observation_space and obs2 in env.observation_space
    assert obs1["program_ids"][:2].tolist() == [100, env.pad_id] and obs2["program_ids"][:2].tolist() == [100, 101]
    assert obs0["program_length"] == 0 and obs1["program_length"] == 1
    obs2["prompt_ids"][:] = 5  # a caller writing into an observation does not change the env
    assert env.step(102)[0]["prompt_ids"].tolist() == obs1["prompt_ids"].tolist()
    # a long prompt keeps its end (where the answer starts), as in envs.tokenization
    assert obs0["prompt_length"] == 64 and obs0["prompt_ids"][-1] == tokenizer.eos_token_id
    with pytest.raises(ValueError, match="not a token id"):
        env.step(env.vocab_size)
    with pytest.raises(KeyError, match="no problem 'HumanEval/999'"):
        env.reset(options={"problem_id": "HumanEval/999"})


def test_reset_with_a_seed_is_reproducible(tokenizer, executor):
    env = TokenEnv("mbpp", "train", tokenizer=tokenizer, executor=executor)
    picks = [env.reset(seed=s)[1]["problem_id"] for s in (1, 2, 1)]
    assert picks[0] == picks[2]
    assert len({env.reset()[1]["problem_id"] for _ in range(20)}) > 1


def _tiny_bpe_tokenizer(corpus: list[str]) -> PreTrainedTokenizerFast:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def test_the_tokenizer_is_a_constructor_argument(executor):
    problem = load_suite("mbpp", "test", limit=1)[0]
    tokenizer = _tiny_bpe_tokenizer([problem.prompt, problem.references[0]])
    ids, (rewards, (_, _, _, info)) = _scripted(problem, tokenizer, executor)
    env = TokenEnv(problems=[problem], tokenizer=tokenizer, executor=executor)
    assert env.action_space.n == len(tokenizer) and len(ids) < len(problem.references[0])
    assert rewards[-1] == 1.0 and info["program"] == problem.references[0]


def test_default_tokenizer_is_byt5_and_the_env_owns_its_executor():
    env = gym.make("bcoder/MBPP-v0", suite_options={"limit": 1}, split="test")
    inner = env.unwrapped
    assert isinstance(inner.tokenizer, ByT5Tokenizer) and inner.action_space.n == 384
    rewards, (_, _, _, info) = play(env, [inner.eos_id], seed=0)  # the empty program
    assert info["program"] == "" and info["outcome"] in ("runtime_error", "failed")
    assert rewards == [REWARD[Outcome(info["outcome"])]]
    env.close()
    assert inner._executor is None


def test_render_ansi_shows_prompt_and_program(tokenizer, executor):
    env = TokenEnv("mbpp", "test", suite_options={"limit": 1}, tokenizer=tokenizer, executor=executor,
                   render_mode="ansi")
    env.reset(seed=0)
    for a in tokenizer("def", add_special_tokens=False)["input_ids"]:
        env.step(a)
    assert env.render() == env.problem.prompt + "def"
    assert isinstance(np.asarray(env.reset()[0]["prompt_ids"]), np.ndarray)


def test_an_extra_stop_id_ends_the_episode_like_eos(tokenizer, executor):
    """An instruct model's end-of-turn token (here ByT5's <unk>, id 2, a special token) ends the episode: the
    program before it is executed and the episode is not at its length limit."""
    problem = load_suite("mbpp", "test", limit=1)[0]
    end_of_turn = tokenizer.unk_token_id
    env = TokenEnv(problems=[problem], tokenizer=tokenizer, executor=executor, extra_stop_ids=[end_of_turn])
    assert env.stop_ids == (tokenizer.eos_token_id, end_of_turn)
    body = encode_program(tokenizer, problem.references[0], 10_000)[:-1]
    rewards, (obs, terminated, truncated, info) = play(env, body + [end_of_turn])
    assert len(rewards) == len(body) + 1 and rewards[-1] == 1.0
    assert terminated and not info["length_limit"] and info["program"] == problem.references[0]
    plain = TokenEnv(problems=[problem], tokenizer=tokenizer, executor=executor, max_program_len=len(body) + 2)
    rewards, (_, _, _, info) = play(plain, body + [end_of_turn, end_of_turn])  # without it: not an end
    assert len(rewards) == len(body) + 2 and info["length_limit"]
