"""Evaluate any checkpoint on any registered suite and split; rank another model's candidates; rebuild metrics,
tables and figures from saved candidates.

Evaluate (sample m per problem, execute, rank, write candidates.jsonl + metrics.json into --out):
    python experiments/evaluate.py --run-dir runs/x --suite embedded --split test --limit 50 --m 8 --ks 1 5 \
        --temperature 0.6 --top-p 0.95 --out runs/x/eval/final
        (--run-dir: the run's published policy, ranked by its algorithm's ranker when it has one)
    python experiments/evaluate.py --checkpoint LM --suite mbpp --split test --out runs/eval/lm   # any HF LM
    python experiments/evaluate.py --run-dir runs/ppo --rank-with runs/bcoder --out DIR   # another run's ranker

Rankers side by side on the same candidates (sampled once, or --candidates DIR_OR_JSONL), one table with each
ranker's ranked pass@1 and a paired interval against the policy's likelihood (rankers.md, rankers.json in --out):
    python experiments/evaluate.py --run-dir runs/bcoder --rankers all --rank-with runs/coderl --out DIR
    (random, sum_loglik, mean_loglik, majority_vote, run: each run's ranker (--run-dir's and --rank-with's),
    run_untrained: its untrained control; --baseline-ranker: the paired comparison's other side, default sum_loglik)

Critic Sampling (CodeRL runs; problems with example tests), beside plain sampling at the same budget:
    python experiments/evaluate.py --run-dir runs/coderl --critic-sampling --cs-n 8 --cs-rounds 2 --out DIR

Rank candidates written by another model with a run's ranker (Table 3); lines need problem_id and program:
    python experiments/evaluate.py --rank-file other.jsonl --rank-with runs/x --suite apps --split test --out DIR

From saved files only (no model):
    python experiments/evaluate.py --recompute DIR [--ks 1 5 10]         metrics again from DIR/candidates.jsonl
    python experiments/evaluate.py --table DIR_OR_JSON [...] [--variant auto] [--with-paper] [--table-out T.md]
    python experiments/evaluate.py --figures DIR [--ks 1 5]              fig3_rtilde_density.png, fig5_...png
    python experiments/evaluate.py --training-curve RUN_DIR [RUN_DIR ...] --figure-out fig1.png

--suite-option key=value is passed to the suite loader (e.g. limit=20, difficulties=introductory).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from bcoder_ray.cli.text_format_args import add_text_format_arguments, text_format_overrides


def _suite_options(pairs: list[str]) -> dict:
    options = {}
    for pair in pairs:
        if "=" not in pair:
            raise SystemExit(f"--suite-option {pair!r}: expected key=value")
        key, value = pair.split("=", 1)
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def _n_at_k_pairs(specs: list[str]) -> list[tuple[int, int]]:
    pairs = []
    for spec in specs:
        try:
            n, k = (int(x) for x in spec.split("@"))
        except ValueError:
            raise SystemExit(f"--n-at-k {spec!r}: expected N@K, e.g. 1@5") from None
        pairs.append((n, k))
    return pairs


def models_from_args(args: argparse.Namespace):
    from bcoder_ray.config import ConfigError
    from bcoder_ray.loop.run_folder import sampler_and_ranker

    if args.rank_with and len(args.rank_with) > 1:
        raise SystemExit(f"--rank-with names {len(args.rank_with)} runs: several only with --rankers (one table "
                         f"of rankers); to evaluate or rank a file give one")
    try:
        return sampler_and_ranker(checkpoint=args.checkpoint, run_dir=args.run_dir,
                                  rank_with=args.rank_with[0] if args.rank_with else None, rank=not args.no_rank,
                                  tokenizer=args.tokenizer, label=args.label, device=args.device,
                                  need_sampler=not args.rank_file,
                                  **text_format_overrides(args))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = p.add_argument_group("what to do (default: evaluate a checkpoint)")
    mode.add_argument("--rank-file", help="JSONL of another model's candidates to rank with the Q model (Table 3)")
    mode.add_argument("--recompute", metavar="DIR", help="recompute DIR/metrics.json from DIR/candidates.jsonl")
    mode.add_argument("--table", nargs="+", metavar="RESULT", help="metrics.json files or folders -> Table 1")
    mode.add_argument("--figures", metavar="DIR", help="Figures 3 and 5 (and the R̃ order statement) for DIR")
    mode.add_argument("--training-curve", nargs="+", metavar="RUN_DIR", help="Figure 1 from run folders")
    mode.add_argument("--rankers", nargs="+", metavar="NAME",
                      help="rank one set of candidates by these rankers side by side ('all', or names: random, "
                           "sum_loglik, mean_loglik, majority_vote, run, run_untrained) -> rankers.md in --out")
    m = p.add_argument_group("model")
    m.add_argument("--checkpoint", help="sample from this LM (a local folder, hub name, GGUF file or packaged name "
                                        "such as smollm2-135m-instruct), e.g. a published policy")
    m.add_argument("--run-dir", help="a run folder: sample from its published policy, rank with its ranker")
    m.add_argument("--rank-with", nargs="+", metavar="RUN_DIR",
                   help="rank with this run's ranker (B-Coder's R̃, CodeRL's critic); with --rankers, several runs")
    m.add_argument("--tokenizer", help="default: the LM's own folder")
    m.add_argument("--label", help="row label in tables (default: the policy folder's name)")
    m.add_argument("--device", default=None)
    add_text_format_arguments(m)
    d = p.add_argument_group("problems")
    d.add_argument("--suite", default="embedded")
    d.add_argument("--split", default="test")
    d.add_argument("--limit", type=int, default=None, help="first N problems only")
    d.add_argument("--suite-option", action="append", default=[], metavar="KEY=VALUE")
    s = p.add_argument_group("sampling and metrics")
    s.add_argument("--m", type=int, default=8, help="candidates per problem")
    s.add_argument("--ks", type=int, nargs="+", default=[1, 5])
    s.add_argument("--temperature", type=float, default=0.6)
    s.add_argument("--top-p", type=float, default=0.95)
    s.add_argument("--max-new-tokens", type=int, default=512)
    s.add_argument("--max-prompt-len", type=int, default=600)
    s.add_argument("--prompts-per-call", type=int, default=4)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--n-at-k", nargs="+", default=[], metavar="N@K",
                   help="also n@k: n submissions (top n by R̃ after the example filter) from k samples")
    s.add_argument("--confidence", type=float, default=0.95, help="level of the pass@1 intervals")
    s.add_argument("--critic-sampling", action="store_true",
                   help="CodeRL's Critic Sampling with --run-dir's φ_test, beside plain sampling at the same budget "
                        "(--cs-n × --cs-rounds programs per problem), as n@k in the filtered setting; needs "
                        "problems with example tests")
    s.add_argument("--cs-n", type=int, default=None, help="Critic Sampling: N programs per round (default: --m)")
    s.add_argument("--cs-rounds", type=int, default=2, help="Critic Sampling: rounds")
    s.add_argument("--no-rank", action="store_true", help="do not rank")
    s.add_argument("--no-examples", action="store_true", help="do not run the example tests (no filtered metrics)")
    s.add_argument("--workers", type=int, default=None, help="sandbox processes (default: the executor's)")
    o = p.add_argument_group("output")
    o.add_argument("--out", help="output folder (candidates.jsonl, metrics.json)")
    o.add_argument("--plots", action="store_true", help="also write Figures 3 and 5 into --out")
    o.add_argument("--candidates", metavar="DIR_OR_JSONL",
                   help="--rankers: rank these saved candidates (an evaluation folder or its candidates.jsonl) "
                        "instead of sampling")
    o.add_argument("--baseline-ranker", default="sum_loglik",
                   help="--rankers: the ranker every row is compared with, paired over problems")
    o.add_argument("--variant", default="auto", help="table metric: auto, pass, ranked_pass, filtered_pass, "
                                                      "filtered_ranked_pass")
    o.add_argument("--with-paper", action="store_true", help="add the paper's Table 1 rows (APPS test set)")
    o.add_argument("--table-out", help="also write the markdown table (and .json beside it) here")
    o.add_argument("--figure-out", default="fig1_training_curve.png", help="--training-curve output PNG")
    return p.parse_args(argv)


def write_figures(folder: Path, ks: list[int]) -> list[str]:
    from bcoder_ray.evaluation.metrics import read_candidates, rtilde_outcome_order
    from bcoder_ray.evaluation.plots import plot_ranking_gain, plot_rtilde_density

    records = read_candidates(folder)
    if any(r.rtilde is None for r in records):
        return ["no R̃ in these candidates: Figures 3 and 5 need a ranker"]
    order = rtilde_outcome_order(records)
    (folder / "rtilde_order.txt").write_text(order["statement"] + "\n", encoding="utf-8")
    plot_rtilde_density(records, folder / "fig3_rtilde_density.png")
    plot_ranking_gain(records, folder / "fig5_ranking_gain.png", ks=ks)
    return [order["statement"], f"wrote {folder / 'fig3_rtilde_density.png'}, {folder / 'fig5_ranking_gain.png'}"]


def critic_sampling_main(args: argparse.Namespace, problems) -> int:
    """--critic-sampling: CodeRL's Critic Sampling and plain sampling at the same budget, into --out."""
    from bcoder_ray.algorithms.coderl.critic_sampling import CriticSamplingRefused
    from bcoder_ray.model.candidates import SamplingSettings
    from bcoder_ray.algorithms.coderl.inference import compare_with_plain, load_phi_test, require_examples, summary_lines
    from bcoder_ray.config import ConfigError
    from bcoder_ray.loop.run_folder import load_run, sampler_and_ranker
    from envs.execute import Executor

    if not args.run_dir:
        raise SystemExit("--critic-sampling needs --run-dir RUN_DIR (a CodeRL run: its actor and φ_test)")
    try:
        require_examples(problems)
        critic = load_phi_test(load_run(args.run_dir), device=args.device)
        sampler, _, _ = sampler_and_ranker(checkpoint=args.checkpoint, run_dir=args.run_dir, rank=False,
                                           tokenizer=args.tokenizer, label=args.label, device=args.device)
    except (CriticSamplingRefused, ConfigError, FileNotFoundError, ValueError) as e:
        raise SystemExit(f"--critic-sampling refused: {e}") from None
    settings = SamplingSettings(m=args.m, temperature=args.temperature, top_p=args.top_p,
                                max_prompt_len=args.max_prompt_len, max_new_tokens=args.max_new_tokens,
                                seed=args.seed, prompts_per_call=args.prompts_per_call)
    with Executor(workers=args.workers) as executor:
        result = compare_with_plain(problems, sampler, executor, settings, critic, n=args.cs_n or args.m,
                                    rounds=args.cs_rounds, out_dir=args.out, ks=args.ks, ci_level=args.confidence)
    for line in summary_lines(result):
        print(line)
    print(f"wrote {Path(args.out) / 'critic_sampling'} and {Path(args.out) / 'plain'}")
    return 0


