"""The one path from problems to scored candidates, shared by the rollout, evaluation and generation:
sample (`bcoder_ray.model.sampling`, from a published policy) → execute (`envs.scoring`, hidden and example tests) →
rank (the algorithm's `Ranker`, when given) → `ScoredCandidate`s that build buffer rows and evaluation records
(`bcoder_ray.evaluation.metrics.CandidateRecord.of`).

    sampler = load_sampler(policy_dir or theta_ckpt, tokenizer=tok_path, label="theta-iter2")
    with Executor(workers=2) as executor:
        scored = sample_and_score(problems, sampler, executor, SamplingSettings(m=8), ranker=ranker)

A published policy is a plain Hugging Face LM folder (`from_pretrained` loads it): B-Coder's θ (Q-sampling from
Q_θ/α is sampling from ℓ_θ: `bcoder_ray.model.sampling`), CodeRL's actor, the PPO/GRPO/ReST-EM policies, or θ_ckpt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import torch

from bcoder_ray.model import sampling
from bcoder_ray.model.lm import (LoadOptions, PolicyLM, checkpoint_label, generation_eos_ids, generation_eos_ids_of,
                                 load_lm)
from bcoder_ray.model.ranker import Ranker
from bcoder_ray.model.tokenization import (StopStrings, TextFormat, decode_program, encode_prompt, load_tokenizer, pad_id,
                                    stop_ids)
from bcoder_ray.model.vllm_sampling import ENGINES, VLLMEngine
from bcoder_ray.util.storage import local_dir
from envs import scoring
from envs.problem import Problem
from envs.result import ExecResult


@dataclass(frozen=True)
class SamplingSettings:
    """How candidates are sampled (Algorithm 2: temperature, then top-p). Paper: m = 256, T = 0.6 for
    pass@{1,5}; m = 1000, T = 0.4 in the filtered setting. The one sampling type from the config to the sampler:
    a run builds it once from its `rollout` / `evaluation` section (`bcoder_ray.config.SamplingConfig.settings`)
    and hands it to the actors as is; the command lines build it from their flags."""

    m: int = 8  # candidates per problem (the config's samples_per_problem)
    temperature: float = 0.6
    top_p: float = 0.95
    max_prompt_len: int = 600  # prompt tokens kept (from the end)
    max_new_tokens: int = 512  # program tokens (cut there, no EOS)
    seed: int = 0  # of the whole call; a run's actors use each task's own seed (`bcoder_ray.loop.rollout.Task`)
    prompts_per_call: int = 4  # prompts per batched sampling call (each expanded to m rows)

    def __post_init__(self) -> None:
        if self.m < 1 or self.max_new_tokens < 1 or self.max_prompt_len < 1 or self.prompts_per_call < 1:
            raise ValueError(f"SamplingSettings: m, lengths and prompts_per_call must be >= 1, got {self}")
        if self.temperature < 0 or not 0 < self.top_p <= 1:
            raise ValueError(f"SamplingSettings: temperature must be >= 0 and top_p in (0, 1], got {self}")


@dataclass
class Sampler:
    """A published policy loaded for sampling: the LM as `from_pretrained` loads it, its tokenizer, its name in
    records, the token ids that end a program (EOS first) and the run's text format (chat-templated prompts, stop
    strings)."""

    lm: PolicyLM | None
    tokenizer: Any
    label: str
    path: str
    stop_ids: tuple[int, ...] = ()
    engine: VLLMEngine | None = None  # rollout.engine vllm: it samples, and `lm` is None
    text_format: TextFormat = TextFormat()

    def __post_init__(self) -> None:
        if not self.stop_ids:
            self.stop_ids = stop_ids(self.tokenizer)

    @property
    def stop_strings(self) -> StopStrings | None:
        return self.text_format.stops(self.tokenizer)

    def prompt_ids(self, text: str, max_len: int) -> list[int]:
        return self.text_format.prompt_ids(self.tokenizer, text, max_len)

    def decode(self, ids: Sequence[int]) -> str:
        """A sampled program's text: up to its first stop id, then up to its first stop string."""
        return decode_program(self.tokenizer, ids, self.stop_ids, self.text_format.stop_strings)

    def ended(self, ids: Sequence[int]) -> bool:
        """Whether a sampled program ended at a stop id or a stop string (False: cut at the length limit). A
        sampled program holds no stop string before its end, so its last tokens tell."""
        stops = self.stop_strings
        return bool(ids) and (ids[-1] in self.stop_ids or (stops is not None and stops.completed(ids)))

    def close(self) -> None:
        """Release what outlives the object's references: a vLLM engine's GPU memory."""
        if self.engine is not None:
            self.engine.close()


