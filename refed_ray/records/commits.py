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

The index holds the chosen commits in a few objects: ``_index/<pass>.parquet`` (the base, the only
one outputs written before parts had) and ``_index/<pass>/part-NNNNNN.parquet`` beside it. As
shards commit, the driver writes the commits new since its last write as a part, then deletes the
markers it has absorbed, so a run start, the report and export read a few objects and a few
listings, not one object per shard. A part written whole each time would make a run
O(shards^2) in index writes (10M samples: 78 rewrites of up to 15,625 rows, 631,830 rows in all); parts
merge like a binary counter instead (a new part swallows the newest ones no larger than it, the
base last), so each commit is written O(log shards) times and a pass keeps O(log shards) parts.
Objects overlap only while a merge has written its union and not yet deleted what it merged:
the same commits twice, read once.

**The run's identity.** ``run.json`` holds a ``run_id``, drawn by the run that created OUTPUT and
kept by its resumes (``--force-new`` draws a new one). Every commit carries the id of the run it
worked for, and readers (``CommitLog``, ``find_commit``) take only the current run's: an actor of a
discarded run that commits late (same seed, K, references and shard size give the same shard
names) is ignored, and its files are deleted as leftovers. Outputs written before runs had ids
have none (""), nor do their commits.

**Attempts count engine deaths, not stops.** A shard becomes rejects ("abandoned") once its engine
died while holding it ``workers.max_shard_attempts`` times in one *submission* (one driver process:
a CLI call, a ``ray job submit``). Each attempt writes its own record before any work,
``_attempts/<pass>/<shard>.<submission>.<token>.started``, and ``<...>.stopped`` beside it when it
ends with its process alive (an outage stop, a cancelled task, a failed write); a committed shard
is never attempted again. A death (``EngineDead``: the actor exits; an OOM kill, a segfault, a lost
node) writes nothing more. So a shard's deaths are its records of this submission left without an
end. Why per submission: Ray restarts a dead actor and retries its shards within the submission,
so a poison input is still abandoned after ``max_shard_attempts`` deaths; but a driver killed or
stopped (preemption of the head, ``ray job stop``) takes its actors down with no clean end, and the
resubmission, a new submission, must not count those. Each record is written once, by its own
attempt, under its own name: no read-modify-write, so on an object store a retried task and a
zombie of an earlier one never lose each other's records. ``Commit.attempt`` counts every start of
the shard's work, of any submission (the report's "redone": after a death, a stop or a driver
kill); the records of committed shards are deleted at the next run start.
"""

from __future__ import annotations

import hashlib
import posixpath
import re
import time
import uuid
from dataclasses import dataclass

import pyarrow as pa
from pydantic import BaseModel, Field

from refed_ray.errors import UserError
from refed_ray.records.stages import RUN_PASSES
from refed_ray.records.stats import ShardStats
from refed_ray.storage import Storage

RUN_FILE = "run.json"  # the run that owns OUTPUT (written by output.py)
DISCARDING = "discarding"  # in run.json while --force-new deletes the run it names
PASSES = tuple(p.value for p in RUN_PASSES)  # a run's OUTPUT (stages.py); a judge root reads its own
TABLE_FOLDERS = ("feedback", "data", "rejects")
INDEX_SCHEMA = pa.schema(
    [("shard", pa.string()), ("token", pa.string()), ("attempt", pa.int64()), ("ids", pa.list_(pa.string())),
     ("files", pa.list_(pa.string())), ("stats", pa.string()), ("run_id", pa.string()),
     ("committed_at", pa.float64())]
)
INDEX_PART = re.compile(r"part-(\d{6})\.parquet")  # a part's name; anything else there is a killed write


class Commit(BaseModel):
    """One committed attempt at a shard."""

    pass_name: str
    shard: str
    token: str
    ids: list[str]
    files: list[str]
    stats: ShardStats = Field(default_factory=ShardStats)
    attempt: int = 1  # > 1: the shard's work started more than once (an actor died, a run stopped)
    run_id: str = ""  # the run it worked for (run.json); "" for outputs written before runs had ids
    committed_at: float = 0.0  # epoch seconds on the committing worker; 0: committed before this was recorded

    @property
    def marker(self) -> str:
        return f"_markers/{self.pass_name}/{self.shard}.{self.token}.json"


def shard_name(pass_name: str, ids: list[str]) -> str:
    """A shard is named by the ids it covers: the same work always has the same name."""
    digest = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:20]
    return f"{pass_name}-{digest}"


def pass_of(shard: str) -> str:
    """The pass a shard belongs to: its name starts with it (``shard_name``)."""
    return shard.rsplit("-", 1)[0]


def current_run_id(storage: Storage) -> str:
    """The id of the run that owns OUTPUT: the only run whose commits count."""
    return run_id_of(storage.uri, read_run_file(storage)) if storage.exists(RUN_FILE) else ""


def read_run_file(storage: Storage) -> dict:
    """``run.json`` of ``storage`` (a run's OUTPUT or a judge root) as a JSON object; a missing,
    unreadable or hand-broken one is the user's to fix, named, not a traceback."""
    where = f"{storage.uri}/{RUN_FILE}"
    if not storage.exists(RUN_FILE):
        raise UserError(f"{storage.uri} holds no refed-ray run ({RUN_FILE})")
    try:
        value = storage.read_json(RUN_FILE)
    except (ValueError, UnicodeDecodeError) as err:  # truncated or not JSON at all
        raise UserError(f"{where} is not valid JSON ({err}): it was not written by refed-ray, or was cut") from None
    if not isinstance(value, dict):
        raise UserError(f"{where} holds {type(value).__name__}, not refed-ray's run record (a JSON object)")
    return value


def is_judging(run: dict) -> bool:
    """Whether a run.json is a judge root's (a compare's or a selection's verdicts), not a run's."""
    return "config" not in run and "judge" in (run.get("fingerprint") or {})


def read_run(storage: Storage, discarding_ok: bool = False) -> dict:
    """The run.json of the run in OUTPUT, checked: a run's (it has its ``config``), and no
    interrupted ``--force-new`` (unless ``discarding_ok``: the one that completes it). Every
    command that reads a run starts here."""
    run = read_run_file(storage)
    if is_judging(run):
        raise UserError(f"{storage.uri} holds a judge's verdicts (a compare's or a selection's), not a "
                        "refed-ray run: name a run's OUTPUT (or, for a new run, an empty folder)")
    if not discarding_ok:
        run_id_of(storage.uri, run)
    if not isinstance(run.get("config"), dict):
        raise UserError(f"{storage.uri}/{RUN_FILE} lacks the run's config: it was not written by refed-ray "
                        "(or was edited); rerun into a new --output")
    return run


def run_id_of(uri: str, run: dict) -> str:
    """``run``'s id (run.json's content). A run.json that says a discard is under way belongs to
    no run any more: nothing of OUTPUT may be read or resumed until ``--force-new`` finishes."""
    if run.get(DISCARDING):
        raise UserError(
            f"{uri}: a --force-new that discards the run there was interrupted: pass --force-new "
            "again to complete it (or choose another --output)"
        )
    return run.get("run_id", "")


# ---- writers (workers) ---------------------------------------------------------------------


def commit_shard(
    storage: Storage, pass_name: str, shard: str, ids: list[str], tables: dict[str, pa.Table],
    stats: ShardStats, attempt: int = 1, run_id: str | None = None,
) -> Commit:
    """Write one attempt's tables (``{folder: table}``) under unique names, then its marker.
    ``run_id``: the run the attempt works for; the driver's own commits (seed rejects, dedup) leave
    it out and take the run that owns OUTPUT now."""
    if run_id is None:
        run_id = current_run_id(storage)
    token = f"{uuid.uuid4().hex[:12]}"
    files = []
    for folder, table in tables.items():
        if table.num_rows:
            relative = f"{folder}/{shard}.{token}.parquet"
            storage.write_table(relative, table)
            files.append(relative)
    commit = Commit(pass_name=pass_name, shard=shard, token=token, ids=sorted(ids), files=files,
                    stats=stats, attempt=attempt, run_id=run_id, committed_at=time.time())
    storage.write_bytes(commit.marker, commit.model_dump_json().encode())
    return commit


def find_commit(storage: Storage, pass_name: str, shard: str, run_id: str) -> Commit | None:
    """A valid marker of ``shard``, if an earlier attempt of run ``run_id`` committed it (one LIST)."""
    names = storage.fs.glob(storage.path(f"_markers/{pass_name}/{shard}.*.json"))
    for name in sorted(names):
        commit = Commit.model_validate_json(storage.fs.cat_file(name))
        if commit.run_id == run_id and all(storage.exists(f) for f in commit.files):
            return commit
    return None


STARTED, STOPPED = ".started", ".stopped"


@dataclass(frozen=True)
class Attempt:
    """One attempt at a shard, as ``start_attempt`` recorded it."""

    storage: Storage
    record: str  # _attempts/<pass>/<shard>.<submission>.<token>, without its state
    number: int  # 1 + the shard's earlier starts, of any submission
    deaths: int  # engine deaths while holding the shard, in this submission
    earlier: tuple[str, ...] = ()  # the shard's earlier records

    def end_cleanly(self) -> None:
        """The attempt ended and its process lives on: whatever ended it, it was no engine death."""
        self.storage.write_bytes(self.record + STOPPED, b"")

    def forget(self) -> None:
        """Delete the shard's records once it is committed. Every shard's history is a LIST of
        its pass's folder: left there until the next run's clean-up, the records of a 10M-sample
        run's 17,000 committed shards made each new shard list them all (O(shards^2); on S3, 17
        pages a shard). What a kill leaves here, ``CommitLog.remove_leftovers`` deletes."""
        self.storage.delete_many([*self.earlier, self.record + STARTED])


@dataclass(frozen=True)
class AttemptHistory:
    """A shard's earlier attempts, read before it waits for a slot: a shard's last attempt runs
    alone (``run/slots.py``), so its ``deaths`` must be known before it takes one."""

    storage: Storage
    prefix: str  # _attempts/<pass>/<shard>.
    submission: str
    starts: int  # of any submission
    deaths: int  # engine deaths while holding the shard, in this submission
    records: tuple[str, ...]  # the records listed

    def start(self) -> Attempt:
        """Record this attempt's start (one PUT)."""
        record = f"{self.prefix}{self.submission}.{uuid.uuid4().hex[:12]}"
        self.storage.write_bytes(record + STARTED, b"")
        return Attempt(self.storage, record, number=self.starts + 1, deaths=self.deaths, earlier=self.records)


def attempt_history(storage: Storage, pass_name: str, shard: str, submission: str) -> AttemptHistory:
    """Count the shard's earlier starts and deaths (one LIST)."""
    prefix = f"_attempts/{pass_name}/{shard}."
    names = [posixpath.basename(p) for p in storage.fs.glob(storage.path(prefix + "*"))]
    states = {STARTED: set(), STOPPED: set()}
    for name in names:
        for state, attempts in states.items():
            if name.endswith(state):  # anything else is a local write killed midway
                attempts.add(name[len(shard) + 1:-len(state)])  # <submission>.<token>
    left_without_an_end = states[STARTED] - states[STOPPED]
    return AttemptHistory(storage, prefix, submission, starts=len(states[STARTED]),
                          deaths=sum(1 for a in left_without_an_end if a.startswith(submission + ".")),
                          records=tuple(posixpath.dirname(prefix) + "/" + name for name in names))


def start_attempt(storage: Storage, pass_name: str, shard: str, submission: str) -> Attempt:
    """Count the shard's earlier starts and deaths (one LIST), then record this start (one PUT)."""
    return attempt_history(storage, pass_name, shard, submission).start()


# ---- readers (driver) ----------------------------------------------------------------------


class CommitLog:
    """The committed shards of every pass, read from the index, the markers and the listings.
    ``passes``: the passes it reads (a run's, by default; a pass committed under another Storage
    root, such as a judge pass, names its own)."""

    def __init__(self, storage: Storage, run_id: str | None = None, passes: tuple[str, ...] = PASSES):
        self.storage = storage
        self.run_id = current_run_id(storage) if run_id is None else run_id
        self.present = {
            name for folder in TABLE_FOLDERS for name in storage.list(folder)
        }
        self.commits: dict[str, dict[str, Commit]] = {}
        self.stray_markers: list[str] = []  # superseded, invalid, half-written or of another run
        # Per pass, the index's objects as this log knows them: (name, shards), base first.
        self.index: dict[str, list[tuple[str, list[str]]]] = {}
        self.unindexed: dict[str, list[str]] = {}  # shards committed but in no index object yet
        for pass_name in passes:
            self.commits[pass_name] = self._load(pass_name)

    def _load(self, pass_name: str) -> dict[str, Commit]:
        chosen: dict[str, Commit] = {}
        self.index[pass_name], self.unindexed[pass_name] = [], []
        for name, table in read_index_objects(self.storage, pass_name):
            self.index[pass_name].append((name, table.column("shard").to_pylist()))
            for row in table.to_pylist():
                commit = Commit(pass_name=pass_name, **{**row, "stats": ShardStats.model_validate_json(row["stats"])})
                if commit.shard not in chosen and self._valid(commit):
                    chosen[commit.shard] = commit
        markers = self.storage.list(f"_markers/{pass_name}")
        whole = [m for m in markers if m.endswith(".json")]
        self.stray_markers += [m for m in markers if not m.endswith(".json")]  # a local write killed midway
        for name, blob in sorted(self.storage.read_many(whole).items()):
            commit = Commit.model_validate_json(blob)
            if commit.shard not in chosen and self._valid(commit):
                chosen[commit.shard] = commit
                self.unindexed[pass_name].append(commit.shard)
            elif chosen.get(commit.shard) is None or chosen[commit.shard].token != commit.token:
                self.stray_markers.append(name)
        return chosen

    def _valid(self, commit: Commit) -> bool:
        return commit.run_id == self.run_id and all(name in self.present for name in commit.files)

    def ids(self, pass_name: str) -> set[str]:
        return {i for commit in self.commits[pass_name].values() for i in commit.ids}

    def units(self, pass_name: str) -> int:
        """``len(ids(pass_name))`` without the set: a pass's shards cover disjoint ids."""
        return sum(len(commit.ids) for commit in self.commits[pass_name].values())

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
        if self.commits[commit.pass_name].setdefault(commit.shard, commit) is commit:
            self.unindexed[commit.pass_name].append(commit.shard)

    def write_index(self, pass_name: str) -> None:
        """Absorb the pass's new commits into its index, then delete their markers. The index
        then holds exactly ``commits[pass_name]``: a commit taken out of it (``retract``), or an
        index row that did not load (its files gone, another run's), makes this a whole rewrite."""
        commits = self.commits[pass_name]
        if any(set(shards) - commits.keys() for _, shards in self.index[pass_name]):
            self._write_index_object(pass_name, [name for name, _ in self.index[pass_name]], sorted(commits))
        elif self.unindexed[pass_name]:
            self._append_index_part(pass_name)
        self.unindexed[pass_name] = []
        listed = self.storage.list(f"_markers/{pass_name}")
        self.storage.delete_many([m for m in listed if self._absorbed(pass_name, m)])

    def _append_index_part(self, pass_name: str) -> None:
        """The unindexed commits as a new part, merged with the newest objects no larger than it
        (a binary counter: each commit is rewritten O(log shards) times, into O(log shards) objects)."""
        shards, merged = sorted(self.unindexed[pass_name]), []
        while self.index[pass_name] and len(self.index[pass_name][-1][1]) <= len(shards):
            name, older = self.index[pass_name].pop()
            merged.append(name)
            shards = older + shards
        self._write_index_object(pass_name, merged, shards)

    def _write_index_object(self, pass_name: str, replaced: list[str], shards: list[str]) -> None:
        """Write ``shards``' commits as one index object, then delete the objects it replaces.
        Written first, deleted after: a kill between the two leaves commits twice, never none."""
        base = f"_index/{pass_name}.parquet"
        shards = list(dict.fromkeys(shards))  # objects a killed merge left overlapping hold a shard twice
        kept = [entry for entry in self.index[pass_name] if entry[0] not in replaced]
        name = f"_index/{pass_name}/part-{self._next_part(pass_name):06d}.parquet" if kept else base
        rows = [index_row(self.commits[pass_name][shard]) for shard in shards]
        self.storage.write_table(name, pa.Table.from_pylist(rows, schema=INDEX_SCHEMA))
        # A whole index in the base: every part goes, and what killed writes left beside them.
        stale = replaced if kept else self.storage.list(f"_index/{pass_name}")
        self.storage.delete_many([n for n in stale if n != name])
        self.index[pass_name] = kept + [(name, shards)]

    def _next_part(self, pass_name: str) -> int:
        numbers = [int(m.group(1)) for name, _ in self.index[pass_name]
                   if (m := INDEX_PART.fullmatch(posixpath.basename(name)))]
        return max(numbers, default=0) + 1

    def _absorbed(self, pass_name: str, marker: str) -> bool:
        """Whether ``marker`` (``<shard>.<token>.json``) is the commit the index holds for its shard."""
        shard, _, rest = posixpath.basename(marker).partition(".")
        commit = self.commits[pass_name].get(shard)
        return commit is not None and rest == f"{commit.token}.json"

    def remove_leftovers(self) -> list[str]:
        """Delete what no chosen commit names: files of attempts that never committed, lost or
        worked for another run, stray markers, and the attempt records of committed shards."""
        committed = {f for commits in self.commits.values() for c in commits.values() for f in c.files}
        leftovers = sorted(self.present - committed) + self.stray_markers
        for pass_name, commits in self.commits.items():
            records = self.storage.list(f"_attempts/{pass_name}")
            leftovers += [r for r in records if posixpath.basename(r).split(".")[0] in commits]
        self.storage.delete_many(leftovers)
        self.present -= set(leftovers)
        self.stray_markers = []
        return leftovers


def index_row(commit: Commit) -> dict:
    """A commit as a row of INDEX_SCHEMA."""
    return {**commit.model_dump(include={"shard", "token", "attempt", "ids", "files", "run_id", "committed_at"}),
            "stats": commit.stats.model_dump_json()}


def read_index_objects(storage: Storage, pass_name: str) -> list[tuple[str, pa.Table]]:
    """The pass's index objects, base first, then its parts in order (one LIST)."""
    base = f"_index/{pass_name}.parquet"
    parts = [n for n in storage.list(f"_index/{pass_name}") if INDEX_PART.fullmatch(posixpath.basename(n))]
    names = ([base] if storage.exists(base) else []) + parts
    return [(name, storage.read_table(name)) for name in names]


def indexed_shards(storage: Storage, pass_name: str) -> set[str]:
    """The shards the pass's index names, valid or not."""
    return {s for _, table in read_index_objects(storage, pass_name) for s in table.column("shard").to_pylist()}


def committed_any(storage: Storage, pass_name: str) -> bool:
    return storage.exists(f"_index/{pass_name}.parquet") or any(
        name.endswith(".json") for name in storage.list(f"_markers/{pass_name}")
    )


# ---- driver-side commits -------------------------------------------------------------------


def commit_on_driver(storage: Storage, committed: CommitLog, pass_name: str, shard: str, ids: list[str],
                     tables: dict[str, pa.Table], index: bool = True) -> Commit:
    """Commit a shard the driver computed itself (seed rejects, a filter's drops), for the run
    that owns OUTPUT. ``index``: absorb it into the pass's index now (a filter leaves that to
    ``retract``, which rewrites the index without the commits it supersedes)."""
    commit = commit_shard(storage, pass_name, shard, ids, tables, ShardStats.of(tables, {}))
    committed.add(commit)
    if index:
        committed.write_index(pass_name)
    return commit


def retract(storage: Storage, committed: CommitLog, pass_name: str, stale: list[Commit]) -> None:
    """Take ``stale`` commits out of the log and the index (first: the index no longer names what
    is deleted next), then delete their files and their markers not yet absorbed."""
    for commit in stale:
        del committed.commits[pass_name][commit.shard]
    committed.write_index(pass_name)
    markers = set(storage.list(f"_markers/{pass_name}")) & {c.marker for c in stale}  # absorbed ones are gone
    storage.delete_many([f for c in stale for f in c.files] + sorted(markers))
