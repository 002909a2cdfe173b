"""What `run.mode: async` would gain on a GPU node, estimated from per-phase costs measured elsewhere (arithmetic on
measured inputs: no Ray, no model, under a second).

    python experiments/estimate_async.py --run-dir /tmp/runs/smol1            # a sync run's records
    python experiments/estimate_async.py --rollout-s 414 --targets-s 719 --learner-s 651 --eval-s 555
    python experiments/estimate_async.py --run-dir RUN --gpus 8 --speedup-rollout 40 --speedup-learner 120

A round is one sync iteration's work: its rollout (programs sampled and executed), its cached targets, its stages'
optimiser steps and its share of evaluations. Each phase's cost is the measured seconds of that work on the
machine that ran it, every phase there having had the whole machine in turn (a sync run). On a node of G GPUs:

- a phase on g GPUs takes cost / (speed-up factor of one GPU over the measured machine, per phase, a flag) /
  (1 + e·(g − 1)): each GPU beyond the first adds e of one GPU's throughput, e = `--rollout-efficiency` for the
  actors' phases (rollout, evaluation, other actor tasks), `--learner-efficiency` for the learner's (targets,
  steps under DDP);
- sync, all GPUs: every phase on all G GPUs in turn, plus `--switch-s` a round (GPUs changing role);
- sync, split: g_r GPUs hold the actors and G − g_r the learners (what a sync loop that keeps both does), the
  phases in turn, each side idle while the other works;
- async, split: the actors' side (rollout, evaluation beside it, other actor tasks) on g_r GPUs and the learner's
  side (target filling, steps) on G − g_r run at once; a round takes the slower side (a steady state: the faster
  side waits or works ahead; the per-round work is the same, so the rows' policy lag is not modelled).

With both efficiencies 1 and no switch cost, async never beats sync on all GPUs: with A and L the two sides' costs,
max(A/g_r, L/(G − g_r)) ≥ (A + L)/G. Its gain over that comes from sublinear scaling (sync pays it at G GPUs, async
at fewer), from `--switch-s`, and from what this arithmetic leaves out (stragglers of a rollout batch, a learner
that waits for its last row).

Every number is printed with where it came from (a record of the run folder, a flag, or a flag's default).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path

METRICS_FILE = "metrics.jsonl"  # bcoder_ray.loop.run_folder.METRICS_FILE (a test holds them equal; importing it
#                                 would import torch and take seconds)
ACTOR_PHASES = ("rollout", "evaluation", "other")  # on the rollout GPUs in async mode
LEARNER_PHASES = ("targets", "learner")  # on the learner GPUs in async mode
PHASES = ACTOR_PHASES + LEARNER_PHASES
# The paper's stage θ: batch 128 = 16 programs per GPU × 8 GPUs (docs/bcoder.md, §4); its rollout split is not
# stated (it samples once from the pretrained LM before training).
PAPER_GPUS = 8


@dataclass(frozen=True)
class Figure:
    """A number and where it came from."""

    value: float
    source: str


@dataclass(frozen=True)
class RoundCosts:
    """Seconds of one round's work per phase on the measured machine (each phase with the whole machine)."""

    phases: dict[str, Figure]  # every name of PHASES
    programs: Figure | None = None  # programs sampled per round
    steps: Figure | None = None  # optimiser steps per round
    measured_busy: str | None = None  # the run's own busy fractions, as recorded


@dataclass(frozen=True)
class Node:
    """The GPU node and the stated assumptions about it."""

    gpus: int
    rollout_efficiency: float
    learner_efficiency: float
    speedup: dict[str, Figure]  # per phase: one GPU's speed over the measured machine
    switch_s: float = 0.0  # seconds a round that sync on all GPUs pays to move them between actors and learners


@dataclass(frozen=True)
class Split:
    """One split's per-round wall times (seconds on the node)."""

    rollout_gpus: int
    actors_s: float  # the actors' side on rollout_gpus
    learner_s: float  # the learner's side on the other GPUs
    sync_split_s: float
    async_s: float
    sync_all_s: float

    @property
    def actors_busy(self) -> float:
        return self.actors_s / self.async_s

    @property
    def learner_busy(self) -> float:
        return self.learner_s / self.async_s

    @property
    def gain_vs_all(self) -> float:
        return self.sync_all_s / self.async_s

    @property
    def gain_vs_split(self) -> float:
        return self.sync_split_s / self.async_s


# ---------------------------------------------------------------------------------------------- the arithmetic
def scaling(gpus: int, efficiency: float) -> float:
    """Throughput of `gpus` GPUs in units of one: 1 + e·(g − 1)."""
    if gpus < 1:
        raise ValueError(f"a phase needs at least one GPU (got {gpus})")
    return 1.0 + efficiency * (gpus - 1)


