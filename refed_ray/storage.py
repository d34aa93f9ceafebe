"""File I/O on any fsspec URI (local paths, s3://, gs://, ...): whole-object writes, listings, deletes.

Each file is written whole: to a temporary name then renamed on file systems, and by a single PUT
on object stores, where an object never appears partially. What a file means (committed or not)
is the commit protocol's business (``commits.py``), not this module's.
"""

from __future__ import annotations

import io
import json
import posixpath
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from typing import Any

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
            staging = f"{target}.tmp-{uuid.uuid4().hex}"
            self.fs.pipe_file(staging, data)
            self.fs.mv(staging, target)  # os.rename: atomic on one file system
        else:
            self.fs.pipe_file(target, data)  # one PUT: the object appears whole or not at all

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
        LIST on object stores, whatever the number of files)."""
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
