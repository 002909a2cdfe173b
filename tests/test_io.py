"""bcoder_ray.util.atomic: atomic local writes."""

from __future__ import annotations

import os

import pytest

from bcoder_ray.util.atomic import atomic_write_bytes, atomic_write_text


def test_atomic_write_replaces_whole_files_and_leaves_no_temporary(tmp_path, monkeypatch):
    path = tmp_path / "deep" / "state.json"
    assert atomic_write_text(path, '{"a": 1}\n') == path
    assert path.read_text() == '{"a": 1}\n'
    atomic_write_bytes(path, b"new")
    assert path.read_bytes() == b"new" and os.listdir(path.parent) == ["state.json"]

    def killed(src, dst):  # the process dies between writing and renaming
        raise KeyboardInterrupt

    monkeypatch.setattr(os, "replace", killed)
    with pytest.raises(KeyboardInterrupt):
        atomic_write_text(path, "half")
    assert path.read_bytes() == b"new" and os.listdir(path.parent) == ["state.json"]
