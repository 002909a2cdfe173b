"""`python experiments/evaluate.py ...` from a checkout: the `bcoder-evaluate` command (bcoder_ray/cli/evaluate.py; --help)."""
import os, runpy, sys  # noqa: E401

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # without an install too
runpy.run_module("bcoder_ray.cli.evaluate", run_name="__main__", alter_sys=True)