def side_seconds(costs: RoundCosts, node: Node, phases: tuple[str, ...], gpus: int, efficiency: float) -> float:
    return sum(costs.phases[p].value / node.speedup[p].value for p in phases) / scaling(gpus, efficiency)


def sync_all_seconds(costs: RoundCosts, node: Node) -> float:
    return (side_seconds(costs, node, ACTOR_PHASES, node.gpus, node.rollout_efficiency)
            + side_seconds(costs, node, LEARNER_PHASES, node.gpus, node.learner_efficiency) + node.switch_s)


def split(costs: RoundCosts, node: Node, rollout_gpus: int) -> Split:
    if not 1 <= rollout_gpus < node.gpus:
        raise ValueError(f"--rollout-gpus {rollout_gpus}: the split needs 1 to {node.gpus - 1} rollout GPUs "
                         f"(the rest learn) on a node of {node.gpus}")
    actors = side_seconds(costs, node, ACTOR_PHASES, rollout_gpus, node.rollout_efficiency)
    learner = side_seconds(costs, node, LEARNER_PHASES, node.gpus - rollout_gpus, node.learner_efficiency)
    return Split(rollout_gpus, actors, learner, sync_split_s=actors + learner, async_s=max(actors, learner),
                 sync_all_s=sync_all_seconds(costs, node))


def splits(costs: RoundCosts, node: Node) -> list[Split]:
    if node.gpus < 2:
        raise ValueError(f"--gpus {node.gpus}: async needs at least 2 GPUs (one for the actors, one to learn)")
    return [split(costs, node, g) for g in range(1, node.gpus)]


def best(rows: list[Split]) -> Split:
    """The split with the shortest async round (the fewest rollout GPUs on a tie)."""
    return min(rows, key=lambda s: (s.async_s, s.rollout_gpus))


# ---------------------------------------------------------------------------------------------- the inputs
def read_run(run_dir: Path) -> RoundCosts:
    """Per-round phase costs from a sync run's `metrics.jsonl` (one record per completed iteration, written by
    `bcoder_ray.loop.run_folder.write_metrics_lines`), averaged over its iterations. ValueError names the file and
    line of what cannot be used."""
    path = run_dir / METRICS_FILE
    if not path.is_file():
        raise ValueError(f"{path}: no such file (a run folder of experiments/run.py with at least one completed "
                         f"iteration)")
    records = [(n, json.loads(line)) for n, line in enumerate(path.read_text().splitlines(), 1) if line.strip()]
    if not records:
        raise ValueError(f"{path}: no completed iteration recorded")
    for n, rec in records:
        if "wall_s" not in (rec.get("rollout") or {}):
            busy = rec.get("busy") or {}
            raise ValueError(
                f"{path}:{n}: an async round (its rollout has no wall time: the actors and the learner shared the "
                f"machine, actors busy {busy.get('actors_busy', float('nan')):.2f}, learner busy "
                f"{busy.get('learner_busy', float('nan')):.2f}), so it holds no per-phase cost with the whole "
                f"machine; give a sync run's folder or every phase as a flag (--rollout-s ...)")
    k = len(records)
    mean = f"mean over {k} iteration{'s' if k > 1 else ''} of {path}"
    totals = dict.fromkeys(PHASES, 0.0)
    targets_recorded = all("targets_s" in stage for _, rec in records for stage in _stages(rec))
    for _, rec in records:
        stages = _stages(rec)
        rollout, learner = rec["rollout"]["wall_s"], sum(s["wall_s"] for s in stages)
        evaluation = (rec.get("eval") or {}).get("wall_s", 0.0)
        rest = rec["wall_s"] - rollout - learner - evaluation
        totals["rollout"] += rollout
        totals["learner"] += learner
        totals["evaluation"] += evaluation
        if targets_recorded:
            targets = sum(s["targets_s"] for s in stages)
            totals["targets"] += targets
            totals["other"] += max(0.0, rest - targets)
        else:
            totals["targets"] += rest
    phases = {
        "rollout": Figure(totals["rollout"] / k, f"{mean}: rollout.wall_s"),
        "learner": Figure(totals["learner"] / k, f"{mean}: the stages' wall_s"),
        "evaluation": Figure(totals["evaluation"] / k, f"{mean}: eval.wall_s (0 where not evaluated)"),
        "targets": Figure(totals["targets"] / k, f"{mean}: the stages' targets_s" if targets_recorded else
                          f"{mean}: wall_s − rollout − stages − eval (no targets_s recorded: targets, probe and "
                          f"publishing together)"),
        "other": Figure(totals["other"] / k, f"{mean}: wall_s − rollout − targets − stages − eval (probe set, "
                        f"publishing)" if targets_recorded else "in targets (this run recorded no targets_s)"),
    }
    busy = [rec["busy"] for _, rec in records if rec.get("busy")]
    measured = None
    if busy:
        measured = (f"actors busy {sum(b['actors_busy'] for b in busy) / len(busy):.2f}, learner busy "
                    f"{sum(b['learner_busy'] for b in busy) / len(busy):.2f} of the sync wall time ({mean}: busy)")
    return RoundCosts(phases,
                      programs=Figure(sum(r["rollout"]["programs"] for _, r in records) / k,
                                      f"{mean}: rollout.programs"),
                      steps=Figure(sum(s.get("step", 0) for _, r in records for s in _stages(r)) / k,
                                   f"{mean}: the stages' step"),
                      measured_busy=measured)


