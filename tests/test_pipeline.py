"""The whole pipeline on a local Ray cluster with the fake teacher (tests/fake_engine.py)."""

import json

import pytest

from refed_ray.config import RunConfig
from refed_ray.data.export import export
from refed_ray.errors import UserError
from refed_ray.records.models import Feedback, Reject, Sample, WorkUnit
from refed_ray.records.plan import read_plan
from refed_ray.run.pipeline import run
from refed_ray.storage import Storage
from tests.conftest import FAKE_ENGINE, committed_tables, pairs, write_jsonl

pytestmark = pytest.mark.usefixtures("local_ray")


def make_config(tmp_path, seeds, **overrides) -> RunConfig:
    fields = {
        "seeds": str(seeds),
        "output": str(tmp_path / "out"),
        "num_samples": 24,
        "instructions_per_aspect": 3,
        "engine": FAKE_ENGINE,
        "workers": {"num_engines": 2, "units_per_shard": 2},
    }
    fields.update(overrides)
    return RunConfig.model_validate(fields)


def rows(storage: Storage, folder: str) -> list[dict]:
    return [row for table in committed_tables(storage, folder) for row in table.to_pylist()]


def test_run_writes_every_output_and_the_report_adds_up(tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [*pairs(5), {"conversations": ["a", "b", "c", "d"]}])
    report = run(make_config(tmp_path, seeds))
    storage = Storage(str(tmp_path / "out"))

    plan = [WorkUnit(**r) for r in read_plan(storage).drop_columns(["shard"]).to_pylist()]
    feedback = [Feedback(**r) for r in rows(storage, "feedback")]
    samples = [Sample(**r) for r in rows(storage, "data")]
    rejects = [Reject(**r) for r in rows(storage, "rejects")]

    assert len(plan) == 8 and report["plan"]["planned_samples"] == 24
    used = {u.reference_id for u in plan}
    assert len(used) == 4  # 8 units, both aspects of each reference
    # Feedback also covers what the top-up budget (4 units) can reach: here the fifth reference.
    assert {f.reference_id for f in feedback} > used and len(feedback) == 5
    assert report["feedback_rows"] == 5 and report["feedback_calls"] == 10
    assert len(samples) == report["samples"] == 24
    assert sorted((s.unit_id, s.sample_index) for s in samples) == sorted((u.unit_id, i) for u in plan for i in range(3))
    assert [r.source for r in rejects] == ["seeds.jsonl:6"]  # the multi-turn row, counted
    assert report["references"] == {"usable": 5, "skipped": 1, "used": len(used), "feedback_retried": 0}
    assert report["all_planned_samples_accounted"] and report["units"]["committed"] == 8
    assert report["stages"]["refinement"]["rows_out"] == 24
    assert json.loads((tmp_path / "out" / "report.json").read_text())["samples"] == 24
    assert all(s.model == "fake-teacher" and s.completion_tokens > 0 for s in samples)
    # Each committed shard's attempt records went with its commit (records/commits.py, Attempt.forget).
    assert not storage.list("_attempts/feedback") and not storage.list("_attempts/synthesis")


def test_invalid_outputs_are_retried_then_rejected_with_their_reason(tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [*pairs(4), {"instruction": "BROKEN please", "response": "x"}])
    engine = {**FAKE_ENGINE, "engine_kwargs": {"invalid_marker": "BROKEN", "invalid_rate": {"Refinement": 0.3}}}
    report = run(make_config(tmp_path, seeds, num_samples=60, engine=engine, max_extra_units=0))
    storage = Storage(str(tmp_path / "out"))
    rejects = [Reject(**r) for r in rows(storage, "rejects")]
    samples = rows(storage, "data")

    (failed_reference,) = [r for r in rejects if r.stage == "feedback" and not r.unit_id]
    assert "output does not validate" in failed_reference.reason and failed_reference.lost_samples == 0
    assert failed_reference.source == "seeds.jsonl:5"
    units_without_feedback = [r for r in rejects if r.stage == "feedback" and r.unit_id]
    assert units_without_feedback and all(r.lost_samples == 3 for r in units_without_feedback)
    assert {r.reference_id for r in units_without_feedback} == {failed_reference.reference_id}
    assert report["units"]["rejected"] == len(units_without_feedback)
    refinement = [r for r in rejects if r.stage == "refinement"]
    assert refinement and all("(after 3 attempts)" in r.reason and r.lost_samples == 1 for r in refinement)
    assert len(samples) + sum(r.lost_samples for r in rejects) == 60
    assert report["samples"] == len(samples) and report["all_planned_samples_accounted"]
    assert report["stages"]["refinement"]["retries"] == 2 * len(refinement)


