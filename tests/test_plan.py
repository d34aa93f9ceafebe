from refed_ray.plan import iter_units, make_unit, units_needed, write_plan
from refed_ray.storage import Storage

REFS = [f"ref-{i}" for i in range(5)]


def test_units_are_deterministic_and_distinct():
    assert make_unit(7, 0, "ref-1", "subject_areas") == make_unit(7, 0, "ref-1", "subject_areas")
    ids = {make_unit(7, r, ref, a).unit_id for r in range(3) for ref in REFS for a in ("subject_areas", "relevant_skills")}
    assert len(ids) == 30
    assert make_unit(8, 0, "ref-1", "subject_areas").unit_id != make_unit(7, 0, "ref-1", "subject_areas").unit_id


def test_num_samples_decides_rounds_and_partial_round():
    units = list(iter_units(REFS, num_samples=125, k=5, run_seed=0))
    assert len(units) == units_needed(125, 5) == 25
    rounds = [u.round for u in units]
    assert rounds.count(0) == rounds.count(1) == 10 and rounds.count(2) == 5
    assert len({(u.round, u.reference_id, u.aspect) for u in units}) == 25


def test_more_samples_extends_the_plan_without_changing_it():
    small = [u.unit_id for u in iter_units(REFS, 30, 4, 0)]
    large = [u.unit_id for u in iter_units(REFS, 90, 4, 0)]
    assert set(small) <= set(large)


def test_write_plan_is_reproducible(tmp_path, monkeypatch):
    monkeypatch.setattr("refed_ray.plan.ROWS_PER_PLAN_FILE", 7)
    storage = Storage(str(tmp_path / "out"))
    first = write_plan(storage, REFS, 100, 4, 3)
    rows = [storage.read_table(f).to_pylist() for f in first.files]
    again = write_plan(storage, REFS, 100, 4, 3)
    assert [storage.read_table(f).to_pylist() for f in again.files] == rows
    assert first.units == 25 and first.rounds == 3 and len(first.files) == 4
    assert sum(len(r) for r in rows) == 25
    smaller = write_plan(storage, REFS, 8, 4, 3)
    assert storage.list("plan") == smaller.files == ["plan/part-00000.parquet"]
    assert len(smaller.references_used) <= 2
