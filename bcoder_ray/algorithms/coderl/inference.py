"""Critic Sampling (CodeRL, Figure 3) at inference for a CodeRL run, on the shared candidates path: the run's
published actor samples (`bcoder_ray.model.sampling.sample_programs`, with `prefix` for the seeds' continuations), the
executor runs the example tests (the set F) and the hidden tests, and the run's binary critic φ_test values each
prefix. The procedure itself is `bcoder_ray.algorithms.coderl.critic_sampling.critic_sampling`.

    critic = load_phi_test(run_dir)                    # CriticSamplingRefused unless a CodeRL run with φ_test
    with Executor(workers=2) as ex:
        out = compare_with_plain(problems, sampler, ex, SamplingSettings(m=8), critic, n=8, rounds=2,
                                 out_dir="runs/x/eval/cs", ks=(1, 5))

`compare_with_plain` writes `critic_sampling/` and `plain/` (candidates.jsonl + metrics.json each) under
`out_dir`: the Critic Sampling pool (all rounds: n·rounds programs per problem, the sample budget) and plain
sampling of the same number of programs per problem, both scored by φ_test's p(passed | whole program) and
reported as n@k in the filtered setting (n submissions among the pool's example-test passers, by p(passed)).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any, Sequence

from bcoder_ray.model import sampling
from bcoder_ray.model.ranker import Ranker
from bcoder_ray.algorithms.coderl.critic import Critic, p_passed_prefixes
from bcoder_ray.algorithms.coderl.critic_sampling import CriticSamplingRefused, critic_sampling, require_example_tests
from bcoder_ray.model.batch import collate
from bcoder_ray.model.candidates import Sampler, SamplingSettings, sample_and_score, score_with_reruns
from bcoder_ray.evaluation.metrics import CandidateRecord
from bcoder_ray.model.tokenization import pad_id
from envs import scoring
from envs.problem import Problem

RANKER_LABEL = "phi_test"


def stable_seed(*parts: Any) -> int:
    """A 31-bit seed from JSON-able parts (as `rollout.stable_seed`, without importing Ray)."""
    blob = json.dumps(parts, sort_keys=True, default=str).encode()
    return int.from_bytes(hashlib.sha256(blob).digest()[:4], "big") & 0x7FFFFFFF


def require_examples(problems: Sequence[Problem]) -> None:
    """Refuse Critic Sampling where the problems carry no example tests (the set F needs them)."""
    if problems and all(p.example_tests is None or len(p.example_tests) == 0 for p in problems):
        p = problems[0]
        raise CriticSamplingRefused(f"suite {p.suite!r} split {p.split!r}: its problems carry no example tests; "
                                    f"Critic Sampling keeps the programs that pass them (the filtered setting), so "
                                    f"--critic-sampling cannot run on it")
    for p in problems:
        require_example_tests(p.key, p.example_tests)


def load_phi_test(run, device=None) -> Critic:
    """φ_test of a loaded CodeRL run folder (`run_folder.load_run`)."""
    algo = run.algorithm()
    path = getattr(algo, "critic_test_dir", lambda state: None)(run.state.algorithm)
    if path is None:
        raise CriticSamplingRefused(f"{run.run_dir}: --critic-sampling needs a CodeRL run with a trained binary "
                                    f"critic φ_test (algorithm {run.cfg.algorithm.name!r}; coderl with "
                                    f"critic_test: true)")
    return Critic.load(path, device=device, options=run.context().load_options).eval()


class PhiTestValues:
    """p(passed | w_0…w_t, D) and p(failed | …) of each prefix, and of the whole program, from φ_test."""

    def __init__(self, critic: Critic, pad: int, batch_size: int = 16):
        self.critic, self.pad, self.batch_size = critic, pad, batch_size
        self.device = next(critic.parameters()).device

    def prefixes(self, prompt: Sequence[int], programs: Sequence[Sequence[int]]) -> list[tuple[list, list]]:
        out = []
        for start in range(0, len(programs), self.batch_size):
            part = programs[start:start + self.batch_size]
            batch = collate([{"prompt_ids": list(prompt), "program_ids": list(w), "reward": 0.0, "is_human": False}
                             for w in part], self.pad).to(self.device)
            p_pass, p_fail = p_passed_prefixes(self.critic, batch)
            for i, w in enumerate(part):
                out.append((p_pass[i, :len(w)].tolist(), p_fail[i, :len(w)].tolist()))
        return out


class PhiTestRanker(Ranker):
    """p(passed | whole program, D) from φ_test (its last prefix), the order of Critic Sampling's pool."""

    label = RANKER_LABEL

    def __init__(self, values: PhiTestValues):
        self.values = values

    def score(self, prompt_ids, program_ids) -> list[float]:
        return [v[0][-1] for p, w in zip(prompt_ids, program_ids) for v in self.values.prefixes(p, [w])]


