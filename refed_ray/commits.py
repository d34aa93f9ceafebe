"""The commit protocol: when a shard's work counts as done, and what readers may read.

A shard is a fixed set of ids (work units, or references for the feedback pass) decided before
any work starts (``plan.py``). One attempt at a shard writes:

1. its tables under attempt-unique names: ``data/<shard>.<token>.parquet``, ``rejects/<shard>.<token>.parquet``;
2. then its marker ``_markers/<pass>/<shard>.<token>.json`` naming exactly those files, the ids and
   the shard's counters. The marker is the one commit point: one PUT (or one rename).

Readers take, per shard, one commit whose files all exist, preferring the index (below), then the
marker whose token sorts first. Hence:
- two attempts never mix: a marker names only its own attempt's files;
- a retried or zombie attempt (an actor of a stopped run) cannot hide a good commit: it writes
  its own marker beside it, never over it;
- a marker whose files are gone (a zombie whose files a rerun's clean-up deleted) is not a
  commit: its shard is redone;
- files that no chosen commit names are never read, and the next run deletes them.

The index ``_index/<pass>.parquet`` holds the chosen commits in one object. The driver rewrites it
as shards commit and deletes the markers it has absorbed, so a run start, the report and export
read a few objects and a few listings, not one object per shard.
"""

from __future__ import annotations

import hashlib
import time
import uuid

import pyarrow as pa
from pydantic import BaseModel, Field

from refed_ray.stats import ShardStats
from refed_ray.storage import Storage

PASSES = ("seeds", "feedback", "synthesis", "dedup")
TABLE_FOLDERS = ("feedback", "data", "rejects")
INDEX_SCHEMA = pa.schema(
    [("shard", pa.string()), ("token", pa.string()), ("attempt", pa.int64()), ("ids", pa.list_(pa.string())),
     ("files", pa.list_(pa.string())), ("stats", pa.string()), ("committed_at", pa.float64())]
)


class Commit(BaseModel):
    """One committed attempt at a shard."""

    pass_name: str
    shard: str
    token: str
    ids: list[str]
    files: list[str]
    stats: ShardStats = Field(default_factory=ShardStats)
    attempt: int = 1  # > 1: the shard's work started more than once (an actor died, a run stopped)
    committed_at: float = 0.0  # epoch seconds on the committing worker; 0: committed before this was recorded

    @property
    def marker(self) -> str:
        return f"_markers/{self.pass_name}/{self.shard}.{self.token}.json"


def shard_name(pass_name: str, ids: list[str]) -> str:
    """A shard is named by the ids it covers: the same work always has the same name."""
    digest = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:20]
    return f"{pass_name}-{digest}"


# ---- writers (workers) ---------------------------------------------------------------------


def commit_shard(
    storage: Storage, pass_name: str, shard: str, ids: list[str], tables: dict[str, pa.Table],
    stats: ShardStats, attempt: int = 1,
) -> Commit:
    """Write one attempt's tables (``{folder: table}``) under unique names, then its marker."""
    token = f"{uuid.uuid4().hex[:12]}"
    files = []
    for folder, table in tables.items():
        if table.num_rows:
            relative = f"{folder}/{shard}.{token}.parquet"
            storage.write_table(relative, table)
            files.append(relative)
    commit = Commit(pass_name=pass_name, shard=shard, token=token, ids=sorted(ids), files=files,
                    stats=stats, attempt=attempt, committed_at=time.time())
    storage.write_bytes(commit.marker, commit.model_dump_json().encode())
    return commit


def find_commit(storage: Storage, pass_name: str, shard: str) -> Commit | None:
    """A valid marker of ``shard``, if an earlier attempt of this run committed it (one LIST)."""
    names = storage.fs.glob(storage.path(f"_markers/{pass_name}/{shard}.*.json"))
    for name in sorted(names):
        commit = Commit.model_validate_json(storage.fs.cat_file(name))
        if all(storage.exists(f) for f in commit.files):
            return commit
    return None


