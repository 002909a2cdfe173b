"""The warm start: a tiny tokenizer + GPT-2 trained on human programs, reproducible and cached under its key."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, GPT2LMHeadModel, PreTrainedTokenizerFast

from bcoder_ray.model import warm_start as ws
from bcoder_ray.model.tokenization import decode_program, encode_program, encode_prompt, tokenizer_fingerprint
from bcoder_ray.model.warm_start import WarmStartConfig, cached_path, is_complete, warm_start
from envs.problem import Problem
from envs.suites.embedded import load_embedded

TINY = WarmStartConfig(vocab_size=320, n_embd=32, n_layer=2, n_head=2, max_prompt_len=160, max_program_len=64,
                       steps=4, batch_size=4, warmup_steps=2, num_threads=1)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def problems() -> list[Problem]:
    return load_embedded("train", n_train=40, n_test=4)


@pytest.fixture(scope="module")
def trained(problems: list[Problem], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return warm_start(problems, TINY, tmp_path_factory.mktemp("cache"), progress=False)


def test_saved_model_and_tokenizer_load_and_round_trip(trained: Path, problems: list[Problem]) -> None:
    assert is_complete(trained) and trained.name.startswith("warm-")
    record = json.loads((trained / ws.RECORD_FILE).read_text())
    assert record["config"]["steps"] == TINY.steps and record["steps_per_s"] > 0
    assert record["examples"] == len(problems)
    model = GPT2LMHeadModel.from_pretrained(trained)
    tokenizer = AutoTokenizer.from_pretrained(trained)
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert len(tokenizer) == TINY.vocab_size == model.config.vocab_size
    assert tokenizer.eos_token_id is not None and tokenizer.pad_token_id is not None
    assert tokenizer.eos_token_id != tokenizer.pad_token_id
    assert model.config.n_positions == TINY.max_prompt_len + TINY.max_program_len
    for p in problems[:10]:
        program = p.references[0]
        ids = encode_program(tokenizer, program, 10_000)
        assert ids[-1] == tokenizer.eos_token_id
        assert decode_program(tokenizer, ids) == program  # byte-level BPE is lossless
        assert tokenizer.decode(encode_prompt(tokenizer, p.prompt, 10_000)) == p.prompt
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(AutoTokenizer.from_pretrained(trained))
    with torch.no_grad():
        out = model(torch.tensor([encode_prompt(tokenizer, problems[0].prompt, TINY.max_prompt_len)]))
    assert out.logits.shape[-1] == TINY.vocab_size


def test_cache_hit_returns_same_path_without_training(trained: Path, problems: list[Problem],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    def no_training(*args, **kwargs):
        raise AssertionError("trained again despite a cached model")

    monkeypatch.setattr(ws, "train_model", no_training)
    monkeypatch.setattr(ws, "train_tokenizer", no_training)
    assert warm_start(problems, TINY, trained.parent, progress=False) == trained
    assert cached_path(problems, TINY, trained.parent) == trained
    # num_threads does not enter the key; everything else does, and so does the data
    assert cached_path(problems, replace(TINY, num_threads=2), trained.parent) == trained
    assert cached_path(problems, replace(TINY, steps=5), trained.parent) != trained
    assert cached_path(problems, replace(TINY, lr=1e-3), trained.parent) != trained
    assert cached_path(problems[1:], TINY, trained.parent) != trained
    assert cached_path(problems, replace(TINY, pretokenizer="gpt2"), trained.parent) != trained
    assert cached_path(problems, replace(TINY, activation="gelu_new"), trained.parent) != trained
    assert [p.name for p in trained.parent.iterdir()] == [trained.name]  # no temporary folder left behind


def test_training_is_reproducible(trained: Path, problems: list[Problem], tmp_path: Path) -> None:
    again = warm_start(problems, TINY, tmp_path, progress=False)
    assert again.name == trained.name
    a = GPT2LMHeadModel.from_pretrained(trained).state_dict()
    b = GPT2LMHeadModel.from_pretrained(again).state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    fresh = ws.build_model(TINY, AutoTokenizer.from_pretrained(trained)).state_dict()
    assert not all(torch.equal(a[k], fresh[k]) for k in a if k in fresh)  # it did train
    assert (trained / "tokenizer.json").read_text() == (again / "tokenizer.json").read_text()


def test_losses_on_program_and_prompt_tokens() -> None:
    batch = ws.collate([([5, 6, 7], [8, 9, 1]), ([5], [8, 1])], pad=2)
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 1], [5, 8, 1, 2, 2, 2]]
    assert batch["attention_mask"].tolist() == [[1] * 6, [1, 1, 1, 0, 0, 0]]
    ignore = ws.IGNORE_INDEX
    assert batch["labels"].tolist() == [[ignore] * 3 + [8, 9, 1], [ignore, 8, 1, ignore, ignore, ignore]]
    assert batch["prompt_labels"].tolist() == [[5, 6, 7] + [ignore] * 3, [5] + [ignore] * 5]
    # the program loss is the mean cross-entropy of exactly the program tokens
    logits = torch.randn(2, 6, 12)
    logp = logits.log_softmax(-1)
    expected = -(logp[0, 2, 8] + logp[0, 3, 9] + logp[0, 4, 1] + logp[1, 0, 8] + logp[1, 1, 1]) / 5
    assert ws.token_cross_entropy(logits, batch["labels"]) == pytest.approx(expected.item(), rel=1e-5)
    prompt_expected = -(logp[0, 0, 6] + logp[0, 1, 7]) / 2
    assert ws.token_cross_entropy(logits, batch["prompt_labels"]) == pytest.approx(prompt_expected.item(), rel=1e-5)


def test_one_log_softmax_loss_equals_the_two_token_means() -> None:
    """warm_start_loss computes both means from one cross-entropy pass; it must equal token_cross_entropy's."""
    torch.manual_seed(0)
    batch = ws.collate([([5, 6, 7], [8, 9, 1]), ([5], [8, 1]), ([4, 4], [1])], pad=2)

    class Fixed(torch.nn.Module):
        def __init__(self, logits):
            super().__init__()
            self.logits = logits

        def forward(self, input_ids, attention_mask):
            return type("Out", (), {"logits": self.logits})()

    logits = torch.randn(3, 6, 12)
    for weight in (0.0, 0.5, 1.0):
        total, program = ws.warm_start_loss(Fixed(logits), batch, weight)
        expected_program = ws.token_cross_entropy(logits, batch["labels"])
        expected_prompt = ws.token_cross_entropy(logits, batch["prompt_labels"])
        assert program.item() == pytest.approx(expected_program.item(), rel=1e-6)
        assert total.item() == pytest.approx((expected_program + weight * expected_prompt).item(), rel=1e-6)


