"""A filter: reads the committed samples and commits its drops, each with its reason.

A filter is a pass of one shard, computed on the driver (it may start Ray tasks, as dedup does):
its commit holds one ``Reject`` row per dropped sample (``stage`` = the filter's name,
``lost_samples`` = 1, ``unit_id`` and ``sample_index`` naming the sample). One rule decides which
of its commits applies (``current_commit``): the one named by exactly the committed synthesis
shards and the filter's settings (``current_name``). Any other one left in OUTPUT (a kill before
``apply`` deleted it, a crash in a top-up round before the filter ran again) is stale and never
applied; ``apply`` computes the current one when it is missing and deletes the stale ones. It is a
pure function of the committed samples: a run killed in here recomputes it, never half-counts it.

A new filter is one class: its ``name`` (a ``stages.PassName`` and ``stages.Stage``), its
``settings`` in a run's config (a pydantic model; ``enabled`` says whether it is in force) and
``find_drops``; ``kept.RUN_FILTERS`` lists the ones a run applies.
"""

from __future__ import annotations

import logging

import pyarrow as pa
from pydantic import BaseModel

from refed_ray.config import RunConfig
from refed_ray.records import commits
from refed_ray.records.commits import Commit, CommitLog
from refed_ray.records.stages import PassName
from refed_ray.records.stats import ShardStats
from refed_ray.storage import Storage

log = logging.getLogger(__name__)
DROPPED_SCHEMA = pa.schema([("unit_id", pa.string()), ("sample_index", pa.int64())])


class StaleFilter(RuntimeError):
    """A filter has not run over the committed synthesis shards (a caller skipped ``apply``)."""


class Filter:
    name: str  # its pass, and the stage of its rejects

    def settings(self, config: RunConfig) -> BaseModel:
        """The filter's section of a run's config."""
        raise NotImplementedError

    def enabled(self, settings: BaseModel) -> bool:
        return True

    def find_drops(self, storage: Storage, committed: CommitLog, settings: BaseModel) -> pa.Table:
        """The ``Reject`` rows of the committed samples it drops (``records.Reject``'s table)."""
        raise NotImplementedError

    # ---- its commit ----------------------------------------------------------------------

    def apply(self, storage: Storage, committed: CommitLog, settings: BaseModel) -> Commit | None:
        """The current commit: reused when there is one, computed and committed otherwise.
        Superseded commits are deleted (from the log first: after this, the log holds the
        current commit only). None when the filter is off."""
        if not self.enabled(settings):
            self.delete_stale(storage, committed, keep=None)
            return None
        name = self.current_name(committed, settings)
        commit = committed.commits[self.name].get(name)
        if commit is None:
            tables = {"rejects": self.find_drops(storage, committed, settings)}
            commit = commits.commit_on_driver(storage, committed, self.name, name, [name], tables, index=False)
            log.info("%s: %d samples dropped", self.name, commit.stats.lost_samples)
        self.delete_stale(storage, committed, keep=name)
        return commit

    def current_name(self, committed: CommitLog, settings: BaseModel) -> str:
        """The name of the commit that applies: it covers exactly the committed synthesis shards,
        with these settings."""
        covered = sorted(committed.commits[PassName.SYNTHESIS])
        return commits.shard_name(self.name, covered + [settings.model_dump_json()])

    def current_commit(self, committed: CommitLog, settings: BaseModel) -> Commit | None:
        """The commit that applies (None when the filter is off). Raises ``StaleFilter`` when it is
        on and no commit covers the committed synthesis shards: ``apply`` first."""
        if not self.enabled(settings):
            return None
        commit = committed.commits[self.name].get(self.current_name(committed, settings))
        if commit is None:
            shards, stale = len(committed.commits[PassName.SYNTHESIS]), len(committed.commits[self.name])
            raise StaleFilter(f"no {self.name} commit covers the {shards} committed synthesis shards with "
                              f"these settings (found {stale} stale): apply it first")
        return commit

    def current_stats(self, committed: CommitLog, settings: BaseModel) -> ShardStats:
        """The counters of the current commit (none when the filter is off)."""
        commit = self.current_commit(committed, settings)
        return commit.stats if commit else ShardStats()

    def dropped_keys(self, storage: Storage, committed: CommitLog, settings: BaseModel) -> pa.Table:
        """``(unit_id, sample_index)`` of the samples the current commit drops."""
        commit = self.current_commit(committed, settings)
        if commit is None:
            return DROPPED_SCHEMA.empty_table()
        names = DROPPED_SCHEMA.names
        tables = [storage.read_table(f).select(names) for f in commit.files if f.startswith("rejects/")]
        return pa.concat_tables(tables).cast(DROPPED_SCHEMA) if tables else DROPPED_SCHEMA.empty_table()

    def delete_stale(self, storage: Storage, committed: CommitLog, keep: str | None) -> None:
        stale = [c for shard, c in committed.commits[self.name].items() if shard != keep]
        if not stale and (keep is None or storage.exists(f"_index/{self.name}.parquet")):
            return
        commits.retract(storage, committed, self.name, stale)
