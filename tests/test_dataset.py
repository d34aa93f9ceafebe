"""OUTPUT/dataset is one complete generation, the previous or the new one, whatever fails: a
compaction task failing mid-file, a task or the driver killed mid-compaction, a staging leftover.
On a local disk and on S3 (moto's server, as in test_object_storage.py), read both through the
manifest and as a folder (pyarrow's directory discovery, and Hugging Face ``datasets``' data_dir)."""

from __future__ import annotations

import functools
import os
from unittest import mock

import pyarrow as pa
import pyarrow.dataset as pads
import pyarrow.fs
import pyarrow.parquet as pq
import pytest

ray = pytest.importorskip("ray")

from refed_ray.data import dataset  # noqa: E402
from refed_ray.data.card import CARD  # noqa: E402
from refed_ray.data.dataset import DATA, MANIFEST, compact_dataset, dataset_files  # noqa: E402
from refed_ray.records.commits import CommitLog, commit_shard, shard_name  # noqa: E402
from refed_ray.records.models import Sample, to_table  # noqa: E402
from refed_ray.records.stats import ShardStats  # noqa: E402
from refed_ray.storage import Storage  # noqa: E402
from tests.test_object_storage import bucket  # noqa: E402,F401  (the S3 server, and the Ray cluster of this module)

ROWS_PER_SHARD = 4
REAL_WRITE_FILE = dataset._write_file  # the compaction task; the worker processes import it unpatched


class Killed(BaseException):
    """A kill: not an Exception, so nothing on the way up handles it."""


@pytest.fixture(params=["local", "s3"])
def storage(request, bucket, tmp_path):  # noqa: F811
    return Storage(str(tmp_path / "out") if request.param == "local" else f"{bucket}/{tmp_path.name}")


def commit_shards(storage: Storage, first: int, count: int) -> CommitLog:
    """``count`` committed synthesis shards of one unit and ROWS_PER_SHARD samples each."""
    for shard in range(first, first + count):
        unit = f"u{shard:02d}"
        tables = {"data": to_table([_sample(unit, i) for i in range(ROWS_PER_SHARD)], Sample)}
        commit_shard(storage, "synthesis", shard_name("synthesis", [unit]), [unit], tables, ShardStats.of(tables, {}))
    return CommitLog(storage)


def keys(shards: range) -> list[tuple[str, int]]:
    return sorted((f"u{s:02d}", i) for s in shards for i in range(ROWS_PER_SHARD))


def assert_one_generation(storage: Storage, expected: list[tuple[str, int]]) -> None:
    """dataset/ holds exactly the ``expected`` samples, whole, as its manifest names them and as
    a directory reader finds them; no other file is visible to a directory reader."""
    manifest = storage.read_json(MANIFEST)
    through_manifest = [k for name in dataset_files(storage) for k in _keys(storage.read_table(name))]
    assert sorted(through_manifest) == expected and manifest["rows"] == len(expected)
    assert sum(pq.ParquetFile(storage.fs.open(storage.path(f))).metadata.num_rows for f in manifest["files"]) == len(expected)
    folder = pads.dataset(storage.path(DATA), format="parquet",
                          filesystem=pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(storage.fs)))
    assert sorted(_keys(folder.to_table(columns=["unit_id", "sample_index"]))) == expected
    assert _visible_files(storage) == set(manifest["files"])


def test_a_compaction_task_failing_mid_file_leaves_the_previous_generation(storage, monkeypatch):
    commit_shards(storage, 0, 3)
    compact_dataset(storage, CommitLog(storage), file_mb=1)  # one file of 12 rows
    log = commit_shards(storage, 3, 3)  # a top-up committed more: the next generation has 24 rows

    monkeypatch.setattr(dataset, "_write_file", _write_file_failing_after_its_first_row_group)
    with pytest.raises(Exception, match="injected: compaction task failed mid-file"):
        compact_dataset(storage, log, file_mb=1)
    monkeypatch.undo()
    # Neither a truncated file under a final name (what closing an S3 upload on the error left)
    # nor a staging file a directory reader takes (what a local write left).
    assert_one_generation(storage, keys(range(3)))

    compact_dataset(storage, CommitLog(storage), file_mb=1)
    assert_one_generation(storage, keys(range(6)))
    assert _all_files(storage) == {MANIFEST, CARD, *dataset_files(storage)}  # the failed attempt's leftovers are gone


def test_a_driver_killed_mid_compaction_leaves_the_previous_generation(storage, monkeypatch):
    commit_shards(storage, 0, 3)
    first = compact_dataset(storage, CommitLog(storage), file_mb=0)  # a file per shard: -of-00003
    assert [f.rsplit("/", 1)[1] for f in first["files"]] == [f"train-{i:05d}-of-00003.parquet" for i in range(3)]
    log = commit_shards(storage, 3, 2)  # the next generation: -of-00005

    real_iter_batches = ray.data.Dataset.iter_batches

    def killed_at_the_first_written_file(self, *args, **kwargs):
        for batch in real_iter_batches(self, *args, **kwargs):
            raise Killed("driver killed: a file of the new generation is written, others are not")
            yield batch

    monkeypatch.setattr(ray.data.Dataset, "iter_batches", killed_at_the_first_written_file)
    with pytest.raises(Killed):
        compact_dataset(storage, log, file_mb=0)
    monkeypatch.undo()
    assert_one_generation(storage, keys(range(3)))  # never -of-00003 beside -of-00005

    second = compact_dataset(storage, CommitLog(storage), file_mb=0)
    assert len(second["files"]) == 5
    assert_one_generation(storage, keys(range(5)))


