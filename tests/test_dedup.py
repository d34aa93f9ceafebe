"""Near-duplicate instructions: the measure, the distributed pass at a size with several blocks,
and a run that meets injected exact and near duplicates, is killed in the dedup pass, and resumes."""

from __future__ import annotations

import itertools
import json
import random

import pyarrow.parquet as pq
import pytest

from refed_ray.config import DedupConfig
from refed_ray.data.dataset import dataset_files
from refed_ray.data.export import export
from refed_ray.data.filters import dedup
from refed_ray.method.similarity import jaccard, lsh_bands, near_duplicates_within, signatures
from refed_ray.records import commits
from refed_ray.records.commits import CommitLog
from refed_ray.records.models import Sample, to_table
from refed_ray.records.stats import ShardStats
from refed_ray.run import pipeline
from refed_ray.run.pipeline import run
from refed_ray.storage import Storage
from tests.conftest import FAKE_ENGINE, pairs, write_jsonl
from tests.fake_engine import VOCABULARY
from tests.test_pipeline import make_config, rows


class Killed(BaseException):
    """A kill: not an Exception, so nothing on the way up handles it."""


@pytest.fixture(autouse=True, scope="module")
def _ray(local_ray):
    yield


def test_measure_minhash_and_bands_agree_with_the_stated_jaccard():
    rng = random.Random(1)
    base = [rng.choice(VOCABULARY) for _ in range(40)]
    variants = [base, base[:-1] + ["other"], base[:20] + [rng.choice(VOCABULARY) for _ in range(20)],
                [rng.choice(VOCABULARY) for _ in range(40)]]
    texts = [" ".join(v) for v in variants]
    signature = signatures(texts, 3, 128)
    for i in range(1, 4):
        exact = jaccard(texts[0], texts[i], 3)
        estimate = (signature[0] == signature[i]).mean()
        assert abs(exact - estimate) < 0.15, (i, exact, estimate)
    assert jaccard("Explain, please: TCP!", "explain please tcp", 3) == 1.0  # case and punctuation
    bands, rows_ = lsh_bands(0.7, 128)
    assert bands * rows_ <= 128 and 1 - (1 - 0.7**rows_) ** bands >= 0.99
    found = near_duplicates_within([texts[1], texts[3], texts[0]], [("the reference", texts[0])], 3, 0.7)
    assert found == [(0, "the reference"), (2, "the reference")]


