"""Stop strings and chat templates (`envs.tokenization.TextFormat`): where a stop string ends a program (against
a full-text reference, on byte-level, SentencePiece-style and word-level tokenizers), the samplers and the env
ending programs there, chat-templated prompts whole under truncation, and the rows' tokenizer_hash keeping a
chat run's prompts apart from a plain run's in one buffer."""

from __future__ import annotations

import random

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import ByT5Tokenizer, PreTrainedTokenizerFast

from bcoder_ray.algorithms.bcoder.q_model import QModel
from bcoder_ray.buffer import ReplayBuffer, prompt_rows
from bcoder_ray.model.candidates import Sampler, SamplingSettings, sample_and_score
from bcoder_ray.loop.components import run_context
from bcoder_ray.config import ConfigError, load_config
from bcoder_ray.buffer.human_seed import human_rows, stopped_references
from bcoder_ray.model.sampling import sample_programs
from bcoder_ray.model.tokenization import (StopStrings, TextFormat, decode_program, encode_prompt, stop_ids,
                                    tokenizer_fingerprint)
from envs.execute import Executor
from envs.registry import load_suite
from envs.token_env import TokenEnv
from learner_fixtures import EOS, PAD, tiny_checkpoint
from test_stop_ids import word_tokenizer

torch.set_num_threads(1)

CORPUS = [
    "def add(a, b):\n    return a + b\n```\nThat adds them.",
    "x = int(input())\nprint(x * 2)\n[DONE]\n",
    "# read the numbers\nnums = list(map(int, input().split()))\nprint(sum(nums))\n",
    "```python\nfor i in range(3):\n    print(i)\n```",
    "class A:\n    def f(self):\n        return 'é ünïcode'  # not ascii\n\ndef g():\n    return 1\n",
]
STOPS = ("```", "[DONE]", "\ndef", " return")
CHAT = ("{{ bos_token }}{% for m in messages %}<|user|>{{ m['content'] }}<|end|>{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>{% endif %}")


def trained(kind: str) -> PreTrainedTokenizerFast:
    """A BPE tokenizer trained on CORPUS: "byte" level as GPT-2 / Qwen2, or "metaspace" as SentencePiece (whose
    decoding drops the leading space of a text's first token)."""
    specials = ["<pad>", "<eos>", "<unk>", "<s>", "<|user|>", "<|end|>", "<|assistant|>"]
    if kind == "byte":
        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=420, special_tokens=specials,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    else:
        tok = Tokenizer(models.BPE(unk_token="<unk>"))
        tok.pre_tokenizer = pre_tokenizers.Metaspace()
        tok.decoder = decoders.Metaspace()
        trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=specials)
    tok.train_from_iterator(CORPUS * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 3)])
    assert tok.token_to_id("<s>") == 3
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>", unk_token="<unk>",
                                   bos_token="<s>")


def reference_end(tok, ids, strings):
    """The first token after which the text of the whole prefix holds a stop string."""
    return next((t for t in range(len(ids))
                 if any(s in tok.decode(ids[:t + 1], skip_special_tokens=True, clean_up_tokenization_spaces=False)
                        for s in strings)), None)


@pytest.mark.parametrize("kind", ["byte", "metaspace", "byt5"])
def test_a_stop_string_ends_a_program_where_the_whole_text_first_holds_it(kind):
    tok = ByT5Tokenizer() if kind == "byt5" else trained(kind)
    stops = StopStrings(tok, STOPS)
    special = set(tok.all_special_ids)
    ordinary = [i for i in range(len(tok)) if i not in special]
    rng = random.Random(0)
    cases = [tok(text, add_special_tokens=False)["input_ids"] for text in CORPUS]
    cases += [[rng.choice(ordinary) for _ in range(rng.randint(1, 40))] for _ in range(150)]
    found = 0
    for ids in cases:
        end = stops.end(ids)
        assert end == reference_end(tok, ids, STOPS), tok.decode(ids)
        found += end is not None
        text = tok.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)
        cut = decode_program(tok, ids, stop=(), stop_strings=STOPS)
        assert text.startswith(cut) and not any(s in cut for s in STOPS)
        assert (cut == text) == (end is None)
    assert found >= 4  # the corpus programs hold stop strings: the check can fail


