"""What the shared loop asks of an algorithm (no Ray here: the wiring in `bcoder_ray.loop.learner`, `rollout` and
`driver` runs any algorithm through this interface).

An algorithm is a subclass of `Algorithm` with a typed config (`Config`, a subclass of `AlgorithmConfig`),
registered by name (`bcoder_ray.algorithms.registry.register_algorithm`). Per iteration the driver

1. samples programs with the policy the algorithm publishes (`policy`), as it asks (`rollout_request`),
2. fills the cached per-token targets each stage declares (`StagePlan.targets`, computed by `target_computer`),
3. runs each stage of `plan_iteration` as one Ray Train run: every worker calls `build_stage` and optimises the
   `StageModule` it returns on the buffer rows the stage reads (`StagePlan.rows`), then saves it,
4. records the stage's checkpoint in the algorithm's state (`after_stage`),
5. evaluates the published policy, ranked by the algorithm's `ranker` when it has one.

What crosses a process boundary (driver → Ray Train workers, rollout actors, target-filling tasks) travels as the
typed object itself, since Ray pickles dataclasses and pydantic models: the `RunContext` (with its `LoadOptions`),
the `StagePlan`s (their `Rows`, with the buffer's `Filters`, and `TargetsPlan`s), `RankerRef`s and the algorithm's
config; no side turns them into dicts and back. Plain, JSON-able data remains where something is persisted: the
algorithm's `state` (what `after_stage` records goes into the run's `state.json`). The `spec`s of plans and ranker
references are the algorithm's own plain data (checkpoint paths, switches) for its own methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Mapping

import torch
from pydantic import BaseModel, ConfigDict, Field, model_validator
from torch import nn

from bcoder_ray.buffer.filters import Filters
from bcoder_ray.model.batch import Batch
from bcoder_ray.model.lm import LoadOptions
from bcoder_ray.model.prefix_value import PrefixValue  # part of the interface: `load_prefix_value` returns one
from bcoder_ray.model.ranker import Ranker  # part of the interface: `load_ranker` returns one
from bcoder_ray.model.tokenization import TextFormat, load_tokenizer
from bcoder_ray.util.storage import local_dir


class AlgorithmConfig(BaseModel):
    """Fields every algorithm has; each algorithm subclasses this with its own typed fields."""

    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True)

    name: str
    """The registered algorithm (`python experiments/run.py --list-algorithms`)."""
    gamma: float = 0.999
    """Discount of the token MDP (the reward comes at the last token)."""
    max_staleness: int | None = Field(None, ge=0)
    """The oldest generated rows a stage may read, in policy versions behind the current one (its lag: 0 = sampled
    by the policy the rollout just used); null: unbounded (B-Coder learns from any program in the buffer). Human
    rows are never bounded; generated rows of another run sharing the buffer have no lag and are left out by any
    bound. On-policy algorithms read only lag 0 and refuse a bound (`bcoder_ray.config.validate`)."""
    min_staleness: int = Field(0, ge=0)
    """The youngest generated rows a stage may read, in policy versions behind the current one: k reads only
    generated rows at least k versions old (the staleness-tolerance experiment, docs/algorithms.md); human rows as
    usual. While no generated row is that old, the stage's batches are human rows only."""

    @model_validator(mode="after")
    def _staleness_window(self) -> "AlgorithmConfig":
        if self.max_staleness is not None and self.min_staleness > self.max_staleness:
            raise ValueError(f"min_staleness {self.min_staleness} > max_staleness {self.max_staleness}: no generated "
                             f"row is both at least {self.min_staleness} and at most {self.max_staleness} versions "
                             f"old")
        return self


@dataclass(frozen=True)
class RunContext:
    """What every algorithm may rely on, the same for the driver, the learners and the actors."""

    theta_ckpt: str
    """θ_ckpt: the pretrained (or warm-started) LM every policy starts from, a local folder or hub name."""
    tokenizer_path: str
    source_len: int
    target_len: int
    dtype: str = "float32"
    seed: int = 0
    buffer_uri: str | None = None
    """The run's replay buffer (None outside a run), for cached targets that join other rows of it (CodeRL's
    greedy baseline r(W^b) of the same problem and policy)."""
    eos_token_ids: tuple[int, ...] | None = None
    """Token ids that end a program besides the tokenizer's EOS (`model.eos_token_ids`); None: those of the
    sampled model's generation config."""
    load_options: LoadOptions = field(default_factory=LoadOptions)
    """`model.revision`, `model.attn_implementation`, `model.trust_remote_code`: given to every `from_pretrained`
    of the run's models and tokenizers (the revision only to θ_ckpt's: `options_for`)."""
    chat_template: bool = False
    """Prompts are one user turn of the tokenizer's chat template (`model.chat_template`)."""
    stop_strings: tuple[str, ...] = ()
    """Strings that end a sampled program besides the stop ids (`model.stop_strings`)."""
    response_prefix: str = ""
    """Text the answer starts with, written into every prompt (`model.response_prefix`)."""

    def text_format(self) -> TextFormat:
        return TextFormat(chat_template=self.chat_template, stop_strings=self.stop_strings,
                          response_prefix=self.response_prefix)

    def options_for(self, path: str | None = None) -> LoadOptions:
        """The load options for `path` (default: θ_ckpt); the revision only for θ_ckpt itself."""
        return self.load_options.for_source(self.theta_ckpt if path is None else path, self.theta_ckpt)

    def load_tokenizer(self):
        """The run's tokenizer (`tokenizer_path`, with its load options)."""
        # the options are decided on the name (the revision is θ_ckpt's); a URI is copied to this node once, here
        return load_tokenizer(local_dir(self.tokenizer_path, "model.tokenizer"),
                              options=self.options_for(self.tokenizer_path))


