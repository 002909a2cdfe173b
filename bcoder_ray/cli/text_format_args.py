"""The command-line flags that set how prompts are built and where programs end, shared by `bcoder-evaluate` and
`bcoder-generate` (default: as the run given by --run-dir has them; plain for a bare --checkpoint)."""

from __future__ import annotations

import argparse
from typing import Any


def add_text_format_arguments(group: Any) -> None:
    """--chat-template and --stop-string on an argparse parser or argument group."""
    group.add_argument("--chat-template", action="store_true",
                       help="prompts as one user turn of the tokenizer's chat template (default: as the run has "
                            "them)")
    group.add_argument("--stop-string", action="append", default=[], metavar="TEXT",
                       help="a string that ends a sampled program (repeatable; default: the run's "
                            "model.stop_strings)")
    group.add_argument("--response-prefix", default=None, metavar="TEXT",
                       help="text the answer starts with, written into every prompt (e.g. an opening fence; "
                            "default: the run's model.response_prefix)")


def text_format_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The flags as `run_folder.sampler_and_ranker`'s keyword arguments (None: the run's own)."""
    return {"chat_template": True if args.chat_template else None, "stop_strings": args.stop_string or None,
            "response_prefix": args.response_prefix}