def _stages(record: dict) -> list[dict]:
    return [s for s in (record.get("stages") or {}).values() if not s.get("skipped")]


def with_flags(costs: RoundCosts | None, flags: dict[str, float | None]) -> RoundCosts:
    """`costs` with the phases given as flags in place of the records' (every phase when there is no run)."""
    missing = [p for p in PHASES if flags[p] is None and (costs is None or p not in costs.phases)]
    if missing:
        raise ValueError(f"no cost for {missing}: give --run-dir (a sync run folder) or --"
                         + " --".join(f"{p}-s" if p != "evaluation" else "eval-s" for p in missing))
    phases = {p: Figure(flags[p], "flag") if flags[p] is not None else costs.phases[p] for p in PHASES}
    if costs is None:
        return RoundCosts(phases)
    return RoundCosts(phases, costs.programs, costs.steps, costs.measured_busy)


# ---------------------------------------------------------------------------------------------- the report
def report(costs: RoundCosts, node: Node, rollout_gpus: int | None, rollout_grid: list[float],
           learner_grid: list[float], efficiency_sources: tuple[str, str], gpus_source: str,
           switch_source: str) -> str:
    rows = splits(costs, node)
    chosen = best(rows) if rollout_gpus is None else split(costs, node, rollout_gpus)
    lines = ["Measured per-round costs (seconds on the measured machine, each phase with all of it):", "",
             "| phase | side in async mode | seconds | speed-up of one GPU | source |",
             "| --- | --- | ---: | ---: | --- |"]
    for p in PHASES:
        side = "actors (rollout GPUs)" if p in ACTOR_PHASES else "learner (learner GPUs)"
        f, s = costs.phases[p], node.speedup[p]
        lines.append(f"| {p} | {side} | {f.value:.1f} | {s.value:g} ({s.source}) | {f.source} |")
    total = sum(f.value for f in costs.phases.values())
    lines += ["", f"Round on the measured machine: {total:.1f} s."]
    if costs.programs is not None:
        lines.append(f"Work per round: {costs.programs.value:g} programs ({costs.programs.source}), "
                     f"{costs.steps.value:g} optimiser steps ({costs.steps.source}).")
    if costs.measured_busy:
        lines.append(f"Measured in that run: {costs.measured_busy}.")
    r_src, l_src = efficiency_sources
    lines += ["", f"Node: {node.gpus} GPUs ({gpus_source}); rollout scaling efficiency {node.rollout_efficiency:g} "
              f"({r_src}), learner (DDP) scaling efficiency {node.learner_efficiency:g} ({l_src}); g GPUs give "
              f"1 + e·(g − 1) GPUs' throughput; {node.switch_s:g} s a round for sync on all GPUs to change their "
              f"role ({switch_source}).", "",
              f"Sync, all {node.gpus} GPUs to each phase in turn: {chosen.sync_all_s:.1f} s a round.", "",
              "| rollout GPUs | learner GPUs | actors' side s | learner's side s | async round s | actors busy | "
              "learner busy | sync (same split) s | async gain vs sync split | async gain vs sync all GPUs |",
              "| ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for s in rows:
        mark = " ←" if s.rollout_gpus == chosen.rollout_gpus else ""
        lines.append(f"| {s.rollout_gpus}{mark} | {node.gpus - s.rollout_gpus} | {s.actors_s:.1f} | "
                     f"{s.learner_s:.1f} | {s.async_s:.1f} | {s.actors_busy:.2f} | {s.learner_busy:.2f} | "
                     f"{s.sync_split_s:.1f} | {s.gain_vs_split:.2f}× | {s.gain_vs_all:.2f}× |")
    how = "the best split (shortest async round)" if rollout_gpus is None else "the split asked for (--rollout-gpus)"
    lines += ["", f"{how.capitalize()}: {chosen.rollout_gpus} rollout GPUs + {node.gpus - chosen.rollout_gpus} "
              f"learner GPUs: async {chosen.async_s:.1f} s a round against sync {chosen.sync_all_s:.1f} s on all "
              f"GPUs (gain {chosen.gain_vs_all:.2f}×) and {chosen.sync_split_s:.1f} s on the same split (gain "
              f"{chosen.gain_vs_split:.2f}×).",
              f"Async breaks even with sync on all GPUs when changing roles costs sync "
              f"{max(0.0, chosen.async_s - chosen.sync_all_s + node.switch_s):.1f} s a round (--switch-s).", "",
              "Sensitivity: async gain over sync on all GPUs at the best split for each pair of efficiencies "
              "(rollout GPUs of the best split in brackets; the efficiencies from --grid-rollout and "
              "--grid-learner):", "",
              "| rollout eff. \\ learner eff. | " + " | ".join(f"{e:g}" for e in learner_grid) + " |",
              "| ---: |" + " ---: |" * len(learner_grid)]
    for er in rollout_grid:
        cells = []
        for el in learner_grid:
            b = best(splits(costs, Node(node.gpus, er, el, node.speedup, node.switch_s)))
            cells.append(f"{b.gain_vs_all:.2f}× ({b.rollout_gpus})")
        lines.append(f"| {er:g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run-dir", type=Path, help="a sync run folder: per-phase costs from its metrics.jsonl")
    for phase, flag in (("rollout", "rollout-s"), ("targets", "targets-s"), ("learner", "learner-s"),
                        ("evaluation", "eval-s"), ("other", "other-s")):
        p.add_argument(f"--{flag}", dest=phase, type=float,
                       help=f"seconds of a round's {phase} on the measured machine (in place of the run's; "
                            f"--other-s defaults to 0 without --run-dir)")
    p.add_argument("--gpus", type=int, help=f"GPUs on the node (default {PAPER_GPUS}: the paper's stage θ, 16 "
                                            f"programs × 8 GPUs)")
    p.add_argument("--rollout-gpus", type=int, help="report this split (default: the one with the shortest async "
                                                    "round)")
    p.add_argument("--rollout-efficiency", type=float,
                   help="each rollout GPU beyond the first adds this much of one GPU's throughput (default 1: "
                        "independent actors)")
    p.add_argument("--learner-efficiency", type=float,
                   help="each learner GPU beyond the first adds this much under DDP (default 0.9)")
    for phase in PHASES:
        p.add_argument(f"--speedup-{phase}", type=float,
                       help=f"one GPU's speed over the measured machine for {phase} (default 1: the same for every "
                            f"phase, when the factors cancel out of the gains)")
    p.add_argument("--switch-s", type=float,
                   help="seconds a round that sync on all GPUs pays to move them between actors and learners "
                        "(default 0)")
    p.add_argument("--grid-rollout", type=float, nargs="+", default=[1.0, 0.9, 0.8, 0.7],
                   help="rollout efficiencies of the sensitivity table")
    p.add_argument("--grid-learner", type=float, nargs="+", default=[1.0, 0.9, 0.8, 0.7, 0.6],
                   help="learner efficiencies of the sensitivity table")
    a = p.parse_args(argv)
    flags = {ph: getattr(a, ph) for ph in PHASES}
    if a.run_dir is None and flags["other"] is None:
        flags["other"] = 0.0
    gpus = given(a.gpus, PAPER_GPUS, "default: the paper's stage θ on 8 GPUs, docs/bcoder.md §4")
    rollout_eff = given(a.rollout_efficiency, 1.0, "default: independent actors")
    learner_eff = given(a.learner_efficiency, 0.9, "default")
    switch = given(a.switch_s, 0.0, "default: GPUs change role for free")
    try:
        costs = with_flags(read_run(a.run_dir) if a.run_dir else None, flags)
        speedup = {ph: given(getattr(a, f"speedup_{ph}"), 1.0, "default") for ph in PHASES}
        node = Node(int(gpus.value), rollout_eff.value, learner_eff.value, speedup, switch.value)
        print(report(costs, node, a.rollout_gpus, a.grid_rollout, a.grid_learner,
                     (rollout_eff.source, learner_eff.source), gpus.source, switch.source), end="")
    except ValueError as e:
        print(f"estimate_async: {e}", file=sys.stderr)
        return 2
    return 0


def given(value: float | None, default: float, default_source: str) -> Figure:
    return Figure(default, default_source) if value is None else Figure(value, "flag")


if __name__ == "__main__":
    sys.exit(main())
