"""Staleness: the policy-version order, the lag of the generated rows a learner reads, the window
(`algorithm.min_staleness` / `max_staleness`) as buffer filters, and where the lags go (the stage channel,
TensorBoard, the run table). Fast: a synthetic buffer, no Ray (the learner's counting through the stage channel:
tests/test_e2e_parts.py's stage test on a tiny encoder-decoder)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pyarrow as pa
import pytest

from bcoder_ray.buffer import BufferError, Filters, ReplayBuffer
from bcoder_ray.buffer.staleness import LagCounts, PolicyVersion, allowed_versions, merged, version_name
from bcoder_ray.buffer.synthetic import synthetic_prompts, synthetic_rows

RUN = "run7"
CURRENT = version_name(RUN, 5)
# rows per version of this run (k: its k-th policy), all of them generated
PER_VERSION = {0: 3, 1: 5, 2: 2, 3: 4, 4: 6, 5: 4}
HUMAN, OTHER_RUN = 7, 3  # human rows ("human"), and generated rows of another run sharing the buffer


def rows(rng, n: int, source: str, version: str, start: int) -> pa.Table:
    t = synthetic_rows(rng, n, start=start, source=source, n_problems=20, mean_tokens=8, max_tokens=30)
    return t.set_column(t.schema.get_field_index("policy_version"), "policy_version", pa.array([version] * n))


@pytest.fixture
def buffer(tmp_path) -> ReplayBuffer:
    """One file per version (so row-group statistics tell the versions apart), human rows, another run's rows."""
    rng = np.random.default_rng(0)
    buf = ReplayBuffer(str(tmp_path / "buf"), row_group_size=4)
    buf.put_prompts(synthetic_prompts(rng, 20, mean_tokens=8, max_tokens=30))
    start = 0
    for k, n in PER_VERSION.items():
        buf.append(rows(rng, n, "generated", version_name(RUN, k), start), batch_key=f"v{k}")
        start += n
    buf.append(rows(rng, HUMAN, "human", "human", start), batch_key="human")
    buf.append(rows(rng, OTHER_RUN, "generated", version_name("other", 5), start + HUMAN), batch_key="other")
    return buf


def read_versions(buf: ReplayBuffer, filters: Filters) -> list[str]:
    return sorted(buf.read(columns=["policy_version"], filters=filters)["policy_version"].to_pylist())


def expected_versions(lags: range) -> list[str]:
    return sorted([version_name(RUN, 5 - lag) for lag in lags if 5 - lag in PER_VERSION
                   for _ in range(PER_VERSION[5 - lag])] + ["human"] * HUMAN)


# ------------------------------------------------------------------------------------ versions and lags


def test_versions_are_ordered_by_their_integer_within_a_run():
    assert PolicyVersion.parse("ab-1/12") == PolicyVersion("ab-1", 12)
    assert PolicyVersion.parse(version_name("ab", 3)).name == "ab/3"
    assert PolicyVersion.parse("7") == PolicyVersion("", 7)  # a run id may be empty
    for no_version in ("human", "", None, "v3", "ab/", "ab/x1", "ab/٣"):
        assert PolicyVersion.parse(no_version) is None, no_version
    now = PolicyVersion("ab", 10)
    assert now.lag_of("ab/2") == 8 and now.lag_of("ab/10") == 0 and now.lag_of("ab/11") == -1
    assert now.lag_of("cd/2") is None and now.lag_of("human") is None  # another run's; no policy's
    assert PolicyVersion("ab", 9) < PolicyVersion("ab", 10)  # not by the text ("ab/9" > "ab/10")


def test_allowed_versions_are_the_window_counted_back_from_the_current_one():
    assert allowed_versions(CURRENT) == tuple(f"{RUN}/{k}" for k in range(6))
    assert allowed_versions(CURRENT, 1, 3) == (f"{RUN}/2", f"{RUN}/3", f"{RUN}/4")
    assert allowed_versions(CURRENT, 0, 0) == (CURRENT,)
    assert allowed_versions(CURRENT, max_staleness=100) == allowed_versions(CURRENT)  # never below version 0
    assert allowed_versions(CURRENT, 6) == ()  # no version is 6 older than the 5th
    with pytest.raises(ValueError, match="'human'"):
        allowed_versions("human")