def test_rerun_resumes_and_refuses_an_incompatible_config(tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(4))
    first = run(make_config(tmp_path, seeds, num_samples=12))
    again = run(make_config(tmp_path, seeds, num_samples=24))
    storage = Storage(str(tmp_path / "out"))
    samples = rows(storage, "data")
    assert first["units"]["this_run"] == 4
    assert again["units"] == {"planned": 8, "committed": 8, "resumed": 4, "this_run": 4, "retried": 0, "rejected": 0}
    assert len(samples) == 24 == len({(s["unit_id"], s["sample_index"]) for s in samples})

    with pytest.raises(UserError, match=r"different sampling .*--force-new"):
        run(make_config(tmp_path, seeds, num_samples=24, sampling={"temperature": 0.1}))
    fresh = run(make_config(tmp_path, seeds, num_samples=6, sampling={"temperature": 0.1}), force_new=True)
    assert fresh["units"] == {"planned": 2, "committed": 2, "resumed": 0, "this_run": 2, "retried": 0, "rejected": 0}


def test_export_formats(tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(2))
    run(make_config(tmp_path, seeds, num_samples=6))
    out = str(tmp_path / "out")
    target, count = export(out, "refed-json")
    refed = json.loads(open(target).read())
    assert count == len(refed) == 6
    assert set(refed[0]) == {"instruction", "response", "analysis", "implementation_strategy", "improved_response"}
    assert set(refed[0]["analysis"]) == {"original_strengths", "improvement_opportunities", "relevant_feedback"}
    _, _ = export(out, "sharegpt", str(tmp_path / "sg.jsonl"))
    first = json.loads(open(tmp_path / "sg.jsonl").readline())
    assert [t["from"] for t in first["conversations"]] == ["human", "gpt"]
    assert first["conversations"][1]["value"] == refed[0]["improved_response"]
    export(out, "jsonl", str(tmp_path / "plain.jsonl"))
    assert json.loads(open(tmp_path / "plain.jsonl").readline()) == {
        "instruction": refed[0]["instruction"], "response": refed[0]["improved_response"]}


def test_rejects_are_topped_up_to_exactly_n(tmp_path):
    """A teacher that rejects about 20% of samples: more units are planned, and the dataset holds N."""
    import pyarrow.parquet as pq

    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(40))
    calls = tmp_path / "calls.log"
    engine = {**FAKE_ENGINE, "engine_kwargs": {"invalid_rate": {"Refinement": 0.2}, "calls_log": str(calls)}}
    config = make_config(tmp_path, seeds, num_samples=60, engine=engine)
    report = run(config)
    assert report["rejected_samples"] > 0 and report["plan"]["extra_units"] > 0
    # 20 units reach 10 references, the top-up budget of 10 units 5 more. Their feedback came in the
    # run's first engine pass, before any synthesis call: no top-up round asked for feedback.
    lines = [line.split() for line in calls.read_text().splitlines()]
    last_feedback = max(i for i, (_, title) in enumerate(lines) if title.endswith("Analysis"))
    first_synthesis = min(i for i, (_, title) in enumerate(lines) if not title.endswith("Analysis"))
    assert report["feedback_rows"] == 15 and last_feedback < first_synthesis
    assert report["references"]["used"] > 10
    assert report["samples"] >= 60 and report["delivered"] == 60
    assert report["all_planned_samples_accounted"]
    assert sum(pq.read_metadata(tmp_path / "out" / f).num_rows for f in report["dataset"]["files"]) == 60
    again = run(config)  # a resume of a delivered run plans nothing more
    assert again["plan"]["units"] == report["plan"]["units"] and again["delivered"] == 60


def test_one_pool_of_engines_collects_the_feedback_then_synthesizes_each_loaded_once(tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(6))
    calls, loads = tmp_path / "calls.log", tmp_path / "loads.log"
    engine = {**FAKE_ENGINE, "engine_kwargs": {"calls_log": str(calls), "loads_log": str(loads)}}
    # 2 shards in flight an actor: with every shard in flight on one actor (64 unset), the first
    # engine ready could take all of them and the second serve nothing (seen once in CI).
    report = run(make_config(tmp_path, seeds, num_samples=36, engine=engine,
                             workers={"num_engines": 2, "units_per_shard": 2, "shards_in_flight": 2}))
    served: dict[str, set[str]] = {}
    order = []
    for line in calls.read_text().splitlines():
        pid, title = line.split()
        kind = "feedback" if title.endswith("Analysis") else "synthesis"
        served.setdefault(kind, set()).add(pid)
        order.append(kind)
    assert report["samples"] == 36 and report["feedback_rows"] == 6
    # Two engines, each loaded once, served both: no pool of its own for the feedback.
    assert len(loads.read_text().splitlines()) == 2
    assert served["feedback"] <= served["synthesis"] and len(served["synthesis"]) == 2
    # Every feedback call came before the first synthesis call: synthesis waits for the broadcast.
    assert order.index("synthesis") > max(i for i, kind in enumerate(order) if kind == "feedback")