@dataclass(frozen=True)
class Rows:
    """Which buffer rows a stage (or a target fill) reads (`filters`; the default matches every row), and the
    share of ground-truth (human) rows per mini-batch (None: no mixing, rows drawn uniformly from those that
    match)."""

    rho_real: float | None = None
    filters: Filters = field(default_factory=Filters)
    extra_columns: tuple[str, ...] = ()
    """Buffer columns the stage's batches carry beyond the learner columns (per-token: `Batch.tokens`;
    per-row: `Batch.info`), e.g. "logprobs", "problem_id"."""
    token_columns: tuple[str, ...] = ()
    """Which of the extra columns (and target columns) are per-token floats for `Batch.tokens`."""


@dataclass(frozen=True)
class TargetsPlan:
    """Per-token columns that frozen networks compute once per row, cached in the buffer under `fingerprint`
    (a hash of everything they depend on); `spec` is the algorithm's own plain data for `Algorithm.target_computer`."""

    fingerprint: str
    columns: tuple[str, ...]
    spec: Mapping[str, Any] = field(default_factory=dict)
    rows: Rows = field(default_factory=Rows)
    """The rows to fill (`rows.filters`) and the sample columns the computer sees besides the learner's
    (`rows.extra_columns`, e.g. "reward"; per-token ones named in `rows.token_columns`)."""
    group_by: tuple[str, ...] = ()
    """Sample columns whose values make a group (e.g. ("suite", "problem_id", "policy_version")): the computer is
    handed whole groups of the rows lacking targets, never a group split across batches (the group's values are
    in `Batch.info`); for targets that depend on the other rows of a group, e.g. GRPO's advantages."""


@dataclass(frozen=True)
class StagePlan:
    """One learning stage of an iteration: the name of its optimiser settings (`stages.<name>` in the config),
    the rows it reads, the targets it needs filled first, and plain data for `build_stage` (e.g. the checkpoint
    it continues from)."""

    name: str
    rows: Rows
    targets: TargetsPlan | None = None
    spec: Mapping[str, Any] = field(default_factory=dict)
    label: str = ""
    """The stage's name in logs, checkpoints and metrics (default: `name`)."""
    skip_if_empty: bool = False
    """When no buffer row matches `rows.filters`, the driver fills no targets, runs no Ray Train stage and calls
    `after_stage(plan, None, ...)` (e.g. ReST-EM in an iteration where no sampled program passed)."""


@dataclass(frozen=True)
class RankerRef:
    """A ranker by reference (an actor loads it with `bcoder_ray.algorithms.load_ranker`, which builds the algorithm
    from `config` and calls its `load_ranker(spec, label)`)."""

    algorithm: str
    config: Mapping[str, Any]
    spec: Mapping[str, Any]
    label: str
    description: str = ""
    """What the ranker computes, in words, for tables that set it beside others (`experiments/evaluate.py
    --rankers`)."""


@dataclass(frozen=True)
class RolloutRequest:
    """What the rollout samples for the algorithm besides the m sampled programs per problem."""

    greedy_baseline: bool = False
    """Also decode one greedy program per problem (stored with `decoding = "greedy"`; CodeRL's baseline)."""
    logprobs: bool = False
    """Record each sampled token's log-probability under the distribution actually sampled (on-policy methods)."""


class StageModule(nn.Module):
    """What a learner worker optimises: `forward(batch) -> (loss, metrics)` over exactly `trainable_parameters()`
    (DDP wraps this module), then `save(directory, tokenizer)` writes the stage's checkpoint."""

    def trainable_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def save(self, directory: str, tokenizer: Any = None) -> None:
        raise NotImplementedError

    def row_td_errors(self) -> torch.Tensor | None:
        """Optional: the |TD error| of each row of the last `forward`'s batch ([B], detached, batch order), which
        the learner records as the rows' priorities for prioritized replay (`buffer.sampler`). None: this stage
        has none (an algorithm whose stages all say None lists no `Algorithm.td_error_stages`)."""
        return None


