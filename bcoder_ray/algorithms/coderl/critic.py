"""CodeRL's critic (Le et al. 2022, eq. 9-10; ``docs/baselines.md`` §1): an outcome classifier over
(problem, program) whose per-token class probabilities weight the actor's tokens.

Public API
----------
- ``FOUR_CLASSES`` = ("passed", "failed", "runtime_error", "compile_error"): the order and names of
  ``envs.result.Outcome``; ``BINARY_CLASSES`` = ("passed", "failed"): Critic Sampling's φ_test, where every
  outcome other than ``passed`` is ``failed``.
- ``outcome_labels(outcomes, classes) -> LongTensor [B]``: the buffer's ``outcome`` strings as class indices.
- ``class_balance(outcomes, classes) -> dict[str, int]``: rows per class (for the report).
- ``Critic`` (``nn.Module``): ``Critic.create(checkpoint, *, classes=FOUR_CLASSES, seed=0, dtype=None,
  device=None, options=None)`` (body initialised from that LM's base model, a fresh head seeded with ``seed``),
  ``Critic.load(directory, *, dtype=None, device=None, options=None)``, ``critic.save(directory, tokenizer=None)``,
  ``critic.hidden_states(batch)``, ``critic(batch) -> CriticOutputs``. Attributes ``kind``, ``classes``, ``body``,
  ``head``, ``decoder_start_id``, ``init_checkpoint``.
- ``critic_loss(critic, batch, labels) -> (loss, metrics)``: eq. 9, mean over the batch's programs.
- ``token_values(critic, batch, labels) -> [B, T]``: q̂_φ(w_t) = v̂_t[u] (eq. 10), detached, 0 at padding.
- ``p_passed_prefixes(critic, batch) -> (p_pass, p_fail)``, each [B, T]: p(passed | w_0…w_t, D) and its
  complement per prefix (Critic Sampling); ``p_passed(critic, batch) -> [B]``: the pooled û[passed] of the
  whole program (ranking).
- ``check_critic_tokenizer(critic_path, actor_path, *, load=AutoTokenizer.from_pretrained, critic_options=None,
  actor_options=None) -> str``: the shared
  fingerprint, or a ``ValueError`` naming both paths.

States and positions. The critic reads the prompt D and the program w_0 … w_{T-1} (EOS last unless cut at the
length limit). Its state h_t at index t has read D and w_0 … w_t *inclusive*, so v̂_t is the critic's verdict on
the prefix w_0…w_t and q̂_φ(w_t) values token w_t itself. Decoder-only: the body reads [left-padded prompt,
right-padded program] with position ids from the attention mask, and h_t is at index S + t. Encoder-decoder:
the encoder reads the prompt, the decoder reads [decoder_start, w_0 … w_{T-1}], and h_t is at index t + 1.
(The public CodeRL code feeds its T5 critic's decoder the right-shifted program, so its h_t has read w_<t only;
here the state includes the token it values, which is what p(passed | w_1:t, D) of Critic Sampling asks for.)
Padding never reaches a valid state: prompts are masked, and program padding sits after every valid token of a
causal decoder.

Saved folder (``save``): the body as a plain base model (``AutoModel.from_pretrained(dir)`` loads it; for an
encoder-decoder, encoder and decoder), ``critic_head.safetensors`` (the Linear of eq. 9-10) and ``coderl_critic.json``
(format, kind, classes, decoder_start_id, init_checkpoint); the tokenizer beside them when given.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel

from bcoder_ray.algorithms.common import read_saved_meta
from bcoder_ray.model.batch import Batch
from bcoder_ray.model.lm import ENCODER_DECODER, LoadOptions, hidden_size, lm_kind, new_head, positions_from_mask
from bcoder_ray.util.storage import local_dir
from bcoder_ray.model.tokenization import tokenizer_fingerprint
from envs.result import OUTCOMES, Outcome

FOUR_CLASSES: tuple[str, ...] = OUTCOMES
BINARY_CLASSES: tuple[str, ...] = (Outcome.PASSED.value, Outcome.FAILED.value)
PASSED = Outcome.PASSED.value
HEAD_FILE = "critic_head.safetensors"
META_FILE = "coderl_critic.json"
FORMAT = "coderl_critic"


# ---------------------------------------------------------------------------------------------- labels
def _check_classes(classes: Sequence[str]) -> tuple[str, ...]:
    classes = tuple(classes)
    if classes not in (FOUR_CLASSES, BINARY_CLASSES):
        raise ValueError(f"critic classes must be {FOUR_CLASSES} or {BINARY_CLASSES}, got {classes}")
    return classes


def outcome_labels(outcomes: Sequence[str], classes: Sequence[str] = FOUR_CLASSES) -> torch.Tensor:
    """Class index of each outcome string (the buffer's ``outcome`` column); binary: not passed -> failed."""
    classes = _check_classes(classes)
    labels = []
    for i, outcome in enumerate(outcomes):
        value = outcome.value if isinstance(outcome, Outcome) else outcome
        if value not in OUTCOMES:
            raise ValueError(f"row {i}: outcome {value!r} is not one of {OUTCOMES}")
        if classes == BINARY_CLASSES:
            value = PASSED if value == PASSED else Outcome.FAILED.value
        labels.append(classes.index(value))
    return torch.tensor(labels, dtype=torch.long)


def class_balance(outcomes: Sequence[str], classes: Sequence[str] = FOUR_CLASSES) -> dict[str, int]:
    """Rows per class, every class present (0 where none), in the classes' order."""
    classes = _check_classes(classes)
    counts = torch.bincount(outcome_labels(outcomes, classes), minlength=len(classes)) if len(outcomes) else \
        torch.zeros(len(classes), dtype=torch.long)
    return {name: int(counts[i]) for i, name in enumerate(classes)}


# ---------------------------------------------------------------------------------------------- the critic
@dataclass
class CriticOutputs:
    """The critic's logits over a batch: per token (v̂_t before softmax) and max-pooled (û before softmax)."""
    token_logits: torch.Tensor   # [B, T, n] Linear(h_t), float32
    pooled_logits: torch.Tensor  # [B, n] Linear(max_t h_t), float32
    mask: torch.Tensor           # [B, T] bool, the program's valid tokens


def _max_pool(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """h_pool = max over the valid tokens of each program, per hidden unit (eq. 9)."""
    floor = torch.finfo(hidden.dtype).min
    return hidden.masked_fill(~mask.unsqueeze(-1), floor).max(dim=1).values


class Critic(nn.Module):
    """A Hugging Face LM body + one Linear(d, n) head shared by the pooled (eq. 9) and per-token (eq. 10) outputs."""

    def __init__(self, body: PreTrainedModel, head: nn.Linear, *, classes: Sequence[str],
                 init_checkpoint: str = ""):
        super().__init__()
        self.body = body
        self.head = head
        self.kind = lm_kind(body)
        self.classes = _check_classes(classes)
        self.init_checkpoint = str(init_checkpoint)
        self.decoder_start_id = getattr(body.config, "decoder_start_token_id", None)
        if self.kind == ENCODER_DECODER and self.decoder_start_id is None:
            raise ValueError(f"critic body from {init_checkpoint or type(body).__name__}: encoder-decoder config has "
                             f"no decoder_start_token_id")
        if head.out_features != len(self.classes):
            raise ValueError(f"critic head has {head.out_features} outputs for {len(self.classes)} classes")

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, checkpoint: str, *, classes: Sequence[str] = FOUR_CLASSES, seed: int = 0,
               dtype: torch.dtype | None = None, device: torch.device | str | None = None,
               options: LoadOptions | None = None) -> "Critic":
        """Body = the checkpoint's base model (no LM head), trainable; head ~ N(0, 0.02²), bias 0, from ``seed``;
        ``options`` (``LoadOptions``) go to its ``from_pretrained``."""
        classes = _check_classes(classes)
        options = options or LoadOptions()
        body = AutoModel.from_pretrained(local_dir(checkpoint), dtype=dtype, **options.model_kwargs())
        like = next(body.parameters())
        generator = torch.Generator().manual_seed(seed)
        head = new_head(hidden_size(body), len(classes), like, generator)
        critic = cls(body, head, classes=classes, init_checkpoint=checkpoint)
        return critic.to(device) if device is not None else critic

    @classmethod
    def load(cls, directory: str, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
             options: LoadOptions | None = None) -> "Critic":
        """A critic saved by ``save``; ``options``: as for ``create`` (a saved folder: the revision is dropped)."""
        from safetensors.torch import load_file
        directory = local_dir(directory, "critic checkpoint")
        meta = read_meta(directory)
        options = (options or LoadOptions()).without_revision()
        body = AutoModel.from_pretrained(directory, dtype=dtype, **options.model_kwargs())
        state = load_file(os.path.join(directory, HEAD_FILE))
        like = next(body.parameters())
        head = nn.Linear(state["weight"].shape[1], state["weight"].shape[0]).to(device=like.device, dtype=like.dtype)
        head.load_state_dict(state)
        critic = cls(body, head, classes=meta["classes"], init_checkpoint=meta.get("init_checkpoint", ""))
        if critic.kind != meta["kind"]:
            raise ValueError(f"{directory}: {META_FILE} says kind {meta['kind']!r}, the saved body is {critic.kind!r}")
        return critic.to(device) if device is not None else critic

    def save(self, directory: str, tokenizer=None) -> None:
        from safetensors.torch import save_file
        os.makedirs(directory, exist_ok=True)
        self.body.save_pretrained(directory)
        save_file({k: v.detach().contiguous() for k, v in self.head.state_dict().items()},
                  os.path.join(directory, HEAD_FILE))
        meta = {"format": FORMAT, "kind": self.kind, "classes": list(self.classes),
                "decoder_start_id": self.decoder_start_id, "init_checkpoint": self.init_checkpoint}
        with open(os.path.join(directory, META_FILE), "w") as f:
            json.dump(meta, f, indent=1)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)

    # ------------------------------------------------------------------ forward
    def hidden_states(self, batch: Batch) -> torch.Tensor:
        """h_t for t = 0 … T-1, [B, T, d]: the body's last hidden state after reading D and w_0 … w_t."""
        if self.kind == ENCODER_DECODER:
            start = torch.full_like(batch.program_ids[:, :1], self.decoder_start_id)
            out = self.body(input_ids=batch.prompt_ids, attention_mask=batch.prompt_mask,
                            decoder_input_ids=torch.cat([start, batch.program_ids], dim=1), use_cache=False)
            return out.last_hidden_state[:, 1:]
        ids = torch.cat([batch.prompt_ids, batch.program_ids], dim=1)
        mask = torch.cat([batch.prompt_mask, batch.program_mask], dim=1)
        out = self.body(input_ids=ids, attention_mask=mask, position_ids=positions_from_mask(mask), use_cache=False)
        return out.last_hidden_state[:, batch.prompt_ids.shape[1]:]

    def forward(self, batch: Batch) -> CriticOutputs:
        hidden = self.hidden_states(batch)
        mask = batch.program_mask.bool()
        token_logits = self.head(hidden).float()                 # eq. 10: Linear(h_t), v̂_t = softmax of it
        pooled_logits = self.head(_max_pool(hidden, mask)).float()  # eq. 9: Linear(max-pool h), û = softmax of it
        return CriticOutputs(token_logits, pooled_logits, mask)

    def class_index(self, name: str) -> int:
        if name not in self.classes:
            raise ValueError(f"class {name!r} is not one of this critic's classes {self.classes}")
        return self.classes.index(name)