def test_lags_of_the_batches_a_reader_draws_from_a_buffer_of_several_versions(buffer):
    """One epoch of unmixed batches visits every row once, so the lags counted from the batches' own columns
    (what the learner sees) are exactly the buffer's: {5 - k: rows of version k}, the other run's unknown."""
    total = sum(PER_VERSION.values()) + HUMAN + OTHER_RUN
    batch = 2
    assert total % batch == 0
    sampler = buffer.sampler(batch, rho_real=None, extra_columns=("policy_version",), window_rows=total,
                             num_batches=total // batch)
    lags = LagCounts()
    current = PolicyVersion.parse(CURRENT)
    for table in sampler:
        lags.add(table["policy_version"].to_pylist(), table["is_human"].to_pylist(), current)
    assert lags.counts == {5 - k: n for k, n in PER_VERSION.items()}
    assert lags.unknown == OTHER_RUN  # humans are not counted at all


def test_the_summary_is_the_nearest_rank_distribution_of_the_counts():
    lags = LagCounts({0: 5, 1: 3, 2: 1, 7: 1})  # ten rows
    s = lags.summary()
    assert (s.rows, s.p50, s.p90, s.max) == (10, 0, 2, 7)  # ranks 5 and 9 of 10
    assert s.mean == pytest.approx((3 * 1 + 1 * 2 + 7) / 10, rel=1e-15)
    rng = np.random.default_rng(1)
    for n in (1, 2, 7, 70, 333):  # against numpy's inverted-CDF quantile of the rows themselves
        values = rng.integers(0, 9, n)
        s = LagCounts({int(v): int(c) for v, c in zip(*np.unique(values, return_counts=True))}).summary()
        assert s.p50 == int(np.quantile(values, 0.5, method="inverted_cdf"))
        assert s.p90 == int(np.quantile(values, 0.9, method="inverted_cdf"))
        assert s.max == values.max() and s.mean == pytest.approx(values.mean(), rel=1e-12)
    empty = LagCounts(unknown=2).summary()
    assert (empty.rows, empty.mean, empty.p50, empty.max, empty.unknown) == (0, None, None, None, 2)


def test_counts_merge_and_survive_json():
    a, b = LagCounts({0: 2, 3: 1}, unknown=1), LagCounts({3: 4}, unknown=2)
    both = a.merge(b)
    assert (both.counts, both.unknown) == ({0: 2, 3: 5}, 3) and a.counts == {0: 2, 3: 1}  # a unchanged
    data = both.to_json()
    assert data["counts"] == {"0": 2, "3": 5} and data["rows"] == 7 and data["max"] == 3
    assert LagCounts.from_json(data) == both
    assert merged([a.to_json(), None, {"skipped": True}, b.to_json()]) == both


# ------------------------------------------------------------------------------------ the window as filters


@pytest.mark.parametrize("low,high", [(0, 0), (1, 3), (2, None), (0, 10), (5, 5), (6, None)])
def test_the_window_reads_exactly_the_generated_rows_of_its_lags_and_every_human_row(buffer, low, high):
    f = Filters(current_version=CURRENT, min_staleness=low, max_staleness=high)
    lags = range(low, (high if high is not None else 99) + 1)
    assert read_versions(buffer, f) == expected_versions(lags)  # the dataset expression (pushdown)
    every = buffer.read()  # the in-memory mask over every row
    mask = f.mask(every)
    assert sorted(every.filter(mask)["policy_version"].to_pylist()) == expected_versions(lags)


def test_no_window_reads_every_row_and_the_other_runs_too(buffer):
    f = Filters(current_version=CURRENT)  # told the version, no bound
    assert not f.bounded and f.generated_versions() is None and f.expression() is None
    assert buffer.read(columns=["sample_id"], filters=f).num_rows == sum(PER_VERSION.values()) + HUMAN + OTHER_RUN


def test_the_sampler_honours_the_window_in_both_streams_and_prunes_row_groups(buffer):
    f = Filters(current_version=CURRENT, min_staleness=1, max_staleness=2)  # versions 3 and 4
    eligible = PER_VERSION[3] + PER_VERSION[4]
    sampler = buffer.sampler(2, rho_real=0.5, filters=f, extra_columns=("policy_version",), num_batches=eligible)
    seen = [v for t in sampler for v in t["policy_version"].to_pylist()]
    assert set(seen) == {"human", f"{RUN}/3", f"{RUN}/4"}
    # the statistics of a one-version row group rule it out before it is read
    assert not f.row_group_may_match({"policy_version": (f"{RUN}/0", f"{RUN}/0")}, source="generated")
    assert f.row_group_may_match({"policy_version": (f"{RUN}/3", f"{RUN}/3")}, source="generated")
    assert f.row_group_may_match({"policy_version": (f"{RUN}/0", f"{RUN}/4")}, source="generated")  # mixed
    assert f.row_group_may_match({"policy_version": ("human", "human")}, source="human")  # humans always pass
    assert f.row_group_may_match({"policy_version": (f"{RUN}/0", f"{RUN}/0")})  # may hold human rows
    assert not f.row_group_may_match({"policy_version": (f"{RUN}/0", f"{RUN}/0"),
                                      "source": ("generated", "generated")})


def test_a_window_no_generated_row_fits_empties_the_generated_stream(buffer):
    f = Filters(current_version=CURRENT, min_staleness=6)
    with pytest.raises(BufferError, match="no generated rows match"):
        buffer.sampler(4, rho_real=0.5, filters=f).next_batch()
    assert buffer.sampler(4, rho_real=1.0, filters=f).next_batch().num_rows == 4  # human rows still read


def test_window_filters_refuse_what_cannot_be_counted():
    with pytest.raises(ValueError, match="need current_version"):
        Filters(max_staleness=2)
    with pytest.raises(ValueError, match="min_staleness 3 > max_staleness 1"):
        Filters(current_version=CURRENT, min_staleness=3, max_staleness=1)
    with pytest.raises(ValueError, match=">= 0"):
        Filters(current_version=CURRENT, min_staleness=-1)
    with pytest.raises(ValueError, match="'human'"):
        Filters(current_version="human", min_staleness=1)
    assert Filters.coerce({"current_version": CURRENT, "max_staleness": 1}).generated_versions() == \
        (f"{RUN}/4", CURRENT)


# ------------------------------------------------------------------------------------ the driver's side


def test_a_stage_plan_is_bounded_by_the_algorithm_config_and_falls_back_to_human_rows(buffer):
    from bcoder_ray.algorithms.base import Rows, StagePlan
    from bcoder_ray.algorithms.registry import parse_algorithm_config
    from bcoder_ray.loop.staleness import bounded, human_rows_while_none_is_old_enough

    plan = StagePlan("theta", Rows(rho_real=0.5, filters=Filters(suites=("apps",))))
    unbounded = parse_algorithm_config({"name": "bcoder"})
    assert unbounded.max_staleness is None and unbounded.min_staleness == 0  # B-Coder: any row, by default
    assert bounded(plan, unbounded, CURRENT) is plan
    old = bounded(plan, parse_algorithm_config({"name": "bcoder", "min_staleness": 4}), CURRENT)
    assert old.rows.filters == Filters(suites=("apps",), current_version=CURRENT, min_staleness=4)
    assert human_rows_while_none_is_old_enough(old, buffer) == (old, False)  # versions 0 and 1 are old enough
    too_old = bounded(plan, parse_algorithm_config({"name": "bcoder", "min_staleness": 6}), CURRENT)
    fallback, human_only = human_rows_while_none_is_old_enough(too_old, buffer)
    assert human_only and fallback.rows.rho_real == 1.0
    assert fallback == dataclasses.replace(too_old, rows=dataclasses.replace(too_old.rows, rho_real=1.0))


def test_the_driver_records_human_rows_only_from_the_stage_it_ran_not_from_an_earlier_iteration(buffer, tmp_path):
    """The flag travels with the stage `pending_stages` yields to `stage_done` (the async loop takes the same
    path): a stage that fell back says so, and the same label in a later iteration with old enough rows does not."""
    from bcoder_ray.algorithms.base import Rows, StagePlan
    from bcoder_ray.config import load_config
    from bcoder_ray.loop.driver import Run
    from bcoder_ray.loop.run_folder import RunState

    class OneStage:  # the algorithm interface's driver side, one θ stage mixing human and generated rows
        def plan_iteration(self, it, state, version):
            return [StagePlan("theta", Rows(rho_real=0.5, filters=Filters(suites=("apps",))))]

        def prepare_stage(self, plan, state):
            return plan

        def after_stage(self, plan, checkpoint, it, state):
            state["theta"] = checkpoint

    run = Run.__new__(Run)                                               # the driver's records only: no Ray
    run.run_dir, run.buffer, run.algorithm = tmp_path, buffer, OneStage()
    run.tokenizer_hash = "synthetic-tok"
    run.state = RunState(policy_version=CURRENT)
    records = []
    for it, min_staleness in enumerate((6, 4)):  # lag 6: no row of RUN yet (its oldest is 5 behind); lag 4: some
        run.cfg = load_config("ci_tiny", ["--algorithm.min_staleness", str(min_staleness)], check_paths=False)
        run.state.in_progress = {"iteration": it, "algorithm": {}, "stages": {}, "running": {}}
        [stage] = run.pending_stages(it, run.state.in_progress)
        assert stage.plan.rows.rho_real == (1.0 if min_staleness == 6 else 0.5)
        run.stage_done(stage, it, f"ckpt{it}", {"wall_s": 1.0})
        records.append(run.state.in_progress["stages"]["theta"])
    assert records == [{"checkpoint": "ckpt0", "human_rows_only": True, "wall_s": 1.0},
                       {"checkpoint": "ckpt1", "wall_s": 1.0}]
    assert RunState.load(tmp_path).in_progress["stages"]["theta"] == records[1]  # saved for a resume


def test_config_refuses_an_empty_window_and_a_window_for_an_on_policy_algorithm():
    from bcoder_ray.config import ConfigError, load_config

    cfg = load_config("ci_tiny", ["--algorithm.min_staleness", "2", "--algorithm.max_staleness", "4"])
    assert (cfg.algorithm.min_staleness, cfg.algorithm.max_staleness) == (2, 4)
    with pytest.raises(ConfigError, match="algorithm: min_staleness 3 > max_staleness 1"):
        load_config("ci_tiny", ["--algorithm.min_staleness", "3", "--algorithm.max_staleness", "1"])
    with pytest.raises(ConfigError, match="algorithm.max_staleness"):
        load_config("ci_tiny", ["--algorithm.max_staleness", "-1"])
    for name in ("ppo", "grpo"):
        with pytest.raises(ConfigError, match=f"'{name}' is on-policy"):
            load_config("ci_tiny", ["--algorithm.name", name, "--algorithm.max_staleness", "2"])
        assert load_config("ci_tiny", ["--algorithm.name", name]).algorithm.max_staleness is None


def test_lags_go_to_tensorboard_the_trackers_and_the_run_table(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from torch.utils.tensorboard import SummaryWriter

    from bcoder_ray.config import load_config
    from bcoder_ray.loop.run_folder import RunState
    from bcoder_ray.loop.run_table import final_table
    from bcoder_ray.loop.staleness import write_lags

    lags = LagCounts({0: 6, 1: 3, 2: 1}, unknown=1)
    logged = []
    with SummaryWriter(str(tmp_path / "tb")) as writer:
        write_lags(lambda tag, value, step: logged.append((tag, value, step)), writer, "theta", lags, step=3)
    assert ("staleness/theta/mean", pytest.approx(0.5, rel=1e-15), 3) in logged
    assert {t: v for t, v, _ in logged} == {"staleness/theta/mean": 0.5, "staleness/theta/p50": 0.0,
                                            "staleness/theta/p90": 1.0, "staleness/theta/max": 2.0,
                                            "staleness/theta/rows": 10.0, "staleness/theta/unknown": 1.0}
    events = EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    (hist,) = events.Histograms("staleness/theta")
    assert hist.step == 3 and hist.histogram_value.num == 10
    assert list(hist.histogram_value.bucket) == [6, 3, 1] and hist.histogram_value.max == 2

    state = RunState(run_id=RUN, iterations=[{
        "iteration": 0, "rollout": {"pass_rate": 0.25}, "programs_sampled_total": 8, "programs_executed_total": 8,
        "stages": {"phi": {"staleness": LagCounts({0: 4}).to_json()}, "theta": {"staleness": lags.to_json()}}}])
    table = final_table(state, load_config("ci_tiny"))
    assert "lag read (mean / p90 / max)" in table
    row = next(line for line in table.splitlines() if line.startswith("| 0 |"))
    assert row.endswith("| 0.36 / 1 / 2 |")  # both stages: 14 rows, lags summing to 5; rank 13 of 14 is lag 1
