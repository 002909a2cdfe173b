"""The dueling Q over a pretrained LM, with the three parameter sets of Figure 2 (θ_ckpt, φ, θ).

Public API
----------
- (from ``bcoder_ray.model.lm``) ``load_lm(name_or_path, *, dtype=None, device=None, options=None) -> PreTrainedModel``:
  a Hugging Face checkpoint (name or local path), encoder-decoder (T5 / CodeT5 family) or decoder-only (GPT-2,
  Llama-style), frozen and in eval mode. It checks that ``hidden -> logits`` as this module computes it matches
  the model's own forward (raises otherwise).
- ``lm_kind(lm_or_config) -> "encoder-decoder" | "decoder-only"``.
- ``softabs(x)``, ``capped_value(raw, r_max)``: G.1, V = R_max - softabs(v) with softabs(x) = ln cosh(x/2) ≥ 0.
- ``QModel.create(checkpoint, *, parts, phi_dir=None, theta_dir=None, alpha=None, r_max=None, init_from_lm=True,
  dtype=None, device=None, seed=0, options=None) -> QModel``. ``parts`` ⊆ {"ckpt", "phi", "theta"}: which networks
  to hold. ``options`` (``bcoder_ray.model.lm.LoadOptions``) reach every load (the checkpoint's config and LM, the θ and
  φ folders; the revision only the checkpoint's).
  "phi"/"theta" come from ``phi_dir``/``theta_dir`` when given (saved by ``save_phi``/``save_theta``), else are
  freshly initialised from ``checkpoint``: φ = decoder copy + new V head; θ = LM copy + h1 = h2 (so V^r_θ = 0 and
  Q_θ = Q_φ exactly). ``init_from_lm=False`` (plain dueling DQN ablation): θ's LM head is re-initialised at random
  (N(0, σ²), σ = std of the checkpoint's output embedding) and θ does not use φ (v_φ := 0).
  ``alpha``/``r_max`` default to the saved values (θ/φ dirs) or 1.0.
- ``QModel`` attributes: ``kind``, ``alpha``, ``r_max``, ``encoder`` (``SharedEncoder`` | None; encoder-decoder only),
  ``ckpt`` (``PolicyLM`` | None), ``phi`` (``ValueNet`` | None), ``theta`` (``QNet`` | None), ``pad_id``,
  ``decoder_start_id``.
- ``QModel`` methods:
    ``freeze_for_stage("phi" | "theta" | "none") -> list[nn.Parameter]``: the parameters that stage trains (give
      exactly these to the optimiser); every other parameter gets ``requires_grad=False``. φ: φ's decoder (not the
      shared input embedding of an encoder-decoder) + V head. θ: θ's decoder + LM head + h1 (not h2).
    ``encode(batch) -> Encoded | None``: the frozen shared encoder's output (None for decoder-only).
    ``ckpt_logits(batch, encoded) -> [B,T,V]``: ℓ_ckpt(s_t, ·) for t = 0 … T-1 (no grad).
    ``phi_raw_values(batch, encoded) -> [B,T]``: raw v_φ(s_t) (V_φ = capped_value(v_φ, r_max)).
    ``theta_outputs(batch, encoded, v_phi, lse_rows=None) -> ThetaOutputs``: ℓ_θ, max ℓ_θ, ℓ_θ(s_t,a_t), log Z
      (rows in ``lse_rows``), A_θ(s_t,a_t), V_θ(s_t), Q_θ(s_t,a_t) for every state of the teacher-forced program
      (eq. 16 with the G.1/G.2 value head).
- ``token_logit_stats(logits, actions, lse_rows=None) -> (max ℓ, ℓ[a_t], log Z)``: one fused autograd op.
    ``save_theta(dir, tokenizer=None)``: ``dir`` loads as a plain LM with ``transformers``' ``from_pretrained``;
      ``value_heads.safetensors`` (h1, h2) and ``bcoder_q.json`` sit beside it.
    ``save_phi(dir, tokenizer=None)``: φ's body as the model's plain base model (``AutoModel.from_pretrained``;
      for encoder-decoder a base model with the shared encoder) + ``value_head.safetensors`` + ``bcoder_q.json``.
    ``train(mode)``: only the network of the current stage (``freeze_for_stage``) follows ``mode``; frozen
      networks stay in eval mode (no dropout in targets).

States and positions: for a program w_0 … w_{T-1} (EOS last unless cut at the length limit) the teacher-forced pass
gives the hidden state of s_t = (prompt, w_<t) for t = 0 … T-1 at index t. Encoder-decoder: the decoder reads
[decoder_start, w_0 … w_{T-2}]. Decoder-only: the model reads [left-padded prompt, w_0 … w_{T-2}] with position
ids from the attention mask, and s_t is read at index S-1+t.

What stays on the device, per stage (nothing else is loaded):
- stage φ with cached targets (``parts=("phi",)``): the frozen encoder (encoder-decoder only) + φ's decoder + V head.
  θ_ckpt's decoder and LM head are not held (A_ckpt comes from the cache).
- stage θ with cached targets (``parts=("theta",)``): the frozen encoder + θ's decoder + LM head + h1, h2. Neither
  θ_ckpt nor φ is held (â_{t+1} and v_φ come from the cache).
- computing the cached targets (``bcoder_ray.algorithms.bcoder.targets``): θ_ckpt (+ φ when v_φ is wanted), no gradients.
- live targets (no cache): add θ_ckpt (and φ for stage θ) to the stage's networks, run without gradients.
- Q-sampling (``bcoder_ray.model.sampling``): the frozen encoder + θ's decoder + LM head (h1, h2 are unused).
- ranking (``bcoder_ray.algorithms.bcoder.ranking``): the frozen encoder + θ (decoder, LM head, h1, h2) + φ's decoder + V head.
For encoder-decoder models the encoder (and the input embedding it shares with the decoders) is one object shared
by every network held; for decoder-only models nothing is shared, so each network held is one full model copy.
"""

