"""The project's cache folder as `envs` sees it: `$BCODER_CACHE`, else `~/.cache/bcoder-ray`.

The same folder as `bcoder_ray.util.storage.cache_root` (same variable, same default), defined again here
because `envs` never imports `bcoder_ray` (tests/test_imports.py). `envs` keeps its own files under
`envs/` inside it (`cache_dir("reference_checks")` is `<cache>/envs/reference_checks`).
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

CACHE_ENV = "BCODER_CACHE"


def cache_root() -> Path:
    return Path(os.path.expanduser(os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "bcoder-ray")))


def cache_dir(*parts: str) -> Path:
    """`<cache>/envs/<parts...>` (not created)."""
    return cache_root().joinpath("envs", *parts)


def read_json(path: Path) -> Any | None:
    """The JSON value stored at `path`, or None when it is missing or unreadable (a cache miss, never an error:
    a half-written or foreign file only costs the work again)."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def write_json(path: Path, value: Any) -> bool:
    """Store `value` atomically (a temporary file renamed over `path`), so two processes loading the same data
    never read half a file. False when the cache cannot be written (read-only home): the caller goes on."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=path.name + ".", suffix=".tmp")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(value, f, sort_keys=True)
        os.replace(tmp, path)
        return True
    except OSError:
        return False
