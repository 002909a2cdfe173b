"""Evaluation: candidates (`bcoder_ray.model.candidates`: sample → execute → rank) saved with their metrics.

    sampler = load_sampler(policy_dir, tokenizer=tok, label="theta-iter2")
    run = load_run("runs/x")                                     # optional: any algorithm's ranker
    ranker = load_ranker(run.algorithm().ranker(run.state.algorithm), run.context())
    with Executor(workers=2) as executor:
        metrics = evaluate(load_suite("embedded", "test")[:20], sampler, executor, SamplingSettings(m=8),
                           out_dir="runs/x/eval/final", ks=(1, 5), ranker=ranker)

- `evaluate` writes `candidates.jsonl` and `metrics.json` (`bcoder_ray.evaluation.metrics`) into an output folder; every
  number in `metrics.json` is recomputable from `candidates.jsonl` with `metrics_from_candidates`.
- `rank_candidates_file` ranks candidates written by another model with any algorithm's ranker (B-Coder's R̃,
  CodeRL's critic; the paper's Table 3): it reads a JSONL of candidates, executes those that carry no verdict,
  scores them and writes full records.
- `generate` samples m programs for one problem, drops those failing its example tests (when it has some),
  and returns them ranked, best first (`experiments/generate.py`).
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from bcoder_ray.model.ranker import Ranker
from bcoder_ray.model.candidates import Sampler, SamplingSettings, ScoredCandidate, sample_and_score, score_with_reruns
from bcoder_ray.evaluation.metrics import (CANDIDATES_FILE, METRICS_FILE, CandidateError, CandidateRecord,
                                as_candidate_records, metrics_from_candidates, read_candidates,
                                rtilde_outcome_order, write_candidates)
from bcoder_ray.evaluation.report import write_json
from bcoder_ray.model.tokenization import TextFormat, encode_program
from envs import scoring
from envs.jsonl import iter_jsonl
from envs.problem import Problem


def write_evaluation(out_dir: str | os.PathLike, records: Iterable[CandidateRecord | Mapping], *,
                     ks: Sequence[int] = (1, 5), ci_level: float = 0.95, seed: int = 0,
                     meta: Mapping[str, Any] | None = None, n_at_k_pairs: Sequence[tuple[int, int]] = ()) -> dict:
    """Write `candidates.jsonl` and `metrics.json` (metrics of the records, plus `meta` — label, sampling,
    iteration, checkpoint paths — and the R̃-by-outcome statement when the records have R̃); return the
    metrics."""
    out_dir = Path(out_dir)
    records = as_candidate_records(records)
    write_candidates(out_dir / CANDIDATES_FILE, records)
    metrics = metrics_from_candidates(records, ks=ks, ci_level=ci_level, seed=seed, n_at_k_pairs=n_at_k_pairs)
    metrics.update(dict(meta or {}))
    metrics["candidates_file"] = CANDIDATES_FILE
    if any(r.rtilde is not None for r in records):
        metrics["rtilde_order"] = rtilde_outcome_order(records)
    write_json(out_dir / METRICS_FILE, metrics)
    return metrics


def evaluate(problems: Sequence[Problem], sampler: Sampler, executor: Any, settings: SamplingSettings,
             out_dir: str | os.PathLike, *, ks: Sequence[int] = (1, 5), examples: bool = True,
             ranker: Ranker | None = None, ci_level: float = 0.95, meta: Mapping[str, Any] | None = None,
             n_at_k_pairs: Sequence[tuple[int, int]] = ()) -> dict:
    """Sample, execute, rank and save one policy's candidates for `problems`; returns the metrics written to
    `out_dir/metrics.json` (the folder also holds `candidates.jsonl`)."""
    if max(ks) > settings.m:
        raise ValueError(f"evaluate: the largest k ({max(ks)}) exceeds m = {settings.m} candidates per problem")
    candidates = sample_and_score(problems, sampler, executor, settings, examples=examples, ranker=ranker)
    info = {"label": sampler.label, "sampling": asdict(settings), "policy": sampler.path,
            "ranker": ranker.label if ranker is not None else None,
            "infra_failures": sum(c.infra for c in candidates)}  # no verdict on any re-run: left out
    info.update(dict(meta or {}))
    return write_evaluation(out_dir, [CandidateRecord.of(c) for c in candidates if not c.infra], ks=ks, ci_level=ci_level,
                            seed=settings.seed, meta=info, n_at_k_pairs=n_at_k_pairs)


def problems_by_key(problems: Iterable[Problem]) -> dict[tuple[str, str, str], Problem]:
    return {(p.suite, p.split, p.problem_id): p for p in problems}


def rank_candidates_file(in_path: str | os.PathLike, problems: Iterable[Problem], ranker: Ranker, tokenizer: Any,
                         executor: Any | None, out_dir: str | os.PathLike, *, ks: Sequence[int] = (1, 5),
                         max_program_len: int = 512, max_prompt_len: int = 600, ci_level: float = 0.95,
                         text_format: TextFormat = TextFormat()) -> dict:
    """Table 3: rank programs written by another model with `ranker` (any algorithm's; token ids from
    `tokenizer`, the ranker's own).

    `in_path` is a JSONL whose lines have at least `problem_id` and `program` (and `suite`, `split` unless the
    problems hold one suite and split; `sample_index` defaults to the line's order within its problem; `model`
    to the file's name). Lines that are full candidate records keep their verdicts; the others are executed
    (hidden tests, and example tests where the problem has them), which needs `executor`. Programs are encoded
    with the ranker's tokenizer (`encode_program`, cut at `max_program_len`), prompts in the ranker's run's format
    (`text_format`: its `model.chat_template` and `model.response_prefix`). Writes candidates (now with R̃ and
    `ranker`) and metrics into `out_dir`; returns the metrics.
    """
    in_path = Path(in_path)
    by_key = problems_by_key(problems)
    suites = {k[0] for k in by_key}
    splits = {k[1] for k in by_key}
    rows: list[dict] = []
    counters: dict[tuple[str, str, str], int] = {}
    for where, d in iter_jsonl(in_path, CandidateError):
        if not isinstance(d, dict) or not isinstance(d.get("program"), str) or "problem_id" not in d:
            raise CandidateError(f"{where}: needs at least 'problem_id' and 'program' (a string)")
        suite = d.get("suite") or (next(iter(suites)) if len(suites) == 1 else None)
        split = d.get("split") or (next(iter(splits)) if len(splits) == 1 else None)
        key = (suite, split, str(d["problem_id"]))
        if key not in by_key:
            raise CandidateError(f"{where}: problem {'/'.join(map(str, key))} is not among the problems given")
        index = d.get("sample_index", counters.get(key, 0))
        counters[key] = max(counters.get(key, 0), int(index) + 1)
        rows.append({**d, "suite": key[0], "split": key[1], "problem_id": key[2], "sample_index": int(index),
                     "where": where})
    if not rows:
        raise CandidateError(f"{in_path}: no candidates")

    to_run = [i for i, r in enumerate(rows) if "outcome" not in r]
    if to_run and executor is None:
        raise CandidateError(f"{rows[to_run[0]]['where']}: no verdict ('outcome') and no executor to run it")
    if to_run:
        probs = [by_key[(rows[i]["suite"], rows[i]["split"], rows[i]["problem_id"])] for i in to_run]
        texts = [rows[i]["program"] for i in to_run]
        hidden = score_with_reruns(executor, probs, texts)
        example = scoring.score_examples(executor, probs, texts)
        for i, res, ex in zip(to_run, hidden, example):
            if res.is_infra:
                raise CandidateError(f"{rows[i]['where']}: the sandbox gave no verdict on any re-run "
                                     f"({res.infra_error}); rank the file again")
            rows[i].update(outcome=res.outcome.value, reward=res.reward, passed=res.passed,
                           example_passed=None if ex is None else ex.passed)

    tok = tokenizer
    prompt_cache: dict[tuple[str, str, str], list[int]] = {}
    prompts, programs = [], []
    for r in rows:
        key = (r["suite"], r["split"], r["problem_id"])
        if key not in prompt_cache:
            prompt_cache[key] = text_format.prompt_ids(tok, by_key[key].prompt, max_prompt_len)
        prompts.append(prompt_cache[key])
        programs.append(encode_program(tok, r["program"], max_program_len))
    scores = ranker.score(prompts, programs)
    default_model = in_path.stem
    records = []
    for r, score in zip(rows, scores):
        p = by_key[(r["suite"], r["split"], r["problem_id"])]
        fields = {k: r[k] for k in ("outcome", "reward", "passed") if k in r}
        fields.update(suite=r["suite"], split=r["split"], problem_id=r["problem_id"],
                      difficulty=r.get("difficulty", p.difficulty), sample_index=r["sample_index"],
                      program=r["program"], example_passed=r.get("example_passed"), rtilde=score,
                      model=r.get("model") or default_model, ranker=ranker.label)
        records.append(CandidateRecord.from_json(fields, r["where"]))
    meta = {"label": f"{records[0].model} ranked by {ranker.label}", "ranked_file": str(in_path),
            "ranker": ranker.label}
    return write_evaluation(out_dir, records, ks=ks, ci_level=ci_level, meta=meta)


def recompute_metrics(out_dir: str | os.PathLike, ks: Sequence[int] | None = None,
                      ci_level: float | None = None) -> dict:
    """The metrics of an evaluation folder recomputed from its `candidates.jsonl` alone (no sampling)."""
    from bcoder_ray.evaluation.report import load_metrics

    out_dir = Path(out_dir)
    saved = load_metrics(out_dir) if (out_dir / METRICS_FILE).exists() else {}
    ci = (saved.get("overall") or {}).get("pass@1_ci") or {}  # the bootstrap's level, resamples and seed
    return metrics_from_candidates(read_candidates(out_dir), ks=ks or saved.get("ks") or (1, 5),
                                   ci_level=ci_level if ci_level is not None else ci.get("level", 0.95),
                                   n_resamples=ci.get("n_resamples", 2000), seed=ci.get("seed", 0),
                                   n_at_k_pairs=[tuple(p) for p in saved.get("n_at_k_pairs", [])])


# ------------------------------------------------------------------------------------------ generation


def adhoc_problem(prompt: str, tests: Any | None = None, statement: str | None = None,
                  problem_id: str = "adhoc") -> Problem:
    """A Problem for a statement typed by a user: `tests` (a TestSpec) serve as both example and hidden tests.
    Without tests the problem's hidden tests are an empty assert list (nothing is executed: see `generate`)."""
    from envs.problem import TestSpec

    hidden = tests if tests is not None else TestSpec("assert", asserts=())
    return Problem(suite="adhoc", problem_id=problem_id, split="adhoc", statement=statement or prompt,
                   prompt=prompt, hidden_tests=hidden, example_tests=tests)


@dataclass
class Generation:
    """`generate`'s answer: the candidates best first (R̃ descending; those failing the example tests dropped),
    how many were sampled and how many the example tests removed."""

    ranked: list[ScoredCandidate]
    sampled: int
    dropped_by_examples: int

    @property
    def best(self) -> ScoredCandidate | None:
        return self.ranked[0] if self.ranked else None


def generate(problem: Problem, sampler: Sampler, settings: SamplingSettings, *, executor: Any | None = None,
             ranker: Ranker | None = None, use_example_tests: bool = True) -> Generation:
    """Sample m programs for one problem; when it has example tests (and an executor is given) drop those that
    fail them; rank the rest by `ranker` (in sampling order when there is none). Candidates are executed on the
    problem's tests only when it has some (an `adhoc_problem` without tests is not executed)."""
    has_tests = problem.example_tests is not None or len(problem.hidden_tests) > 0
    candidates = sample_and_score([problem], sampler, executor if has_tests else None, settings,
                                  examples=use_example_tests, ranker=ranker)
    kept = [c for c in candidates
            if not (use_example_tests and c.example_result is not None and not c.example_result.passed)]
    kept.sort(key=lambda c: (-(c.rtilde if c.rtilde is not None else 0.0), c.sample_index))
    return Generation(ranked=kept, sampled=len(candidates), dropped_by_examples=len(candidates) - len(kept))
