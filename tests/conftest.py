"""Fixtures shared by several test files."""

from __future__ import annotations

import os
import sys
import time
from types import SimpleNamespace

import pytest

SMOLLM2 = "smollm2-135m-instruct"


@pytest.fixture(scope="session")
def converted(tmp_path_factory):
    """The packaged checkpoint (SmolLM2-135M-Instruct) fetched, verified and converted once for the whole test run,
    in a temporary cache (tests/test_gguf.py checks how; tests/test_real_model.py runs the loop's parts on it)."""
    from bcoder_ray.model import gguf

    cache = str(tmp_path_factory.mktemp("bcoder-cache"))
    installed = gguf.installed_copy(gguf.PACKAGED[SMOLLM2])
    log: list[str] = []
    started = time.time()
    folder = gguf.resolve_checkpoint(SMOLLM2, cache=cache, log=log.append)
    seconds = time.time() - started
    print(f"\n{SMOLLM2}: {seconds:.0f}s to fetch and convert; " + " | ".join(log), file=sys.stderr)
    return SimpleNamespace(cache=cache, folder=folder, log=log, installed=installed,
                           file=gguf.packaged_file(SMOLLM2, cache=cache))


@pytest.fixture(scope="module")
def ray_local(request):
    """A local Ray instance on 2 CPUs for one test module; the module's own classes and functions travel to Ray
    workers by value (they are not importable there)."""
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    import ray
    import ray.cloudpickle

    ray.cloudpickle.register_pickle_by_value(request.module)
    ray.init(num_cpus=2, object_store_memory=200 * 1024 ** 2, include_dashboard=False)
    yield
    ray.shutdown()
