"""The special-judge table: on problems whose right answers are not one text, how many correct reference
solutions the default stdio rule ("whitespace": exact tokens, 1e-6 on decimal expected tokens) rejects, and how
many the problem's own rule (its spec's `compare`: float tolerance, unordered lines, case-insensitive tokens,
a checker) accepts. Each problem's references are correct programs, so every rejection is a false negative: a
wrong reward a learner would be fed.

    python experiments/special_judges.py [--source tests/fixtures/files/float_problems.jsonl] [--split test]
                                         [--apps PATH/TO/apps_sample]

With `--apps`, the APPS problems of that directory (original layout) are judged too, under the default rule
and under the float rule (1e-6), to show that the tolerant rule accepts what the default accepts there.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from envs.execute import Executor  # noqa: E402
from envs.problem import Comparison, Problem, TestSpec  # noqa: E402
from envs.registry import load_suite  # noqa: E402
from envs.scoring import score_programs  # noqa: E402


@dataclasses.dataclass
class Row:
    problem: str
    rule: str
    references: int
    default_accepts: int
    rule_accepts: int


def judge(executor: Executor, problems: list[Problem], rule_of=lambda p: p.hidden_tests.compare) -> list[Row]:
    """One row per problem: references accepted by the default rule and by `rule_of(problem)`."""
    rows = []
    for p in problems:
        default = dataclasses.replace(p, hidden_tests=TestSpec("stdio", cases=p.hidden_tests.cases))
        ruled = dataclasses.replace(p, hidden_tests=TestSpec("stdio", cases=p.hidden_tests.cases,
                                                             compare=rule_of(p)))
        refs = list(p.references)
        by_default = score_programs(executor, [default] * len(refs), refs)
        by_rule = score_programs(executor, [ruled] * len(refs), refs)
        rows.append(Row(p.key, ruled.hidden_tests.rule.rule, len(refs), sum(r.passed for r in by_default),
                        sum(r.passed for r in by_rule)))
    return rows


def print_table(title: str, rows: list[Row]) -> None:
    print(f"\n{title}\n")
    print("| problem | rule | references | rejected by the default rule | accepted by its rule |")
    print("| --- | --- | ---: | ---: | ---: |")
    for r in rows:
        print(f"| {r.problem} | {r.rule} | {r.references} | {r.references - r.default_accepts} | {r.rule_accepts} |")
    n = sum(r.references for r in rows)
    rejected = sum(r.references - r.default_accepts for r in rows)
    accepted = sum(r.rule_accepts for r in rows)
    print(f"| all | | {n} | {rejected} | {accepted} |")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--source", default=str(ROOT / "tests" / "fixtures" / "files" / "float_problems.jsonl"))
    ap.add_argument("--split", default="test")
    ap.add_argument("--apps", default=None, help="an APPS directory (original layout) to judge as well")
    ap.add_argument("--workers", type=int, default=2)
    args = ap.parse_args(argv)
    problems = load_suite("files", args.split, source=args.source, check_references=False)
    with Executor(workers=args.workers) as executor:
        print_table(f"special judges on {args.source} [{args.split}]", judge(executor, problems))
        if args.apps:
            apps = [p for p in load_suite("apps", "train", source=args.apps) if p.hidden_tests.style == "stdio"]
            print_table(f"APPS stdio problems of {args.apps}: default rule vs float (1e-6)",
                        judge(executor, apps, lambda p: Comparison("float")))


if __name__ == "__main__":
    main()
