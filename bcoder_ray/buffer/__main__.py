"""`python -m bcoder_ray.buffer stats PATH [--json]`, `python -m bcoder_ray.buffer compact PATH` and
`python -m bcoder_ray.buffer recheck PATH` (restore quarantined files that read back whole)."""

from __future__ import annotations

import argparse
import sys
from typing import Sequence

from bcoder_ray.buffer.recheck import recheck
from bcoder_ray.buffer.replay_buffer import ReplayBuffer
from bcoder_ray.buffer.stats import to_json_text


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bcoder_ray.buffer",
                                     description="Inspect or maintain a bcoder-ray replay buffer.")
    sub = parser.add_subparsers(dest="command", required=True)
    p_stats = sub.add_parser("stats", help="rows by suite, source, outcome, iteration; pass rate; size on disk")
    p_stats.add_argument("path", help="buffer location: a path or a pyarrow.fs URI (s3://bucket/prefix?...)")
    p_stats.add_argument("--json", action="store_true", help="print JSON instead of text")
    p_compact = sub.add_parser("compact", help="merge small files (compactors exclude each other by a lock)")
    p_compact.add_argument("path")
    p_compact.add_argument("--target-rows", type=int, default=65536)
    p_recheck = sub.add_parser("recheck", help="re-check quarantined files; restore those that read back whole "
                                               "and hold no rows readable elsewhere")
    p_recheck.add_argument("path")
    args = parser.parse_args(argv)
    buffer = ReplayBuffer(args.path)
    if args.command == "stats":
        stats = buffer.stats()
        print(to_json_text(stats) if args.json else stats.format())
    elif args.command == "recheck":
        print(recheck(buffer.catalog).format())
    else:
        for r in buffer.compact(args.target_rows):
            print(f"{r.area}: {r.files_before} -> {r.files_after} files, {r.rows_moved} rows merged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
