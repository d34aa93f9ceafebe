"""The compacted dataset: committed samples as ``OUTPUT/dataset/data/gen-TOKEN/train-XXXXX-of-YYYYY.parquet``.

Commit shards are how a run resumes; this is what users read, less the samples the filters in
force dropped (``kept.py``). Files of about ``dataset_file_mb`` each, written in parallel by Ray
Data, one task per file. The folder is laid out for every reader (README, "Reading the dataset"):

- ``dataset/data/``: the Parquet files and nothing else a reader takes: pandas, pyarrow.dataset,
  Ray Data, Hugging Face's ``data_dir`` read this folder; DuckDB globs ``data/gen-*/*.parquet``;
- ``dataset/README.md``: the dataset card (``card.py``), whose ``configs`` name the committed
  files: ``datasets.load_dataset(OUTPUT/dataset)`` and the Hub read them through it. It lies
  beside ``data/``, never in it: a Parquet directory reader would try to read it;
- ``dataset/_manifest.json``: the commit point (a name pyarrow's readers skip).

``dataset/`` is one complete generation, the previous or the new one, whatever fails:

1. a compaction writes its files into a hidden folder, ``dataset/data/.gen-TOKEN/``, which every
   directory reader but DuckDB's ``**`` skips; each file appears whole or not at all
   (``Storage.open_output``);
2. once every file is written, the folder is published as ``dataset/data/gen-TOKEN/``, and the
   card is written to name its files (a card always names a complete generation);
3. ``dataset/_manifest.json`` is replaced to name it: the one commit point. Readers of the
   project (export, the report, the quality figures) read the files the manifest names;
4. every other generation (the previous one, a failed or killed compaction's hidden folder) is
   deleted, here or by the next compaction, which also writes the card again if a kill between
   steps 2 and 3 left it naming another generation than the manifest.

A compaction that fails or is killed before step 3 leaves the manifest and the previous generation
as they were. A folder listing taken between steps 2 and 4 (one rename on a file system, a copy
per file on object stores, which cannot rename) sees both generations; the manifest never does.
The manifest also records what the dataset was built from (a digest of the committed shard files
and the dropped samples), so an up-to-date dataset is not written again. A dataset of no rows is
one Parquet file of no rows (every Parquet reader reads 0 rows) and no card: Hugging Face
``datasets`` cannot load an empty split.

A selection (``select.py``: OUTPUT/selected/METHOD-N/) is written in the same layout by the same
functions (``write_generation``, ``read_manifest``, ``delete_other_generations``), its generation
folders directly in its folder (it holds no card).
"""

from __future__ import annotations

import hashlib
import json
import posixpath
import uuid
from collections.abc import Callable
from typing import Any

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import ray

from refed_ray.data.card import CARD, write_card
from refed_ray.records.commits import CommitLog
from refed_ray.records.models import Sample, arrow_schema
from refed_ray.storage import Storage

FOLDER = "dataset"
DATA = f"{FOLDER}/data"  # the Parquet files' folder: what a Parquet directory reader reads
MANIFEST = f"{FOLDER}/_manifest.json"
ROWS_PER_GROUP = 10_000
KEY_JOIN = "#"  # a dropped sample's key: unit_id#sample_index


def compact_dataset(storage: Storage, log: CommitLog, file_mb: int, max_rows: int | None = None,
                    drops: list[pa.Table] | None = None) -> dict[str, Any]:
    """Bring OUTPUT/dataset up to date with the committed samples less the dropped ones (``drops``:
    a ``unit_id``, ``sample_index`` table per filter in force, ``kept.dropped_keys``), ``max_rows``
    at most (a top-up may overshoot N by part of a shard); returns its manifest."""
    drops = _drops_by_file(log, pa.concat_tables(drops) if drops else None)
    files = _take_rows(log, max_rows, drops)
    digest = hashlib.sha256(json.dumps([files, sorted((f, sorted(d)) for f, d in drops.items())]).encode()).hexdigest()[:16]
    manifest = read_manifest(storage)
    if not _current(manifest, digest):
        generation = new_generation_name()
        names, rows = _write_generation(storage, generation, files, drops, file_mb)
        manifest = {"digest": digest, "generation": generation, "files": names, "rows": rows, "shard_files": len(files)}
        write_card(storage, manifest)  # before the commit: the card never names a deleted generation
        storage.write_json(MANIFEST, manifest)  # the commit point
    else:
        write_card(storage, manifest, only_if_changed=True)  # a kill between the card and the commit
    _delete_other_generations(storage, manifest["generation"])
    return manifest


def _current(manifest: dict[str, Any] | None, digest: str) -> bool:
    """Whether the committed generation is this digest's, in this layout (an older layout's
    generation, straight under dataset/, is written again)."""
    return (manifest is not None and manifest.get("digest") == digest and "generation" in manifest
            and all(name.startswith(f"{DATA}/{manifest['generation']}/") for name in manifest["files"]))