def critic_sampling_records(problems: Sequence[Problem], sampler: Sampler, executor: Any, settings: SamplingSettings,
                            critic: Critic, *, n: int, rounds: int) -> tuple[list[CandidateRecord], list[dict]]:
    """Critic Sampling on each problem: the pool's candidate records (rtilde = φ_test's p(passed), example and
    hidden verdicts) and per-problem round summaries (seed lengths, |F|)."""
    require_examples(problems)
    if sampler.lm is None:
        raise ValueError("Critic Sampling continues program prefixes with the torch sampler: rollout.engine vllm "
                         "does not apply to it")
    tok = sampler.tokenizer
    values = PhiTestValues(critic, pad_id(tok))
    records: list[CandidateRecord] = []
    summaries = []
    for problem in problems:
        prompt = sampler.prompt_ids(problem.prompt, settings.max_prompt_len)

        def sample_fn(prefixes, counts, seed, prompt=prompt, problem=problem):
            out = []
            for j, (prefix, count) in enumerate(zip(prefixes, counts)):
                if count == 0:
                    continue
                out += sampling.sample_programs(
                    sampler.lm, [prompt], count, max_new_tokens=settings.max_new_tokens, eos_id=sampler.stop_ids,
                    pad_id=pad_id(tok), temperature=settings.temperature, top_p=settings.top_p,
                    seed=stable_seed(seed, problem.key, j), batch_size=settings.prompts_per_call * max(1, count),
                    prefix=prefix, stop_strings=sampler.stop_strings)[0]
            return out

        def example_pass_fn(programs, problem=problem):
            texts = [sampler.decode(w) for w in programs]
            return [r is not None and r.passed for r in scoring.score_examples(executor, [problem] * len(texts),
                                                                               texts)]

        result = critic_sampling(n, rounds, sample_fn, example_pass_fn,
                                 lambda programs, prompt=prompt: values.prefixes(prompt, programs),
                                 seed=settings.seed)
        texts = [sampler.decode(w) for w in result.programs]
        hidden = score_with_reruns(executor, [problem] * len(texts), texts)
        for i, (text, res, ex, score) in enumerate(zip(texts, hidden, result.passes_examples, result.p_passed)):
            if res.is_infra:  # no verdict: left out, never a failed sample
                continue
            records.append(CandidateRecord(
                suite=problem.suite, split=problem.split, problem_id=problem.problem_id,
                difficulty=problem.difficulty, sample_index=i, program=text, outcome=res.outcome.value,
                reward=res.reward, passed=res.passed, example_passed=bool(ex), rtilde=float(score),
                model=sampler.label, ranker=RANKER_LABEL))
        summaries.append({"problem": problem.key, "sampled": result.n_sampled,
                          "rounds": [{"seeds": [len(s) for s in r.seeds], "counts": r.counts,
                                      "passing_examples": sum(r.passes_examples)} for r in result.rounds]})
    return records, summaries


def compare_with_plain(problems: Sequence[Problem], sampler: Sampler, executor: Any, settings: SamplingSettings,
                       critic: Critic, *, n: int, rounds: int, out_dir: str | os.PathLike,
                       ks: Sequence[int] = (1, 5), ci_level: float = 0.95) -> dict:
    """Critic Sampling and plain sampling at the same budget (n·rounds programs per problem), each written as an
    evaluation folder; returns {"critic_sampling": metrics, "plain": metrics, "budget": k}."""
    from dataclasses import asdict, replace

    from bcoder_ray.evaluation.evaluate import write_evaluation

    budget = n * rounds
    pairs = [(m, budget) for m in (1, 5) if m <= budget]
    ks = [k for k in ks if k <= budget] or [1]
    out = Path(out_dir)
    records, summaries = critic_sampling_records(problems, sampler, executor, settings, critic, n=n, rounds=rounds)
    common = {"label": sampler.label, "policy": sampler.path, "ranker": RANKER_LABEL, "budget_per_problem": budget}
    cs = write_evaluation(out / "critic_sampling", records, ks=ks, ci_level=ci_level, seed=settings.seed,
                          n_at_k_pairs=pairs, meta={**common, "critic_sampling": {"n": n, "rounds": rounds},
                                                    "sampling": asdict(settings), "rounds": summaries})
    plain_settings = replace(settings, m=budget)
    ranker = PhiTestRanker(PhiTestValues(critic, pad_id(sampler.tokenizer)))
    plain = sample_and_score(problems, sampler, executor, plain_settings, examples=True, ranker=ranker)
    pm = write_evaluation(out / "plain", [CandidateRecord.of(c) for c in plain if not c.infra], ks=ks, ci_level=ci_level, seed=settings.seed,
                          n_at_k_pairs=pairs, meta={**common, "sampling": asdict(plain_settings)})
    return {"critic_sampling": cs, "plain": pm, "budget": budget}


def summary_lines(result: dict) -> list[str]:
    """One line per arm: n@k (filtered) and pass@1 at the shared budget."""
    lines = []
    for arm in ("critic_sampling", "plain"):
        o = result[arm]["overall"]
        nk = ", ".join(f"{key} {100 * v:.1f}%" for key, v in (o.get("n@k") or {}).items() if v is not None)
        lines.append(f"{arm}: {o['n_problems']} problems, {result['budget']} programs each; {nk}")
    return lines
