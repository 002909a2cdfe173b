"""The run's configuration: typed pydantic models (a docstring under every field), YAML files shipped inside the
package, and `--section.key value` command-line overrides.

    cfg = load_config("embedded", ["--stages.theta.lr", "3e-5", "--algorithm.name", "bcoder_optimality"])
    cfg.stage("theta").lr        # 3e-05 (a float: values are validated and coerced by pydantic)
    cfg.algorithm                # BCoderOptimalityConfig(...): the section's type is chosen by algorithm.name

Why pydantic: it is already installed with Ray, validates nested models with errors that carry the path of
the field at fault (turned into `ConfigError`s naming the file and key), coerces command-line text to the
declared types, reads each field's docstring as its description (`use_attribute_docstrings`), and lets the
`algorithm` section be the typed config of whichever registered algorithm it names, including algorithms
registered from outside the package. What remains here is turning `--a.b.c value` into a nested mapping (each
value parsed as YAML) before validation.

Sections: run, ray, suite, model (with the warm start), algorithm (`name` + that algorithm's fields), rollout,
evaluation, executor, buffer, stages (`stages.<stage>`: optimiser settings of each stage the algorithm runs,
defaults from `StageConfig` and the algorithm's `stage_defaults`). Only the driver reads these objects:
components take plain arguments, so they stay usable outside this system.
"""

from __future__ import annotations

import json
import os
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import (BaseModel, ConfigDict, Field, SerializeAsAny, ValidationError, field_validator,
                      model_validator)

from bcoder_ray.algorithms import algorithm_class, import_modules, parse_algorithm_config
from bcoder_ray.algorithms.base import AlgorithmConfig
from bcoder_ray.algorithms.registry import UnknownAlgorithmError, all_stage_names
from bcoder_ray.buffer.draws import PRIORITIZED_KINDS, SamplerSpec
from bcoder_ray.model.gguf import PACKAGED, is_gguf_path, is_packaged
from bcoder_ray.model.lm import LoadOptions
from bcoder_ray.util.storage import is_local_path

if TYPE_CHECKING:  # the annotation only: the config stays importable without the samplers' modules
    from bcoder_ray.model.candidates import SamplingSettings

CONFIG_PACKAGE = "bcoder_ray.configs"
DEFAULT_CONFIG = "embedded"


class ConfigError(ValueError):
    """A bad configuration; the message names the file and key at fault."""


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid", use_attribute_docstrings=True, validate_assignment=True,
                              coerce_numbers_to_str=True)


# --------------------------------------------------------------------------------------------------- sections


class RunConfig(Section):
    name: str = "bcoder"
    """Prefix of the default run folder and of Ray Train run names."""
    iterations: int = Field(3, ge=0)
    """Rollout -> targets -> learn -> evaluate cycles (at most: `budget_programs` may end the run earlier)."""
    budget_programs: int | None = Field(None, ge=1)
    """Programs sampled and scored for training (cache hits and extra samples such as greedy baselines
    included; human seed, evaluation and infrastructure failures excluded); the rollout stops at the budget.
    null: no budget (iterations decide)."""
    seed: int = 0
    """Seeds the warm start, sampling, data order and initialisation."""
    run_dir: str | None = None
    """null: runs/<name>-<timestamp> under the current directory. The driver's own files (state, config,
    evaluations, TensorBoard, tables) stay here, on the driver's machine."""
    storage_uri: str | None = None
    """Where the files every node reads go, under <storage_uri>/<run folder name>/: Ray Train's runs and their
    checkpoints (train/), θ_ckpt when it is a local folder (models/theta_ckpt/), and the buffer unless buffer.uri
    is set (buffer/). A URI (s3://bucket/prefix, with ?endpoint_override=... for an S3-compatible endpoint) or a
    path on a filesystem every node mounts. null: the run folder (one machine: a cluster of more than one node is
    refused before any work)."""
    id: str | None = Field(None, pattern=r"^[A-Za-z0-9_-]{1,40}$")
    """The run's id, in its batch keys, policy versions and rollout seeds (unique in a shared buffer). null: a
    fresh one; set it only to repeat a run exactly (never two runs with one id on one buffer)."""
    progress: bool = True
    """tqdm progress bars on stderr."""
    tensorboard: bool = True
    """Scalars under <run_dir>/tensorboard."""
    mlflow_tracking_uri: str | None = None
    """Also log every scalar to MLflow at this tracking URI (a server, or file:///path); needs the mlflow extra
    (pip install 'bcoder-ray[mlflow]'). null: off."""
    mlflow_experiment: str = "bcoder-ray"
    """The MLflow experiment the run is logged in."""
    wandb_project: str | None = None
    """Also log every scalar to Weights & Biases in this project (the wandb extra; WANDB_MODE=offline needs no
    account). null: off."""
    probe_problems: int = Field(0, ge=0)
    """Size of a fixed probe set of training problems sampled after every iteration (outside the budget) for
    the Figure 1 curve; 0: none."""
    probe_samples: int = Field(4, ge=1)
    """Samples per probe problem (at the rollout's temperature)."""
    mode: Literal["sync", "async"] = "sync"
    """sync: each iteration samples, then learns, then evaluates, one phase at a time (`bcoder_ray.loop.driver`).
    async: the actors sample without stopping, with the newest published policy, while the learner trains from
    the buffer and publishes its policy every `publish_every` optimiser steps; evaluations run on the actors
    between their rollout tasks (`bcoder_ray.loop.async_driver`). Only algorithms that declare
    `supports_async` (B-Coder and its ablations, SFT); `iterations` counts the learner's rounds of stages, and
    the actors stop at `budget_programs` or when the learner's last round ends."""
    learner: Literal["per_stage", "persistent"] | None = None
    """per_stage: each stage is a new Ray Train run (its workers started and its networks loaded each time).
    persistent: one group of learner actors per stage name lives through the run and keeps its networks
    (`bcoder_ray.loop.learner_group`), so a stage pays no start-up and, when it continues from the checkpoint
    it saved last (`Algorithm.resumes_from`), no model loading. null: per_stage in sync mode (it alone continues
    an interrupted stage from `checkpoint_every`), persistent in async mode (the only learner it runs)."""
    publish_every: int = Field(10, ge=1)
    """Async mode: optimiser steps between two published policies (each a new policy version the actors load
    on their next task); a stage also publishes when it ends."""

    def learner_kind(self) -> str:
        """The learner this run uses: `learner`, or the mode's default."""
        return self.learner or ("persistent" if self.mode == "async" else "per_stage")

    @model_validator(mode="after")
    def _async_learner(self) -> "RunConfig":
        if self.mode == "async" and self.learner == "per_stage":
            raise ValueError("mode: async trains with the persistent learner (learner: persistent or null); "
                             "learner: per_stage runs in mode: sync only")
        return self


