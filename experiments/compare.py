"""Compare algorithms at an equal budget of programs (a benchmark, not a test): same suite, warm start, training
problems, seeds and executor; one run folder per algorithm (and seed, and swept setting) under `--out`.

    python experiments/compare.py --algorithms bcoder bcoder_optimality dueling_dqn --budget 1152 --out runs/cmp
    python experiments/compare.py --config ci_tiny --algorithms bcoder bcoder_optimality --budget 48 \\
        --out /tmp/cmp --suite.validation_split null --run.iterations 1
    python experiments/compare.py --algorithms "bcoder" "hi_alpha=bcoder:--algorithm.alpha 2.0" --seeds 3 ...
    python experiments/compare.py --algorithms bcoder --sweep stages.theta.lr=1e-4,3e-4 --budget 1152 ...
    python experiments/compare.py --algorithms bcoder bcoder_rho1 bcoder_no_td sft --seeds 3 --budget 2304 ...
    python experiments/compare.py --algorithms bcoder "prio=bcoder:--buffer.sampler.kind prioritized" \
        "fresh=bcoder:--buffer.sampler.kind fresh_prioritized" "balanced=bcoder:--buffer.sampler.kind balanced" ...

An algorithm spec is `[LABEL=]TARGET[:OVERRIDES]`: TARGET a registered algorithm name (`run.py
--list-algorithms`) or a config (a shipped name prefixed `config=`, or a .yaml path, whose `algorithm.name`
decides), or a preset (below); OVERRIDES `--section.key value ...` for that algorithm only. Other arguments are
overrides for every run. Every run gets `--run.budget_programs BUDGET` (programs sampled and scored for training,
the algorithm's extra samples included; the human seed, evaluation samples and infrastructure failures excluded),
`--run.probe_problems P` (Figure 1's probe set), `--run.seed s` and one warm start (`model.warm_start.options.seed`
pinned to the first seed unless given, so every seed and algorithm starts from the same θ_ckpt).

Presets, the controls that say what B-Coder's value learning is worth (`--help` lists them; a preset's label is
its name unless given, and OVERRIDES come after its own): `bcoder_rho1` (ρ_real = 1: the learner never reads a
generated program), `bcoder_no_td` (β_td = 0: θ learns from L_adv and L_ce alone), `sft` (cross-entropy on the
passing human programs of the batches B-Coder's θ reads, with `stages.sft.steps` set to the `stages.theta.steps`
that B-Coder gets from the same config, overrides and sweep setting, unless given).

`--sweep [LABEL:]key=v1,v2,...` (repeatable: the grid is their product) runs each setting and picks, per
algorithm, the one with the best validation pass@1 (`--select-by`, mean over seeds) of the last iteration's
validation evaluation; the test split is read only for the chosen setting. The runs share one Ray instance
(started here) and run in this process, one after another.

A run folder whose `compare_key.json` matches (the resolved config minus run_dir, and the code version: commit,
dirty flag, hash of the uncommitted changes) and whose run completed is reused, not rerun; one that matches but
stopped early is resumed (`--report-only` writes the report from completed folders without running). Output in
`--out`: compare.md, compare.json, figure1.png (probe pass rate against programs sampled), wall_curve.png
(validation pass@1 against wall time, where runs evaluated the validation split; with `--evaluation.every 1`
after every iteration: how sync and async mode compare at equal wall time), and provenance.json in every run
folder made here.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import importlib.metadata
import itertools
import json
import os
import platform
import shlex
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))  # runnable from a checkout without install

from bcoder_ray.config import ConfigError  # noqa: E402
from bcoder_ray.loop.run_table import probe_points, throughput, validation_points  # noqa: E402

THROUGHPUT_KEYS = ("actors_busy", "learner_busy", "programs_per_s", "optimizer_steps_per_s")

PACKAGES = ("torch", "transformers", "ray", "pyarrow", "numpy")
KEY_FILE = "compare_key.json"
PROVENANCE_FILE = "provenance.json"
LEVEL = 0.95


# ---------------------------------------------------------------------------------------------- provenance
def _git(*args: str) -> str | None:
    try:
        out = subprocess.run(["git", "-C", str(REPO), *args], capture_output=True, check=True, timeout=60)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.decode("utf-8", "replace")


def code_version() -> dict:
    """The checkout's commit, whether it has uncommitted changes, and a hash of them (tracked diff and untracked
    files' contents), so a reused run was made by the same code."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        from importlib.metadata import PackageNotFoundError

        try:
            version = importlib.metadata.version("bcoder-ray")
        except PackageNotFoundError:
            version = None
        return {"commit": None, "dirty": None, "diff_hash": None, "package_version": version}
    h = hashlib.sha256((_git("diff", "HEAD", "--binary") or "").encode())
    untracked = sorted((_git("ls-files", "--others", "--exclude-standard", "-z") or "").split("\0"))
    for name in filter(None, untracked):
        path = REPO / name
        h.update(name.encode())
        if path.is_file():
            h.update(hashlib.sha256(path.read_bytes()).digest())
    dirty = bool((_git("status", "--porcelain") or "").strip())
    return {"commit": commit.strip(), "dirty": dirty, "diff_hash": h.hexdigest()[:16] if dirty else None}


