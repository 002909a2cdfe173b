"""The paper's figures as PNG files (matplotlib, Agg backend: no display needed).

- Figure 1, `plot_training_curve`: pass rate on the training problems per iteration, one line per run
  (algorithm or ablation), with a shaded confidence band where the points carry one; `training_curve_from_run`
  reads the points from a run folder of `experiments/run.py`.
- Figure 3, `plot_rtilde_density`: the density of R̃ by true outcome (passed, failed, runtime error, compile
  error), from saved candidates; the title states whether mean R̃ orders them as the paper expects.
- Figure 5, `plot_ranking_gain`: the pass@k gained by ranking with R̃ against the number m of candidates.
- Figure 1 at an equal budget, `plot_budget_curve`: the probe pass rate against programs sampled, one line per
  algorithm (`experiments/compare.py`).
- Validation against wall time, `plot_wall_curve`: validation pass@1 against the run's wall time, one line per
  algorithm and seed (`experiments/compare.py`: sync against async mode).

Each function takes data (or a candidates file) and a path, writes the PNG and returns the path.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # before pyplot: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402
import numpy as np  # noqa: E402

from bcoder_ray.evaluation.metrics import (CandidateRecord, as_candidate_records, ranking_gain,  # noqa: E402
                                rtilde_outcome_order)
from envs.jsonl import iter_jsonl  # noqa: E402
from envs.result import OUTCOMES  # noqa: E402

OUTCOME_COLOURS = {"passed": "tab:green", "failed": "tab:orange", "runtime_error": "tab:red",
                   "compile_error": "tab:gray"}


def _save(fig: plt.Figure, path: str | os.PathLike) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, format="png", dpi=120)
    plt.close(fig)
    return path


def curve_points(metrics_per_iteration: Iterable[Mapping], variant: str = "pass", k: int = 1,
                 group: str = "overall") -> list[dict]:
    """Figure 1 points from metrics dicts that carry an "iteration" key (as the run loop's evaluation writes
    them): [{"iteration", "value", "low", "high"}] sorted by iteration, values in percent."""
    points = []
    for m in metrics_per_iteration:
        if "iteration" not in m:
            raise ValueError(f"metrics of {m.get('label') or m.get('model')!r} have no 'iteration' key")
        g = m[group] if group == "overall" else m["by_difficulty"].get(group) or m["by_suite"].get(group)
        if g is None or g.get(f"{variant}@k", {}).get(str(k)) is None:
            continue
        point = {"iteration": int(m["iteration"]), "value": 100.0 * g[f"{variant}@k"][str(k)]}
        ci = g.get(f"{variant}@1_ci") if k == 1 else None
        if ci:
            point.update(low=100.0 * ci["low"], high=100.0 * ci["high"])
        points.append(point)
    return sorted(points, key=lambda p: p["iteration"])


def training_curve_from_run(run_dir: str | os.PathLike, source: str = "rollout") -> list[dict]:
    """Figure 1 points of one run folder, from its `metrics.jsonl` (one JSON line per completed iteration, written
    by `experiments/run.py`): `source="rollout"` gives the pass rate of the programs sampled on the training
    problems in that iteration (passed / programs, in percent); `source="eval"` the held-out pass@1 with its
    interval."""
    path = Path(run_dir) / "metrics.jsonl"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file (is {run_dir} a run folder of experiments/run.py?)")
    points = []
    for where, rec in iter_jsonl(path):
        if "iteration" not in rec:
            raise ValueError(f"{where}: no 'iteration'")
        if source == "rollout":
            roll = rec.get("rollout") or {}
            if "passed" in roll and roll.get("programs"):
                points.append({"iteration": int(rec["iteration"]), "value": 100.0 * roll["passed"] / roll["programs"]})
            elif "pass_rate" in roll:
                points.append({"iteration": int(rec["iteration"]), "value": 100.0 * roll["pass_rate"]})
            else:
                raise ValueError(f"{where}: no rollout pass rate")
        elif source == "eval":
            overall = (rec.get("eval") or {}).get("overall")
            if overall:
                points += curve_points([{"iteration": rec["iteration"], "overall": overall}])
        else:
            raise ValueError(f"training_curve_from_run: source must be 'rollout' or 'eval', got {source!r}")
    return sorted(points, key=lambda p: p["iteration"])


def plot_training_curve(runs: Mapping[str, Sequence[Mapping]], path: str | os.PathLike,
                        ylabel: str = "pass rate on training problems (%)",
                        title: str = "Training curve (Figure 1)") -> Path:
    """One line per run; each point {"iteration", "value"[, "low", "high"]} (e.g. from `curve_points`)."""
    if not runs:
        raise ValueError("plot_training_curve: no runs given")
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in runs.items():
        pts = sorted(points, key=lambda p: p["iteration"])
        if not pts:
            raise ValueError(f"plot_training_curve: run {label!r} has no points")
        x = [p["iteration"] for p in pts]
        (line,) = ax.plot(x, [p["value"] for p in pts], marker="o", label=label)
        if all("low" in p and "high" in p for p in pts):
            ax.fill_between(x, [p["low"] for p in pts], [p["high"] for p in pts], color=line.get_color(),
                            alpha=0.15, linewidth=0)
    ax.set_xlabel("iteration")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def _gaussian_kde(values: np.ndarray, grid: np.ndarray) -> np.ndarray:
    """Gaussian kernel density with Scott's bandwidth n^(-1/5)·std (a floor keeps constant samples visible)."""
    std = float(values.std(ddof=1)) if values.size > 1 else 0.0
    span = float(grid[-1] - grid[0]) or 1.0
    bandwidth = max(std * values.size ** (-1 / 5), span / 100)
    z = (grid[:, None] - values[None, :]) / bandwidth
    return np.exp(-0.5 * z ** 2).sum(axis=1) / (values.size * bandwidth * np.sqrt(2 * np.pi))