class RayConfig(Section):
    address: str | None = None
    """null: RAY_ADDRESS if set (ray job submit), else a new local instance."""
    num_cpus: float | None = None
    """Local instance only; null: the CPUs present."""
    num_gpus: float | None = None
    """Local instance only; null: the GPUs present."""
    object_store_mb: int = 300
    """Local instance only: a capped object store for small machines."""
    include_dashboard: bool = False
    """Local instance only."""


class SuiteConfig(Section):
    name: str = "embedded"
    """A suite registered in envs.registry."""
    train_split: str = "train"
    """Feeds the buffer the learners read."""
    validation_split: str | None = "validation"
    """Evaluated during the run (every `evaluation.every` iterations) and by every tuned choice; null: none."""
    test_split: str = "test"
    """Evaluated once per run, at the end (and the warm start once), for the final figures."""
    max_train_problems: int | None = Field(None, ge=1)
    """Problems of the RL loop (seeded, rolled out): the first N of the train split; null: all. A warm start
    learns from the other train problems only (all of them when this is null)."""
    max_eval_problems: int | None = Field(None, ge=1)
    """Problems of each evaluated split (the first N); null: all."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Passed to load_suite(name, split, **options), except `drop_contaminated` (true: train without the problems
    the run's contamination report finds in the evaluation splits too; envs/contamination.py)."""


class WarmStartConfig(Section):
    cache_dir: str | None = None
    """null: the warm_start folder of the project's cache ($BCODER_CACHE/warm_start, else
    ~/.cache/bcoder-ray/warm_start)."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Fields of bcoder_ray.model.warm_start.WarmStartConfig (checked before work)."""


