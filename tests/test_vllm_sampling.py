"""`rollout.engine: vllm` up to the engine's calls. vLLM needs a GPU and its own CUDA torch, so it is neither
installed nor run here: a stand-in `vllm` module records what the engine is asked and answers in vLLM's output
shapes; the candidates path must turn those answers into the same records as the torch sampler's."""

from __future__ import annotations

import math
import sys
import types

import pytest
from transformers import AutoModelForCausalLM, GenerationConfig

from bcoder_ray.model.candidates import SamplingSettings, load_sampler, sample_and_score
from bcoder_ray.config import ConfigError, load_config
from bcoder_ray.model.lm import LoadOptions
from bcoder_ray.model.vllm_sampling import VLLMEngine, completion
from envs.tokenization import TextFormat
from envs.registry import load_suite
from learner_fixtures import EOS, PAD, tiny_checkpoint
from test_stop_ids import word_tokenizer

END_OF_TURN = 7


def out(ids, finish, stop_reason=None):
    return types.SimpleNamespace(token_ids=list(ids), finish_reason=finish, stop_reason=stop_reason,
                                 logprobs=[{t: types.SimpleNamespace(logprob=-0.1 * (i + 1))} for i, t in
                                           enumerate(ids)])


@pytest.fixture
def fake_vllm(monkeypatch):
    calls = []

    class LLM:
        def __init__(self, **kwargs):
            calls.append(("LLM", kwargs))

        def generate(self, prompts, params, use_tqdm):
            calls.append(("generate", prompts, params))
            answers = [[4, 5, EOS], [6, END_OF_TURN], [3, 3, 3, 3]]  # EOS, the end-of-turn id, the length limit
            finish = ["stop", "stop", "length"]
            return [types.SimpleNamespace(outputs=[out(answers[j % 3], finish[j % 3]) for j in range(params.n)])
                    for _ in prompts]

    class SamplingParams:
        def __init__(self, **kwargs):
            self.__dict__.update(kwargs)

    module = types.ModuleType("vllm")
    module.LLM, module.SamplingParams = LLM, SamplingParams
    monkeypatch.setitem(sys.modules, "vllm", module)
    return calls


@pytest.fixture(scope="module")
def policy(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    folder = root / "policy"
    lm = AutoModelForCausalLM.from_pretrained(tiny_checkpoint("decoder-only", str(root / "gpt2")))
    lm.generation_config = GenerationConfig(eos_token_id=[EOS, END_OF_TURN], pad_token_id=PAD)
    lm.save_pretrained(folder)
    word_tokenizer(folder)
    return str(folder)


def test_the_engine_is_asked_for_processed_logprobs_and_every_stop_id(fake_vllm, policy):
    options = LoadOptions(revision="v1", trust_remote_code=True)
    sampler = load_sampler(policy, engine="vllm", seed=3, options=options, dtype=None)
    assert sampler.lm is None and sampler.stop_ids == (EOS, END_OF_TURN)
    (_, init), = fake_vllm
    assert init["logprobs_mode"] == "processed_logprobs" and init["seed"] == 3 and init["dtype"] == "float32"
    assert (init["revision"], init["trust_remote_code"]) == ("v1", True) and init["model"] == policy

    problems = load_suite("embedded", "train")[:2]
    settings = SamplingSettings(m=3, temperature=0.6, top_p=0.95, max_new_tokens=4, max_prompt_len=16, seed=11)
    candidates = sample_and_score(problems, sampler, None, settings, logprobs=True)
    _, prompts, params = fake_vllm[1]
    assert [p["prompt_token_ids"] for p in prompts] == [c.prompt_ids for c in candidates[::3]]
    assert (params.n, params.temperature, params.top_p, params.max_tokens, params.seed) == (3, 0.6, 0.95, 4, 11)
    assert params.stop_token_ids == [EOS, END_OF_TURN] and params.include_stop_str_in_output
    assert params.logprobs == 0
    assert [c.program_ids for c in candidates[:3]] == [[4, 5, EOS], [6, END_OF_TURN], [3, 3, 3, 3]]
    assert [c.truncated for c in candidates[:3]] == [False, False, True]
    assert candidates[1].program == "t6"
    assert candidates[0].logprobs == pytest.approx([-0.1, -0.2, -0.3])


def test_a_completion_is_cut_at_its_first_stop_id_and_an_unalignable_one_refused():
    ids, lps = completion(out([4, EOS, 9], "stop"), (EOS,), 8)
    assert ids == [4, EOS] and lps == pytest.approx([-0.1, -0.2])
    with pytest.raises(RuntimeError, match="hold none of the stop ids"):
        completion(out([4, 5], "stop", stop_reason=END_OF_TURN), (EOS, END_OF_TURN), 8)
    bad = out([4, 5], "length")
    bad.logprobs = bad.logprobs[:1]
    with pytest.raises(RuntimeError, match="2 tokens with 1 log-probabilities"):
        completion(bad, (EOS,), 8)
    assert all(math.isfinite(x) for x in completion(out([4, 5], "length"), (EOS,), 2)[1])


def test_stop_strings_reach_vllm_and_cut_its_completions_as_the_torch_sampler_does(fake_vllm, policy):
    sampler = load_sampler(policy, engine="vllm", text_format=TextFormat(stop_strings=("t5 t",)))
    problems = load_suite("embedded", "train")[:1]
    settings = SamplingSettings(m=3, temperature=0.6, top_p=0.95, max_new_tokens=4, max_prompt_len=16, seed=11)
    candidates = sample_and_score(problems, sampler, None, settings)
    _, _, params = fake_vllm[1]
    assert params.stop == ["t5 t"] and params.detokenize  # vLLM matches stop strings on its own text
    assert [c.program_ids for c in candidates] == [[4, 5, EOS], [6, END_OF_TURN], [3, 3, 3, 3]]  # none holds it

    stops = sampler.stop_strings
    ids, lps = completion(out([4, 5, 6, 9], "stop", stop_reason="t5 t"), (EOS,), 8, stops)
    assert ids == [4, 5, 6] and lps == pytest.approx([-0.1, -0.2, -0.3])  # "t4 t5 t6" completes "t5 t" at t6
    assert completion(out([5, 6, EOS], "stop"), (EOS,), 8, stops)[0] == [5, 6]  # the earlier end wins
    with pytest.raises(RuntimeError, match="complete none of the stop strings"):
        completion(out([4, 5], "stop", stop_reason="t9"), (EOS,), 8, stops)


def test_encoder_decoders_and_a_missing_vllm_are_refused(monkeypatch, tmp_path, policy):
    t5 = tiny_checkpoint("encoder-decoder", str(tmp_path / "t5"))
    with pytest.raises(ValueError, match="serves decoder-only models"):
        VLLMEngine(t5, t5, dtype="float32", seed=0, options=LoadOptions())
    monkeypatch.setitem(sys.modules, "vllm", None)
    with pytest.raises(RuntimeError, match=r"pip install 'bcoder-ray\[vllm\]'"):
        VLLMEngine(policy, policy, dtype="float32", seed=0, options=LoadOptions())


def test_the_config_asks_for_gpu_actors():
    with pytest.raises(ConfigError, match=r"rollout.*engine: vllm needs gpus_per_actor"):
        load_config("ci_tiny", ["--rollout.engine", "vllm"])
    cfg = load_config("ci_tiny", ["--rollout.engine", "vllm", "--rollout.gpus_per_actor", "1"], check_paths=False)
    assert cfg.rollout.engine == "vllm"
