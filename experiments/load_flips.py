"""Do verdicts depend on load? The 1,138 HumanEval + MBPP references through `python -m envs.execute --batch`,
once on the machine as it is and once beside CPU burners (two busy processes per core, by default), with the
executor's default limits. Prints the verdicts that differ and, last, `load flips: N of M`. Infrastructure
results (`infra_error`, a program starved past the wall-clock backstop) are counted separately: they are no
verdicts, so they cannot flip one, but they are listed.

    python experiments/load_flips.py [--limit K] [--workers N] [--burners-per-core B]

A script, not a test: it takes minutes (MBPP 123 alone runs 5.2 s of CPU, three times that beside burners).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "experiments"))

from bench_executor import MBPP, load_programs  # noqa: E402


def _burn() -> None:
    while True:
        pass


def run_batch(jobs_path: str, workers: int) -> tuple[dict, float]:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    t = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "envs.execute", "--batch", jobs_path, "--workers", str(workers)],
                         capture_output=True, text=True, env=env, cwd=str(ROOT), check=True)
    secs = time.monotonic() - t
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.strip()]
    return {r["id"]: r for r in rows}, secs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--limit", type=int, default=None, help="first K programs only (a quick check)")
    ap.add_argument("--workers", type=int, default=len(os.sched_getaffinity(0)))
    ap.add_argument("--burners-per-core", type=int, default=2)
    args = ap.parse_args(argv)
    programs = load_programs(MBPP, None)[:args.limit]
    with tempfile.NamedTemporaryFile("w", suffix=".jsonl", delete=False) as f:
        for p in programs:
            f.write(json.dumps({"id": p["name"], "program": p["program"], "tests": p["tests"].to_json()}) + "\n")
        jobs = f.name
    try:
        print(f"{len(programs)} programs, {args.workers} workers; load average {os.getloadavg()[0]:.2f}", flush=True)
        idle, idle_s = run_batch(jobs, args.workers)
        print(f"as is: {idle_s:.1f} s", flush=True)
        n_burners = args.burners_per_core * len(os.sched_getaffinity(0))
        burners = [multiprocessing.Process(target=_burn, daemon=True) for _ in range(n_burners)]
        for b in burners:
            b.start()
        try:
            time.sleep(1.0)
            loaded, loaded_s = run_batch(jobs, args.workers)
            load = os.getloadavg()[0]
        finally:
            for b in burners:
                b.kill()
                b.join()
        print(f"beside {n_burners} CPU burners: {loaded_s:.1f} s (load average {load:.2f})", flush=True)
    finally:
        os.unlink(jobs)
    flips, infra = [], []
    for name, a in idle.items():
        b = loaded[name]
        if a.get("infra_error") or b.get("infra_error"):
            infra.append((name, a["outcome"], b["outcome"]))
        elif a["outcome"] != b["outcome"]:
            flips.append((name, a["outcome"], b["outcome"], b.get("limit"), b.get("error")))
    for name, a, b, limit, error in flips:
        print(f"  flip {name}: {a} -> {b} (limit {limit}: {error})")
    for name, a, b in infra:
        print(f"  infrastructure result {name}: as is {a}, loaded {b}")
    slow = max(idle.values(), key=lambda r: r.get("cpu_time", 0.0))
    print(f"most CPU time: {slow['id']} {slow.get('cpu_time', 0.0):.2f} s; infrastructure results: {len(infra)}")
    print(f"load flips: {len(flips)} of {len(idle)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
