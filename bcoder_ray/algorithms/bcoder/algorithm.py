"""B-Coder (Yu et al., ICLR 2024) and its Figure 1 ablations as algorithms on the shared loop.

Per iteration: stage φ (eq. 12; the first iteration, or every `phi_retrain_every`) fits V_φ by TD with θ_ckpt's
advantage, then stage θ (eq. 17 = β_td·eq. 15 + β_adv·eq. 8 + β_ce·CE, β_td = 1 as published) fine-tunes the
dueling Q initialised from the LM (eq. 9-11, 16). Both read ρ_real-mixed batches of human and generated rows with
the frozen targets cached (â_{t+1} = argmax p_ckpt(·|s_{t+1}), A_ckpt, V_φ: `bcoder_ray.algorithms.bcoder.targets`).
The published policy is θ's LM (Q-sampling from Q_θ/α is sampling from ℓ_θ); the ranker is R̃ (eq. 19-20) from θ
and φ, and the same θ and φ value program prefixes for value-guided search (`QValue`: Q_θ of the last token).

- `bcoder`: the paper (conservative operator, eq. 14).
- `bcoder_optimality`: the optimality operator, eq. 13 (Figure 1: "without the conservative operator").
- `dueling_dqn`: no LM initialisation of the Q heads (random dueling heads, no φ) and the optimality operator
  (Figure 1's plain dueling DQN).
"""

from __future__ import annotations

import dataclasses
import json
import os
from functools import cached_property
from typing import Any, Literal, Mapping, Sequence

import torch
from pydantic import Field, model_validator

from bcoder_ray.algorithms.bcoder import ranking
from bcoder_ray.algorithms.base import (Algorithm, AlgorithmConfig, RankerRef, Ranker, Rows, StageModule, StagePlan,
                                        TargetComputer, TargetsPlan)
from bcoder_ray.algorithms.bcoder.losses import phi_loss, theta_loss
from bcoder_ray.algorithms.bcoder.q_model import META_FILE, QModel
from bcoder_ray.algorithms.bcoder.targets import TARGET_COLUMNS, compute_frozen_targets, targets_fingerprint
from bcoder_ray.model.batch import Batch
from bcoder_ray.model.lm import checkpoint_label
from bcoder_ray.model.prefix_value import PrefixValue
from bcoder_ray.util.storage import local_dir


# What R̃ of the untrained Q is (eq. 16 with θ = θ_ckpt and h1 = h2, so V_θ = V_φ): R̃ = V(s_0) + Σ_t A_θ(s_t, w_t)
# + (1-γ)·Σ_{t≥1} V(s_t) with A_θ(s_t, w_t) = α·(log p_ckpt(w_t|s_t) - max_a log p_ckpt(a|s_t)).
UNTRAINED_RTILDE = ("R̃ of the Q initialised from θ_ckpt (no training) = α·[Σ_t log p_ckpt(w_t|s_t) − Σ_t max_a "
                    "log p_ckpt(a|s_t)] + V(s_0) + (1−γ)·Σ_{t≥1} V(s_t): θ_ckpt's sum log-likelihood, less each "
                    "step's best-token log-prob, plus value terms of a fresh V_φ head (≈ R_max each)")


PREFIX_VALUE = ("Q_θ(s_{τ-1}, w_{τ-1}) of a prefix's last token: the return expected after it, from the trained θ "
                "and φ (value-guided search)")


