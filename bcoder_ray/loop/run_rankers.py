"""The rankers of run folders for the side-by-side table (`bcoder_ray.evaluation.rankers`): each run's trained
ranker (`run`: B-Coder's R̃, CodeRL's critic, ...) and its untrained control (`run_untrained`: B-Coder's R̃ of the
Q initialised from θ_ckpt). They live here, not in evaluation, because building them needs the run's algorithm.

Each ranker scores the candidates' text in its own run's tokenizer and prompt format, as `--rank-file` does.
"""

from __future__ import annotations

from pathlib import Path

from bcoder_ray.algorithms import load_ranker
from bcoder_ray.algorithms.base import RankerRef
from bcoder_ray.evaluation.rankers import NamedRanker, RankingInputs, register_ranker, token_score_fn
from bcoder_ray.loop.run_folder import LoadedRun, load_run


def _row(run: LoadedRun, ref: RankerRef, name: str, inputs: RankingInputs) -> NamedRanker:
    ctx = run.context()
    ranker = load_ranker(ref, ctx, run.cfg.imports, inputs.device)
    score = token_score_fn(ranker, ctx.load_tokenizer(), ctx.text_format(), max_prompt_len=inputs.max_prompt_len,
                           max_program_len=inputs.max_program_len)
    note = f"{ref.description or ref.label} ({run.run_dir})"
    return NamedRanker(name, score, note)


def _runs(inputs: RankingInputs, kind: str) -> list[NamedRanker]:
    """One row per run: its trained ranker (`kind` "trained") or its untrained control ("untrained")."""
    suffix = "" if kind == "trained" else " untrained"
    if not inputs.runs:
        return [NamedRanker(f"run{suffix}", None, "no run folder given: --rank-with RUN_DIR [RUN_DIR ...]")]
    rows = []
    for run_dir in inputs.runs:
        run = load_run(run_dir)
        algorithm = run.algorithm()
        name = f"{run.cfg.algorithm.name}:{Path(run_dir).name}{suffix}"
        ref = algorithm.ranker(run.state.algorithm) if kind == "trained" else algorithm.untrained_ranker()
        if ref is None:
            why = "has no ranker (or none trained yet)" if kind == "trained" else "offers no untrained ranker"
            rows.append(NamedRanker(name, None, f"{run.cfg.algorithm.name} {why} ({run_dir})"))
        else:
            rows.append(_row(run, ref, name, inputs))
    return rows


register_ranker("run", lambda inputs: _runs(inputs, "trained"))
register_ranker("run_untrained", lambda inputs: _runs(inputs, "untrained"))
