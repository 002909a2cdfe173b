"""Quieter logs in actors, Ray Train workers and Ray Data tasks: the run draws its own progress bars."""

from __future__ import annotations

import importlib
import logging
import warnings

# Ray loggers whose routine messages would bury the run's own progress lines: a line per ray.train.report, and
# a warning every few seconds from Train's placement-group cleaner when the state API is off (no dashboard).
QUIET_LOGGERS = {"ray.train.v2._internal.execution.context": "WARNING",
                 "ray.train.v2._internal.execution.controller.placement_group_cleaner": "ERROR"}


def quiet_libraries() -> None:
    """No per-load progress bars from transformers inside actors and workers (they would flood the driver)."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    hf_logging.set_verbosity_error()


def quiet_ray_logs() -> None:
    """Raise the level of `QUIET_LOGGERS` (a `worker_process_setup_hook` of the local Ray instance, and called
    by the train loop). Some of those modules name their logger after their file, so both names are set."""
    # Ray's own call, not ours: Ray Train's state tracking (RAY_TRAIN_ENABLE_STATE_TRACKING=1) exports the ingest
    # options through `DataConfig.default_ingest_options()`, which sets the deprecated option on every call; the
    # run itself builds its options without it (`loop.learner.in_order_data_config`)
    warnings.filterwarnings("ignore", message=r"`ExecutionOptions\.exclude_resources` is deprecated",
                            category=DeprecationWarning)
    for name, level in QUIET_LOGGERS.items():
        logging.getLogger(name).setLevel(level)
        try:
            logging.getLogger(importlib.import_module(name).__file__).setLevel(level)
        except ImportError:  # another Ray version: nothing to quiet
            pass
