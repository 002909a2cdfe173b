"""The run's configuration: typed dataclasses, YAML files, and `--a.b value` command-line overrides.

    cfg = load_config("experiments/configs/embedded.yaml", ["--learner_theta.lr", "3e-5"])
    cfg.theta.lr            # 3e-05 (a float: overrides are coerced to the field's type)

Every field has a type and a default; a YAML file or an override that names an unknown key, gives a value of
the wrong type, or points at a checkpoint path that does not exist raises `ConfigError` naming it, before any
work starts. Only the driver reads these objects: components (executor, buffer, learner core, evaluation, warm
start) take plain arguments, so they stay reusable outside this system.

Sections (see the dataclasses below for every field):
- run:        name, iterations, seed, run_dir, progress bars, TensorBoard
- ray:        address (null: join RAY_ADDRESS or start a local instance), CPUs, object store cap
- suite:      suite name, train / held-out splits, problem caps, loader options
- model:      θ_ckpt (a local path or a hub name; null: warm-start a tiny LM from the suite's human programs),
              source / target lengths, the warm start's settings
- algorithm:  α, γ, β_adv, β_ce, ρ_real, R_max, the Bellman operator (eq. 14 conservative or eq. 13
              optimality), whether Q is initialised from the LM (eq. 9-11) or not (plain dueling DQN)
- rollout:    sampling settings for the buffer (m per problem, temperature, top-p), actor pool and resources
- evaluation: sampling settings for held-out evaluation (separate from rollout), ks, ranking, resources
- executor:   sandbox workers and limits
- buffer:     where the replay buffer lives, target filling
- phi, theta: the two Ray Train stages: optimiser, schedule, batch per worker, accumulation, precision,
              clipping, steps, workers, resources
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

CONFIG_DIR = Path(__file__).resolve().parent.parent / "experiments" / "configs"
DEFAULT_CONFIG = CONFIG_DIR / "embedded.yaml"


class ConfigError(ValueError):
    """A bad configuration; the message names the file and key at fault."""


# --------------------------------------------------------------------------------------------------- sections


@dataclass
class RunSection:
    name: str = "bcoder"  # prefix of the default run folder and of Ray Train run names
    iterations: int = 3  # rollout -> targets -> learn -> evaluate cycles
    seed: int = 0
    run_dir: str | None = None  # null: runs/<name>-<timestamp> under the current directory
    progress: bool = True  # tqdm progress bars on stderr
    tensorboard: bool = True  # scalars under <run_dir>/tensorboard


@dataclass
class RaySection:
    address: str | None = None  # null: RAY_ADDRESS if set (ray job submit), else a new local instance
    num_cpus: float | None = None  # local instance only; null: the CPUs present
    num_gpus: float | None = None  # local instance only; null: the GPUs present
    object_store_mb: int = 300  # local instance only: a capped object store for small machines
    include_dashboard: bool = False  # local instance only


@dataclass
class SuiteSection:
    name: str = "embedded"  # a name registered in envs.registry
    train_split: str = "train"  # feeds the buffer the learners read
    eval_split: str = "test"  # held-out: evaluated each iteration, never written to the buffer
    max_train_problems: int | None = None  # problems of the RL loop (seeded, rolled out): the first N; null: all
    # (a warm start, when there is one, learns from every problem of the train split)
    max_eval_problems: int | None = None
    options: dict = field(default_factory=dict)  # passed to load_suite(name, split, **options)


@dataclass
class WarmStartSection:
    """A tiny LM and tokenizer trained by cross-entropy on the train split's human programs (when model.checkpoint
    is null); cached under a key of these settings so a second run reuses it."""

    cache_dir: str | None = None  # null: $BCODER_CACHE or ~/.cache/bcoder-ray/warm_start
    options: dict = field(default_factory=dict)  # fields of bcoder_ray.warm_start.WarmStartConfig


@dataclass
class ModelSection:
    checkpoint: str | None = None  # θ_ckpt: a local directory or a hub name ("org/name"); null: warm start
    tokenizer: str | None = None  # null: the checkpoint's own tokenizer
    source_len: int = 600  # prompt tokens (kept from the end)
    target_len: int = 512  # program tokens (cut at the limit, no EOS)
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"  # weights of the frozen θ_ckpt when loaded
    warm_start: WarmStartSection = field(default_factory=WarmStartSection)


@dataclass
class AlgorithmSection:
    alpha: float = 1.0  # energy temperature of eq. 9-11, 16 (not the sampling temperature)
    gamma: float = 0.999  # discount
    beta_adv: float = 0.1  # eq. 17 weight of the advantage loss (eq. 8)
    beta_ce: float = 0.5  # eq. 17 weight of the cross-entropy loss
    rho_real: float = 0.5  # fraction of ground-truth programs in a mini-batch (Appendix H)
    r_max: float = 1.0  # upper bound of the return (G.1)
    operator: Literal["conservative", "optimality"] = "conservative"  # eq. 14 (paper) or eq. 13 (ablation)
    init_from_lm: bool = True  # eq. 9-11; false: random dueling heads (plain dueling DQN ablation)
    aux_reduction: Literal["sum", "mean"] = "sum"  # per-program reduction of L_adv and L_ce (eq. 8, 1: sum)


@dataclass
class SamplingSection:
    """How candidate programs are sampled (Algorithm 2: Q_θ/α as logits, temperature then top-p)."""

    samples_per_problem: int = 8  # m
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int | None = None  # null: model.target_len
    prompts_per_call: int = 4  # prompts per batched sampling call (each expanded to m sequences)


@dataclass
class RolloutSection(SamplingSection):
    num_actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0
    problems_per_task: int = 8  # one actor task = this many problems; its batch key makes writes idempotent
    problems_per_iteration: int | None = None  # null: every train problem each iteration; N: a new slice of N
    max_restarts: int = 3  # an actor that dies is restarted this many times; its task is redone
    sample_iteration_zero_from: Literal["ckpt", "theta"] = "ckpt"  # iteration 0 samples from θ_ckpt


@dataclass
class EvaluationSection(SamplingSection):
    ks: list[int] = field(default_factory=lambda: [1, 5])
    rank: bool = True  # also report pass@k of the top-k by R̃ (eq. 19-20)
    filtered: bool = False  # drop candidates failing the example tests before ranking
    every: int = 1  # evaluate after every N-th iteration (the last one always)
    warm_start_baseline: bool = True  # evaluate θ_ckpt before the first iteration (the table's baseline)
    confidence: float = 0.95  # level of the reported confidence intervals
    num_actors: int = 1
    cpus_per_actor: float = 1.0
    gpus_per_actor: float = 0.0


@dataclass
class ExecutorSection:
    workers: int | None = None  # sandbox processes per executor; null: the executor's default
    num_actors: int = 0  # 0: each policy actor runs its own executor; N: N shared executor actors
    cpus_per_actor: float = 1.0  # with num_actors > 0
    options: dict = field(default_factory=dict)  # other keyword arguments of envs.execute.Executor


@dataclass
class BufferSection:
    uri: str | None = None  # null: <run_dir>/buffer; any URI the replay buffer accepts (s3://...)
    targets_via: Literal["ray_data", "actors"] = "ray_data"  # a map_batches job, or the running policy actors
    dataset_cpus: float = 0.25  # CPUs per Ray Data read task feeding the learners (Ray's default would be 1)
    targets_batch_size: int = 16  # rows per target-filling batch
    targets_cpus: float = 1.0  # CPUs per target-filling task
    targets_gpus: float = 0.0


@dataclass
class StageSection:
    """One Ray Train stage (φ: eq. 12; θ: eq. 17)."""

    steps: int = 100  # optimiser steps (each over batch_size_per_worker × num_workers × grad_accum programs)
    lr: float = 1e-5
    schedule: Literal["constant", "linear"] = "constant"  # linear: decay to 0 over `steps`
    warmup_steps: int = 0
    weight_decay: float = 0.05
    adam_betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    batch_size_per_worker: int = 16
    grad_accum: int = 1
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"
    grad_clip: float | None = 1.0  # max global gradient norm; null: no clipping
    num_workers: int = 1  # Ray Train workers (DDP); 0: Ray Train's local mode, in the driver process
    use_gpu: bool = False
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 0.0  # with use_gpu; 0 means one GPU per worker
    report_every: int = 10  # ray.train.report metrics every N steps (a checkpoint at the end)
    retrain_every: int = 0  # φ: 0 trains once (first iteration); N retrains every N iterations (targets refilled)
    continue_across_iterations: bool = True  # θ: start each iteration from the previous θ


@dataclass
class Config:
    run: RunSection = field(default_factory=RunSection)
    ray: RaySection = field(default_factory=RaySection)
    suite: SuiteSection = field(default_factory=SuiteSection)
    model: ModelSection = field(default_factory=ModelSection)
    algorithm: AlgorithmSection = field(default_factory=AlgorithmSection)
    rollout: RolloutSection = field(default_factory=RolloutSection)
    evaluation: EvaluationSection = field(default_factory=EvaluationSection)
    executor: ExecutorSection = field(default_factory=ExecutorSection)
    buffer: BufferSection = field(default_factory=BufferSection)
    phi: StageSection = field(default_factory=lambda: StageSection(lr=1e-5, schedule="constant"))
    theta: StageSection = field(default_factory=lambda: StageSection(lr=3e-5, schedule="linear"))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)


# ------------------------------------------------------------------------------------------ typed conversion

_NONE_WORDS = {"null", "none", "~", ""}
_TRUE_WORDS = {"true", "yes", "on", "1"}
_FALSE_WORDS = {"false", "no", "off", "0"}


def _type_name(tp: Any) -> str:
    if isinstance(tp, type):
        return tp.__name__
    return str(tp).replace("typing.", "")


def _is_optional(tp: Any) -> tuple[bool, Any]:
    origin = typing.get_origin(tp)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) < len(typing.get_args(tp)) and len(args) == 1:
            return True, args[0]
    return False, tp


def _convert(value: Any, tp: Any, where: str, from_text: bool) -> Any:
    """`value` as type `tp`. `from_text`: value is a command-line string to be parsed, not a YAML value."""
    optional, inner = _is_optional(tp)
    if from_text and isinstance(value, str) and value.strip().lower() in _NONE_WORDS and optional:
        return None
    if value is None:
        if optional:
            return None
        raise ConfigError(f"{where}: must be {_type_name(tp)}, got null")
    tp = inner
    origin = typing.get_origin(tp)

    if dataclasses.is_dataclass(tp):
        if from_text:
            value = _parse_text(value, where)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: must be a mapping of {tp.__name__} fields, got {type(value).__name__}")
        return _build(tp, value, where)
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(f"{where}: must be one of {list(choices)}, got {value!r}")
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and from_text:
            word = value.strip().lower()
            if word in _TRUE_WORDS:
                return True
            if word in _FALSE_WORDS:
                return False
        raise ConfigError(f"{where}: must be bool (true/false), got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and re.fullmatch(r"[+-]?\d+", value.strip()):
            return int(value)
        raise ConfigError(f"{where}: must be int, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "3e-5" (no dot) as a string; accept it as a number
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: must be float, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{where}: must be str, got {type(value).__name__} {value!r}")
    if origin is list or tp is list:
        if from_text and isinstance(value, str):
            value = _parse_text(value, where) if value.strip().startswith("[") else \
                [v for v in value.split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: must be a list, got {type(value).__name__} {value!r}")
        (item_tp,) = typing.get_args(tp) or (Any,)
        return [_convert(v, item_tp, f"{where}[{i}]", from_text) for i, v in enumerate(value)]
    if origin is dict or tp is dict:
        if from_text and isinstance(value, str):
            value = _parse_text(value, where)
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: must be a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is Any:
        return _parse_text(value, where) if from_text and isinstance(value, str) else value
    raise ConfigError(f"{where}: unsupported field type {_type_name(tp)}")  # a bug in this module


def _parse_text(text: Any, where: str) -> Any:
    if not isinstance(text, str):
        return text
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError(f"{where}: cannot parse {text!r}: {e}") from None


def _fields(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _build(cls: type, data: dict, where: str) -> Any:
    """Construct dataclass `cls` from a mapping, starting from its defaults."""
    return _merge(cls(), data, where)


def _merge(obj: Any, data: dict, where: str) -> Any:
    """Return a copy of dataclass `obj` with the keys of `data` set (recursively into nested sections)."""
    fields = _fields(type(obj))
    changes = {}
    for key, value in data.items():
        path = f"{where}.{key}" if where else str(key)
        if key not in fields:
            raise ConfigError(f"{path}: unknown key; {where or 'the top level'} has {sorted(fields)}")
        tp = fields[key]
        current = getattr(obj, key)
        if dataclasses.is_dataclass(current) and isinstance(value, dict):
            changes[key] = _merge(current, value, path)
        else:
            changes[key] = _convert(value, tp, path, from_text=False)
    return dataclasses.replace(obj, **changes)


def _set_path(obj: Any, dotted: str, text: str, where: str) -> Any:
    """Return a copy of `obj` with the field at `dotted` set from command-line text (coerced to its type)."""
    head, _, rest = dotted.partition(".")
    fields = _fields(type(obj))
    if head not in fields:
        raise ConfigError(f"{where}: unknown key {head!r}; choose from {sorted(fields)}")
    current = getattr(obj, head)
    if rest:
        if dataclasses.is_dataclass(current):
            return dataclasses.replace(obj, **{head: _set_path(current, rest, text, where)})
        if isinstance(current, dict):  # free-form options: --suite.options.n_train 40
            new = dict(current)
            cursor = new
            keys = rest.split(".")
            for k in keys[:-1]:
                cursor[k] = dict(cursor.get(k) or {})
                cursor = cursor[k]
            cursor[keys[-1]] = _parse_text(text, where)
            return dataclasses.replace(obj, **{head: new})
        raise ConfigError(f"{where}: {head!r} is a {type(current).__name__}, it has no field {rest!r}")
    return dataclasses.replace(obj, **{head: _convert(text, fields[head], where, from_text=True)})


# ----------------------------------------------------------------------------------------------- public API


def config_from_dict(data: dict | None, where: str = "config") -> Config:
    """A validated-types Config from a mapping (a parsed YAML file); `where` names the source in errors."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{where}: the top level must be a mapping of sections, got {type(data).__name__}")
    try:
        return _merge(Config(), data, "")
    except ConfigError as e:
        raise ConfigError(f"{where}: {e}") from None


