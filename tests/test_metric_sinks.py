"""MLflow and Weights & Biases as the driver's metric sinks, up to the libraries' calls: both are optional extras
(never in [test]), so stand-in modules record what the sinks call; a missing library is a config error that
says what to install."""

from __future__ import annotations

import sys
import types

import pytest

from bcoder_ray.config import ConfigError, RunConfig
from bcoder_ray.loop.metric_sinks import MetricSinks, flatten, metric_sinks, mlflow_name


class Calls(list):
    def recorder(self, name, result=None):
        def record(*args, **kwargs):
            self.append((name, args, kwargs))
            return result
        return record


@pytest.fixture
def fake_mlflow(monkeypatch):
    calls = Calls()
    module = types.ModuleType("mlflow")
    for name in ("set_tracking_uri", "set_experiment", "log_params", "log_metrics", "end_run"):
        setattr(module, name, calls.recorder(name))
    module.start_run = calls.recorder("start_run", result=object())
    monkeypatch.setitem(sys.modules, "mlflow", module)
    return calls


@pytest.fixture
def fake_wandb(monkeypatch):
    calls = Calls()
    run = types.SimpleNamespace(define_metric=calls.recorder("define_metric"), log=calls.recorder("log"),
                                finish=calls.recorder("finish"))
    module = types.ModuleType("wandb")
    module.init = calls.recorder("init", result=run)
    monkeypatch.setitem(sys.modules, "wandb", module)
    return calls


def test_no_tracker_by_default(tmp_path):
    sinks = metric_sinks(RunConfig(), tmp_path / "r1", "abc")
    assert not sinks and sinks.sinks == []
    sinks.log("eval", {"pass@1": 0.5}, 0)  # nothing to log to
    sinks.close()


def test_mlflow_gets_one_run_its_params_and_safe_metric_names(fake_mlflow, tmp_path):
    cfg = RunConfig(mlflow_tracking_uri="file:///tmp/mlruns", mlflow_experiment="exp")
    sinks = metric_sinks(cfg, tmp_path / "r1", "abc", params={"model": {"target_len": 24, "tokens": [1, 2]}})
    sinks.log("eval", {"pass@1": 0.5, "nan": float("nan"), "none": None}, 3)
    sinks.log("theta", {"loss": 2}, 120)
    sinks.close()
    assert fake_mlflow == [
        ("set_tracking_uri", ("file:///tmp/mlruns",), {}),
        ("set_experiment", ("exp",), {}),
        ("start_run", (), {"run_name": "r1", "tags": {"bcoder.run_id": "abc"}}),
        ("log_params", ({"model.target_len": 24, "model.tokens": "[1, 2]"},), {}),
        ("log_metrics", ({"eval/pass_at_1": 0.5},), {"step": 3}),
        ("log_metrics", ({"theta/loss": 2.0},), {"step": 120}),
        ("end_run", (), {}),
    ]


def test_wandb_gets_the_run_id_and_a_step_axis_per_tag(fake_wandb, tmp_path):
    sinks = metric_sinks(RunConfig(wandb_project="proj"), tmp_path / "r1", "abc", params={"a": 1})
    sinks.log("theta", {"loss": 1.5}, 10)
    sinks.log("theta", {"loss": 1.0}, 11)
    sinks.log("eval", {"pass@1": 0.25}, 0)  # another tag's steps start again at 0
    sinks.close()
    assert fake_wandb[0] == ("init", (), {"project": "proj", "name": "r1", "id": "abc", "resume": "allow",
                                          "dir": str(tmp_path / "r1"), "config": {"a": 1}})
    assert [c for c in fake_wandb if c[0] == "define_metric"] == [
        ("define_metric", ("theta/step",), {}), ("define_metric", ("theta/*",), {"step_metric": "theta/step"}),
        ("define_metric", ("eval/step",), {}), ("define_metric", ("eval/*",), {"step_metric": "eval/step"})]
    assert [c[1][0] for c in fake_wandb if c[0] == "log"] == [
        {"theta/loss": 1.5, "theta/step": 10}, {"theta/loss": 1.0, "theta/step": 11},
        {"eval/pass@1": 0.25, "eval/step": 0}]
    assert fake_wandb[-1][0] == "finish"


@pytest.mark.parametrize("key, library", [("mlflow_tracking_uri", "mlflow"), ("wandb_project", "wandb")])
def test_a_missing_library_says_what_to_install(monkeypatch, tmp_path, key, library):
    monkeypatch.setitem(sys.modules, library, None)  # import raises ImportError
    with pytest.raises(ConfigError, match=rf"run\.{key} is set but {library} is not installed: pip install "
                                          rf"'bcoder-ray\[{library}\]'"):
        metric_sinks(RunConfig(**{key: "x"}), tmp_path / "r1", "abc")


def test_names_and_params():
    assert mlflow_name("eval/ranked_pass@10") == "eval/ranked_pass_at_10"
    assert mlflow_name("a b/c:d-e.f") == "a b/c:d-e.f"
    assert flatten({"a": {"b": {"c": None}}, "d": (1,)}) == {"a.b.c": None, "d": "(1,)"}
    logged = []

    class Sink:
        def log(self, tag, metrics, step):
            logged.append((tag, metrics, step))

        def close(self):
            logged.append("closed")

    both = MetricSinks([Sink(), Sink()])
    both.log("x", {"nan": float("nan")}, 1)  # nothing left: no call
    both.log("x", {"v": 1}, 2)
    both.close()
    assert logged == [("x", {"v": 1.0}, 2)] * 2 + ["closed"] * 2