def start_attempt(storage: Storage, pass_name: str, shard: str) -> int:
    """Count the starts of a shard's work: 1 the first time, 2 when it runs again (Ray's retry on a
    restarted actor, a rerun after a stop), and so on."""
    relative = f"_attempts/{pass_name}/{shard}"
    attempt = int(storage.read_bytes(relative)) + 1 if storage.exists(relative) else 1
    storage.write_bytes(relative, str(attempt).encode())
    return attempt


# ---- readers (driver) ----------------------------------------------------------------------


class CommitLog:
    """The committed shards of every pass, read from the index, the markers and the listings."""

    def __init__(self, storage: Storage):
        self.storage = storage
        self.present = {
            name for folder in TABLE_FOLDERS for name in storage.list(folder)
        }
        self.commits: dict[str, dict[str, Commit]] = {}
        self.stray_markers: list[str] = []  # superseded, invalid or half-written markers
        for pass_name in PASSES:
            self.commits[pass_name] = self._load(pass_name)

    def _load(self, pass_name: str) -> dict[str, Commit]:
        chosen: dict[str, Commit] = {}
        index = f"_index/{pass_name}.parquet"
        if self.storage.exists(index):
            for row in self.storage.read_table(index).to_pylist():
                commit = Commit(pass_name=pass_name, **{**row, "stats": ShardStats.model_validate_json(row["stats"])})
                if self._valid(commit):
                    chosen[commit.shard] = commit
        markers = self.storage.list(f"_markers/{pass_name}")
        whole = [m for m in markers if m.endswith(".json")]
        self.stray_markers += [m for m in markers if not m.endswith(".json")]  # a local write killed midway
        for name, blob in sorted(self.storage.read_many(whole).items()):
            commit = Commit.model_validate_json(blob)
            if commit.shard not in chosen and self._valid(commit):
                chosen[commit.shard] = commit
            elif chosen.get(commit.shard) is None or chosen[commit.shard].token != commit.token:
                self.stray_markers.append(name)
        return chosen

    def _valid(self, commit: Commit) -> bool:
        return all(name in self.present for name in commit.files)

    def ids(self, pass_name: str) -> set[str]:
        return {i for commit in self.commits[pass_name].values() for i in commit.ids}

    def files(self, folder: str) -> list[str]:
        """The committed files of ``folder`` ("data", "rejects", "feedback"), in a stable order."""
        prefix = folder + "/"
        return sorted(f for commits in self.commits.values() for c in commits.values() for f in c.files
                      if f.startswith(prefix))

    def stats(self, pass_name: str) -> ShardStats:
        total = ShardStats()
        for commit in self.commits[pass_name].values():
            total += commit.stats
        return total

    def add(self, commit: Commit) -> None:
        """A commit a worker of this run reported; the first one of a shard wins."""
        self.commits[commit.pass_name].setdefault(commit.shard, commit)

    def write_index(self, pass_name: str) -> None:
        """Absorb the pass's markers into its index (one object), then delete them."""
        commits = sorted(self.commits[pass_name].values(), key=lambda c: c.shard)
        rows = [{**c.model_dump(include={"shard", "token", "attempt", "ids", "files", "committed_at"}),
                 "stats": c.stats.model_dump_json()} for c in commits]
        self.storage.write_table(f"_index/{pass_name}.parquet", pa.Table.from_pylist(rows, schema=INDEX_SCHEMA))
        absorbed = set(self.storage.list(f"_markers/{pass_name}")) & {c.marker for c in commits}
        self.storage.delete_many(absorbed)

    def remove_leftovers(self) -> list[str]:
        """Delete what no chosen commit names: files of attempts that never committed or lost,
        stray markers, and the attempt counters of committed shards."""
        committed = {f for commits in self.commits.values() for c in commits.values() for f in c.files}
        leftovers = sorted(self.present - committed) + self.stray_markers
        for pass_name, commits in self.commits.items():
            counters = set(self.storage.list(f"_attempts/{pass_name}"))
            leftovers += sorted(counters & {f"_attempts/{pass_name}/{shard}" for shard in commits})
        self.storage.delete_many(leftovers)
        self.present -= set(leftovers)
        self.stray_markers = []
        return leftovers


def committed_any(storage: Storage, pass_name: str) -> bool:
    return storage.exists(f"_index/{pass_name}.parquet") or any(
        name.endswith(".json") for name in storage.list(f"_markers/{pass_name}")
    )
