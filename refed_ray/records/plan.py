"""The plan: work units grouped into shards, written before synthesis, only ever appended to.

A unit asks for K new instructions for one (round, reference, aspect); its id and sampling seed
follow from (run seed, round, reference_id, aspect) alone. Units come in one endless, seeded
order: round after round, each round visiting the references in a seeded order with both
aspects of a reference side by side (as the authors run them). The plan is the first
``ceil(N / K)`` units of that order, cut into shards of ``workers.units_per_shard`` consecutive
units, its last tenth in shards of 8 units (``TAIL_SHARE``, ``TAIL_SHARD_UNITS``, at most
``TAIL_MAX_SHARDS`` of them: the pass's last blocks, so that the engines end together). A shard is
the unit of commit and of retry (``commits.py``), and it is fixed once planned: a larger
``num_samples`` appends new shards after the old ones, so a resumed run never re-forms work that
may already be committed.

The plan's files are ``plan/part-NNNNN.parquet``, each written whole; its reader takes those names
only, never a staging file a killed write left beside them (the writer deletes those).
"""

from __future__ import annotations

import hashlib
import itertools
import math
import posixpath
import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from refed_ray.records.commits import shard_name
from refed_ray.records.models import ASPECTS, WorkUnit
from refed_ray.records.stages import PassName
from refed_ray.storage import Storage

PLAN_SCHEMA = pa.schema(
    [
        ("shard", pa.string()),
        ("unit_id", pa.string()),
        ("round", pa.int64()),
        ("reference_id", pa.string()),
        ("aspect", pa.string()),
        ("seed", pa.int64()),
    ]
)
ROWS_PER_PLAN_FILE = 100_000
# A new plan's last tenth is cut in small shards: the pass's last blocks. When the blocks run out,
# an engine still works through the ones it holds while the others wait for the pass to end;
# smaller last blocks go to whichever engine frees up first, so the engines end closer together.
# Issue 24, on a simulated GPU cluster: whole shards there left three of four GPUs idle for the last
# shard's duration; halves of 32 units left them 40-50 s apart, 16-unit quarters of 64 about 25 s,
# 8-unit shards 9-20 s (8 units x K=10 are ~14 s of a full H100 batch). It is a size in units, not a
# share of a shard, because what ends the engines together is how long a last block takes. Small
# shards need more of them in flight to fill an engine: ``config.TAIL_UNITS_IN_FLIGHT``. A plan of
# shards of TAIL_SHARD_UNITS units or fewer has no tail of its own.
TAIL_SHARE = 0.1
TAIL_SHARD_UNITS = 8
# A large plan's tail: what ends the engines together is each engine's last few blocks, 6 in flight
# on up to ~150 engines; a tenth of a 10M plan in 8-unit shards would be 12,500 shards that each
# cost the driver memory (README, "Scale").
TAIL_MAX_SHARDS = 1000
PART = re.compile(r"part-\d{5}\.parquet")


@dataclass
class PlanSummary:
    units: int
    shards: int
    rounds: int
    references_used: list[str]
    files: list[str]


def make_unit(run_seed: int, round_: int, reference_id: str, aspect: str) -> WorkUnit:
    digest = _digest(run_seed, round_, reference_id, aspect)
    return WorkUnit(
        unit_id=digest[:8].hex(),
        round=round_,
        reference_id=reference_id,
        aspect=aspect,
        seed=int.from_bytes(digest[8:12], "big") & 0x7FFFFFFF,
    )


def units_needed(num_samples: int, instructions_per_aspect: int) -> int:
    return math.ceil(num_samples / instructions_per_aspect)


def unit_order(reference_ids: list[str], run_seed: int) -> Iterator[WorkUnit]:
    """Every unit there can be, in plan order: a round at a time, references in a seeded order
    (so a partial last round is a seeded sample of them), both aspects of a reference together."""
    for round_ in itertools.count():
        for ref in sorted(reference_ids, key=lambda ref: _digest(run_seed, round_, ref, "order")):
            for aspect in ASPECTS:
                yield make_unit(run_seed, round_, ref, aspect)


