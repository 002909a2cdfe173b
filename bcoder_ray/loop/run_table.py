"""The run's final table (`table.md`): one row per iteration (buffer, budget, rollout and probe pass rates,
validation pass@1 unranked and ranked, the lag of the generated rows its stages read), the test split once (warm start and last policy), and the paired
comparisons of the last policy against the warm start on the test split with bootstrap intervals."""

from __future__ import annotations

from pathlib import Path

from bcoder_ray.buffer.staleness import merged
from bcoder_ray.util.formatting import pct
from bcoder_ray.config import Config
from bcoder_ray.evaluation.metrics import CANDIDATES_FILE, bootstrap_ci, group_by_problem, problem_variant_value, read_candidates
from bcoder_ray.evaluation.report import load_metrics, table1_markdown
from bcoder_ray.loop.run_folder import RunState


def _get(group: dict, variant: str, k: int) -> float | None:
    return (group.get(f"{variant}@k") or {}).get(str(k))


def paired_difference(dir_a: str, variant_a: str, dir_b: str, variant_b: str, k: int, level: float,
                      seed: int = 0) -> dict:
    """Mean over the problems both evaluations share of (a's variant@k - b's variant@k), with a percentile
    bootstrap interval over problems (per-problem values and a bootstrap)."""
    a = group_by_problem(read_candidates(Path(dir_a) / CANDIDATES_FILE))
    b = group_by_problem(read_candidates(Path(dir_b) / CANDIDATES_FILE))
    diffs = []
    for key in sorted(set(a) & set(b)):
        va, vb = problem_variant_value(a[key], variant_a, k), problem_variant_value(b[key], variant_b, k)
        if va is not None and vb is not None:
            diffs.append(va - vb)
    if not diffs:
        return {"n_problems": 0, "mean": None, "low": None, "high": None}
    low, high = bootstrap_ci(diffs, level=level, seed=seed)
    return {"n_problems": len(diffs), "mean": sum(diffs) / len(diffs), "low": low, "high": high}


def _interval(d: dict) -> tuple[str, str]:
    diff = "–" if d["mean"] is None else f"{100 * d['mean']:+.1f} pts"
    interval = "–" if d["low"] is None else f"[{100 * d['low']:+.1f}, {100 * d['high']:+.1f}] pts"
    return diff, interval


