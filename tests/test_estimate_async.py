"""experiments/estimate_async.py: the per-round arithmetic against hand-computed cases, and the phase costs read
back from a run folder written by the loop's own writers (no Ray, no model)."""

from __future__ import annotations


import pytest

from bcoder_ray.loop.run_folder import METRICS_FILE, RunState, write_metrics_lines
from bcoder_ray.loop.run_table import busy_record
from tests.experiment_scripts import load_experiment

# a handful of additions and divisions of numbers near 100: a few ulps
REL = 1e-12


def load_estimate():
    return load_experiment("estimate_async")


est = load_estimate()


def costs(**seconds: float):
    return est.RoundCosts({p: est.Figure(seconds.get(p, 0.0), "test") for p in est.PHASES})


def node(gpus: int, rollout_eff: float = 1.0, learner_eff: float = 1.0, switch_s: float = 0.0, **speedup: float):
    return est.Node(gpus, rollout_eff, learner_eff, {p: est.Figure(speedup.get(p, 1.0), "test") for p in est.PHASES},
                    switch_s)


def test_equal_phases_perfect_scaling_even_split():
    # rollout 100 s and learning 100 s, 2 GPUs, linear scaling: async at 1 + 1 takes max(100, 100) = 100 s; sync
    # on that split 100 + 100 = 200 s (2×); sync with both GPUs on each phase in turn 50 + 50 = 100 s (1×)
    s = est.split(costs(rollout=100, learner=100), node(2), 1)
    assert (s.actors_s, s.learner_s, s.async_s) == pytest.approx((100, 100, 100), rel=REL)
    assert s.sync_split_s == pytest.approx(200, rel=REL)
    assert s.sync_all_s == pytest.approx(100, rel=REL)
    assert s.gain_vs_split == pytest.approx(2.0, rel=REL)
    assert s.gain_vs_all == pytest.approx(1.0, rel=REL)
    assert (s.actors_busy, s.learner_busy) == pytest.approx((1.0, 1.0), rel=REL)


def test_imperfect_learner_scaling_best_split_and_switch_cost():
    # 4 GPUs, rollout scales linearly, each learner GPU beyond the first adds half a GPU:
    # sync on all: 100/4 + 100/(1 + 0.5·3) = 25 + 40 = 65 s
    # async: g_r=1: max(100, 100/2) = 100; g_r=2: max(50, 100/1.5) = 66.67; g_r=3: max(33.3, 100) = 100
    c = costs(rollout=60, evaluation=30, other=10, targets=30, learner=70)  # sides of 100 s each
    rows = est.splits(c, node(4, learner_eff=0.5))
    assert [r.async_s for r in rows] == pytest.approx([100, 100 / 1.5, 100], rel=REL)
    b = est.best(rows)
    assert b.rollout_gpus == 2
    assert b.sync_all_s == pytest.approx(65, rel=REL)
    assert b.gain_vs_all == pytest.approx(65 / (100 / 1.5), rel=REL)  # 0.975: async loses here
    assert b.actors_busy == pytest.approx(50 / (100 / 1.5), rel=REL)
    # 5 s a round to move the GPUs between roles tips it: 70 / 66.67 = 1.05
    assert est.best(est.splits(c, node(4, learner_eff=0.5, switch_s=5))).gain_vs_all == pytest.approx(
        70 / (100 / 1.5), rel=REL)


def test_speedup_factors_divide_each_phase():
    # one GPU 4× the measured machine on rollout, 2× on learning: 80/4 = 20 s against 80/2 = 40 s
    s = est.split(costs(rollout=80, learner=80), node(2, rollout=4, learner=2), 1)
    assert (s.actors_s, s.learner_s, s.async_s) == pytest.approx((20, 40, 40), rel=REL)
    assert s.sync_all_s == pytest.approx(80 / 8 + 80 / 4, rel=REL)


def test_bad_splits_are_refused():
    with pytest.raises(ValueError, match="--rollout-gpus 4"):
        est.split(costs(rollout=1), node(4), 4)
    with pytest.raises(ValueError, match="at least 2 GPUs"):
        est.splits(costs(rollout=1), node(1))