def _sampling_settings(args: argparse.Namespace):
    from bcoder_ray.model.candidates import SamplingSettings

    return SamplingSettings(m=args.m, temperature=args.temperature, top_p=args.top_p,
                            max_prompt_len=args.max_prompt_len, max_new_tokens=args.max_new_tokens,
                            seed=args.seed, prompts_per_call=args.prompts_per_call)


def _sampler_for_rankers(args: argparse.Namespace):
    """The policy whose likelihood ranks (and which samples, unless --candidates): None without one."""
    from bcoder_ray.config import ConfigError
    from bcoder_ray.loop.run_folder import sampler_and_ranker

    if not (args.checkpoint or args.run_dir):
        return None
    try:
        sampler, _, _ = sampler_and_ranker(checkpoint=args.checkpoint, run_dir=args.run_dir, rank=False,
                                           tokenizer=args.tokenizer, label=args.label, device=args.device,
                                           **text_format_overrides(args))
    except (ConfigError, FileNotFoundError, ValueError) as e:
        raise SystemExit(str(e)) from None
    return sampler


def _candidate_records(args: argparse.Namespace, problems, sampler, executor, out: Path) -> list:
    """--candidates' records (those of the problems loaded when --limit cuts them), or fresh ones sampled once
    and saved in --out with their unranked metrics."""
    from bcoder_ray.evaluation.evaluate import write_evaluation
    from bcoder_ray.evaluation.metrics import CandidateRecord, read_candidates
    from bcoder_ray.model.candidates import sample_and_score

    if args.candidates:
        records = read_candidates(args.candidates)
        if args.limit is not None:  # the candidates of the problems --limit keeps
            keys = {(p.suite, p.split, p.problem_id) for p in problems}
            records = [r for r in records if r.problem_key in keys]
        return records
    if sampler is None:
        raise SystemExit("--rankers samples the candidates from --checkpoint LM or --run-dir RUN_DIR (or give "
                         "--candidates DIR of an earlier evaluation)")
    settings = _sampling_settings(args)
    scored = sample_and_score(problems, sampler, executor, settings, examples=not args.no_examples)
    records = [CandidateRecord.of(c) for c in scored if not c.infra]
    meta = {"label": sampler.label, "sampling": dataclasses.asdict(settings), "policy": sampler.path, "ranker": None,
            "infra_failures": sum(c.infra for c in scored)}
    write_evaluation(out, records, ks=[k for k in args.ks if k <= settings.m] or [1], ci_level=args.confidence,
                     seed=settings.seed, meta=meta)
    return records


