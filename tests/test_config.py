"""Config: YAML loading, typed overrides, and errors that name the key at fault before any work."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from bcoder_ray.config import (CONFIG_DIR, DEFAULT_CONFIG, Config, ConfigError, apply_overrides,
                               config_from_dict, is_local_path, load_config)


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def test_default_config_is_the_embedded_one():
    assert DEFAULT_CONFIG.name == "embedded.yaml"
    cfg = load_config()
    assert cfg.suite.name == "embedded"
    assert cfg.model.checkpoint is None  # warm-started by the run itself
    assert cfg.run.iterations >= 3


def test_apps_codet5_has_the_papers_settings():
    cfg = load_config(CONFIG_DIR / "apps_codet5.yaml")
    assert cfg.model.checkpoint == "Salesforce/codet5-large-ntp-py"
    assert (cfg.model.source_len, cfg.model.target_len) == (600, 512)
    a = cfg.algorithm
    assert (a.alpha, a.gamma, a.beta_adv, a.beta_ce, a.rho_real) == (1.0, 0.999, 0.1, 0.5, 0.5)
    assert a.operator == "conservative" and a.init_from_lm
    assert cfg.rollout.samples_per_problem == 256
    phi, theta = cfg.phi, cfg.theta
    assert (phi.lr, phi.schedule, phi.weight_decay, phi.steps) == (1e-5, "constant", 0.05, 18000)
    assert phi.batch_size_per_worker * phi.num_workers * phi.grad_accum == 256
    assert (theta.lr, theta.schedule, theta.warmup_steps, theta.weight_decay, theta.steps) == \
        (3e-5, "linear", 0, 0.05, 10000)
    assert theta.batch_size_per_worker * theta.num_workers * theta.grad_accum == 128
    assert phi.use_gpu and theta.use_gpu and phi.mixed_precision == theta.mixed_precision == "bf16"
    ev = cfg.evaluation
    assert (ev.temperature, ev.samples_per_problem, ev.ks) == (0.6, 256, [1, 5])


def test_mbpp_config_plugs_in_another_suite():
    cfg = load_config(CONFIG_DIR / "mbpp.yaml")
    assert cfg.suite.name == "mbpp"


def test_overrides_are_coerced_to_the_field_type():
    cfg = apply_overrides(Config(), [
        "--theta.lr", "2e-5",  # YAML 1.1 would read this as a string
        "--phi.steps", "7",
        "--theta.use_gpu", "true",
        "--evaluation.ks", "1,2",
        "--model.checkpoint", "null",
        "--phi.grad_clip=none",
        "--suite.options.n", "12",
        "--algorithm.operator", "optimality",
    ])
    assert cfg.theta.lr == 2e-5 and isinstance(cfg.theta.lr, float)
    assert cfg.phi.steps == 7 and isinstance(cfg.phi.steps, int)
    assert cfg.theta.use_gpu is True
    assert cfg.evaluation.ks == [1, 2]
    assert cfg.model.checkpoint is None and cfg.phi.grad_clip is None
    assert cfg.suite.options == {"n": 12}
    assert cfg.algorithm.operator == "optimality"
    assert Config().theta.lr != 2e-5  # overrides return a copy


@pytest.mark.parametrize("args, names", [
    (["--theta.lrr", "1"], "lrr"),
    (["--nosuch.x", "1"], "nosuch"),
    (["--phi.steps", "1.5"], "--phi.steps"),
    (["--theta.use_gpu", "maybe"], "--theta.use_gpu"),
    (["--algorithm.operator", "greedy"], "--algorithm.operator"),
    (["--phi.steps"], "--phi.steps"),
    (["phi.steps", "3"], "phi.steps"),
])
def test_bad_overrides_name_the_key(args, names):
    with pytest.raises(ConfigError, match=names.replace(".", r"\.")):
        apply_overrides(Config(), args)


def test_yaml_unknown_key_and_wrong_type_name_file_and_key(tmp_path):
    path = write(tmp_path, {"theta": {"stepz": 3}})
    with pytest.raises(ConfigError, match=r"c\.yaml.*theta\.stepz.*unknown key"):
        load_config(path)
    path = write(tmp_path, {"rollout": {"samples_per_problem": "many"}})
    with pytest.raises(ConfigError, match=r"rollout\.samples_per_problem.*int"):
        load_config(path)
    path = write(tmp_path, {"run": [1, 2]})
    with pytest.raises(ConfigError, match=r"run.*mapping"):
        load_config(path)
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(tmp_path / "nope.yaml")


def test_missing_checkpoint_path_is_an_error_but_a_hub_name_is_not(tmp_path):
    with pytest.raises(ConfigError, match=r"model\.checkpoint.*does not exist"):
        load_config(overrides=["--model.checkpoint", str(tmp_path / "missing")])
    with pytest.raises(ConfigError, match=r"model\.checkpoint"):
        load_config(overrides=["--model.checkpoint", "./relative/missing"])
    cfg = load_config(overrides=["--model.checkpoint", str(tmp_path)])
    assert cfg.model.checkpoint == str(tmp_path)
    assert not is_local_path("Salesforce/codet5-large-ntp-py")
    assert is_local_path("runs/a/b") and is_local_path("/abs")


def test_cross_field_rules():
    with pytest.raises(ConfigError, match=r"evaluation\.ks"):
        load_config(overrides=["--evaluation.ks", "[1, 500]"])
    with pytest.raises(ConfigError, match=r"phi\.mixed_precision"):
        load_config(overrides=["--phi.mixed_precision", "fp16"])
    with pytest.raises(ConfigError, match=r"suite\.name"):
        load_config(overrides=["--suite.name", "nosuchsuite"])
    with pytest.raises(ConfigError, match=r"suite\.eval_split"):
        load_config(overrides=["--suite.eval_split", "nosplit"])


def test_round_trip_through_yaml(tmp_path):
    cfg = apply_overrides(Config(), ["--theta.steps", "5", "--evaluation.ks", "[1]"])
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg
