"""Hugging Face LMs as this project uses them: loading (encoder-decoder or decoder-only), the frozen shared
encoder, the teacher-forced trunk that gives the hidden state of every state s_t of a program, and the fused
logit statistics of the taken tokens. Shared by every algorithm (B-Coder's Q, CodeRL's critic, the
policy-gradient losses) and by sampling.

- ``LoadOptions(revision, attn_implementation, trust_remote_code)``: the ``from_pretrained`` options of a run's
  checkpoint (``model.revision``, ``model.attn_implementation``, ``model.trust_remote_code``); ``config_kwargs()``
  (AutoConfig, tokenizers), ``model_kwargs()`` (models).
- ``load_lm(name_or_path, *, dtype=None, device=None, options=None) -> PreTrainedModel``: frozen, eval mode, logit
  path checked.
- ``checkpoint_identity(name_or_path, revision=None) -> str``: what a checkpoint is, for cache fingerprints (a
  folder by its content, a hub name by name and revision).
- ``lm_kind(lm_or_config)``, ``decoder_body(lm)``, ``lm_head_logits(lm, hidden)``.
- ``Encoded``, ``SharedEncoder``: the frozen encoder's output / module (encoder-decoder only).
- ``Trunk``: ``states(batch, encoded) -> [B, T, d]``, the hidden state of s_t = (prompt, w_<t) at index t.
- ``PolicyLM(lm)``: a trunk with the LM head, ``logits(hidden)``, ``encode(prompt_ids, prompt_mask)``; what a
  published policy is when loaded (``load_policy``).
- ``token_logit_stats(logits, actions, lse_rows=None) -> (max ℓ, ℓ[a_t], log Z)``: one fused autograd op.
- ``positions_from_mask(mask)``: position ids of a left-padded batch.
- ``hidden_size(lm_or_config)``; ``new_head(d_model, out, like, generator)``: a fresh seeded linear head.
- ``generation_eos_ids(lm)``, ``generation_eos_ids_of(path)``: the end-of-sequence ids of a model's generation
  config (one or several).
- ``has_dropout(module)``, ``eval_mode(module)``: whether a network drops anything when training; a context in
  which it does not (for the TD bootstrap of the network being trained).
"""

from __future__ import annotations

import contextlib
import hashlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Iterator

import torch
from torch import nn
from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM, GenerationConfig, PretrainedConfig,
                          PreTrainedModel)

from bcoder_ray.model.batch import Batch
from bcoder_ray.util.storage import is_uri, local_dir

ENCODER_DECODER = "encoder-decoder"
DECODER_ONLY = "decoder-only"

# ---------------------------------------------------------------------------------------------- loading an LM
def lm_kind(lm_or_config: PreTrainedModel | PretrainedConfig) -> str:
    config = lm_or_config.config if isinstance(lm_or_config, PreTrainedModel) else lm_or_config
    return ENCODER_DECODER if getattr(config, "is_encoder_decoder", False) else DECODER_ONLY


def decoder_body(lm: PreTrainedModel) -> nn.Module:
    """The network whose last hidden state feeds the LM head (the decoder stack, or the decoder-only base model)."""
    if lm_kind(lm) == ENCODER_DECODER:
        return lm.get_decoder()
    body = lm.base_model
    if body is lm:
        raise NotImplementedError(f"{type(lm).__name__}: no separate base model under the LM head")
    return body


def float32_linear(layer: nn.Linear, hidden: torch.Tensor) -> torch.Tensor:
    """`layer(hidden)` computed in float32 whatever the autocast or storage dtype: the quantities read off it (A =
    α(ℓ - max ℓ), Q of taken and target actions, V, R̃) differ between tokens by far less than bf16 resolves."""
    weight = layer.weight.float()
    bias = None if layer.bias is None else layer.bias.float()
    with torch.autocast(device_type=hidden.device.type, enabled=False):
        return torch.nn.functional.linear(hidden.float(), weight, bias)