from __future__ import annotations

import copy
import json
import math
import os
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, PretrainedConfig, PreTrainedModel
from transformers.dynamic_module_utils import custom_object_save

from bcoder_ray.algorithms.common import read_saved_meta
from bcoder_ray.model.batch import Batch
from bcoder_ray.model.lm import (DECODER_ONLY, ENCODER_DECODER, Encoded, LoadOptions, PolicyLM,  # noqa: F401
                           SharedEncoder, Trunk, decoder_body, float32_linear, hidden_size, lm_kind, load_lm, new_head,
                           positions_from_mask, token_logit_stats)
from bcoder_ray.util.storage import local_dir

PARTS = ("ckpt", "phi", "theta")
STAGES = ("phi", "theta", "none")
THETA_HEADS_FILE = "value_heads.safetensors"
PHI_HEAD_FILE = "value_head.safetensors"
META_FILE = "bcoder_q.json"
LN2 = math.log(2.0)


# ---------------------------------------------------------------------------------------------- value cap (G.1)
def softabs(x: torch.Tensor) -> torch.Tensor:
    """softabs(x) = [softplus(x) + softplus(-x)]/2 - ln 2 = ln cosh(x/2) ≥ 0, zero at 0 (G.1, read with "- ln 2")."""
    a = x.abs()
    return (a / 2 + torch.log1p(torch.exp(-a)) - LN2).clamp_min(0.0)


def capped_value(raw: torch.Tensor, r_max: float) -> torch.Tensor:
    """V = R_max - softabs(v) ≤ R_max (G.1); for θ, ``raw`` is v_φ + v^r_θ (the sum of the raw heads)."""
    return r_max - softabs(raw)


class ValueNet(Trunk):
    """φ: a decoder body + the V head; ``raw_values`` is v_φ(s_t), V_φ = R_max - softabs(v_φ) (G.1)."""

    def __init__(self, body: nn.Module, kind: str, decoder_start_id: int | None, v_head: nn.Linear):
        super().__init__(body, kind, decoder_start_id)
        self.v_head = v_head
        # the checkpoint's own (trust_remote_code) LM class a fresh body came from: `save_pretrained` of a base
        # model taken out of it copies no modelling code, which the saved config's auto_map still names
        self.code_class: type | None = None

    def raw_values(self, batch: Batch, encoded: Encoded | None) -> torch.Tensor:
        return float32_linear(self.v_head, self.states(batch, encoded)).squeeze(-1)


