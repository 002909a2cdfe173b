"""Evaluation: sample m candidates per problem, execute them, score them with R̃, save them, compute the metrics.

    models = load_models(checkpoint, theta_dir=run / "theta", phi_dir=run / "phi")   # or a plain HF LM alone
    with Executor(workers=2) as executor:
        metrics = evaluate(load_suite("embedded", "test", limit=20), models, executor, SamplingSettings(m=8),
                           out_dir="runs/x/eval/final", ks=(1, 5))

- `sample_and_score` is the one path from problems to scored candidates, on already-loaded models: Q-sampling
  (`bcoder_ray.sampling`, Algorithm 2), decoding, execution on the hidden tests and on the example tests
  (`envs.scoring`, the executor's batch path), and R̃ (`bcoder_ray.ranking`, eq. 19–20) when a ranker is
  given. The run loop's actors, `evaluate` and `generate` all call it; it returns `ScoredCandidate`s carrying
  the token ids and execution results as well as the candidate records, so a rollout can build buffer rows
  from the same objects.
- `evaluate` writes `candidates.jsonl` and `metrics.json` (`bcoder_ray.metrics`) into an output folder; every
  number in `metrics.json` is recomputable from `candidates.jsonl` with `metrics_from_candidates`.
- `rank_candidates_file` ranks candidates written by another model (the paper's Table 3): it reads a JSONL of
  candidates, executes those that carry no verdict, computes R̃ with a trained Q and writes full records.
- `generate` samples m programs for one problem, drops those failing its example tests (when it has some),
  and returns them ranked by R̃, best first (`experiments/generate.py`).

Which model samples: a checkpoint of this system is θ (`QModel.save_theta`: a plain LM + value heads) with the
θ_ckpt it was trained from and φ (`save_phi`), needed for V_θ when θ uses it; sampling uses θ, ranking θ and φ.
A plain Hugging Face LM samples as θ_ckpt and has no R̃, unless another model's Q is given as ranker.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from bcoder_ray import ranking, sampling
from bcoder_ray.metrics import (CANDIDATES_FILE, METRICS_FILE, CandidateError, CandidateRecord,
                                as_candidate_records, metrics_from_candidates, read_candidates,
                                rtilde_outcome_order, write_candidates)
from bcoder_ray.q_model import META_FILE, QModel
from bcoder_ray.report import write_json
from bcoder_ray.tokenization import decode_program, encode_program, encode_prompt, eos_id, pad_id
from envs import scoring
from envs.jsonl import iter_jsonl
from envs.problem import Problem
from envs.result import ExecResult

DEFAULT_GAMMA = 0.999  # the paper's discount; R̃ (eq. 20) uses the γ the Q model was trained with


@dataclass(frozen=True)
class SamplingSettings:
    """How candidates are sampled (Algorithm 2: temperature, then top-p). Paper: m = 256, T = 0.6 for
    pass@{1,5}; m = 1000, T = 0.4 in the filtered setting."""

    m: int = 8  # candidates per problem
    temperature: float = 0.6
    top_p: float = 0.95
    max_prompt_len: int = 600  # prompt tokens kept (from the end)
    max_new_tokens: int = 512  # program tokens (cut there, no EOS)
    seed: int = 0
    prompts_per_call: int = 4  # prompts per batched sampling call (each expanded to m rows)

    def __post_init__(self) -> None:
        if self.m < 1 or self.max_new_tokens < 1 or self.max_prompt_len < 1 or self.prompts_per_call < 1:
            raise ValueError(f"SamplingSettings: m, lengths and prompts_per_call must be >= 1, got {self}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingSettings: temperature must be >= 0 and top_p in (0, 1], got {self}")


@dataclass
class LoadedModels:
    """What `sample_and_score` needs of the models: the sampler, which of its networks samples, the tokenizer,
    and the ranker (a QModel holding θ and, when θ uses it, φ), with labels for the records."""

    sampler: QModel
    network: str  # "theta" (a checkpoint of this system) or "ckpt" (a plain LM)
    tokenizer: Any
    label: str
    ranker: QModel | None = None
    ranker_label: str | None = None
    gamma: float = DEFAULT_GAMMA
    info: dict = field(default_factory=dict)  # paths it was loaded from


@dataclass
class ScoredCandidate:
    """One sampled program with everything computed about it."""

    problem: Problem
    sample_index: int
    prompt_ids: list[int]
    program_ids: list[int]
    program: str
    result: ExecResult | None  # hidden tests (None when not executed)
    example_result: ExecResult | None  # example tests (None when not run or the problem has none)
    rtilde: float | None
    model: str
    ranker: str | None

    def record(self) -> CandidateRecord:
        if self.result is None:
            raise ValueError(f"{self.problem.key} sample {self.sample_index}: not executed, no candidate record")
        return CandidateRecord(
            suite=self.problem.suite, split=self.problem.split, problem_id=self.problem.problem_id,
            difficulty=self.problem.difficulty, sample_index=self.sample_index, program=self.program,
            outcome=self.result.outcome.value, reward=self.result.reward, passed=self.result.passed,
            example_passed=None if self.example_result is None else self.example_result.passed,
            rtilde=self.rtilde, model=self.model, ranker=self.ranker if self.rtilde is not None else None)


def _uses_phi(theta_dir: str | os.PathLike) -> bool:
    path = Path(theta_dir) / META_FILE
    if not path.exists():
        raise FileNotFoundError(f"{path}: missing; {theta_dir} was not saved by QModel.save_theta")
    with open(path, encoding="utf-8") as f:
        return bool(json.load(f).get("uses_phi", True))


def default_label(path: str | os.PathLike) -> str:
    """A checkpoint's name for tables: its folder's name, or its parent's for a generic one (Ray Train's
    `.../theta-iter1-126aff/final`)."""
    p = Path(path)
    return p.parent.name if p.name in ("final", "checkpoint") or p.name.startswith("checkpoint_") else p.name


def load_models(checkpoint: str | os.PathLike, *, theta_dir: str | os.PathLike | None = None,
                phi_dir: str | os.PathLike | None = None, tokenizer: str | os.PathLike | None = None,
                label: str | None = None, gamma: float = DEFAULT_GAMMA, rank: bool = True,
                device: str | None = None, dtype: Any = None) -> LoadedModels:
    """Load a checkpoint for evaluation: θ (+ φ for ranking) of this system over θ_ckpt `checkpoint`, or, without
    `theta_dir`, the plain LM `checkpoint` (no ranker). `tokenizer` defaults to θ's folder, then the checkpoint's.
    With `rank`, θ is also the ranker when it can compute V_θ (φ given, or θ trained without φ)."""
    from transformers import AutoTokenizer

    checkpoint = str(checkpoint)
    if theta_dir is None:
        model = QModel.create(checkpoint, parts=("ckpt",), dtype=dtype, device=device)
        network, ranker = "ckpt", None
    else:
        theta_dir = str(theta_dir)
        needs_phi = _uses_phi(theta_dir)
        can_rank = rank and (phi_dir is not None or not needs_phi)
        parts = ("theta", "phi") if (can_rank and needs_phi) else ("theta",)
        model = QModel.create(checkpoint, parts=parts, theta_dir=theta_dir,
                              phi_dir=str(phi_dir) if "phi" in parts else None, dtype=dtype, device=device)
        network, ranker = "theta", model if can_rank else None
    tok_path = str(tokenizer or (theta_dir if theta_dir and (Path(theta_dir) / "tokenizer_config.json").exists()
                                 else checkpoint))
    name = label or default_label(theta_dir or checkpoint)
    return LoadedModels(sampler=model, network=network, tokenizer=AutoTokenizer.from_pretrained(tok_path),
                        label=name, ranker=ranker, ranker_label=name if ranker is not None else None, gamma=gamma,
                        info={"checkpoint": checkpoint, "theta_dir": theta_dir,
                              "phi_dir": None if phi_dir is None else str(phi_dir), "tokenizer": tok_path})


def run_checkpoints(run_dir: str | os.PathLike) -> tuple[str, str | None, str | None]:
    """(θ_ckpt, latest θ, latest φ) recorded in a run folder's `state.json` (written by `experiments/run.py`)."""
    path = Path(run_dir) / "state.json"
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file (is {run_dir} a run folder of experiments/run.py?)")
    state = json.loads(path.read_text(encoding="utf-8"))
    if not state.get("theta_ckpt"):
        raise ValueError(f"{path}: no 'theta_ckpt' recorded")
    return state["theta_ckpt"], state.get("theta"), state.get("phi")


