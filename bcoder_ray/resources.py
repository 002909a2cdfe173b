"""Does the run's schedule fit the cluster? Logical CPUs each phase holds at once (the rollout actors stay up
while a stage trains), checked before any work so that a phase that could never be scheduled is refused with
its name instead of waiting forever."""

from __future__ import annotations

import os

from bcoder_ray.config import Config, ConfigError


def cpu_budget(cfg: Config, stages: tuple[str, ...]) -> dict[str, float]:
    r, e, b = cfg.rollout, cfg.executor, cfg.buffer
    actors = r.num_actors * r.cpus_per_actor + e.num_actors * e.cpus_per_actor
    budget = {f"rollout actors + stage {name} workers + a Ray Data read task":
              actors + cfg.stage(name).num_workers * cfg.stage(name).cpus_per_worker + b.dataset_cpus
              for name in stages}
    if b.targets_via == "ray_data":
        budget["rollout actors + the target-filling Ray Data actor"] = actors + b.targets_cpus
    return budget


def check_cpu_budget(cfg: Config, stages: tuple[str, ...], cluster_cpus: float) -> None:
    """A phase that needs more logical CPUs than the cluster has would wait forever: stop with a message."""
    for phase, need in cpu_budget(cfg, stages).items():
        if need > cluster_cpus + 1e-9:
            raise ConfigError(
                f"{phase} need {need:g} CPUs but the Ray cluster has {cluster_cpus:g}: lower rollout.cpus_per_actor, "
                f"stages.<stage>.cpus_per_worker or buffer.dataset_cpus (fractions are fine), or raise ray.num_cpus")


def local_cpus(cfg: Config) -> float | None:
    """The CPUs of the local instance this run would start (None when it joins a cluster: checked there)."""
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return None
    if cfg.ray.num_cpus is not None:
        return float(cfg.ray.num_cpus)
    try:
        from ray._private.utils import get_num_cpus  # what a local ray.init() would detect

        return float(get_num_cpus())
    except ImportError:  # pragma: no cover - another Ray version
        return float(os.cpu_count() or 1)