def rankers_main(args: argparse.Namespace, problems) -> int:
    """--rankers: one set of candidates ranked by each ranker; the table printed and written into --out."""
    import bcoder_ray.loop.run_rankers  # noqa: F401  (registers the run folders' rankers)
    from bcoder_ray.evaluation.metrics import CandidateError
    from bcoder_ray.evaluation.rankers import (RANKERS_JSON, RANKERS_MD, RankingInputs, build_rankers,
                                               compare_rankers)
    from bcoder_ray.evaluation.report import write_json
    from bcoder_ray.util.atomic import atomic_write_text
    from envs.execute import Executor

    out = Path(args.out)
    sampler = _sampler_for_rankers(args)
    runs = ((args.run_dir,) if args.run_dir and not args.no_rank else ()) + tuple(args.rank_with or ())
    with Executor(workers=args.workers) as executor:
        try:
            records = _candidate_records(args, problems, sampler, executor, out)
            inputs = RankingInputs(executor=executor, sampler=sampler, runs=tuple(dict.fromkeys(runs)),
                                   device=args.device, max_prompt_len=args.max_prompt_len,
                                   max_program_len=args.max_new_tokens)
            rankers = build_rankers(args.rankers, inputs)
            table = compare_rankers(problems, records, rankers, baseline=args.baseline_ranker,
                                    level=args.confidence, seed=args.seed)
        except (CandidateError, FileNotFoundError, ValueError) as e:  # ConfigError is a ValueError
            raise SystemExit(f"--rankers: {e}") from None
    text = table.markdown()
    print(text, end="")
    atomic_write_text(out / RANKERS_MD, text)
    write_json(out / RANKERS_JSON, table.to_json())
    print(f"wrote {out / RANKERS_MD} and {out / RANKERS_JSON}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)

    if args.recompute:
        from bcoder_ray.evaluation.evaluate import recompute_metrics
        from bcoder_ray.evaluation.report import load_metrics, summary_line, write_json

        folder = Path(args.recompute)
        saved = load_metrics(folder) if (folder / "metrics.json").exists() else {}
        recomputed = recompute_metrics(folder, ks=args.ks)
        keep = {k: v for k, v in saved.items() if k not in recomputed}  # label, sampling, ... kept
        write_json(folder / "metrics.json", {**recomputed, **keep})
        print(summary_line(recomputed))
        return 0

    if args.table:
        from bcoder_ray.evaluation.report import load_metrics, table1_markdown, table1_rows, write_json

        entries = [(None, load_metrics(path)) for path in args.table]
        text = table1_markdown(entries, ks=args.ks, variant=args.variant, include_paper=args.with_paper)
        print(text, end="")
        if args.table_out:
            Path(args.table_out).parent.mkdir(parents=True, exist_ok=True)
            Path(args.table_out).write_text(text, encoding="utf-8")
            write_json(Path(args.table_out).with_suffix(".json"),
                       table1_rows(entries, ks=args.ks, variant=args.variant, include_paper=args.with_paper))
        return 0

    if args.figures:
        for line in write_figures(Path(args.figures), args.ks):
            print(line)
        return 0

    if args.training_curve:
        from bcoder_ray.evaluation.plots import plot_training_curve, training_curve_from_run

        runs = {Path(r).name: training_curve_from_run(r) for r in args.training_curve}
        print(f"wrote {plot_training_curve(runs, args.figure_out)}")
        return 0

    # the modes that need a model
    if not args.out:
        raise SystemExit("--out is required to evaluate or rank")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import envs  # noqa: F401  (registers the suites)
    from bcoder_ray.model.candidates import SamplingSettings
    from bcoder_ray.evaluation.evaluate import evaluate, rank_candidates_file
    from bcoder_ray.evaluation.report import summary_line
    from envs.execute import Executor
    from envs.registry import load_suite

    options = _suite_options(args.suite_option)
    problems = load_suite(args.suite, args.split, **options)
    if args.limit is not None:
        problems = problems[: args.limit]
    if not problems:
        raise SystemExit(f"suite {args.suite!r} split {args.split!r} has no problems with options {options}")
    if args.critic_sampling:
        return critic_sampling_main(args, problems)
    if args.rankers:
        return rankers_main(args, problems)
    sampler, ranker, _ = models_from_args(args)
    out = Path(args.out)
    with Executor(workers=args.workers) as executor:
        if args.rank_file:
            if ranker is None:
                raise SystemExit("--rank-file needs a ranker: --rank-with RUN_DIR (or --run-dir of a run with one)")
            from bcoder_ray.loop.run_folder import load_run

            ctx = load_run(args.rank_with[0] if args.rank_with else args.run_dir).context()  # the ranking run's tokenizer and options
            metrics = rank_candidates_file(args.rank_file, problems, ranker, ctx.load_tokenizer(), executor, out,
                                           ks=args.ks, max_program_len=args.max_new_tokens,
                                           max_prompt_len=args.max_prompt_len, ci_level=args.confidence,
                                           text_format=ctx.text_format())
        else:
            settings = SamplingSettings(m=args.m, temperature=args.temperature, top_p=args.top_p,
                                        max_prompt_len=args.max_prompt_len, max_new_tokens=args.max_new_tokens,
                                        seed=args.seed, prompts_per_call=args.prompts_per_call)
            metrics = evaluate(problems, sampler, executor, settings, out, ks=args.ks,
                               examples=not args.no_examples, ranker=ranker, ci_level=args.confidence,
                               meta={"suite_options": options, "limit": args.limit},
                               n_at_k_pairs=_n_at_k_pairs(args.n_at_k))
    print(summary_line(metrics))
    if "rtilde_order" in metrics:
        print(metrics["rtilde_order"]["statement"])
    if args.plots:
        for line in write_figures(out, args.ks):
            print(line)
    print(f"wrote {out / 'candidates.jsonl'} and {out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