def rtilde_of(ranker: QModel, prompt_ids: Sequence[Sequence[int]], program_ids: Sequence[Sequence[int]], *,
              tokenizer: Any, gamma: float, batch_size: int = 16) -> list[float]:
    """R̃ (eq. 19–20) of each (prompt, program) pair: `bcoder_ray.ranking.score_programs`."""
    if not program_ids:
        return []
    return ranking.score_programs(ranker, prompt_ids, program_ids, gamma=gamma, pad_id=pad_id(tokenizer),
                                  batch_size=batch_size)


def sample_and_score(problems: Sequence[Problem], models: LoadedModels, executor: Any | None,
                     settings: SamplingSettings, *, examples: bool = True, rank: bool = True,
                     prompt_ids: Sequence[Sequence[int]] | None = None,
                     rank_batch_size: int = 16) -> list[ScoredCandidate]:
    """Sample `settings.m` programs per problem with `models.sampler`, execute them on the hidden tests (and on
    the example tests when `examples` and the problem has some; skipped when `executor` is None), score them
    with R̃ when `rank` and `models.ranker`; returns problem-major candidates (problem 0's m first).

    `prompt_ids` (one per problem) may be passed when already encoded; by default they are
    `encode_prompt(tokenizer, problem.prompt, settings.max_prompt_len)`. The sampling seed is `settings.seed`
    for the whole call, so the same call gives the same candidates."""
    problems = list(problems)
    tok = models.tokenizer
    if prompt_ids is None:
        prompt_ids = [encode_prompt(tok, p.prompt, settings.max_prompt_len) for p in problems]
    elif len(prompt_ids) != len(problems):
        raise ValueError(f"sample_and_score: {len(problems)} problems but {len(prompt_ids)} prompts")
    if not problems:
        return []
    sampled = sampling.sample_programs(
        models.sampler, prompt_ids, settings.m, max_new_tokens=settings.max_new_tokens, eos_id=eos_id(tok),
        pad_id=pad_id(tok), temperature=settings.temperature, top_p=settings.top_p, seed=settings.seed,
        batch_size=settings.prompts_per_call * settings.m, network=models.network)
    flat_problems = [p for p in problems for _ in range(settings.m)]
    flat_prompts = [list(ids) for ids in prompt_ids for _ in range(settings.m)]
    flat_ids = [list(ids) for per_problem in sampled for ids in per_problem]
    texts = [decode_program(tok, ids) for ids in flat_ids]

    results: list[ExecResult | None] = [None] * len(texts)
    example_results: list[ExecResult | None] = [None] * len(texts)
    if executor is not None:
        results = list(scoring.score_programs(executor, flat_problems, texts))
        if examples:
            example_results = scoring.score_examples(executor, flat_problems, texts)
    ranker = models.ranker if rank else None
    scores: list[float | None] = [None] * len(texts)
    if ranker is not None:
        scores = list(rtilde_of(ranker, flat_prompts, flat_ids, tokenizer=tok, gamma=models.gamma,
                                batch_size=rank_batch_size))
    return [ScoredCandidate(problem=p, sample_index=i % settings.m, prompt_ids=pr, program_ids=ids, program=text,
                            result=res, example_result=ex, rtilde=score, model=models.label,
                            ranker=models.ranker_label if ranker is not None else None)
            for i, (p, pr, ids, text, res, ex, score) in enumerate(
                zip(flat_problems, flat_prompts, flat_ids, texts, results, example_results, scores))]


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