def lm_head_logits(lm: PreTrainedModel, hidden: torch.Tensor) -> torch.Tensor:
    """The LM head on decoder states, in float32 (`float32_linear`)."""
    if lm_kind(lm) == ENCODER_DECODER and getattr(lm.config, "scale_decoder_outputs", False):
        hidden = hidden * (lm.config.d_model ** -0.5)  # T5 v1.0 scales the decoder output before its tied head
    return float32_linear(lm.get_output_embeddings(), hidden)


def check_logit_path(lm: PreTrainedModel, where: str) -> None:
    """Refuse models whose forward does more than ``head(decoder hidden)`` (e.g. logit soft-capping)."""
    vocab = lm.get_output_embeddings().weight.shape[0]
    device = lm.get_output_embeddings().weight.device
    ids = torch.tensor([[min(3, vocab - 1), min(5, vocab - 1), min(7, vocab - 1)]], device=device)
    with torch.no_grad():
        if lm_kind(lm) == ENCODER_DECODER:
            start = lm.config.decoder_start_token_id
            dec = torch.tensor([[start, int(ids[0, 0])]], device=device)
            ref = lm(input_ids=ids, decoder_input_ids=dec).logits
            enc = lm.get_encoder()(input_ids=ids).last_hidden_state
            hidden = decoder_body(lm)(input_ids=dec, encoder_hidden_states=enc).last_hidden_state
        else:
            ref = lm(input_ids=ids).logits
            hidden = decoder_body(lm)(input_ids=ids).last_hidden_state
        mine = lm_head_logits(lm, hidden)
    if not torch.allclose(mine.float(), ref.float(), atol=1e-4, rtol=1e-3):
        raise NotImplementedError(f"{where}: {type(lm).__name__} computes logits other than head(decoder hidden "
                                  f"state); this model family is not supported")


@dataclass(frozen=True)
class LoadOptions:
    """The `from_pretrained` options a run's checkpoint needs (`model.revision`, `model.attn_implementation`,
    `model.trust_remote_code`), given to every load of its models and tokenizers (`RunContext.load_options`)."""

    revision: str | None = None
    """Which version (branch, tag or commit) of a hub checkpoint θ_ckpt is; ignored for a local folder."""
    attn_implementation: str | None = None
    """The attention kernel ("eager", "sdpa", "flash_attention_2", ...); a model option only (not the config's
    nor a tokenizer's); None: the library's default."""
    trust_remote_code: bool = False
    """Allow the checkpoint's own modelling code (its `auto_map`); only for checkpoints you trust."""

    def config_kwargs(self) -> dict[str, Any]:
        """For `AutoConfig.from_pretrained` and tokenizers: the revision when set, and trust_remote_code always
        (an explicit False refuses custom code at once, where transformers' default would prompt on stdin)."""
        kwargs: dict[str, Any] = {"trust_remote_code": bool(self.trust_remote_code)}
        if self.revision is not None:
            kwargs["revision"] = self.revision
        return kwargs

    def model_kwargs(self) -> dict[str, Any]:
        """For a model's `from_pretrained`: `config_kwargs()` and the attention implementation when set."""
        kwargs = self.config_kwargs()
        if self.attn_implementation is not None:
            kwargs["attn_implementation"] = self.attn_implementation
        return kwargs

    def without_revision(self) -> LoadOptions:
        return replace(self, revision=None)

    def for_source(self, path: str, checkpoint: str | None) -> LoadOptions:
        """These options for loading `path` in a run whose θ_ckpt is `checkpoint`: the revision is a version of
        θ_ckpt, so only loads of θ_ckpt itself get it (another hub name or a saved folder does not)."""
        return self if checkpoint is not None and str(path) == str(checkpoint) else self.without_revision()