def new_generation_name() -> str:
    return f"gen-{uuid.uuid4().hex[:12]}"


def read_manifest(storage: Storage, folder: str = FOLDER) -> dict[str, Any] | None:
    """The committed generation of OUTPUT/dataset (or of another folder in its layout, a
    selection's): ``files`` (paths relative to OUTPUT), ``rows``."""
    manifest = f"{folder}/_manifest.json"
    return storage.read_json(manifest) if storage.exists(manifest) else None


def dataset_files(storage: Storage) -> list[str]:
    """The files of OUTPUT/dataset's committed generation (none before the first compaction)."""
    manifest = read_manifest(storage)
    return manifest["files"] if manifest else []


def _write_generation(storage: Storage, generation: str, files: list[tuple[str, int]], drops: dict[str, set[str]],
                      file_mb: int) -> tuple[list[str], int]:
    """Write the dataset's generation from its shard files, less their drops; returns its files and rows."""
    # No rows: one file of none, so that every Parquet reader of dataset/data reads 0 rows.
    groups = pack([name for name, _ in files], storage.sizes("data"), file_mb * 2**20) or [[]]
    limits = dict(files)
    tasks = [{"files": group, "limits": [limits[f] for f in group], "drops": [sorted(drops.get(f, ())) for f in group]}
             for group in groups]
    return write_generation(storage, DATA, generation, tasks, _write_file)


def write_generation(storage: Storage, folder: str, generation: str, tasks: list[dict[str, Any]],
                     write_file: Callable[..., pa.Table]) -> tuple[list[str], int]:
    """Write a generation of ``folder`` in its hidden folder, one file per task (Ray Data, one
    task per file: ``write_file(batch, uri, storage_options)`` gets the task's fields and its
    ``target`` and returns ``{"rows": [n]}``), then publish it; returns its files and rows."""
    if not tasks:
        return [], 0
    staging, published = f"{folder}/.{generation}", f"{folder}/{generation}"
    names = [f"train-{i:05d}-of-{len(tasks):05d}.parquet" for i in range(len(tasks))]
    written = ray.data.from_items(
        [{"target": f"{staging}/{name}", **task} for name, task in zip(names, tasks)], override_num_blocks=len(tasks)
    ).map_batches(
        write_file, batch_size=1, batch_format="pyarrow", num_cpus=0.5,
        fn_kwargs={"uri": storage.uri, "storage_options": storage.storage_options},
    )
    rows = 0
    for batch in written.iter_batches(batch_format="pyarrow", batch_size=None):  # one batch per written file
        rows += sum(batch["rows"].to_pylist())
    # A task whose process died mid-file (then retried by Ray) left its staging file here: it is not published.
    expected = {f"{staging}/{name}" for name in names}
    storage.delete_many([f for f in storage.list(staging) if f not in expected])
    storage.move_folder(staging, published)
    return [f"{published}/{name}" for name in names], rows


def _delete_other_generations(storage: Storage, generation: str) -> None:
    """Everything in OUTPUT/dataset but the manifest, the card and the committed generation: the
    previous generation, the hidden folder of a failed or killed compaction, files of an older
    layout (a LIST of each folder, and deletes only when there is something to delete)."""
    keep = {MANIFEST, CARD, DATA}
    for folder in storage.subfolders(FOLDER):
        if folder not in keep:
            storage.delete(folder)
    storage.delete_many([name for name in storage.list(FOLDER) if name not in keep])
    delete_other_generations(storage, DATA, generation)


def delete_other_generations(storage: Storage, folder: str, generation: str) -> None:
    """The generation folders of ``folder`` but ``generation`` (the previous one, the hidden
    folder of a failed or killed write); anything else in ``folder`` stays."""
    for sub in storage.subfolders(folder):
        if sub != f"{folder}/{generation}" and posixpath.basename(sub).lstrip(".").startswith("gen-"):
            storage.delete(sub)


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


def pack(files: list[str], sizes: dict[str, int], target: int) -> list[list[str]]:
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
    """One dataset file from its shard files, streamed: memory holds one row group at a time. The
    file appears whole when every row is written, and not at all when anything fails."""
    storage = Storage(uri, storage_options)
    schema = arrow_schema(Sample)
    rows, pending = 0, []
    with storage.open_output(batch["target"][0].as_py()) as handle, pq.ParquetWriter(
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
    return pa.table({"rows": [rows]})


def _flush(writer: pq.ParquetWriter, pending: list[pa.Table]) -> int:
    if not pending:
        return 0
    table = pa.concat_tables(pending)
    writer.write_table(table, row_group_size=ROWS_PER_GROUP)
    pending.clear()
    return table.num_rows
