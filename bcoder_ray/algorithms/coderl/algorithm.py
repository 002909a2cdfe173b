"""CodeRL (Le et al., NeurIPS 2022; ``docs/baselines.md`` §1) as an algorithm on the shared loop.

Per iteration: rollout (m sampled programs per problem, plus one greedy decode per problem, W^b, when the
baseline is on: `RolloutRequest(greedy_baseline=True)`, stored with ``decoding = "greedy"`` under the task's batch
key) → stage ``critic`` (eq. 9; the first iteration, or every `critic_retrain_every`) → stage ``critic_test`` (the
binary φ_test of Critic Sampling, trained beside it on the same rows; `critic_test: false` skips it) → stage
``actor`` (eq. 8 + 10: L_ce on ground-truth human programs + L_rl on generated sampled programs).

How the actor's batches get r(W^b) and q̂_φ(w_t): one cached-targets fill before the actor stage
(`TargetsPlan` with columns ``q_hat`` and ``r_baseline``, per token; the fingerprint covers the critic checkpoint
and the two switches). The computer (`ActorTargets`) reads the generated rows' identity columns from the run's
buffer (`RunContext.buffer_uri`): a row's true outcome u (q̂ = v̂_t[u], `critic.token_values`) and the reward of
the greedy row of the same (suite, problem_id, policy_version), i.e. the greedy decode of the same problem by the
policy that sampled W^s (`baseline_rewards`). Human rows get q̂ = 0 and r(W^b) = 0 (never read by L_ce). The
actor stage reads them from ``Batch.tokens`` (``Rows.token_columns``).

Which generated rows L_rl (and the critic) read, `rows`:
- ``warm_start`` (default, the paper: the critic and L_rl on samples of the frozen warm-started actor): the
  generated rows of iteration 0, i.e. policy_version "0" (the driver's rollout of iteration i samples with policy
  version str(i)); later iterations' rollouts are still sampled and counted, but only the warm start's samples are
  learnt from, so more iterations repeat the paper's single fine-tuning on the same samples.
- ``current_policy``: the rows sampled in this iteration by the current policy (on-policy REINFORCE with a
  greedy baseline; the critic, when retrained, fits the newest samples).
- ``all``: every generated row so far (off-policy REINFORCE on stale samples, no importance weights).
The selection is an iteration window (`Filters.iteration_min/max`) rather than `policy_versions`, because the
latter also drops the human rows L_ce needs from a ρ_real-mixed batch.

Published: the actor's LM folder (``save_pretrained``; plain ``from_pretrained`` loads it). Ranker: the
four-class critic's pooled p(passed) (`CriticRanker`). Critic Sampling at inference:
`bcoder_ray.algorithms.coderl.inference`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
from functools import cached_property, lru_cache
from typing import Any, Literal, Mapping, Sequence

import pyarrow as pa
import torch
from pydantic import Field, model_validator

from bcoder_ray.algorithms.base import (Algorithm, AlgorithmConfig, RankerRef, Ranker, RolloutRequest, Rows,
                                        StageModule, StagePlan, TargetComputer, TargetsPlan)
from bcoder_ray.algorithms.common import policy_forward
from bcoder_ray.algorithms.coderl.losses import coderl_actor_loss
from bcoder_ray.algorithms.coderl.critic import (BINARY_CLASSES, FOUR_CLASSES, Critic, check_critic_tokenizer,
                                          critic_loss, outcome_labels, p_passed, token_values)
from bcoder_ray.buffer.filters import Filters
from bcoder_ray.model.batch import Batch, collate
from bcoder_ray.model.lm import LoadOptions, checkpoint_label
from bcoder_ray.util.storage import local_dir
from bcoder_ray.model.tokenization import pad_id

TARGET_COLUMNS = ("q_hat", "r_baseline")
STAGES = ("critic", "critic_test", "actor")
LOOKUP_COLUMNS = ("sample_id", "source", "decoding", "suite", "problem_id", "policy_version", "outcome", "reward")


class CodeRLConfig(AlgorithmConfig):
    name: str = "coderl"
    """coderl."""
    critic_checkpoint: str | None = None
    """The critics' initial body (a Hugging Face checkpoint, smaller than the actor or the same size); it must
    share the actor's tokenizer (checked when the run starts, before any rollout). null: θ_ckpt (the warm start)."""
    critic_retrain_every: int = Field(0, ge=0)
    """0: the critics train once (first iteration, as published); N: again every N iterations (q̂ refilled)."""
    critic_test: bool = True
    """Also train the binary critic φ_test ({passed, failed}, stage `critic_test`, same rows) that Critic
    Sampling uses at inference (`evaluate.py --critic-sampling`)."""
    use_baseline: bool = True
    """A = r(W^s) - r(W^b) with W^b the greedy decode (eq. 8); false: A = r(W^s), and no greedy decodes are
    sampled (CodeRL Table 2 ablation)."""
    use_critic_weights: bool = True
    """Weight each token's log-probability by q̂_φ(w_t) (eq. 10); false: weight 1 (Table 2 ablation)."""
    rows: Literal["warm_start", "current_policy", "all"] = "warm_start"
    """Generated rows the critic and L_rl read: the warm start's samples (iteration 0, policy_version "0"; the
    paper), this iteration's (the current policy's), or all so far (see the module docstring)."""
    ce_weight: float = Field(1.0, ge=0)
    """Weight of L_ce (human ground-truth programs) in the actor's loss (equal to rl_weight, as published)."""
    rl_weight: float = Field(1.0, ge=0)
    """Weight of L_rl (generated programs) in the actor's loss."""
    rho_real: float = Field(0.5, ge=0, le=1)
    """Share of human programs in each actor mini-batch (the rest: generated sampled programs)."""
    reduction: Literal["sum", "mean"] = "sum"
    """Per-program reduction of the token terms of L_ce and L_rl (eq. 8/10 sum; "mean" divides by length)."""

    @model_validator(mode="after")
    def _check(self) -> "CodeRLConfig":
        path = self.critic_checkpoint
        if path is not None and path.startswith(("/", ".", "~")) and not os.path.isdir(os.path.expanduser(path)):
            raise ValueError(f"critic_checkpoint: {path!r} is not a directory")
        return self