class ModelConfig(Section):
    checkpoint: str | None = None
    """θ_ckpt: a local directory, a hub name ("org/name"), a GGUF file (path ending in .gguf) or a packaged
    checkpoint (`smollm2-135m-instruct`; bcoder_ray.model.gguf.PACKAGED): a GGUF is converted once into a Hugging
    Face folder under the cache ($BCODER_CACHE or ~/.cache/bcoder-ray); null: warm-start a tiny LM from the suite."""
    tokenizer: str | None = None
    """null: the checkpoint's own tokenizer; otherwise any source model.checkpoint takes."""
    source_len: int = Field(600, gt=0)
    """Prompt tokens (kept from the end)."""
    target_len: int = Field(512, gt=0)
    """Program tokens (cut at the limit, no EOS; such a program is stored as cut and labelled by its own run)."""
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    """Weights of the frozen θ_ckpt when loaded."""
    revision: str | None = None
    """Which version of a hub checkpoint θ_ckpt is (a branch, tag or commit; part of the cached targets'
    identity); ignored for a local folder."""
    attn_implementation: str | None = None
    """Passed to from_pretrained of every model of the run ("eager", "sdpa", "flash_attention_2", ...); null: the
    library's default."""
    trust_remote_code: bool = False
    """Allow the checkpoint's own modelling code (its auto_map) in every load; only for checkpoints you trust."""
    eos_token_ids: list[int] | None = None
    """Token ids that end a sampled program besides the tokenizer's EOS (an instruct model's end-of-turn token);
    null: the eos_token_id list of the sampled model's generation_config.json."""
    chat_template: bool = False
    """Prompts as one user turn of the tokenizer's chat template with its generation prompt (instruct models whose
    tokenizer has one; part of the rows' tokenizer_hash, so plain and chat runs never share prompt rows)."""
    stop_strings: list[str] = Field(default_factory=list)
    """Strings that end a sampled program (an instruct model's closing "```", MBPP few-shot's "[DONE]"): the episode
    ends at the token that completes the first one, the program's text is cut where it begins, and human programs
    holding one are left out of the buffer (they are no episode of this MDP)."""
    response_prefix: str = ""
    """Text the answer starts with, written into every prompt after the chat template's generation prompt (after the
    text of a plain prompt): "```python\n" for an instruct model that answers in a fenced block, so the program is
    the code and its closing fence a stop string. Part of the rows' tokenizer_hash."""
    warm_start: WarmStartConfig = Field(default_factory=WarmStartConfig)

    @field_validator("stop_strings")
    @classmethod
    def _stop_strings(cls, value: list[str]) -> list[str]:
        if any(not s for s in value):
            raise ValueError("stop strings must be non-empty")
        return value

    @model_validator(mode="after")
    def _chat_needs_a_checkpoint(self) -> "ModelConfig":
        if self.chat_template and self.checkpoint is None and self.tokenizer is None:
            raise ValueError("chat_template is on, but the embedded default's warm-started LM has no chat template: "
                             "set model.checkpoint (an instruct model) or turn it off")
        return self

    def load_options(self) -> LoadOptions:
        """revision, attn_implementation and trust_remote_code, as every load of the run's models takes them."""
        return LoadOptions(revision=self.revision, attn_implementation=self.attn_implementation,
                           trust_remote_code=self.trust_remote_code)


class SamplingConfig(Section):
    """How candidate programs are sampled (Algorithm 2: Q_θ/α as logits, temperature then top-p)."""

    samples_per_problem: int = Field(8, ge=1)
    """m: programs sampled per problem."""
    temperature: float = Field(1.0, ge=0)
    top_p: float = Field(1.0, gt=0, le=1)
    max_new_tokens: int | None = Field(None, ge=1)
    """null: model.target_len."""
    prompts_per_call: int = Field(4, ge=1)
    """Prompts per batched sampling call (each expanded to m sequences)."""

    def settings(self, model: ModelConfig) -> SamplingSettings:
        """These settings as the sampler takes them, with the run's prompt and program lengths (`model`); the
        actors replace the seed with each task's."""
        from bcoder_ray.model.candidates import SamplingSettings

        return SamplingSettings(m=self.samples_per_problem, temperature=self.temperature, top_p=self.top_p,
                                max_prompt_len=model.source_len, max_new_tokens=self.max_new_tokens or model.target_len,
                                prompts_per_call=self.prompts_per_call)


class RolloutConfig(SamplingConfig):
    num_actors: int = Field(1, ge=1)
    cpus_per_actor: float = Field(1.0, ge=0)
    gpus_per_actor: float = Field(0.0, ge=0)
    problems_per_task: int = Field(8, ge=1)
    """One actor task = this many problems; its batch key makes its writes idempotent."""
    problems_per_iteration: int | None = Field(None, ge=1)
    """null: every train problem each iteration; N: a new slice of N each iteration."""
    max_restarts: int = Field(3, ge=0)
    """An actor that dies is restarted this many times (Ray's max_restarts); its task is redone."""
    engine: Literal["torch", "vllm"] = "torch"
    """What samples the rollouts: torch (this project's sampler, any model, CPU or GPU) or vllm (decoder-only
    policies on GPU actors; the vllm extra on those nodes; not tested on a GPU here)."""
    stop_at_first_failure: bool = False
    """Rollouts run test sets of more than 10 stdio / call tests in stages and stop at the first failing one
    (envs/first_failure.py): the same pass or fail, a wrong program runs ~10 tests instead of hundreds; a program
    that fails a test and would crash on a later one is rewarded as failed, not runtime error. Evaluation always
    runs every test."""

    @model_validator(mode="after")
    def _vllm_needs_gpus(self) -> "RolloutConfig":
        if self.engine == "vllm" and self.gpus_per_actor <= 0:
            raise ValueError("engine: vllm needs gpus_per_actor > 0 (vLLM runs on GPUs)")
        return self


