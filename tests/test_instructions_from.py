"""``--instructions-from OUTPUT_A``: run B refines again A's instructions and original responses, unit by
unit, with its own feedback mode; a B whose plan would not be A's is refused before Ray starts."""

from collections import Counter

import pytest

from refed_ray.config import RunConfig
from refed_ray.errors import UserError
from refed_ray.records.plan import read_plan
from refed_ray.run.instructions_from import LOST_IN_A
from refed_ray.run.pipeline import preflight, run
from refed_ray.storage import Storage
from tests.conftest import FAKE_ENGINE, committed_tables, pairs, run_cli, write_jsonl

K, N = 3, 12


def config_for(tmp_path, name: str, seeds, **overrides) -> RunConfig:
    fields = {
        "seeds": str(seeds),
        "output": str(tmp_path / name),
        "num_samples": N,
        "instructions_per_aspect": K,
        "engine": {**FAKE_ENGINE, "engine_kwargs": {"calls_log": str(tmp_path / f"{name}.calls")}},
        "workers": {"num_engines": 1, "units_per_shard": 2},
    }
    return RunConfig.model_validate(fields | overrides)


def rows(output, folder: str) -> list[dict]:
    return [row for table in committed_tables(Storage(str(output)), folder) for row in table.to_pylist()]


def calls(tmp_path, name: str) -> Counter:
    return Counter(line.split(" ", 1)[1].strip() for line in (tmp_path / f"{name}.calls").read_text().splitlines())


@pytest.mark.usefixtures("local_ray")
def test_b_refines_exactly_a_s_instructions_and_responses_and_makes_no_synthesis_call(tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(2))
    # A loses about a third of its samples at refinement, so it tops up: its plan outgrows N/K units.
    a_engine = {**FAKE_ENGINE, "engine_kwargs": {"calls_log": str(tmp_path / "a.calls"),
                                                 "invalid_rate": {"Refinement": 0.3}}}
    a_report = run(config_for(tmp_path, "a", seeds, engine=a_engine))
    a_samples = {(r["unit_id"], r["sample_index"]): (r["instruction"], r["response"]) for r in rows(tmp_path / "a", "data")}
    assert a_report["plan"]["units"] > N // K and 0 < len(a_samples) < a_report["plan"]["planned_samples"]

    b_report = run(config_for(tmp_path, "b", seeds, feedback={"mode": "sample"}, instructions_from=str(tmp_path / "a")))
    b_rows = rows(tmp_path / "b", "data")
    b_samples = {(r["unit_id"], r["sample_index"]): (r["instruction"], r["response"]) for r in b_rows}

    assert b_samples == a_samples  # every sample A kept, with A's instruction and original response
    assert all(r["improved_response"] != r["response"] for r in b_rows)
    # No instruction or response call: one instruction-feedback call per reference, then the sample mode's two.
    assert calls(tmp_path, "b") == {"InstructionAnalysis": 2, "ResponseAnalysis": len(a_samples),
                                    "Refinement": len(a_samples)}
    assert b_report["feedback_calls"] == 2 + len(a_samples)
    # B's plan is A's plan, top-up units included, and B planned no more.
    assert read_plan(Storage(str(tmp_path / "b"))).equals(read_plan(Storage(str(tmp_path / "a"))))
    assert b_report["plan"]["units"] == a_report["plan"]["units"] and b_report["units"]["committed"] == a_report["plan"]["units"]
    # What A lost is lost in B, with A's stage and reason, and every planned sample is accounted for.
    lost = [r for r in rows(tmp_path / "b", "rejects") if r["reason"].startswith(LOST_IN_A)]
    assert {(r["unit_id"], r["sample_index"]) for r in lost} == {
        (r["unit_id"], r["sample_index"]) for r in rows(tmp_path / "a", "rejects")}
    assert {r["stage"] for r in lost} == {"refinement"} and all(r["lost_samples"] == 1 for r in lost)
    assert b_report["all_planned_samples_accounted"]
    a_run_id = Storage(str(tmp_path / "a")).read_json("run.json")["run_id"]
    fingerprint = Storage(str(tmp_path / "b")).read_json("run.json")["fingerprint"]
    assert fingerprint["instructions_from"] == f"{tmp_path / 'a'} (run {a_run_id})"

    # B in mode none from the same A: no call but the feedback pass's, the final response is A's response.
    none_report = run(config_for(tmp_path, "c", seeds, feedback={"mode": "none"}, instructions_from=str(tmp_path / "a")))
    assert calls(tmp_path, "c") == {"InstructionAnalysis": 2} and none_report["samples"] == len(a_samples)
    assert all(r["improved_response"] == a_samples[(r["unit_id"], r["sample_index"])][1] for r in rows(tmp_path / "c", "data"))

    # A resume of B without --instructions-from (or from another run) is refused like any other change.
    with pytest.raises(UserError, match=r"different .*instructions_from"):
        preflight(config_for(tmp_path, "b", seeds, feedback={"mode": "sample"}))

    # A plan that would not be A's is refused before Ray starts, naming what differs.
    other_seeds = write_jsonl(tmp_path / "other.jsonl", pairs(2, prefix="other"))
    with pytest.raises(UserError, match=r"--instructions-from .*a: this run's plan would not be that run's.*references "
                                         r"\(the reference set's digest: pass A's --seeds\): '\w+' there, '\w+' here"):
        preflight(config_for(tmp_path, "d", other_seeds, instructions_from=str(tmp_path / "a")))
    with pytest.raises(UserError, match=r"seed: 0 there, 1 here; instructions_per_aspect \(K\): 3 there, 2 here"):
        preflight(config_for(tmp_path, "d", seeds, seed=1, instructions_per_aspect=2, instructions_from=str(tmp_path / "a")))
    assert not (tmp_path / "d").exists() or not any((tmp_path / "d").iterdir())


