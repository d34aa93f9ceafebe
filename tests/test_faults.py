"""Faults inside a run: a dying engine actor, a kill mid-write, a prompt the engine refuses."""

import shutil

import pyarrow as pa
import pytest

from refed_ray.errors import UserError
from refed_ray.pipeline import run
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
    report = run(make_config(tmp_path, seeds, num_samples=48, engine=engine, workers={"num_engines": 1, "units_per_batch": 2}))
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
    config = make_config(tmp_path, seeds, num_samples=18, engine=engine, workers={"num_engines": 1, "units_per_batch": 2})
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
    assert sorted(storage.list("data")) == storage.committed_files("data")
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
    with pytest.raises(UserError, match=r"different model \(model: 'gemma-3-270m \(embedded default\)' there, 'another-teacher' now\)"):
        run(make_config(tmp_path, seeds, num_samples=6, engine=other))
    reseeded = write_jsonl(tmp_path / "seeds.jsonl", pairs(3))
    with pytest.raises(UserError, match="different references"):
        run(make_config(tmp_path, reseeded, num_samples=6))


def test_resume_with_changed_prompts_is_refused(tmp_path, monkeypatch):
    from refed_ray import prompts

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
    config = make_config(tmp_path, seeds, num_samples=12, workers={"num_engines": 1, "units_per_batch": 1})
    run(config)
    storage = Storage(config.output)
    markers = storage.list("_markers/feedback")
    assert len(markers) == 4  # one reference per batch
    # As if the driver died before the last feedback shard and everything after it was committed.
    lost = markers[-1]
    for name in [lost, *storage.list("_markers/synthesis")]:
        storage.delete(name)
    kept = {name: storage.fs.info(storage.path(name))["mtime"] for name in markers[:-1]}

    again = run(config)
    assert storage.list("_markers/feedback") == markers
    assert {name: storage.fs.info(storage.path(name))["mtime"] for name in markers[:-1]} == kept
    assert again["feedback_rows"] == 4 and again["units"]["this_run"] == 4
    assert unit_samples(storage) == planned_samples(storage, 3)
