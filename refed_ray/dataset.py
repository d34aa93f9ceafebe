"""The compacted dataset: committed samples as ``OUTPUT/dataset/train-XXXXX-of-YYYYY.parquet``.

Commit shards are how a run resumes; this is what users read, less the samples dedup dropped (``datasets.load_dataset("parquet",
data_dir=OUTPUT/dataset)``, pandas, Spark). Files of about ``dataset_file_mb`` each, written in
parallel by Ray Data, one task per file. ``dataset/_manifest.json`` names the committed shard
files it was built from, so an up-to-date dataset is not written again.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from refed_ray.commits import CommitLog
from refed_ray.records import Sample, arrow_schema
from refed_ray.storage import Storage

MANIFEST = "dataset/_manifest.json"
ROWS_PER_GROUP = 10_000
KEY_JOIN = "#"  # a dropped sample's key: unit_id#sample_index


def compact_dataset(storage: Storage, log: CommitLog, file_mb: int, max_rows: int | None = None,
                    dropped: pa.Table | None = None) -> dict[str, Any]:
    """Bring OUTPUT/dataset up to date with the committed samples less the ``dropped`` ones
    (``unit_id``, ``sample_index``: the dedup pass's), ``max_rows`` at most (a top-up may
    overshoot N by part of a shard); returns its manifest."""
    drops = _drops_by_file(log, dropped)
    files = _take_rows(log, max_rows, drops)
    digest = hashlib.sha256(json.dumps([files, sorted((f, sorted(d)) for f, d in drops.items())]).encode()).hexdigest()[:16]
    if storage.exists(MANIFEST):
        manifest = storage.read_json(MANIFEST)
        if manifest.get("digest") == digest:
            return manifest
    sizes = storage.sizes("data")
    groups = _pack([name for name, _ in files], sizes, file_mb * 2**20)
    limits = dict(files)
    names = [f"dataset/train-{i:05d}-of-{len(groups):05d}.parquet" for i in range(len(groups))]
    rows = 0
    if groups:
        tasks = ray.data.from_items(
            [{"target": name, "files": group, "limits": [limits[f] for f in group],
              "drops": [sorted(drops.get(f, ())) for f in group]}
             for name, group in zip(names, groups)], override_num_blocks=len(groups)
        ).map_batches(
            _write_file, batch_size=1, batch_format="pyarrow", num_cpus=0.5,
            fn_kwargs={"uri": storage.uri, "storage_options": storage.storage_options},
        )
        rows = sum(sum(batch["rows"].to_pylist()) for batch in tasks.iter_batches(batch_format="pyarrow"))
    stale = set(storage.list("dataset")) - set(names) - {MANIFEST}
    storage.delete_many(stale)
    manifest = {"digest": digest, "files": names, "rows": rows, "shard_files": len(files)}
    storage.write_json(MANIFEST, manifest)
    return manifest


def _drops_by_file(log: CommitLog, dropped: pa.Table | None) -> dict[str, set[str]]:
    """``data file -> {"unit_id#sample_index"}`` of the dropped samples (a unit's samples live in
    its shard's one data file)."""
    if dropped is None or not dropped.num_rows:
        return {}
    by_unit: dict[str, list[int]] = {}
    for unit, index in zip(dropped.column("unit_id").to_pylist(), dropped.column("sample_index").to_pylist()):
        by_unit.setdefault(unit, []).append(index)
    drops: dict[str, set[str]] = {}
    for commit in log.commits["synthesis"].values():
        units = [u for u in commit.ids if u in by_unit]
        data = [f for f in commit.files if f.startswith("data/")]
        if units and data:
            drops.setdefault(data[0], set()).update(f"{u}{KEY_JOIN}{i}" for u in units for i in by_unit[u])
    return drops


def _take_rows(log: CommitLog, max_rows: int | None, drops: dict[str, set[str]]) -> list[tuple[str, int]]:
    """``(file, rows to take after its drops)`` of the committed data files in a stable order, up
    to ``max_rows`` in all."""
    rows_of = {f: c.stats.samples - len(drops.get(f, ())) for commits in log.commits.values()
               for c in commits.values() for f in c.files if f.startswith("data/")}
    taken, total = [], 0
    for name in log.files("data"):
        if max_rows is not None and total >= max_rows:
            break
        rows = rows_of[name] if max_rows is None else min(rows_of[name], max_rows - total)
        taken.append((name, rows))
        total += rows
    return taken


def _pack(files: list[str], sizes: dict[str, int], target: int) -> list[list[str]]:
    """Consecutive files in groups of about ``target`` bytes (compressed shards compact to about
    their own size)."""
    groups, current, size = [], [], 0
    for name in files:
        if current and size + sizes.get(name, 0) > target:
            groups.append(current)
            current, size = [], 0
        current.append(name)
        size += sizes.get(name, 0)
    if current:
        groups.append(current)
    return groups


def _write_file(batch: pa.Table, uri: str, storage_options: dict) -> pa.Table:
    """One dataset file from its shard files, streamed: memory holds one row group at a time."""
    storage = Storage(uri, storage_options)
    target = batch["target"][0].as_py()
    schema = arrow_schema(Sample)
    staging = f"{target}.tmp-{uuid.uuid4().hex}" if storage.is_local else target
    rows, pending = 0, []
    if storage.is_local:
        storage.fs.makedirs(storage.path("dataset"), exist_ok=True)
    # On object stores the upload completes (and the object appears, whole) when the file closes.
    with storage.fs.open(storage.path(staging), "wb") as handle, pq.ParquetWriter(
        handle, schema, compression="zstd"
    ) as writer:
        for name, limit, drops in zip(batch["files"][0].as_py(), batch["limits"][0].as_py(), batch["drops"][0].as_py()):
            table = storage.read_table(name).select(schema.names).cast(schema)
            if drops:
                keys = pc.binary_join_element_wise(table["unit_id"], pc.cast(table["sample_index"], pa.string()), KEY_JOIN)
                table = table.filter(pc.invert(pc.is_in(keys, pa.array(drops, pa.string()))))
            pending.append(table.slice(0, limit))
            if sum(t.num_rows for t in pending) >= ROWS_PER_GROUP:
                rows += _flush(writer, pending)
        rows += _flush(writer, pending)
    if storage.is_local:
        storage.fs.mv(storage.path(staging), storage.path(target))
    return pa.table({"rows": [rows]})


def _flush(writer: pq.ParquetWriter, pending: list[pa.Table]) -> int:
    if not pending:
        return 0
    table = pa.concat_tables(pending)
    writer.write_table(table, row_group_size=ROWS_PER_GROUP)
    pending.clear()
    return table.num_rows


def read_manifest(storage: Storage) -> dict[str, Any] | None:
    return json.loads(storage.read_bytes(MANIFEST)) if storage.exists(MANIFEST) else None
