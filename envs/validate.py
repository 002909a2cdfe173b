"""Run every reference solution of a suite through the executor and report how many pass, per split.

    python -m envs.validate SUITE [--split S] [--workers N] [--timeout-per-test SECONDS] [--opt KEY=VALUE ...]

`--opt` passes loader options (values parsed as JSON where they parse, else kept as strings), e.g.
`python -m envs.validate apps --split train --opt source=path/to/apps`; `--source` and `--format` are short for
`--opt source=...` and `--opt format=...` (`python -m envs.validate files --source my_problems.jsonl`). Every failing reference is listed
(APPS and MBPP carry some broken ones). For each split it prints one line of counts, plus, for suites with
example tests, how many problems have none. Without `--split`, a split the loader cannot make from the options
given (APPS "validation" needs `--opt validation_size=N`) is reported as skipped. The last line is `reference pass rate: P/N (X%)`, over all
references of all splits validated. Problems whose references all fail are listed as `all references fail:`
(the `files` suite leaves them out of every run; it is validated here without that check, so all are seen).
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass, field
from typing import Sequence, TextIO

from envs.problem import Problem, SpecError
from envs.registry import load_suite, suite_info, suite_names
from envs.result import ExecResult
from envs.scoring import BatchExecutor, score_programs


@dataclass
class SplitReport:
    suite: str
    split: str
    problems: int = 0
    references: int = 0
    passed: int = 0
    problems_with_passing_reference: int = 0
    problems_without_references: int = 0
    problems_without_example_tests: int = 0
    broken: list[tuple[str, int, ExecResult]] = field(default_factory=list)  # (problem key, index, result)
    all_fail: list[str] = field(default_factory=list)  # keys of problems with references, none passing


def validate_problems(executor: BatchExecutor, problems: Sequence[Problem], suite: str, split: str) -> SplitReport:
    """Score every reference of every problem in one batch."""
    report = SplitReport(suite, split, problems=len(problems))
    pairs = [(p, i, ref) for p in problems for i, ref in enumerate(p.references)]
    results = score_programs(executor, [p for p, _, _ in pairs], [ref for _, _, ref in pairs])
    passing_problems = set()
    for (problem, index, _), result in zip(pairs, results):
        report.references += 1
        if result.passed:
            report.passed += 1
            passing_problems.add(problem.key)
        else:
            report.broken.append((problem.key, index, result))
    report.problems_with_passing_reference = len(passing_problems)
    report.all_fail = [p.key for p in problems if p.references and p.key not in passing_problems]
    report.problems_without_references = sum(not p.references for p in problems)
    report.problems_without_example_tests = sum(p.example_tests is None for p in problems)
    return report


def why_broken(report: SplitReport) -> dict[str, str]:
    """{problem key: why} for the report's problems whose references all fail (the first failure's reason)."""
    why: dict[str, str] = {}
    for key, index, result in report.broken:
        if key in report.all_fail and key not in why:
            kind = "timeout" if result.timeout else result.outcome.value
            why[key] = f"reference {index}: {kind}: {_first_line(result.error)}"
    return why


def _first_line(text: str | None, limit: int = 160) -> str:
    line = (text or "").strip().splitlines()[-1:] or [""]
    return line[0][:limit]


def print_report(report: SplitReport, has_example_tests: bool, out: TextIO) -> None:
    for key, index, result in report.broken:
        kind = "timeout" if result.timeout else result.outcome.value
        print(f"  broken: {key} reference {index}: {kind}: {_first_line(result.error)}", file=out)
    left_out = " (never trained on: the files suite leaves it out)" if report.suite == "files" else ""
    for key in report.all_fail:
        print(f"  all references fail: {key}{left_out}", file=out)
    line = (f"{report.suite}/{report.split}: {report.passed}/{report.references} references pass; "
            f"{report.problems_with_passing_reference}/{report.problems} problems have a passing reference")
    if report.all_fail:
        line += f"; {len(report.all_fail)} have references that all fail"
    if report.problems_without_references:
        line += f"; {report.problems_without_references} have no reference"
    if has_example_tests:
        line += f"; {report.problems_without_example_tests}/{report.problems} have no example tests"
    print(line, file=out)


def _parse_opts(opts: Sequence[str]) -> dict:
    options = {}
    for opt in opts:
        key, sep, value = opt.partition("=")
        if not sep or not key:
            raise SystemExit(f"--opt expects KEY=VALUE, got {opt!r}")
        try:
            options[key] = json.loads(value)
        except json.JSONDecodeError:
            options[key] = value
    return options


def main(argv: Sequence[str] | None = None, out: TextIO = sys.stdout) -> float:
    import envs  # noqa: F401  (registers the suites)
    from envs.execute import Executor

    parser = argparse.ArgumentParser(prog="python -m envs.validate", description=__doc__.split("\n\n")[0])
    parser.add_argument("suite", choices=suite_names())
    parser.add_argument("--split", action="append", help="split(s) to validate (default: all of the suite's)")
    parser.add_argument("--workers", type=int, default=None, help="executor worker processes")
    parser.add_argument("--timeout-per-test", type=float, default=None,
                        help="seconds per test (default: the executor's)")
    parser.add_argument("--opt", action="append", default=[], metavar="KEY=VALUE", help="loader option")
    parser.add_argument("--source", help="short for --opt source=SOURCE")
    parser.add_argument("--format", help="short for --opt format=FORMAT")
    args = parser.parse_args(argv)
    info = suite_info(args.suite)
    splits = args.split or list(info.splits)
    options = _parse_opts(args.opt)
    for key in ("source", "format"):
        if getattr(args, key) is not None:
            options[key] = getattr(args, key)
    if args.suite == "files":
        options.setdefault("check_references", False)  # report every problem here; runs leave the broken out
    total = passed = 0
    limits = {} if args.timeout_per_test is None else {"timeout_per_test": args.timeout_per_test}
    with Executor(workers=args.workers, **limits) as executor:
        for split in splits:
            try:
                problems = load_suite(args.suite, split, **options)
            except SpecError:  # bad data is an error, never a skipped split
                raise
            except ValueError as e:
                if args.split:  # asked for by name: its error is the answer
                    raise
                # a split the loader cannot make without an option (APPS "validation" needs validation_size)
                print(f"{args.suite}/{split}: skipped ({e})", file=out)
                continue
            report = validate_problems(executor, problems, args.suite, split)
            print_report(report, any(p.example_tests is not None for p in problems), out)
            total += report.references
            passed += report.passed
    rate = passed / total if total else 0.0
    print(f"reference pass rate: {passed}/{total} ({100 * rate:.2f}%)", file=out)
    return rate


if __name__ == "__main__":
    main()