class BCoderConfig(AlgorithmConfig):
    name: str = "bcoder"
    """bcoder, bcoder_optimality or dueling_dqn."""
    alpha: float = 1.0
    """Energy temperature α of eq. 9-11 and 16 (not the sampling temperature)."""
    beta_adv: float = 0.1
    """Weight of the advantage loss (eq. 8) in eq. 17."""
    beta_ce: float = 0.5
    """Weight of the cross-entropy loss on ground-truth programs in eq. 17."""
    beta_td: float = Field(1.0, ge=0)
    """Weight β_td of L_Q (eq. 15, the TD term) in stage θ's eq. 17; 1: the paper. 0: θ learns from
    β_adv·L_adv + β_ce·L_ce alone (experiments/compare.py's control `bcoder_no_td`). β_td does not weigh stage φ
    (eq. 12 is φ's whole loss, and φ still runs): at 0, θ's loss reads neither V_φ nor the cached target actions,
    so φ's training cannot change θ's policy; it reaches only the ranker R̃, whose V_θ is then V_φ (θ's head h1
    gets a zero gradient)."""
    rho_real: float = 0.5
    """Share of ground-truth (human) programs in each mini-batch (Appendix H)."""
    r_max: float = 1.0
    """Upper bound of the return (G.1)."""
    operator: Literal["conservative", "optimality"] = "conservative"
    """Bellman operator of stage θ: eq. 14 (the paper) or eq. 13 (ablation)."""
    init_from_lm: bool = True
    """Initialise Q from the LM (eq. 9-11) with a φ stage; false: random dueling heads, no φ (dueling DQN)."""
    aux_reduction: Literal["sum", "mean"] = "sum"
    """Per-program reduction of L_adv and L_ce over tokens (eq. 8 and 1 sum)."""
    phi_retrain_every: int = 0
    """0: stage φ runs once (first iteration); N: again every N iterations (V_φ targets refilled)."""
    theta_continue: bool = True
    """Stage θ starts each iteration from the previous θ (false: from θ_ckpt every time)."""
    dropout_free_targets: bool = True
    """The TD bootstrap of the network being trained is read from a second no-grad forward without dropout (only
    when the network has dropout, e.g. T5 / CodeT5's 0.1); false: from the training forward, dropout included."""

    @model_validator(mode="after")
    def _check(self) -> "BCoderConfig":
        if not 0.0 <= self.rho_real <= 1.0:
            raise ValueError(f"rho_real must be in [0, 1], got {self.rho_real}")
        if self.alpha <= 0:
            raise ValueError(f"alpha must be > 0, got {self.alpha}")
        return self


class BCoderOptimalityConfig(BCoderConfig):
    name: str = "bcoder_optimality"
    operator: Literal["conservative", "optimality"] = "optimality"


class DuelingDQNConfig(BCoderConfig):
    name: str = "dueling_dqn"
    operator: Literal["conservative", "optimality"] = "optimality"
    init_from_lm: bool = False


class QStage(StageModule):
    """Stage φ or θ over a `QModel` holding only that stage's network (targets come cached in the batches)."""

    def __init__(self, model: QModel, stage: str, config: BCoderConfig):
        super().__init__()
        self.model, self.stage, self.cfg = model, stage, config
        self._params = model.freeze_for_stage(stage)
        self._rows: dict[str, torch.Tensor] = {}

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return self._params

    def forward(self, batch: Batch):
        c = self.cfg
        self._rows = {}
        if self.stage == "phi":
            return phi_loss(self.model, batch, gamma=c.gamma, dropout_free_targets=c.dropout_free_targets,
                            rows=self._rows)                                                # eq. 12
        return theta_loss(self.model, batch, gamma=c.gamma, beta_adv=c.beta_adv, beta_ce=c.beta_ce,
                          beta_td=c.beta_td, operator=c.operator, aux_reduction=c.aux_reduction,
                          dropout_free_targets=c.dropout_free_targets, rows=self._rows)     # eq. 17

    def row_td_errors(self) -> torch.Tensor | None:
        """Mean |δ_t| over each program's tokens in the last batch (V_φ's TD error in stage φ, Q_θ's in θ)."""
        return self._rows.get("td_error")

    def save(self, directory: str, tokenizer: Any = None) -> None:
        (self.model.save_phi if self.stage == "phi" else self.model.save_theta)(directory, tokenizer)


class RTildeRanker(Ranker):
    """R̃ (eq. 19-20) of each candidate from θ (and φ when θ uses it)."""

    def __init__(self, model: QModel, gamma: float, label: str, batch_size: int = 16):
        self.model, self.gamma, self.label, self.batch_size = model, gamma, label, batch_size

    def score(self, prompt_ids: Sequence[Sequence[int]], program_ids: Sequence[Sequence[int]]) -> list[float]:
        if not program_ids:
            return []
        return ranking.score_programs(self.model, prompt_ids, program_ids, gamma=self.gamma,
                                      pad_id=self.model.pad_id, batch_size=self.batch_size)


