"""`python experiments/run.py ...` from a checkout: the `bcoder-run` command (bcoder_ray/cli/run.py; --help)."""
import os, runpy, sys  # noqa: E401

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # without an install too
runpy.run_module("bcoder_ray.cli.run", run_name="__main__", alter_sys=True)