def read_meta(directory: str) -> dict:
    return read_saved_meta(directory, META_FILE, FORMAT, "Critic.save")


# ---------------------------------------------------------------------------------------------- losses, values
def _check_labels(critic: Critic, batch: Batch, labels: torch.Tensor) -> torch.Tensor:
    labels = torch.as_tensor(labels, dtype=torch.long, device=batch.program_ids.device)
    if labels.shape != (batch.size,):
        raise ValueError(f"labels have shape {tuple(labels.shape)}, the batch has {batch.size} programs")
    if labels.numel() and (labels.min() < 0 or labels.max() >= len(critic.classes)):
        raise ValueError(f"labels must lie in [0, {len(critic.classes)}) for classes {critic.classes}, got "
                         f"{labels.tolist()}")
    return labels


def critic_loss(critic: Critic, batch: Batch, labels: torch.Tensor) -> tuple[torch.Tensor, dict[str, float]]:
    """L_critic(φ) = -log p_φ(u | W, D) with p_φ = û = softmax(Linear(h_pool)) (eq. 9), mean over the programs.

    ``labels`` [B]: class indices (``outcome_labels``). Metrics: ``loss``, ``accuracy`` (argmax û = u),
    ``p_true`` (mean û[u]), ``n``."""
    labels = _check_labels(critic, batch, labels)
    out = critic(batch)
    loss = F.cross_entropy(out.pooled_logits, labels)                     # eq. 9, mean over programs
    with torch.no_grad():
        probs = out.pooled_logits.softmax(-1)
        metrics = {"loss": float(loss.detach()),
                   "accuracy": float((probs.argmax(-1) == labels).float().mean()),
                   "p_true": float(probs.gather(1, labels.unsqueeze(1)).mean()),
                   "n": float(batch.size)}
    return loss, metrics


