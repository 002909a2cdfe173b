"""Value-guided search against plain sampling + ranking at an equal number of generated tokens, on a trained run's
policy, value and ranker (issue 26, item 6). On the same problems:

(a) plain sampling of m programs per problem ranked by the run's ranker (B-Coder: R̃), for every m of `--m`: one
    pool of max(m) samples per problem, each smaller m read off it exactly (`bcoder_ray.evaluation.search_budget`);
(b) value-guided search (`bcoder_ray.model.value_search`) at each `--search` setting, guided by the run's value of
    program prefixes (B-Coder: Q_θ of the last token), the surviving programs ranked by the same ranker.

The programs chosen are executed by the project's executor (the run's executor settings); one table: tokens
generated per problem, pass@1 of the chosen program with its interval, the paired difference to plain sampling at
the same tokens, the tokens plain sampling needs for the same pass@1 and the share saved; and the goal line (plain
sampling's best ranked pass@1 with at most half its tokens). Written to value_search.md and value_search.json
(with every problem's figures) in the run folder, or `--out`.

    python experiments/value_search.py --run runs/bcoder --split test [--problems 100] [--m 1 2 4 8 16] \
        [--search k=8,n=16,keep=2 k=16,n=16,keep=2,refill=0 ...] [--device cuda]

A search setting is comma-separated `key=value`: k (particles), n (tokens between selections), keep (survivors),
refill (1: pruned particles become copies of survivors; 0: they are dropped) and stop (a value below which a
particle is stopped; none by default).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import time
from pathlib import Path
from typing import Sequence

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # without an install too

from bcoder_ray.evaluation.search_budget import PlainPool, SearchOutcome  # noqa: E402
from bcoder_ray.model.value_search import SearchSettings  # noqa: E402

DEFAULT_SEARCHES = ("k=4,n=16,keep=1", "k=8,n=16,keep=2", "k=16,n=16,keep=4", "k=8,n=16,keep=2,refill=0",
                    "k=16,n=16,keep=2,refill=0")
OUT_MD, OUT_JSON = "value_search.md", "value_search.json"
_KEYS = {"k": "particles", "n": "every", "keep": "keep", "refill": "refill", "stop": "threshold"}


def parse_search(text: str) -> SearchSettings:
    """`k=8,n=16,keep=2[,refill=0][,stop=-0.5]` as `SearchSettings` (SystemExit naming the bad part)."""
    fields = {}
    for part in filter(None, text.split(",")):
        key, sep, raw = part.partition("=")
        if not sep or key.strip() not in _KEYS:
            raise SystemExit(f"--search {text!r}: {part!r} is not one of {', '.join(k + '=...' for k in _KEYS)}")
        key = _KEYS[key.strip()]
        try:
            fields[key] = (raw.strip() not in ("0", "false", "no") if key == "refill" else
                           float(raw) if key == "threshold" else int(raw))
        except ValueError:
            raise SystemExit(f"--search {text!r}: {part!r} needs a number") from None
    try:
        return SearchSettings(**fields)
    except ValueError as e:
        raise SystemExit(f"--search {text!r}: {e}") from None


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="a run folder with a trained value (B-Coder)")
    p.add_argument("--split", default="test")
    p.add_argument("--problems", type=int, default=None,
                   help="the first N problems of the split (default: the run's suite.max_eval_problems, else all)")
    p.add_argument("--m", type=int, nargs="+", default=[1, 2, 4, 8, 16], help="plain samples per problem")
    p.add_argument("--search", nargs="+", default=list(DEFAULT_SEARCHES), help="search settings (see above)")
    p.add_argument("--temperature", type=float, default=None, help="default: the run's evaluation.temperature")
    p.add_argument("--top-p", type=float, default=None, help="default: the run's evaluation.top_p")
    p.add_argument("--max-new-tokens", type=int, default=None, help="default: the run's evaluation length")
    p.add_argument("--prompts-per-call", type=int, default=None, help="plain sampling: prompts per batch")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=None, help="sandbox processes (default: the run's executor)")
    p.add_argument("--device", default=None, help="where the policy and the value run (e.g. cuda)")
    p.add_argument("--confidence", type=float, default=0.95)
    p.add_argument("--out", default=None, help="output folder (default: the run folder)")
    return p.parse_args(list(argv))


def load_models(args: argparse.Namespace):
    """(run, sampler, value, ranker) of `--run`; SystemExit where the run has no value or ranker."""
    from bcoder_ray.algorithms import load_prefix_value, load_ranker
    from bcoder_ray.config import ConfigError
    from bcoder_ray.loop.run_folder import load_run, sampler_and_ranker
    from bcoder_ray.model.ranker import Ranker

    try:
        run = load_run(args.run)
        algorithm = run.algorithm()
        ref = algorithm.prefix_value(run.state.algorithm)
        if ref is None:
            raise SystemExit(f"{args.run}: algorithm {run.cfg.algorithm.name!r} has no value of program prefixes "
                             f"(or none trained yet): value-guided search needs one, such as B-Coder's Q_θ "
                             f"(bcoder, bcoder_optimality, dueling_dqn) after its stage θ")
        value = load_prefix_value(ref, run.context(), run.cfg.imports, args.device)
        ranker = value if isinstance(value, Ranker) else None  # B-Coder: one Q model gives R̃ and the value
        if ranker is None:
            ranker_ref = algorithm.ranker(run.state.algorithm)
            if ranker_ref is None:
                raise SystemExit(f"{args.run}: algorithm {run.cfg.algorithm.name!r} has no ranker to choose the "
                                 f"program among the candidates")
            ranker = load_ranker(ranker_ref, run.context(), run.cfg.imports, args.device)
        sampler, _, _ = sampler_and_ranker(run_dir=args.run, rank=False, device=args.device)
    except (ConfigError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"{args.run}: {e}") from None
    if sampler.lm is None:
        raise SystemExit("value-guided search samples with the torch sampler (its KV cache), not vLLM")
    return run, sampler, value, ranker


def load_problems(run, args: argparse.Namespace) -> list:
    import envs  # noqa: F401  (registers the suites)
    from bcoder_ray.loop.components import suite_loader_options
    from envs.registry import load_suite

    s = run.cfg.suite
    options, _ = suite_loader_options(s.options)
    problems = load_suite(s.name, args.split, **options)
    limit = args.problems if args.problems is not None else s.max_eval_problems
    problems = problems if limit is None else problems[:limit]
    if not problems:
        raise SystemExit(f"suite {s.name!r} split {args.split!r} has no problems")
    return problems


def plain_pools(problems, sampler, executor, settings, ranker) -> list[PlainPool]:
    """max(m) plain samples per problem, executed and scored by the ranker (those without a verdict left out of
    the scores, not of the tokens)."""
    from bcoder_ray.model.candidates import sample_and_score

    scored = sample_and_score(problems, sampler, executor, settings, examples=False, ranker=ranker)
    pools = []
    for i in range(len(problems)):
        mine = scored[i * settings.m:(i + 1) * settings.m]
        ok = [c for c in mine if not c.infra]
        pools.append(PlainPool(tuple(float(c.rtilde) for c in ok), tuple(bool(c.result.passed) for c in ok),
                               tuple(len(c.program_ids) for c in mine)))
    return pools


def search_outcomes(problems, prompts, sampler, value, ranker, executor, search: SearchSettings, settings,
                    seed: int) -> list[SearchOutcome]:
    """One value-guided search per problem; the surviving programs executed, the best by the ranker chosen."""
    from bcoder_ray.evaluation.metrics import n_at_k
    from bcoder_ray.model.candidates import score_with_reruns
    from bcoder_ray.model.tokenization import pad_id
    from bcoder_ray.model.value_search import value_guided_search

    out = []
    for i, (problem, prompt) in enumerate(zip(problems, prompts)):
        result = value_guided_search(sampler.lm, prompt, value, search, max_new_tokens=settings.max_new_tokens,
                                     eos_id=sampler.stop_ids, pad_id=pad_id(sampler.tokenizer),
                                     temperature=settings.temperature, top_p=settings.top_p,
                                     seed=seed * 1_000_003 + i, stop_strings=sampler.stop_strings)
        pass_at_1 = 0.0                                       # every particle stopped: nothing to submit
        if result.programs:
            texts = [sampler.decode(w) for w in result.programs]
            verdicts = score_with_reruns(executor, [problem] * len(texts), texts)
            kept = [j for j, r in enumerate(verdicts) if not r.is_infra]
            if kept:
                scores = ranker.score([prompt] * len(kept), [result.programs[j] for j in kept])
                pass_at_1 = n_at_k(list(scores), [verdicts[j].passed for j in kept], 1, len(kept))
        out.append(SearchOutcome(result.generated_tokens, pass_at_1, result.value_tokens))
    return out


def main(argv: Sequence[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = parse_args(sys.argv[1:] if argv is None else argv)
    searches = [parse_search(s) for s in args.search]
    from bcoder_ray.evaluation.report import write_json
    from bcoder_ray.evaluation.search_budget import budget_table
    from bcoder_ray.loop.components import executor_kwargs
    from bcoder_ray.util.atomic import atomic_write_text
    from envs.execute import Executor

    run, sampler, value, ranker = load_models(args)
    problems = load_problems(run, args)
    base = run.cfg.evaluation.settings(run.cfg.model)
    settings = dataclasses.replace(
        base, m=max(args.m), seed=args.seed,
        temperature=base.temperature if args.temperature is None else args.temperature,
        top_p=base.top_p if args.top_p is None else args.top_p,
        max_new_tokens=args.max_new_tokens or base.max_new_tokens,
        prompts_per_call=args.prompts_per_call or base.prompts_per_call)
    prompts = [sampler.prompt_ids(p.prompt, settings.max_prompt_len) for p in problems]
    executor_args = executor_kwargs(run.cfg)
    if args.workers is not None:
        executor_args["workers"] = args.workers
    say = lambda line: print(line, file=sys.stderr, flush=True)  # noqa: E731
    with Executor(**executor_args) as executor:
        start = time.monotonic()
        pools = plain_pools(problems, sampler, executor, settings, ranker)
        say(f"plain: {len(problems)} problems × {settings.m} samples ({time.monotonic() - start:.0f} s)")
        outcomes = {}
        for search in searches:
            start = time.monotonic()
            outcomes[search.name] = search_outcomes(problems, prompts, sampler, value, ranker, executor, search,
                                                    settings, args.seed)
            say(f"search {search.name} ({time.monotonic() - start:.0f} s)")
    table = budget_table(pools, args.m, outcomes, level=args.confidence, seed=args.seed, ranker=ranker.label)
    text = table.markdown()
    print(text, end="")
    out = Path(args.out or args.run)
    atomic_write_text(out / OUT_MD, text)
    write_json(out / OUT_JSON, {
        **table.to_json(), "run": str(args.run), "split": args.split, "sampling": dataclasses.asdict(settings),
        "value": value.label, "searches": {s.name: dataclasses.asdict(s) for s in searches},
        "problems": [{"problem": p.key, "plain": dataclasses.asdict(pool),
                      "search": {name: dataclasses.asdict(o[i]) for name, o in outcomes.items()}}
                     for i, (p, pool) in enumerate(zip(problems, pools))]})
    print(f"wrote {out / OUT_MD} and {out / OUT_JSON}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
