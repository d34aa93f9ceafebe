"""Faults inside a run: a dying engine actor, a kill mid-write, a prompt the engine refuses."""

import re
import shutil

import pyarrow as pa
import pytest

from refed_ray.data.export import export
from refed_ray.errors import RunStopped, UserError
from refed_ray.records.commits import CommitLog, commit_shard
from refed_ray.records.stats import ShardStats
from refed_ray.run.pipeline import run
from refed_ray.storage import Storage
from tests.conftest import FAKE_ENGINE, pairs, write_jsonl
from tests.test_pipeline import make_config, rows

pytestmark = pytest.mark.usefixtures("local_ray")


def unit_samples(storage: Storage) -> list[tuple[str, int]]:
    return sorted((r["unit_id"], r["sample_index"]) for r in rows(storage, "data"))


def planned_samples(storage: Storage, k: int) -> list[tuple[str, int]]:
    units = [r["unit_id"] for f in storage.list("plan") for r in storage.read_table(f).to_pylist()]
    return sorted((u, i) for u in units for i in range(k))


def test_engine_actor_killed_mid_batch_is_restarted_and_loses_nothing(tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(4))
    die_file = tmp_path / "die-once"
    die_file.write_text("")
    engine = {**FAKE_ENGINE, "engine_kwargs": {"die_file": str(die_file), "delay": 0.05}}
    report = run(make_config(tmp_path, seeds, num_samples=48, engine=engine, workers={"num_engines": 1, "units_per_shard": 2}))
    storage = Storage(str(tmp_path / "out"))
    assert not die_file.exists()  # an actor did die
    assert unit_samples(storage) == planned_samples(storage, 3)
    assert report["samples"] == 48 and report["all_planned_samples_accounted"]
    assert report["references"]["feedback_retried"] >= 1  # the death came in the feedback pass


@pytest.mark.parametrize("folder", ["data", "_markers/synthesis"])
def test_kill_mid_write_leaves_nothing_partial_to_read(tmp_path, folder):
    """An actor's process dies half way through writing a shard's data or its marker."""
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(3))
    flag = tmp_path / "die-writing"
    flag.write_text("")
    engine = {**FAKE_ENGINE, "engine_kwargs": {"die_writing": {"file": str(flag), "folder": folder}}}
    config = make_config(tmp_path, seeds, num_samples=18, engine=engine, workers={"num_engines": 1, "units_per_shard": 2})
    report = run(config)
    storage = Storage(config.output)
    assert not flag.exists()  # the write was killed
    assert storage.list(folder) != [n for n in storage.list(folder) if ".tmp-" not in n]  # its half-file is there
    # Ray restarted the actor and retried the batch: every sample once, the half-file never read.
    assert unit_samples(storage) == planned_samples(storage, 3)
    assert report["samples"] == 18 and report["all_planned_samples_accounted"]
    assert report["units"]["retried"] >= 2  # the killed batch of 2 units ran again

    # On object stores a kill leaves no partial object, but maybe a whole shard whose marker
    # never came: no reader sees it either.
    storage.write_table("data/synthesis-orphan.parquet", pa.table({"unit_id": ["x"], "sample_index": [0]}))
    assert unit_samples(storage) == planned_samples(storage, 3)

    again = run(config)  # the rerun resumes everything and removes the leftovers
    assert unit_samples(storage) == planned_samples(storage, 3)
    assert sorted(storage.list("data")) == CommitLog(storage).files("data")
    assert all(name.endswith(".json") for name in storage.list("_markers/synthesis"))
    assert again["units"]["resumed"] == 6 and again["units"]["this_run"] == 0


def test_prompt_longer_than_context_fails_only_its_own_reference(tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [*pairs(3), {"instruction": "HUGE " * 50, "response": "ok"}])
    engine = {**FAKE_ENGINE, "engine_kwargs": {"reject_marker": "HUGE HUGE"}}
    report = run(make_config(tmp_path, seeds, num_samples=24, engine=engine))
    storage = Storage(str(tmp_path / "out"))
    rejected = [r for r in rows(storage, "rejects") if r["stage"] == "feedback" and not r["unit_id"]]
    assert [r["source"] for r in rejected] == ["seeds.jsonl:4"]
    assert "does not fit the context window" in rejected[0]["reason"]
    assert report["feedback_rows"] == report["references"]["used"] - 1
    assert report["all_planned_samples_accounted"]


def test_resume_with_another_model_is_refused_naming_it(tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(2))
    run(make_config(tmp_path, seeds, num_samples=6))
    other = {**FAKE_ENGINE, "model": "another-teacher"}
    with pytest.raises(UserError, match=r"different model \(model: 'tests.fake_engine:FakeEngine \(engine.model unset\)' there, 'another-teacher' now\)"):
        run(make_config(tmp_path, seeds, num_samples=6, engine=other))
    reseeded = write_jsonl(tmp_path / "seeds.jsonl", pairs(3))
    with pytest.raises(UserError, match="different references"):
        run(make_config(tmp_path, reseeded, num_samples=6))


