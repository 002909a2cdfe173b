"""Files under the buffer's root on any `pyarrow.fs` filesystem: atomic whole-file writes, listing that hides
temporary and metadata names, footer validation and quarantine."""

from __future__ import annotations

import logging
import time
import uuid
import warnings
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from bcoder_ray.buffer.schema import DICTIONARY_COLUMNS, STATISTICS_COLUMNS
from bcoder_ray.util.storage import require_shared, resolve

log = logging.getLogger(__name__)

TMP_PREFIX = "_tmp-"
TMP_SUFFIX = ".partial"
QUARANTINE = "quarantine"


class BufferWarning(UserWarning):
    """Something in the buffer needed repair (a damaged file moved to quarantine)."""


class DamagedFileError(Exception):
    """A Parquet file that cannot be read back; the message names the file."""


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

    def write_atomic(self, rel: str, write: Callable[[pa.NativeFile], None]) -> None:
        """Write a whole new file: under a temporary name then renamed (or one PUT on object stores), so a
        killed writer leaves no partial file under a visible name."""
        final = self.path(rel)
        parent = final.rsplit("/", 1)[0]
        if self.put_is_atomic:
            with self.fs.open_output_stream(final) as out:
                write(out)
            return
        self.fs.create_dir(parent, recursive=True)
        tmp = f"{parent}/{TMP_PREFIX}{uuid.uuid4().hex}{TMP_SUFFIX}"
        try:
            with self.fs.open_output_stream(tmp) as out:
                write(out)
            self.fs.move(tmp, final)
        except BaseException:
            try:
                self.fs.delete_file(tmp)
            except (OSError, FileNotFoundError):
                pass
            raise

    def write_parquet(self, rel: str, tables: pa.Table | Iterable[pa.Table], schema: pa.Schema,
                      row_group_size: int) -> None:
        batches = [tables] if isinstance(tables, pa.Table) else tables

        def write(out: pa.NativeFile) -> None:
            with pq.ParquetWriter(out, schema, **parquet_options(schema, self.compression)) as writer:
                for t in batches:
                    writer.write_table(t.cast(schema), row_group_size=row_group_size)

        self.write_atomic(rel, write)

    def write_bytes(self, rel: str, data: bytes) -> None:
        self.write_atomic(rel, lambda out: out.write(data))

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open_input_stream(self.path(rel)) as f:
            return f.read()

    def delete(self, rel: str) -> bool:
        try:
            self.fs.delete_file(self.path(rel))
            return True
        except (FileNotFoundError, OSError):
            return False

    def parquet_file(self, path: str) -> pq.ParquetFile:
        return pq.ParquetFile(self.fs.open_input_file(path), page_checksum_verification=True)

    def footer(self, path: str, required: Sequence[str]) -> pq.FileMetaData:
        """The file's footer, or DamagedFileError when it is truncated, not Parquet, or lacks columns."""
        try:
            meta = self.parquet_file(path).metadata
        except (pa.ArrowInvalid, pa.ArrowIOError, OSError, ValueError) as e:
            if isinstance(e, FileNotFoundError):
                raise
            raise DamagedFileError(f"{path}: not a readable Parquet file ({e})") from e
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
        msg = f"replay buffer {self.uri}: moved damaged file {rel} to {dest}: {reason}"
        log.warning(msg)
        warnings.warn(msg, BufferWarning, stacklevel=3)

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
