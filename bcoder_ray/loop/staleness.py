"""The driver's side of staleness: a stage's rows bounded to the algorithm's window (`algorithm.min_staleness`,
`algorithm.max_staleness`), and the lags the learners read written to TensorBoard and the trackers.

    plan = bounded(plan, cfg.algorithm, state.policy_version)     # the window as buffer filters
    stage = human_rows_while_none_is_old_enough(plan, buffer)       # a WindowedStage: (plan, human_rows_only)
    ...
    write_lags(scalar, writer, "theta", result.lags, step=it)     # staleness/theta/{mean,p50,p90,max,...}

The version order and the lag itself: `bcoder_ray.buffer.staleness`.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, NamedTuple

import numpy as np

from bcoder_ray.algorithms.base import AlgorithmConfig, StagePlan
from bcoder_ray.buffer import Filters, ReplayBuffer
from bcoder_ray.buffer.staleness import LagCounts


def bounded(plan: StagePlan, algorithm: AlgorithmConfig, current_version: str) -> StagePlan:
    """`plan` reading only generated rows within the algorithm's staleness window of `current_version` (as buffer
    filters, so every sampler honours them); unchanged without a window. The targets' rows stay whole: a later
    version's window may reach rows this one leaves out."""
    if algorithm.max_staleness is None and not algorithm.min_staleness:
        return plan
    filters = dataclasses.replace(plan.rows.filters, current_version=current_version,
                                  min_staleness=algorithm.min_staleness, max_staleness=algorithm.max_staleness)
    return dataclasses.replace(plan, rows=dataclasses.replace(plan.rows, filters=filters))


class WindowedStage(NamedTuple):
    """A stage's plan as the driver runs it, and whether its staleness window left it human rows only (the plan's
    ρ_real set to 1 for this stage alone; its record says `human_rows_only`)."""

    plan: StagePlan
    human_rows_only: bool = False


def human_rows_while_none_is_old_enough(plan: StagePlan, buffer: ReplayBuffer) -> WindowedStage:
    """(plan, False), or (plan with ρ_real = 1, True) when its ρ_real-mixed batches would need generated rows and
    its staleness window leaves none (`min_staleness` k before any row is k versions old): the stage then reads
    human rows only, as many per batch as it reads in all, rather than failing on an empty generated stream."""
    f, rho = plan.rows.filters, plan.rows.rho_real
    if not f.bounded or rho is None or rho >= 1.0 or (f.sources is not None and "generated" not in f.sources):
        return WindowedStage(plan)
    generated = dataclasses.replace(f, sources=("generated",))
    if buffer.read(columns=["source"], filters=generated).num_rows:
        return WindowedStage(plan)
    return WindowedStage(dataclasses.replace(plan, rows=dataclasses.replace(plan.rows, rho_real=1.0)), True)


def window_text(filters: Filters) -> str:
    """The staleness window in words, for the driver's log."""
    high = "∞" if filters.max_staleness is None else str(filters.max_staleness)
    return f"{filters.min_staleness}..{high} versions behind {filters.current_version}"


def write_lags(scalar: Callable[[str, float | None, int], Any], writer: Any, label: str, lags: LagCounts,
               step: int) -> None:
    """A stage's lag distribution as scalars `staleness/<label>/{mean,p50,p90,max,rows,unknown}` (through `scalar`,
    the driver's TensorBoard-and-trackers writer) and a TensorBoard histogram `staleness/<label>` (one bucket per
    lag) at `step`."""
    summary = lags.summary()
    for key, value in summary.scalars().items():
        scalar(f"staleness/{label}/{key}", value, step)
    if writer is None or not summary.rows:
        return
    values = np.array(list(summary.counts), np.float64)
    counts = np.array(list(summary.counts.values()), np.float64)
    writer.add_histogram_raw(f"staleness/{label}", min=float(values.min()), max=float(values.max()),
                             num=int(counts.sum()), sum=float(values @ counts),
                             sum_squares=float((values ** 2) @ counts),
                             bucket_limits=values + 0.5,  # integer lags: bucket (lag - 0.5, lag + 0.5]
                             bucket_counts=counts, global_step=step)