def _cpu_model() -> str | None:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or None


def provenance(code: dict) -> dict:
    versions = {}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    affinity = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None
    return {**code, "packages": versions, "cpu_model": _cpu_model(), "cpu_count": os.cpu_count(),
            "cpus_usable": affinity, "python": platform.python_version(), "platform": platform.platform(),
            "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


# ---------------------------------------------------------------------------------------------- specs
@dataclass(frozen=True)
class Preset:
    """A named algorithm spec: the controls of docs/evaluation.md ("Controls")."""

    algorithm: str
    overrides: tuple[str, ...]
    help: str
    theta_steps: str | None = None
    """A stage whose `steps` is set to the `stages.theta.steps` B-Coder gets from the same config, overrides and
    sweep setting (unless the stage's steps are given): the optimiser steps of B-Coder's stage θ."""


PRESETS = {
    "bcoder_rho1": Preset("bcoder", ("--algorithm.rho_real", "1.0"),
                          "B-Coder with rho_real 1: every row a human program, the value learning never reads a "
                          "generated one"),
    "bcoder_no_td": Preset("bcoder", ("--algorithm.beta_td", "0"),
                           "B-Coder with beta_td 0: theta learns from L_adv and L_ce alone; phi still trains, "
                           "for the ranker only"),
    "sft": Preset("sft", (), "cross-entropy on the passing human programs of the batches B-Coder's theta reads, "
                  "for as many steps: stages.sft.steps = stages.theta.steps unless given", theta_steps="sft"),
}


def presets_help() -> str:
    return "; ".join(f"{name} ({p.help})" for name, p in PRESETS.items())


@dataclass
class AlgoSpec:
    label: str
    name: str | None  # a registered algorithm name, or None when `config` decides
    config: str | None  # a config (shipped name or path) of its own; None: the common --config
    overrides: list[str]
    spec: str
    preset: str | None = None  # the name of a PRESETS entry


def parse_spec(spec: str, algorithms: list[str]) -> AlgoSpec:
    label = None
    head, _, rest = spec.partition(":")
    left, eq, right = head.partition("=")
    if eq and left != "config":
        label, head = left, right
    overrides = shlex.split(rest)
    if head in PRESETS:  # before the registered names: the preset `sft` is the algorithm at θ's steps
        preset = PRESETS[head]
        return AlgoSpec(label or head, preset.algorithm, None, [*preset.overrides, *overrides], spec, head)
    if head.startswith("config="):
        config, name = head[len("config="):], None
    elif head.endswith((".yaml", ".yml")):
        config, name = head, None
    elif head in algorithms:
        config, name = None, head
    else:
        raise ConfigError(f"algorithm spec {spec!r}: {head!r} is neither a registered algorithm {algorithms}, a "
                          f"preset {sorted(PRESETS)} nor a config (config=NAME or a .yaml path)")
    return AlgoSpec(label or (name or Path(head.split("config=")[-1]).stem), name, config, overrides, spec)


def _sets(overrides: list[str], key: str) -> bool:
    """Whether `--key value` or `--key=value` is among the overrides."""
    return any(o == f"--{key}" or o.startswith(f"--{key}=") for o in overrides)


def _rows_per_step(stage) -> int:
    return stage.batch_size_per_worker * max(1, stage.num_workers) * stage.grad_accum


def preset_overrides(spec: AlgoSpec, config: str | None, before: list[str], imports: list[str]) -> list[str]:
    """What a preset adds after `before` (the common overrides, the algorithm name, the spec's overrides and the
    sweep setting): for `theta_steps`, `--stages.<stage>.steps` = the `stages.theta.steps` of B-Coder under the
    same config and overrides (the name set back to bcoder last, which drops the other algorithm's fields);
    nothing when `before` gives that stage's steps. The stage must read as many rows per step as θ (batch size ×
    workers × accumulation), else a ConfigError names both."""
    from bcoder_ray.config import load_config

    preset = PRESETS.get(spec.preset or "")
    if preset is None or preset.theta_steps is None or _sets(before, f"stages.{preset.theta_steps}.steps"):
        return []
    stage = preset.theta_steps
    theta = load_config(config, [*before, "--algorithm.name", "bcoder"], check_paths=False,
                        imports=imports).stage("theta")
    mine = load_config(config, before, check_paths=False, imports=imports).stage(stage)
    if _rows_per_step(mine) != _rows_per_step(theta):
        raise ConfigError(f"preset {spec.preset!r} ({spec.label}): stages.{stage} reads {_rows_per_step(mine)} rows a "
                          f"step and B-Coder's stages.theta {_rows_per_step(theta)} (batch_size_per_worker × "
                          f"num_workers × grad_accum): give stages.{stage} θ's batch, or its steps explicitly")
    return [f"--stages.{stage}.steps", str(theta.steps)]


def parse_sweeps(items: list[str]) -> list[tuple[str | None, str, list[str]]]:
    """[(label or None for every algorithm, key, values)] of `[LABEL:]key=v1,v2,...`."""
    out = []
    for item in items:
        target, _, body = item.rpartition(":") if ":" in item.split("=", 1)[0] else ("", "", item)
        key, eq, values = body.partition("=")
        key = key.strip().removeprefix("--")
        vals = [v.strip() for v in values.split(",") if v.strip()]
        if not eq or not key or not vals:
            raise ConfigError(f"--sweep {item!r}: expected [LABEL:]key=v1,v2,...")
        out.append((target or None, key, vals))
    return out


def grid_for(label: str, sweeps) -> list[dict[str, str]]:
    mine = [(k, v) for target, k, v in sweeps if target in (None, label)]
    if not mine:
        return [{}]
    keys = [k for k, _ in mine]
    return [dict(zip(keys, combo)) for combo in itertools.product(*(v for _, v in mine))]


def _slug(setting: dict[str, str]) -> str:
    if not setting:
        return ""
    text = "_".join(f"{k.split('.')[-1]}-{v}" for k, v in setting.items())
    return "".join(c if c.isalnum() or c in "-_." else "-" for c in text)[:60]


# ---------------------------------------------------------------------------------------------- one run
@dataclass
class Job:
    label: str
    algorithm: str
    seed: int
    setting: dict[str, str]
    run_dir: Path
    config: str | None
    overrides: list[str]
    key: dict = field(default_factory=dict)
    status: str = ""  # "reused", "ran", "resumed"
    wall_s: float = 0.0  # this invocation's wall time (0 when reused)


def comparable_view(cfg_dict: dict) -> dict:
    """The parts of a resolved config every compared run must share. `run.mode` and `run.learner` are not among
    them: sync and async runs of one algorithm compare (`"sync=bcoder" "async=bcoder:--run.mode async"`), at the
    same budget, and the throughput table sets their wall time, busy fractions and rates side by side."""
    run = {k: v for k, v in cfg_dict["run"].items() if k in ("budget_programs", "probe_problems", "probe_samples",
                                                                "seed")}
    return {"run": run, **{k: cfg_dict[k] for k in ("suite", "model", "executor", "evaluation")}}


def plan_job(spec: AlgoSpec, seed: int, setting: dict[str, str], common: list[str], args, out: Path,
             code: dict):
    from bcoder_ray.loop.driver import prepare_run

    forced = ["--run.budget_programs", str(args.budget), "--run.probe_problems", str(args.probe_problems),
              "--run.seed", str(seed)]
    if not any(o.startswith("--model.warm_start.options.seed") for o in common + spec.overrides):
        forced += ["--model.warm_start.options.seed", str(args.seed0)]
    name = ["--algorithm.name", spec.name] if spec.name else []
    sweep = [x for k, v in setting.items() for x in (f"--{k}", v)]
    config = spec.config or args.config
    preset = preset_overrides(spec, config, common + name + spec.overrides + sweep, args.imports)
    overrides = common + name + spec.overrides + sweep + preset + forced
    folder = out / "runs" / "__".join(filter(None, [spec.label, _slug(setting), f"seed{seed}"]))
    placeholder = prepare_run(config=config, overrides=overrides, run_dir=str(out / ".plan-placeholder"),
                              imports=args.imports)
    cfg = placeholder.cfg.to_dict()
    cfg["run"].pop("run_dir", None)
    job = Job(spec.label, placeholder.cfg.algorithm.name, seed, setting, folder, config, overrides,
              key={"config": cfg, "code": code})
    return job, placeholder.cfg


def _same_key(folder: Path, key: dict) -> bool:
    path = folder / KEY_FILE
    if not path.is_file():
        return False
    return json.loads(path.read_text()) == json.loads(json.dumps(key, default=str))


def reusable(job: Job) -> bool:
    """A completed run made with the same resolved config and code version."""
    from bcoder_ray.loop.run_folder import STATE_FILE, RunState

    folder = job.run_dir
    return (folder / STATE_FILE).exists() and _same_key(folder, job.key) and \
        RunState.load(folder).final_test is not None


def execute(job: Job, args, prov: dict) -> None:
    from bcoder_ray.loop.driver import prepare_run, run
    from bcoder_ray.loop.run_folder import STATE_FILE

    folder = job.run_dir
    if reusable(job):
        job.status = "reused"
        log(f"{folder.name}: reused (same config and code version, completed)")
        return
    if (folder / STATE_FILE).exists() and _same_key(folder, job.key):
        plan = prepare_run(resume=str(folder), imports=args.imports)
        job.status = "resumed"
    else:
        if folder.exists():
            stale = folder.with_name(f"{folder.name}.stale-{time.strftime('%Y%m%d-%H%M%S')}")
            folder.rename(stale)
            log(f"{folder.name}: config or code version changed; the old folder is kept as {stale.name}")
        plan = prepare_run(config=job.config, overrides=job.overrides, run_dir=str(folder), imports=args.imports)
        job.status = "ran"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / KEY_FILE).write_text(json.dumps(job.key, indent=2, default=str) + "\n")
    (folder / PROVENANCE_FILE).write_text(json.dumps(prov, indent=2) + "\n")
    log(f"{folder.name}: {job.status} ({job.algorithm}, seed {job.seed}, {job.setting or 'no sweep'})")
    started = time.time()
    run(plan)
    job.wall_s = time.time() - started


