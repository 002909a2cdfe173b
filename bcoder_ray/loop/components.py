"""The components a run builds from its config, checked before any work: the warm start's settings, the
executor's options, and the `RunContext` every algorithm gets."""

from __future__ import annotations

import dataclasses
import inspect
import os

from bcoder_ray.algorithms.base import RunContext
from bcoder_ray.config import Config, ConfigError
from bcoder_ray.model.gguf import resolve_checkpoint
from bcoder_ray.model.warm_start import WarmStartConfig
from bcoder_ray.util.storage import cache_root
from envs.execute import Executor


def warm_start_config(cfg: Config) -> WarmStartConfig:
    """The warm start's `WarmStartConfig` from model.warm_start.options, with the run's lengths and seed;
    ConfigError naming the option at fault."""
    m = cfg.model
    options = dict(m.warm_start.options)
    for key, value in (("max_prompt_len", m.source_len), ("max_program_len", m.target_len)):
        if options.setdefault(key, value) != value:
            raise ConfigError(f"model.warm_start.options.{key} = {options[key]} differs from the run's length "
                              f"{value} (model.source_len / target_len); leave it out")
    options.setdefault("seed", cfg.run.seed)
    known = {f.name for f in dataclasses.fields(WarmStartConfig)}
    unknown = sorted(set(options) - known)
    if unknown:
        raise ConfigError(f"model.warm_start.options: unknown key(s) {unknown}; known: {sorted(known)}")
    try:
        return WarmStartConfig(**options)
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model.warm_start.options: {e}") from None


def warm_start_cache(cfg: Config) -> str:
    """model.warm_start.cache_dir, else `<cache root>/warm_start` (`bcoder_ray.util.storage.cache_root`)."""
    return cfg.model.warm_start.cache_dir or os.path.join(cache_root(), "warm_start")


def check_components(cfg: Config) -> None:
    """Options passed through to components (executor, warm start) must be ones they take."""
    params = inspect.signature(Executor.__init__).parameters
    own = {"workers", "infra_retries"}  # keys of their own in the executor section
    unknown = sorted(set(cfg.executor.options) - set(params) - own)
    if unknown or own & set(cfg.executor.options):
        raise ConfigError(f"executor.options: unknown key(s) {unknown or sorted(own & set(cfg.executor.options))} "
                          f"(use executor.workers / executor.infra_retries); envs.execute.Executor takes "
                          f"{sorted(set(params) - {'self'})}")
    if cfg.model.checkpoint is None:
        warm_start_config(cfg)


def suite_loader_options(options: dict) -> tuple[dict, bool]:
    """(the loader's options, drop_contaminated): suite.options go to `envs.registry.load_suite`, except
    `drop_contaminated`, which the run reads itself (training without the problems the contamination report
    names, `bcoder_ray.loop.driver.Run.check_contamination`), so every suite takes it."""
    options = dict(options)
    drop = options.pop("drop_contaminated", False)
    if not isinstance(drop, bool):
        raise ConfigError(f"suite.options.drop_contaminated must be true or false, got {drop!r}")
    return options, drop


def executor_kwargs(cfg: Config) -> dict:
    """The keyword arguments of `envs.execute.Executor` the config gives."""
    return {"workers": cfg.executor.workers, "infra_retries": cfg.executor.infra_retries, **cfg.executor.options}


def run_context(cfg: Config, theta_ckpt: str, buffer_uri: str | None = None,
                tokenizer_path: str | None = None) -> RunContext:
    """The `RunContext` of a run of `cfg` from θ_ckpt (the driver's; a run folder's read back:
    `bcoder_ray.loop.run_folder.LoadedRun.context`). The tokenizer: `tokenizer_path` when given (the driver's,
    shared with the run's storage), else model.tokenizer (a GGUF source as its converted folder on this node), else
    θ_ckpt's."""
    m = cfg.model
    if tokenizer_path is None:
        tokenizer_path = theta_ckpt if m.tokenizer is None else resolve_checkpoint(m.tokenizer)
    return RunContext(theta_ckpt=theta_ckpt, tokenizer_path=tokenizer_path, source_len=m.source_len,
                      target_len=m.target_len, dtype=m.dtype, seed=cfg.run.seed, buffer_uri=buffer_uri,
                      load_options=m.load_options(),
                      eos_token_ids=None if m.eos_token_ids is None else tuple(m.eos_token_ids),
                      chat_template=m.chat_template, stop_strings=tuple(m.stop_strings),
                      response_prefix=m.response_prefix)
