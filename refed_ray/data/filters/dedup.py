"""Global near-duplicate removal of instructions: MinHash-LSH over every committed sample, on Ray.

Cheap duplicates are caught before they cost anything: synthesis drops an instruction that
repeats the reference's or an earlier one of its own unit before its response is generated
(``synthesis.py``). What remains are duplicates across units (round r of a reference against
round 0, or two references' units meeting), and those are found here, after synthesis, over the
whole run:

1. signature tasks, one per ~``dedup.rows_per_task`` instructions: MinHash signatures and LSH band
   keys; the band keys go to ``P`` partitions by key, the signatures stay in the object store;
2. bucket tasks, one per partition: instructions that share a band key are candidates (each to
   the lowest id of its bucket);
3. check tasks, one per pair of signature blocks: a candidate whose MinHash estimate reaches the
   threshold is a duplicate pair;
4. the driver joins pairs into groups (connected components) and keeps each group's earliest
   sample (ids follow the committed shard files in a stable order); it holds duplicate pairs only.

No process holds every signature. The result is one commit of pass ``dedup`` (its rejects,
stage "dedup", one row per dropped sample naming the sample kept): dedup is a filter
(``filters/base.py``), so that commit is named by the synthesis shards it covers and the dedup
settings, a resume reuses it, a top-up replaces it, and a stale one is never applied.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import ray

from refed_ray.config import DedupConfig, RunConfig
from refed_ray.data.filters.base import Filter, StaleFilter
from refed_ray.method.similarity import band_keys, lsh_bands, signatures
from refed_ray.records import commits  # noqa: F401  (test_dedup patches commits.commit_shard through this name)
from refed_ray.records.commits import Commit, CommitLog
from refed_ray.records.models import Reject, to_table
from refed_ray.records.stages import PassName, Stage
from refed_ray.storage import Storage

log = logging.getLogger(__name__)
BAND_ROWS_PER_PARTITION = 4_000_000  # (band key, id) rows one bucket task sorts
DETAIL_CHARS = 300


def reason(config: DedupConfig) -> str:
    return f"near-duplicate of an earlier instruction of the run (Jaccard >= {config.threshold:g})"


class DedupFilter(Filter):
    name = PassName.DEDUP

    def settings(self, config: RunConfig) -> DedupConfig:
        return config.dedup

    def enabled(self, settings: DedupConfig) -> bool:
        return settings.enabled

    def find_drops(self, storage: Storage, committed: CommitLog, settings: DedupConfig) -> pa.Table:
        return _find_duplicates(storage, committed, settings)

    def delete_stale(self, storage: Storage, committed: CommitLog, keep: str | None) -> None:
        _delete_stale(storage, committed, keep)  # through the module's name: test_dedup kills a run in it


DEDUP = DedupFilter()
StaleDedup = StaleFilter


def deduplicate(storage: Storage, committed: CommitLog, config: DedupConfig) -> Commit | None:
    """The current dedup commit: reused when there is one, computed and committed otherwise
    (``Filter.apply``)."""
    return DEDUP.apply(storage, committed, config)


def current_name(committed: CommitLog, config: DedupConfig) -> str:
    return DEDUP.current_name(committed, config)


def current_commit(committed: CommitLog, config: DedupConfig) -> Commit | None:
    return DEDUP.current_commit(committed, config)


def dropped_keys(storage: Storage, committed: CommitLog, config: DedupConfig) -> pa.Table:
    return DEDUP.dropped_keys(storage, committed, config)


def _delete_stale(storage: Storage, committed: CommitLog, keep: str | None) -> None:
    Filter.delete_stale(DEDUP, storage, committed, keep)


# ---- the pass ------------------------------------------------------------------------------


def _find_duplicates(storage: Storage, committed: CommitLog, config: DedupConfig) -> pa.Table:
    blocks = _blocks(committed, config.rows_per_task)
    total = sum(rows for _, rows, _ in blocks)
    if total < 2:
        return to_table([], Reject)
    bands, rows = lsh_bands(config.threshold, config.num_perm)
    partitions = max(1, min(256, total * bands // BAND_ROWS_PER_PARTITION))
    location = {"uri": storage.uri, "storage_options": storage.storage_options}
    hashed = [
        _hash_block.options(num_returns=partitions + 1).remote(
            location, files, start, partitions, config.ngram, config.num_perm, bands, rows)
        for files, _, start in blocks
    ]
    candidates = ray.get([_bucket_candidates.remote(*[h[p] for h in hashed]) for p in range(partitions)])
    pairs = np.unique(np.concatenate(candidates)) if candidates else np.empty(0, np.uint64)
    starts = np.array([start for _, _, start in blocks], dtype=np.int64)
    duplicates = _check(pairs, starts, [h[-1] for h in hashed], config.threshold)
    dropped, kept = _groups(duplicates)
    log.info("dedup: %d instructions, %d candidate pairs, %d duplicate pairs, %d dropped",
             total, len(pairs), len(duplicates), len(dropped))
    return _rejects(blocks, starts, dropped, kept, location, reason(config))


def _blocks(committed: CommitLog, rows_per_task: int) -> list[tuple[list[str], int, int]]:
    """Committed data files, in a stable order, cut into ``(files, rows, first id)`` blocks."""
    rows_of = {f: c.stats.samples for c in committed.commits["synthesis"].values() for f in c.files
               if f.startswith("data/")}
    blocks, files, rows, start = [], [], 0, 0
    for name in committed.files("data"):
        if name not in rows_of:
            continue
        files.append(name)
        rows += rows_of[name]
        if rows >= rows_per_task:
            blocks.append((files, rows, start))
            files, start, rows = [], start + rows, 0
    if files:
        blocks.append((files, rows, start))
    return blocks


@ray.remote(num_cpus=1)
def _hash_block(location: dict, files: list[str], start: int, partitions: int, ngram: int, num_perm: int,
                bands: int, rows: int):
    storage = Storage(location["uri"], location["storage_options"])
    texts = [t for name in files for t in storage.read_table(name).column("instruction").to_pylist()]
    signature = signatures(texts, ngram, num_perm)
    keys = band_keys(signature, bands, rows).ravel()
    ids = np.repeat(np.arange(start, start + len(texts), dtype=np.uint32), bands)
    part = (keys % np.uint64(partitions)).astype(np.int64)
    order = np.argsort(part, kind="stable")
    bounds = np.searchsorted(part[order], np.arange(partitions + 1))
    out = [(keys[order[a:b]], ids[order[a:b]]) for a, b in itertools.pairwise(bounds)]
    return (*out, signature)


@ray.remote(num_cpus=1)
def _bucket_candidates(*parts: tuple[np.ndarray, np.ndarray]) -> np.ndarray:
    """Pairs ``(lowest id of the bucket) << 32 | other id`` for every bucket with several ids."""
    keys = np.concatenate([k for k, _ in parts])
    ids = np.concatenate([i for _, i in parts])
    order = np.lexsort((ids, keys))
    keys, ids = keys[order], ids[order]
    first = np.ones(len(keys), dtype=bool)
    first[1:] = keys[1:] != keys[:-1]
    root = ids[np.maximum.accumulate(np.where(first, np.arange(len(ids)), 0))]
    member = ~first & (ids != root)
    return np.unique((root[member].astype(np.uint64) << np.uint64(32)) | ids[member].astype(np.uint64))


def _check(pairs: np.ndarray, starts: np.ndarray, signature_refs: list, threshold: float) -> np.ndarray:
    """The candidate pairs whose MinHash estimate reaches the threshold, as (kept, other) rows."""
    if not len(pairs):
        return np.empty((0, 2), np.int64)
    left = (pairs >> np.uint64(32)).astype(np.int64)
    right = (pairs & np.uint64(0xFFFFFFFF)).astype(np.int64)
    pair_block = (np.searchsorted(starts, left, side="right") - 1) * len(starts) + (
        np.searchsorted(starts, right, side="right") - 1)
    order = np.argsort(pair_block, kind="stable")
    splits = np.flatnonzero(np.diff(pair_block[order])) + 1
    jobs = []
    for chosen in np.split(order, splits):  # one task per pair of signature blocks
        a, b = divmod(int(pair_block[chosen[0]]), len(starts))
        verdict = _check_pairs.remote(signature_refs[a], signature_refs[b], left[chosen] - starts[a],
                                      right[chosen] - starts[b], threshold)
        jobs.append((verdict, left[chosen], right[chosen]))
    verdicts = ray.get([verdict for verdict, _, _ in jobs])
    return np.concatenate([np.stack([lo[ok], hi[ok]], axis=1) for (_, lo, hi), ok in zip(jobs, verdicts)])


@ray.remote(num_cpus=1)
def _check_pairs(left_signatures: np.ndarray, right_signatures: np.ndarray, left: np.ndarray, right: np.ndarray,
                 threshold: float) -> np.ndarray:
    estimate = (left_signatures[left] == right_signatures[right]).mean(axis=1)
    return estimate >= threshold


def _groups(pairs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Connected components of the duplicate pairs: every member but the lowest id is dropped;
    returns (dropped ids, the id kept for each)."""
    if not len(pairs):
        return np.empty(0, np.int64), np.empty(0, np.int64)
    nodes = np.unique(pairs)
    a, b = np.searchsorted(nodes, pairs[:, 0]), np.searchsorted(nodes, pairs[:, 1])
    label = np.arange(len(nodes))
    while True:  # min-label propagation with pointer jumping: a few rounds for these small groups
        lowest = np.minimum(label[a], label[b])
        updated = label.copy()
        np.minimum.at(updated, a, lowest)
        np.minimum.at(updated, b, lowest)
        updated = updated[updated]
        if np.array_equal(updated, label):
            break
        label = updated
    dropped = label != np.arange(len(nodes))
    return nodes[dropped], nodes[label[dropped]]