class QNet(PolicyLM):
    """θ: decoder + LM head + residual value head V^r_θ = h1 - h2 (G.2; h2 frozen, equal to h1 at initialisation)."""

    def __init__(self, lm: PreTrainedModel, h1: nn.Linear, h2: nn.Linear, uses_phi: bool):
        super().__init__(lm)
        self.h1 = h1
        self.h2 = h2
        self.uses_phi = uses_phi

    def residual_value(self, hidden: torch.Tensor) -> torch.Tensor:
        return (float32_linear(self.h1, hidden) - float32_linear(self.h2, hidden)).squeeze(-1)


@dataclass
class ThetaOutputs:
    """Per-state outputs of θ over a teacher-forced batch (all [B, T] except ``logits`` [B, T, V])."""
    logits: torch.Tensor      # ℓ_θ(s_t, ·)
    max_logit: torch.Tensor   # max_a ℓ_θ(s_t, a)
    taken_logit: torch.Tensor  # ℓ_θ(s_t, a_t)
    log_z: torch.Tensor       # log Σ_a exp ℓ_θ(s_t, a) on the rows asked for (``lse_rows``), else 0
    advantage: torch.Tensor   # A_θ(s_t, a_t) = α(ℓ_θ(s_t, a_t) - max_a ℓ_θ(s_t, a)) ≤ 0 (eq. 7, 16)
    value: torch.Tensor       # V_θ(s_t) = R_max - softabs(v_φ(s_t) + v^r_θ(s_t))
    q: torch.Tensor           # Q_θ(s_t, a_t) = A + V

    def q_of(self, actions: torch.Tensor, alpha: float) -> torch.Tensor:
        """Q_θ(s_t, actions[:, t]) for any actions [B, T], detached (entries < 0 read as action 0; mask them)."""
        with torch.no_grad():
            picked = self.logits.gather(-1, actions.clamp_min(0).unsqueeze(-1)).squeeze(-1)
            return alpha * (picked - self.max_logit).float() + self.value


def _copy_sharing(module: nn.Module, shared: Iterable[nn.Parameter]) -> nn.Module:
    """Deep copy of ``module`` in which the parameters ``shared`` (the frozen encoder's) stay the same objects."""
    memo = {id(p): p for p in shared}
    return copy.deepcopy(module, memo)


def _untie_head(lm: PreTrainedModel, frozen: set[int]) -> None:
    """Give θ its own LM-head weight where the head is tied to a frozen (shared) embedding."""
    head = lm.get_output_embeddings()
    if id(head.weight) in frozen:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)


def _reinit_head(lm: PreTrainedModel, generator: torch.Generator) -> None:
    """Plain dueling DQN ablation: a fresh, untied advantage head (N(0, σ²), σ = std of the checkpoint's head)."""
    head = lm.get_output_embeddings()
    std = float(head.weight.detach().float().std())
    fresh = torch.randn(head.weight.shape, generator=generator) * std
    head.weight = nn.Parameter(fresh.to(device=head.weight.device, dtype=head.weight.dtype), requires_grad=False)
    if lm_kind(lm) == DECODER_ONLY:
        lm.config.tie_word_embeddings = False


def _adopt_encoder(lm_or_base: PreTrainedModel, encoder: SharedEncoder, where: str) -> None:
    """Point a freshly loaded encoder-decoder at the one shared frozen encoder (checking it is the same one)."""
    own_embedding = lm_or_base.get_input_embeddings()
    if not torch.equal(own_embedding.weight.to(encoder.embedding.weight.device), encoder.embedding.weight):
        raise ValueError(f"{where}: its input embedding differs from the checkpoint's; it was trained from another "
                         f"checkpoint")
    old = id(own_embedding.weight)
    if hasattr(lm_or_base, "shared"):
        lm_or_base.shared = encoder.embedding
    lm_or_base.encoder = encoder.stack
    decoder = lm_or_base.get_decoder()
    decoder.embed_tokens.weight = encoder.embedding.weight
    head = lm_or_base.get_output_embeddings() if hasattr(lm_or_base, "lm_head") else None
    if head is not None and id(head.weight) == old:
        head.weight = nn.Parameter(head.weight.detach().clone(), requires_grad=False)