def load_sampler(path: str, *, tokenizer: str | None = None, label: str | None = None, dtype: Any = None,
                 device: str | None = None, options: LoadOptions | None = None,
                 checkpoint: str | None = None, eos_token_ids: Sequence[int] | None = None,
                 engine: str = "torch", seed: int = 0,
                 text_format: TextFormat | None = None) -> Sampler:
    """The LM at `path` (any folder `from_pretrained` loads, a hub name, or a URI: copied to this node once, here)
    ready to sample. `options` (the run's
    `LoadOptions`, `RunContext.load_options`) go to the model's and the tokenizer's loads; given `checkpoint`
    (the run's θ_ckpt), the revision only to loads of θ_ckpt itself. A program ends at the tokenizer's EOS or at
    one of `eos_token_ids` (`model.eos_token_ids`; None: those of the model's generation config). `engine`
    "vllm": a `VLLMEngine` samples (decoder-only, on a GPU; `seed` is its engine seed) and no torch model is
    loaded. `text_format` (`model.chat_template`, `model.stop_strings`): how prompts are built and where else a
    program ends."""
    if engine not in ENGINES:
        raise ValueError(f"load_sampler: engine must be one of {ENGINES}, got {engine!r}")
    options = options or LoadOptions()
    text_format = text_format or TextFormat()
    path, tokenizer = str(path), str(tokenizer or path)
    # the revision is θ_ckpt's: decided on the names given, before a URI becomes a folder of this node
    model_options, tokenizer_options = ((options, options) if checkpoint is None else
                                        (options.for_source(path, checkpoint), options.for_source(tokenizer, checkpoint)))
    local, local_tokenizer = local_dir(path), local_dir(tokenizer, "model.tokenizer")
    tok = load_tokenizer(local_tokenizer, options=tokenizer_options)
    label = label or checkpoint_label(path)
    if engine == "vllm":
        if eos_token_ids is None:
            eos_token_ids = generation_eos_ids_of(local, model_options)
        vllm = VLLMEngine(local, local_tokenizer, dtype=str(dtype or torch.float32).removeprefix("torch."),
                          seed=seed, options=model_options)
        return Sampler(lm=None, tokenizer=tok, label=label, path=path,
                       stop_ids=stop_ids(tok, eos_token_ids), engine=vllm, text_format=text_format)
    lm = PolicyLM(load_lm(local, dtype=dtype, device=device, options=model_options))
    extra = generation_eos_ids(lm.lm) if eos_token_ids is None else tuple(eos_token_ids)
    return Sampler(lm=lm, tokenizer=tok, label=label, path=path, stop_ids=stop_ids(tok, extra),
                   text_format=text_format)


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
    rtilde: float | None  # the ranker's score (B-Coder: R̃; CodeRL: p(passed))
    model: str
    ranker: str | None
    logprobs: list[float] | None = None  # per token, of the distribution sampled
    decoding: str = "sample"  # "sample" or "greedy"
    truncated: bool = False  # cut at the length limit (no stop id or stop string at the end)

    @property
    def infra(self) -> bool:
        """Its verdict could not be given (the sandbox failed): it is dropped, counted, never a failed sample."""
        return self.result is not None and self.result.is_infra



INFRA_RERUNS = 2  # extra rounds for programs whose verdict the sandbox could not give (after its own retries)