def test_decoding_cuts_before_the_first_stop_string():
    tok = ByT5Tokenizer()
    ids = tok("print(1)\n```\nmore [DONE]", add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    assert decode_program(tok, ids, stop_strings=("[DONE]", "```")) == "print(1)\n"
    assert decode_program(tok, ids, stop_strings=("[DONE]",)) == "print(1)\n```\nmore "
    assert decode_program(tok, ids) == "print(1)\n```\nmore [DONE]"
    with pytest.raises(ValueError, match="non-empty"):
        TextFormat(stop_strings=("",))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("text_format")
    return {kind: tiny_checkpoint(kind, str(root / kind)) for kind in ("decoder-only", "encoder-decoder")}


@pytest.mark.parametrize("kind", ["decoder-only", "encoder-decoder"])
def test_sampling_with_stop_strings_is_sampling_cut_where_one_completes(checkpoints, kind, tmp_path):
    tok = word_tokenizer(tmp_path)  # "t5 t9 ..." : a stop string of two words spans two tokens
    model = QModel.create(checkpoints[kind], parts=("ckpt",))
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13]]
    kwargs = dict(max_new_tokens=12, eos_id=EOS, pad_id=PAD, temperature=1.0, seed=3, return_logprobs=True)
    model = model.ckpt
    plain, plain_lps = sample_programs(model, prompts, 4, **kwargs)
    rows = [p for per in plain for p in per]
    bigrams = [f"t{a} t{b}" for row in rows for a, b in zip(row, row[1:]) if EOS not in (a, b)]
    strings = tuple(sorted(set(bigrams), key=bigrams.count)[-2:])  # the two most frequent: several programs hold one
    stops = StopStrings(tok, strings)
    cut, cut_lps = sample_programs(model, prompts, 4, stop_strings=stops, **kwargs)
    shortened = 0
    for before, lps, after, after_lps in zip(rows, [x for per in plain_lps for x in per],
                                             [p for per in cut for p in per], [x for per in cut_lps for x in per]):
        end = stops.end(before)
        assert after == (before[:end + 1] if end is not None else before)
        assert after_lps == lps[:len(after)]
        shortened += len(after) < len(before)
    assert shortened >= 2


def test_the_sampler_decodes_flags_and_records_stop_string_ends(checkpoints, tmp_path):
    tok = word_tokenizer(tmp_path)
    model = QModel.create(checkpoints["decoder-only"], parts=("ckpt",))
    plain = Sampler(lm=model.ckpt, tokenizer=tok, label="p", path="p", stop_ids=stop_ids(tok))
    problems = load_suite("embedded", "train")[:2]
    settings = SamplingSettings(m=8, temperature=1.0, top_p=1.0, max_new_tokens=12, max_prompt_len=16, seed=0)
    programs = [c.program_ids for c in sample_and_score(problems, plain, None, settings)]
    word = max({f"t{t}" for p in programs for t in p[1:] if t != EOS}, key=lambda w: sum(
        w in tok.decode(p) for p in programs))
    sampler = Sampler(lm=model.ckpt, tokenizer=tok, label="s", path="s", stop_ids=stop_ids(tok),
                      text_format=TextFormat(stop_strings=(" " + word,)))
    candidates = sample_and_score(problems, sampler, None, settings)
    stopped = [c for c in candidates if c.program_ids[-1] != EOS and not c.truncated]
    assert stopped  # some programs end at the stop string
    stop = " " + word
    for c in candidates:
        text, before = (tok.decode(ids, skip_special_tokens=True) for ids in (c.program_ids, c.program_ids[:-1]))
        assert c.program == text.split(stop)[0] and stop not in before
        if c.truncated:
            assert len(c.program_ids) == settings.max_new_tokens and stop not in text and EOS not in c.program_ids
        else:
            assert (c.program_ids[-1] == EOS) != (stop in text)


def test_the_env_ends_an_episode_at_a_stop_string():
    problem = next(p for p in load_suite("mbpp", "test") if p.references)
    tok = ByT5Tokenizer()
    typed = tok(problem.references[0] + "\n```\nprint('after the fence')", add_special_tokens=False)["input_ids"]
    with Executor(workers=1) as ex:
        env = TokenEnv(problems=[problem], tokenizer=tok, executor=ex, max_program_len=4096, stop_strings=("```",))
        env.reset(seed=0)
        for i, token in enumerate(typed):
            _, reward, terminated, truncated, info = env.step(token)
            if terminated:
                break
    assert i == len(tok(problem.references[0] + "\n```", add_special_tokens=False)["input_ids"]) - 1
    assert info["program"] == problem.references[0] + "\n" and not info["length_limit"]
    assert reward == 1.0 and info["outcome"] == "passed"


# ---------------------------------------------------------------------------------------------- chat templates
@pytest.fixture(scope="module")
def chat_tokenizer():
    tok = trained("metaspace")
    tok.chat_template = CHAT
    return tok


def test_a_chat_prompt_is_the_template_with_one_bos(chat_tokenizer):
    tok, text = chat_tokenizer, CORPUS[1]
    ids = encode_prompt(tok, text, 500, chat_template=True)
    rendered = tok.apply_chat_template([{"role": "user", "content": text}], tokenize=False, add_generation_prompt=True)
    assert ids == tok(rendered, add_special_tokens=False)["input_ids"]
    assert ids[:2] == [tok.bos_token_id, tok.convert_tokens_to_ids("<|user|>")] and ids.count(tok.bos_token_id) == 1
    assert ids[-2:] == tok.convert_tokens_to_ids(["<|end|>", "<|assistant|>"])
    assert encode_prompt(tok, text, 500)[0] == tok.bos_token_id  # the plain prompt: the tokenizer's own BOS