def _rejects(blocks, starts, dropped: np.ndarray, kept: np.ndarray, location: dict, why: str) -> pa.Table:
    """One reject per dropped sample, naming the sample kept in its place."""
    wanted = np.unique(np.concatenate([dropped, kept]))
    owner = np.searchsorted(starts, wanted, side="right") - 1
    tasks = [_describe.remote(location, blocks[i][0], int(starts[i]), wanted[owner == i] - starts[i])
             for i in np.unique(owner).tolist()]
    described: dict[int, dict[str, Any]] = {}
    for table in ray.get(tasks):
        described.update({row["id"]: row for row in table.to_pylist()})
    rows = []
    for gone, stays in zip(dropped.tolist(), kept.tolist()):
        sample, original = described[gone], described[stays]
        rows.append(Reject(
            stage=Stage.DEDUP, reason=why, unit_id=sample["unit_id"], reference_id=sample["reference_id"],
            aspect=sample["aspect"], sample_index=sample["sample_index"], lost_samples=1,
            detail=(f"kept {original['unit_id']}#{original['sample_index']}: "
                    f"{sample['instruction'][:DETAIL_CHARS]}"),
        ))
    return to_table(rows, Reject)


@ray.remote(num_cpus=1)
def _describe(location: dict, files: list[str], start: int, rows: np.ndarray) -> pa.Table:
    storage = Storage(location["uri"], location["storage_options"])
    columns = ["unit_id", "sample_index", "reference_id", "aspect", "instruction"]
    table = pa.concat_tables([storage.read_table(name).select(columns) for name in files])
    picked = table.take(pa.array(rows))
    return picked.append_column("id", pc.add(pa.array(rows, pa.int64()), start))