def log(msg: str) -> None:
    print(f"[compare {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------- results
def _get(overall: dict | None, variant: str, k: int) -> float | None:
    return ((overall or {}).get(f"{variant}@k") or {}).get(str(k))


def run_result(job: Job, ks: list[int]) -> dict:
    from bcoder_ray.loop.run_folder import RunState

    st = RunState.load(job.run_dir)
    cfg = job.key["config"]
    stored = job.run_dir / KEY_FILE
    made_by = json.loads(stored.read_text()).get("code") if stored.is_file() else None
    budget = cfg["run"]["budget_programs"]
    val = next((r for r in reversed(st.iterations) if r.get("eval")), None)
    last_it = st.iterations[-1]["iteration"] if st.iterations else None
    test = (st.final_test or {}).get("overall")
    out = {"label": job.label, "algorithm": job.algorithm, "seed": job.seed, "setting": job.setting,
           "run_dir": str(job.run_dir), "status": job.status, "budget": budget,
           "programs_sampled": st.programs_sampled, "programs_executed": st.programs_executed,
           "infra_failures": st.infra_failures, "theta_ckpt": st.theta_ckpt, "code": made_by,
           "iterations": len(st.iterations),
           "budget_respected": st.programs_sampled <= budget,
           "train_wall_s": sum(r.get("wall_s", 0.0) for r in st.iterations),
           "invocation_wall_s": job.wall_s,
           "test": {f"{v}@{k}": _get(test, v, k) for v in ("pass", "ranked_pass") for k in ks},
           "test_dir": (st.final_test or {}).get("dir"), "warm_start_test_dir": (st.baseline_test or {}).get("dir"),
           "warm_start_test": {f"pass@{k}": _get((st.baseline_test or {}).get("overall"), "pass", k) for k in ks},
           "validation": None if val is None else {
               "iteration": val["iteration"], "is_last_iteration": val["iteration"] == last_it,
               **{f"{v}@{k}": _get(val["eval"]["overall"], v, k) for v in ("pass", "ranked_pass") for k in ks}},
           "probe": probe_points(st), "reuse": st.reuse or {},
           "validation_curve": validation_points(st, cfg["suite"].get("validation_split")),
           "mode": cfg["run"].get("mode", "sync"), "throughput": throughput(st) or {}}
    out["has_ranker"] = any(out["test"][f"ranked_pass@{k}"] is not None for k in ks)
    return out


def paired(a_dir: str | None, a_variant: str, b_dir: str | None, b_variant: str, seed: int) -> dict | None:
    from bcoder_ray.loop.run_table import paired_difference

    if not a_dir or not b_dir:
        return None
    return paired_difference(a_dir, a_variant, b_dir, b_variant, 1, LEVEL, seed=seed)


def _mean_std(values: list[float | None]) -> dict:
    xs = [v for v in values if v is not None]
    if not xs:
        return {"mean": None, "std": None, "values": values}
    return {"mean": statistics.fmean(xs), "std": statistics.stdev(xs) if len(xs) > 1 else 0.0, "values": values}


def choose(label: str, grid: list[dict], results: list[dict], select_by: str) -> tuple[dict, list[dict]]:
    """The setting with the best mean validation `select_by`@1 over seeds (first one on a tie)."""
    rows = []
    for setting in grid:
        mine = [r for r in results if r["label"] == label and r["setting"] == setting]
        vals = [(r["validation"] or {}).get(f"{select_by}@1") for r in mine]
        if any(v is None for v in vals) and select_by == "ranked_pass":
            vals = [(r["validation"] or {}).get("pass@1") for r in mine]
        ms = _mean_std(vals)
        rows.append({"setting": setting, "validation": ms,
                     "validation_iteration": [(r["validation"] or {}).get("iteration") for r in mine],
                     "validation_is_last": all((r["validation"] or {}).get("is_last_iteration") for r in mine)})
    scored = [r for r in rows if r["validation"]["mean"] is not None]
    if not scored:
        raise ConfigError(f"{label}: no validation evaluation recorded in any swept run, nothing to choose by")
    best = max(scored, key=lambda r: r["validation"]["mean"])  # max keeps the first of equal values
    return best["setting"], rows


def summarise(labels: list[str], chosen: dict[str, dict], results: list[dict], ks: list[int]) -> list[dict]:
    """Per algorithm (its chosen setting): the spread over seeds of each figure, and paired intervals per seed
    against the same run's warm start and the same seed's bcoder run."""
    bcoder = {}
    candidates = [lab for lab in labels if any(r["label"] == lab and r["algorithm"] == "bcoder" for r in results)]
    # the label "bcoder" when there is one (the presets bcoder_rho1 and bcoder_no_td run the algorithm bcoder too)
    bcoder_label = "bcoder" if "bcoder" in candidates else next(iter(candidates), None)
    if bcoder_label:
        bcoder = {r["seed"]: r for r in results if r["label"] == bcoder_label and r["setting"] == chosen[bcoder_label]}
    rows = []
    for label in labels:
        mine = sorted((r for r in results if r["label"] == label and r["setting"] == chosen[label]),
                      key=lambda r: r["seed"])
        row = {"label": label, "algorithm": mine[0]["algorithm"], "setting": chosen[label],
               "seeds": [r["seed"] for r in mine], "has_ranker": any(r["has_ranker"] for r in mine),
               "runs": [r["run_dir"] for r in mine], "status": [r["status"] for r in mine],
               "budget": mine[0]["budget"], "budget_respected": all(r["budget_respected"] for r in mine)}
        for key in ("programs_sampled", "programs_executed", "train_wall_s", "iterations"):
            row[key] = _mean_std([r[key] for r in mine])
        for key in mine[0]["test"]:
            row[f"test_{key}"] = _mean_std([r["test"][key] for r in mine])
        for key in ("reads_mean", "reads_max", "never_read_share"):
            row[f"reuse_{key}"] = _mean_std([r["reuse"].get(key) for r in mine])
        row["mode"] = mine[0].get("mode", "sync")
        for key in THROUGHPUT_KEYS:
            row[key] = _mean_std([(r.get("throughput") or {}).get(key) for r in mine])
        row["warm_start_test_pass@1"] = _mean_std([r["warm_start_test"]["pass@1"] for r in mine])
        row["validation_curve"] = {r["seed"]: r.get("validation_curve") or [] for r in mine}
        comps = {}
        for r in mine:
            c = {"vs_warm_start": paired(r["test_dir"], "pass", r["warm_start_test_dir"], "pass", r["seed"])}
            if row["has_ranker"]:
                c["ranked_vs_warm_start"] = paired(r["test_dir"], "ranked_pass", r["warm_start_test_dir"], "pass",
                                                   r["seed"])
            b = bcoder.get(r["seed"])
            if b is not None and label != bcoder_label:
                c["vs_bcoder"] = paired(r["test_dir"], "pass", b["test_dir"], "pass", r["seed"])
                if row["has_ranker"] and b["has_ranker"]:
                    c["ranked_vs_bcoder_ranked"] = paired(r["test_dir"], "ranked_pass", b["test_dir"], "ranked_pass",
                                                          r["seed"])
            comps[str(r["seed"])] = c
        row["paired"] = comps
        rows.append(row)
    against_wall(rows)
    return rows


def against_wall(rows: list[dict]) -> None:
    """Validation pass@1 against wall time, per seed, each row against a reference row (the first sync-mode row
    when the modes differ, else the first row): the reference's final validation pass@1 and the wall time at it;
    this row's wall time to reach it (its first validation point at or above it; None if never) and the ratio
    to the reference's, and this row's validation pass@1 at the reference's wall time (its last point no later).
    Written into each row as row["wall"] (None without validation points)."""
    modes = {r["mode"] for r in rows}
    ref = next((r for r in rows if r["mode"] == "sync"), rows[0]) if len(modes) > 1 else (rows[0] if rows else None)
    for row in rows:
        per_seed = {}
        for seed, pts in row["validation_curve"].items():
            ref_pts = ref["validation_curve"].get(seed) or []
            if not pts or not ref_pts:
                continue
            goal, ref_wall = ref_pts[-1]["pass@1"], ref_pts[-1]["wall_s"]
            reach = next((p["wall_s"] for p in pts if p["pass@1"] >= goal), None)
            at_ref = [p for p in pts if p["wall_s"] <= ref_wall]
            per_seed[seed] = {"final": pts[-1], "reference": ref["label"], "reference_final": goal,
                              "reference_wall_s": ref_wall, "reach_s": reach,
                              "reach_ratio": None if reach is None or ref_wall <= 0 else reach / ref_wall,
                              "at_reference_wall": at_ref[-1]["pass@1"] if at_ref else None}
        row["wall"] = per_seed or None


def _fig(ms: dict, pct: bool = True, digits: int = 0) -> str:
    if ms["mean"] is None:
        return "–"
    f = (lambda v: f"{100 * v:.1f}") if pct else (lambda v: f"{v:.{digits}f}")
    if len(ms["values"]) == 1:
        return f(ms["mean"]) + ("%" if pct else "")
    each = "/".join("–" if v is None else f(v) for v in ms["values"])
    return f"{f(ms['mean'])} ± {f(ms['std'])}{'%' if pct else ''} ({each})"


def _interval(per_seed: dict, key: str) -> str:
    parts = []
    for seed, comps in per_seed.items():
        d = comps.get(key)
        if d is None or d["mean"] is None:
            continue
        text = f"{100 * d['mean']:+.1f} [{100 * d['low']:+.1f}, {100 * d['high']:+.1f}]"
        parts.append(text if len(per_seed) == 1 else f"s{seed}: {text}")
    return "; ".join(parts) or "–"


def markdown(summary: list[dict], sweeps_out: dict, info: dict, ks: list[int]) -> str:
    k_hi = max(ks)
    c = info["code"]
    code = f"{(c['commit'] or '?')[:10]}" + (f" (dirty, diff {c['diff_hash']})" if c["dirty"] else "")
    lines = [f"# Comparison at an equal budget: {', '.join(r['label'] for r in summary)}", "",
             f"Suite {info['suite']} (train {info['train_split']}, validation {info['validation_split'] or '–'}, "
             f"test {info['test_split']}); budget {info['budget']} programs sampled and scored for training per run "
             f"(`run.budget_programs`; extra samples such as greedy baselines included, human seed, evaluation and "
             f"infrastructure failures excluded); seeds {info['seeds']}; {info['warm_starts']}. Test split: "
             f"{info['test_problems']} problems × {info['eval_samples']} samples; code {code}.", ""]
    made = [json.loads(x) for x in info["run_code"]]
    if made != [c]:
        lines += ["Runs made by other code versions (report written with `--report-only`): " + ", ".join(
            f"{(m or {}).get('commit', '?')[:10]}" + (f" (dirty, diff {m['diff_hash']})" if (m or {}).get("dirty")
                                                       else "") for m in made) + ".", ""]
    if not info["validation_split"]:
        lines += ["**No validation figures exist**: `suite.validation_split` is null, so no setting was chosen on "
                  "a validation split (sweeps are refused).", ""]
    lines += [f"| algorithm | test pass@1 | test pass@{k_hi} | ranked pass@1 | ranked pass@{k_hi} | budget used | "
              f"programs executed | iterations wall (s) | runs |",
              "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |"]
    for r in summary:
        ranked = r["has_ranker"]
        used = _fig(r["programs_sampled"], pct=False) + f" / {r['budget']}" + \
            ("" if r["budget_respected"] else " (OVER)")
        lines.append(f"| {r['label']} | {_fig(r['test_pass@1'])} | {_fig(r[f'test_pass@{k_hi}'])} | "
                     f"{_fig(r['test_ranked_pass@1']) if ranked else 'no ranker'} | "
                     f"{_fig(r[f'test_ranked_pass@{k_hi}']) if ranked else '–'} | {used} | "
                     f"{_fig(r['programs_executed'], pct=False)} | {_fig(r['train_wall_s'], pct=False)} | "
                     f"{', '.join(r['status'])} |")
    if any(r["actors_busy"]["mean"] is not None for r in summary):
        lines += ["", "Throughput over the iterations (async mode: the learner's rounds while the actors sample):", "",
                  "| algorithm | mode | iterations wall (s) | actors busy | learner busy | programs sampled/s | "
                  "optimiser steps/s |", "| --- | --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in summary:
            lines.append(f"| {r['label']} | {r['mode']} | {_fig(r['train_wall_s'], pct=False)} | " +
                         " | ".join(_fig(r[k], pct=False, digits=2) for k in THROUGHPUT_KEYS) + " |")
    if any(r.get("wall") for r in summary):
        ref = next(w for r in summary if r.get("wall") for w in r["wall"].values())["reference"]
        lines += ["", f"Validation pass@1 against wall time (wall_curve.png; each point at the end of the iteration "
                  f"that evaluated it, the warm start at 0 s; {int(LEVEL * 100)}% bootstrap interval over problems), "
                  f"against `{ref}`'s final validation pass@1 and its wall time, per seed:", "",
                  "| algorithm | seed | mode | final validation pass@1 | at wall (s) | wall to reach "
                  f"{ref}'s final (s) | × {ref}'s wall | validation pass@1 at {ref}'s wall |",
                  "| --- | ---: | --- | ---: | ---: | ---: | ---: | ---: |"]
        for r in summary:
            for seed, w in (r.get("wall") or {}).items():
                f = w["final"]
                ci = f" [{100 * f['low']:.1f}, {100 * f['high']:.1f}]" if f.get("low") is not None else ""
                reach = "never" if w["reach_s"] is None else f"{w['reach_s']:.0f}"
                ratio = "–" if w["reach_ratio"] is None else f"{w['reach_ratio']:.2f}"
                at = "–" if w["at_reference_wall"] is None else f"{100 * w['at_reference_wall']:.1f}%"
                lines.append(f"| {r['label']} | {seed} | {r['mode']} | {100 * f['pass@1']:.1f}%{ci} | "
                             f"{f['wall_s']:.0f} | {reach} | {ratio} | {at} |")
    ws = summary[0]["warm_start_test_pass@1"] if summary else None
    lines += ["", f"Warm start (θ_ckpt) test pass@1: {_fig(ws) if ws else '–'}.", "",
              f"Paired differences of test pass@1 in points, {int(LEVEL * 100)}% percentile bootstrap interval over "
              f"problems (same evaluation seeds, problem by problem):", "",
              "| algorithm | vs warm start | ranked vs warm start | vs bcoder | ranked vs bcoder ranked |",
              "| --- | --- | --- | --- | --- |"]
    for r in summary:
        p = r["paired"]
        lines.append(f"| {r['label']} | {_interval(p, 'vs_warm_start')} | {_interval(p, 'ranked_vs_warm_start')} | "
                     f"{_interval(p, 'vs_bcoder')} | {_interval(p, 'ranked_vs_bcoder_ranked')} |")
    lines += ["", "Off-policy reuse: reads by the learners of each program the run generated (greedy baselines "
              "included; human programs not counted), over all its stages and iterations:", "",
              "| algorithm | mean reads per generated row | max reads | share never read |", "| --- | ---: | ---: | ---: |"]
    for r in summary:
        lines.append(f"| {r['label']} | {_fig(r['reuse_reads_mean'], pct=False, digits=2)} | "
                     f"{_fig(r['reuse_reads_max'], pct=False)} | {_fig(r['reuse_never_read_share'])} |")
    if sweeps_out:
        lines += ["", f"Sweeps: chosen per algorithm by validation {info['select_by']}@1 (mean over seeds) of the "
                  f"last iteration's validation evaluation; the test split is reported for the chosen setting only.",
                  "", "| algorithm | setting | validation pass@1 | chosen |", "| --- | --- | ---: | :---: |"]
        for label, s in sweeps_out.items():
            for row in s["grid"]:
                note = "" if row["validation_is_last"] else f" (iteration {row['validation_iteration']})"
                lines.append(f"| {label} | {', '.join(f'{k}={v}' for k, v in row['setting'].items())} | "
                             f"{_fig(row['validation'])}{note} | {'✓' if row['setting'] == s['chosen'] else ''} |")
    lines += ["", "figure1.png: probe pass rate on a fixed set of training problems (sampled after every "
              "iteration, outside the budget) against programs sampled; the warm start at 0.", ""]
    return "\n".join(lines)


def figure1(summary: list[dict], results: list[dict], path: Path) -> None:
    from bcoder_ray.evaluation.plots import plot_budget_curve

    curves = {}
    for r in summary:
        runs = [x for x in results if x["label"] == r["label"] and x["setting"] == r["setting"]]
        curves[r["label"]] = [x["probe"] for x in runs]
    plot_budget_curve(curves, path)


# ---------------------------------------------------------------------------------------------- main
def parse_args(argv: list[str]):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Other arguments are config overrides for every run: --section.key value")
    p.add_argument("--algorithms", nargs="+", required=True, metavar="SPEC",
                   help="[LABEL=]NAME[:--key value ...] or [LABEL=]config=NAME / PATH.yaml[:...]; NAME a registered "
                        "algorithm or a preset: " + presets_help())
    p.add_argument("--budget", type=int, required=True, help="run.budget_programs of every run")
    p.add_argument("--out", required=True, help="the comparison folder")
    p.add_argument("--config", default=None, help="the common config (shipped name or path; default: embedded)")
    p.add_argument("--seeds", type=int, default=1, help="seeds per algorithm (run.seed = seed0, seed0+1, ...)")
    p.add_argument("--seed0", type=int, default=0, help="the first seed (also the shared warm start's seed)")
    p.add_argument("--probe-problems", type=int, default=16, help="run.probe_problems (Figure 1's probe set)")
    p.add_argument("--sweep", action="append", default=[], metavar="[LABEL:]KEY=V1,V2,...",
                   help="settings to choose from on the validation split; repeatable (grid = product)")
    p.add_argument("--select-by", choices=("pass", "ranked_pass"), default="pass",
                   help="validation metric@1 a sweep maximises (ranked_pass falls back to pass without a ranker)")
    p.add_argument("--report-only", action="store_true",
                   help="write the report from the completed run folders, whatever code version made them (no run)")
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE")
    args, common = p.parse_known_args(argv)
    if args.budget < 1 or args.seeds < 1:
        p.error("--budget and --seeds must be >= 1")
    return args, common


def main(argv: list[str] | None = None) -> int:
    args, common = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    from bcoder_ray.algorithms import algorithm_names, import_modules

    out = Path(args.out)
    code = code_version()
    prov = provenance(code)
    try:
        import_modules(args.imports)
        specs = [parse_spec(s, algorithm_names()) for s in args.algorithms]
        labels = [s.label for s in specs]
        if len(set(labels)) != len(labels):
            raise ConfigError(f"algorithm labels {labels} repeat; name them LABEL=SPEC")
        sweeps = parse_sweeps(args.sweep)
        unknown = sorted({t for t, _, _ in sweeps if t is not None} - set(labels))
        if unknown:
            raise ConfigError(f"--sweep names unknown algorithm label(s) {unknown}; labels: {labels}")
        seeds = [args.seed0 + i for i in range(args.seeds)]
        jobs, cfgs = [], []
        for spec in specs:
            for setting in grid_for(spec.label, sweeps):
                for seed in seeds:
                    job, cfg = plan_job(spec, seed, setting, common, args, out, code)
                    jobs.append(job)
                    cfgs.append(cfg)
        if sweeps and any(c.suite.validation_split is None for c in cfgs):
            raise ConfigError("--sweep needs a validation split to choose on, and suite.validation_split is null: "
                              "no validation figures exist (a setting is never chosen on the test split)")
        views = {}
        for job, cfg in zip(jobs, cfgs):
            view = comparable_view(cfg.to_dict())
            view["run"].pop("seed")
            for k in job.setting:
                section, _, rest = k.partition(".")
                if section in view and isinstance(view[section], dict):
                    view[section] = {**view[section], rest.split(".")[0]: "(swept)"}
            views.setdefault(json.dumps(view, sort_keys=True, default=str), []).append(job.run_dir.name)
        if len(views) > 1:
            raise ConfigError("the runs differ in suite / model / executor / evaluation / budget settings, so they "
                              f"are not comparable: groups {list(views.values())}")
    except (ConfigError, KeyError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2

    from bcoder_ray.loop.ray_session import ray_session

    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    if args.report_only:
        from bcoder_ray.loop.run_folder import STATE_FILE, RunState

        missing = [str(j.run_dir) for j in jobs if not (j.run_dir / STATE_FILE).exists()
                   or RunState.load(j.run_dir).final_test is None]
        if missing:
            print(f"--report-only: no completed run in {missing}", file=sys.stderr)
            return 2
        for job in jobs:
            job.status = "reused" if reusable(job) else "report-only"
    todo = [] if args.report_only else [job for job in jobs if not reusable(job)]
    for job in jobs:
        if job not in todo and not args.report_only:
            execute(job, args, prov)  # marks it reused
    if todo:
        with ray_session(cfgs[0]):  # one Ray instance for every run (the driver joins it)
            for job in todo:
                execute(job, args, prov)

    ks = sorted({1, *cfgs[0].evaluation.ks})
    results = [run_result(j, ks) for j in jobs]
    chosen, sweeps_out = {}, {}
    for spec in specs:
        grid = grid_for(spec.label, sweeps)
        if grid == [{}]:
            chosen[spec.label] = {}
            continue
        chosen[spec.label], rows = choose(spec.label, grid, results, args.select_by)
        sweeps_out[spec.label] = {"grid": rows, "chosen": chosen[spec.label]}
    summary = summarise(labels, chosen, results, ks)
    c0 = cfgs[0]
    info = {"suite": c0.suite.name, "train_split": c0.suite.train_split, "validation_split": c0.suite.validation_split,
            "test_split": c0.suite.test_split, "budget": args.budget, "seeds": seeds, "code": code,
            "test_problems": c0.suite.max_eval_problems or "all", "eval_samples": c0.evaluation.samples_per_problem,
            "select_by": args.select_by, "probe_problems": args.probe_problems, "common_overrides": common,
            "specs": [dataclasses.asdict(s) for s in specs]}
    starts = sorted({str(r["theta_ckpt"]) for r in results})
    info["run_code"] = sorted({json.dumps(r["code"], sort_keys=True) for r in results})
    info["warm_starts"] = ("one warm start (θ_ckpt) shared by every run" if len(starts) == 1 else
                           f"{len(starts)} different warm starts (θ_ckpt): {starts}")
    md = markdown(summary, sweeps_out, info, ks)
    (out / "compare.md").write_text(md)
    figure1(summary, results, out / "figure1.png")
    if any(r.get("wall") for r in summary):
        from bcoder_ray.evaluation.plots import plot_wall_curve

        plot_wall_curve({r["label"]: list(r["validation_curve"].values()) for r in summary}, out / "wall_curve.png")
    report = {"info": info, "provenance": prov, "algorithms": summary, "sweeps": sweeps_out, "runs": results,
              "reused": all(r["status"] == "reused" for r in results), "wall_s": time.time() - started,
              "no_validation": c0.suite.validation_split is None}
    (out / "compare.json").write_text(json.dumps(report, indent=2, default=str) + "\n")
    print(md)
    print(f"comparison folder: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