@pytest.mark.parametrize("max_len", [12, 25, 40])
def test_a_long_chat_prompt_loses_the_start_of_its_text_never_the_template(chat_tokenizer, max_len):
    tok = chat_tokenizer
    text = " ".join(CORPUS)
    ids = encode_prompt(tok, text, max_len, chat_template=True)
    assert len(ids) <= max_len and len(tok(text)["input_ids"]) > max_len
    head = [tok.bos_token_id, tok.convert_tokens_to_ids("<|user|>")]
    tail = tok.convert_tokens_to_ids(["<|end|>", "<|assistant|>"])
    assert ids[:2] == head and ids[-2:] == tail
    kept = tok.decode(ids[2:-2], clean_up_tokenization_spaces=False)
    assert kept and text.endswith(kept.lstrip()) and len(ids) >= max_len - 2  # the budget is used, the end kept
    with pytest.raises(ValueError, match="model.source_len"):
        encode_prompt(tok, text, 3, chat_template=True)


@pytest.mark.parametrize("max_len", [500, 25])
def test_a_response_prefix_ends_every_prompt_and_keys_the_rows(chat_tokenizer, max_len):
    tok, text, prefix = chat_tokenizer, " ".join(CORPUS), "t1 t2"
    fmt = TextFormat(chat_template=True, response_prefix=prefix)
    ids = fmt.prompt_ids(tok, text, max_len)
    bare = encode_prompt(tok, text, max_len - len(tok(prefix, add_special_tokens=False)["input_ids"]),
                         chat_template=True)
    rendered = tok.decode(ids, clean_up_tokenization_spaces=False)
    assert len(ids) <= max_len and rendered.endswith("<|assistant|>" + prefix) or rendered.endswith(prefix)
    assert ids[:len(bare)] == bare  # the template's prompt, then the prefix: the long text lost its start only
    plain = TextFormat(response_prefix=prefix).prompt_ids(tok, text, max_len)
    assert tok.decode(plain, clean_up_tokenization_spaces=False).endswith(prefix) and len(plain) <= max_len
    hashes = {tokenizer_fingerprint(tok, f) for f in (TextFormat(chat_template=True), fmt)}
    assert len(hashes) == 2  # rows prompted with and without the prefix never share prompts or targets


def test_a_tokenizer_without_a_chat_template_is_refused(tmp_path):
    with pytest.raises(ValueError, match="has no chat template"):
        encode_prompt(word_tokenizer(tmp_path), "t5 t6", 10, chat_template=True)


def test_the_rows_tokenizer_hash_keeps_chat_and_plain_prompts_apart(chat_tokenizer, tmp_path):
    tok = chat_tokenizer
    plain = tokenizer_fingerprint(tok)
    assert tokenizer_fingerprint(tok, TextFormat()) == plain  # existing buffers keep their hash
    chat = tokenizer_fingerprint(tok, TextFormat(chat_template=True))
    stopped = tokenizer_fingerprint(tok, TextFormat(stop_strings=("```",)))
    assert len({plain, chat, stopped}) == 3
    tok2 = trained("metaspace")
    tok2.chat_template = CHAT.replace("<|assistant|>", "<|assistant|> ")
    assert tokenizer_fingerprint(tok2, TextFormat(chat_template=True)) != chat  # the template's text counts

    problems = load_suite("embedded", "train")[:3]
    buffer = ReplayBuffer(str(tmp_path / "buffer"))
    buffer.put_prompts(prompt_rows(problems, tok, max_len=64))
    buffer.put_prompts(prompt_rows(problems, tok, max_len=64, text_format=TextFormat(chat_template=True)))
    table = buffer.prompts()
    assert table.num_rows == 6 and set(table["tokenizer_hash"].to_pylist()) == {plain, chat}


def test_human_programs_holding_a_stop_string_are_left_out(tmp_path):
    problems = load_suite("embedded", "train")[:6]
    refs = [r for p in problems for r in p.references]
    word = "return ["
    holding = sum(word in r for r in refs)
    assert 0 < holding < len(refs)
    fmt = TextFormat(stop_strings=(word,))
    tok = word_tokenizer(tmp_path)
    with Executor(workers=1) as ex:
        rows, infra = human_rows(problems, tok, 64, ex, text_format=fmt)
    assert stopped_references(problems, fmt) == holding and infra == 0
    assert len(rows) == len(refs) - holding and not any(word in r["program"] for r in rows)
    assert {r["tokenizer_hash"] for r in rows} == {tokenizer_fingerprint(tok, fmt)}


