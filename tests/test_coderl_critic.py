"""CodeRL's critic (eq. 9-10): pooling and token values against a hand computation, labels, training, save/load,
and the tokenizer check."""

from __future__ import annotations

import math

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import AutoModel, PreTrainedTokenizerFast

from bcoder_ray.algorithms.coderl.critic import (BINARY_CLASSES, FOUR_CLASSES, Critic, check_critic_tokenizer,
                                          class_balance, critic_loss, outcome_labels, p_passed, p_passed_prefixes,
                                          token_values)
from bcoder_ray.model.batch import collate
from envs.result import OUTCOMES
from learner_fixtures import EOS, KINDS, PAD, example_rows, perturb, tiny_checkpoint

torch.set_num_threads(1)

# Tolerance of the batched forward against the per-row hand computation. Both run the same float32 arithmetic
# except that the batch pads (masked attention entries, other summation orders in the matmuls). Each dot product
# of length d = 32 (the tiny models' width) carries a rounding error of about sqrt(d)·eps (eps = 2^-23, random-walk
# accumulation); a 2-layer body has ~5 such stages in sequence (embedding, 2 × (attention, MLP)), each amplifying
# earlier errors by at most ~O(1) under LayerNorm. Values are O(1), so 10·5·sqrt(32)·eps ≈ 3.4e-5 bounds the
# difference on any IEEE float32 machine, with a wide margin over the < 1e-6 measured (CPU, both kinds).
EPS32 = torch.finfo(torch.float32).eps
D_MODEL = 32
TOL = 10 * 5 * math.sqrt(D_MODEL) * EPS32
OUTCOME_OF_ROW = ["passed", "failed", "compile_error", "runtime_error"]


@pytest.fixture(scope="module", params=KINDS)
def checkpoint(request, tmp_path_factory):
    return tiny_checkpoint(request.param, str(tmp_path_factory.mktemp(request.param)))


def _critic(checkpoint: str, classes=FOUR_CLASSES) -> Critic:
    critic = Critic.create(checkpoint, classes=classes, seed=3)
    perturb(critic.head.parameters(), scale=3.0, seed=5)   # move û and v̂_t well away from uniform
    critic.eval()
    return critic


def _hand_states(critic: Critic, row: dict) -> torch.Tensor:
    """h_t of one unpadded row, straight from the body: [T, d], state t has read the prompt and w_0 … w_t."""
    prompt = torch.tensor([row["prompt_ids"]])
    program = torch.tensor([row["program_ids"]])
    with torch.no_grad():
        if critic.kind == "encoder-decoder":
            encoded = critic.body.encoder(input_ids=prompt).last_hidden_state
            dec = torch.cat([torch.tensor([[critic.body.config.decoder_start_token_id]]), program], dim=1)
            return critic.body.decoder(input_ids=dec, encoder_hidden_states=encoded).last_hidden_state[0, 1:]
        hidden = critic.body(input_ids=torch.cat([prompt, program], dim=1)).last_hidden_state[0]
        return hidden[prompt.shape[1]:]


def _softmax(x: torch.Tensor) -> torch.Tensor:
    e = torch.exp(x - x.max(-1, keepdim=True).values)
    return e / e.sum(-1, keepdim=True)


def test_pooling_and_token_values_match_a_hand_computation(checkpoint):
    critic = _critic(checkpoint)
    rows = example_rows()
    batch = collate(rows, PAD)
    labels = outcome_labels(OUTCOME_OF_ROW)
    with torch.no_grad():
        out = critic(batch)
    q_hat = token_values(critic, batch, labels)
    p_pass, p_fail = p_passed_prefixes(critic, batch)
    score = p_passed(critic, batch)
    w, bias = critic.head.weight.detach(), critic.head.bias.detach()
    for b, row in enumerate(rows):
        h = _hand_states(critic, row)                                  # [T_b, d]
        n = h.shape[0]
        pooled = torch.stack([max(h[t, j] for t in range(n)) for j in range(h.shape[1])])   # eq. 9 max-pool
        u_hat = _softmax(pooled @ w.T + bias)                          # û = softmax(Linear(h_pool))
        v_hat = _softmax(h @ w.T + bias)                               # eq. 10: v̂_t = softmax(Linear(h_t))
        assert torch.allclose(out.pooled_logits[b].softmax(-1), u_hat, atol=TOL)
        assert torch.allclose(out.token_logits[b, :n].softmax(-1), v_hat, atol=TOL)
        assert torch.allclose(q_hat[b, :n], v_hat[:, labels[b]], atol=TOL)       # q̂(w_t) = v̂_t[u]
        assert torch.allclose(p_pass[b, :n], v_hat[:, 0], atol=TOL)
        assert torch.allclose(p_fail[b, :n], v_hat[:, 1:].sum(-1), atol=TOL)
        assert abs(float(score[b]) - float(u_hat[0])) < TOL
        assert (q_hat[b, n:] == 0).all() and (p_pass[b, n:] == 0).all()        # padding is masked
    # pooling is over states, not over logits: Linear(max h) differs from max Linear(h) here
    assert not torch.allclose(out.pooled_logits, out.token_logits.max(1).values, atol=1e-3)
    assert q_hat.std() > 0.05                                          # the head was moved off uniform


def test_binary_critic_prefix_values(checkpoint):
    critic = _critic(checkpoint, BINARY_CLASSES)
    batch = collate(example_rows(), PAD)
    p_pass, p_fail = p_passed_prefixes(critic, batch)
    mask = batch.program_mask.bool()
    with torch.no_grad():
        v_hat = critic(batch).token_logits.softmax(-1)
    assert torch.allclose(p_fail[mask], v_hat[..., 1][mask])          # φ_test: p(failed) is its own class
    assert torch.allclose((p_pass + p_fail)[mask], torch.ones(int(mask.sum())), atol=4 * EPS32)