class EvaluationConfig(SamplingConfig):
    ks: list[int] = Field(default_factory=lambda: [1, 5])
    """The k of pass@k."""
    rank: bool = True
    """Also report pass@k of the top-k by the algorithm's ranker, when it has one."""
    filtered: bool = False
    """Drop candidates failing the example tests before ranking."""
    every: int = Field(1, ge=1)
    """Evaluate on the validation split after every N-th iteration (the last one always)."""
    warm_start_baseline: bool = True
    """Evaluate θ_ckpt before the first iteration (the table's baseline)."""
    confidence: float = Field(0.95, gt=0, lt=1)
    """Level of the reported confidence intervals."""

    @field_validator("ks")
    @classmethod
    def _ks(cls, ks: list[int]) -> list[int]:
        if not ks or min(ks) < 1:
            raise ValueError("must be a non-empty list of k >= 1")
        return ks

    @model_validator(mode="after")
    def _k_fits(self) -> "EvaluationConfig":
        if max(self.ks) > self.samples_per_problem:
            raise ValueError(f"ks: largest k {max(self.ks)} exceeds samples_per_problem {self.samples_per_problem}")
        return self


class ExecutorConfig(Section):
    workers: int | None = Field(None, ge=1)
    """Sandbox processes per executor; null: the executor's default."""
    infra_retries: int = Field(2, ge=0)
    """A program whose run the sandbox itself failed (worker killed, fork failed, starved) is retried on this
    many fresh workers; still failing, it gets no verdict and is never written as a reward."""
    num_actors: int = Field(0, ge=0)
    """0: each policy actor runs its own executor; N: N shared executor actors."""
    cpus_per_actor: float = Field(1.0, ge=0)
    """With num_actors > 0."""
    options: dict[str, Any] = Field(default_factory=dict)
    """Other keyword arguments of envs.execute.Executor (checked before work)."""


class SamplerConfig(Section):
    """How learners draw the generated rows of their ρ_real-mixed batches (`buffer.sampler`;
    `bcoder_ray.buffer.draws` has the formulas). The human rows (the ρ_real share) are always read uniformly, and
    stages that read unmixed rows (on-policy readers, ReST-EM: `Rows.rho_real` null) always read uniformly."""

    kind: Literal["uniform", "prioritized", "fresh_prioritized", "balanced"] = "uniform"
    """uniform: every row alike (the shuffled window; batches carry no weights). prioritized: P(i) ∝ (|δ_i| +
    epsilon)^priority_exponent, δ_i the row's last |TD error| in this stage, recorded by the learner; rows without
    one get the largest recorded; importance weights (N·P(i))^−is_exponent, normalised by their max, multiply
    each row's loss. fresh_prioritized: the same with each score times exp(−age/tau), age the row's lag in policy
    versions (the current version − the one that sampled it, as `algorithm.max_staleness` counts it). balanced:
    per problem, passing programs make pass_share of its draws and the others the rest (problems keep their share
    of rows; weights 1). The prioritized kinds need an algorithm whose stages report TD errors (`td_error_stages`:
    bcoder, bcoder_optimality, dueling_dqn); others are refused."""
    priority_exponent: float = Field(0.6, ge=0)
    """a: how strongly priorities skew the draw (0: uniform draws)."""
    is_exponent: float = Field(0.4, ge=0)
    """b: the importance-weight correction (0: every weight 1; 1: the full correction)."""
    epsilon: float = Field(0.01, gt=0)
    """ε added to each |TD error|, so no row's probability is 0."""
    tau: float = Field(2.0, gt=0)
    """fresh_prioritized: the decay time of a row's priority, in policy versions (exp(−lag/tau)); sync mode
    publishes one version an iteration, so there it is also in iterations."""
    pass_share: float = Field(0.5, gt=0, lt=1)
    """balanced: the share of a problem's draws that are passing programs (when it has both kinds)."""
    refresh_batches: int = Field(16, ge=0)
    """Each read task re-reads the buffer's files and the priority table every N batches it makes (new rows, the
    learner's newest priorities); 0: once per stage. Ray Data reads ahead of the learner, so a stage sees the
    priorities its own first steps wrote only late, or (small stages) not at all: the next stage does."""

    def spec(self, table: str, current_version: str) -> SamplerSpec:
        """The buffer's `SamplerSpec` for one stage (`table`: the stage's name, whose priorities it reads) learning
        while `current_version` is the published policy (the lags of fresh_prioritized count from it)."""
        return SamplerSpec(kind=self.kind, priority_exponent=self.priority_exponent, is_exponent=self.is_exponent,
                           epsilon=self.epsilon, tau=self.tau, current_version=current_version,
                           pass_share=self.pass_share, table=table, refresh_batches=self.refresh_batches)