def load_lm(name_or_path: str, *, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
            options: LoadOptions | None = None) -> PreTrainedModel:
    """Load a causal or seq2seq LM, frozen (no parameter requires grad) and in eval mode, in `dtype` (default
    float32, whatever the checkpoint stores: trained weights stay float32 masters under bf16 autocast), with the
    run's `options` (`LoadOptions`) given to the config's and the model's `from_pretrained`. `name_or_path` is a
    folder on this node or a hub name: a URI is copied once where the load starts (`load_policy`, `load_sampler`,
    an algorithm's network loader), with `bcoder_ray.util.storage.local_dir`."""
    options = options or LoadOptions()
    name_or_path = str(name_or_path)
    config = AutoConfig.from_pretrained(name_or_path, **options.config_kwargs())
    cls = AutoModelForSeq2SeqLM if lm_kind(config) == ENCODER_DECODER else AutoModelForCausalLM
    lm = cls.from_pretrained(name_or_path, dtype=dtype or torch.float32, **options.model_kwargs())
    if lm_kind(lm) == ENCODER_DECODER and lm.config.decoder_start_token_id is None:
        raise ValueError(f"{name_or_path}: encoder-decoder config has no decoder_start_token_id")
    lm.requires_grad_(False)
    lm.eval()
    if device is not None:
        lm.to(device)
    check_logit_path(lm, str(name_or_path))
    return lm


_IDENTITY_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt")
_EDGE_BYTES = 1 << 20


def checkpoint_identity(name_or_path: str, revision: str | None = None) -> str:
    """A content identity for a checkpoint folder (cheap: sizes and edges of files; a URI's node-local copy),
    else the name and, when given, the hub revision (a folder's content already says which one it is)."""
    if is_uri(name_or_path):
        name_or_path = local_dir(name_or_path)
    if not os.path.isdir(name_or_path):
        return f"name:{name_or_path}" if revision is None else f"name:{name_or_path}@{revision}"
    h = hashlib.sha256()
    for name in sorted(os.listdir(name_or_path)):
        path = os.path.join(name_or_path, name)
        if not (os.path.isfile(path) and name.endswith(_IDENTITY_SUFFIXES)) or name.startswith("tokenizer"):
            continue
        size = os.path.getsize(path)
        h.update(f"{name}:{size}".encode())
        with open(path, "rb") as f:
            h.update(f.read(_EDGE_BYTES))
            if size > 2 * _EDGE_BYTES:
                f.seek(size - _EDGE_BYTES)
                h.update(f.read(_EDGE_BYTES))
    return "content:" + h.hexdigest()[:16]


def checkpoint_label(path: str) -> str:
    """A checkpoint's name for tables: its folder, or its parent's for Ray Train's generic `.../final`."""
    p = Path(path)
    return p.parent.name if p.name in ("final", "checkpoint") or p.name.startswith("checkpoint_") else p.name


# ---------------------------------------------------------------------------------------------- network parts
@dataclass
class Encoded:
    """The frozen shared encoder's output for a batch of prompts (encoder-decoder models)."""
    hidden: torch.Tensor  # [B, S, d]
    mask: torch.Tensor    # [B, S]

    def repeat_interleave(self, n: int) -> "Encoded":
        return Encoded(self.hidden.repeat_interleave(n, dim=0), self.mask.repeat_interleave(n, dim=0))

    def select(self, index: torch.Tensor) -> "Encoded":
        return Encoded(self.hidden[index], self.mask[index])