def test_outcome_labels_and_class_balance():
    assert FOUR_CLASSES == OUTCOMES == ("passed", "failed", "runtime_error", "compile_error")
    outcomes = ["passed", "compile_error", "failed", "compile_error", "runtime_error"]
    assert outcome_labels(outcomes).tolist() == [0, 3, 1, 3, 2]
    assert outcome_labels(outcomes, BINARY_CLASSES).tolist() == [0, 1, 1, 1, 1]
    assert class_balance(outcomes) == {"passed": 1, "failed": 1, "runtime_error": 1, "compile_error": 2}
    assert class_balance(outcomes, BINARY_CLASSES) == {"passed": 1, "failed": 4}
    assert class_balance([]) == dict.fromkeys(FOUR_CLASSES, 0)
    with pytest.raises(ValueError, match="row 1: outcome 'timeout'"):
        outcome_labels(["passed", "timeout"])
    with pytest.raises(ValueError, match="critic classes"):
        outcome_labels(["passed"], ("failed", "passed"))


def _toy_rows() -> list[dict]:
    """Separable: the outcome is written in the program's first token (30 + class), the rest is noise."""
    rows = []
    for i in range(8):
        label = i % 4
        rows.append({"prompt_ids": [5 + i, 6], "program_ids": [30 + label, 10 + i, 11 + (i * 3) % 7, EOS],
                     "reward": 0.0, "is_human": False, "outcome": FOUR_CLASSES[label]})
    return rows


def test_critic_loss_decreases_on_a_separable_toy_set(checkpoint):
    torch.manual_seed(0)
    critic = Critic.create(checkpoint, seed=0)
    rows = _toy_rows()
    batch = collate(rows, PAD)
    labels = outcome_labels([r["outcome"] for r in rows])
    optimiser = torch.optim.Adam(critic.parameters(), lr=3e-3)
    critic.train()
    first = critic_loss(critic, batch, labels)[0].detach()
    assert abs(float(first) - math.log(4)) < 0.1                       # a fresh head starts near uniform
    for _ in range(40):
        optimiser.zero_grad()
        loss, metrics = critic_loss(critic, batch, labels)
        loss.backward()
        optimiser.step()
    assert metrics["loss"] < 0.5 * float(first.detach())
    final, metrics = critic_loss(critic, batch, labels)
    assert metrics["accuracy"] == 1.0 and float(final.detach()) < 0.5 * float(first.detach())
    assert all(p.grad is not None for p in critic.head.parameters())


def test_critic_loss_is_eq9_cross_entropy(checkpoint):
    critic = _critic(checkpoint)
    batch = collate(example_rows(), PAD)
    labels = outcome_labels(OUTCOME_OF_ROW)
    loss, metrics = critic_loss(critic, batch, labels)
    with torch.no_grad():
        probs = critic(batch).pooled_logits.softmax(-1)
    expected = -torch.log(probs[torch.arange(4), labels]).mean()      # eq. 9: -log p_φ(u | W, D), mean
    assert abs(float(loss.detach()) - float(expected)) < TOL and metrics["n"] == 4.0
    with pytest.raises(ValueError, match="labels have shape"):
        critic_loss(critic, batch, labels[:3])
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        critic_loss(critic, batch, torch.tensor([0, 1, 2, 4]))


def test_save_and_load_round_trip(checkpoint, tmp_path):
    critic = _critic(checkpoint, BINARY_CLASSES)
    perturb(critic.body.parameters(), seed=7)
    critic.save(str(tmp_path / "critic"))
    loaded = Critic.load(str(tmp_path / "critic"))
    batch = collate(example_rows(), PAD)
    with torch.no_grad():
        a, b = critic(batch), loaded(batch)
    assert loaded.classes == BINARY_CLASSES and loaded.kind == critic.kind
    assert loaded.init_checkpoint == checkpoint
    assert torch.allclose(a.token_logits, b.token_logits, atol=TOL)
    assert torch.allclose(a.pooled_logits, b.pooled_logits, atol=TOL)
    plain = AutoModel.from_pretrained(str(tmp_path / "critic"))         # the body loads with transformers alone
    assert type(plain).__name__ == type(critic.body).__name__
    with pytest.raises(FileNotFoundError, match="coderl_critic.json"):
        Critic.load(checkpoint)


def test_fresh_heads_are_seeded(checkpoint):
    a, b, c = (Critic.create(checkpoint, seed=s) for s in (1, 1, 2))
    assert torch.equal(a.head.weight, b.head.weight) and not torch.equal(a.head.weight, c.head.weight)
    assert a.head.out_features == 4 and Critic.create(checkpoint, classes=BINARY_CLASSES).head.out_features == 2


def _tokenizer_dir(path, extra: str = "") -> str:
    vocab = {"<pad>": 0, "<eos>": 1, "<unk>": 2, "def": 3, "f": 4}
    if extra:
        vocab[extra] = len(vocab)
    tok = Tokenizer(WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<pad>",
                            unk_token="<unk>").save_pretrained(str(path))
    return str(path)


def test_tokenizer_check_names_both_paths(tmp_path):
    actor = _tokenizer_dir(tmp_path / "actor")
    same = _tokenizer_dir(tmp_path / "critic_same")
    other = _tokenizer_dir(tmp_path / "critic_other", extra="return")
    assert len(check_critic_tokenizer(same, actor)) == 16
    with pytest.raises(ValueError) as error:
        check_critic_tokenizer(other, actor)
    assert other in str(error.value) and actor in str(error.value)
    with pytest.raises(ValueError, match="critic tokenizer at .*missing"):
        check_critic_tokenizer(str(tmp_path / "missing"), actor)