def final_table(state: RunState, cfg: Config) -> str:
    """The markdown table per iteration, the test split once, and the last policy against the warm start."""
    ev, su = cfg.evaluation, cfg.suite
    val = su.validation_split or "–"
    lines = [f"# {cfg.run.name}: {cfg.algorithm.name} on {su.name} ({su.train_split} → validation {val}, "
             f"test {su.test_split})", "",
             "| iteration | buffer rows | programs sampled (total) | programs executed (total) | rollout pass rate "
             "| probe pass rate | validation pass@1 | validation ranked pass@1 | lag read (mean / p90 / max) |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    probe = {p["iteration"]: p["pass_rate"] for p in state.probe}
    if state.baseline or state.baseline_test:
        o = (state.baseline or {}).get("overall") or {}
        lines.append(f"| warm start (θ_ckpt) | {state.human_rows} | 0 | 0 | – | {_rate(probe.get(-1))} | "
                     f"{pct(_get(o, 'pass', 1))} | – | – |")
    for rec in state.iterations:
        o = (rec.get("eval") or {}).get("overall") or {}
        lines.append(f"| {rec['iteration']} | {rec.get('buffer_rows', '–')} | {rec['programs_sampled_total']} | "
                     f"{rec['programs_executed_total']} | {rec['rollout']['pass_rate']:.3f} | "
                     f"{_rate(probe.get(rec['iteration']))} | {pct(_get(o, 'pass', 1))} | "
                     f"{pct(_get(o, 'ranked_pass', 1))} | {_lag(rec)} |")
    t = throughput(state)
    if t is not None:
        lines += ["", f"Throughput ({cfg.run.mode} mode, {cfg.run.learner_kind()} learner): {t['wall_s']:.0f}s of "
                  f"iterations; actors busy {t['actors_busy']:.2f} and learner busy {t['learner_busy']:.2f} of the "
                  f"wall time; {t['programs_per_s']:.2f} programs sampled/s; {t['optimizer_steps_per_s']:.2f} "
                  f"optimiser steps/s."]
    base, last = state.baseline_test, state.final_test
    if base and last:
        o_last, o_base = last["overall"], base["overall"]
        ks = [k for k in ev.ks]
        lines += ["", f"Test split ({su.test_split}, evaluated once): {o_last.get('n_problems')} problems × "
                  f"{ev.samples_per_problem} samples (temperature {ev.temperature}, top-p {ev.top_p}); "
                  f"{int(ev.confidence * 100)}% percentile bootstrap intervals over problems of the paired "
                  f"difference.", "",
                  "| policy | " + " | ".join(f"pass@{k}" for k in ks) + " | " +
                  " | ".join(f"ranked pass@{k}" for k in ks) + " |",
                  "| --- |" + " ---: |" * (2 * len(ks))]
        for name, o in (("warm start (θ_ckpt)", o_base), (f"last ({last.get('label', 'policy')})", o_last)):
            lines.append(f"| {name} | " + " | ".join(pct(_get(o, "pass", k)) for k in ks) + " | " +
                         " | ".join(pct(_get(o, "ranked_pass", k)) for k in ks) + " |")
        lines += ["", "| comparison (pass@1) | last iteration | warm start | difference | interval |",
                  "| --- | ---: | ---: | ---: | --- |"]
        for name, variant in (("ranked (last) vs unranked (warm start)", "ranked_pass"),
                              ("unranked (last) vs unranked (warm start)", "pass")):
            d = paired_difference(last["dir"], variant, base["dir"], "pass", 1, ev.confidence, seed=cfg.run.seed)
            diff, interval = _interval(d)
            lines.append(f"| {name} | {pct(_get(o_last, variant, 1))} | {pct(_get(o_base, 'pass', 1))} | "
                         f"{diff} | {interval} |")
        if _get(o_last, "ranked_pass", 1) is not None:
            d = paired_difference(last["dir"], "ranked_pass", last["dir"], "pass", 1, ev.confidence,
                                  seed=cfg.run.seed)
            diff, interval = _interval(d)
            lines.append(f"| ranked (last) vs unranked (last) | {pct(_get(o_last, 'ranked_pass', 1))} | "
                         f"{pct(_get(o_last, 'pass', 1))} (last) | {diff} | {interval} |")
        if state.reuse and state.reuse.get("generated_rows"):
            u = state.reuse
            lines += ["", f"Off-policy reuse: the learners read the {u['generated_rows']} programs this run generated "
                      f"{u['reads_mean']:.2f} times on average (at most {u['reads_max']}); "
                      f"{pct(u['never_read_share'])} were never read."]
        lines += ["", "Per difficulty on the test split (percent; the layout of the paper's Table 1):", "",
                  _difficulty_tables(base, last, ks)]
    return "\n".join(lines) + "\n"


def busy_record(wall_s: float, actors_busy_s: float, actors: int, learner_busy_s: float, programs: int,
                steps: float) -> dict:
    """An iteration's (or a whole run's) use of its actors and learner: busy seconds and fractions of the wall
    time (the actors' over `actors` × wall), programs sampled and optimiser steps per second."""
    wall = max(wall_s, 1e-9)
    return {"wall_s": wall_s, "actors": actors, "actors_busy_s": actors_busy_s, "learner_busy_s": learner_busy_s,
            "programs": programs, "optimizer_steps": steps,
            "actors_busy": actors_busy_s / (max(1, actors) * wall), "learner_busy": learner_busy_s / wall,
            "programs_per_s": programs / wall, "optimizer_steps_per_s": steps / wall}


def throughput(state: RunState) -> dict | None:
    """`busy_record` summed over the run's iterations (None before any iteration recorded one)."""
    recs = [r["busy"] for r in state.iterations if r.get("busy")]
    if not recs:
        return None
    total = {k: sum(r[k] for r in recs) for k in ("wall_s", "actors_busy_s", "learner_busy_s", "programs",
                                                  "optimizer_steps")}
    return busy_record(total["wall_s"], total["actors_busy_s"], recs[-1]["actors"], total["learner_busy_s"],
                       total["programs"], total["optimizer_steps"])


def probe_points(state: RunState) -> list[dict]:
    """Figure 1's points of a run: the probe set's pass rate against programs sampled for training so far
    (the warm start at 0)."""
    sampled = {-1: 0, **{r["iteration"]: r["programs_sampled_total"] for r in state.iterations}}
    return [{"programs": sampled[p["iteration"]], "pass_rate": p["pass_rate"]}
            for p in sorted(state.probe, key=lambda p: p["iteration"]) if p["iteration"] in sampled]


def validation_points(state: RunState, split: str | None) -> list[dict]:
    """Validation pass@1 against the wall time of the iterations so far: the warm start at 0 s, then each
    iteration that evaluated the split `split` (the config's validation split; none gives no points), at the end
    of that iteration (sync: its evaluation included; async: the round's end, when the evaluated policy was
    published). Points {"wall_s", "iteration", "pass@1", "low", "high"}: fractions, the interval the
    evaluation's bootstrap over problems."""
    def point(wall: float, iteration: int, ev: dict) -> dict | None:
        o = ev.get("overall") or {}
        value, ci = (o.get("pass@k") or {}).get("1"), o.get("pass@1_ci") or {}
        return None if value is None else {"wall_s": wall, "iteration": iteration, "pass@1": value,
                                           "low": ci.get("low"), "high": ci.get("high")}

    if not split:
        return []
    base = state.baseline if (state.baseline or {}).get("split") == split else None
    points, wall = ([point(0.0, -1, base)] if base else []), 0.0
    for r in state.iterations:
        wall += r.get("wall_s", 0.0)
        if (r.get("eval") or {}).get("split") == split:
            points.append(point(wall, r["iteration"], r["eval"]))
    return [p for p in points if p is not None]


def _lag(record: dict) -> str:
    """The policy-version lag of the generated rows an iteration's stages read (all stages together)."""
    s = merged(stage.get("staleness") for stage in (record.get("stages") or {}).values()).summary()
    return "–" if not s.rows else f"{s.mean:.2f} / {s.p90} / {s.max}"


def _rate(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def _difficulty_tables(base: dict, last: dict, ks: list[int]) -> str:
    last_metrics = load_metrics(last["dir"])
    out = table1_markdown([("warm start", load_metrics(base["dir"])), ("last", last_metrics)], ks=ks,
                          variant="pass")
    if last_metrics["overall"].get("ranked_pass@k"):
        out += "\n" + table1_markdown([("last", last_metrics)], ks=ks, variant="ranked_pass")
    return out
