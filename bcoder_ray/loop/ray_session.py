"""The Ray session of a run: join a cluster (`ray.address`, RAY_ADDRESS under `ray job submit`) or start a local
instance sized for small machines; shut down only what was started here."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator

from bcoder_ray.config import Config

# Ray Train settings for small shared machines: a worker group may take more than the default 60 s to start
# when the CPUs are busy, and the controller's 2 s poll adds idle time to every short stage.
RAY_TRAIN_ENV = {"RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "600", "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S": "0.5"}


def _quiet_ray_data() -> None:
    import ray.data

    ctx = ray.data.DataContext.get_current()
    ctx.enable_progress_bars = False  # the run shows its own bars
    ctx.print_on_execution_start = False


def _pythonpath_with_repo() -> str:
    """PYTHONPATH for local Ray workers: this checkout first (the setup hook imports bcoder_ray before the
    driver's sys.path reaches the worker), then whatever was set."""
    repo = str(Path(__file__).resolve().parent.parent)
    rest = os.environ.get("PYTHONPATH", "")
    return repo + (os.pathsep + rest if rest else "")


@contextlib.contextmanager
def ray_session(cfg: Config) -> Iterator[None]:
    """Join RAY_ADDRESS / ray.address when given (ray job submit), else start a local instance with a capped
    object store; shut down only what this function started."""
    import ray

    for name, value in RAY_TRAIN_ENV.items():  # Ray Train passes these on to its controller
        os.environ.setdefault(name, value)
    if ray.is_initialized():
        _quiet_ray_data()
        yield
        return
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    address = cfg.ray.address or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address)  # a job's own runtime env (working dir) stays as submitted
    else:
        ray.init(address="local", num_cpus=cfg.ray.num_cpus, num_gpus=cfg.ray.num_gpus,  # never another instance
                 object_store_memory=cfg.ray.object_store_mb * 1024 ** 2,
                 include_dashboard=cfg.ray.include_dashboard,
                 runtime_env={"worker_process_setup_hook": "bcoder_ray.util.quiet.quiet_ray_logs",
                              "env_vars": {"RAY_DATA_DISABLE_PROGRESS_BARS": "1",
                                           "PYTHONPATH": _pythonpath_with_repo()}})
    _quiet_ray_data()
    try:
        yield
    finally:
        ray.shutdown()
