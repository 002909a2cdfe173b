"""The run folder: its state (`state.json`, written atomically), the rules of a resume, and choosing the folder.

    config.yaml        the resolved config (a resume reads it back)
    state.json         completed iterations, the algorithm's checkpoints, per-iteration records
    buffer/            the replay buffer (unless buffer.uri points elsewhere)
    train/             Ray Train runs: <stage>-iter<k>-<id>/ (checkpoints inside)
    eval/<label>/      candidates.jsonl + metrics.json per evaluation
    tensorboard/       scalars
    metrics.jsonl      one line per completed iteration
    table.md           the final table

Resume (`--resume RUN_DIR`): iterations listed complete in state.json are skipped; the interrupted iteration is
redone from its start. Its rollout tasks have the same keys and seeds, so the buffer's idempotent `append`
writes nothing for a task that already landed (no row lost or duplicated); target writes are keyed the same
way. Its stages that finished are not redone (`in_progress` records them, planned from the algorithm state the
iteration started with); the stage that was running continues under its recorded Ray Train run name from its
last checkpoint (`stages.<stage>.checkpoint_every`; from step 0 without one). Any other Ray Train run gets a
fresh name: an old run is never resumed by accident.
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import json
import sys
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bcoder_ray.algorithms.base import RunContext
from bcoder_ray.buffer.staleness import version_name  # noqa: F401 (the driver's import path; the order lives there)
from bcoder_ray.config import Config, ConfigError, config_from_data, load_config, read_yaml
from bcoder_ray.loop.components import run_context
from bcoder_ray.util.atomic import atomic_write_text

STATE_FILE = "state.json"
CONFIG_FILE = "config.yaml"
TABLE_FILE = "table.md"
METRICS_FILE = "metrics.jsonl"
CONTAMINATION_FILE = "contamination.json"  # evaluation problems also in training (envs/contamination.py)
# Keys a resume may change; the rest define the run and must stay as recorded.
RESUME_MUTABLE = ("run.iterations", "run.progress", "run.tensorboard", "ray.", "executor.", "evaluation.every")


@dataclass
class RunState:
    completed_iterations: int = 0
    seeded: bool = False
    run_id: str = ""
    theta_ckpt: str | None = None  # θ_ckpt path (given or warm-started)
    algorithm: dict = field(default_factory=dict)  # the algorithm's checkpoints (`Algorithm.after_stage`)
    policy: str | None = None  # the published policy (an LM folder); None: θ_ckpt
    policy_version: str = "0"  # of the published policy: "<run_id>/0" = θ_ckpt, "<run_id>/k" = after iteration k-1
    programs_sampled: int = 0  # for training, cumulative: what run.budget_programs counts
    programs_executed: int = 0  # cumulative, generated programs run in the sandbox (cache misses)
    infra_failures: int = 0  # cumulative, programs whose verdict the sandbox could not give (not written)
    human_rows: int = 0
    human_truncated: int = 0  # human programs stored cut at the length limit (labelled by the cut text)
    baseline: dict | None = None  # evaluation of θ_ckpt on the validation split before the first iteration
    baseline_test: dict | None = None  # θ_ckpt on the test split (once)
    final_test: dict | None = None  # the last policy on the test split (once, at the end)
    probe: list[dict] = field(default_factory=list)  # pass rate on the fixed probe set, per iteration
    reuse: dict | None = None  # off-policy reuse of the run's generated rows (bcoder_ray.evaluation.reuse.reuse_stats)
    # the iteration in progress: {"iteration", "algorithm" (the state it planned from), "stages" (the records of
    # its finished stages), "running" ({stage label: Ray Train run name; async mode: its folder under train/}),
    # async mode: "resumable" ({stage label: {"checkpoint", "step"}}, its last resumable checkpoint)}; None between
    # iterations
    in_progress: dict | None = None
    iterations: list[dict] = field(default_factory=list)
    rollout_done: list[str] = field(default_factory=list)  # async mode: the keys of the rollout tasks that landed

    @classmethod
    def load(cls, run_dir: Path) -> "RunState":
        path = run_dir / STATE_FILE
        if not path.exists():
            return cls()
        data = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"{path}: keys {unknown} are not this version's run state (a run folder made "
                              f"before the algorithm interface cannot be resumed; start a new run)")
        return cls(**data)

    def save(self, run_dir: Path) -> None:
        atomic_write_text(run_dir / STATE_FILE, json.dumps(dataclasses.asdict(self), indent=2, default=str) + "\n")




@dataclass
class RunPlan:
    cfg: Config
    run_dir: Path
    resumed: bool = False


def default_run_dir(cfg: Config) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{cfg.run.name}-{stamp}-{uuid.uuid4().hex[:4]}"


def flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    """Dotted keys of a nested config mapping (free-form `options` mappings stay whole)."""
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v and not key.endswith("options"):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def prepare_run(config: str | None = None, overrides: list[str] | None = None, run_dir: str | None = None,
                resume: str | None = None, imports: list[str] | tuple[str, ...] = (),
                check=None) -> RunPlan:
    """Load and validate the config and choose the run folder; no work is started (errors: ConfigError).
    `check(cfg)` runs further checks before anything is written (the driver's component and resource checks)."""
    overrides = list(overrides or [])
    if resume is not None:
        folder = Path(resume)
        if not (folder / CONFIG_FILE).is_file():
            raise ConfigError(f"--resume {resume}: not a run folder (no {CONFIG_FILE})")
        if config is not None:
            raise ConfigError("--resume uses the run's own config.yaml; give only overrides, not --config")
        if run_dir is not None and Path(run_dir).resolve() != folder.resolve():
            raise ConfigError("--resume and --run-dir name different folders")
        data, where = read_yaml(folder / CONFIG_FILE)
        recorded = config_from_data(data, where, imports=imports)
        cfg = config_from_data(data, where, overrides, imports=imports)
        if check is not None:
            check(cfg)
        before, after = flatten(recorded.to_dict()), flatten(cfg.to_dict())
        changed = [k for k in after if before.get(k) != after[k] and not k.startswith(RESUME_MUTABLE)]
        if changed:
            raise ConfigError(f"--resume cannot change {changed}: they define the run (may change: "
                              f"{list(RESUME_MUTABLE)})")
        return RunPlan(cfg, folder, resumed=True)
    cfg = load_config(config, overrides, imports=imports)
    if check is not None:
        check(cfg)
    folder = Path(run_dir or cfg.run.run_dir or default_run_dir(cfg))
    if (folder / STATE_FILE).exists():
        raise ConfigError(f"run folder {folder} already holds a run; continue it with --resume {folder}")
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"run_dir": str(folder)})})
    return RunPlan(cfg, folder, resumed=False)