TargetComputer = Callable[[Batch], Mapping[str, list]]
"""Per-token target columns for a batch: {column: one list per row, as long as the row's program}. The batch's
`info` holds the rows' sample_id, suite, problem_id and source (`bcoder_ray.loop.target_filling.IDENTITY_COLUMNS`)."""


class Algorithm(ABC):
    """An algorithm on the shared loop (see the module docstring). Subclasses set the class attributes."""

    name: ClassVar[str]
    Config: ClassVar[type[AlgorithmConfig]] = AlgorithmConfig
    stage_names: ClassVar[tuple[str, ...]] = ()
    """Every stage name it may plan (each has optimiser settings under `stages.<name>`)."""
    stage_defaults: ClassVar[Mapping[str, Mapping[str, Any]]] = {}
    """Per-stage defaults that differ from `StageConfig`'s (e.g. B-Coder's θ: linear decay)."""
    td_error_stages: ClassVar[tuple[str, ...]] = ()
    """Stages whose `StageModule.row_td_errors` gives per-row TD errors: prioritized replay
    (`buffer.sampler.kind` prioritized or fresh_prioritized) needs them, and the config refuses it for an algorithm
    that lists none."""
    on_policy: ClassVar[bool] = False
    """Learns only from the current policy's samples, so the rollout must sample the policy itself
    (temperature 1, top-p 1: the config's validation refuses other rollout settings, `bcoder_ray.config.validate`)
    and record log-probabilities."""
    supports_async: ClassVar[bool] = False
    """Can learn from rows sampled by any earlier policy while the actors keep sampling (`run.mode: async`): its
    stages read whatever generated rows the buffer holds, of whichever policy version, and need nothing of the
    current iteration's rollout in particular (value-based and supervised learners; not on-policy ones)."""

    def __init__(self, config: AlgorithmConfig, ctx: RunContext):
        self.config = config
        self.ctx = ctx

    # -- the driver's side (plain data in and out)
    def rollout_request(self) -> RolloutRequest:
        return RolloutRequest(logprobs=self.on_policy)

    @abstractmethod
    def plan_iteration(self, iteration: int, state: dict, policy_version: str) -> list[StagePlan]:
        """The stages of `iteration`, in order. `state` holds what `after_stage` recorded so far; the rollout of
        this iteration sampled with policy `policy_version` (the buffer's `policy_version` of its rows)."""

    def after_stage(self, plan: StagePlan, checkpoint: str | None, iteration: int, state: dict) -> None:
        """Record a finished stage's checkpoint in `state` (default: under the stage's name). `checkpoint` is None
        when a `skip_if_empty` stage found no rows and did not run (default: the state is kept)."""
        if checkpoint is None:
            return
        state[plan.name] = checkpoint
        state[f"{plan.name}_iteration"] = iteration

    def prepare_stage(self, plan: StagePlan, state: dict) -> StagePlan:
        """`plan` bound to the state just before it runs (after the iteration's earlier stages recorded theirs),
        e.g. targets that depend on a checkpoint an earlier stage of the same iteration wrote."""
        return plan

    def resumes_from(self, plan: StagePlan) -> str | None:
        """The checkpoint `build_stage(plan)` loads the trained networks from, when nothing else it builds changes
        from one iteration to the next: a persistent learner that holds the module it saved there keeps training
        that module instead of building it again (`run.learner: persistent`). None (default): always built."""
        return None

    @abstractmethod
    def policy(self, state: dict) -> str | None:
        """The published policy: a folder that `AutoModelFor*LM.from_pretrained` loads (None: θ_ckpt)."""

    def ranker(self, state: dict) -> RankerRef | None:
        """The ranker evaluation uses (None: the algorithm has none; evaluation is unranked)."""
        return None

    def untrained_ranker(self) -> RankerRef | None:
        """The same ranker before any training, built from θ_ckpt alone: the control that shows what training
        added to it (`experiments/evaluate.py --rankers run_untrained`). None: the algorithm offers none."""
        return None

    def prefix_value(self, state: dict) -> RankerRef | None:
        """The learned value of program prefixes that guides search at inference (`experiments/value_search.py`,
        `bcoder_ray.model.value_search`), by reference like a ranker; None: the algorithm learns none (or has not
        trained it yet)."""
        return None

    # -- the workers' side
    @abstractmethod
    def build_stage(self, plan: StagePlan, device: torch.device | str | None = None) -> StageModule:
        """The stage's networks, ready to train (a learner worker calls this)."""

    def target_computer(self, targets: TargetsPlan,
                        device: torch.device | str | None = None) -> TargetComputer:
        raise NotImplementedError(f"algorithm {self.name!r} declares no cached targets")

    def load_ranker(self, spec: Mapping[str, Any], label: str, device: torch.device | str | None = None) -> Ranker:
        raise NotImplementedError(f"algorithm {self.name!r} has no ranker")

    def load_prefix_value(self, spec: Mapping[str, Any], label: str,
                          device: torch.device | str | None = None) -> PrefixValue:
        raise NotImplementedError(f"algorithm {self.name!r} learns no value of program prefixes")
