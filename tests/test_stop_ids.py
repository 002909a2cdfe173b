"""The token ids that end a program: EOS and the others a model's generation config (or `model.eos_token_ids`)
names, through sampling, the sampler's candidates, decoding and the run context."""

from __future__ import annotations

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

from bcoder_ray.algorithms.bcoder.q_model import QModel
from bcoder_ray.model.candidates import SamplingSettings, load_sampler, sample_and_score
from bcoder_ray.loop.components import run_context
from bcoder_ray.config import load_config
from bcoder_ray.model.sampling import sample_programs
from bcoder_ray.model.tokenization import decode_program, program_end, stop_ids
from envs.registry import load_suite
from learner_fixtures import EOS, PAD, tiny_checkpoint

torch.set_num_threads(1)
PROMPTS = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]


def word_tokenizer(directory) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over the tiny checkpoints' 48 ids: <pad> 0, <eos> 1, <unk> 2, then t3 … t47."""
    vocab = {"<pad>": PAD, "<eos>": EOS, "<unk>": 2, **{f"t{i}": i for i in range(3, 48)}}
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>")
    fast.save_pretrained(str(directory))
    return fast


def greedy(model, stop, n_tokens=12):
    return [row[0] for row in sample_programs(model.ckpt, PROMPTS, 1, max_new_tokens=n_tokens, eos_id=stop,
                                              pad_id=PAD, temperature=0.0)]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return tiny_checkpoint("decoder-only", str(tmp_path_factory.mktemp("gpt2")))


def test_sampling_ends_a_program_at_the_first_of_its_stop_ids(checkpoint):
    model = QModel.create(checkpoint, parts=("ckpt",))
    plain = greedy(model, EOS)
    # a token the greedy programs reach before their end: it must end them once it is a stop id
    stop = next(t for row in plain for t in row[1:-1] if t != EOS)
    cut = greedy(model, (EOS, stop))
    assert any(stop in row[:-1] for row in plain)  # the test can fail: without it the programs run past it
    for before, after in zip(plain, cut):
        end = program_end(before, (EOS, stop))
        assert after == (before[: end + 1] if end is not None else before)
        assert stop not in after[:-1] and EOS not in after[:-1]
    assert greedy(model, [EOS]) == plain == greedy(model, EOS)


def test_decoding_stops_at_the_first_stop_id(tmp_path):
    tok = word_tokenizer(tmp_path)
    assert program_end([4, 9, 3, 1], (1, 3)) == 2 and program_end([4, 9], (1, 3)) is None
    assert decode_program(tok, [4, 9, 3, 5, 1], (EOS, 3)) == "t4 t9"
    assert decode_program(tok, [4, 9, 3, 5, 1]) == "t4 t9 t3 t5"  # EOS alone by default
    assert stop_ids(tok, (3, EOS, 3)) == (EOS, 3)


def test_the_sampler_takes_the_stop_ids_of_the_generation_config_or_the_run(checkpoint, tmp_path):
    folder = tmp_path / "instruct"
    lm = AutoModelForCausalLM.from_pretrained(checkpoint)
    lm.generation_config = GenerationConfig(eos_token_id=[EOS, 7], pad_token_id=PAD)
    lm.save_pretrained(folder)
    tokenizer_dir = tmp_path / "tok"
    tok = word_tokenizer(tokenizer_dir)
    sampler = load_sampler(str(folder), tokenizer=str(tokenizer_dir))
    assert sampler.stop_ids == (EOS, 7) == stop_ids(sampler.tokenizer, (7, EOS))
    assert load_sampler(str(folder), tokenizer=str(tokenizer_dir), eos_token_ids=[9]).stop_ids == (EOS, 9)
    assert load_sampler(str(folder), tokenizer=str(tokenizer_dir), eos_token_ids=[]).stop_ids == (EOS,)
    assert decode_program(tok, [4, 7, 5], sampler.stop_ids) == "t4"

    problems = load_suite("embedded", "train")[:2]
    settings = SamplingSettings(m=8, temperature=1.0, top_p=1.0, max_new_tokens=12, max_prompt_len=16, seed=0)
    candidates = sample_and_score(problems, sampler, None, settings)
    assert any(c.program_ids[-1] == 7 for c in candidates)  # some end at the second stop id
    for c in candidates:
        end = program_end(c.program_ids, sampler.stop_ids)
        assert c.truncated == (end is None)
        assert end is None or end == len(c.program_ids) - 1
        assert c.program == decode_program(sampler.tokenizer, c.program_ids, sampler.stop_ids)


def test_model_eos_token_ids_reach_the_run_context(tmp_path):
    cfg = load_config("ci_tiny", ["--model.eos_token_ids", "[5, 6]"])
    assert run_context(cfg, str(tmp_path)).eos_token_ids == (5, 6)
    assert run_context(load_config("ci_tiny", []), str(tmp_path)).eos_token_ids is None