@lru_cache(maxsize=8)
def _checked_tokenizer(critic_path: str, actor_tokenizer: str, critic_options: LoadOptions | None = None,
                       actor_options: LoadOptions | None = None) -> str:
    return check_critic_tokenizer(critic_path, actor_tokenizer, critic_options=critic_options,
                                  actor_options=actor_options)


# ---------------------------------------------------------------------------------------------- the baseline
def baseline_rewards(table: pa.Table, sample_ids: Sequence[str]) -> list[dict]:
    """For each sample id, {outcome, reward, baseline}: the row's outcome and reward, and r(W^b), the reward of
    the greedy row (``decoding == "greedy"``) of the same (suite, problem_id, policy_version); None where the
    buffer holds no such greedy row (or the id is not a generated row of `table`). `table` has
    `LOOKUP_COLUMNS`."""
    data = table.select(list(LOOKUP_COLUMNS)).to_pydict()
    greedy: dict[tuple, float] = {}
    by_id: dict[str, int] = {}
    for i, sid in enumerate(data["sample_id"]):
        if data["source"][i] != "generated":
            continue
        by_id[sid] = i
        if (data["decoding"][i] or "sample") == "greedy":
            greedy.setdefault((data["suite"][i], data["problem_id"][i], data["policy_version"][i]),
                              float(data["reward"][i]))
    out = []
    for sid in sample_ids:
        i = by_id.get(sid)
        if i is None:
            out.append(None)
            continue
        key = (data["suite"][i], data["problem_id"][i], data["policy_version"][i])
        out.append({"outcome": data["outcome"][i], "reward": float(data["reward"][i]), "baseline": greedy.get(key),
                    "key": key})
    return out