def test_resume_with_changed_prompts_is_refused(tmp_path, monkeypatch):
    from refed_ray.method import prompts

    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(2))
    run(make_config(tmp_path, seeds, num_samples=6))
    edited = tmp_path / "prompts"
    shutil.copytree(prompts.prompts_dir(), edited)
    refinement = edited / "refinement.txt"
    refinement.write_text(refinement.read_text() + "\nBe brief.\n")
    monkeypatch.setattr(prompts, "prompts_dir", lambda: edited)
    prompts.template.cache_clear()
    try:
        with pytest.raises(UserError, match=r"holds a run with a different prompts \(prompts: '\w+' there, '\w+' now\)"):
            run(make_config(tmp_path, seeds, num_samples=6))
    finally:
        monkeypatch.undo()
        prompts.template.cache_clear()


def test_resume_cannot_shrink_the_plan(tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(2))
    run(make_config(tmp_path, seeds, num_samples=12))
    with pytest.raises(UserError, match="planned for 12 samples; a resume can grow the plan, not shrink it"):
        run(make_config(tmp_path, seeds, num_samples=6))


def test_partial_feedback_pass_resumes_only_what_is_missing(tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(4))
    config = make_config(tmp_path, seeds, num_samples=24, workers={"num_engines": 1, "units_per_shard": 1})
    run(config)
    storage = Storage(config.output)
    log = CommitLog(storage)
    feedback = sorted(log.commits["feedback"].values(), key=lambda c: c.shard)
    assert len(feedback) == 4  # one reference per shard
    # As if the driver died before the last feedback shard and everything after it committed.
    lost = feedback[-1]
    del log.commits["feedback"][lost.shard]
    log.commits["synthesis"].clear()
    for pass_name in ("feedback", "synthesis"):
        log.write_index(pass_name)

    again = run(config)
    after = {c.shard: c.token for c in CommitLog(storage).commits["feedback"].values()}
    assert {c.shard: c.token for c in feedback[:-1]}.items() <= after.items()  # survivors untouched
    assert after[lost.shard] != lost.token  # only the lost one was redone
    assert again["feedback_rows"] == 4 and again["units"]["this_run"] == 8
    assert unit_samples(storage) == planned_samples(storage, 3)

def commits_of(storage: Storage, pass_name: str = "synthesis"):
    return list(CommitLog(storage).commits[pass_name].values())


def test_actor_killed_after_some_shards_committed_redoes_only_what_was_in_flight(tmp_path):
    """A plan of many Ray blocks (one per shard); the engine actor dies after 6 shards committed.
    Ray retries what the actor held; no committed shard is generated again."""
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(10))
    flag = tmp_path / "die"
    flag.write_text("")
    out = tmp_path / "out"
    engine = {**FAKE_ENGINE, "engine_kwargs": {"delay": 0.02, "die_after_commits": {
        "file": str(flag), "count": 6, "output": str(out)}}}
    workers = {"num_engines": 1, "units_per_shard": 2, "shards_in_flight": 2}
    report = run(make_config(tmp_path, seeds, num_samples=120, engine=engine, workers=workers))
    storage = Storage(str(out))
    assert not flag.exists()  # the actor died
    assert report["plan"]["shards"] == 20 and report["shards"]["committed"] == 20
    assert unit_samples(storage) == planned_samples(storage, 3)
    # Each attempt writes its own data file: one file per shard means no shard was generated twice.
    assert len(storage.list("data")) == 20
    redone = [c for c in commits_of(storage) if c.attempt > 1]
    assert 1 <= len(redone) <= workers["shards_in_flight"]  # the bound: shards in flight on the dead actor
    assert report["shards"]["redone"] == len(redone) and report["infrastructure"]["shards_redone"] == len(redone)


def test_zombie_writer_neither_loses_nor_duplicates(tmp_path):
    """A stopped run's actor commits late: once after the rerun's clean-up removed its files (a
    marker naming missing files), once with whole files beside the rerun's commit."""
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(3))
    config = make_config(tmp_path, seeds, num_samples=18, workers={"num_engines": 1, "units_per_shard": 2})
    run(config)
    storage = Storage(config.output)
    first, second = commits_of(storage)[:2]
    zombie_rows = pa.table({"unit_id": [first.ids[0]] * 9, "sample_index": list(range(9))})
    late = commit_shard(storage, "synthesis", first.shard, first.ids, {"data": zombie_rows}, ShardStats(samples=9), 2)
    storage.delete(late.files[0])  # its files were cleaned up before its marker landed
    commit_shard(storage, "synthesis", second.shard, second.ids, {"data": zombie_rows}, ShardStats(samples=9), 2)

    assert unit_samples(storage) == planned_samples(storage, 3)  # readers keep one commit per shard
    again = run(config)
    assert again["samples"] == 18 and again["all_planned_samples_accounted"] and again["units"]["this_run"] == 0
    assert unit_samples(storage) == planned_samples(storage, 3)
    _, count = export(config.output, "jsonl", str(tmp_path / "out.jsonl"))
    assert count == 18
    assert sorted(storage.list("data")) == CommitLog(storage).files("data")  # the zombies' files are gone


