"""Write a program with a trained checkpoint: sample m candidates, drop those failing the example tests (when
tests are given), rank the rest by R̃ and print the best, with its R̃ and, when tests are given, its outcome.

    python experiments/generate.py --run-dir runs/x --statement "Write a function `f(nums)` ..." \
        --tests tests.json --m 16
    python experiments/generate.py --checkpoint CKPT --theta THETA --phi PHI --problem embedded/test/test-00003
    python experiments/generate.py --checkpoint CKPT --statement @statement.txt --format raw

    python experiments/generate.py --run-dir runs/coderl --problem embedded/test/test-00003 --critic-sampling

--statement TEXT (or @FILE) is turned into the model's prompt by --format: "embedded" (the default suite's
docstring with the example asserts), "mbpp", "apps" (CodeRL's QUESTION/ANSWER format), or "raw" (as given).
--tests is a TESTS.json (envs/problem.py) or a file of `assert ...` lines. --problem SUITE/SPLIT/ID takes a
registered suite's problem (its prompt and tests) instead.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from bcoder_ray.cli.text_format_args import add_text_format_arguments, text_format_overrides


FORMATS = ("embedded", "mbpp", "apps", "raw")


def read_tests(path: str):
    """A TestSpec from TESTS.json, or from a text file of assert lines."""
    from envs.problem import TestSpec

    text = Path(path).read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError:
        asserts = [line.strip() for line in text.splitlines() if line.strip()]
        bad = [a for a in asserts if not a.startswith("assert")]
        if bad:
            raise SystemExit(f"{path}: neither TESTS.json nor assert lines (first other line: {bad[0]!r})")
        return TestSpec("assert", asserts=tuple(asserts))
    return TestSpec.from_json(data, where=path)


def make_prompt(statement: str, tests, fmt: str) -> str:
    if fmt == "raw":
        return statement
    asserts = tuple(tests.asserts) if tests is not None and tests.style == "assert" else ()
    if fmt == "embedded":
        from envs.suites.embedded import prompt_text

        return prompt_text(statement, asserts)
    if fmt == "mbpp":
        from envs.suites.mbpp import format_mbpp_prompt

        return format_mbpp_prompt(statement, asserts)
    if fmt == "apps":
        from envs.suites.apps import format_apps_prompt

        return format_apps_prompt(statement, "", call_based=tests is not None and tests.style == "call")
    raise SystemExit(f"--format {fmt!r}: expected one of {FORMATS}")


def find_problem(spec: str):
    from envs.registry import load_suite

    parts = spec.split("/", 2)
    if len(parts) != 3:
        raise SystemExit(f"--problem {spec!r}: expected SUITE/SPLIT/ID")
    suite, split, pid = parts
    for problem in load_suite(suite, split):
        if problem.problem_id == pid:
            return problem
    raise SystemExit(f"--problem {spec!r}: no problem {pid!r} in {suite}/{split}")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--statement", help="the problem statement, or @FILE")
    what.add_argument("--problem", help="SUITE/SPLIT/ID of a registered suite's problem")
    p.add_argument("--tests", help="TESTS.json or a file of assert lines (example tests: filter + outcome)")
    p.add_argument("--format", choices=FORMATS, default="embedded", help="prompt format for --statement")
    p.add_argument("--checkpoint", help="sample from this LM (a local folder, hub name, GGUF file or packaged "
                                         "name such as smollm2-135m-instruct)")
    p.add_argument("--run-dir", help="a run folder: its published policy, ranked by its algorithm's ranker")
    p.add_argument("--rank-with", metavar="RUN_DIR", help="rank with this run's ranker instead")
    p.add_argument("--tokenizer")
    p.add_argument("--m", type=int, default=16)
    p.add_argument("--temperature", type=float, default=0.6)
    p.add_argument("--top-p", type=float, default=0.95)
    p.add_argument("--max-new-tokens", type=int, default=512)
    p.add_argument("--max-prompt-len", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--show", type=int, default=1, help="print the best N candidates")
    p.add_argument("--critic-sampling", action="store_true",
                   help="CodeRL's Critic Sampling with --run-dir's φ_test (needs example tests): --m programs "
                        "per round, --cs-rounds rounds; the pool's example passers by p(passed) come first")
    p.add_argument("--cs-rounds", type=int, default=2, help="Critic Sampling: rounds")
    p.add_argument("--workers", type=int, default=1, help="sandbox processes")
    p.add_argument("--device", default=None)
    add_text_format_arguments(p)
    return p.parse_args(argv)


def critic_sampling_main(args: argparse.Namespace, problem) -> int:
    """--critic-sampling: the pool of CodeRL's Critic Sampling for one problem, best first."""
    from bcoder_ray.algorithms.coderl.critic_sampling import CriticSamplingRefused
    from bcoder_ray.model.candidates import SamplingSettings
    from bcoder_ray.algorithms.coderl.inference import critic_sampling_records, load_phi_test, require_examples
    from bcoder_ray.config import ConfigError
    from bcoder_ray.loop.run_folder import load_run, sampler_and_ranker
    from envs.execute import Executor

    if not args.run_dir:
        raise SystemExit("--critic-sampling needs --run-dir RUN_DIR (a CodeRL run: its actor and φ_test)")
    try:
        require_examples([problem])
        critic = load_phi_test(load_run(args.run_dir), device=args.device)
        sampler, _, _ = sampler_and_ranker(checkpoint=args.checkpoint, run_dir=args.run_dir, rank=False,
                                           tokenizer=args.tokenizer, device=args.device, **text_format_overrides(args))
    except (CriticSamplingRefused, ConfigError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--critic-sampling refused: {e}") from None
    settings = SamplingSettings(m=args.m, temperature=args.temperature, top_p=args.top_p,
                                max_prompt_len=args.max_prompt_len, max_new_tokens=args.max_new_tokens,
                                seed=args.seed, prompts_per_call=1)
    with Executor(workers=args.workers) as executor:
        records, summaries = critic_sampling_records([problem], sampler, executor, settings, critic, n=args.m,
                                                     rounds=args.cs_rounds)
    order = sorted(range(len(records)), key=lambda i: (not records[i].example_passed, -records[i].rtilde, i))
    passing = sum(r.example_passed for r in records)
    print(f"# critic sampling: {len(records)} programs in {args.cs_rounds} rounds with {sampler.label}; "
          f"{passing} pass the example tests; seeds per round: {[r['seeds'] for r in summaries[0]['rounds']]}")
    for rank, i in enumerate(order[: args.show], 1):
        r = records[i]
        print(f"# candidate {rank} (pool index {i}): p(passed) = {r.rtilde:.4f}, examples "
              f"{'passed' if r.example_passed else 'failed'}, outcome on the tests: {r.outcome}")
        print(r.program)
    return 0 if passing else 1


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import envs  # noqa: F401  (registers the suites)
    from bcoder_ray.model.candidates import SamplingSettings
    from bcoder_ray.config import ConfigError
    from bcoder_ray.evaluation.evaluate import adhoc_problem, generate
    from bcoder_ray.loop.run_folder import sampler_and_ranker
    from envs.execute import Executor

    if args.problem:
        problem = find_problem(args.problem)
        if args.tests:
            raise SystemExit("--tests goes with --statement; a --problem brings its own tests")
    else:
        statement = args.statement
        if statement.startswith("@"):
            statement = Path(statement[1:]).read_text(encoding="utf-8")
        tests = read_tests(args.tests) if args.tests else None
        problem = adhoc_problem(make_prompt(statement, tests, args.format), tests, statement=statement)
    if args.critic_sampling:
        return critic_sampling_main(args, problem)
    try:
        sampler, ranker, _ = sampler_and_ranker(checkpoint=args.checkpoint, run_dir=args.run_dir,
                                                rank_with=args.rank_with, tokenizer=args.tokenizer,
                                                device=args.device, **text_format_overrides(args))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    settings = SamplingSettings(m=args.m, temperature=args.temperature, top_p=args.top_p,
                                max_prompt_len=args.max_prompt_len, max_new_tokens=args.max_new_tokens,
                                seed=args.seed, prompts_per_call=1)
    with Executor(workers=args.workers) as executor:
        result = generate(problem, sampler, settings, executor=executor, ranker=ranker)
    print(f"# sampled {result.sampled} candidates with {sampler.label}"
          + (f"; {result.dropped_by_examples} failed the example tests" if problem.example_tests else "")
          + (f"; ranked by {ranker.label}" if ranker is not None else "; no ranker: in sampling order"))
    if result.best is None:
        print("# no candidate passed the example tests")
        return 1
    for rank, c in enumerate(result.ranked[: args.show], 1):
        rt = "–" if c.rtilde is None else f"{c.rtilde:.4f}"
        outcome = "" if c.result is None else f", outcome on the tests: {c.result.outcome.value}"
        print(f"# candidate {rank} (sample {c.sample_index}): score = {rt}{outcome}")
        print(c.program)
    return 0


if __name__ == "__main__":
    sys.exit(main())