def write_metrics_lines(run_dir: Path, state: RunState) -> None:
    """metrics.jsonl: one line per completed iteration, rewritten from state.json (so a resume never doubles one)."""
    atomic_write_text(run_dir / METRICS_FILE, "".join(json.dumps(r, default=str) + "\n" for r in state.iterations))


@dataclass
class LoadedRun:
    """A finished (or running) run folder read back: its config, state and algorithm."""

    run_dir: Path
    cfg: Config
    state: RunState

    def algorithm(self):
        from bcoder_ray.algorithms import make_algorithm

        return make_algorithm(self.cfg.algorithm.name, self.cfg.algorithm, self.context(), self.cfg.imports)

    def context(self) -> RunContext:
        """The run's `RunContext`, from its config.yaml and the θ_ckpt its state.json recorded (no buffer)."""
        if not self.state.theta_ckpt:
            raise ConfigError(f"{self.run_dir / STATE_FILE}: no 'theta_ckpt' recorded")
        return run_context(self.cfg, self.state.theta_ckpt)

    def policy_path(self) -> str:
        return self.state.policy or str(self.state.theta_ckpt)


def load_run(run_dir: str | Path) -> LoadedRun:
    folder = Path(run_dir)
    if not (folder / CONFIG_FILE).is_file() or not (folder / STATE_FILE).is_file():
        raise ConfigError(f"{folder}: not a run folder of experiments/run.py (needs {CONFIG_FILE} and {STATE_FILE})")
    data, where = read_yaml(folder / CONFIG_FILE)
    return LoadedRun(folder, config_from_data(data, where, check_paths=False), RunState.load(folder))