class SharedEncoder(nn.Module):
    """The encoder (and the input embedding it shares with the decoders) of an encoder-decoder: frozen, run once."""

    def __init__(self, stack: nn.Module, embedding: nn.Embedding):
        super().__init__()
        self.stack = stack
        self.embedding = embedding

    def forward(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> Encoded:
        with torch.no_grad():
            hidden = self.stack(input_ids=prompt_ids, attention_mask=prompt_mask).last_hidden_state
        return Encoded(hidden, prompt_mask)

    def train(self, mode: bool = True) -> "SharedEncoder":
        return super().train(False)


class Trunk(nn.Module):
    """A decoder body run teacher-forced over programs (all states at once) or step by step with a KV cache."""

    def __init__(self, body: nn.Module, kind: str, decoder_start_id: int | None):
        super().__init__()
        self.body = body
        self.kind = kind
        self.decoder_start_id = decoder_start_id

    def decode(self, input_ids: torch.Tensor, *, attention_mask: torch.Tensor | None = None,
               position_ids: torch.Tensor | None = None, encoded: Encoded | None = None,
               cache=None, use_cache: bool = False):
        """One call of the body: returns (last hidden states [B, L, d], cache). `cache` is the KV cache of the
        previous call (transformers' `cache` argument, which replaces `past_key_values`)."""
        if self.kind == ENCODER_DECODER:
            if encoded is None:
                raise ValueError("encoder-decoder decode needs the encoder output")
            out = self.body(input_ids=input_ids, encoder_hidden_states=encoded.hidden,
                            encoder_attention_mask=encoded.mask, cache=cache, use_cache=use_cache)
        else:
            out = self.body(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                            cache=cache, use_cache=use_cache)
        return out.last_hidden_state, (out.past_key_values if use_cache else None)

    def states(self, batch: Batch, encoded: Encoded | None) -> torch.Tensor:
        """Teacher-forced hidden states of s_0 … s_{T-1}: [B, T, d] (see the module docstring for positions)."""
        program = batch.program_ids[:, :-1]
        if self.kind == ENCODER_DECODER:
            start = torch.full_like(batch.program_ids[:, :1], self.decoder_start_id)
            hidden, _ = self.decode(torch.cat([start, program], dim=1), encoded=encoded)
            return hidden
        ids = torch.cat([batch.prompt_ids, program], dim=1)
        mask = torch.cat([batch.prompt_mask, batch.program_mask[:, :-1]], dim=1)
        hidden, _ = self.decode(ids, attention_mask=mask, position_ids=positions_from_mask(mask))
        return hidden[:, batch.prompt_ids.shape[1] - 1:]


def positions_from_mask(mask: torch.Tensor) -> torch.Tensor:
    """Position ids of a left-padded row: 0 at its first real token (as ``generate`` computes them)."""
    return (mask.long().cumsum(-1) - 1).clamp_min(0)


class PolicyLM(Trunk):
    """Decoder + LM head: θ_ckpt (frozen) or the LM part of θ. ``lm`` is the whole HF model (saved as is)."""

    def __init__(self, lm: PreTrainedModel):
        super().__init__(decoder_body(lm), lm_kind(lm), getattr(lm.config, "decoder_start_token_id", None))
        self.lm = lm

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return lm_head_logits(self.lm, hidden)

    def encode(self, prompt_ids: torch.Tensor, prompt_mask: torch.Tensor) -> Encoded | None:
        """The LM's own encoder over the prompts (encoder-decoder; None for decoder-only). Gradient follows the
        encoder's `requires_grad`; a B-Coder stage reads its frozen `SharedEncoder` instead."""
        if self.kind != ENCODER_DECODER:
            return None
        hidden = self.lm.get_encoder()(input_ids=prompt_ids, attention_mask=prompt_mask).last_hidden_state
        return Encoded(hidden, prompt_mask)



class _TokenLogitStats(torch.autograd.Function):
    """max_a ℓ, ℓ[a_t] and (on chosen rows) log Σ_a exp ℓ from one [N, V] logits tensor, with a backward that
    writes one [N, V] gradient (two scatters + a softmax on the chosen rows) instead of one dense tensor per op."""

    @staticmethod
    def forward(ctx, logits, actions, lse_rows):
        max_logit, argmax = logits.max(dim=-1)
        taken = logits.gather(-1, actions.unsqueeze(-1)).squeeze(-1)
        log_z = torch.zeros(max_logit.shape, dtype=torch.float32, device=logits.device)
        if lse_rows.numel():
            log_z[lse_rows] = torch.logsumexp(logits[lse_rows].float(), dim=-1)
        ctx.save_for_backward(logits, actions, argmax, lse_rows, log_z)
        ctx.mark_non_differentiable(argmax)
        return max_logit, taken, log_z, argmax

    @staticmethod
    def backward(ctx, g_max, g_taken, g_log_z, _):
        logits, actions, argmax, lse_rows, log_z = ctx.saved_tensors
        grad = torch.zeros_like(logits)
        if lse_rows.numel() and g_log_z is not None:
            softmax = (logits[lse_rows].float() - log_z[lse_rows].unsqueeze(-1)).exp()
            grad[lse_rows] = (softmax * g_log_z[lse_rows].unsqueeze(-1)).to(grad.dtype)
        if g_max is not None:
            grad.scatter_add_(-1, argmax.unsqueeze(-1), g_max.unsqueeze(-1).to(grad.dtype))
        if g_taken is not None:
            grad.scatter_add_(-1, actions.unsqueeze(-1), g_taken.unsqueeze(-1).to(grad.dtype))
        return grad, None, None


def token_logit_stats(logits: torch.Tensor, actions: torch.Tensor, lse_rows: torch.Tensor | None = None):
    """(max_a ℓ [B,T], ℓ[a_t] [B,T], log Z [B,T] (0 outside ``lse_rows``)) for logits [B,T,V], actions [B,T];
    ``lse_rows`` is a bool [B] of the rows that need log Z (the cross-entropy's programs)."""
    b, t, v = logits.shape
    rows = torch.zeros(0, dtype=torch.long, device=logits.device)
    if lse_rows is not None:
        rows = torch.nonzero(lse_rows.repeat_interleave(t)).flatten()
    max_logit, taken, log_z, _ = _TokenLogitStats.apply(logits.reshape(b * t, v), actions.reshape(b * t), rows)
    return max_logit.view(b, t), taken.view(b, t), log_z.view(b, t)


def new_head(d_model: int, out: int, like: torch.Tensor, generator: torch.Generator) -> nn.Linear:
    head = nn.Linear(d_model, out, bias=True)
    with torch.no_grad():
        head.weight.copy_(torch.randn(head.weight.shape, generator=generator) * 0.02)
        head.bias.zero_()
    return head.to(device=like.device, dtype=like.dtype)


def hidden_size(lm_or_config: PreTrainedModel | PretrainedConfig) -> int:
    config = lm_or_config.config if isinstance(lm_or_config, PreTrainedModel) else lm_or_config
    return int(config.get_text_config().hidden_size)


def generation_eos_ids(lm: PreTrainedModel) -> tuple[int, ...]:
    """The ids the model's `generation_config.json` ends generation at (an instruct model often lists its
    end-of-turn token beside EOS); () when it names none."""
    ids = getattr(getattr(lm, "generation_config", None), "eos_token_id", None)  # lm: a model, or what has one
    if ids is None:
        return ()
    return (int(ids),) if isinstance(ids, int) else tuple(int(i) for i in ids)


def generation_eos_ids_of(name_or_path: str, options: LoadOptions | None = None) -> tuple[int, ...]:
    """`generation_eos_ids` of a checkpoint (a folder on this node or a hub name) without loading its weights (its
    generation_config.json; () when it has none)."""
    try:
        config = GenerationConfig.from_pretrained(str(name_or_path), **(options or LoadOptions()).config_kwargs())
    except OSError:  # no generation_config.json
        return ()
    return generation_eos_ids(SimpleNamespace(generation_config=config))


def has_dropout(module: nn.Module) -> bool:
    """Whether `module` drops anything in training mode: a dropout layer with p > 0 (GPT-2, T5), or a model
    config's `attention_dropout` > 0 (the Llama-style families apply it inside the attention function)."""
    for m in module.modules():
        if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0:
            return True
        if isinstance(m, PreTrainedModel) and float(getattr(m.config, "attention_dropout", 0.0) or 0.0) > 0:
            return True
    return False


@contextlib.contextmanager
def eval_mode(module: nn.Module) -> Iterator[nn.Module]:
    """`module` in eval mode (no dropout) for the duration, then every submodule back to the mode it was in (a
    network may hold a frozen part in eval mode, such as an encoder-decoder's shared encoder)."""
    modes = [(m, m.training) for m in module.modules()]
    module.train(False)
    try:
        yield module
    finally:
        for m, training in modes:
            m.training = training