def score_with_reruns(executor: Any, problems: Sequence[Problem], programs: Sequence[str],
                      reruns: int = INFRA_RERUNS, first_failure: bool = False) -> list[ExecResult]:
    """`envs.scoring.score_programs`, with the programs whose result is an infrastructure failure (no verdict,
    `ExecResult.is_infra`) run again, up to `reruns` more rounds; what still fails stays an infra result, which
    callers drop and count (never a reward, never a failed sample). `first_failure`: as in score_programs."""
    results = list(scoring.score_programs(executor, problems, programs, first_failure=first_failure))
    for _ in range(reruns):
        again = [i for i, r in enumerate(results) if r.is_infra]
        if not again:
            break
        for i, r in zip(again, scoring.score_programs(executor, [problems[i] for i in again],
                                                      [programs[i] for i in again], first_failure=first_failure)):
            results[i] = r
    return results


def sample_and_score(problems: Sequence[Problem], sampler: Sampler, executor: Any | None,
                     settings: SamplingSettings, *, examples: bool = True, ranker: Ranker | None = None,
                     prompt_ids: Sequence[Sequence[int]] | None = None, logprobs: bool = False,
                     decoding: str = "sample", first_failure: bool = False) -> list[ScoredCandidate]:
    """Sample `settings.m` programs per problem (greedy decoding when `decoding == "greedy"`), execute them on
    the hidden tests (and on the example tests when `examples` and the problem has some; nothing is executed when
    `executor` is None), score them with `ranker` when given; problem-major candidates (problem 0's m first).
    The sampling seed is `settings.seed` for the whole call, so the same call gives the same candidates.
    `first_failure`: large test sets stop at the first failing stage (rollouts only: `envs/first_failure.py`)."""
    problems = list(problems)
    tok = sampler.tokenizer
    if prompt_ids is None:
        prompt_ids = [sampler.prompt_ids(p.prompt, settings.max_prompt_len) for p in problems]
    elif len(prompt_ids) != len(problems):
        raise ValueError(f"sample_and_score: {len(problems)} problems but {len(prompt_ids)} prompts")
    if not problems:
        return []
    temperature = 0.0 if decoding == "greedy" else settings.temperature
    if sampler.engine is not None:
        sampled, sampled_logps = sampler.engine.sample(
            prompt_ids, settings.m, max_new_tokens=settings.max_new_tokens, stop_ids=sampler.stop_ids,
            stop_strings=sampler.stop_strings, temperature=temperature, top_p=settings.top_p, seed=settings.seed)
    else:
        sampled, sampled_logps = sampling.sample_programs(
            sampler.lm, prompt_ids, settings.m, max_new_tokens=settings.max_new_tokens, eos_id=sampler.stop_ids,
            pad_id=pad_id(tok), temperature=temperature, top_p=settings.top_p, seed=settings.seed,
            batch_size=settings.prompts_per_call * settings.m, return_logprobs=True,
            stop_strings=sampler.stop_strings)
    flat_problems = [p for p in problems for _ in range(settings.m)]
    flat_prompts = [list(ids) for ids in prompt_ids for _ in range(settings.m)]
    flat_ids = [list(ids) for per_problem in sampled for ids in per_problem]
    flat_logps = [list(lp) for per_problem in sampled_logps for lp in per_problem]
    texts = [sampler.decode(ids) for ids in flat_ids]

    results: list[ExecResult | None] = [None] * len(texts)
    example_results: list[ExecResult | None] = [None] * len(texts)
    if executor is not None:
        results = score_with_reruns(executor, flat_problems, texts, first_failure=first_failure)
        if examples:
            example_results = scoring.score_examples(executor, flat_problems, texts)
    scores: list[float | None] = [None] * len(texts)
    if ranker is not None:
        scores = list(ranker.score(flat_prompts, flat_ids))
    return [ScoredCandidate(problem=p, sample_index=i % settings.m, prompt_ids=pr, program_ids=ids, program=text,
                            result=res, example_result=ex, rtilde=score, model=sampler.label,
                            ranker=ranker.label if ranker is not None else None,
                            logprobs=lp if logprobs else None, decoding=decoding,
                            truncated=not sampler.ended(ids))
            for i, (p, pr, ids, lp, text, res, ex, score) in enumerate(
                zip(flat_problems, flat_prompts, flat_ids, flat_logps, texts, results, example_results, scores))]