def sampler_and_ranker(*, checkpoint: str | None = None, run_dir: str | None = None, rank_with: str | None = None,
                       rank: bool = True, tokenizer: str | None = None, label: str | None = None,
                       device: str | None = None, need_sampler: bool = True, chat_template: bool | None = None,
                       stop_strings: list[str] | None = None, response_prefix: str | None = None):
    """(sampler, ranker, the ranker's tokenizer path) for the command-line tools: sample from `checkpoint` (any
    LM) or `run_dir`'s published policy; rank with `rank_with`'s ranker, else `run_dir`'s (when its algorithm
    has one and `rank`). Prompts and stop strings as `run_dir`'s run has them (plain without one), unless
    `chat_template` / `stop_strings` are given. `checkpoint` and `tokenizer` may name a GGUF file or a packaged
    checkpoint (converted once: `bcoder_ray.model.gguf.resolve_checkpoint`). ValueError / ConfigError /
    FileNotFoundError name what is missing."""
    from bcoder_ray.algorithms import load_ranker
    from bcoder_ray.model.candidates import load_sampler
    from bcoder_ray.model.gguf import resolve_checkpoint
    from bcoder_ray.model.tokenization import TextFormat

    def say(line: str) -> None:  # a first conversion takes a while: say so
        print(line, file=sys.stderr, flush=True)

    checkpoint = resolve_checkpoint(checkpoint, log=say) if checkpoint else checkpoint
    tokenizer = resolve_checkpoint(tokenizer, log=say) if tokenizer else tokenizer

    run = load_run(run_dir) if run_dir else None
    ranking_run = None if not rank else (load_run(rank_with) if rank_with else run)
    ref = ranking_run.algorithm().ranker(ranking_run.state.algorithm) if ranking_run else None
    if rank_with and ref is None:
        raise ValueError(f"--rank-with {rank_with}: its algorithm {ranking_run.cfg.algorithm.name!r} has no "
                         f"ranker (or none trained yet)")
    ranker = load_ranker(ref, ranking_run.context(), ranking_run.cfg.imports, device) if ref else None
    rank_tokenizer = ranking_run.context().tokenizer_path if ref else None
    path = checkpoint or (run.policy_path() if run else None)
    if path is None:
        if need_sampler:
            raise ValueError("give --checkpoint (any Hugging Face LM) or --run-dir (a run folder)")
        return None, ranker, rank_tokenizer
    ctx = run.context() if run else None  # the run's load options (its revision only for its θ_ckpt)
    if ctx is None:
        tok, fmt, options, theta_ckpt, eos_token_ids = tokenizer, TextFormat(), None, None, None
    else:
        tok = tokenizer or (None if checkpoint else ctx.tokenizer_path)
        fmt, options, theta_ckpt, eos_token_ids = ctx.text_format(), ctx.load_options, ctx.theta_ckpt, ctx.eos_token_ids
    text_format = TextFormat(chat_template=fmt.chat_template if chat_template is None else chat_template,
                             stop_strings=fmt.stop_strings if stop_strings is None else tuple(stop_strings),
                             response_prefix=fmt.response_prefix if response_prefix is None else response_prefix)
    sampler = load_sampler(path, tokenizer=tok, label=label, device=device, options=options, checkpoint=theta_ckpt,
                           eos_token_ids=eos_token_ids, text_format=text_format)
    return sampler, ranker, rank_tokenizer
