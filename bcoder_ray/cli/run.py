"""Run the iteration loop of any registered algorithm: rollout -> targets -> learn -> evaluate, on Ray.

    python experiments/run.py                                  # B-Coder on the embedded default, local Ray
    python experiments/run.py --config mbpp --stages.theta.lr 3e-5
    python experiments/run.py --config ci_tiny --algorithm.name bcoder_optimality --run-dir runs/opt
    python experiments/run.py --resume runs/mine               # continue after its last completed iteration
    python experiments/run.py --list-algorithms                # the registered algorithms, one a line
    python experiments/run.py --list-configs                   # the configs shipped inside the package
    python experiments/run.py --config apps_codet5 --dry-run   # load, validate and print the resolved config
    python experiments/run.py --import my_pkg.my_algo --algorithm.name mine   # an outside algorithm
    ray job submit --working-dir . -- python experiments/run.py --run-dir /tmp/runs/a   # on a cluster

Any config field can be overridden with `--section.key value` (see bcoder_ray/config.py). A bad config stops
here, naming the key, before Ray starts.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys


from bcoder_ray.config import ConfigError


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Other arguments are config overrides: --section.key value")
    parser.add_argument("--config", default=None,
                        help="a shipped config name (--list-configs) or a YAML path (default: embedded)")
    parser.add_argument("--run-dir", default=None, help="run folder (default: a new folder under runs/)")
    parser.add_argument("--resume", default=None, metavar="RUN_DIR",
                        help="continue the run in RUN_DIR after its last completed iteration")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (it registers an outside algorithm); repeatable")
    parser.add_argument("--list-algorithms", action="store_true", help="print the registered algorithms")
    parser.add_argument("--list-configs", action="store_true", help="print the shipped config names")
    parser.add_argument("--dry-run", action="store_true", help="load and validate the config, print it, stop")
    return parser.parse_known_args(argv)


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(sys.argv[1:] if argv is None else argv)
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    # SIGTERM (timeout, a job stop) unwinds like Ctrl-C, so the local Ray instance is shut down too
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    from bcoder_ray.algorithms import algorithm_class, algorithm_names, import_modules
    from bcoder_ray.loop.components import check_components
    from bcoder_ray.config import load_config, shipped_configs
    from bcoder_ray.loop.driver import prepare_run, run
    from bcoder_ray.loop.resources import actor_need, learning_needs

    try:
        if args.list_algorithms or args.list_configs:
            import_modules(args.imports)
            print("\n".join(algorithm_names() if args.list_algorithms else shipped_configs()))
            return 0
        if args.dry_run:
            cfg = load_config(args.config, overrides, imports=args.imports)
            check_components(cfg)
            print(cfg.to_yaml(), end="")
            stages = algorithm_class(cfg.algorithm.name).stage_names
            print("# what each phase holds at once (checked against the cluster at start), alone:")
            print(f"#   rollout actors: {actor_need(cfg)}")
            for phase, need in learning_needs(cfg, stages).items():
                print(f"#   {phase}: {need}")
            storage = cfg.run.storage_uri or "null: the run folder itself"
            print("# what every node reads and writes (probed on every node at start):")
            print(f"#   run.storage_uri: {storage} (train/, models/theta_ckpt/, buffer/ under <run folder name>/)")
            print(f"#   buffer.uri: {cfg.buffer.uri or 'null: <run.storage_uri>/<run folder name>/buffer'}")
            return 0
        plan = prepare_run(config=args.config, overrides=overrides, run_dir=args.run_dir, resume=args.resume,
                           imports=args.imports)
    except (ConfigError, KeyError) as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    summary = run(plan)
    print(summary.table)
    print(f"run folder: {plan.run_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
