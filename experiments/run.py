"""Run B-Coder's iteration loop: rollout -> targets -> learn (stage φ, stage θ) -> evaluate, on Ray.

    python experiments/run.py                                  # the embedded default, local Ray
    python experiments/run.py --config experiments/configs/mbpp.yaml --theta.lr 3e-5
    python experiments/run.py --run-dir runs/mine              # choose the run folder
    python experiments/run.py --resume runs/mine               # continue after its last completed iteration
    ray job submit --working-dir . -- python experiments/run.py --run-dir /tmp/runs/a   # on a cluster

Any config field can be overridden with `--section.key value` (see bcoder_ray/config.py). A bad config stops
here, naming the key, before Ray starts.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # runnable from a checkout without install

from bcoder_ray.config import ConfigError  # noqa: E402


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Other arguments are config overrides: --section.key value")
    parser.add_argument("--config", default=None, help="YAML config (default: experiments/configs/embedded.yaml)")
    parser.add_argument("--run-dir", default=None, help="run folder (default: a new folder under runs/)")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR",
                        help="continue the run in RUN_DIR after its last completed iteration")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # SIGTERM (timeout, a job stop) unwinds like Ctrl-C, so the local Ray instance is shut down too
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    from bcoder_ray.driver import prepare_run, run

    try:
        plan = prepare_run(config_path=args.config, overrides=overrides, run_dir=args.run_dir,
                           resume=args.resume)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    summary = run(plan)
    print(summary.table)
    print(f"run folder: {plan.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
