"""Where the driver's scalars go besides TensorBoard: MLflow and Weights & Biases, each off unless configured.

    sinks = metric_sinks(cfg.run, run_dir, run_id, params=cfg.model_dump(mode="json"))
    sinks.log("theta", {"loss": 0.41, "lr": 1e-5}, step=120)     # → theta/loss, theta/lr at step 120
    sinks.close()

The driver is the one writer (the learners send their metrics to it through `bcoder_ray.loop.stage_channel`), so the
trackers run in the driver's process: no worker needs the library, a login or network access. Both libraries are
optional extras (`pip install 'bcoder-ray[mlflow]'`, `'bcoder-ray[wandb]'`), imported only when configured.
MLflow: one run per bcoder run (named by the run folder, tagged with its id), in `run.mlflow_experiment`, at
`run.mlflow_tracking_uri` (a server or `file:///path`). W&B: one run whose id is the run's id (a `--resume`d run
continues it), in project `run.wandb_project`; each tag (stage or section) has its own step axis (`<tag>/step`),
since W&B steps must only grow and the stages' steps restart per iteration.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any, Mapping, Protocol

from bcoder_ray.config import ConfigError, RunConfig


class MetricSink(Protocol):
    def log(self, tag: str, metrics: Mapping[str, float], step: int) -> None: ...

    def close(self) -> None: ...


def _library(name: str, key: str):
    try:
        return importlib.import_module(name)
    except ImportError as err:
        raise ConfigError(f"run.{key} is set but {name} is not installed: pip install 'bcoder-ray[{name}]' (or "
                          f"unset run.{key})") from err


def mlflow_name(name: str) -> str:
    """A metric name MLflow accepts (letters, digits, `_ - . / :` and spaces): `eval/pass@1` → `eval/pass_at_1`."""
    return re.sub(r"[^\w\-./: ]", "_", name.replace("@", "_at_"))


class MLflowSink:
    """One MLflow run: `log_metrics({"<tag>/<key>": value}, step)` (names made MLflow-safe, `mlflow_name`)."""

    def __init__(self, tracking_uri: str, experiment: str, run_name: str, run_id: str,
                 params: Mapping[str, Any] | None = None):
        self.mlflow = _library("mlflow", "mlflow_tracking_uri")
        self.mlflow.set_tracking_uri(tracking_uri)
        self.mlflow.set_experiment(experiment)
        self.run = self.mlflow.start_run(run_name=run_name, tags={"bcoder.run_id": run_id})
        if params:
            self.mlflow.log_params(dict(params))

    def log(self, tag: str, metrics: Mapping[str, float], step: int) -> None:
        self.mlflow.log_metrics({mlflow_name(f"{tag}/{k}"): float(v) for k, v in metrics.items()}, step=int(step))

    def close(self) -> None:
        self.mlflow.end_run()


class WandbSink:
    """One W&B run (id = the bcoder run's id, resumed with it); each tag logs against its own `<tag>/step`."""

    def __init__(self, project: str, run_name: str, run_id: str, directory: str | Path,
                 config: Mapping[str, Any] | None = None):
        self.wandb = _library("wandb", "wandb_project")
        self.run = self.wandb.init(project=project, name=run_name, id=run_id, resume="allow", dir=str(directory),
                                   config=dict(config or {}))
        self.tags: set[str] = set()

    def log(self, tag: str, metrics: Mapping[str, float], step: int) -> None:
        if tag not in self.tags:
            self.run.define_metric(f"{tag}/step")
            self.run.define_metric(f"{tag}/*", step_metric=f"{tag}/step")
            self.tags.add(tag)
        self.run.log({**{f"{tag}/{k}": float(v) for k, v in metrics.items()}, f"{tag}/step": int(step)})

    def close(self) -> None:
        self.run.finish()


class MetricSinks:
    """Several sinks as one; NaN and None values are left out (as the TensorBoard scalars leave them out)."""

    def __init__(self, sinks: list[MetricSink] | None = None):
        self.sinks = list(sinks or [])

    def __bool__(self) -> bool:
        return bool(self.sinks)

    def log(self, tag: str, metrics: Mapping[str, float | None], step: int) -> None:
        kept = {k: float(v) for k, v in metrics.items() if v is not None and float(v) == float(v)}
        if kept:
            for sink in self.sinks:
                sink.log(tag, kept, step)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()


def metric_sinks(run: RunConfig, run_dir: str | Path, run_id: str,
                 params: Mapping[str, Any] | None = None) -> MetricSinks:
    """The trackers `run` configures (none by default), started for the run in `run_dir`."""
    name = Path(run_dir).name
    sinks: list[MetricSink] = []
    if run.mlflow_tracking_uri:
        sinks.append(MLflowSink(run.mlflow_tracking_uri, run.mlflow_experiment, name, run_id, flatten(params or {})))
    if run.wandb_project:
        sinks.append(WandbSink(run.wandb_project, name, run_id, run_dir, params))
    return MetricSinks(sinks)


def flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config sections as dotted keys (MLflow params are flat), lists as text."""
    out: dict[str, Any] = {}
    for key, value in data.items():
        if isinstance(value, Mapping):
            out.update(flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value if isinstance(value, (str, int, float, bool)) or value is None else str(value)
    return out
