import os

import numpy as np
import pytest
from fsspec.implementations.local import LocalFileSystem

from refed_ray.records import plan as plan_module
from refed_ray.records.plan import (
    iter_units,
    make_unit,
    pending_shards,
    read_plan,
    references_reached,
    top_up_units,
    units_needed,
    write_plan,
)
from refed_ray.storage import Storage
from tests.conftest import pairs, write_jsonl

REFS = [f"ref-{i}" for i in range(5)]


class Killed(BaseException):
    """A kill: not an Exception, so nothing on the way up handles it."""


def kill_writes_into(folder: str, monkeypatch) -> None:
    """The process dies half way through its next staged write into ``folder`` on a local disk."""
    real_pipe_file = LocalFileSystem.pipe_file

    def dying_pipe_file(self, path, value, *args, **kwargs):
        if f"/{folder}/" in path:
            real_pipe_file(self, path, value[: len(value) // 2], *args, **kwargs)
            raise Killed(f"killed while writing {path}")
        return real_pipe_file(self, path, value, *args, **kwargs)

    monkeypatch.setattr(LocalFileSystem, "pipe_file", dying_pipe_file)


def test_units_are_deterministic_and_distinct():
    assert make_unit(7, 0, "ref-1", "subject_areas") == make_unit(7, 0, "ref-1", "subject_areas")
    ids = {make_unit(7, r, ref, a).unit_id for r in range(3) for ref in REFS for a in ("subject_areas", "relevant_skills")}
    assert len(ids) == 30
    assert make_unit(8, 0, "ref-1", "subject_areas").unit_id != make_unit(7, 0, "ref-1", "subject_areas").unit_id


def test_num_samples_decides_rounds_and_both_aspects_go_together():
    units = list(iter_units(REFS, num_samples=125, k=5, run_seed=0))
    assert len(units) == units_needed(125, 5) == 25
    rounds = [u.round for u in units]
    assert rounds.count(0) == rounds.count(1) == 10 and rounds.count(2) == 5
    assert len({(u.round, u.reference_id, u.aspect) for u in units}) == 25
    # Both aspects of a reference side by side, as the authors run them.
    assert all(a.reference_id == b.reference_id for a, b in zip(units[0:20:2], units[1:20:2]))
    # Each round visits the references in its own seeded order.
    assert [u.reference_id for u in units[:10:2]] != [u.reference_id for u in units[10:20:2]]


def test_more_samples_extends_the_plan_without_changing_it():
    small = [u.unit_id for u in iter_units(REFS, 30, 4, 0)]
    large = [u.unit_id for u in iter_units(REFS, 90, 4, 0)]
    assert large[: len(small)] == small


def test_plan_is_reproducible_and_only_appended_to(tmp_path, monkeypatch):
    monkeypatch.setattr("refed_ray.records.plan.ROWS_PER_PLAN_FILE", 7)
    storage = Storage(str(tmp_path / "out"))
    first = write_plan(storage, REFS, 100, 4, 3, units_per_shard=3)
    rows = read_plan(storage).to_pylist()
    assert first.units == 25 and first.rounds == 3 and first.shards == 9
    assert [len(read_plan(storage, [f])) for f in first.files] == [9, 9, 7]  # whole shards per part
    again = write_plan(storage, REFS, 100, 4, 3, units_per_shard=3)
    assert read_plan(storage).to_pylist() == rows and again.files == first.files

    grown = write_plan(storage, REFS, 140, 4, 3, units_per_shard=3)
    grown_rows = read_plan(storage).to_pylist()
    assert grown_rows[: len(rows)] == rows  # old shards as they were (the last one stays short)
    assert grown.units == 35 and grown.shards == 9 + 4
    assert len({r["shard"] for r in grown_rows[len(rows):]} & {r["shard"] for r in rows}) == 0

    fresh = write_plan(storage, REFS, 8, 4, 3, units_per_shard=3, keep_existing=False)
    assert storage.list("plan") == fresh.files == ["plan/part-00000.parquet"] and fresh.units == 2


def test_a_write_killed_mid_part_leaves_a_staging_file_no_reader_takes(tmp_path, monkeypatch):
    storage = Storage(str(tmp_path / "out"))
    write_plan(storage, REFS, 20, 4, 3, units_per_shard=2)
    rows = read_plan(storage).to_pylist()
    kill_writes_into("plan", monkeypatch)
    with pytest.raises(Killed):
        write_plan(storage, REFS, 40, 4, 3, units_per_shard=2)  # a grown plan's next part
    monkeypatch.undo()
    assert len(os.listdir(tmp_path / "out" / "plan")) == 2  # the part, and the killed write's half file
    assert read_plan(storage).to_pylist() == rows

    grown = write_plan(storage, REFS, 40, 4, 3, units_per_shard=2)
    assert grown.units == 10 and read_plan(storage).to_pylist()[: len(rows)] == rows
    assert sorted(os.listdir(tmp_path / "out" / "plan")) == ["part-00000.parquet", "part-00001.parquet"]


@pytest.mark.usefixtures("local_ray")
def test_a_resume_completes_after_a_run_killed_writing_its_plan(tmp_path, monkeypatch):
    from refed_ray.run.pipeline import run
    from tests.test_pipeline import make_config

    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(4))
    config = make_config(tmp_path, seeds, num_samples=12)
    run(config)
    grown = config.model_copy(update={"num_samples": 24})
    kill_writes_into("plan", monkeypatch)
    with pytest.raises(Killed):
        run(grown)
    monkeypatch.undo()
    report = run(grown)
    assert report["samples"] == 24 and report["units"]["resumed"] == 4 and report["plan"]["units"] == 8


def test_pending_shards_are_one_small_table_each(tmp_path):
    storage = Storage(str(tmp_path / "out"))
    write_plan(storage, REFS, 100, 4, 3, units_per_shard=4)
    plan = read_plan(storage)
    shards = pending_shards(plan, committed=set())
    assert [t.num_rows for t in shards] == [4] * 6 + [1]
    assert all(len(set(t.column("shard").to_pylist())) == 1 for t in shards)
    done = {shards[0].column("shard")[0].as_py(), shards[3].column("shard")[0].as_py()}
    assert len(pending_shards(plan, done)) == 5
    assert shards[0].nbytes < plan.nbytes  # a copy, not a slice carrying the whole plan


def test_a_plan_ends_in_small_shards_and_a_large_plan_in_a_bounded_number_of_them(tmp_path, monkeypatch):
    storage = Storage(str(tmp_path / "out"))
    write_plan(storage, REFS, 2400, 3, 7, units_per_shard=16)  # 800 units: a tenth is 80, 10 shards of 8
    assert plan_module.TAIL_SHARD_UNITS == 8
    assert [t.num_rows for t in pending_shards(read_plan(storage), set())] == [16] * 45 + [8] * 10
    monkeypatch.setattr(plan_module, "TAIL_MAX_SHARDS", 5)  # what a 10M plan meets at 1,000
    write_plan(storage, REFS, 2400, 3, 7, units_per_shard=16, keep_existing=False)
    assert [t.num_rows for t in pending_shards(read_plan(storage), set())] == [16] * 47 + [8] + [8] * 5
    # Shards of the tail's size or smaller: no tail (the demo's 4 units a shard).
    write_plan(storage, REFS, 2400, 3, 7, units_per_shard=8, keep_existing=False)
    assert [t.num_rows for t in pending_shards(read_plan(storage), set())] == [8] * 100


def test_references_reached_are_those_the_first_units_visit():
    refs = [f"ref-{i}" for i in range(50)]
    for units in (1, 7, 60, 100, 250):
        expected = {u.reference_id for u in iter_units(refs, num_samples=units * 3, k=3, run_seed=4)}
        assert references_reached(refs, 4, units) == expected
    assert len(references_reached(refs, 4, 7)) == 4 and len(references_reached(refs, 4, 250)) == 50


def test_a_top_up_round_rarely_falls_short():
    """Sized with a margin over the yield so far, one top-up round delivers what is missing in
    nearly every draw of the same yield; sized for the mean alone it would fail about half the time."""
    k, done, accepted = 10, 100, 800  # a yield of 0.8 per sample
    short = 200
    units = top_up_units(short, accepted, done, k, budget=1_000)
    assert units == 27  # 25 for the mean, 2 more for the margin
    draws = np.random.default_rng(0).binomial(units * k, accepted / (done * k), size=10_000)
    assert (draws < short).mean() < 0.03
    mean_only = np.random.default_rng(0).binomial(25 * k, 0.8, size=10_000)
    assert (mean_only < short).mean() > 0.4
    # Bounded by the budget, and nothing when nothing is short, the budget is spent or nothing was kept.
    assert top_up_units(short, accepted, done, k, budget=5) == 5
    assert top_up_units(0, accepted, done, k, 100) == top_up_units(short, accepted, done, k, 0) == 0
    assert top_up_units(short, 0, done, k, 100) == 0