class BufferConfig(Section):
    uri: str | None = None
    """null: <run.storage_uri>/<run folder name>/buffer, or <run_dir>/buffer without run.storage_uri; any URI the
    replay buffer accepts (s3://...), or a path; a location outside the run is shared by the runs naming it."""
    human_programs: Literal["loop", "train", "warm_start"] = "loop"
    """Whose human programs seed the buffer: "loop", the RL loop's problems (`suite.max_train_problems`);
    "train", every problem of the train split, the warm start's included (the paper's setting: all human
    solutions are off-policy data beside the generated programs; the CE and advantage terms then keep
    rehearsing what the warm start learned instead of fitting the loop's few hundred problems only);
    "warm_start", only the warm start's problems (the train problems the loop never rolls out on): the loop's own
    problems carry no human program, as in code-RL data sets without reference solutions, so every gain on
    held-out problems comes from the generated programs. The warm start's human rows still fill the ρ_real share
    of each batch and feed the CE terms (B-Coder's L_ce and L_adv, SFT, CodeRL's actor). Needs
    `suite.max_train_problems` below the train split's size."""
    targets_via: Literal["ray_data", "actors"] = "ray_data"
    """Cached targets filled by a Ray Data map_batches job, or by the running policy actors."""
    dataset_cpus: float = Field(0.25, ge=0)
    """CPUs per Ray Data read task feeding the learners (Ray's default would be 1)."""
    targets_batch_size: int = Field(16, ge=1)
    """Rows per call of the algorithm's target computer (each sample file's rows in slices of this; grouped targets
    in whole groups). Tasks and sidecar writes carry several batches (`bcoder_ray/loop/target_filling.py`)."""
    targets_cpus: float = Field(1.0, ge=0)
    """CPUs of the Ray Data target-filling actor (its torch threads: this rounded up). With `targets_via: actors`
    the policy actors compute with their own `rollout.cpus_per_actor`."""
    targets_gpus: float = Field(0.0, ge=0)
    sampler: SamplerConfig = Field(default_factory=SamplerConfig)
    """How learners draw generated rows: uniform (default), prioritized, fresh_prioritized or balanced."""


class StageConfig(Section):
    """One Ray Train stage's optimisation (`stages.<name>`)."""

    steps: int = Field(100, ge=0)
    """Optimiser steps (each over batch_size_per_worker × num_workers × grad_accum programs)."""
    lr: float = Field(1e-5, gt=0)
    """Peak learning rate (AdamW)."""
    schedule: Literal["constant", "linear"] = "constant"
    """linear: decay to 0 over `steps` after the warm-up."""
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.05, ge=0)
    adam_betas: tuple[float, float] = (0.9, 0.999)
    batch_size_per_worker: int = Field(16, ge=1)
    grad_accum: int = Field(1, ge=1)
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    grad_clip: float | None = Field(1.0, gt=0)
    """Max global gradient norm; null: no clipping."""
    num_workers: int = Field(1, ge=0)
    """Ray Train workers; 0: Ray Train's local mode, in the driver process."""
    parallel: Literal["ddp", "fsdp"] = "ddp"
    """ddp: a full copy of the stage's networks per worker. fsdp: torch's FSDP2, parameters, gradients and AdamW
    states sharded across the workers (one unit per transformer block; the frozen networks sharded too), for
    models whose DDP copy does not fit a GPU (16 B per trained parameter under fp32 AdamW). Needs
    num_workers >= 1."""
    use_gpu: bool = False
    cpus_per_worker: float = Field(1.0, ge=0)
    gpus_per_worker: float = Field(0.0, ge=0)
    """With use_gpu; 0 means one GPU per worker."""
    report_every: int = Field(10, ge=1)
    """ray.train.report metrics every N steps (a checkpoint at the end)."""
    checkpoint_every: int = Field(0, ge=0)
    """Also report a checkpoint the stage can continue from every N optimiser steps (trained parameters,
    optimiser, scheduler, RNG and step; the data position is the step): a worker failure restarts the workers
    from it (Ray Train's max_failures), and `--resume` of an interrupted run continues the stage from it. 0: a
    checkpoint at the end only (a failure restarts the stage from step 0). Needs num_workers >= 1. In run.mode:
    async the persistent learner writes the same state at the end of the first chunk of `publish_every` steps at
    or past every N steps; a learner that dies is built again and continues from it, so does `--resume`."""

    @model_validator(mode="after")
    def _checkpoints_need_workers(self) -> "StageConfig":
        if self.checkpoint_every and self.num_workers == 0:
            raise ValueError("checkpoint_every needs num_workers >= 1 (Ray Train's local mode keeps no checkpoints)")
        return self

    @model_validator(mode="after")
    def _fsdp_needs_workers(self) -> "StageConfig":
        if self.parallel == "fsdp" and self.num_workers == 0:
            raise ValueError("parallel: fsdp needs num_workers >= 1 (Ray Train's local mode has no process group)")
        return self

    @model_validator(mode="after")
    def _fp16_needs_gpu(self) -> "StageConfig":
        if self.mixed_precision == "fp16" and not self.use_gpu:
            raise ValueError("mixed_precision: fp16 needs use_gpu: true (use bf16 or no on CPU)")
        return self