@pytest.mark.parametrize("pretokenizer", sorted(ws.PRETOKENIZERS))
def test_tokenizers_are_lossless_and_keep_numbers_whole(problems: list[Problem], pretokenizer: str) -> None:
    texts = [t for pair in ws.training_pairs(problems) for t in pair]
    tokenizer = ws.train_tokenizer(texts, 400, pretokenizer)
    for p in problems[:20]:
        program = p.references[0]
        assert decode_program(tokenizer, encode_program(tokenizer, program, 10_000)) == program
        assert tokenizer.decode(encode_prompt(tokenizer, p.prompt, 10_000)) == p.prompt
    if pretokenizer == "digits":  # a number never shares a token with a letter, space or bracket
        for token in tokenizer.convert_ids_to_tokens(tokenizer(" ".join(texts[:40]))["input_ids"]):
            assert not any(c.isdigit() for c in token) or token.isdigit(), token
        gpt2 = ws.train_tokenizer(texts, 400, "gpt2")
        assert sum(len(tokenizer(t)["input_ids"]) for t in texts) < sum(len(gpt2(t)["input_ids"]) for t in texts)


def test_training_reduces_the_loss(problems: list[Problem]) -> None:
    tokenizer = ws.train_tokenizer([t for pair in ws.training_pairs(problems) for t in pair], 320)
    examples = ws.encode_pairs(tokenizer, ws.training_pairs(problems), 160, 64)
    cfg = replace(TINY, steps=12, lr=1e-2)
    torch.manual_seed(0)
    losses = ws.train_model(ws.build_model(cfg, tokenizer), examples[:8], cfg, tokenizer.pad_token_id,
                            progress=False)
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < 0.8 * sum(losses[:3]) / 3, losses


def test_failed_training_leaves_no_cache_entry(problems: list[Problem], tmp_path: Path,
                                               monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args, **kwargs):
        raise RuntimeError("interrupted")

    monkeypatch.setattr(GPT2LMHeadModel, "save_pretrained", broken)
    with pytest.raises(RuntimeError, match="interrupted"):
        warm_start(problems, replace(TINY, steps=1), tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_config_validation() -> None:
    with pytest.raises(ValueError, match="n_head"):
        WarmStartConfig(n_embd=30, n_head=4)
    with pytest.raises(ValueError, match="steps"):
        WarmStartConfig(steps=0)
    with pytest.raises(ValueError, match="pretokenizer"):
        WarmStartConfig(pretokenizer="words")
    with pytest.raises(ValueError, match="no reference"):
        warm_start([], TINY, "/nonexistent")
    assert ws.learning_rate(TINY, 0) < ws.learning_rate(TINY, 1) == pytest.approx(TINY.lr)
    assert ws.learning_rate(TINY, TINY.steps) == pytest.approx(TINY.lr * TINY.min_lr_ratio)