def evaluate(problems: Sequence[Problem], models: LoadedModels, executor: Any, settings: SamplingSettings,
             out_dir: str | os.PathLike, *, ks: Sequence[int] = (1, 5), examples: bool = True, rank: bool = True,
             ci_level: float = 0.95, meta: Mapping[str, Any] | None = None,
             n_at_k_pairs: Sequence[tuple[int, int]] = ()) -> dict:
    """Sample, execute, rank and save one checkpoint's candidates for `problems`; returns the metrics written to
    `out_dir/metrics.json` (the folder also holds `candidates.jsonl`)."""
    if max(ks) > settings.m:
        raise ValueError(f"evaluate: the largest k ({max(ks)}) exceeds m = {settings.m} candidates per problem")
    candidates = sample_and_score(problems, models, executor, settings, examples=examples, rank=rank)
    info = {"label": models.label, "sampling": asdict(settings), "models": models.info,
            "gamma": models.gamma if models.ranker is not None and rank else None}
    info.update(dict(meta or {}))
    return write_evaluation(out_dir, [c.record() for c in candidates], ks=ks, ci_level=ci_level,
                            seed=settings.seed, meta=info, n_at_k_pairs=n_at_k_pairs)


def problems_by_key(problems: Iterable[Problem]) -> dict[tuple[str, str, str], Problem]:
    return {(p.suite, p.split, p.problem_id): p for p in problems}