def iter_units(reference_ids: list[str], num_samples: int, k: int, run_seed: int) -> Iterator[WorkUnit]:
    """The units of a plan for ``num_samples``."""
    return itertools.islice(unit_order(reference_ids, run_seed), units_needed(num_samples, k))


def top_up_units(short: int, accepted: int, units_done: int, k: int, budget: int, margin: bool = True) -> int:
    """Units to add when ``short`` samples are missing, sized by the yield so far (``accepted``
    samples from ``units_done`` units of K) and bounded by ``budget``.

    Sized for the expected yield alone, a top-up would fall short about half the time, and each
    further round loads engines again. A margin of two standard deviations of a binomial yield
    makes a second round rare, for a few samples beyond N (data/ keeps them, dataset/ holds N).
    Without ``margin``: the expected yield alone, for a top-up that can still be topped up at
    little cost (reserve shards inside a running pass)."""
    if short <= 0 or budget <= 0 or accepted == 0:
        return 0
    kept = accepted / (units_done * k)
    margin = 2 * math.sqrt(short * (1 - kept)) if margin else 0.0
    return min(budget, math.ceil((short + margin) * units_done / accepted))


def references_reached(reference_ids: list[str], run_seed: int, units: int) -> set[str]:
    """The references that the first ``units`` units of the order visit (round 0 visits them all)."""
    first_round = len(ASPECTS) * len(reference_ids)
    return {u.reference_id for u in itertools.islice(unit_order(reference_ids, run_seed), min(units, first_round))}


def write_plan(
    storage: Storage, reference_ids: list[str], num_samples: int, k: int, run_seed: int, units_per_shard: int,
    keep_existing: bool = True, units: int | None = None,
) -> PlanSummary:
    """Extend OUTPUT/plan/ to ``num_samples`` (or to ``units`` units, for a top-up): the existing
    parts stay as they are, the units they lack are appended in new parts of whole shards. Without
    ``keep_existing`` (nothing committed yet) the plan is written anew."""
    listed = storage.list("plan")
    files = [f for f in listed if _is_part(f)] if keep_existing else []
    storage.delete_many(sorted(set(listed) - set(files)))  # the old plan, or what killed writes left
    planned = sum(_rows(storage, f) for f in files)
    wanted = max(units if units is not None else units_needed(num_samples, k), planned)
    part, rows = len(files), []
    for start, stop, size in _cuts(planned, wanted, units_per_shard):
        for shard in _shard_rows(reference_ids, run_seed, start, stop, size):
            rows += shard
            if len(rows) >= ROWS_PER_PLAN_FILE:
                files.append(_write_part(storage, part, rows))
                part, rows = part + 1, []
    if rows:
        files.append(_write_part(storage, part, rows))
    return summarize(storage, files)


def tail_shard_units(units_per_shard: int) -> int:
    """The size of a shard in a new plan's tail (and of a reserve shard: ``run/reserve.py``)."""
    return min(units_per_shard, TAIL_SHARD_UNITS)


def _cuts(planned: int, wanted: int, units_per_shard: int) -> list[tuple[int, int, int]]:
    """(first unit, end, shard size) of each stretch of units to plan: a new plan ends in small
    shards (``TAIL_SHARE``); an extension (a top-up, a larger N) is cut in whole shards, as
    ``next_shards`` cuts it."""
    small = tail_shard_units(units_per_shard)
    tail = min(math.ceil(TAIL_SHARE * wanted), TAIL_MAX_SHARDS * small)
    if planned or small >= units_per_shard or tail < units_per_shard:
        return [(planned, wanted, units_per_shard)]
    return [(0, wanted - tail, units_per_shard), (wanted - tail, wanted, small)]


def next_shards(reference_ids: list[str], run_seed: int, planned: int, units: int, units_per_shard: int) -> list[pa.Table]:
    """The shards a plan of ``planned`` units appends when extended by ``units`` units (the same
    cut as ``write_plan``'s: a plan extended by the first j of them has these j shards), one table
    each, not written anywhere."""
    return [pa.Table.from_pylist(rows, PLAN_SCHEMA)
            for rows in _shard_rows(reference_ids, run_seed, planned, planned + units, units_per_shard)]


