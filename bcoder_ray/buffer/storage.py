"""Files under the buffer's root on any `pyarrow.fs` filesystem: atomic, durable whole-file writes (exclusive
when asked), listing that hides temporary and metadata names, reads that retry transient errors and tell them
from damage, footer validation, quarantine and restoring from it, and the compaction lock."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import uuid
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence, TypeVar

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bcoder_ray.buffer.schema import DICTIONARY_COLUMNS, STATISTICS_COLUMNS, BufferError
from bcoder_ray.util.atomic import fsync_dir, link_exclusive, make_dirs, publish_file
from bcoder_ray.util.storage import require_shared, resolve

log = logging.getLogger(__name__)

T = TypeVar("T")
TMP_PREFIX = "_tmp-"
TMP_SUFFIX = ".partial"
QUARANTINE = "quarantine"
LOCK_DIR = "_meta/locks"
# Errors a read of a Parquet file can raise: I/O (OSError, pyarrow's ArrowIOError is OSError) and parsing.
# pyarrow reports a page whose CRC fails as a plain OSError, so the type alone never proves damage.
READ_ERRORS = (pa.ArrowInvalid, OSError, ValueError)
# Pauses between attempts of a read that failed with an I/O error: bounded (about 2 s in all), then the file is
# left in place and skipped for now (UnreadableFileError), never quarantined for it.
READ_BACKOFF_S = (0.05, 0.2, 0.5, 1.2)


class BufferWarning(UserWarning):
    """Something in the buffer needed repair (a damaged file moved to quarantine) or was skipped for now."""


class DamagedFileError(Exception):
    """A file whose bytes, read in full, do not parse (proven damage); the message names the file."""


class UnreadableFileError(Exception):
    """A file that could not be read (I/O errors) after bounded retries: not proven damaged, so it stays in
    place and is tried again later; the message names the file."""


@dataclass(frozen=True)
class FileEntry:
    """One live Parquet file of an area (samples, eval, prompts, a targets folder)."""

    name: str  # basename
    path: str  # full path on the filesystem
    size: int
    num_rows: int

    @property
    def stem(self) -> str:
        return self.name[: -len(".parquet")] if self.name.endswith(".parquet") else self.name


def parquet_options(schema: pa.Schema, compression: str) -> dict:
    """Writer options: dictionary encoding and statistics only on the small columns (both cost time on
    per-token lists); dense per-token floats uncompressed (they barely compress, and compressing them took a
    third of the write time); CRC page checksums so damage inside a page is caught on read."""
    names = set(schema.names)
    per_column = {f.name: "none" if _is_float_list(f.type) else compression for f in schema}
    return {
        "compression": per_column,
        "use_dictionary": [c for c in DICTIONARY_COLUMNS if c in names],
        "write_statistics": [c for c in STATISTICS_COLUMNS + ["row_index", "suite", "problem_id"] if c in names],
        "write_page_checksum": True,
    }


def _is_float_list(t: pa.DataType) -> bool:
    """Per-token floats (log-probabilities, value targets): stored uncompressed."""
    return (pa.types.is_list(t) or pa.types.is_large_list(t)) and pa.types.is_floating(t.value_type)


class Store:
    """The buffer's root directory. Paths given to methods are relative to the root ("samples/x.parquet")."""

    def __init__(self, uri: str, filesystem: pafs.FileSystem | None = None, compression: str = "snappy"):
        self.uri = uri
        if filesystem is None:
            require_shared(uri, "buffer.uri")
        self.fs, self.root = resolve(uri, filesystem)
        self.compression = compression
        # Object stores make an object visible only once its upload completes: one PUT is atomic there.
        self.put_is_atomic = self.fs.type_name in ("s3", "gcs")
        # A local (or NFS-mounted) root is written with os calls: fsync before and after the rename, hard links
        # for exclusive names, flock for the compaction lock (pyarrow's LocalFileSystem offers none of them).
        self.local = self.fs.type_name == "local"
        self.read_backoff_s: tuple[float, ...] = READ_BACKOFF_S

    def path(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def exists(self, rel: str) -> bool:
        return self.fs.get_file_info(self.path(rel)).type == pafs.FileType.File

    def list(self, rel: str, suffix: str = ".parquet") -> list[pafs.FileInfo]:
        """Files directly under `rel` ending in `suffix`, sorted by name; temporary (`_`/`.`) names hidden."""
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True, recursive=False)
        infos = [i for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File
                 and i.base_name.endswith(suffix) and not i.base_name.startswith(("_", "."))]
        return sorted(infos, key=lambda i: i.base_name)

    def list_dirs(self, rel: str) -> list[str]:
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True, recursive=False)
        return sorted(i.base_name for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.Directory)

    def write_atomic(self, rel: str, write: Callable[[pa.NativeFile], None], exclusive: bool = False) -> bool:
        """Write a whole new file: under a temporary name, fsynced, then renamed and its directory fsynced (or one
        PUT on object stores), so a killed writer or a power loss leaves no partial file under a visible name.
        exclusive=True never replaces an existing file: False (nothing written) when `rel` exists, and of two
        writers of one name at once exactly one gets True (local and NFS: a hard link; object stores: see
        `_put`)."""
        final = self.path(rel)
        parent = final.rsplit("/", 1)[0]
        if self.put_is_atomic:
            return self._put(final, write, exclusive)
        if self.local:
            make_dirs(parent)  # new folders (a new fingerprint's) survive a power loss too
        else:
            self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/{TMP_PREFIX}{uuid.uuid4().hex}{TMP_SUFFIX}"
        try:
            with self.fs.open_output_stream(tmp) as out:
                write(out)
            if self.local:
                return publish_file(tmp, final, exclusive)
            if exclusive and self.exists(rel):  # a filesystem with neither links nor conditional puts
                self.fs.delete_file(tmp)
                return False
            self.fs.move(tmp, final)
            return True
        except BaseException:
            try:
                self.fs.delete_file(tmp)
            except (OSError, FileNotFoundError):
                pass
            raise

    def _put(self, final: str, write: Callable[[pa.NativeFile], None], exclusive: bool) -> bool:
        """One PUT. Exclusive: a conditional PUT (If-None-Match: *) where `conditional_put` can make one
        (S3 with boto3), else check-then-PUT, which does not exclude two writers of one name at the same moment."""
        if exclusive:
            put = conditional_put(self.fs)
            if put is not None:
                buf = pa.BufferOutputStream()
                write(buf)
                return put(final, buf.getvalue().to_pybytes())
            if self.fs.get_file_info(final).type == pafs.FileType.File:
                return False
        with self.fs.open_output_stream(final) as out:
            write(out)
        return True

    def write_parquet(self, rel: str, tables: pa.Table | Iterable[pa.Table], schema: pa.Schema,
                      row_group_size: int, exclusive: bool = False) -> bool:
        """Write a Parquet file atomically (see `write_atomic`); False when exclusive and `rel` exists."""
        batches = [tables] if isinstance(tables, pa.Table) else tables

        def write(out: pa.NativeFile) -> None:
            with pq.ParquetWriter(out, schema, **parquet_options(schema, self.compression)) as writer:
                for t in batches:
                    writer.write_table(t.cast(schema), row_group_size=row_group_size)

        return self.write_atomic(rel, write, exclusive)

    def write_bytes(self, rel: str, data: bytes, exclusive: bool = False) -> bool:
        return self.write_atomic(rel, lambda out: out.write(data), exclusive)

    def read_bytes(self, rel: str) -> bytes:
        """A whole file, I/O errors retried with backoff (UnreadableFileError naming it after the last)."""
        return self.read_path_bytes(self.path(rel))

    def read_path_bytes(self, path: str) -> bytes:
        def read() -> bytes:
            with self.fs.open_input_stream(path) as f:
                return f.read()

        return self.retrying(path, read)

    def retrying(self, path: str, read: Callable[[], T]) -> T:
        """`read()` retried on I/O errors (OSError, FileNotFoundError excepted) after each pause of
        `read_backoff_s`; then UnreadableFileError naming `path`. Only for reads whose failure cannot be damage
        (raw bytes, listings): a Parquet read goes through `read_parquet`, which tells the two apart."""
        for attempt, pause in enumerate((*self.read_backoff_s, None)):
            try:
                return read()
            except FileNotFoundError:
                raise
            except OSError as e:
                if pause is None:
                    raise UnreadableFileError(f"{path}: reading failed {attempt + 1} times, last: {e}") from e
                log.info("replay buffer %s: reading %s failed (%s); retrying in %.2f s", self.uri, path, e, pause)
                time.sleep(pause)
        raise AssertionError("unreachable")

    def read_parquet(self, path: str, read: Callable[[pq.ParquetFile], T],
                     metadata: pq.FileMetaData | None = None) -> T:
        """`read(ParquetFile)` on the file at `path`. A failure is diagnosed rather than trusted: the file's bytes
        are fetched whole (I/O errors retried with backoff, UnreadableFileError after the last) and `read` runs
        again on them in memory, where no I/O can fail. If that fails too, the bytes themselves are bad:
        DamagedFileError. If it succeeds, the first failure was transient and its result is returned."""
        try:
            return read(self._open_parquet(path, metadata))
        except FileNotFoundError:
            raise
        except READ_ERRORS as first:
            log.info("replay buffer %s: reading %s failed (%s); checking its bytes", self.uri, path, first)
        data = self.read_path_bytes(path)
        try:
            return read(pq.ParquetFile(pa.BufferReader(data), page_checksum_verification=True))
        except READ_ERRORS as e:
            raise DamagedFileError(f"{path}: damaged ({len(data)} bytes read back whole, parsing them failed: "
                                   f"{e})") from e

    def _open_parquet(self, path: str, metadata: pq.FileMetaData | None) -> pq.ParquetFile:
        return pq.ParquetFile(self.fs.open_input_file(path), metadata=metadata, page_checksum_verification=True)

    def delete(self, rel: str) -> bool:
        try:
            self.fs.delete_file(self.path(rel))
            return True
        except (FileNotFoundError, OSError):
            return False

    def parquet_file(self, path: str) -> pq.ParquetFile:
        return self._open_parquet(path, None)

    def footer(self, path: str, required: Sequence[str]) -> pq.FileMetaData:
        """The file's footer; DamagedFileError when it is proven truncated, not Parquet, or lacks columns;
        UnreadableFileError when it could not be read (see `read_parquet`)."""
        meta = self.read_parquet(path, lambda pf: pf.metadata)
        names = set(meta.schema.to_arrow_schema().names)
        missing = [c for c in required if c not in names]
        if missing:
            raise DamagedFileError(f"{path}: lacks column(s) {missing}")
        return meta

    def quarantine(self, rel: str, reason: str) -> None:
        """Move a damaged file to quarantine/<rel> and warn; another process may have moved it already."""
        dest = f"{QUARANTINE}/{rel}"
        try:
            self.fs.create_dir(self.path(dest).rsplit("/", 1)[0], recursive=True)
            self.fs.move(self.path(rel), self.path(dest))
        except (FileNotFoundError, OSError):
            if self.exists(rel):
                raise
            return
        self.warn(f"moved damaged file {rel} to {dest}: {reason}")

    def restore(self, rel: str) -> bool:
        """Move quarantine/<rel> back to <rel>, never over a live file of that name (False then)."""
        src = f"{QUARANTINE}/{rel}"
        if self.local:
            make_dirs(self.path(rel).rsplit("/", 1)[0])
            if not link_exclusive(self.path(src), self.path(rel)):
                return False
            fsync_dir(self.path(rel).rsplit("/", 1)[0])
            return True
        if not self.write_bytes(rel, self.read_bytes(src), exclusive=True):
            return False
        self.delete(src)
        return True

    def warn(self, message: str, stacklevel: int = 4) -> None:
        msg = f"replay buffer {self.uri}: {message}"
        log.warning(msg)
        warnings.warn(msg, BufferWarning, stacklevel=stacklevel)

    @contextlib.contextmanager
    def lock(self, name: str, timeout_s: float = 600.0, lease_s: float = 900.0) -> Iterator["Lease | None"]:
        """Hold the buffer-wide lock `name` (across processes and nodes) for the `with` block; BufferError naming
        the lock when another holder keeps it for `timeout_s`. Local and NFS roots: flock on
        _meta/locks/<name>.lock, released by the kernel when the holder dies (yields None). Object stores
        with conditional PUTs: a lease (yields the `Lease`, whose `check()` the holder calls before each step
        that publishes or deletes). Elsewhere: no lock, with a warning."""
        if self.local:
            with _flock(self.path(f"{LOCK_DIR}/{name}.lock"), timeout_s) as held:
                yield held
            return
        put = conditional_put(self.fs)
        if put is None:
            self.warn(f"no lock {name!r} on this filesystem ({self.fs.type_name}: no conditional PUT; install "
                      f"boto3 for S3): run one at a time", stacklevel=5)
            yield None
            return
        lease = Lease(self, name, put, lease_s)
        lease.acquire(timeout_s)
        try:
            yield lease
        finally:
            lease.release()

    def clean_tmp(self, rel_dirs: Iterable[str], older_than_s: float) -> int:
        """Delete temporary files left by killed writers, once older than `older_than_s`."""
        removed = 0
        now = time.time()
        for rel in rel_dirs:
            sel = pafs.FileSelector(self.path(rel), allow_not_found=True, recursive=False)
            for info in self.fs.get_file_info(sel):
                if info.type != pafs.FileType.File or not info.base_name.startswith(TMP_PREFIX):
                    continue
                mtime = info.mtime.timestamp() if info.mtime is not None else 0.0
                if now - mtime >= older_than_s:
                    try:
                        self.fs.delete_file(info.path)
                        removed += 1
                    except (FileNotFoundError, OSError):
                        pass
        return removed

    def disk_usage(self, rel: str) -> tuple[int, int]:
        """(files, bytes) under `rel`, recursively."""
        sel = pafs.FileSelector(self.path(rel), allow_not_found=True, recursive=True)
        infos = [i for i in self.fs.get_file_info(sel) if i.type == pafs.FileType.File]
        return len(infos), sum(i.size or 0 for i in infos)