class RowLookup:
    """`baseline_rewards` over the run's buffer: the generated rows' lookup columns, read once and again when a
    sample id is missing (rows appended since, e.g. a later iteration's rollout)."""

    def __init__(self, buffer_uri: str | None):
        if not buffer_uri:
            raise ValueError("coderl: the run context has no buffer_uri; the actor's targets (r(W^b), the "
                             "rows' outcomes) are read from the run's buffer")
        self.uri = buffer_uri
        self._table: pa.Table | None = None

    def _read(self) -> pa.Table:
        from bcoder_ray.buffer import ReplayBuffer

        return ReplayBuffer(self.uri).read(columns=list(LOOKUP_COLUMNS), filters={"sources": ["generated"]})

    def __call__(self, sample_ids: Sequence[str]) -> list[dict | None]:
        if self._table is None:
            self._table = self._read()
        found = baseline_rewards(self._table, sample_ids)
        if any(f is None for f in found):
            self._table = self._read()
            found = baseline_rewards(self._table, sample_ids)
        return found


# ---------------------------------------------------------------------------------------------- stages
def _fractions(labels: torch.Tensor, classes: Sequence[str]) -> dict[str, float]:
    counts = torch.bincount(labels.cpu(), minlength=len(classes)).float()
    total = max(1.0, float(counts.sum()))
    return {f"frac_{name}": float(counts[i]) / total for i, name in enumerate(classes)}


class CriticStage(StageModule):
    """Stage critic / critic_test: eq. 9 on generated rows (their buffer ``outcome`` is the label u); metrics
    carry the class balance of the rows read (``frac_<class>``, averaged over the stage's batches)."""

    def __init__(self, critic: Critic):
        super().__init__()
        self.critic = critic

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.critic.parameters() if p.requires_grad]

    def forward(self, batch: Batch):
        if "outcome" not in batch.info:
            raise KeyError("coderl critic stage: batches need the 'outcome' column (Rows.extra_columns)")
        labels = outcome_labels(batch.info["outcome"], self.critic.classes).to(batch.program_ids.device)
        loss, metrics = critic_loss(self.critic, batch, labels)                     # eq. 9
        metrics.update(_fractions(labels, self.critic.classes))
        return loss, metrics

    def save(self, directory: str, tokenizer: Any = None) -> None:
        self.critic.save(directory, tokenizer)


def load_trainable_lm(path: str, device=None, options: LoadOptions | None = None):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    from bcoder_ray.model.lm import ENCODER_DECODER, lm_kind

    options = options or LoadOptions()
    path = local_dir(path, "actor checkpoint")
    config = AutoConfig.from_pretrained(path, **options.config_kwargs())
    cls = AutoModelForSeq2SeqLM if lm_kind(config) == ENCODER_DECODER else AutoModelForCausalLM
    lm = cls.from_pretrained(path, **options.model_kwargs())
    lm.requires_grad_(True)
    return lm.to(device) if device is not None else lm