def _shard_rows(reference_ids: list[str], run_seed: int, start: int, stop: int, units_per_shard: int):
    """Plan rows of the units ``start`` to ``stop`` of the order, shard by shard."""
    new_units = itertools.islice(unit_order(reference_ids, run_seed), start, stop)
    for shard in _batched(new_units, units_per_shard):
        name = shard_name(PassName.SYNTHESIS, [u.unit_id for u in shard])
        yield [{"shard": name, **u.model_dump()} for u in shard]


def summarize(storage: Storage, files: list[str]) -> PlanSummary:
    table = read_plan(storage, files, columns=["shard", "round", "reference_id"])
    used = set(pc.unique(table.column("reference_id")).to_pylist())
    return PlanSummary(
        units=table.num_rows,
        shards=len(pc.unique(table.column("shard"))),
        rounds=(pc.max(table.column("round")).as_py() or 0) + 1 if table.num_rows else 0,
        references_used=sorted(used),
        files=files,
    )


def read_plan(storage: Storage, files: list[str] | None = None, columns: list[str] | None = None) -> pa.Table:
    files = plan_files(storage) if files is None else files
    tables = [storage.read_table(f).select(columns or PLAN_SCHEMA.names) for f in files]
    schema = pa.schema([PLAN_SCHEMA.field(c) for c in (columns or PLAN_SCHEMA.names)])
    return pa.concat_tables(tables) if tables else schema.empty_table()


def pending_shards(plan: pa.Table, committed: set[str]) -> list[pa.Table]:
    """The plan's shards not yet committed, one small table each (a copy, not a slice: a slice
    would carry the whole plan's buffers into every Ray block)."""
    # One chunk first: pyarrow's take on a table of several chunks (a plan of several parts)
    # concatenates every column whole for each call, which made this O(shards^2): 20 ms a shard
    # at 10M samples (10 parts; 0.05 ms on one chunk), 5 minutes of the driver before the pass.
    plan = plan.combine_chunks()
    shards = plan.column("shard").to_numpy(zero_copy_only=False)
    if not len(shards):
        return []
    starts = np.flatnonzero(np.r_[True, shards[1:] != shards[:-1]])
    ends = np.r_[starts[1:], len(shards)]
    return [plan.take(np.arange(s, e)) for s, e in zip(starts, ends) if shards[s] not in committed]


def pending_plan(storage: Storage, committed: set[str]) -> tuple[int, list[pa.Table]]:
    """The plan's units and its shards not yet committed (``pending_shards``), without keeping the
    plan: read whole it is about 8 KB a shard (136 MB at 10M samples), and a pass runs for hours."""
    plan = read_plan(storage)
    return plan.num_rows, pending_shards(plan, committed)


def planned_shards(storage: Storage, files: list[str] | None = None) -> set[str]:
    """The names of the plan's shards: its shard column alone, not the plan read whole."""
    return set(pc.unique(read_plan(storage, files, columns=["shard"]).column("shard")).to_pylist())


def plan_files(storage: Storage) -> list[str]:
    """The plan's parts, in order."""
    return [f for f in storage.list("plan") if _is_part(f)]


def _is_part(relative: str) -> bool:
    return PART.fullmatch(posixpath.basename(relative)) is not None


def _rows(storage: Storage, relative: str) -> int:
    with storage.fs.open(storage.path(relative), "rb") as handle:
        return pq.read_metadata(handle).num_rows


def _write_part(storage: Storage, index: int, rows: list[dict]) -> str:
    relative = f"plan/part-{index:05d}.parquet"
    storage.write_table(relative, pa.Table.from_pylist(rows, schema=PLAN_SCHEMA))
    return relative


def _batched(items, size: int):
    iterator = iter(items)
    while batch := list(itertools.islice(iterator, size)):
        yield batch


def _digest(*parts: object) -> bytes:
    return hashlib.sha256("\0".join(map(str, parts)).encode()).digest()
