"""Attempts and the run's identity: stops are not deaths, --force-new survives a kill, and a
discarded run's late commits are ignored."""

import json
import shutil

import pyarrow as pa
import pytest

from refed_ray.data.dataset import dataset_files
from refed_ray.errors import RunStopped, UserError
from refed_ray.records.commits import CommitLog, commit_shard, find_commit, shard_name, start_attempt
from refed_ray.records.stats import ShardStats
from refed_ray.run.output import KNOWN, RUN_FILE, check_output, start_output
from refed_ray.run.pipeline import run
from refed_ray.storage import Storage
from tests.conftest import FAKE_ENGINE, pairs, write_jsonl
from tests.test_faults import planned_samples, unit_samples
from tests.test_pipeline import make_config, rows

ONE_ROW = pa.table({"unit_id": ["a"]})

# ---- the attempt records (no Ray) ----------------------------------------------------------


def test_only_attempts_left_without_an_end_in_this_submission_are_deaths(tmp_path):
    storage = Storage(str(tmp_path / "out"))
    shard = shard_name("synthesis", ["a"])
    killed_with_its_driver = start_attempt(storage, "synthesis", shard, "sub-1")  # never ended
    assert (killed_with_its_driver.number, killed_with_its_driver.deaths) == (1, 0)
    stopped = start_attempt(storage, "synthesis", shard, "sub-2")
    stopped.end_cleanly()  # an outage stop, a cancelled task: the process lived on
    first = start_attempt(storage, "synthesis", shard, "sub-2")
    # Earlier starts count for the report (the shard's work started thrice), but neither the
    # other submission's attempt nor the stopped one is a death.
    assert (first.number, first.deaths) == (3, 0)
    died = start_attempt(storage, "synthesis", shard, "sub-2")  # `first` never ended: its engine died
    assert (died.number, died.deaths) == (4, 1)
    again = start_attempt(storage, "synthesis", shard, "sub-2")
    assert (again.number, again.deaths) == (5, 2)
    # Another shard's records are its own.
    assert start_attempt(storage, "synthesis", shard_name("synthesis", ["b"]), "sub-2").deaths == 0


def test_leftover_attempt_records_are_removed_once_their_shard_is_committed(tmp_path):
    storage = Storage(str(tmp_path / "out"))
    done, pending = shard_name("synthesis", ["a"]), shard_name("synthesis", ["b"])
    for shard in (done, pending):
        start_attempt(storage, "synthesis", shard, "sub-1")
    commit_shard(storage, "synthesis", done, ["a"], {"data": ONE_ROW}, ShardStats(samples=1))
    CommitLog(storage).remove_leftovers()
    assert [name.split("/")[-1].split(".")[0] for name in storage.list("_attempts/synthesis")] == [pending]
    assert start_attempt(storage, "synthesis", pending, "sub-1").number == 2


def test_a_committed_attempt_forgets_the_shards_records_and_no_other(tmp_path):
    """The records go once the shard commits, so the folder every shard's history lists holds
    the shards in flight, not the whole run's (O(shards^2) at 10M samples)."""
    storage = Storage(str(tmp_path / "out"))
    shard, other = shard_name("synthesis", ["a"]), shard_name("synthesis", ["b"])
    start_attempt(storage, "synthesis", shard, "sub-1").end_cleanly()  # an earlier stop
    start_attempt(storage, "synthesis", other, "sub-1")
    last = start_attempt(storage, "synthesis", shard, "sub-1")
    assert last.number == 2 and len(last.earlier) == 2
    commit_shard(storage, "synthesis", shard, ["a"], {"data": ONE_ROW}, ShardStats(samples=1), last.number)
    last.forget()
    assert [name.split("/")[-1].split(".")[0] for name in storage.list("_attempts/synthesis")] == [other]