def test_outage_past_patience_stops_the_run_without_rejects_and_resubmission_completes(tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(3))
    outage = tmp_path / "outage"
    outage.write_text("")
    engine = {**FAKE_ENGINE, "engine_kwargs": {"outage_file": str(outage)}}
    config = make_config(tmp_path, seeds, num_samples=18, engine=engine,
                         workers={"num_engines": 1, "units_per_shard": 2, "outage_patience_s": 1.5})
    with pytest.raises(RunStopped, match=r"unavailable .*injected outage.*submit the same command again"):
        run(config)
    storage = Storage(config.output)
    assert not rows(storage, "rejects")  # an outage is nobody's sample's fault
    outage.unlink()
    report = run(config)
    assert report["samples"] == 18 and report["rejected_samples"] == 0 and report["all_planned_samples_accounted"]
    assert unit_samples(storage) == planned_samples(storage, 3)


def test_outage_shorter_than_patience_is_waited_out(tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(2))
    outage = tmp_path / "outage"
    outage.write_text("")
    engine = {**FAKE_ENGINE, "engine_kwargs": {"outage_file": str(outage), "outage_seconds": 3}}
    report = run(make_config(tmp_path, seeds, num_samples=12, engine=engine,
                             workers={"num_engines": 1, "outage_patience_s": 60}))
    assert report["samples"] == 12 and report["rejected_samples"] == 0
    assert report["infrastructure"]["outage_retries"] > 0


def test_poison_shard_becomes_rejects_after_the_bound_and_the_run_goes_on(tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [*pairs(3), {"instruction": "POISON: explain", "response": "ok"}])
    # Only the instruction step carries the poison: feedback succeeds, every synthesis attempt dies.
    engine = {**FAKE_ENGINE, "engine_kwargs": {"poison_marker": "POISON", "poison_schema": "InstructionList"}}
    config = make_config(tmp_path, seeds, num_samples=24, engine=engine, max_extra_units=0,
                         workers={"num_engines": 1, "units_per_shard": 1, "max_shard_attempts": 2})
    report = run(config)
    storage = Storage(config.output)
    abandoned = [r for r in rows(storage, "rejects") if r["stage"] == "engine"]
    # Exactly the bound: a shard's last attempt runs alone on its actor (run/slots.py), so a
    # shard is abandoned only for its own poison. Its neighbours (every shard of the plan was in
    # flight at once: 1 unit a shard, shards_in_flight unset) died with it once and then committed.
    died = [int(re.search(r"engine died on each of (\d+) attempts", r["reason"]).group(1)) for r in abandoned]
    assert abandoned and all(n == 2 for n in died)
    poisoned = {r["reference_id"] for r in rows(storage, "feedback") if r["instruction"].startswith("POISON")}
    assert {r["reference_id"] for r in abandoned} == poisoned
    assert report["samples"] + report["rejected_samples"] == 24 and report["all_planned_samples_accounted"]
    assert report["samples"] == 24 - 3 * len(abandoned) > 0


def test_hung_engine_is_restarted_and_its_shard_retried(tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(2))
    hang = tmp_path / "hang"
    hang.write_text("")
    engine = {**FAKE_ENGINE, "engine_kwargs": {"hang_file": str(hang)}}
    report = run(make_config(tmp_path, seeds, num_samples=12, engine=engine,
                             workers={"num_engines": 1, "hang_timeout_s": 2}))
    assert not hang.exists()
    assert report["samples"] == 12 and report["all_planned_samples_accounted"]


def test_local_output_on_a_multi_node_cluster_is_refused(tmp_path, monkeypatch):
    import ray

    from refed_ray.run.output import refuse_local_output_on_cluster
    from refed_ray.run.workers import _check_output_visible

    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(2))
    monkeypatch.setattr(ray, "nodes", lambda: [{"Alive": True}, {"Alive": True}, {"Alive": False}])
    with pytest.raises(UserError, match=r"local path, but the Ray cluster has 2 nodes.*object-store URI"):
        run(make_config(tmp_path, seeds, num_samples=6))
    assert not (tmp_path / "out" / "run.json").exists()  # refused before anything was started
    shared = make_config(tmp_path, seeds, num_samples=6, output_shared_filesystem=True)
    refuse_local_output_on_cluster(Storage(shared.output), shared)  # a declared shared mount is fine
    # A node that joins later and cannot see OUTPUT refuses to start its engine.
    with pytest.raises(RuntimeError, match="does not share with the driver"):
        _check_output_visible(Storage(str(tmp_path / "elsewhere")))