def sync_record(it: int, rollout_s: float, stages: dict[str, tuple[float, float | None]], eval_s: float | None,
                rest_s: float) -> dict:
    """An iteration record as `bcoder_ray.loop.driver.Run.iteration` assembles it (the keys the estimate reads)."""
    stage_records = {}
    for label, (wall, targets) in stages.items():
        stage_records[label] = {"checkpoint": f"/x/{label}", "wall_s": wall, "targets_filled": 4, "step": 3,
                                **({} if targets is None else {"targets_s": targets})}
    wall = rollout_s + sum(w + (t or 0.0) for w, t in stages.values()) + (eval_s or 0.0) + rest_s
    record = {"iteration": it, "rollout": {"programs": 8, "passed": 1, "wall_s": rollout_s, "tasks_wall_s": rollout_s,
                                           "pass_rate": 0.125},
              "stages": stage_records}
    if eval_s is not None:
        record["eval"] = {"label": f"iter{it}", "wall_s": eval_s, "overall": {}}
    record["busy"] = busy_record(wall, rollout_s + (eval_s or 0.0), 1, sum(w for w, _ in stages.values()), 8,
                                 6.0)
    record["wall_s"] = wall
    return record


def test_reads_a_sync_run_folder(tmp_path):
    assert est.METRICS_FILE == METRICS_FILE
    state = RunState(iterations=[
        sync_record(0, 100.0, {"phi": (20.0, 10.0), "theta": (30.0, 15.0)}, 40.0, 2.0),
        sync_record(1, 120.0, {"phi": (22.0, 12.0), "theta": (34.0, 11.0)}, None, 4.0)])
    write_metrics_lines(tmp_path, state)
    c = est.read_run(tmp_path)
    got = {p: f.value for p, f in c.phases.items()}
    assert got == pytest.approx({"rollout": 110.0, "learner": 53.0, "targets": 24.0, "evaluation": 20.0,
                                 "other": 3.0}, rel=REL)
    assert "targets_s" in c.phases["targets"].source and str(tmp_path) in c.phases["rollout"].source
    assert (c.programs.value, c.steps.value) == (8, 6)
    assert "actors busy" in c.measured_busy


def test_older_records_put_targets_in_the_remainder(tmp_path):
    write_metrics_lines(tmp_path, RunState(iterations=[
        sync_record(0, 100.0, {"phi": (20.0, None), "theta": (30.0, None)}, 40.0, 25.0)]))
    c = est.read_run(tmp_path)
    assert c.phases["targets"].value == pytest.approx(25.0, rel=REL)
    assert c.phases["other"].value == 0.0
    assert "no targets_s" in c.phases["targets"].source


def test_async_records_are_refused_with_the_line(tmp_path):
    record = {"iteration": 0, "rollout": {"programs": 8, "tasks": 2}, "stages": {},
              "busy": busy_record(50.0, 40.0, 1, 45.0, 8, 6.0), "wall_s": 50.0}
    write_metrics_lines(tmp_path, RunState(iterations=[record]))
    with pytest.raises(ValueError, match=r"metrics.jsonl:1: an async round .*actors busy 0.80, learner busy 0.90"):
        est.read_run(tmp_path)


def test_main_from_flags_and_from_a_folder(tmp_path, capsys):
    assert est.main(["--rollout-s", "100", "--learner-s", "100", "--targets-s", "0", "--eval-s", "0",
                     "--gpus", "2", "--learner-efficiency", "1"]) == 0
    out = capsys.readouterr().out
    assert "1 rollout GPUs + 1 learner GPUs: async 100.0 s a round against sync 100.0 s on all GPUs (gain 1.00×) " \
           "and 200.0 s on the same split (gain 2.00×)" in out
    assert "learner (DDP) scaling efficiency 1 (flag)" in out
    assert "when changing roles costs sync 0.0 s a round" in out
    # the 4-GPU case above: async 66.67 s against sync 65 s, so sync must pay 1.67 s a round to change roles
    assert est.main(["--rollout-s", "60", "--eval-s", "30", "--other-s", "10", "--targets-s", "30", "--learner-s",
                     "70", "--gpus", "4", "--learner-efficiency", "0.5"]) == 0
    assert "when changing roles costs sync 1.7 s a round" in capsys.readouterr().out
    write_metrics_lines(tmp_path, RunState(iterations=[
        sync_record(0, 100.0, {"theta": (50.0, 10.0)}, 40.0, 0.0)]))
    assert est.main(["--run-dir", str(tmp_path), "--eval-s", "0"]) == 0
    out = capsys.readouterr().out
    assert "| evaluation | actors (rollout GPUs) | 0.0 | 1 (default) | flag |" in out
    assert est.main(["--rollout-s", "1"]) == 2
    assert "no cost for ['evaluation', 'targets', 'learner']" in capsys.readouterr().err