def _read_meta(directory: str, expected_format: str) -> dict:
    return read_saved_meta(directory, META_FILE, expected_format, f"QModel.save_{expected_format}")


def _pick(name: str, given: float | None, saved: list[float]) -> float:
    if given is not None:
        for value in saved:
            if value != given:
                raise ValueError(f"{name}={given} differs from the saved {name}={value}")
        return float(given)
    return float(saved[0]) if saved else 1.0


# ---------------------------------------------------------------------------------------------- the Q model
class QModel(nn.Module):
    """The networks one stage holds (see the module docstring); any of ckpt, phi, theta may be None."""

    def __init__(self, *, kind: str, config: PretrainedConfig, alpha: float, r_max: float, pad_id: int,
                 decoder_start_id: int | None, encoder: SharedEncoder | None, ckpt: PolicyLM | None,
                 phi: ValueNet | None, theta: QNet | None):
        super().__init__()
        self.kind, self.alpha, self.r_max, self.config = kind, float(alpha), float(r_max), config
        self.pad_id, self.decoder_start_id = pad_id, decoder_start_id
        self.encoder, self.ckpt, self.phi, self.theta = encoder, ckpt, phi, theta
        self.stage = "none"
        self.load_options = LoadOptions()  # what `create` loaded with

    # ------------------------------------------------------------------ construction
    @classmethod
    def create(cls, checkpoint: str, *, parts: Iterable[str] = PARTS, phi_dir: str | None = None,
               theta_dir: str | None = None, alpha: float | None = None, r_max: float | None = None,
               init_from_lm: bool = True, dtype: torch.dtype | None = None,
               device: torch.device | str | None = None, seed: int = 0,
               options: LoadOptions | None = None) -> "QModel":
        parts = tuple(parts)
        unknown = set(parts) - set(PARTS)
        if unknown or not parts:
            raise ValueError(f"parts must be a non-empty subset of {PARTS}, got {parts}")
        options = options or LoadOptions()
        saved = options.without_revision()  # θ/φ folders are our own saves: the revision is θ_ckpt's
        checkpoint = local_dir(checkpoint)
        phi_dir = local_dir(phi_dir, "phi checkpoint") if phi_dir else phi_dir
        theta_dir = local_dir(theta_dir, "theta checkpoint") if theta_dir else theta_dir
        config = AutoConfig.from_pretrained(checkpoint, **options.config_kwargs())
        kind = lm_kind(config)
        generator = torch.Generator().manual_seed(seed)
        phi_meta = _read_meta(phi_dir, "phi") if ("phi" in parts and phi_dir) else None
        theta_meta = _read_meta(theta_dir, "theta") if ("theta" in parts and theta_dir) else None
        alpha = _pick("alpha", alpha, [m["alpha"] for m in (theta_meta,) if m])
        r_max = _pick("r_max", r_max, [m["r_max"] for m in (theta_meta, phi_meta) if m])

        fresh = [p for p in parts if p == "ckpt" or (p == "phi" and not phi_dir) or (p == "theta" and not theta_dir)]
        base = load_lm(checkpoint, dtype=dtype, options=options) if (fresh or kind == ENCODER_DECODER) else None
        encoder = None
        shared: list[nn.Parameter] = []
        if kind == ENCODER_DECODER:
            encoder = SharedEncoder(base.get_encoder(), base.get_input_embeddings())
            shared = list(encoder.parameters())
        frozen_ids = {id(p) for p in shared}
        pad = config.pad_token_id if config.pad_token_id is not None else config.eos_token_id
        start = getattr(config, "decoder_start_token_id", None)

        def take(part: str) -> PreTrainedModel:
            # the last fresh part takes the loaded model itself; earlier ones take copies (sharing the encoder)
            return base if part == fresh[-1] else _copy_sharing(base, shared)

        ckpt = phi = theta = None
        if "ckpt" in parts:
            ckpt = PolicyLM(take("ckpt"))
        if "phi" in parts:
            if phi_dir:
                phi = cls._load_phi(phi_dir, kind, encoder, dtype, saved)
            else:
                lm = take("phi")
                like = lm.get_output_embeddings().weight
                phi = ValueNet(decoder_body(lm), kind, start, new_head(hidden_size(lm), 1, like, generator))
                phi.code_class = type(lm) if type(lm).is_remote_code() else None
        if "theta" in parts:
            if theta_dir:
                theta = cls._load_theta(theta_dir, theta_meta, encoder, dtype, saved)
            else:
                lm = take("theta")
                _untie_head(lm, frozen_ids)
                if not init_from_lm:
                    _reinit_head(lm, generator)
                like = lm.get_output_embeddings().weight
                h1 = new_head(hidden_size(lm), 1, like, generator)
                theta = QNet(lm, h1, copy.deepcopy(h1), uses_phi=init_from_lm)
        del base
        model = cls(kind=kind, config=config, alpha=alpha, r_max=r_max, pad_id=int(pad), decoder_start_id=start,
                    encoder=encoder, ckpt=ckpt, phi=phi, theta=theta)
        model.load_options = options  # save_phi rebuilds an encoder-decoder's base model from the config
        model.requires_grad_(False)
        model.eval()
        if device is not None:
            model.to(device)
        return model

    @staticmethod
    def _load_theta(directory: str, meta: dict, encoder: SharedEncoder | None, dtype,
                    options: LoadOptions) -> QNet:
        from safetensors.torch import load_file
        lm = load_lm(directory, dtype=dtype, options=options)
        if encoder is not None:
            _adopt_encoder(lm, encoder, directory)
        heads = load_file(os.path.join(directory, THETA_HEADS_FILE))
        like = lm.get_output_embeddings().weight
        h1, h2 = (nn.Linear(hidden_size(lm), 1).to(device=like.device, dtype=like.dtype) for _ in range(2))
        h1.load_state_dict({k[3:]: v for k, v in heads.items() if k.startswith("h1.")})
        h2.load_state_dict({k[3:]: v for k, v in heads.items() if k.startswith("h2.")})
        return QNet(lm, h1, h2, uses_phi=bool(meta["uses_phi"]))

    @staticmethod
    def _load_phi(directory: str, kind: str, encoder: SharedEncoder | None, dtype,
                  options: LoadOptions) -> ValueNet:
        from safetensors.torch import load_file
        base = AutoModel.from_pretrained(directory, dtype=dtype or torch.float32, **options.model_kwargs())
        if kind == ENCODER_DECODER:
            _adopt_encoder(base, encoder, directory)
            body = base.get_decoder()
        else:
            body = base
        head_state = load_file(os.path.join(directory, PHI_HEAD_FILE))
        like = head_state["weight"]
        v_head = nn.Linear(hidden_size(base), 1).to(dtype=like.dtype)
        v_head.load_state_dict(head_state)
        return ValueNet(body, kind, getattr(base.config, "decoder_start_token_id", None), v_head)

    # ------------------------------------------------------------------ saving
    def save_theta(self, directory: str, tokenizer=None) -> None:
        from safetensors.torch import save_file
        if self.theta is None:
            raise ValueError("save_theta: this QModel holds no θ")
        os.makedirs(directory, exist_ok=True)
        self.theta.lm.save_pretrained(directory)
        heads = {f"h1.{k}": v.detach().contiguous() for k, v in self.theta.h1.state_dict().items()}
        heads.update({f"h2.{k}": v.detach().contiguous() for k, v in self.theta.h2.state_dict().items()})
        save_file(heads, os.path.join(directory, THETA_HEADS_FILE))
        self._write_meta(directory, "theta", uses_phi=self.theta.uses_phi)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)

    def save_phi(self, directory: str, tokenizer=None) -> None:
        from safetensors.torch import save_file
        if self.phi is None:
            raise ValueError("save_phi: this QModel holds no φ")
        os.makedirs(directory, exist_ok=True)
        if self.kind == ENCODER_DECODER:
            with torch.device("meta"):
                base = AutoModel.from_config(copy.deepcopy(self.config),
                                             trust_remote_code=self.load_options.trust_remote_code)
            base.shared = self.encoder.embedding
            base.encoder = self.encoder.stack
            base.decoder = self.phi.body
            base.save_pretrained(directory)
        else:
            self.phi.body.save_pretrained(directory)
            if self.phi.code_class is not None:
                custom_object_save(self.phi.code_class, directory)  # the modelling code its auto_map names
        save_file({k: v.detach().contiguous() for k, v in self.phi.v_head.state_dict().items()},
                  os.path.join(directory, PHI_HEAD_FILE))
        self._write_meta(directory, "phi")
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)

    def _write_meta(self, directory: str, fmt: str, **extra) -> None:
        meta = {"format": fmt, "kind": self.kind, "alpha": self.alpha, "r_max": self.r_max, **extra}
        with open(os.path.join(directory, META_FILE), "w") as f:
            json.dump(meta, f, indent=1)

    # ------------------------------------------------------------------ stages
    def _frozen_ids(self) -> set[int]:
        return {id(p) for p in self.encoder.parameters()} if self.encoder is not None else set()

    def freeze_for_stage(self, stage: str) -> list[nn.Parameter]:
        if stage not in STAGES:
            raise ValueError(f"stage must be one of {STAGES}, got {stage!r}")
        self.requires_grad_(False)
        self.stage = stage
        if stage == "none":
            return []
        part = self.phi if stage == "phi" else self.theta
        if part is None:
            raise ValueError(f"stage {stage}: this QModel holds no {stage}")
        frozen = self._frozen_ids()
        if stage == "theta":
            frozen |= {id(p) for p in self.theta.h2.parameters()}
        params, seen = [], set()
        for p in part.parameters():
            if id(p) in frozen or id(p) in seen:
                continue
            seen.add(id(p))
            p.requires_grad_(True)
            params.append(p)
        self.train(self.training)
        return params

    def train(self, mode: bool = True) -> "QModel":
        nn.Module.train(self, False)
        self.training = mode
        trained = {"phi": self.phi, "theta": self.theta}.get(self.stage)
        if trained is not None:
            trained.train(mode)
            if self.encoder is not None:
                self.encoder.train(False)
        return self

    # ------------------------------------------------------------------ forward pieces
    def encode(self, batch: Batch) -> Encoded | None:
        return self.encoder(batch.prompt_ids, batch.prompt_mask) if self.encoder is not None else None

    def ckpt_logits(self, batch: Batch, encoded: Encoded | None) -> torch.Tensor:
        if self.ckpt is None:
            raise ValueError("this QModel holds no θ_ckpt (create it with 'ckpt' in parts, or use cached targets)")
        with torch.no_grad():
            return self.ckpt.logits(self.ckpt.states(batch, encoded))

    def phi_raw_values(self, batch: Batch, encoded: Encoded | None) -> torch.Tensor:
        if self.phi is None:
            raise ValueError("this QModel holds no φ (create it with 'phi' in parts, or use cached v_phi)")
        return self.phi.raw_values(batch, encoded).float()

    def theta_outputs(self, batch: Batch, encoded: Encoded | None, v_phi: torch.Tensor | None,
                      lse_rows: torch.Tensor | None = None) -> ThetaOutputs:
        """``lse_rows`` (bool [B]): rows whose log Z is wanted (for the cross-entropy of π_θ)."""
        if self.theta is None:
            raise ValueError("this QModel holds no θ")
        hidden = self.theta.states(batch, encoded)
        logits = self.theta.logits(hidden)
        max_logit, taken, log_z = token_logit_stats(logits, batch.program_ids, lse_rows)
        advantage = self.alpha * (taken - max_logit).float()                       # eq. 7 / 16
        raw = self.theta.residual_value(hidden).float()                            # V^r_θ = h1 - h2 (G.2)
        if self.theta.uses_phi:
            if v_phi is None:
                raise ValueError("θ needs v_φ(s_t): pass cached v_phi or hold φ")
            raw = raw + v_phi.float()
        value = capped_value(raw, self.r_max)                                      # G.1 on the summed raw heads
        return ThetaOutputs(logits, max_logit, taken, log_z, advantage, value, advantage + value)
