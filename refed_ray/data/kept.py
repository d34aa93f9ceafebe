"""Samples kept: the committed samples less the drops of the filters in force. The one place
this is computed: the run and its top-up, the report, status, ``refed-ray plan``, export and the
dataset all read it from here.

``RUN_FILTERS`` are the filters a run applies after each synthesis pass (today: dedup). A filter
whose settings say it is off is not in force: its stale commits are deleted when it is applied,
and it drops nothing.
"""

from __future__ import annotations

import pyarrow as pa

from refed_ray.config import RunConfig
from refed_ray.data.filters.base import DROPPED_SCHEMA, Filter, StaleFilter
from refed_ray.data.filters.dedup import DEDUP
from refed_ray.records.commits import CommitLog
from refed_ray.records.stages import PassName
from refed_ray.records.stats import ShardStats
from refed_ray.storage import Storage

RUN_FILTERS: tuple[Filter, ...] = (DEDUP,)


def apply_filters(storage: Storage, committed: CommitLog, config: RunConfig) -> None:
    """Bring every run filter's commit up to date with the committed synthesis shards."""
    for one in RUN_FILTERS:
        one.apply(storage, committed, one.settings(config))


def pass_totals(committed: CommitLog, config: RunConfig, *, stale_ok: bool = False) -> dict[str, ShardStats]:
    """Each pass's summed counters, as report.json sums them: a filter's are its current commit's,
    never a stale one's. ``stale_ok``: a filter not yet applied over the committed synthesis
    shards (a pass or a top-up round in progress) counts nothing instead of raising ``StaleFilter``."""
    totals = {name: committed.stats(name) for name in committed.commits}
    for one in RUN_FILTERS:
        totals[one.name] = _current_stats(one, committed, config, stale_ok) or ShardStats()
    return totals


def filter_applied(one: Filter, committed: CommitLog, config: RunConfig) -> bool:
    """Whether ``one`` is in force and its commit covers the committed synthesis shards."""
    return _current_stats(one, committed, config, stale_ok=True) is not None


def kept_samples(totals: dict[str, ShardStats]) -> int:
    """Samples kept, from the passes' summed counters (``pass_totals``): committed by synthesis,
    less the ones the filters' commits in ``totals`` drop."""
    dropped = sum(totals[f.name].lost_samples for f in RUN_FILTERS if f.name in totals)
    return totals[PassName.SYNTHESIS].samples - dropped


def accepted_samples(committed: CommitLog, config: RunConfig) -> int:
    """Samples committed by synthesis and kept by the current commits of the filters in force."""
    return kept_samples(pass_totals(committed, config))


def dropped_keys(storage: Storage, committed: CommitLog, config: RunConfig) -> list[pa.Table]:
    """``(unit_id, sample_index)`` tables of the samples each filter in force drops."""
    tables = [one.dropped_keys(storage, committed, one.settings(config)) for one in RUN_FILTERS]
    return [t for t in tables if t.num_rows] or [DROPPED_SCHEMA.empty_table()]


def _current_stats(one: Filter, committed: CommitLog, config: RunConfig, stale_ok: bool) -> ShardStats | None:
    settings = one.settings(config)
    if not one.enabled(settings):
        return None
    try:
        return one.current_stats(committed, settings)
    except StaleFilter:
        if stale_ok:
            return None
        raise
