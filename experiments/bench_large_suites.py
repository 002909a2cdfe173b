"""Problems per second per core on large test suites: N stdio problems of 200 tests each (the size of
CodeContests' generated test sets), run in full and with stop-at-first-failure (`envs/first_failure.py`).

Each problem reads a line of 50 integers and prints their sorted prefix sums, times a per-problem factor (a
quick program: the figure is the sandbox's cost per test, not the programs' own work). Four passes, each on a
fresh Executor with its cache off, so every test really runs:
- right, full: the correct program on every test (the figure beside ScaleBox's 0.6 problems/s/core);
- right, first failure: the same in stages (10, 20, 40, 80, 50 tests): what the stages cost a passing program;
- wrong, full / wrong, first failure: a program wrong on every test; first failure runs its first stage only.

problems/s/core = problems / wall seconds / workers (so with --workers equal to the cores it uses, the per-core
rate). ScaleBox (2026) reports 0.6 problems/s/core for full suites of its own set, whose programs and inputs are
contest-sized (up to 10^5-10^6 numbers, solutions of seconds): it measures program work plus sandbox cost, this
measures mostly the sandbox's per-test cost. Compare orders of magnitude, not the ratio.

    nice -n 19 python experiments/bench_large_suites.py [--problems N] [--tests T] [--workers W]
"""

from __future__ import annotations

import argparse
import random
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from envs.execute import Executor  # noqa: E402
from envs.problem import TestSpec  # noqa: E402

RIGHT = """k = {k}
xs = sorted(map(int, input().split()))
total, out = 0, []
for x in xs:
    total += x
    out.append(total * k)
print(*out)
"""
WRONG = RIGHT.replace("total * k", "total * k + 1")
SCALEBOX = 0.6  # problems/s/core, full test suites (ScaleBox, 2026)


def fixture(n_problems: int, n_tests: int, seed: int = 0) -> list[tuple[str, str, TestSpec]]:
    """(right program, wrong program, tests) per problem."""
    rng = random.Random(seed)
    out = []
    for j in range(n_problems):
        k = j + 1
        cases = []
        for _ in range(n_tests):
            xs = [rng.randint(-1000, 1000) for _ in range(50)]
            total, sums = 0, []
            for x in sorted(xs):
                total += x
                sums.append(total * k)
            cases.append({"input": " ".join(map(str, xs)) + "\n", "output": " ".join(map(str, sums)) + "\n"})
        out.append((RIGHT.format(k=k), WRONG.format(k=k), TestSpec("stdio", cases=tuple(cases))))
    return out


def run(jobs: list[tuple[str, TestSpec]], workers: int, first_failure: bool) -> tuple[float, list]:
    with Executor(workers=workers, cache=False) as ex:
        ex.run_batch([("print(1)\n", TestSpec("stdio", cases=({"input": "", "output": "1\n"},)))])  # warm up
        started = time.perf_counter()
        results = ex.run_batch(jobs, first_failure=first_failure)
        return time.perf_counter() - started, results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--problems", type=int, default=16)
    ap.add_argument("--tests", type=int, default=200)
    ap.add_argument("--workers", type=int, default=1, help="sandbox workers (= cores used)")
    args = ap.parse_args(argv)
    problems = fixture(args.problems, args.tests)
    print(f"{args.problems} problems x {args.tests} stdio tests, {args.workers} worker(s)")
    print("| program | tests | outcome | tests run | wall s | problems/s/core | test runs/s/core |")
    print("| --- | --- | --- | ---: | ---: | ---: | ---: |")
    rates = {}
    for name, which in (("right", 0), ("wrong", 1)):
        for mode in (False, True):
            secs, results = run([(p[which], p[2]) for p in problems], args.workers, mode)
            ran = sum(t.status != "not_run" for r in results for t in r.tests)
            outcomes = sorted({r.outcome.value for r in results})
            rate = args.problems / secs / args.workers
            rates[(name, mode)] = rate
            print(f"| {name} | {'first failure' if mode else 'full'} | {'/'.join(outcomes)} | {ran} | {secs:.1f} | "
                  f"{rate:.2f} | {ran / secs / args.workers:.0f} |")
    full = rates[("right", False)]
    print(f"full suites: {full:.2f} problems/s/core (ScaleBox: {SCALEBOX} on its heavier set, {full / SCALEBOX:.1f}x); "
          f"a wrong program: {rates[('wrong', True)] / rates[('wrong', False)]:.1f}x faster with first failure; "
          f"a right one: {rates[('right', True)] / full:.2f}x with the stages")


if __name__ == "__main__":
    main()
