import pyarrow as pa

from refed_ray.storage import Storage, shard_name


def test_commit_names_shards_by_ids_and_overwrites_on_retry(tmp_path):
    storage = Storage(str(tmp_path / "out"))
    table = pa.table({"unit_id": ["b", "a"], "x": [1, 2]})
    first = storage.commit_shard("synthesis", ["b", "a"], {"data": table, "rejects": table.slice(0, 0)}, {"n": 1})
    again = storage.commit_shard("synthesis", ["a", "b"], {"data": table, "rejects": table.slice(0, 0)}, {"n": 1})
    assert first.shard == again.shard == shard_name("synthesis", ["a", "b"])
    assert first.files == [f"data/{first.shard}.parquet"]  # empty tables write no file
    assert storage.list("data") == first.files
    assert [m.ids for m in storage.markers("synthesis")] == [["a", "b"]]


def test_only_committed_files_are_read_and_orphans_are_removed(tmp_path):
    storage = Storage(str(tmp_path / "out"))
    table = pa.table({"unit_id": ["a"]})
    storage.commit_shard("synthesis", ["a"], {"data": table}, {})
    storage.write_table("data/synthesis-orphan.parquet", pa.table({"unit_id": ["b"]}))  # killed before its marker
    assert [t.to_pylist() for t in storage.iter_committed_tables("data")] == [[{"unit_id": "a"}]]
    assert storage.remove_orphans(["data"]) == ["data/synthesis-orphan.parquet"]
    assert len(storage.list("data")) == 1


def test_writes_leave_no_temporary_files(tmp_path):
    storage = Storage(str(tmp_path / "out"))
    storage.write_json("report.json", {"a": 1})
    assert storage.read_json("report.json") == {"a": 1}
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["report.json"]
