"""Does the run's schedule fit the cluster? The CPUs and GPUs each phase holds at once, checked before any work,
so a phase that could never be scheduled is refused with its name instead of waiting forever.

The rollout actors (and shared executor actors) hold their resources for the run's life. When a learning stage
or the target-filling job does not fit beside them, the schedule releases them while it runs (the pool is shut
down before the stage and started again after, `Schedule.release_actors`): on one 8-GPU node the paper's
setting (8 sampling actors on one GPU each, stage θ on 8 GPU workers) runs that way. A phase that does not fit
even alone is refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from bcoder_ray.config import Config, ConfigError


@dataclass(frozen=True)
class Need:
    cpus: float = 0.0
    gpus: float = 0.0

    def __add__(self, other: "Need") -> "Need":
        return Need(self.cpus + other.cpus, self.gpus + other.gpus)

    def fits(self, cluster: "Need") -> bool:
        return self.cpus <= cluster.cpus + 1e-9 and self.gpus <= cluster.gpus + 1e-9

    def __str__(self) -> str:
        return f"{self.cpus:g} CPUs" + (f" and {self.gpus:g} GPUs" if self.gpus else "")


@dataclass(frozen=True)
class Schedule:
    release_actors: bool
    """Shut the rollout actors down while stages (and the target job) run, start them again after."""
    phases: dict[str, Need]
    """What each phase holds at once under this schedule."""


def actor_need(cfg: Config) -> Need:
    r, e = cfg.rollout, cfg.executor
    return Need(r.num_actors * r.cpus_per_actor + e.num_actors * e.cpus_per_actor, r.num_actors * r.gpus_per_actor)


def learning_needs(cfg: Config, stages: tuple[str, ...]) -> dict[str, Need]:
    """What each learning phase holds by itself (without the actors)."""
    b = cfg.buffer
    out = {}
    for name in stages:
        s = cfg.stage(name)
        gpus = (s.gpus_per_worker or 1.0) if s.use_gpu else 0.0
        # local mode (0 workers) runs the loop in the driver process, which holds no Ray resources
        where = f"{s.num_workers} workers" if s.num_workers else "in the driver"
        out[f"stage {name} ({where} + a Ray Data read task)"] = \
            Need(s.num_workers * s.cpus_per_worker + b.dataset_cpus, s.num_workers * gpus)
    if b.targets_via == "ray_data":
        out["the target-filling Ray Data actor"] = Need(b.targets_cpus, b.targets_gpus)
    return out


def plan_schedule(cfg: Config, stages: tuple[str, ...], cluster: Need) -> Schedule:
    """Keep the actors up through learning when everything fits beside them; else release them while learning;
    refuse (ConfigError naming the phase) when a phase does not fit at all."""
    actors = actor_need(cfg)
    if not actors.fits(cluster):
        raise ConfigError(f"the rollout actors need {actors} but the Ray cluster has {cluster}: lower "
                          f"rollout.num_actors / cpus_per_actor / gpus_per_actor (fractions are fine) or "
                          f"executor.num_actors / cpus_per_actor")
    if cfg.run.learner_kind() == "persistent":
        return persistent_schedule(cfg, stages, cluster, actors)
    alone = learning_needs(cfg, stages)
    for phase, need in alone.items():
        if not need.fits(cluster):
            raise ConfigError(f"{phase} needs {need} but the Ray cluster has {cluster}: lower "
                              f"stages.<stage>.num_workers / cpus_per_worker / gpus_per_worker, buffer.dataset_cpus "
                              f"or buffer.targets_cpus / targets_gpus")
    together = {f"rollout actors + {phase}": actors + need for phase, need in alone.items()}
    if all(need.fits(cluster) for need in together.values()):
        return Schedule(False, {"rollout actors": actors, **together})
    if cfg.buffer.targets_via == "actors":
        phase = next(p for p, n in together.items() if not n.fits(cluster))
        raise ConfigError(f"{phase} needs {together[phase]} but the Ray cluster has {cluster}, and the actors "
                          f"cannot be released while they fill the targets: set buffer.targets_via: ray_data, or "
                          f"lower the actors' or the stage's resources")
    return Schedule(True, {"rollout actors": actors, **alone})


def persistent_schedule(cfg: Config, stages: tuple[str, ...], cluster: Need, actors: Need) -> Schedule:
    """The persistent learner's groups (one per stage name) live through the run beside the actors: everything
    must fit at once (in async mode the learner reads the buffer and fills the targets itself; in sync mode a
    Ray Data read task feeds a stage, and the target job runs between stages)."""
    b = cfg.buffer
    need, parts = actors, ["the rollout actors"]
    for name in stages:
        s = cfg.stage(name)
        if s.num_workers:  # local mode's one actor holds no Ray resource, as the driver process did not
            need = need + Need(s.num_workers * s.cpus_per_worker,
                               s.num_workers * ((s.gpus_per_worker or 1.0) if s.use_gpu else 0.0))
            parts.append(f"stage {name}'s {s.num_workers} learners")
    if cfg.run.mode == "sync":
        extra = Need(b.dataset_cpus) + (Need(b.targets_cpus, b.targets_gpus) if b.targets_via == "ray_data"
                                        else Need())
        need = need + extra
        parts.append("a Ray Data read task" + (" and the target-filling actor" if b.targets_via == "ray_data"
                                               else ""))
    if not need.fits(cluster):
        raise ConfigError(f"{' + '.join(parts)} need {need} at once (the persistent learner keeps every stage's "
                          f"workers up beside the actors) but the Ray cluster has {cluster}: lower "
                          f"stages.<stage>.num_workers / cpus_per_worker / gpus_per_worker or the actors', or set "
                          f"run.learner: per_stage (sync mode)")
    return Schedule(False, {"rollout actors + persistent learners": need})


def cluster_need(resources: dict) -> Need:
    return Need(float(resources.get("CPU", 0.0)), float(resources.get("GPU", 0.0)))


def local_cluster(cfg: Config) -> Need | None:
    """The CPUs and GPUs of the local instance this run would start (None when it joins a cluster: checked
    there, once connected)."""
    if cfg.ray.address or os.environ.get("RAY_ADDRESS"):
        return None
    if cfg.ray.num_cpus is not None:
        cpus = float(cfg.ray.num_cpus)
    else:
        try:
            from ray._private.utils import get_num_cpus  # what a local ray.init() would detect

            cpus = float(get_num_cpus())
        except ImportError:  # pragma: no cover - another Ray version
            cpus = float(os.cpu_count() or 1)
    if cfg.ray.num_gpus is not None:
        gpus = float(cfg.ray.num_gpus)
    else:
        try:
            import torch

            gpus = float(torch.cuda.device_count())
        except ImportError:  # pragma: no cover
            gpus = 0.0
    return Need(cpus, gpus)


def describe(schedule: Schedule) -> list[str]:
    head = "rollout actors released while learning" if schedule.release_actors else "rollout actors kept up"
    return [f"schedule: {head}"] + [f"  {phase}: {need}" for phase, need in schedule.phases.items()]
