"""The human programs of the train problems as buffer rows, labelled by what is stored: a program longer than
the length limit is stored cut at the limit (no EOS) and executed as cut text, so its reward is that text's
(usually a compile error), as for a generated program cut at the same limit; `truncated` marks them. A human
program that holds one of the run's stop strings (`model.stop_strings`) is left out: no episode of the MDP reaches
past a stop string, and cutting the program there would label a text nobody wrote."""

from __future__ import annotations

from typing import Any, Sequence

from bcoder_ray.buffer.schema import make_row
from bcoder_ray.model.candidates import score_with_reruns
from bcoder_ray.model.tokenization import TextFormat, decode_program, encode_program, eos_id, tokenizer_fingerprint
from envs.problem import Problem


HUMAN_PROGRAMS = ("loop", "train", "warm_start")


def seeded_problems(loop: Sequence[Problem], warm_start: Sequence[Problem], mode: str) -> list[Problem]:
    """The problems whose human programs seed the buffer (`buffer.human_programs`): "loop", the RL loop's;
    "train", the loop's then the warm start's others (each problem once, whichever lists hold it); "warm_start",
    the warm start's problems that are not the loop's (none of the loop's own: empty when the warm start learns
    from the loop's problems too)."""
    if mode == "loop":
        return list(loop)
    if mode not in HUMAN_PROGRAMS:
        raise ValueError(f"buffer.human_programs must be one of {HUMAN_PROGRAMS}, got {mode!r}")
    ids = {p.problem_id for p in loop}
    others = [p for p in warm_start if p.problem_id not in ids]
    return others if mode == "warm_start" else list(loop) + others


def prompted_problems(loop: Sequence[Problem], seeded: Sequence[Problem],
                      evaluation: Sequence[Problem] = ()) -> list[Problem]:
    """The problems whose prompts the buffer holds: the seeded ones, the loop's (its rollouts append rows of
    them, whether or not they carry a human program), then the evaluation splits'."""
    ids = {p.problem_id for p in seeded}
    return [*seeded, *(p for p in loop if p.problem_id not in ids), *evaluation]


def holds_stop_string(program: str, text_format: TextFormat) -> bool:
    return any(s in program for s in text_format.stop_strings)


def stopped_references(problems: Sequence[Problem], text_format: TextFormat) -> int:
    """How many reference programs of `problems` hold a stop string (left out of the seed)."""
    return sum(holds_stop_string(ref, text_format) for p in problems for ref in p.references)


def human_rows(problems: Sequence[Problem], tokenizer: Any, max_program_len: int, executor: Any,
               run_id: str | None = None, text_format: TextFormat = TextFormat()) -> tuple[list[dict], int]:
    """(one row per reference program of `problems` that holds no stop string, executed as stored (see the module
    docstring); the number left out because the sandbox gave no verdict on any re-run)."""
    pairs = [(p, ref) for p in problems for ref in p.references if not holds_stop_string(ref, text_format)]
    ids = [encode_program(tokenizer, ref, max_program_len) for _, ref in pairs]
    eos = eos_id(tokenizer)
    cut = [not x or x[-1] != eos for x in ids]
    texts = [decode_program(tokenizer, x) if c else ref for x, c, (_, ref) in zip(ids, cut, pairs)]
    results = score_with_reruns(executor, [p for p, _ in pairs], texts) if pairs else []
    fp = tokenizer_fingerprint(tokenizer, text_format)
    rows = [make_row(p, text, x, res, source="human", tokenizer_hash=fp, iteration=0, policy_version="human",
                     actor="seed", sampling="{}", truncated=c, run_id=run_id)
            for (p, _), text, x, c, res in zip(pairs, texts, ids, cut, results) if not res.is_infra]
    return rows, len(pairs) - len(rows)