def test_the_config_carries_the_text_format_to_the_run_context(tmp_path):
    with pytest.raises(ConfigError, match="embedded default's warm-started LM has no chat template"):
        load_config("ci_tiny", ["--model.chat_template", "true"])
    cfg = load_config("ci_tiny", ["--model.chat_template", "true", "--model.stop_strings", '["```", "[DONE]"]',
                                  "--model.checkpoint", str(tmp_path)])
    ctx = run_context(cfg, str(tmp_path))
    assert ctx.text_format() == TextFormat(chat_template=True, stop_strings=("```", "[DONE]"))
    assert run_context(load_config("ci_tiny", []), str(tmp_path)).text_format() == TextFormat()
    with pytest.raises(ConfigError, match="non-empty"):
        load_config("ci_tiny", ["--model.stop_strings", '[""]'])


def test_a_rollout_actor_writes_chat_prompted_stop_string_rows_under_their_own_hash(tmp_path, monkeypatch):
    from bcoder_ray.algorithms.base import RolloutRequest, RunContext
    from bcoder_ray.loop.rollout import PolicyRef, PolicyWorker, Task, WorkerArgs

    tok = trained("byte")
    tok.chat_template = CHAT
    folder = tiny_checkpoint("llama", str(tmp_path / "instruct"), vocab_size=len(tok), eos=tok.eos_token_id,
                             pad=tok.pad_token_id)
    tok.save_pretrained(folder)
    fmt = TextFormat(chat_template=True, stop_strings=("e",))  # a common letter: most programs end at one
    problems = load_suite("embedded", "train")[:2]
    monkeypatch.setattr("bcoder_ray.loop.rollout.quiet_libraries", lambda: None)
    threads = torch.get_num_threads()
    try:
        ctx = RunContext(theta_ckpt=folder, tokenizer_path=folder, source_len=48, target_len=16,
                         buffer_uri=str(tmp_path / "buffer"), chat_template=fmt.chat_template,
                         stop_strings=fmt.stop_strings)
        worker = PolicyWorker(WorkerArgs(problems={"train": problems}, context=ctx, executor={"workers": 1},
                                         num_threads=threads))
        summary = worker.rollout(Task(key="it0-t0", problem_indices=(0, 1), iteration=0, seed=5),
                                 PolicyRef(path=folder, version="0"),
                                 SamplingSettings(m=4, temperature=1.0, top_p=1.0, max_prompt_len=48,
                                                  max_new_tokens=16), RolloutRequest())
    finally:
        torch.set_num_threads(threads)
    assert summary["programs"] == 8
    rows = ReplayBuffer(str(tmp_path / "buffer")).read().to_pylist()
    assert {r["tokenizer_hash"] for r in rows} == {tokenizer_fingerprint(tok, fmt)} != {tokenizer_fingerprint(tok)}
    assert worker._prompt_ids["train"][0] == encode_prompt(tok, problems[0].prompt, 48, chat_template=True)
    ended = 0
    for r in rows:
        text = tok.decode(r["program_ids"], skip_special_tokens=True, clean_up_tokenization_spaces=False)
        assert "e" not in r["program"] and text.startswith(r["program"])
        ended += "e" in text
        assert r["truncated"] == ("e" not in text and tok.eos_token_id not in r["program_ids"])
    assert ended >= 2


def test_the_command_lines_override_the_text_format(checkpoints, tmp_path):
    from bcoder_ray.cli.evaluate import parse_args as evaluate_args
    from bcoder_ray.cli.generate import parse_args as generate_args
    from bcoder_ray.cli.text_format_args import text_format_overrides
    from bcoder_ray.loop.run_folder import sampler_and_ranker

    args = evaluate_args(["--stop-string", "```", "--stop-string", "[DONE]", "--response-prefix", "```python\n"])
    assert text_format_overrides(args) == {"chat_template": None, "stop_strings": ["```", "[DONE]"],
                                           "response_prefix": "```python\n"}
    assert text_format_overrides(evaluate_args([])) == {"chat_template": None, "stop_strings": None,
                                                        "response_prefix": None}
    assert generate_args(["--problem", "mbpp/test/11", "--checkpoint", "c", "--chat-template"]).chat_template
    word_tokenizer(tmp_path / "tok")
    sampler, _, _ = sampler_and_ranker(checkpoint=checkpoints["decoder-only"], tokenizer=str(tmp_path / "tok"),
                                       rank=False, **text_format_overrides(args))
    assert sampler.text_format == TextFormat(stop_strings=("```", "[DONE]"), response_prefix="```python\n")
    plain, _, _ = sampler_and_ranker(checkpoint=checkpoints["decoder-only"], tokenizer=str(tmp_path / "tok"),
                                     rank=False)
    assert plain.text_format == TextFormat()