def token_values(critic: Critic, batch: Batch, labels: torch.Tensor) -> torch.Tensor:
    """q̂_φ(w_t) = v̂_t[u], v̂_t = softmax(Linear(h_t)) (eq. 10): [B, T] float32, detached, 0 at padding."""
    labels = _check_labels(critic, batch, labels)
    with torch.no_grad():
        out = critic(batch)
        v_hat = out.token_logits.softmax(-1)                               # eq. 10: v̂_t
        index = labels.view(-1, 1, 1).expand(-1, v_hat.shape[1], 1)
        q_hat = v_hat.gather(-1, index).squeeze(-1)                        # q̂(w_t) = v̂_t[u]
        return q_hat * out.mask


def p_passed_prefixes(critic: Critic, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
    """(p(passed | w_0…w_t, D), p(not passed | w_0…w_t, D)), each [B, T] float32, detached, 0 at padding.

    p(passed) is v̂_t[passed] (eq. 10); the second is the sum of the other classes (v̂_t[failed] for φ_test)."""
    passed = critic.class_index(PASSED)
    with torch.no_grad():
        out = critic(batch)
        v_hat = out.token_logits.softmax(-1)
        p_pass = v_hat[..., passed]
        p_fail = v_hat.sum(-1) - p_pass
        return p_pass * out.mask, p_fail * out.mask


def p_passed(critic: Critic, batch: Batch) -> torch.Tensor:
    """û[passed] of each whole program (eq. 9's pooled prediction), [B] float32, detached: the ranking score."""
    passed = critic.class_index(PASSED)
    with torch.no_grad():
        return critic(batch).pooled_logits.softmax(-1)[:, passed]


# ---------------------------------------------------------------------------------------------- tokenizer check
def check_critic_tokenizer(critic_path: str, actor_path: str, *,
                           load: Callable[..., object] = AutoTokenizer.from_pretrained,
                           critic_options: LoadOptions | None = None, actor_options: LoadOptions | None = None) -> str:
    """q̂ weights the actor's tokens, so both must tokenize alike: compare vocabulary fingerprints. The options
    (``LoadOptions``: revision, trust_remote_code) go to ``load`` as keyword arguments when given."""
    fingerprints = []
    for role, path, options in (("critic", critic_path, critic_options), ("actor", actor_path, actor_options)):
        kwargs = options.config_kwargs() if options is not None else {}
        try:
            fingerprints.append(tokenizer_fingerprint(load(path, **kwargs)))
        except (OSError, ValueError) as error:
            raise ValueError(f"{role} tokenizer at {path}: cannot be loaded ({error})") from error
    if fingerprints[0] != fingerprints[1]:
        raise ValueError(f"the critic's tokenizer ({critic_path}, fingerprint {fingerprints[0]}) differs from the "
                         f"actor's ({actor_path}, fingerprint {fingerprints[1]}); the critic's token values would "
                         f"weight other tokens than the actor's")
    return fingerprints[0]