def test_the_cli_refuses_an_earlier_run_that_is_missing_or_unfinished(tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(2))
    done = run_cli("run", "--seeds", str(seeds), "--output", str(tmp_path / "b"), "--feedback-mode", "none",
                   "--instructions-from", str(tmp_path / "nowhere"), timeout=120)
    assert done.returncode == 2 and f"--instructions-from {tmp_path}/nowhere holds no refed-ray run" in done.stderr

    # An A whose plan is written but none of whose shards committed (stopped before synthesis).
    from refed_ray.data.seeds import read_seeds
    from refed_ray.records.plan import write_plan
    from refed_ray.run.output import run_fingerprint, start_output

    a = config_for(tmp_path, "a", seeds)
    storage = Storage(a.output)
    start_output(storage, a, run_fingerprint(a, read_seeds(a.seeds, 0)), force_new=False)
    write_plan(storage, [r.reference_id for r in read_seeds(a.seeds, 0).references], N, K, 0, 2)
    with pytest.raises(UserError, match=r"2 of its 2 planned shards are not committed: finish that run first"):
        preflight(config_for(tmp_path, "b", seeds, instructions_from=a.output))


def test_a_short_run_reusing_instructions_names_its_source_not_a_top_up_budget(tmp_path):
    """A run with instructions_from makes no top-up round: its shortfall advice must not be to
    raise max_extra_units, which cannot help it."""
    from refed_ray.run.pipeline import _shortfall

    config = RunConfig(num_samples=8, instructions_per_aspect=4, instructions_from=str(tmp_path / "a"))
    report = {"delivered": 7, "rejected_samples": 1, "samples": 7, "plan": {"planned_samples": 8},
              "units": {"committed": 2}}
    message = _shortfall(config, report, planned_units=2, totals={})["message"]
    assert "delivered 7 of 8" in message and str(tmp_path / "a") in message
    assert "max_extra_units" not in message and "--force-new" in message