class ActorStage(StageModule):
    """Stage actor: ce_weight·L_ce (ground-truth human rows, `Batch.ground_truth`) + rl_weight·L_rl (generated
    rows: A·Σ_t q̂_t log p_θ(w_t), eq. 8/10), each `bcoder_ray.algorithms.coderl.losses.coderl_actor_loss` on the
    log-probabilities of one `bcoder_ray.algorithms.common.policy_forward`. Human rows that fail their tests are in
    neither term. q̂ and r(W^b) come from ``batch.tokens`` (cached targets)."""

    def __init__(self, lm, config: CodeRLConfig):
        super().__init__()
        from bcoder_ray.model.lm import PolicyLM

        self.policy = PolicyLM(lm)
        self.cfg = config

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return [p for p in self.policy.lm.parameters() if p.requires_grad]

    def forward(self, batch: Batch):
        c = self.cfg
        log_probs = policy_forward(self.policy, batch).logprobs          # ℓ_t, the actor's own encoder
        mask = batch.program_mask
        gt, gen = batch.ground_truth, ~batch.is_human
        q = batch.tokens.get("q_hat") if c.use_critic_weights else None
        base = batch.tokens["r_baseline"][:, 0] if c.use_baseline else None
        if c.use_critic_weights and q is None or c.use_baseline and base is None:
            raise KeyError("coderl actor stage: batches need the cached targets q_hat / r_baseline")
        l_ce, m_ce = coderl_actor_loss(log_probs[gt], mask[gt], torch.ones_like(gt[gt]), batch.reward[gt],
                                       use_baseline=False, use_critic=False, reduction=c.reduction)   # eq. 1
        l_rl, m_rl = coderl_actor_loss(log_probs[gen], mask[gen], torch.zeros_like(gen[gen]), batch.reward[gen],
                                       None if base is None else base[gen], None if q is None else q[gen],
                                       use_baseline=c.use_baseline, use_critic=c.use_critic_weights,
                                       reduction=c.reduction)                                          # eq. 8/10
        # 0·Σℓ keeps every parameter in the graph when a batch has no row of one kind (DDP)
        loss = c.ce_weight * l_ce + c.rl_weight * l_rl + 0.0 * log_probs.sum()
        metrics = {"loss": float(loss.detach()), "l_ce": m_ce["l_ce"], "l_rl": m_rl["l_rl"],
                   "n_ground_truth": float(gt.sum()), "n_generated": float(gen.sum()),
                   "advantage_mean": m_rl["advantage_mean"], "q_weight_mean": m_rl["q_weight_mean"]}
        if gen.any():
            metrics["reward_mean"] = float(batch.reward[gen].mean())
            if base is not None:
                metrics["baseline_mean"] = float(base[gen].mean())
        return loss, metrics

    def save(self, directory: str, tokenizer: Any = None) -> None:
        os.makedirs(directory, exist_ok=True)
        self.policy.lm.save_pretrained(directory)
        if tokenizer is not None:
            tokenizer.save_pretrained(directory)


# ---------------------------------------------------------------------------------------------- targets, ranker
def _program_batch(prompt_ids: Sequence[Sequence[int]], program_ids: Sequence[Sequence[int]], pad: int) -> Batch:
    return collate([{"prompt_ids": list(p), "program_ids": list(w), "reward": 0.0, "is_human": False}
                    for p, w in zip(prompt_ids, program_ids)], pad)


class ActorTargets:
    """The actor stage's cached targets for a batch of rows (see the module docstring): {q_hat, r_baseline}."""

    def __init__(self, spec: Mapping[str, Any], buffer_uri: str | None, device=None,
                 options: LoadOptions | None = None):
        self.use_critic, self.use_baseline = bool(spec["use_critic"]), bool(spec["use_baseline"])
        self.critic = (Critic.load(spec["critic_dir"], device=device, options=options).eval() if self.use_critic
                       else None)
        self.lookup = RowLookup(buffer_uri)
        self.device = device

    def __call__(self, batch: Batch) -> dict[str, list]:
        if "sample_id" not in batch.info or "source" not in batch.info:
            raise KeyError("coderl targets: the batch lacks the rows' sample_id/source (target filling passes them)")
        lengths = batch.lengths.tolist()
        generated = [s != "human" for s in batch.info["source"]]
        facts = self.lookup([sid for sid, g in zip(batch.info["sample_id"], generated) if g])
        it = iter(facts)
        rows = [next(it) if g else None for g in generated]
        for sid, g, f in zip(batch.info["sample_id"], generated, rows):
            if g and f is None:
                raise ValueError(f"coderl targets: sample {sid} is not a generated row of the buffer")
            if g and self.use_baseline and f["baseline"] is None:
                raise ValueError(f"coderl targets: no greedy row for {'/'.join(f['key'])} (sample {sid}); the "
                                 f"baseline r(W^b) needs the rollout's greedy decode of the same problem and policy")
        q = torch.ones_like(batch.program_ids, dtype=torch.float32)
        if self.critic is not None and any(generated):
            labels = outcome_labels([f["outcome"] if f else FOUR_CLASSES[0] for f in rows], self.critic.classes)
            q = token_values(self.critic, batch.to(self.device) if self.device else batch, labels).cpu()  # eq. 10
        q_hat, r_base = [], []
        for b, (n, f) in enumerate(zip(lengths, rows)):
            if f is None:                                   # human rows: never read by L_ce
                q_hat.append([0.0] * n)
                r_base.append([0.0] * n)
                continue
            q_hat.append([float(v) for v in q[b, :n].tolist()])
            r_base.append([float(f["baseline"]) if self.use_baseline else 0.0] * n)
        return {"q_hat": q_hat, "r_baseline": r_base}


