"""The commit protocol (commits.py) on a local OUTPUT: no Ray needed."""

import os

import pyarrow as pa
import pytest

from refed_ray.records.commits import CommitLog, commit_shard, find_commit, indexed_shards, retract, shard_name
from refed_ray.records.stats import ShardStats
from refed_ray.storage import Storage


def commit(storage, ids, rows=1, pass_name="synthesis"):
    table = pa.table({"unit_id": [ids[0]] * rows, "x": list(range(rows))})
    return commit_shard(storage, pass_name, shard_name(pass_name, ids), ids, {"data": table, "rejects": table.slice(0, 0)},
                        ShardStats(samples=rows))


def test_each_attempt_writes_its_own_files_and_readers_take_one(tmp_path):
    storage = Storage(str(tmp_path / "out"))
    first, again = commit(storage, ["b", "a"]), commit(storage, ["a", "b"], rows=2)
    assert first.shard == again.shard == shard_name("synthesis", ["a", "b"])
    assert first.files != again.files and first.files == [f"data/{first.shard}.{first.token}.parquet"]  # empty tables: no file
    log = CommitLog(storage)
    (chosen,) = log.commits["synthesis"].values()
    assert chosen.token == min(first.token, again.token)  # one attempt, never a mix of the two
    assert log.files("data") == chosen.files
    assert len(log.stray_markers) == 1
    assert find_commit(storage, "synthesis", first.shard, "") is not None


def test_a_marker_whose_files_are_gone_is_not_a_commit_and_never_hides_one(tmp_path):
    storage = Storage(str(tmp_path / "out"))
    good = commit(storage, ["a"])
    zombie = commit(storage, ["a"])  # a stopped run's late attempt at the same shard...
    storage.delete(zombie.files[0])  # ...whose files a rerun's clean-up deleted
    assert [c.token for c in CommitLog(storage).commits["synthesis"].values()] == [good.token]
    storage.delete(good.files[0])
    assert CommitLog(storage).commits["synthesis"] == {}  # nothing valid left: the shard is redone
    assert find_commit(storage, "synthesis", good.shard, "") is None


def test_index_absorbs_markers_and_leftovers_are_removed(tmp_path):
    storage = Storage(str(tmp_path / "out"))
    commits = [commit(storage, [f"u{i}"]) for i in range(5)]
    storage.write_table("data/synthesis-orphan.x.parquet", pa.table({"unit_id": ["b"]}))  # killed before its marker
    storage.write_bytes("_markers/synthesis/half.json.tmp-1", b"{")  # a local write killed midway
    log = CommitLog(storage)
    log.write_index("synthesis")
    assert storage.list("_markers/synthesis") == ["_markers/synthesis/half.json.tmp-1"]
    assert sorted(log.remove_leftovers()) == ["_markers/synthesis/half.json.tmp-1", "data/synthesis-orphan.x.parquet"]
    again = CommitLog(storage)
    assert {c.shard for c in again.commits["synthesis"].values()} == {c.shard for c in commits}
    assert again.stats("synthesis").samples == 5
    assert len(storage.list("data")) == 5


def test_the_index_grows_in_parts_that_merge_and_a_retract_rewrites_it_whole(tmp_path):
    """Each write adds the new commits as a part (never the whole index again); parts merge like
    a binary counter, so a pass keeps a few objects; every reader sees every commit."""
    storage = Storage(str(tmp_path / "out"))
    log = CommitLog(storage)
    written = []
    for batch in range(7):  # 7 writes of 3 commits: 21 = 12 + 6 + 3, in three objects
        for i in range(3):
            written.append(commit(storage, [f"u{batch}-{i}"]))
            log.add(written[-1])
        log.write_index("synthesis")
        assert storage.list("_markers/synthesis") == []  # every marker absorbed
    objects = ["_index/synthesis.parquet"] * storage.exists("_index/synthesis.parquet") + storage.list("_index/synthesis")
    assert [storage.read_table(o).num_rows for o in objects] == [12, 6, 3]
    again = CommitLog(storage)
    assert {s: c.token for s, c in again.commits["synthesis"].items()} == {c.shard: c.token for c in written}
    assert indexed_shards(storage, "synthesis") == {c.shard for c in written}
    retract(storage, again, "synthesis", written[:2])  # a commit taken out: one object again, without it
    assert storage.list("_index/synthesis") == [] and storage.read_table("_index/synthesis.parquet").num_rows == 19
    assert set(CommitLog(storage).commits["synthesis"]) == {c.shard for c in written[2:]}


def test_an_index_object_a_killed_merge_left_behind_is_read_once(tmp_path):
    storage = Storage(str(tmp_path / "out"))
    log = CommitLog(storage)
    for i in range(2):
        log.add(commit(storage, [f"u{i}"]))
        log.write_index("synthesis")  # the second write merges into the base
    storage.write_bytes("_index/synthesis/part-000001.parquet", storage.read_bytes("_index/synthesis.parquet"))
    again = CommitLog(storage)
    assert len(again.commits["synthesis"]) == 2
    again.add(commit(storage, ["u2"]))
    again.add(commit(storage, ["u3"]))
    again.add(commit(storage, ["u4"]))
    again.write_index("synthesis")
    assert sorted(storage.read_table("_index/synthesis.parquet")["shard"].to_pylist()) == sorted(again.commits["synthesis"])


def test_writes_leave_no_temporary_files(tmp_path):
    storage = Storage(str(tmp_path / "out"))
    storage.write_json("report.json", {"a": 1})
    assert storage.read_json("report.json") == {"a": 1}
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["report.json"]


def test_staging_files_of_killed_writes_are_hidden_never_read_and_cleaned_up(tmp_path, monkeypatch):
    """A local write killed half way leaves its staging file: a hidden name (directory readers
    skip it), which no commit names, and which the commit log's clean-up deletes."""
    from tests.test_plan import Killed, kill_writes_into

    storage = Storage(str(tmp_path / "out"))
    good = commit(storage, ["a"])
    for folder, ids in (("data", ["b"]), ("_markers/synthesis", ["c"])):
        kill_writes_into(folder, monkeypatch)
        with pytest.raises(Killed):
            commit(storage, ids)
        monkeypatch.undo()
    out = tmp_path / "out"
    staged = [f"{folder}/{n}" for folder in ("data", "_markers/synthesis") for n in os.listdir(out / folder) if ".tmp-" in n]
    assert len(staged) == 2 and all(name.split("/")[-1].startswith(".") for name in staged)

    log = CommitLog(storage)
    assert [c.token for c in log.commits["synthesis"].values()] == [good.token]
    assert set(staged) <= set(log.remove_leftovers())
    assert sorted(os.listdir(out / "data")) == [good.files[0].split("/")[1]]
    assert os.listdir(out / "_markers" / "synthesis") == [good.marker.split("/")[-1]]
