"""``--instructions-from OUTPUT_A``: a run B that refines again the instructions and original
responses of an earlier run A, unit by unit, so that A and B differ only in how responses are
refined (B's feedback mode: reference, sample or none).

B's plan is A's plan: the same references, seed, K, N and shard size give the same units and
shard names, and B copies A's plan (A's top-up units included), so each B shard reads exactly the
data and rejects files of A's commit of the same shard. B makes no instruction or response call;
samples A lost (at any stage: A keeps no response of a sample it lost) are lost in B too, as
rejects that say so. A's units are all there are: B makes no top-up round.

Everything is checked before Ray starts; a mismatch is refused with a message naming it.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import pyarrow as pa

from refed_ray.config import RunConfig
from refed_ray.errors import UserError
from refed_ray.method.synthesis import EarlierUnit
from refed_ray.records import commits
from refed_ray.records.commits import CommitLog
from refed_ray.records.models import Reject
from refed_ray.records.plan import PlanSummary, plan_files, planned_shards, read_plan, summarize
from refed_ray.storage import Storage

FLAG = "--instructions-from"
LOST_IN_A = "not in the run it reuses (instructions_from), which lost it"


@dataclass
class EarlierRun:
    """Run A as B needs it: where it is, and the committed files of each of its synthesis shards."""

    uri: str  # in full, protocol included: for the workers
    label: str  # what B's fingerprint (run.json) records of A: its URI as given, and its run id
    units: int
    shard_files: dict[str, list[str]] = field(default_factory=dict)


def read_earlier_run(config: RunConfig, reference_digest: str, output_uri: str) -> EarlierRun:
    """A, checked against B's settings (``config``): refused unless its plan is B's and every one
    of its shards is committed."""
    storage = Storage(config.instructions_from, config.storage_options)
    if storage.full_uri() == output_uri:
        raise UserError(f"{FLAG} {storage.uri} is this run's own --output: name the earlier run's OUTPUT")
    if not storage.exists(commits.RUN_FILE):
        raise UserError(f"{FLAG} {storage.uri} holds no refed-ray run ({commits.RUN_FILE})")
    earlier = commits.read_run(storage)
    run_id = commits.run_id_of(storage.uri, earlier)
    _refuse_another_plan(storage.uri, earlier, config, reference_digest)
    committed = CommitLog(storage, run_id)
    shards = sorted(planned_shards(storage))
    missing = [shard for shard in shards if shard not in committed.commits["synthesis"]]
    if not shards or missing:
        raise UserError(
            f"{FLAG} {storage.uri}: {len(missing)} of its {len(shards)} planned shards are not committed: "
            "finish that run first (submit its command again), then start this one"
        )
    files = {shard: committed.commits["synthesis"][shard].files for shard in shards}
    units = read_plan(storage, columns=["unit_id"]).num_rows
    return EarlierRun(storage.full_uri(), f"{storage.uri} (run {run_id})", units, files)


def _refuse_another_plan(uri: str, earlier: dict, config: RunConfig, reference_digest: str) -> None:
    """B's plan must be A's: every setting the plan follows from must be A's."""
    there = earlier.get("config", {})
    pairs = {
        "references (the reference set's digest: pass A's --seeds)":
            (earlier.get("fingerprint", {}).get("references"), reference_digest),
        "seed": (there.get("seed"), config.seed),
        "instructions_per_aspect (K)": (there.get("instructions_per_aspect"), config.instructions_per_aspect),
        "num_samples (N)": (there.get("num_samples"), config.num_samples),
        "workers.units_per_shard":
            (there.get("workers", {}).get("units_per_shard"), config.workers.units_per_shard),
    }
    differs = [f"{name}: {a!r} there, {b!r} here" for name, (a, b) in pairs.items() if a != b]
    if differs:
        raise UserError(
            f"{FLAG} {uri}: this run's plan would not be that run's, so its units could not be reused: "
            + "; ".join(differs) + ". Run with that run's settings."
        )


def copy_plan(earlier: EarlierRun, storage: Storage, config: RunConfig) -> PlanSummary:
    """B's plan: A's plan files, as they are (A's top-up units included)."""
    source = Storage(earlier.uri, config.storage_options)
    files = plan_files(source)
    for name in files:
        storage.write_bytes(name, source.read_bytes(name))
    storage.delete_many(sorted(set(storage.list("plan")) - set(files)))
    return summarize(storage, files)


def earlier_units(storage: Storage, files: list[str], units: list[dict], k: int) -> dict[str, EarlierUnit]:
    """A's units of one shard (``units``: the plan rows), from the files of A's commit of it."""
    data = _read(storage, [f for f in files if f.startswith("data/")],
                 ["unit_id", "sample_index", "instruction", "response"])
    rejects = _read(storage, [f for f in files if f.startswith("rejects/")], list(Reject.model_fields))
    samples: dict[str, dict[int, tuple[str, str]]] = {}
    for row in data:
        samples.setdefault(row["unit_id"], {})[row["sample_index"]] = (row["instruction"], row["response"])
    lost_in_a: dict[str, list[dict]] = {}
    for row in rejects:
        lost_in_a.setdefault(row["unit_id"], []).append(row)
    return {
        unit["unit_id"]: EarlierUnit(
            samples.get(unit["unit_id"], {}),
            _lost(unit, samples.get(unit["unit_id"], {}), lost_in_a.get(unit["unit_id"], []), k),
        )
        for unit in units
    }


def _lost(unit: dict, kept: dict[int, tuple[str, str]], rejected: list[dict], k: int) -> list[Reject]:
    """B's rejects for the samples of ``unit`` that A did not keep, each with A's stage and reason."""
    where = {"unit_id": unit["unit_id"], "reference_id": unit["reference_id"], "aspect": unit["aspect"]}
    whole = [r for r in rejected if r["sample_index"] == -1]
    if whole and not kept:  # A lost the whole unit (no feedback, no instructions, an abandoned shard)
        reason = f"{LOST_IN_A}: {whole[0]['reason']}"
        return [Reject(stage=whole[0]["stage"], reason=reason, lost_samples=k, **where)]
    by_index = {r["sample_index"]: r for r in rejected}
    lost = []
    for index in range(k):
        if index in kept:
            continue
        reject = by_index.get(index, {"stage": "instructions", "reason": "no record of it there"})
        lost.append(Reject(stage=reject["stage"], reason=f"{LOST_IN_A}: {reject['reason']}", sample_index=index,
                           lost_samples=1, **where))
    return lost


def _read(storage: Storage, files: list[str], columns: list[str]) -> list[dict]:
    tables = [storage.read_table(name).select(columns) for name in files]
    return pa.concat_tables(tables).to_pylist() if tables else []