def rank_candidates_file(in_path: str | os.PathLike, problems: Iterable[Problem], ranker: LoadedModels,
                         executor: Any | None, out_dir: str | os.PathLike, *, ks: Sequence[int] = (1, 5),
                         max_program_len: int = 512, max_prompt_len: int = 600, ci_level: float = 0.95,
                         batch_size: int = 16) -> dict:
    """Table 3: rank programs written by another model with `ranker`'s Q.

    `in_path` is a JSONL whose lines have at least `problem_id` and `program` (and `suite`, `split` unless the
    problems hold one suite and split; `sample_index` defaults to the line's order within its problem; `model`
    to the file's name). Lines that are full candidate records keep their verdicts; the others are executed
    (hidden tests, and example tests where the problem has them), which needs `executor`. Programs are encoded
    with the ranker's tokenizer (`encode_program`, cut at `max_program_len`). Writes candidates (now with R̃ and
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
        hidden = scoring.score_programs(executor, probs, texts)
        example = scoring.score_examples(executor, probs, texts)
        for i, res, ex in zip(to_run, hidden, example):
            rows[i].update(outcome=res.outcome.value, reward=res.reward, passed=res.passed,
                           example_passed=None if ex is None else ex.passed)

    tok = ranker.tokenizer
    if ranker.ranker is None:
        raise ValueError(f"rank_candidates_file: {ranker.label} cannot rank (it needs θ, and φ when θ uses it)")
    prompt_cache: dict[tuple[str, str, str], list[int]] = {}
    prompts, programs = [], []
    for r in rows:
        key = (r["suite"], r["split"], r["problem_id"])
        if key not in prompt_cache:
            prompt_cache[key] = encode_prompt(tok, by_key[key].prompt, max_prompt_len)
        prompts.append(prompt_cache[key])
        programs.append(encode_program(tok, r["program"], max_program_len))
    scores = rtilde_of(ranker.ranker, prompts, programs, tokenizer=tok, gamma=ranker.gamma, batch_size=batch_size)
    default_model = in_path.stem
    records = []
    for r, score in zip(rows, scores):
        p = by_key[(r["suite"], r["split"], r["problem_id"])]
        fields = {k: r[k] for k in ("outcome", "reward", "passed") if k in r}
        fields.update(suite=r["suite"], split=r["split"], problem_id=r["problem_id"],
                      difficulty=r.get("difficulty", p.difficulty), sample_index=r["sample_index"],
                      program=r["program"], example_passed=r.get("example_passed"), rtilde=score,
                      model=r.get("model") or default_model, ranker=ranker.ranker_label)
        records.append(CandidateRecord.from_json(fields, r["where"]))
    meta = {"label": f"{records[0].model} ranked by {ranker.ranker_label}", "ranked_file": str(in_path),
            "models": ranker.info, "gamma": ranker.gamma}
    return write_evaluation(out_dir, records, ks=ks, ci_level=ci_level, meta=meta)


def recompute_metrics(out_dir: str | os.PathLike, ks: Sequence[int] | None = None,
                      ci_level: float | None = None) -> dict:
    """The metrics of an evaluation folder recomputed from its `candidates.jsonl` alone (no sampling)."""
    from bcoder_ray.report import load_metrics

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


def generate(problem: Problem, models: LoadedModels, settings: SamplingSettings, *, executor: Any | None = None,
             use_example_tests: bool = True) -> Generation:
    """Sample m programs for one problem; when it has example tests (and an executor is given) drop those that
    fail them; rank the rest by R̃ (in sampling order when there is no ranker). Candidates are executed on the
    problem's tests only when it has some (an `adhoc_problem` without tests is not executed)."""
    has_tests = problem.example_tests is not None or len(problem.hidden_tests) > 0
    candidates = sample_and_score([problem], models, executor if has_tests else None, settings,
                                  examples=use_example_tests)
    kept = [c for c in candidates
            if not (use_example_tests and c.example_result is not None and not c.example_result.passed)]
    kept.sort(key=lambda c: (-(c.rtilde if c.rtilde is not None else 0.0), c.sample_index))
    return Generation(ranked=kept, sampled=len(candidates), dropped_by_examples=len(candidates) - len(kept))
