"""experiments/compare.py on a tiny comparison (ci_tiny, bcoder and bcoder_optimality, one iteration, a budget
of a few programs), in this process and one Ray instance: compare.md / compare.json / figure1.png with a row per
algorithm, the budget respected by every run, and a second invocation that reuses both run folders (no new Ray
Train run); and, without Ray, the spec and sweep parsing, the choice on validation figures, and --sweep refused
without a validation split. The warm start is trained once, under tmp."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from tests.experiment_scripts import load_experiment

BUDGET = 12


def load_compare():
    return load_experiment("compare")


def argv(out: Path, cache: Path, *extra: str) -> list[str]:
    return ["--config", "ci_tiny", "--algorithms", "bcoder", "bcoder_optimality", "--budget", str(BUDGET),
            "--out", str(out), "--probe-problems", "3", "--suite.validation_split", "null",
            "--run.iterations", "1", "--run.tensorboard", "false", "--model.warm_start.cache_dir", str(cache),
            "--suite.max_eval_problems", "3", "--stages.phi.num_workers", "0", "--stages.theta.num_workers", "0",
            *extra]  # Ray Train local mode: no worker group to start


def train_runs(run_dir: Path) -> set[str]:
    return {p.name for p in (run_dir / "train").iterdir()} if (run_dir / "train").is_dir() else set()


def test_specs_sweep_grid_and_the_choice_on_validation(tmp_path):
    compare = load_compare()
    names = ["bcoder", "bcoder_optimality"]
    spec = compare.parse_spec("hi=bcoder:--algorithm.alpha 2.0 --stages.theta.lr 1e-4", names)
    assert (spec.label, spec.name, spec.config, spec.overrides) == \
        ("hi", "bcoder", None, ["--algorithm.alpha", "2.0", "--stages.theta.lr", "1e-4"])
    assert compare.parse_spec("config=ci_tiny", names).config == "ci_tiny"
    with pytest.raises(compare.ConfigError, match="neither a registered algorithm"):
        compare.parse_spec("nope", names)
    sweeps = compare.parse_sweeps(["stages.theta.lr=1e-4,3e-4", "hi:algorithm.alpha=1,2"])
    assert compare.grid_for("bcoder", sweeps) == [{"stages.theta.lr": "1e-4"}, {"stages.theta.lr": "3e-4"}]
    assert len(compare.grid_for("hi", sweeps)) == 4
    grid = compare.grid_for("bcoder", sweeps)
    results = [{"label": "bcoder", "setting": g, "seed": s,
                "validation": {"iteration": 1, "is_last_iteration": True, "pass@1": v, "ranked_pass@1": None}}
               for g, vals in zip(grid, ([0.1, 0.3], [0.2, 0.1])) for s, v in enumerate(vals)]
    chosen, rows = compare.choose("bcoder", grid, results, "pass")
    assert chosen == {"stages.theta.lr": "1e-4"} and rows[0]["validation"]["mean"] == pytest.approx(0.2)
    assert compare.choose("bcoder", grid, results, "ranked_pass")[0] == chosen  # falls back to pass@1
    # no validation split: no validation figures exist, so a sweep is refused before any run starts
    assert compare.main(argv(tmp_path / "cmp", tmp_path / "ws", "--sweep", "stages.theta.lr=1e-3,3e-3")) == 2
    assert not (tmp_path / "cmp").exists()


@pytest.mark.slow  # a few minutes on 2 busy cores: Ray start, a warm start, two runs
def test_compare_writes_a_row_per_algorithm_respects_the_budget_and_reuses_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    compare = load_compare()
    out, cache = tmp_path / "cmp", tmp_path / "warm_start"

    assert compare.main(argv(out, cache)) == 0
    md, report = (out / "compare.md").read_text(), json.loads((out / "compare.json").read_text())
    assert (out / "figure1.png").stat().st_size > 0
    assert [a["label"] for a in report["algorithms"]] == ["bcoder", "bcoder_optimality"]
    assert "| bcoder |" in md and "| bcoder_optimality |" in md and "No validation figures exist" in md
    assert report["no_validation"] and not report["reused"]
    for r in report["runs"]:
        assert r["status"] == "ran" and 0 < r["programs_sampled"] <= BUDGET and r["budget_respected"]
        assert r["test"]["pass@1"] is not None and r["probe"][0]["programs"] == 0 and len(r["probe"]) == 2
        assert json.loads((Path(r["run_dir"]) / "provenance.json").read_text())["packages"]["ray"]
    assert report["algorithms"][1]["paired"]["0"]["vs_bcoder"]["n_problems"] == 3
    assert report["provenance"]["cpu_count"] and "commit" in report["provenance"]
    before = {r["run_dir"]: (train_runs(Path(r["run_dir"])), os.stat(Path(r["run_dir"]) / "state.json").st_mtime_ns)
              for r in report["runs"]}

    assert compare.main(argv(out, cache)) == 0
    again = json.loads((out / "compare.json").read_text())
    assert again["reused"] and [r["status"] for r in again["runs"]] == ["reused", "reused"]
    after = {r["run_dir"]: (train_runs(Path(r["run_dir"])), os.stat(Path(r["run_dir"]) / "state.json").st_mtime_ns)
             for r in again["runs"]}
    assert after == before
    assert [a["test_pass@1"]["mean"] for a in again["algorithms"]] == \
        [a["test_pass@1"]["mean"] for a in report["algorithms"]]


def test_validation_against_wall_time_points_reach_and_figure(tmp_path):
    """Validation points lie at the cumulative wall time of the iterations that evaluated the validation split;
    a row reaches the reference's final pass@1 at its first point at or above it; the figure is written."""
    from bcoder_ray.evaluation.plots import plot_wall_curve
    from bcoder_ray.loop.run_folder import RunState
    from bcoder_ray.loop.run_table import validation_points

    compare = load_compare()

    def ev(split: str, p: float) -> dict:
        return {"split": split, "overall": {"pass@k": {"1": p}, "pass@1_ci": {"low": p - 0.05, "high": p + 0.05}}}

    def state(walls: list[float], evals: list[dict | None]) -> RunState:
        return RunState(baseline=ev("validation", 0.30), iterations=[
            {"iteration": i, "wall_s": w, **({"eval": e} if e else {})} for i, (w, e) in enumerate(zip(walls, evals))])

    sync = validation_points(state([100.0, 50.0, 60.0], [ev("validation", 0.32), None, ev("validation", 0.40)]),
                             "validation")
    assert [(p["wall_s"], p["pass@1"]) for p in sync] == [(0.0, 0.30), (100.0, 0.32), (210.0, 0.40)]
    fast = validation_points(state([70.0, 60.0, 80.0], [ev("validation", 0.35), ev("validation", 0.41),
                                                         ev("test", 0.99)]), "validation")
    assert [(p["wall_s"], p["pass@1"]) for p in fast] == [(0.0, 0.30), (70.0, 0.35), (130.0, 0.41)]  # test skipped
    assert validation_points(state([1.0], [ev("validation", 0.5)]), None) == []

    rows = [{"label": "sync", "mode": "sync", "validation_curve": {0: sync}},
            {"label": "async", "mode": "async", "validation_curve": {0: fast}},
            {"label": "none", "mode": "async", "validation_curve": {0: []}}]
    compare.against_wall(rows)
    w = rows[1]["wall"][0]
    assert w["reference"] == "sync" and w["reference_final"] == 0.40 and w["reference_wall_s"] == 210.0
    assert w["reach_s"] == 130.0 and abs(w["reach_ratio"] - 130.0 / 210.0) < 1e-12
    assert w["at_reference_wall"] == 0.41  # its last point no later than 210 s
    assert rows[0]["wall"][0]["reach_ratio"] == 1.0 and rows[2]["wall"] is None
    rows[1]["validation_curve"][0][-1]["pass@1"] = 0.39  # never reaches 0.40
    compare.against_wall(rows)
    assert rows[1]["wall"][0]["reach_s"] is None and rows[1]["wall"][0]["reach_ratio"] is None
    assert plot_wall_curve({r["label"]: list(r["validation_curve"].values()) for r in rows},
                           tmp_path / "wall.png").stat().st_size > 0