def plot_rtilde_density(source: str | os.PathLike | Iterable[CandidateRecord | Mapping],
                        path: str | os.PathLike, title: str = "R̃ by outcome (Figure 3)") -> Path:
    """Density of R̃ per true outcome, with each outcome's mean as a dashed line; needs candidates with R̃."""
    records = [r for r in as_candidate_records(source) if r.rtilde is not None]
    if not records:
        raise ValueError("plot_rtilde_density: no candidate has an rtilde")
    order = rtilde_outcome_order(records)
    all_values = np.array([r.rtilde for r in records])
    lo, hi = float(all_values.min()), float(all_values.max())
    pad = 0.1 * (hi - lo) or 1.0
    grid = np.linspace(lo - pad, hi + pad, 400)
    fig, ax = plt.subplots(figsize=(6, 4))
    for outcome in OUTCOMES:
        values = np.array([r.rtilde for r in records if r.outcome == outcome])
        if values.size == 0:
            continue
        colour = OUTCOME_COLOURS[outcome]
        ax.plot(grid, _gaussian_kde(values, grid), color=colour, label=f"{outcome} (n={values.size})")
        ax.axvline(float(values.mean()), color=colour, linestyle="--", linewidth=1)
    verdict = {True: "mean order as expected", False: "mean order NOT as expected", None: "order not checkable"}
    ax.set_title(f"{title}\n{verdict[order['holds']]}", fontsize=10)
    ax.set_xlabel("R̃ (eq. 19–20)")
    ax.set_ylabel("density")
    ax.legend(fontsize=8)
    return _save(fig, path)


def plot_ranking_gain(source: str | os.PathLike | Iterable[CandidateRecord | Mapping] | Mapping,
                      path: str | os.PathLike, ks: Sequence[int] = (1, 5), ms: Sequence[int] | None = None,
                      filtered: bool = False, title: str = "Ranking gain against m (Figure 5)") -> Path:
    """Ranked minus plain pass@k (percentage points) against m; `source` is candidates or a `ranking_gain`
    result."""
    gain = source if isinstance(source, Mapping) and "gain" in source else ranking_gain(source, ks, ms, filtered)
    fig, ax = plt.subplots(figsize=(6, 4))
    for k, values in gain["gain"].items():
        pts = [(m, 100.0 * v) for m, v in zip(gain["ms"], values) if v is not None]
        if pts:
            ax.plot([m for m, _ in pts], [v for _, v in pts], marker="o", label=f"pass@{k}")
    ax.axhline(0.0, color="black", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ax.set_xlabel("m (candidates per problem)")
    ax.set_ylabel("ranked − plain pass@k (points)")
    ax.set_title(title + (" (filtered)" if gain.get("filtered") else ""))
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_budget_curve(runs: Mapping[str, Sequence[Sequence[Mapping]]], path: str | os.PathLike,
                      ylabel: str = "probe pass rate on training problems (%)",
                      title: str = "Pass rate against programs sampled (Figure 1)") -> Path:
    """One line per algorithm: points {"programs", "pass_rate"} (pass rate in [0, 1], programs sampled so far;
    the warm start at 0), one list per seed; with several seeds the line is their mean at each point index and
    the band ± one standard deviation."""
    if not runs:
        raise ValueError("plot_budget_curve: no runs given")
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, seeds in runs.items():
        seeds = [sorted(s, key=lambda p: p["programs"]) for s in seeds if s]
        if not seeds:
            continue
        n = min(len(s) for s in seeds)
        x = np.array([[s[i]["programs"] for i in range(n)] for s in seeds], dtype=float).mean(axis=0)
        y = 100.0 * np.array([[s[i]["pass_rate"] for i in range(n)] for s in seeds], dtype=float)
        (line,) = ax.plot(x, y.mean(axis=0), marker="o", label=label if len(seeds) == 1 else
                          f"{label} ({len(seeds)} seeds)")
        if len(seeds) > 1:
            sd = y.std(axis=0, ddof=1)
            ax.fill_between(x, y.mean(axis=0) - sd, y.mean(axis=0) + sd, color=line.get_color(), alpha=0.15,
                            linewidth=0)
    ax.set_xlabel("programs sampled for training (cumulative)")
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)


def plot_wall_curve(runs: Mapping[str, Sequence[Sequence[Mapping]]], path: str | os.PathLike,
                    title: str = "Validation pass@1 against wall time") -> Path:
    """One line per algorithm and seed: points {"wall_s", "pass@1", "low", "high"} (`run_table.validation_points`),
    the intervals as error bars. Seeds are not averaged: their evaluations fall at different times."""
    if not runs:
        raise ValueError("plot_wall_curve: no runs given")
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, seeds in runs.items():
        colour = None
        for i, pts in enumerate(s for s in seeds if s):
            pts = sorted(pts, key=lambda p: p["wall_s"])
            x = np.array([p["wall_s"] for p in pts], dtype=float)
            y = 100.0 * np.array([p["pass@1"] for p in pts], dtype=float)
            has_ci = all(p.get("low") is not None and p.get("high") is not None for p in pts)
            err = (np.array([[100.0 * p["pass@1"] - 100.0 * p["low"] for p in pts],
                             [100.0 * p["high"] - 100.0 * p["pass@1"] for p in pts]]) if has_ci else None)
            bars = ax.errorbar(x, y, yerr=err, marker="o", capsize=3, color=colour,
                               label=label if i == 0 else None, alpha=1.0 if i == 0 else 0.6)
            colour = bars.lines[0].get_color()
    ax.set_xlabel("wall time of the iterations (s)")
    ax.set_ylabel("validation pass@1 (%)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    return _save(fig, path)
