"""The suites shipped with bcoder-ray; importing this package registers each one (`envs.registry`).

To add a suite: write one module here (or anywhere) with a `load(split, **options) -> list[Problem]` function
and one `register_suite(...)` call, and import it below (or from your own code).
"""

from envs.suites import apps, embedded, files, humaneval, mbpp  # noqa: F401  (each module registers its suite)