def test_distributed_pass_finds_every_injected_duplicate_across_blocks_and_partitions(tmp_path, monkeypatch):
    """3,000 samples in 30 shards, 3 signature blocks, several bucket partitions: every injected
    exact or near duplicate is dropped, the earliest copy kept, nothing else dropped."""
    storage = Storage(str(tmp_path / "out"))
    rng = random.Random(7)
    originals = [[rng.choice(VOCABULARY) for _ in range(30)] for _ in range(2_800)]
    texts = [" ".join(words) for words in originals]
    texts += [texts[i] for i in range(0, 200, 2)]  # 100 exact copies
    texts += [" ".join(originals[i][:-1] + ["changed"]) for i in range(1, 200, 2)]  # 100 near (J ~ 0.93)
    log = CommitLog(storage)
    for shard in range(30):
        units = [f"u{shard:02d}-{i}" for i in range(10)]
        samples = [_sample(texts[shard * 100 + j], units[j // 10], j % 10) for j in range(100)]
        tables = {"data": to_table(samples, Sample)}
        log.add(commits.commit_shard(storage, "synthesis", f"synthesis-{shard:02d}", units, tables,
                                     ShardStats.of(tables, {})))
    monkeypatch.setattr(dedup, "BAND_ROWS_PER_PARTITION", 10_000)  # 3,000 x 17 band rows: 5 partitions
    commit = dedup.deduplicate(storage, log, DedupConfig(rows_per_task=1000))

    dropped = dedup.dropped_keys(storage, log, DedupConfig(rows_per_task=1000)).to_pylist()
    assert commit.stats.lost_samples == len(dropped) == 200
    position = {(s["unit_id"], s["sample_index"]): i for i, s in enumerate(_all_samples(storage, log))}
    assert {position[(d["unit_id"], d["sample_index"])] for d in dropped} == set(range(2_800, 3_000))
    # A resume reuses the commit; another setting recomputes and replaces it.
    assert dedup.deduplicate(storage, CommitLog(storage), DedupConfig(rows_per_task=1000)).token == commit.token
    again = dedup.deduplicate(storage, CommitLog(storage), DedupConfig(rows_per_task=1000, threshold=0.99))
    assert again.stats.lost_samples == 100  # only the exact copies reach 0.99
    assert list(CommitLog(storage).commits["dedup"]) == [again.shard]


def test_run_drops_counts_and_records_duplicates_and_a_kill_in_dedup_resumes_exactly(tmp_path, monkeypatch):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(3))
    engine = {**FAKE_ENGINE, "engine_kwargs": {"repeat_instructions": True}}
    config = make_config(tmp_path, seeds, num_samples=24, instructions_per_aspect=4, engine=engine)
    storage = Storage(config.output)

    # Killed after the dedup pass computed, before its commit: nothing of it counts.
    real_commit = commits.commit_shard

    def dying_commit(storage_, pass_name, *args, **kwargs):
        if pass_name == "dedup":
            raise Killed("driver killed in the dedup pass")
        return real_commit(storage_, pass_name, *args, **kwargs)

    monkeypatch.setattr(dedup.commits, "commit_shard", dying_commit)
    with pytest.raises(Killed):
        run(config)
    monkeypatch.setattr(dedup.commits, "commit_shard", real_commit)
    assert not CommitLog(storage).commits["dedup"]

    report = run(config)
    # Every (reference, aspect) has K-1 = 3 distinct instructions; every other one is a duplicate:
    # the unit's last repeats its first (caught before its response), and later rounds repeat round 0.
    units = report["units"]["committed"]
    delivered = [r for table in _dataset(storage) for r in table.to_pylist()]
    assert report["delivered"] == len(delivered) == 3 * 2 * 3
    assert report["deduplicated"]["in_unit"] == units
    assert report["deduplicated"]["across_units"] == units * 3 - 18
    assert report["deduplicated"]["near_duplicate_rate"] == round((units * 4 - 18) / (units * 4), 4)
    dedup_rejects = [r for r in rows(storage, "rejects") if r["stage"] == "dedup"]
    assert len(dedup_rejects) == report["deduplicated"]["total"]
    assert all(r["lost_samples"] == 1 and "near-duplicate" in r["reason"] for r in dedup_rejects)
    assert not {(r["unit_id"], r["sample_index"]) for r in dedup_rejects} & {
        (r["unit_id"], r["sample_index"]) for r in delivered}
    assert report["all_planned_samples_accounted"]
    for a, b in itertools.combinations([r["instruction"] for r in delivered], 2):
        assert jaccard(a, b, 3) < 0.7
    assert report["quality"]["sampled_rows"] == 18 and 0 < report["quality"]["distinct_2"] <= 1

    # A resume reuses the dedup commit and counts the same.
    token = next(iter(CommitLog(storage).commits["dedup"].values())).token
    again = run(config)
    assert again["deduplicated"] == report["deduplicated"] and again["delivered"] == 18
    assert next(iter(CommitLog(storage).commits["dedup"].values())).token == token


def _repeating_run(tmp_path, **engine_kwargs):
    """A run whose later rounds repeat round 0's instructions: its round of 6 units keeps 18
    samples of 24, and its top-up (3 units, the budget: reserve shards of its one pass) only
    adds near-duplicates."""
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(3))
    engine = {**FAKE_ENGINE, "engine_kwargs": {"repeat_instructions": True, **engine_kwargs}}
    return make_config(tmp_path, seeds, num_samples=24, instructions_per_aspect=4, engine=engine)


def _killed_once_the_top_up_committed(real, what: str):
    """``real`` (a filter step called with ``(storage, committed, ...)``), killed on its first call
    once the top-up's 3 units are committed: the reserve's settle inside the pass."""
    def dying(storage, committed, *args, **kwargs):
        if len(committed.ids("synthesis")) == 9:
            raise Killed(what)
        return real(storage, committed, *args, **kwargs)

    return dying


def test_the_top_up_runs_inside_the_one_pass_where_dedup_finds_the_shortfall(tmp_path):
    loads = tmp_path / "loads.log"
    config = _repeating_run(tmp_path, loads_log=str(loads))
    report = run(config)
    log = CommitLog(Storage(config.output))
    # The round of 6 units is 18 samples after dedup: the 3 units of the budget ran in the same
    # pass, on the same engines (each loaded once), and only added near-duplicates.
    assert len(log.ids("synthesis")) == 9 and report["delivered"] == 18
    assert report["deduplicated"]["across_units"] == 9
    assert len(loads.read_text().splitlines()) == config.workers.num_engines


def _exported_instructions(config, target) -> list[str]:
    _, count = export(config.output, "jsonl", str(target))
    instructions = [json.loads(line)["instruction"] for line in target.read_text().splitlines()]
    assert count == len(instructions)
    return instructions


def _assert_no_near_duplicates(instructions: list[str]) -> None:
    for a, b in itertools.combinations(instructions, 2):
        assert jaccard(a, b, 3) < 0.7, (a, b)


def test_export_after_a_crash_inside_a_top_up_round_drops_the_top_up_duplicates(tmp_path, monkeypatch):
    config = _repeating_run(tmp_path)
    storage = Storage(config.output)
    # Killed after the top-up's synthesis committed, before its dedup.
    monkeypatch.setattr(pipeline, "deduplicate",
                        _killed_once_the_top_up_committed(dedup.deduplicate, "killed in a top-up"))
    with pytest.raises(Killed):
        run(config)
    monkeypatch.undo()
    log = CommitLog(storage)
    assert len(log.ids("synthesis")) == 9  # the top-up's 3 units are committed...
    (stale,) = log.commits["dedup"].values()  # ...after the one dedup commit, which covers the first 6
    assert stale.shard != dedup.current_name(log, config.dedup)

    instructions = _exported_instructions(config, tmp_path / "export.jsonl")
    assert len(instructions) == 18  # not 24: the top-up's samples are all near-duplicates
    _assert_no_near_duplicates(instructions)

    report = run(config)  # the resume finishes the round, with the dedup export computed
    assert report["delivered"] == 18 and report["deduplicated"]["across_units"] == 9
    assert report["all_planned_samples_accounted"]


def test_with_two_dedup_commits_left_the_current_one_wins(tmp_path, monkeypatch):
    config = _repeating_run(tmp_path)
    storage = Storage(config.output)
    # Killed after the top-up's dedup commit, before the first round's one was deleted.
    monkeypatch.setattr(dedup, "_delete_stale",
                        _killed_once_the_top_up_committed(dedup._delete_stale, "killed in dedup's clean-up"))
    with pytest.raises(Killed):
        run(config)
    monkeypatch.undo()
    log = CommitLog(storage)
    stale, current = log.commits["dedup"].values()  # listed first: the stale one, from the index
    assert dedup.current_commit(log, config.dedup) == current != stale
    assert current.shard == dedup.current_name(log, config.dedup)
    assert len(dedup.dropped_keys(storage, log, config.dedup)) == current.stats.lost_samples == 9

    instructions = _exported_instructions(config, tmp_path / "export.jsonl")
    assert len(instructions) == 18
    _assert_no_near_duplicates(instructions)
    assert [c.shard for c in CommitLog(storage).commits["dedup"].values()] == [current.shard]  # the stale one is gone

    report = run(config)
    assert report["delivered"] == 18 and report["deduplicated"]["across_units"] == 9


def _sample(instruction: str, unit: str, index: int) -> Sample:
    return Sample(instruction=instruction, response="r", analysis={"original_strengths": [], "improvement_opportunities": [],
                  "relevant_feedback": []}, implementation_strategy={"planned_changes": [], "rationale": ""},
                  improved_response="r2", unit_id=unit, reference_id="ref", aspect="subject_areas", round=0,
                  sample_index=index, model="m", prompt_tokens=1, completion_tokens=1)


def _all_samples(storage: Storage, log: CommitLog) -> list[dict]:
    return [row for name in log.files("data") for row in storage.read_table(name).to_pylist()]


def _dataset(storage: Storage):
    for name in dataset_files(storage):
        yield pq.read_table(storage.path(name))


def test_with_every_cpu_held_by_the_engines_the_reserve_closes_on_the_yield_and_the_run_ends(tmp_path, caplog):
    # One engine of 4 CPUs on the 4-CPU test cluster: dedup's tasks could not run inside the pass.
    # (With 2 engines of 2 CPUs the premise was timing: Ray Data's pool holds an actor's CPUs only
    # while it has one, and at times the filters found 2 free and ran inside the pass.)
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(3))
    engine = {**FAKE_ENGINE, "engine_kwargs": {"repeat_instructions": True}, "resources": {"num_cpus": 4}}
    config = make_config(tmp_path, seeds, num_samples=24, instructions_per_aspect=4, engine=engine,
                         workers={"num_engines": 1, "units_per_shard": 2})
    with caplog.at_level("INFO", logger="refed_ray.run.reserve"):
        report = run(config)
    assert "could not run inside the pass" in caplog.text
    # The yield alone (with its margin) took the budget's 3 units into the pass; dedup after it.
    assert report["units"]["committed"] == 9 and report["delivered"] == 18
    assert report["deduplicated"]["across_units"] == 9
