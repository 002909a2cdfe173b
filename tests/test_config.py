"""Config: shipped configs, YAML loading, typed overrides, the algorithm section typed by name, and errors that
name the file and key at fault before any work."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from bcoder_ray.algorithms.bcoder.algorithm import BCoderConfig, DuelingDQNConfig
from bcoder_ray.config import (DEFAULT_CONFIG, Config, ConfigError, StageConfig, apply_overrides, config_from_data,
                               config_from_dict, is_local_path, load_config, read_yaml, shipped_configs)

REPO = Path(__file__).resolve().parent.parent


def write(tmp_path: Path, data: dict) -> Path:
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(data))
    return path


def tiny(overrides: list[str]) -> Config:
    data, where = read_yaml("ci_tiny")
    return config_from_data(data, where, overrides, check_paths=False)


def test_shipped_configs_load_and_the_default_is_the_embedded_one():
    assert {"ci_tiny", "embedded", "mbpp", "apps_codet5"} <= set(shipped_configs())
    for name in shipped_configs():
        cfg = load_config(name)
        assert cfg.algorithm.name == "bcoder" and {"phi", "theta"} <= set(cfg.stages)
    assert DEFAULT_CONFIG == "embedded"
    cfg = load_config()
    assert cfg.suite.name == "embedded" and cfg.model.checkpoint is None and cfg.run.iterations >= 3
    assert cfg.suite.validation_split == "validation" and cfg.suite.test_split == "test"


def test_apps_codet5_has_the_papers_settings():
    cfg = load_config("apps_codet5")
    assert cfg.model.checkpoint == "Salesforce/codet5-large-ntp-py"
    assert (cfg.model.source_len, cfg.model.target_len) == (600, 512)
    a = cfg.algorithm
    assert isinstance(a, BCoderConfig)
    assert (a.alpha, a.gamma, a.beta_adv, a.beta_ce, a.rho_real) == (1.0, 0.999, 0.1, 0.5, 0.5)
    assert a.operator == "conservative" and a.init_from_lm
    assert cfg.rollout.samples_per_problem == 256
    phi, theta = cfg.stage("phi"), cfg.stage("theta")
    assert (phi.lr, phi.schedule, phi.weight_decay, phi.steps) == (1e-5, "constant", 0.05, 18000)
    assert phi.batch_size_per_worker * phi.num_workers * phi.grad_accum == 256
    assert (theta.lr, theta.schedule, theta.warmup_steps, theta.weight_decay, theta.steps) == \
        (3e-5, "linear", 0, 0.05, 10000)
    assert theta.batch_size_per_worker * theta.num_workers * theta.grad_accum == 128
    assert phi.use_gpu and theta.use_gpu and phi.mixed_precision == theta.mixed_precision == "bf16"
    ev = cfg.evaluation
    assert (ev.temperature, ev.samples_per_problem, ev.ks) == (0.6, 256, [1, 5])


def test_overrides_are_coerced_to_the_field_type():
    cfg = tiny(["--stages.theta.lr", "2e-5",  # YAML 1.1 would read this as a string
                "--stages.phi.steps", "7",
                "--stages.theta.use_gpu", "true",
                "--evaluation.ks", "1,2",
                "--model.checkpoint", "null",
                "--stages.phi.grad_clip=none",
                "--suite.options.n", "12",
                "--algorithm.operator", "optimality"])
    assert cfg.stage("theta").lr == 2e-5 and isinstance(cfg.stage("theta").lr, float)
    assert cfg.stage("phi").steps == 7 and isinstance(cfg.stage("phi").steps, int)
    assert cfg.stage("theta").use_gpu is True
    assert cfg.evaluation.ks == [1, 2]
    assert cfg.model.checkpoint is None and cfg.stage("phi").grad_clip is None
    assert cfg.suite.options == {"n": 12}
    assert cfg.algorithm.operator == "optimality"


def test_stage_defaults_come_from_the_algorithm_then_the_file():
    cfg = config_from_dict({"algorithm": {"name": "bcoder"}, "stages": {"theta": {"steps": 5}}})
    assert cfg.stage("theta").steps == 5 and cfg.stage("theta").schedule == "linear"  # B-Coder's θ default
    assert cfg.stage("phi") == StageConfig(lr=1e-5, schedule="constant")  # filled in: the algorithm runs it


def test_the_algorithm_section_is_typed_by_its_name():
    cfg = tiny(["--algorithm.name", "dueling_dqn"])
    assert isinstance(cfg.algorithm, DuelingDQNConfig)
    assert cfg.algorithm.operator == "optimality" and cfg.algorithm.init_from_lm is False
    # the file's shared settings are kept; the ones that define the other algorithm are not
    data = apply_overrides({"algorithm": {"name": "bcoder", "alpha": 2.0, "operator": "conservative",
                                          "init_from_lm": True}}, ["--algorithm.name", "dueling_dqn"])
    assert data["algorithm"] == {"name": "dueling_dqn", "alpha": 2.0}
    embedded = load_config("embedded", ["--algorithm.name", "bcoder_optimality"])  # its file says conservative
    assert embedded.algorithm.operator == "optimality"
    assert yaml.safe_load(cfg.to_yaml())["algorithm"]["init_from_lm"] is False  # written whole (run folders)
    with pytest.raises(ConfigError, match=r"algorithm\.name.*unknown algorithm 'nosuch'.*bcoder"):
        tiny(["--algorithm.name", "nosuch"])


@pytest.mark.parametrize("args, names", [
    (["--stages.theta.lrr", "1"], r"stages\.theta\.lrr.*unknown key"),
    (["--stages.thetta.lr", "1"], r"unknown stage.*thetta"),
    (["--nosuch.x", "1"], "unknown section 'nosuch'"),
    (["--stages.phi.steps", "1.5"], r"stages\.phi\.steps"),
    (["--stages.theta.use_gpu", "maybe"], r"stages\.theta\.use_gpu"),
    (["--algorithm.operator", "greedy"], r"algorithm\.operator"),
    (["--algorithm.alpha", "-1"], r"algorithm.*alpha must be > 0"),
    (["--stages.phi.steps"], r"--stages\.phi\.steps: missing a value"),
    (["stages.phi.steps", "3"], r"expected --section\.key value"),
    (["--evaluation.ks", "[1, 500]"], r"evaluation.*largest k 500"),
    (["--stages.phi.mixed_precision", "fp16"], r"stages\.phi.*fp16 needs use_gpu"),
    (["--stages.phi.checkpoint_every", "5", "--stages.phi.num_workers", "0"], r"stages\.phi.*checkpoint_every needs"),
    (["--run.id", "a/b"], r"run\.id"),
    (["--stages.theta.parallel", "zero3"], r"stages\.theta\.parallel"),
    (["--stages.theta.parallel", "fsdp", "--stages.theta.num_workers", "0"], r"stages\.theta.*fsdp needs num_workers"),
])
def test_bad_overrides_name_the_key(args, names):
    with pytest.raises(ConfigError, match=names):
        tiny(args)


def test_yaml_unknown_key_and_wrong_type_name_file_and_key(tmp_path):
    path = write(tmp_path, {"stages": {"theta": {"stepz": 3}}})
    with pytest.raises(ConfigError, match=r"c\.yaml.*stages\.theta\.stepz.*unknown key"):
        load_config(path)
    path = write(tmp_path, {"rollout": {"samples_per_problem": "many"}})
    with pytest.raises(ConfigError, match=r"rollout\.samples_per_problem.*integer"):
        load_config(path)
    path = write(tmp_path, {"run": [1, 2]})
    with pytest.raises(ConfigError, match=r"run.*dictionary"):
        load_config(path)
    with pytest.raises(ConfigError, match="no such file and no shipped config"):
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


def test_suite_and_splits_are_checked():
    with pytest.raises(ConfigError, match=r"suite\.name"):
        load_config(overrides=["--suite.name", "nosuchsuite"])
    with pytest.raises(ConfigError, match=r"suite\.test_split"):
        load_config(overrides=["--suite.test_split", "nosplit"])


def test_round_trip_through_yaml():
    cfg = tiny(["--stages.theta.steps", "5", "--evaluation.ks", "[1]"])
    again = config_from_dict(yaml.safe_load(cfg.to_yaml()))
    assert again == cfg


def test_every_field_has_a_description():
    """CleanRL-style: a docstring under every field, which pydantic reads as its description."""
    missing = []

    def walk(model, prefix):
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and hasattr(ann, "model_fields") and ann is not type(None):
                walk(ann, f"{prefix}{name}.")
            elif not field.description and name not in ("temperature", "top_p", "num_actors", "cpus_per_actor",
                                                        "gpus_per_actor", "warmup_steps", "weight_decay",
                                                        "adam_betas", "batch_size_per_worker", "grad_accum",
                                                        "mixed_precision", "use_gpu", "cpus_per_worker",
                                                        "targets_gpus", "checkpoint_every"):
                missing.append(prefix + name)

    walk(Config, "")
    walk(BCoderConfig, "algorithm.")
    walk(StageConfig, "stages.<name>.")
    assert missing == []


def test_run_py_lists_and_dry_runs():
    run = [sys.executable, str(REPO / "experiments" / "run.py")]
    out = subprocess.run(run + ["--list-algorithms"], capture_output=True, text=True, check=True).stdout.split()
    assert {"bcoder", "bcoder_optimality", "dueling_dqn"} <= set(out)
    out = subprocess.run(run + ["--list-configs"], capture_output=True, text=True, check=True).stdout.split()
    assert {"ci_tiny", "embedded", "mbpp", "apps_codet5"} <= set(out)
    done = subprocess.run(run + ["--config", "apps_codet5", "--dry-run"], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    resolved = yaml.safe_load(done.stdout)
    assert resolved["algorithm"]["name"] == "bcoder" and resolved["stages"]["theta"]["steps"] == 10000
    assert "what each phase holds at once" in done.stdout and "8 GPUs" in done.stdout
    bad = subprocess.run(run + ["--config", "ci_tiny", "--dry-run", "--stages.theta.lrr", "1"],
                         capture_output=True, text=True)
    assert bad.returncode == 2 and "stages.theta.lrr" in bad.stderr
