"""The scripts of experiments/ loaded as modules for the tests (they are scripts run by path, not a package)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

EXPERIMENTS = Path(__file__).resolve().parent.parent / "experiments"


def load_experiment(stem: str) -> ModuleType:
    """experiments/<stem>.py, executed afresh as the module `experiments_<stem>` (registered in sys.modules
    first: dataclasses look their module up while the file executes)."""
    spec = importlib.util.spec_from_file_location(f"experiments_{stem}", EXPERIMENTS / f"{stem}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