@contextlib.contextmanager
def _flock(path: str, timeout_s: float) -> Iterator[None]:
    """An exclusive flock on `path` (created), polled until `timeout_s`: the kernel drops it when the holder's
    process dies, so a killed holder never blocks the next one; two opens of the file exclude each other even
    within one process (flock locks belong to the open file, not the process)."""
    import fcntl

    make_dirs(os.path.dirname(path))
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BufferError(f"{path}: held by another process for {timeout_s:.0f} s (another "
                                      f"compaction?); try again later") from None
                time.sleep(0.05)
        yield None
    finally:
        os.close(fd)  # closing the descriptor releases the lock


class Lease:
    """A lock on an object store that has conditional PUTs: generation objects
    _meta/locks/<name>-<generation>.json, each created at most once (If-None-Match: *). Taking the lock is
    creating the next generation once the newest is released or its lease expired (so a dead holder blocks
    others for at most `lease_s`); a holder whose lease a newer generation replaced learns it from `check()`
    and stops before publishing or deleting anything. Expiry compares the holder's clock with the taker's:
    clocks must agree to well within `lease_s`."""

    def __init__(self, store: Store, name: str, put: Callable[[str, bytes], bool], lease_s: float):
        self.store, self.name, self.put, self.lease_s = store, name, put, lease_s
        self.owner = uuid.uuid4().hex
        self.generation: int | None = None

    def _rel(self, generation: int) -> str:
        return f"{LOCK_DIR}/{self.name}-{generation:012d}.json"

    def _newest(self) -> tuple[int, dict] | None:
        gens = [int(i.base_name[len(self.name) + 1:-len(".json")]) for i in self.store.list(LOCK_DIR, ".json")
                if i.base_name.startswith(f"{self.name}-")]
        if not gens:
            return None
        try:
            return max(gens), json.loads(self.store.read_bytes(self._rel(max(gens))))
        except FileNotFoundError:
            return max(gens), {"released": True}

    def _body(self, released: bool = False) -> bytes:
        return json.dumps({"owner": self.owner, "expires": time.time() + self.lease_s,
                           "released": released}).encode()

    def acquire(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while True:
            newest = self._newest()
            gen = -1 if newest is None else newest[0]
            free = newest is None or newest[1].get("released") or newest[1].get("expires", 0) < time.time()
            if free and self.put(self.store.path(self._rel(gen + 1)), self._body()):
                self.generation = gen + 1
                if gen >= 0:
                    self.store.delete(self._rel(gen))  # keep two generations at most
                return
            if time.monotonic() >= deadline:
                raise BufferError(f"{self.store.uri}: lock {self.name!r} held by another process for "
                                  f"{timeout_s:.0f} s (another compaction?); try again later")
            time.sleep(0.2)

    def check(self) -> None:
        """Raise BufferError when this lease was lost (expired and taken): the holder must stop; renews it
        otherwise (the holder's steps come often enough to keep it)."""
        newest = self._newest()
        if newest is None or newest[0] != self.generation or newest[1].get("owner") != self.owner:
            raise BufferError(f"{self.store.uri}: lock {self.name!r} was taken over (lease expired); stopping")
        self.store.write_bytes(self._rel(self.generation), self._body())

    def release(self) -> None:
        if self.generation is not None and self.store.exists(self._rel(self.generation)):
            self.store.write_bytes(self._rel(self.generation), self._body(released=True))


# id(fs) -> (fs, put): the filesystem is kept referenced, so its id is never reused by another one
_PUTS: dict[int, tuple[pafs.FileSystem, Callable[[str, bytes], bool] | None]] = {}


def conditional_put(fs: pafs.FileSystem) -> Callable[[str, bytes], bool] | None:
    """put(path, data) -> bool: create the object only if absent (S3's If-None-Match: *, through boto3 with
    the filesystem's own endpoint and credentials), False when it exists; None when the filesystem has no such
    PUT (not S3, or boto3 not installed)."""
    if fs.type_name != "s3":
        return None
    if id(fs) not in _PUTS:
        _PUTS[id(fs)] = (fs, _s3_conditional_put(fs))
    return _PUTS[id(fs)][1]


def _s3_conditional_put(fs: pafs.FileSystem) -> Callable[[str, bytes], bool] | None:
    try:
        import boto3
        import botocore.config
        import botocore.exceptions
    except ImportError:
        return None
    opts = fs.__reduce__()[1][0]  # the S3FileSystem's constructor arguments: endpoint, region, credentials
    endpoint = opts.get("endpoint_override") or None
    client = boto3.client(
        "s3", region_name=opts.get("region") or None,
        endpoint_url=f"{opts.get('scheme') or 'https'}://{endpoint}" if endpoint else None,
        aws_access_key_id=opts.get("access_key") or None, aws_secret_access_key=opts.get("secret_key") or None,
        aws_session_token=opts.get("session_token") or None,
        # a custom endpoint (MinIO, moto) serves buckets by path, as pyarrow addresses them
        config=botocore.config.Config(s3={"addressing_style": "path" if endpoint and not opts.get(
            "force_virtual_addressing") else "auto"}))

    def put(path: str, data: bytes) -> bool:
        bucket, key = path.split("/", 1)
        for pause in (0.1, 0.3, 1.0, None):
            try:
                client.put_object(Bucket=bucket, Key=key, Body=data, IfNoneMatch="*")
                return True
            except botocore.exceptions.ClientError as e:
                status = e.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
                if status == 412:
                    return False  # the object exists
                if status != 409 or pause is None:  # 409: a conditional PUT of the same key is in flight
                    raise
                time.sleep(pause)
        return False

    return put