class Config(Section):
    run: RunConfig = Field(default_factory=RunConfig)
    ray: RayConfig = Field(default_factory=RayConfig)
    suite: SuiteConfig = Field(default_factory=SuiteConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    algorithm: SerializeAsAny[AlgorithmConfig] = Field(default_factory=lambda: parse_algorithm_config({"name": "bcoder"}))
    """`name` chooses the algorithm; the other keys are that algorithm's fields."""
    rollout: RolloutConfig = Field(default_factory=RolloutConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    executor: ExecutorConfig = Field(default_factory=ExecutorConfig)
    buffer: BufferConfig = Field(default_factory=BufferConfig)
    stages: dict[str, StageConfig] = Field(default_factory=dict)
    """Optimiser settings per stage name; stages the algorithm runs but the file leaves out get the defaults."""
    imports: list[str] = Field(default_factory=list)
    """Modules imported before the algorithm is looked up (outside algorithms; `run.py --import`)."""

    @field_validator("algorithm", mode="before")
    @classmethod
    def _typed_algorithm(cls, value: Any) -> Any:
        if isinstance(value, AlgorithmConfig):
            return value
        if not isinstance(value, dict):
            raise ValueError(f"must be a mapping with a 'name', got {type(value).__name__}")
        return parse_algorithm_config({"name": "bcoder", **value})

    @model_validator(mode="before")
    @classmethod
    def _stage_defaults(cls, data: Any) -> Any:
        """Each stage of the algorithm: StageConfig defaults < the algorithm's stage_defaults < the file."""
        if not isinstance(data, dict):
            return data
        algo = data.get("algorithm") or {}
        name = algo.name if isinstance(algo, AlgorithmConfig) else (algo.get("name") if isinstance(algo, dict)
                                                                     else None) or "bcoder"
        try:
            algo_cls = algorithm_class(str(name))
        except UnknownAlgorithmError:
            return data  # reported by the algorithm field
        stages = dict(data.get("stages") or {})
        known = all_stage_names()
        unknown = sorted(set(stages) - known)
        if unknown:
            raise ValueError(f"stages: unknown stage(s) {unknown}; the registered algorithms' stages are "
                             f"{sorted(known)}")
        for stage in algo_cls.stage_names:
            given = stages.get(stage) or {}
            if isinstance(given, StageConfig):
                continue
            stages[stage] = {**algo_cls.stage_defaults.get(stage, {}), **given}
        return {**data, "stages": stages}

    def stage(self, name: str) -> StageConfig:
        if name not in self.stages:
            raise ConfigError(f"stages.{name}: no settings for this stage (algorithm {self.algorithm.name!r})")
        return self.stages[name]

    def to_dict(self) -> dict:
        return self.model_dump(mode="json")

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ----------------------------------------------------------------------------------------------- loading


def shipped_configs() -> list[str]:
    """The names of the configs shipped inside the package (`--config NAME`)."""
    return sorted(p.name[:-5] for p in resources.files(CONFIG_PACKAGE).iterdir() if p.name.endswith(".yaml"))


def config_source(name_or_path: str | os.PathLike | None) -> tuple[str, str]:
    """(text, where) of a shipped config name or a YAML path."""
    name = str(name_or_path or DEFAULT_CONFIG)
    if name in shipped_configs():
        return resources.files(CONFIG_PACKAGE).joinpath(f"{name}.yaml").read_text(encoding="utf-8"), \
            f"{name} (shipped config)"
    path = Path(name)
    if not path.is_file():
        raise ConfigError(f"config {name!r}: no such file and no shipped config of that name (shipped: "
                          f"{shipped_configs()})")
    return path.read_text(encoding="utf-8"), str(path)


def read_yaml(name_or_path: str | os.PathLike | None) -> tuple[dict, str]:
    """(mapping, where) of a shipped config name or a YAML path."""
    text, where = config_source(name_or_path)
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: not valid YAML: {e}") from None
    if data is None:
        return {}, where
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections, got {type(data).__name__}")
    return data, where


def _error_text(e: ValidationError, where: str) -> str:
    lines = []
    for err in e.errors():
        loc = ".".join(str(p) for p in err["loc"] if not str(p).startswith("function-"))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown key"
        got = f" (got {err.get('input')!r})" if loc and err["type"] != "extra_forbidden" else ""
        lines.append(f"{where}: {loc or 'the top level'}: {msg}{got}")
    return "; ".join(lines)


def config_from_dict(data: dict | None, where: str = "config") -> Config:
    """A validated Config from a mapping (a parsed YAML file); `where` names the source in errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections, got {type(data).__name__}")
    try:
        return Config.model_validate(data)
    except ValidationError as e:
        raise ConfigError(_error_text(e, where)) from None
    except UnknownAlgorithmError as e:
        raise ConfigError(f"{where}: algorithm.name: {e}") from None


def _parse_value(text: str, where: str) -> Any:
    """A command-line value as YAML ("3e-5" a number, "[1, 5]" a list, "null", "~" and also "none": None)."""
    if text.strip().lower() == "none":
        return None
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: cannot parse {text!r}: {e}") from None


def _is_list_field(data: dict, keys: list[str]) -> bool:
    """Whether the field at `keys` is declared as a list (so "1,2" on the command line means [1, 2])."""
    model: Any = Config
    for i, key in enumerate(keys):
        if key == "algorithm" and i == 0:
            algo = data.get("algorithm") or {}
            name = algo.get("name", "bcoder") if isinstance(algo, dict) else "bcoder"
            try:
                model = algorithm_class(str(name)).Config
            except UnknownAlgorithmError:
                return False
            continue
        if key == "stages" and i == 0:
            model = None
            continue
        if model is None:  # a stage name
            model = StageConfig
            continue
        field = getattr(model, "model_fields", {}).get(key)
        if field is None:
            return False
        ann = field.annotation
        if i == len(keys) - 1:
            return getattr(ann, "__origin__", ann) is list
        model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
        if model is None:
            return False
    return False


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """`--a.b value` / `--a.b=value` pairs set into a nested mapping (each value parsed as YAML). A changed
    `--algorithm.name` keeps only the file's algorithm fields that both algorithms have with the same default:
    the others belonged to the other algorithm (bcoder's `operator: conservative` would turn bcoder_optimality
    back into bcoder)."""
    data = json.loads(json.dumps(data, default=str))  # a deep copy of plain data
    i = 0
    while i < len(overrides):
        arg = overrides[i]
        if not arg.startswith("--"):
            raise ConfigError(f"override {arg!r}: expected --section.key value")
        key = arg[2:]
        if "=" in key:
            key, text = key.split("=", 1)
            i += 1
        else:
            if i + 1 >= len(overrides):
                raise ConfigError(f"override --{key}: missing a value")
            text = overrides[i + 1]
            i += 2
        keys = key.split(".")
        if len(keys) < 2 or not all(keys):
            raise ConfigError(f"override --{key}: expected --section.key (sections: {sorted(Config.model_fields)})")
        if keys[0] not in Config.model_fields:
            raise ConfigError(f"override --{key}: unknown section {keys[0]!r}; sections: "
                              f"{sorted(Config.model_fields)}")
        value = _parse_value(text, f"--{key}")
        if isinstance(value, str) and "," in value and _is_list_field(data, keys):
            value = [_parse_value(v.strip(), f"--{key}") for v in value.split(",") if v.strip()]
        if keys == ["algorithm", "name"]:
            value = str(value)
            old = data.get("algorithm") or {}
            if old.get("name", "bcoder") != value:
                try:
                    new_fields = algorithm_class(value).Config.model_fields
                    old_fields = algorithm_class(str(old.get("name", "bcoder"))).Config.model_fields
                except UnknownAlgorithmError as e:
                    raise ConfigError(f"--algorithm.name: {e}") from None
                # keep the file's settings the two algorithms share with the same default (γ, α, ...); drop
                # the ones that define the other algorithm (e.g. bcoder's operator: conservative)
                data["algorithm"] = {k: v for k, v in old.items() if k in new_fields and k in old_fields
                                     and new_fields[k].default == old_fields[k].default}
        cursor = data
        for k in keys[:-1]:
            if not isinstance(cursor.get(k), dict):
                cursor[k] = {}
            cursor = cursor[k]
        cursor[keys[-1]] = value
    return data


def validate(cfg: Config, check_paths: bool = True) -> None:
    """Rules that need more than one section or the world outside the config (paths, the suite registry)."""
    m = cfg.model
    if check_paths:
        for key, value in (("model.checkpoint", m.checkpoint), ("model.tokenizer", m.tokenizer)):
            if value is None or is_packaged(value):  # a packaged checkpoint is fetched and converted when loaded
                continue
            if value.lower().endswith(".gguf"):  # read from this node: a URI is refused here, a missing file too
                if not is_gguf_path(value) or not os.path.isfile(os.path.expanduser(value)):
                    raise ConfigError(f"{key}: GGUF file {value!r} does not exist on this node (or is not a file)")
            elif is_local_path(value) and not os.path.isdir(os.path.expanduser(value)):
                raise ConfigError(f"{key}: checkpoint path {value!r} does not exist (or is not a directory); "
                                  f"packaged checkpoints: {', '.join(sorted(PACKAGED))}")
    import envs  # noqa: F401  (importing envs registers the suites)
    from envs.registry import UnknownSuiteError, suite_info

    try:
        info = suite_info(cfg.suite.name)
    except UnknownSuiteError as e:
        raise ConfigError(f"suite.name: {e}") from None
    for key in ("train_split", "validation_split", "test_split"):
        split = getattr(cfg.suite, key)
        if split is not None and split not in info.splits:
            raise ConfigError(f"suite.{key}: suite {cfg.suite.name!r} has no split {split!r}; its splits are "
                              f"{list(info.splits)}" + (" (set it to null)" if key == "validation_split" else ""))
    if cfg.buffer.human_programs == "warm_start" and cfg.suite.max_train_problems is None:
        raise ConfigError("buffer.human_programs: warm_start seeds only the problems the loop never rolls out on, "
                          "and with suite.max_train_problems null the loop rolls out on every train problem: set "
                          "suite.max_train_problems below the train split's size")
    algo = algorithm_class(cfg.algorithm.name)
    for stage in algo.stage_names:
        cfg.stage(stage)
    if cfg.buffer.sampler.kind in PRIORITIZED_KINDS and not algo.td_error_stages:
        raise ConfigError(f"buffer.sampler.kind: {cfg.buffer.sampler.kind} draws rows by the TD errors the learner "
                          f"records, and algorithm {algo.name!r} reports none (its stages have no TD error): use "
                          f"uniform or balanced, or an algorithm with td_error_stages (bcoder, bcoder_optimality, "
                          f"dueling_dqn)")
    if cfg.run.mode == "async" and cfg.buffer.sampler.kind != "uniform":
        raise ConfigError(f"buffer.sampler.kind: {cfg.buffer.sampler.kind}: the asynchronous loop's learner reads "
                          f"its rows uniformly (it opens its own sampler per chunk of steps); use run.mode: sync "
                          f"for a prioritized or balanced sampler, or buffer.sampler.kind: uniform")
    if cfg.run.mode == "async" and not algo.supports_async:
        raise ConfigError(f"run.mode: async: algorithm {algo.name!r} cannot learn while the actors keep sampling "
                          f"with newer policies (it needs its rows' own policy version: on-policy, or a stage that "
                          f"reads one iteration's rollout); use run.mode: sync, or an algorithm that declares "
                          f"supports_async (bcoder, bcoder_optimality, dueling_dqn, sft)")
    if cfg.run.learner_kind() == "persistent" and cfg.run.mode == "sync":
        held = [s for s in algo.stage_names if cfg.stage(s).checkpoint_every]
        if held:
            raise ConfigError(f"stages.{held[0]}.checkpoint_every: the persistent learner in run.mode: sync keeps "
                              f"no mid-stage checkpoints; set it to 0, run.learner: per_stage, or run.mode: async")
    rollout = cfg.rollout
    if algo.on_policy and (rollout.temperature != 1.0 or rollout.top_p != 1.0):
        raise ConfigError(f"algorithm.name: algorithm {algo.name!r} is on-policy: it learns from the policy's own "
                          f"samples, so rollout.temperature and rollout.top_p must be 1.0 (got {rollout.temperature}, "
                          f"{rollout.top_p})")
    a = cfg.algorithm
    if algo.on_policy and (a.max_staleness is not None or a.min_staleness):
        raise ConfigError(f"algorithm.max_staleness / algorithm.min_staleness: algorithm {algo.name!r} is on-policy: "
                          f"it reads only the rows of the policy being trained (lag 0), so a staleness window "
                          f"does not apply (got {a.min_staleness} / {a.max_staleness}); leave both unset")


def load_config(name_or_path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                check_paths: bool = True, imports: list[str] | tuple[str, ...] = ()) -> Config:
    """Load a shipped config by name or a YAML file (default: the embedded one), apply overrides, validate.
    `imports` (and the file's `imports:`) are imported first, so outside algorithms can be named."""
    data, where = read_yaml(name_or_path)
    return config_from_data(data, where, overrides, check_paths=check_paths, imports=imports)


def config_from_data(data: dict, where: str, overrides: list[str] | None = None, check_paths: bool = True,
                     imports: list[str] | tuple[str, ...] = ()) -> Config:
    """`load_config` for a mapping already read (a run folder's recorded config.yaml)."""
    data = dict(data)
    data["imports"] = list(dict.fromkeys([*(data.get("imports") or []), *imports]))
    try:
        import_modules(data["imports"])
    except UnknownAlgorithmError as e:
        raise ConfigError(f"{where}: imports: {e}") from None
    cfg = config_from_dict(apply_overrides(data, list(overrides or [])), where=where)
    validate(cfg, check_paths=check_paths)
    return cfg