class CriticRanker(Ranker):
    """The four-class critic's pooled p(passed) (eq. 9's û[passed]) of each candidate."""

    def __init__(self, critic: Critic, pad: int, label: str, batch_size: int = 16, device=None):
        self.critic, self.pad, self.label, self.batch_size, self.device = critic, pad, label, batch_size, device

    def score(self, prompt_ids: Sequence[Sequence[int]], program_ids: Sequence[Sequence[int]]) -> list[float]:
        out: list[float] = []
        for start in range(0, len(program_ids), self.batch_size):
            batch = _program_batch(prompt_ids[start:start + self.batch_size],
                                   program_ids[start:start + self.batch_size], self.pad)
            if self.device is not None:
                batch = batch.to(self.device)
            out += [float(v) for v in p_passed(self.critic, batch).cpu()]
        return out


# ---------------------------------------------------------------------------------------------- the plug-in
class CodeRL(Algorithm):
    name = "coderl"
    Config = CodeRLConfig
    stage_names = STAGES
    stage_defaults = {"critic": {"lr": 2e-5, "schedule": "constant"},
                      "critic_test": {"lr": 2e-5, "schedule": "constant"},
                      "actor": {"lr": 2e-5, "schedule": "linear"}}
    config: CodeRLConfig

    def __init__(self, config: CodeRLConfig, ctx):
        super().__init__(config, ctx)
        if ctx is not None and config.critic_checkpoint is not None:
            # q̂ weights the actor's tokens: the critic must read the same token ids (checked once per process;
            # the driver builds the algorithm before the buffer is seeded and any rollout starts)
            _checked_tokenizer(config.critic_checkpoint, ctx.tokenizer_path, ctx.options_for(config.critic_checkpoint),
                               ctx.options_for(ctx.tokenizer_path))

    # -- the driver's side
    def rollout_request(self) -> RolloutRequest:
        return RolloutRequest(greedy_baseline=self.config.use_baseline)

    def _window(self, iteration: int) -> dict:
        if self.config.rows == "warm_start":
            return {"iteration_min": 0, "iteration_max": 0}
        if self.config.rows == "current_policy":
            return {"iteration_min": iteration, "iteration_max": iteration}
        return {}

    def critic_rows(self, iteration: int) -> Rows:
        return Rows(rho_real=None, filters=Filters(sources=("generated",), decoding=("sample",),
                                                   **self._window(iteration)), extra_columns=("outcome",))

    def actor_rows(self, iteration: int) -> Rows:
        c = self.config
        needs_targets = c.use_baseline or c.use_critic_weights
        return Rows(rho_real=c.rho_real, filters=Filters(decoding=("sample",), **self._window(iteration)),
                    token_columns=TARGET_COLUMNS if needs_targets else ())

    def actor_targets(self, critic_dir: str | None, rows: Rows) -> TargetsPlan | None:
        c, x = self.config, self.ctx
        if not (c.use_baseline or c.use_critic_weights):
            return None
        spec = {"critic_dir": critic_dir if c.use_critic_weights else None, "use_critic": c.use_critic_weights,
                "use_baseline": c.use_baseline}
        if c.use_critic_weights and critic_dir is None:
            raise ValueError("coderl: the actor's q̂ targets need a trained critic (stage critic)")
        blob = json.dumps({"what": "coderl-actor-targets-v1", **spec, "source_len": x.source_len,
                           "target_len": x.target_len}, sort_keys=True)
        fp = "coderl-" + hashlib.sha256(blob.encode()).hexdigest()[:16]
        return TargetsPlan(fingerprint=fp, columns=TARGET_COLUMNS, spec=spec, rows=Rows(filters=rows.filters))

    def plan_iteration(self, iteration: int, state: dict, policy_version: str) -> list[StagePlan]:
        c = self.config
        due = state.get("critic") is None or bool(c.critic_retrain_every and iteration % c.critic_retrain_every == 0
                                                  and state.get("critic_iteration") != iteration)
        plans = []
        if due:
            rows = self.critic_rows(iteration)
            plans.append(StagePlan("critic", rows, spec={"classes": list(FOUR_CLASSES), "seed": iteration}))
            if c.critic_test:
                plans.append(StagePlan("critic_test", rows, spec={"classes": list(BINARY_CLASSES),
                                                                  "seed": iteration}))
        plans.append(StagePlan("actor", self.actor_rows(iteration), None, spec={"actor_dir": state.get("actor")}))
        return plans

    def prepare_stage(self, plan: StagePlan, state: dict) -> StagePlan:
        """The actor's q̂ targets use the critic the same iteration may just have trained: bind them now."""
        if plan.name != "actor":
            return plan
        return dataclasses.replace(plan, targets=self.actor_targets(state.get("critic"), plan.rows))

    def policy(self, state: dict) -> str | None:
        return state.get("actor")

    def ranker(self, state: dict) -> RankerRef | None:
        critic = state.get("critic")
        if critic is None:
            return None
        return RankerRef(self.name, self.config.model_dump(), {"critic_dir": critic},
                         f"critic-{checkpoint_label(critic)}",
                         description="CodeRL's critic: the four-class critic's pooled p(passed)")

    def critic_test_dir(self, state: dict) -> str | None:
        """φ_test's checkpoint (Critic Sampling), None before it is trained."""
        return state.get("critic_test")

    # -- the workers' side
    @cached_property
    def _pad(self) -> int:
        return pad_id(self.ctx.load_tokenizer())

    def build_stage(self, plan: StagePlan, device=None) -> StageModule:
        x = self.ctx
        if plan.name in ("critic", "critic_test"):
            body = self.config.critic_checkpoint or x.theta_ckpt
            critic = Critic.create(body, classes=plan.spec["classes"], seed=x.seed + int(plan.spec.get("seed", 0)),
                                   device=device, options=x.options_for(body))
            return CriticStage(critic)
        if plan.name == "actor":
            start = plan.spec.get("actor_dir") or x.theta_ckpt
            return ActorStage(load_trainable_lm(start, device, options=x.options_for(start)), self.config)
        raise ValueError(f"coderl has no stage {plan.name!r}")

    def target_computer(self, targets: TargetsPlan, device=None) -> TargetComputer:
        return ActorTargets(targets.spec, self.ctx.buffer_uri, device, options=self.ctx.options_for())

    def load_ranker(self, spec: Mapping[str, Any], label: str, device=None) -> Ranker:
        critic = Critic.load(spec["critic_dir"], dtype=getattr(torch, self.ctx.dtype), device=device,
                             options=self.ctx.options_for()).eval()
        return CriticRanker(critic, self._pad, label, device=device)