def test_a_task_killed_mid_file_on_local_disk_leaves_nothing_a_reader_takes(bucket, tmp_path, monkeypatch):  # noqa: F811
    """A compaction task's process dies half way through its file (a reclaimed node), and the
    driver dies with it: the staging file it leaves is read by no directory reader. The next
    compaction deletes it, and a task death inside it is retried by Ray without its staging file
    reaching the published generation."""
    datasets = pytest.importorskip("datasets")
    storage = Storage(str(tmp_path / "out"))
    commit_shards(storage, 0, 3)
    compact_dataset(storage, CommitLog(storage), file_mb=1)
    log = commit_shards(storage, 3, 3)

    dies = tmp_path / "die-once"
    dies.write_text("")
    monkeypatch.setattr(dataset, "_write_file", functools.partial(_write_file_dying_once_mid_file, flag=str(dies)))
    real_iter_batches = ray.data.Dataset.iter_batches

    def killed_when_the_retried_file_is_written(self, *args, **kwargs):
        for batch in real_iter_batches(self, *args, **kwargs):
            raise Killed("driver killed")
            yield batch

    with mock.patch.object(ray.data.Dataset, "iter_batches", killed_when_the_retried_file_is_written):
        with pytest.raises(Killed):
            compact_dataset(storage, log, file_mb=1)
    assert not dies.exists()  # the task's process did die mid-file
    assert_one_generation(storage, keys(range(3)))
    assert _all_files(storage) - _visible_files(storage)  # its staging file is there, hidden

    dies.write_text("")
    manifest = compact_dataset(storage, CommitLog(storage), file_mb=1)  # its task dies once, and is retried
    monkeypatch.undo()
    assert not dies.exists()
    assert_one_generation(storage, keys(range(6)))
    assert _all_files(storage) == {MANIFEST, CARD, *manifest["files"]}  # no staging file, published or left
    loaded = datasets.load_dataset("parquet", data_dir=storage.path(DATA), split="train",
                                   cache_dir=str(tmp_path / "hf-cache"))
    assert sorted(zip(loaded["unit_id"], loaded["sample_index"])) == keys(range(6))


# ---- faults injected into the compaction task (these run in Ray's worker processes) ---------------


def _write_file_failing_after_its_first_row_group(batch: pa.Table, **kwargs) -> pa.Table:
    real_flush = dataset._flush

    def flush_then_fail(writer, pending):
        real_flush(writer, pending)
        raise RuntimeError("injected: compaction task failed mid-file")

    with mock.patch.object(dataset, "_flush", flush_then_fail), mock.patch.object(dataset, "ROWS_PER_GROUP", 1):
        return REAL_WRITE_FILE(batch, **kwargs)


def _write_file_dying_once_mid_file(batch: pa.Table, flag: str, **kwargs) -> pa.Table:
    real_flush = dataset._flush

    def flush_then_die(writer, pending):
        rows = real_flush(writer, pending)
        if _take(flag):
            os._exit(1)
        return rows

    with mock.patch.object(dataset, "_flush", flush_then_die), mock.patch.object(dataset, "ROWS_PER_GROUP", 1):
        return REAL_WRITE_FILE(batch, **kwargs)


def _take(flag: str) -> bool:
    try:
        os.remove(flag)
        return True
    except FileNotFoundError:
        return False


# ---- helpers -----------------------------------------------------------------------------------


def _sample(unit: str, index: int) -> Sample:
    return Sample(instruction=f"instruction {unit} {index}", response="r",
                  analysis={"original_strengths": [], "improvement_opportunities": [], "relevant_feedback": []},
                  implementation_strategy={"planned_changes": [], "rationale": ""}, improved_response="r2",
                  unit_id=unit, reference_id="ref", aspect="subject_areas", round=0, sample_index=index, model="m",
                  prompt_tokens=1, completion_tokens=1)


def _keys(table: pa.Table) -> list[tuple[str, int]]:
    return list(zip(table.column("unit_id").to_pylist(), table.column("sample_index").to_pylist()))


def _all_files(storage: Storage) -> set[str]:
    """Every file under dataset/, hidden ones included, relative to the output."""
    root = storage.path("")
    return {f[len(root):].lstrip("/") for f in storage.fs.find(storage.path("dataset"))}


def _visible_files(storage: Storage) -> set[str]:
    """The data files a directory reader of dataset/data takes: no part of the path hidden ("." or "_")."""
    return {f for f in _all_files(storage)
            if f.startswith(f"{DATA}/") and not any(p.startswith((".", "_")) for p in f.split("/")[2:])}