def test_a_commit_of_another_run_is_not_found_nor_read(tmp_path):
    storage = Storage(str(tmp_path / "out"))
    storage.write_json(RUN_FILE, {"run_id": "current"})
    shard = shard_name("synthesis", ["a"])
    zombie = commit_shard(storage, "synthesis", shard, ["a"], {"data": ONE_ROW}, ShardStats(samples=1),
                          run_id="discarded")
    assert find_commit(storage, "synthesis", shard, "current") is None
    assert find_commit(storage, "synthesis", shard, "discarded") == zombie
    log = CommitLog(storage)
    assert log.commits["synthesis"] == {} and log.stray_markers == [zombie.marker]
    assert sorted(log.remove_leftovers()) == sorted([*zombie.files, zombie.marker])
    mine = commit_shard(storage, "synthesis", shard, ["a"], {"data": ONE_ROW}, ShardStats(samples=1))
    assert mine.run_id == "current"  # a driver-side commit takes the run that owns OUTPUT
    assert list(CommitLog(storage).commits["synthesis"].values()) == [mine]


# ---- whole runs ----------------------------------------------------------------------------


@pytest.mark.usefixtures("local_ray")
def test_outage_stops_are_not_engine_deaths_and_the_healed_run_delivers_everything(tmp_path):
    """Two stops past outage_patience_s with max_shard_attempts 2; before, the third run
    abandoned every shard as 'its engine died on each of 2 attempts' and delivered nothing."""
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(3))
    outage = tmp_path / "outage"
    engine = {**FAKE_ENGINE, "engine_kwargs": {"outage_file": str(outage)}}
    config = make_config(tmp_path, seeds, num_samples=18, engine=engine,
                         workers={"num_engines": 1, "units_per_shard": 2, "outage_patience_s": 1,
                                  "max_shard_attempts": 2})
    storage = Storage(config.output)
    for _ in range(2):
        outage.write_text("")
        with pytest.raises(RunStopped, match="injected outage"):
            run(config)
        # The attempt that met the outage ended cleanly: its process lived on.
        assert any(name.endswith(".stopped") for name in storage.list("_attempts/feedback"))
    outage.unlink()
    report = run(config)
    assert not [r for r in rows(storage, "rejects") if "abandoned" in r["reason"]]
    assert report["samples"] == report["delivered"] == 18 and report["rejected_samples"] == 0
    assert report["all_planned_samples_accounted"]
    assert unit_samples(storage) == planned_samples(storage, 3)
    # The report still tells that the feedback work of stopped runs was done again.
    assert report["references"]["feedback_retried"] >= 1


@pytest.mark.usefixtures("local_ray")
def test_a_commit_of_a_discarded_run_is_ignored_and_removed(tmp_path):
    """A zombie actor of the run that --force-new discarded commits a shard of the new plan
    (same seed, K, references and shard size give the same shard names) before the new run
    commits it: the resume ignores it, redoes the shard and deletes the zombie's files."""
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(3))
    config = make_config(tmp_path, seeds, num_samples=18, workers={"num_engines": 1, "units_per_shard": 2})
    run(config)
    storage = Storage(config.output)
    log = CommitLog(storage)
    lost = sorted(log.commits["synthesis"].values(), key=lambda c: c.shard)[0]
    del log.commits["synthesis"][lost.shard]  # as if the run stopped before this shard committed
    log.write_index("synthesis")
    # What the zombie writes: its data file, then its marker, as a run of another identity.
    real = pa.concat_tables(storage.read_table(f) for f in lost.files if f.startswith("data/"))
    forged = real.set_column(real.schema.get_field_index("instruction"), "instruction",
                             pa.array(["ZOMBIE of the discarded run"] * real.num_rows))
    zombie_file = f"data/{lost.shard}.zombie000000.parquet"
    storage.write_table(zombie_file, forged)
    marker = {**json.loads(lost.model_dump_json()), "token": "zombie000000", "files": [zombie_file],
              "run_id": "a-discarded-run"}
    storage.write_bytes(f"_markers/synthesis/{lost.shard}.zombie000000.json", json.dumps(marker).encode())

    again = run(config)
    assert again["units"]["this_run"] == len(lost.ids)  # the shard was redone, not adopted
    assert again["samples"] == again["delivered"] == 18 and again["all_planned_samples_accounted"]
    assert unit_samples(storage) == planned_samples(storage, 3)
    dataset = [r for f in dataset_files(storage) for r in storage.read_table(f).to_pylist()]
    assert len(dataset) == 18 and not [r for r in dataset if r["instruction"].startswith("ZOMBIE")]
    assert not storage.exists(zombie_file)
    assert not storage.exists(f"_markers/synthesis/{lost.shard}.zombie000000.json")


