"""Atomic writes of local files: the project's one helper for them.

The data goes to a temporary name in the same directory (so the rename never crosses filesystems), is flushed
and fsynced, then `os.replace`s the target: a reader sees the old file or the new one, never half a file, and a
killed writer leaves at most a hidden `.<name>.*.tmp` file behind. (The replay buffer's files go through
`bcoder_ray.buffer.storage.Store`, which does the same on any pyarrow filesystem, object stores included.)
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically (parents created); returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically (parents created); returns the path."""
    return atomic_write_bytes(path, text.encode(encoding))
