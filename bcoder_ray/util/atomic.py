"""Atomic, durable writes of local files: the project's one helper for them.

The data goes to a temporary name in the same directory (so the rename never crosses filesystems), is flushed
and fsynced, then `os.replace`s the target, and the directory is fsynced: a reader sees the old file or the new
one, never half a file; a killed writer leaves at most a hidden `.<name>.*.tmp` file behind; and after a power
loss the new name holds the whole file (its data was on disk before the rename) and the rename itself is on disk
(the directory entry lives in the directory). The replay buffer's files go through
`bcoder_ray.buffer.storage.Store`, which writes with pyarrow and publishes local files with `publish_file` below
(object stores: one PUT).

    atomic_write_text(path, text)                 # whole-file replace, durable
    publish_file(tmp, final, exclusive=True)      # a complete temporary file -> its name; False if taken
    link_exclusive(src, dst)                      # move unless dst exists
    fsync_file(path); fsync_dir(path)
"""

from __future__ import annotations

import errno
import logging
import os
import tempfile
from pathlib import Path

log = logging.getLogger(__name__)

# errno values of a filesystem that cannot make hard links (FAT, some FUSE mounts): exclusive publishing falls
# back to check-then-rename there
_NO_LINKS = {errno.EPERM, errno.ENOTSUP, errno.EOPNOTSUPP, errno.ENOSYS, errno.EXDEV, errno.EMLINK}
_warned_no_links: set[str] = set()


def fsync_file(path: str | os.PathLike) -> None:
    """Flush a written (closed) file's data to stable storage: fsync acts on the inode, so any descriptor does,
    and the writer (pyarrow's stream) need not expose its own."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make new, renamed or removed names in directory `path` durable (a name lives in its directory's data)."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))
    except OSError:
        return  # platforms that cannot open a directory (Windows) make renames durable themselves
    try:
        os.fsync(fd)
    except OSError as e:
        if e.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EOPNOTSUPP):  # filesystems without dir sync
            raise
    finally:
        os.close(fd)


def make_dirs(path: str | os.PathLike) -> None:
    """`mkdir -p` whose new directories survive a power loss: each one created is fsynced into its parent."""
    path = Path(path)
    if path.is_dir():
        return
    make_dirs(path.parent)
    try:
        path.mkdir()
    except FileExistsError:
        return  # another process made it (and synced it, or will)
    fsync_dir(path.parent)


def publish_file(tmp: str | os.PathLike, final: str | os.PathLike, exclusive: bool = False) -> bool:
    """Give the complete temporary file `tmp` the name `final` in the same directory, durably: its data is
    fsynced before the rename (so the name never points at data still in the page cache) and the directory after.

    exclusive=False replaces any file named `final`. exclusive=True never does: the name is taken with a hard
    link (atomic create-if-absent on POSIX filesystems and NFS), and when `final` exists already `tmp` is removed
    and False returned; two processes publishing the same name at once get True exactly once."""
    fsync_file(tmp)
    if not exclusive:
        os.replace(tmp, final)
    elif not link_exclusive(tmp, final):
        os.unlink(tmp)
        return False
    fsync_dir(os.path.dirname(os.path.abspath(final)))
    return True


def link_exclusive(tmp: str | os.PathLike, final: str | os.PathLike) -> bool:
    """Move `tmp` to `final` unless a file named `final` exists (False then, `tmp` left as it is); not durable
    by itself (see `publish_file`)."""
    try:
        os.link(tmp, final)
    except FileExistsError:
        return False
    except OSError as e:
        if e.errno not in _NO_LINKS:
            raise
        return _rename_if_absent(tmp, final, e)
    os.unlink(tmp)  # the data now lives under `final`; the temporary name goes
    return True


def _rename_if_absent(tmp: str | os.PathLike, final: str | os.PathLike, why: OSError) -> bool:
    """The fallback without hard links: not atomic against a second publisher of the same name."""
    folder = os.path.dirname(os.path.abspath(final))
    if folder not in _warned_no_links:
        _warned_no_links.add(folder)
        log.warning("%s: the filesystem makes no hard links (%s); two writers publishing one name at the same "
                    "moment are not excluded there", folder, why)
    if os.path.exists(final):
        return False
    os.replace(tmp, final)
    return True


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """Write `data` to `path` atomically and durably (parents created); returns the path."""
    path = Path(path)
    make_dirs(path.parent)
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
    fsync_dir(path.parent)  # the rename itself survives a power loss
    return path


def atomic_write_text(path: str | os.PathLike, text: str, encoding: str = "utf-8") -> Path:
    """Write `text` to `path` atomically and durably (parents created); returns the path."""
    return atomic_write_bytes(path, text.encode(encoding))