class QValue(RTildeRanker, PrefixValue):
    """One QModel, two uses: R̃ of whole programs (`score`, as `RTildeRanker`) and the value of prefixes while
    they are sampled (`values`: Q_θ(s_{τ-1}, w_{τ-1}) of the last token, `ranking.prefix_values`)."""

    def values(self, prompt_ids: Sequence[int], prefixes: Sequence[Sequence[int]]) -> list[float]:
        if not prefixes:
            return []
        return ranking.prefix_values(self.model, prompt_ids, prefixes, pad_id=self.model.pad_id,
                                     batch_size=self.batch_size)


class BCoder(Algorithm):
    name = "bcoder"
    Config = BCoderConfig
    stage_names = ("phi", "theta")
    td_error_stages = ("phi", "theta")
    stage_defaults = {"phi": {"lr": 1e-5, "schedule": "constant"}, "theta": {"lr": 3e-5, "schedule": "linear"}}
    supports_async = True  # off-policy: any generated row is a transition, whichever policy sampled it
    config: BCoderConfig

    @cached_property
    def _tokenizer(self):
        return self.ctx.load_tokenizer()

    def _targets(self, phi_dir: str | None, needs_actions: bool) -> TargetsPlan | None:
        """Stage φ: â and A_ckpt; stage θ: â (conservative operator) and V_φ (when θ uses φ)."""
        if not needs_actions and phi_dir is None:
            return None
        c, x = self.config, self.ctx
        fp = targets_fingerprint(x.theta_ckpt, self._tokenizer, max_prompt_len=x.source_len,
                                 max_program_len=x.target_len, alpha=c.alpha, phi_checkpoint=phi_dir, dtype=x.dtype,
                                 revision=x.options_for().revision, prompt_format=x.text_format().identity())
        columns = TARGET_COLUMNS if phi_dir else TARGET_COLUMNS[:2]
        return TargetsPlan(fingerprint=fp, columns=columns, spec={"phi_dir": phi_dir})

    def _rows(self, targets: TargetsPlan | None) -> Rows:
        """The ρ_real-mixed rows, with the cached targets as per-token columns of the batch."""
        return Rows(rho_real=self.config.rho_real, token_columns=targets.columns if targets else ())

    def plan_iteration(self, iteration: int, state: dict, policy_version: str) -> list[StagePlan]:
        c = self.config
        plans = []
        phi_due = state.get("phi") is None or (c.phi_retrain_every and iteration % c.phi_retrain_every == 0
                                               and state.get("phi_iteration") != iteration)
        if c.init_from_lm and phi_due:
            targets = self._targets(None, needs_actions=True)
            plans.append(StagePlan("phi", self._rows(targets), targets, spec={"phi_dir": None}))
        theta_start = state.get("theta") if c.theta_continue else None
        # stage θ's targets use the φ this iteration trains (the driver records it before planning θ's fill)
        plans.append(StagePlan("theta", self._rows(None), None, spec={"theta_dir": theta_start}))
        return plans

    def prepare_stage(self, plan: StagePlan, state: dict) -> StagePlan:
        """Stage θ's targets depend on the φ the same iteration may just have trained: bind them now."""
        if plan.name != "theta":
            return plan
        phi = state.get("phi") if self.config.init_from_lm else None
        targets = self._targets(phi, needs_actions=self.config.operator == "conservative")
        return dataclasses.replace(plan, rows=self._rows(targets), targets=targets)

    def resumes_from(self, plan: StagePlan) -> str | None:
        # θ continues from the previous θ (its targets come cached); φ is built from θ_ckpt each time it runs
        return plan.spec.get("theta_dir") if plan.name == "theta" else None

    def policy(self, state: dict) -> str | None:
        return state.get("theta")

    def ranker(self, state: dict) -> RankerRef | None:
        theta = state.get("theta")
        if theta is None:
            return None
        label = checkpoint_label(theta)
        return RankerRef(self.name, self.config.model_dump(), {"theta_dir": theta, "phi_dir": state.get("phi")},
                         label, description="R̃ (eq. 19-20) of the trained θ and φ")

    def prefix_value(self, state: dict) -> RankerRef | None:
        """Q_θ of the trained θ and φ (the ranker's checkpoints); None before stage θ has run."""
        ref = self.ranker(state)
        return None if ref is None else dataclasses.replace(ref, description=PREFIX_VALUE)

    def untrained_ranker(self) -> RankerRef | None:
        """R̃ of the Q the run starts from: θ and φ initialised from θ_ckpt with the run's seed, no step taken."""
        return RankerRef(self.name, self.config.model_dump(), {"theta_dir": None, "phi_dir": None},
                         "untrained-Q", description=UNTRAINED_RTILDE if self.config.init_from_lm else
                         "R̃ of the untrained dueling Q (random LM head, no φ)")

    def build_stage(self, plan: StagePlan, device=None) -> StageModule:
        c, x = self.config, self.ctx
        seed = x.seed + int(plan.spec.get("seed", 0))
        if plan.name == "phi":
            model = QModel.create(x.theta_ckpt, parts=("phi",), phi_dir=plan.spec.get("phi_dir"), alpha=c.alpha,
                                  r_max=c.r_max, seed=seed, device=device, options=x.options_for())
        else:
            model = QModel.create(x.theta_ckpt, parts=("theta",), theta_dir=plan.spec.get("theta_dir"),
                                  alpha=c.alpha, r_max=c.r_max, init_from_lm=c.init_from_lm, seed=seed, device=device,
                                  options=x.options_for())
        return QStage(model, plan.name, c)

    def target_computer(self, targets: TargetsPlan, device=None) -> TargetComputer:
        c, x = self.config, self.ctx
        phi_dir = targets.spec.get("phi_dir")
        model = QModel.create(x.theta_ckpt, parts=("ckpt", "phi") if phi_dir else ("ckpt",), phi_dir=phi_dir,
                              alpha=c.alpha, r_max=c.r_max, device=device, options=x.options_for())

        def compute(batch: Batch) -> Mapping[str, list]:
            rows = compute_frozen_targets(model, batch, with_v_phi=phi_dir is not None)
            return {col: [r[col] for r in rows] for col in targets.columns}

        return compute

    def load_ranker(self, spec: Mapping[str, Any], label: str, device=None) -> Ranker:
        return RTildeRanker(self._value_model(spec, device), self.config.gamma, label)

    def load_prefix_value(self, spec: Mapping[str, Any], label: str, device=None) -> QValue:
        """A `QValue` (also R̃'s ranker) from the checkpoints of `prefix_value` (or `ranker`: the same spec)."""
        return QValue(self._value_model(spec, device), self.config.gamma, label)

    def _value_model(self, spec: Mapping[str, Any], device=None) -> QModel:
        """θ (and φ when θ uses it) as `spec` names them; no θ: the untrained Q the run starts from."""
        if spec.get("theta_dir") is None:
            return self._untrained_model(device)
        theta_dir, phi_dir = local_dir(spec["theta_dir"], "theta checkpoint"), spec.get("phi_dir")
        with open(os.path.join(theta_dir, META_FILE), encoding="utf-8") as f:
            uses_phi = bool(json.load(f).get("uses_phi", True))
        if uses_phi and phi_dir is None:
            raise ValueError(f"{theta_dir}: θ uses φ but no φ checkpoint was given; R̃ and Q_θ need V_θ")
        return QModel.create(self.ctx.theta_ckpt, parts=("theta", "phi") if uses_phi else ("theta",),
                             theta_dir=theta_dir, phi_dir=phi_dir if uses_phi else None,
                             dtype=getattr(torch, self.ctx.dtype), device=device, options=self.ctx.options_for())

    def _untrained_model(self, device=None) -> QModel:
        # seeded as build_stage seeds the first φ and θ stages (seed + 0), so this is the run's own starting Q
        c, x = self.config, self.ctx
        return QModel.create(x.theta_ckpt, parts=("theta", "phi") if c.init_from_lm else ("theta",),
                             alpha=c.alpha, r_max=c.r_max, init_from_lm=c.init_from_lm, seed=x.seed,
                             dtype=getattr(torch, x.dtype), device=device, options=x.options_for())


class BCoderOptimality(BCoder):
    name = "bcoder_optimality"
    Config = BCoderOptimalityConfig


class DuelingDQN(BCoder):
    name = "dueling_dqn"
    Config = DuelingDQNConfig

