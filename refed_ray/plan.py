"""The plan of work units, written before synthesis.

A unit asks for K new instructions for one (round, reference, aspect). Its id and sampling seed
follow from (run seed, round, reference_id, aspect) alone, so the same config gives the same
plan, and a larger ``num_samples`` extends the plan without changing the units already in it.
The last round is usually partial: it takes the units whose ids sort first, a seeded sample of
the references that does not favour the top of the seed file.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import pyarrow as pa

from refed_ray.records import ASPECTS, WorkUnit
from refed_ray.storage import Storage

PLAN_SCHEMA = pa.schema(
    [
        ("unit_id", pa.string()),
        ("round", pa.int64()),
        ("reference_id", pa.string()),
        ("aspect", pa.string()),
        ("seed", pa.int64()),
    ]
)
ROWS_PER_PLAN_FILE = 100_000


@dataclass
class PlanSummary:
    units: int
    rounds: int
    references_used: list[str]
    files: list[str]


def make_unit(run_seed: int, round_: int, reference_id: str, aspect: str) -> WorkUnit:
    digest = hashlib.sha256(f"{run_seed}\0{round_}\0{reference_id}\0{aspect}".encode()).digest()
    return WorkUnit(
        unit_id=digest[:8].hex(),
        round=round_,
        reference_id=reference_id,
        aspect=aspect,
        seed=int.from_bytes(digest[8:12], "big") & 0x7FFFFFFF,
    )


def units_needed(num_samples: int, instructions_per_aspect: int) -> int:
    return math.ceil(num_samples / instructions_per_aspect)


def iter_units(reference_ids: list[str], num_samples: int, k: int, run_seed: int) -> Iterator[WorkUnit]:
    """Every unit of the plan, round by round; memory holds one round at most."""
    remaining = units_needed(num_samples, k)
    round_ = 0
    while remaining > 0:
        units = sorted(
            (make_unit(run_seed, round_, ref, aspect) for ref in reference_ids for aspect in ASPECTS),
            key=lambda unit: unit.unit_id,
        )[:remaining]
        yield from units
        remaining -= len(units)
        round_ += 1


def write_plan(storage: Storage, reference_ids: list[str], num_samples: int, k: int, run_seed: int) -> PlanSummary:
    """Write OUTPUT/plan/part-<n>.parquet; the same inputs always write the same files."""
    for stale in storage.list("plan"):
        storage.delete(stale)  # a smaller num_samples than last time must not leave extra parts
    files, buffer, used, rounds, total = [], [], set(), 0, 0
    for unit in iter_units(reference_ids, num_samples, k, run_seed):
        buffer.append(unit.model_dump())
        used.add(unit.reference_id)
        rounds = unit.round + 1
        total += 1
        if len(buffer) == ROWS_PER_PLAN_FILE:
            files.append(_write_part(storage, len(files), buffer))
            buffer = []
    if buffer:
        files.append(_write_part(storage, len(files), buffer))
    return PlanSummary(
        units=total,
        rounds=rounds,
        references_used=[ref for ref in reference_ids if ref in used],
        files=files,
    )


def _write_part(storage: Storage, index: int, rows: list[dict]) -> str:
    relative = f"plan/part-{index:05d}.parquet"
    storage.write_table(relative, pa.Table.from_pylist(rows, schema=PLAN_SCHEMA))
    return relative
