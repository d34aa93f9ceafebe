"""Output storage on any fsspec URI (local paths, s3://, gs://, ...), with exactly-once shards.

Layout of OUTPUT:
    feedback/<shard>.parquet, plan/part-<n>.parquet, data/<shard>.parquet,
    rejects/<shard>.parquet, _markers/<pass>/<shard>.json, _attempts/<pass>/<shard>,
    run.json, report.json

A shard is committed by its marker, written last: the marker names the shard's files, the ids
(references or units) it covers and its stats. A file is only ever read through a marker, so a
kill mid-write leaves at worst an orphan file that no reader sees and the next run deletes.
Shards are named by a hash of the ids they cover, so a retried batch overwrites its own files.
Each file is written whole: to a temporary name then renamed on file systems, and by a single
PUT on object stores, where an object never appears partially.
"""

from __future__ import annotations

import hashlib
import io
import json
import posixpath
import uuid
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq
from fsspec.implementations.local import LocalFileSystem

from refed_ray.errors import UserError


@dataclass
class Marker:
    shard: str
    ids: list[str]
    files: list[str]
    stats: dict[str, Any]
    attempt: int = 1  # > 1: the batch ran again (Ray retried it on a restarted actor, or a rerun redid it)


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

    # ---- paths and plain files -------------------------------------------------------------

    def path(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def full_uri(self, *parts: str) -> str:
        """A URI other readers (Ray Data, pyarrow) can open, protocol included."""
        return self.fs.unstrip_protocol(self.path(*parts))

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def write_bytes(self, relative: str, data: bytes) -> None:
        target = self.path(relative)
        self.fs.makedirs(posixpath.dirname(target), exist_ok=True)
        if isinstance(self.fs, LocalFileSystem):
            staging = f"{target}.tmp-{uuid.uuid4().hex}"
            self.fs.pipe_file(staging, data)
            self.fs.mv(staging, target)  # os.rename: atomic on one file system
        else:
            self.fs.pipe_file(target, data)  # one PUT: the object appears whole or not at all

    def read_bytes(self, relative: str) -> bytes:
        return self.fs.cat_file(self.path(relative))

    def write_json(self, relative: str, value: Any) -> None:
        self.write_bytes(relative, json.dumps(value, indent=2, sort_keys=True).encode())

    def read_json(self, relative: str) -> Any:
        return json.loads(self.read_bytes(relative))

    def write_table(self, relative: str, table: pa.Table) -> None:
        buffer = io.BytesIO()
        pq.write_table(table, buffer, compression="zstd")
        self.write_bytes(relative, buffer.getvalue())

    def read_table(self, relative: str) -> pa.Table:
        return pq.read_table(io.BytesIO(self.read_bytes(relative)))

    def list(self, folder: str) -> list[str]:
        """Paths relative to the output root of the files directly in ``folder``."""
        try:
            names = self.fs.ls(self.path(folder), detail=False)
        except FileNotFoundError:
            return []
        return sorted(posixpath.join(folder, posixpath.basename(name)) for name in names)

    def delete(self, relative: str) -> None:
        self.fs.rm(self.path(relative), recursive=True)

    def check_writable(self) -> None:
        """Fail fast, before any model loads, when OUTPUT cannot be written."""
        probe = f".write-probe-{uuid.uuid4().hex}"
        try:
            self.write_bytes(probe, b"ok")
            self.delete(probe)
        except Exception as err:  # fsspec back ends raise many types
            raise UserError(f"cannot write to output {self.uri}: {type(err).__name__}: {err}") from None

    # ---- committed shards ------------------------------------------------------------------

    def start_attempt(self, pass_name: str, ids: Iterable[str]) -> int:
        """Count the attempts at a shard: 1 the first time its ids are processed, 2 when the same
        batch runs again (Ray's retry on a restarted actor, or a rerun after a kill), and so on."""
        relative = f"_attempts/{pass_name}/{shard_name(pass_name, sorted(ids))}"
        attempt = int(self.read_bytes(relative)) + 1 if self.exists(relative) else 1
        self.write_bytes(relative, str(attempt).encode())
        return attempt

    def commit_shard(
        self,
        pass_name: str,
        ids: Iterable[str],
        tables: dict[str, pa.Table],
        stats: dict[str, Any],
        attempt: int = 1,
    ) -> Marker:
        """Write a shard's tables (``{folder: table}``), then its marker."""
        ids = sorted(ids)
        shard = shard_name(pass_name, ids)
        files = []
        for folder, table in tables.items():
            if table.num_rows:
                relative = f"{folder}/{shard}.parquet"
                self.write_table(relative, table)
                files.append(relative)
        marker = Marker(shard=shard, ids=ids, files=files, stats=stats, attempt=attempt)
        self.write_json(f"_markers/{pass_name}/{shard}.json", marker.__dict__)
        return marker

    def markers(self, pass_name: str) -> list[Marker]:
        # Only whole markers: a local write killed midway leaves a "<shard>.json.tmp-<uuid>".
        paths = [p for p in self.list(f"_markers/{pass_name}") if p.endswith(".json")]
        blobs = self.fs.cat([self.path(p) for p in paths]) if paths else {}
        return [Marker(**json.loads(blob)) for blob in blobs.values()]

    def committed_files(self, folder: str) -> list[str]:
        """The files of ``folder`` that some marker commits, in a stable order."""
        prefix = folder.rstrip("/") + "/"
        return sorted(name for name in self._all_committed() if name.startswith(prefix))

    def _all_committed(self) -> set[str]:
        return {
            name
            for pass_dir in self.list("_markers")
            for marker in self.markers(posixpath.basename(pass_dir))
            for name in marker.files
        }

    def remove_orphans(self, folders: Iterable[str]) -> list[str]:
        """Delete files no marker commits, and half-written markers: leftovers of a killed run."""
        committed = self._all_committed()
        orphans = [name for folder in folders for name in self.list(folder) if name not in committed]
        orphans += [
            name
            for pass_dir in self.list("_markers")
            for name in self.list(pass_dir)
            if not name.endswith(".json")
        ]
        for name in orphans:
            self.delete(name)
        return orphans

    def iter_committed_tables(self, folder: str) -> Iterator[pa.Table]:
        for name in self.committed_files(folder):
            yield self.read_table(name)


def shard_name(pass_name: str, ids: list[str]) -> str:
    digest = hashlib.sha256("\n".join(ids).encode()).hexdigest()[:20]
    return f"{pass_name}-{digest}"
