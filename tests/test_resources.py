"""The schedule check on descriptions of nodes: what fits beside the rollout actors, what needs them released,
what is refused (the phase named)."""

from __future__ import annotations

import pytest

from bcoder_ray.config import ConfigError, load_config
from bcoder_ray.loop.resources import Need, plan_schedule

STAGES = ("phi", "theta")


def test_the_papers_setting_fits_one_8_gpu_node_by_releasing_the_actors_while_learning():
    cfg = load_config("apps_codet5")
    schedule = plan_schedule(cfg, STAGES, Need(cpus=96, gpus=8))
    assert schedule.release_actors  # 8 sampling GPUs + 8 stage-θ GPUs do not fit together
    assert schedule.phases["rollout actors"] == Need(16, 8)
    assert max(n.gpus for n in schedule.phases.values()) == 8


def test_a_node_with_room_for_both_keeps_the_actors_up():
    cfg = load_config("apps_codet5")
    assert not plan_schedule(cfg, STAGES, Need(cpus=96, gpus=16)).release_actors


def test_one_gpu_is_refused_naming_the_phase():
    cfg = load_config("apps_codet5")
    with pytest.raises(ConfigError, match=r"rollout actors need 16 CPUs and 8 GPUs.*has 96 CPUs and 1 GPUs"):
        plan_schedule(cfg, STAGES, Need(cpus=96, gpus=1))
    small = load_config("apps_codet5", ["--rollout.gpus_per_actor", "0.125"])
    with pytest.raises(ConfigError, match=r"stage phi \(4 workers.*needs .*4 GPUs.*has 96 CPUs and 1 GPUs"):
        plan_schedule(small, STAGES, Need(cpus=96, gpus=1))


def test_releasing_needs_the_ray_data_target_job():
    cfg = load_config("apps_codet5", ["--buffer.targets_via", "actors"])
    with pytest.raises(ConfigError, match="targets_via: ray_data"):
        plan_schedule(cfg, STAGES, Need(cpus=96, gpus=8))


def test_the_embedded_default_fits_two_cpus_with_the_actors_kept():
    cfg = load_config("embedded")
    schedule = plan_schedule(cfg, STAGES, Need(cpus=2, gpus=0))
    assert not schedule.release_actors
    with pytest.raises(ConfigError, match="CPUs"):
        plan_schedule(cfg, STAGES, Need(cpus=1, gpus=0))