# ---- --force-new killed in the middle -------------------------------------------------------


class Killed(BaseException):
    """The process ends here: nothing after this point runs (not an Exception: no handler catches it)."""


def die_at_write_or_delete(monkeypatch, number: int) -> None:
    """The ``number``-th write or delete (counting from 1) kills the process before it happens."""
    done = {"count": 0}

    def counted(real):
        def operation(self, *args, **kwargs):
            done["count"] += 1
            if done["count"] == number:
                raise Killed
            return real(self, *args, **kwargs)
        return operation

    for name in ("write_bytes", "delete", "delete_many"):
        monkeypatch.setattr(Storage, name, counted(getattr(Storage, name)))


@pytest.mark.usefixtures("local_ray")
def test_force_new_killed_at_any_point_is_completed_by_the_same_command(tmp_path, monkeypatch):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(2))
    old = make_config(tmp_path, seeds, num_samples=6, workers={"num_engines": 1})
    run(old)
    finished = tmp_path / "finished"
    shutil.copytree(old.output, finished)
    new_config = make_config(tmp_path, seeds, num_samples=6, seed=7, workers={"num_engines": 1})
    fingerprint = new_config.fingerprint("prompts", "references")
    old_run_id = Storage(old.output).read_json(RUN_FILE)["run_id"]

    kill_point, completed = 1, False
    while not completed:
        output = tmp_path / f"killed-{kill_point}"
        shutil.copytree(finished, output)
        storage = Storage(str(output))
        with monkeypatch.context() as patch:
            die_at_write_or_delete(patch, kill_point)
            try:
                start_output(storage, new_config, fingerprint, force_new=True)
                completed = True
            except Killed:
                pass
        if not completed:
            # The plain command and readers (export) refuse a half-discarded output, naming the fix...
            if kill_point > 1:
                with pytest.raises(UserError, match="interrupted.*--force-new"):
                    check_output(storage, new_config, fingerprint, force_new=False)
                with pytest.raises(UserError, match="interrupted.*--force-new"):
                    CommitLog(storage)
            # ...and the same command completes the discard.
            assert check_output(storage, new_config, fingerprint, force_new=True) is False
            start_output(storage, new_config, fingerprint, force_new=True)
        assert [p.name for p in output.iterdir()] == [RUN_FILE]
        now = storage.read_json(RUN_FILE)
        assert now["fingerprint"] == fingerprint and "discarding" not in now and now["run_id"] != old_run_id
        kill_point += 1
    assert kill_point > 5  # the flag, the folders, the new run.json: each was a kill point


@pytest.mark.usefixtures("local_ray")
def test_force_new_killed_mid_clear_then_rerun_completes_the_run(tmp_path, monkeypatch):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(2))
    run(make_config(tmp_path, seeds, num_samples=6, workers={"num_engines": 1}))
    other = make_config(tmp_path, seeds, num_samples=12, seed=7, workers={"num_engines": 1})
    real_delete = Storage.delete
    deleted: list[str] = []

    def delete_one_folder_then_die(self, relative):
        if relative in KNOWN:  # not the write probe of the run's start
            if deleted:
                raise Killed
            deleted.append(relative)
        real_delete(self, relative)

    with monkeypatch.context() as patch:
        patch.setattr(Storage, "delete", delete_one_folder_then_die)
        with pytest.raises(Killed):
            run(other, force_new=True)
    assert len(deleted) == 1
    with pytest.raises(UserError, match=r"--force-new .* was interrupted"):
        run(other)
    report = run(other, force_new=True)
    assert report["samples"] == report["delivered"] == 12 and report["all_planned_samples_accounted"]
    assert not report["this_run"]["resumed"]
