"""`python experiments/generate.py ...` from a checkout: the `bcoder-generate` command (bcoder_ray/cli/generate.py; --help)."""
import os, runpy, sys  # noqa: E401

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # without an install too
runpy.run_module("bcoder_ray.cli.generate", run_name="__main__", alter_sys=True)
