"""File I/O on any fsspec URI (local paths, s3://, gs://, ...): whole-object writes, listings, deletes.

Each file is written whole: to a hidden staging name beside it then renamed on file systems, and by
a single upload on object stores, where an object never appears partially. A staging name starts
with "." (``.NAME.tmp-TOKEN``): directory readers (pyarrow, pandas, Hugging Face ``datasets``, Spark)
skip such names, and no reader of this project takes it, since each takes only the names its writer
commits. A process killed mid-write leaves its staging file; the clean-ups of the folders delete it.
What a file means (committed or not) is the commit protocol's business (``commits.py``), not this
module's.
"""

from __future__ import annotations

import io
import json
import posixpath
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any, BinaryIO

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from refed_ray.errors import UserError


class Storage:
    def __init__(self, uri: str, storage_options: dict[str, Any] | None = None):
        self.uri = uri.rstrip("/")
        self.storage_options = storage_options or {}
        # Uncached: other processes (workers, a rerun) rewrite these objects, and a cached listing
        # or instance (fsspec reuses instances per process, Ray reuses worker processes) would
        # serve their old versions.
        try:
            self.fs, self.root = fsspec.core.url_to_fs(
                self.uri, skip_instance_cache=True, use_listings_cache=False, **self.storage_options
            )
        except (ValueError, ImportError) as err:  # unknown protocol, or its package not installed
            raise UserError(f"cannot open output {self.uri}: {err}") from None

    @property
    def is_local(self) -> bool:
        """A path on this machine's disk: other nodes of a cluster may not see it."""
        return isinstance(self.fs, LocalFileSystem)

    # ---- paths -----------------------------------------------------------------------------

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def full_uri(self, *parts: str) -> str:
        """A URI other readers (Ray Data, pyarrow) can open, protocol included."""
        return self.fs.unstrip_protocol(self.path(*parts))

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    # ---- whole files -----------------------------------------------------------------------

    def write_bytes(self, relative: str, data: bytes) -> None:
        target = self.path(relative)
        if self.is_local:
            self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
            staging = _staging_path(target)
            try:
                self.fs.pipe_file(staging, data)
                self.fs.mv(staging, target)  # os.rename: atomic on one file system
            except Exception:
                self._discard(staging)
                raise
        else:
            self.fs.pipe_file(target, data)  # one PUT: the object appears whole or not at all

    @contextmanager
    def open_output(self, relative: str) -> Iterator[BinaryIO]:
        """A file written in parts (a Parquet writer's row groups) that appears under ``relative``
        whole, and only when the block ends without an error. Closing an object store's file
        handle uploads whatever it holds, errors included, so the parts go to a hidden staging
        file beside the target (file systems: then renamed) or to a local temporary file
        (object stores: then uploaded in one go, an object that appears complete or not at all)."""
        target = self.path(relative)
        if self.is_local:
            self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
            staging = _staging_path(target)
            try:
                with self.fs.open(staging, "wb") as handle:
                    yield handle
                self.fs.mv(staging, target)
            except Exception:
                self._discard(staging)
                raise
            return
        with tempfile.TemporaryDirectory(prefix="refed-ray-") as folder:
            local = posixpath.join(folder, posixpath.basename(target))
            with open(local, "wb") as handle:
                yield handle
            self.fs.put_file(local, target)

    def _discard(self, staging: str) -> None:
        if self.fs.exists(staging):
            self.fs.rm(staging)

    def read_bytes(self, relative: str) -> bytes:
        return self.fs.cat_file(self.path(relative))

    def read_many(self, relatives: list[str]) -> dict[str, bytes]:
        """Several files at once (concurrent GETs on object stores)."""
        if not relatives:
            return {}
        blobs = self.fs.cat([self.path(r) for r in relatives])
        by_path = {self.path(r): r for r in relatives}
        return {by_path[path]: blob for path, blob in blobs.items()}

    def write_json(self, relative: str, value: Any) -> None:
        self.write_bytes(relative, json.dumps(value, indent=2, sort_keys=True).encode())

    def read_json(self, relative: str) -> Any:
        return json.loads(self.read_bytes(relative))

    def write_table(self, relative: str, table: pa.Table) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        self.write_bytes(relative, buffer.getvalue())

    def read_table(self, relative: str, columns: list[str] | None = None) -> pa.Table:
        return pq.read_table(io.BytesIO(self.read_bytes(relative)), columns=columns)

    @contextmanager
    def parquet_file(self, relative: str) -> Iterator[pq.ParquetFile]:
        """A Parquet file to read in parts (its footer, then row groups: ranged reads on object
        stores), where reading it whole would not fit the reader's memory."""
        with self.fs.open(self.path(relative), "rb") as handle:
            yield pq.ParquetFile(handle)

    # ---- listings and deletes --------------------------------------------------------------

    def list(self, folder: str) -> list[str]:
        """Paths relative to the output root of the files directly in ``folder`` (one paginated
        LIST on object stores, whatever the number of files). Staging files of killed writes are
        listed too, for the clean-ups to delete: readers take only the names their writer commits."""
        return sorted(self.sizes(folder))

    def sizes(self, folder: str) -> dict[str, int]:
        """``{relative path: size in bytes}`` of the files directly in ``folder``."""
        try:
            entries = self.fs.ls(self.path(folder), detail=True)
        except FileNotFoundError:
            return {}
        return {
            posixpath.join(folder, posixpath.basename(e["name"].rstrip("/"))): e.get("size") or 0
            for e in entries
            if e.get("type") != "directory"
        }

    def is_empty(self) -> bool:
        try:
            return not self.fs.ls(self.root, detail=False)
        except FileNotFoundError:
            return True

    def subfolders(self, folder: str) -> list[str]:
        """Paths relative to the output root of the folders directly in ``folder``."""
        try:
            entries = self.fs.ls(self.path(folder), detail=True)
        except FileNotFoundError:
            return []
        return sorted(posixpath.join(folder, posixpath.basename(e["name"].rstrip("/")))
                      for e in entries if e.get("type") == "directory")

    def move_folder(self, source: str, target: str) -> None:
        """Move a folder of files to a new name: one rename on a file system (atomic); on object
        stores, which cannot rename, a server-side copy of each file, then the deletes."""
        if self.is_local:
            self.fs.mv(self.path(source), self.path(target))
            return
        files = self.fs.find(self.path(source))
        prefix = self.path(source) + "/"
        if files:
            self.fs.copy(files, [self.path(target, f[len(prefix):]) for f in files])
            self.fs.rm(files)

    def delete(self, relative: str) -> None:
        self.fs.rm(self.path(relative), recursive=True)

    def delete_many(self, relatives: Iterable[str]) -> int:
        """Delete files (batched on object stores: one request per 1,000 keys)."""
        paths = [self.path(r) for r in relatives]
        if paths:
            self.fs.rm(paths)
        return len(paths)

    def check_writable(self) -> None:
        """Fail fast, before any model loads, when OUTPUT cannot be written."""
        probe = f".write-probe-{uuid.uuid4().hex}"
        try:
            self.write_bytes(probe, b"ok")
            self.delete(probe)
        except Exception as err:  # fsspec back ends raise many types
            raise UserError(f"cannot write to output {self.uri}: {type(err).__name__}: {err}") from None


def _staging_path(target: str) -> str:
    """Where a file is written before its rename: beside it (one file system, so the rename is
    atomic), under a hidden name no reader takes."""
    folder, name = posixpath.split(target)
    return posixpath.join(folder, f".{name}.tmp-{uuid.uuid4().hex}")