def read_yaml(path: str | os.PathLike) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {e}") from None
    return data or {}


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply `--a.b value` (or `--a.b=value`) pairs; a value is coerced to the field's declared type."""
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
        if "." not in key:
            raise ConfigError(f"override --{key}: expected --section.key (sections: {sorted(_fields(Config))})")
        cfg = _set_path(cfg, key, text, f"--{key}")
    return cfg


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None,
                check_paths: bool = True) -> Config:
    """Load a YAML config (default: the embedded one), apply overrides, and validate it."""
    source = Path(path) if path is not None else DEFAULT_CONFIG
    cfg = config_from_dict(read_yaml(source), where=str(source))
    cfg = apply_overrides(cfg, list(overrides or []))
    validate(cfg, check_paths=check_paths)
    return cfg


_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def is_local_path(name: str) -> bool:
    """Whether a model name is meant as a local path (absolute, relative with ./ ~ or several parts, or
    existing) rather than a hub name "org/model"."""
    if os.path.exists(os.path.expanduser(name)):
        return True
    return name.startswith(("/", ".", "~")) or not _HUB_NAME.match(name)


def validate(cfg: Config, check_paths: bool = True) -> None:
    """Check values and cross-field rules; raise ConfigError naming the key. No work is started."""

    def need(ok: bool, key: str, msg: str) -> None:
        if not ok:
            raise ConfigError(f"{key}: {msg}")

    need(cfg.run.iterations >= 0, "run.iterations", "must be >= 0")
    a = cfg.algorithm
    need(a.alpha > 0, "algorithm.alpha", "must be > 0")
    need(0 < a.gamma <= 1, "algorithm.gamma", "must be in (0, 1]")
    need(0 <= a.rho_real <= 1, "algorithm.rho_real", "must be in [0, 1]")
    need(a.beta_adv >= 0 and a.beta_ce >= 0, "algorithm.beta_adv/beta_ce", "must be >= 0")
    m = cfg.model
    need(m.source_len > 0, "model.source_len", "must be > 0")
    need(m.target_len > 0, "model.target_len", "must be > 0")
    for name, s in (("rollout", cfg.rollout), ("evaluation", cfg.evaluation)):
        need(s.samples_per_problem >= 1, f"{name}.samples_per_problem", "must be >= 1")
        need(s.temperature >= 0, f"{name}.temperature", "must be >= 0")
        need(0 < s.top_p <= 1, f"{name}.top_p", "must be in (0, 1]")
        need(s.prompts_per_call >= 1, f"{name}.prompts_per_call", "must be >= 1")
        need(s.num_actors >= 1, f"{name}.num_actors", "must be >= 1")
        need(s.cpus_per_actor >= 0 and s.gpus_per_actor >= 0, f"{name}.cpus_per_actor", "must be >= 0")
        need(s.max_new_tokens is None or s.max_new_tokens >= 1, f"{name}.max_new_tokens", "must be >= 1")
    need(cfg.rollout.problems_per_task >= 1, "rollout.problems_per_task", "must be >= 1")
    need(cfg.rollout.problems_per_iteration is None or cfg.rollout.problems_per_iteration >= 1,
         "rollout.problems_per_iteration", "must be >= 1 or null")
    ev = cfg.evaluation
    need(len(ev.ks) > 0 and all(k >= 1 for k in ev.ks), "evaluation.ks", "must be a non-empty list of k >= 1")
    need(max(ev.ks) <= ev.samples_per_problem, "evaluation.ks",
         f"largest k {max(ev.ks)} exceeds evaluation.samples_per_problem {ev.samples_per_problem}")
    need(ev.every >= 1, "evaluation.every", "must be >= 1")
    need(0 < ev.confidence < 1, "evaluation.confidence", "must be in (0, 1)")
    for name, st in (("phi", cfg.phi), ("theta", cfg.theta)):
        need(st.steps >= 0, f"{name}.steps", "must be >= 0")
        need(st.lr > 0, f"{name}.lr", "must be > 0")
        need(st.batch_size_per_worker >= 1, f"{name}.batch_size_per_worker", "must be >= 1")
        need(st.grad_accum >= 1, f"{name}.grad_accum", "must be >= 1")
        need(st.num_workers >= 0, f"{name}.num_workers", "must be >= 0 (0: Ray Train's local mode)")
        need(st.grad_clip is None or st.grad_clip > 0, f"{name}.grad_clip", "must be > 0 or null")
        need(len(st.adam_betas) == 2, f"{name}.adam_betas", "must be two numbers")
        need(st.warmup_steps >= 0, f"{name}.warmup_steps", "must be >= 0")
        need(st.retrain_every >= 0, f"{name}.retrain_every", "must be >= 0")
        need(st.report_every >= 1, f"{name}.report_every", "must be >= 1")
        need(not (st.mixed_precision == "fp16" and not st.use_gpu), f"{name}.mixed_precision",
             "fp16 needs use_gpu: true (use bf16 or no on CPU)")
    need(cfg.buffer.targets_batch_size >= 1, "buffer.targets_batch_size", "must be >= 1")
    need(cfg.executor.workers is None or cfg.executor.workers >= 1, "executor.workers", "must be >= 1")
    need(cfg.executor.num_actors >= 0, "executor.num_actors", "must be >= 0")
    if check_paths:
        for key, value in (("model.checkpoint", m.checkpoint), ("model.tokenizer", m.tokenizer)):
            if value is not None and is_local_path(value):
                need(os.path.isdir(os.path.expanduser(value)), key,
                     f"checkpoint path {value!r} does not exist (or is not a directory)")
    _validate_suite(cfg)


def _validate_suite(cfg: Config) -> None:
    try:
        import envs  # noqa: F401  (importing envs registers the suites)
        from envs.registry import suite_info
    except ImportError:  # pragma: no cover - envs is part of this repository
        return
    try:
        info = suite_info(cfg.suite.name)
    except KeyError as e:
        raise ConfigError(f"suite.name: {e}") from None
    for key in ("train_split", "eval_split"):
        split = getattr(cfg.suite, key)
        if split not in info.splits:
            raise ConfigError(f"suite.{key}: suite {cfg.suite.name!r} has no split {split!r}; "
                              f"its splits are {list(info.splits)}")


def config_hash(data: Any) -> str:
    """A short stable hash of a JSON-able value (a config section), for cache keys and run names."""
    import hashlib

    blob = json.dumps(data, sort_keys=True, default=str, separators=(",", ":"))
    return hashlib.sha256(blob.encode()).hexdigest()[:12]
