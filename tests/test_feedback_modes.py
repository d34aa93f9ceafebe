"""Feedback modes (config feedback.mode, refed_ray/method/refiners.py): reference (the method), sample (the
paper's sample-level baseline) and none (no refinement), each with its exact calls."""

import asyncio
from collections import Counter

import pytest

from refed_ray.config import RunConfig
from refed_ray.errors import UserError
from refed_ray.method.synthesis import synthesize_unit
from refed_ray.records.models import Feedback, Sample
from refed_ray.records.plan import make_unit
from refed_ray.run.pipeline import run
from refed_ray.storage import Storage
from refed_ray.watch.estimate import plan_run
from tests.conftest import FAKE_ENGINE, committed_tables, pairs, write_jsonl
from tests.fake_engine import FakeEngine

# Two references, N=12, K=3: 4 units (both aspects of each reference), 12 samples, no top-up.
REFERENCES, UNITS, SAMPLES = 2, 4, 12

# Teacher calls by reply schema, per mode: the feedback pass asks InstructionAnalysis (and, in mode
# reference, ResponseAnalysis) once per reference; mode sample asks ResponseAnalysis once per sample.
EXPECTED_CALLS = {
    "reference": {"InstructionAnalysis": REFERENCES, "ResponseAnalysis": REFERENCES, "InstructionList": UNITS,
                  "SynthesizedResponse": SAMPLES, "Refinement": SAMPLES},
    "sample": {"InstructionAnalysis": REFERENCES, "ResponseAnalysis": SAMPLES, "InstructionList": UNITS,
               "SynthesizedResponse": SAMPLES, "Refinement": SAMPLES},
    "none": {"InstructionAnalysis": REFERENCES, "InstructionList": UNITS, "SynthesizedResponse": SAMPLES},
}
EXPECTED_FEEDBACK_CALLS = {"reference": 2 * REFERENCES, "sample": REFERENCES + SAMPLES, "none": REFERENCES}


def config_for(tmp_path, mode: str, **overrides) -> RunConfig:
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(REFERENCES))
    fields = {
        "seeds": str(seeds),
        "output": str(tmp_path / "out"),
        "num_samples": SAMPLES,
        "instructions_per_aspect": 3,
        "engine": {**FAKE_ENGINE, "engine_kwargs": {"calls_log": str(tmp_path / "calls.log")}},
        "workers": {"num_engines": 1, "units_per_shard": 2},
        "feedback": {"mode": mode},
    }
    return RunConfig.model_validate(fields | overrides)


def calls_by_schema(tmp_path) -> Counter:
    return Counter(line.split(" ", 1)[1].strip() for line in (tmp_path / "calls.log").read_text().splitlines())


def committed(storage: Storage, folder: str, model):
    return [model(**row) for table in committed_tables(storage, folder) for row in table.to_pylist()]


@pytest.mark.usefixtures("local_ray")
@pytest.mark.parametrize("mode", ["reference", "sample", "none"])
def test_each_mode_makes_exactly_its_calls_end_to_end(tmp_path, mode):
    config = config_for(tmp_path, mode)
    planned = plan_run(config)  # `refed-ray plan`, before the run: its counts are the run's
    report = run(config)
    storage = Storage(config.output)
    samples = committed(storage, "data", Sample)
    feedback = committed(storage, "feedback", Feedback)

    assert report["samples"] == report["delivered"] == SAMPLES and report["rejects"]["samples_lost"] == 0
    assert calls_by_schema(tmp_path) == EXPECTED_CALLS[mode]
    assert report["feedback_calls"] == EXPECTED_FEEDBACK_CALLS[mode]
    assert report["feedback_mode"] == mode and storage.read_json("run.json")["fingerprint"]["feedback_mode"] == mode
    stages = report["stages"]
    assert stages["feedback"]["calls"] == EXPECTED_FEEDBACK_CALLS[mode] - stages.get("sample_feedback", {}).get("calls", 0)
    assert stages["refinement"]["calls"] == (0 if mode == "none" else SAMPLES)
    assert all(stage["retries"] == 0 for stage in stages.values())
    assert {stage: n for stage, n in planned["calls"].items() if n and stage != "total"} == {
        stage: s["calls"] for stage, s in stages.items() if s["calls"]}
    assert len(feedback) == REFERENCES and all(f.subject_areas for f in feedback)
    assert all(bool(f.response_feedback) == (mode == "reference") for f in feedback)
    if mode == "none":
        assert all(s.improved_response == s.response and not s.analysis.relevant_feedback
                   and s.implementation_strategy.rationale == "" for s in samples)
    else:
        assert all(s.improved_response != s.response and s.analysis.relevant_feedback for s in samples)
        assert (stages.get("sample_feedback", {}).get("rows_out", 0)) == (SAMPLES if mode == "sample" else 0)

    other = "none" if mode != "none" else "reference"
    with pytest.raises(UserError, match=rf"different .*feedback_mode.*feedback_mode: '{mode}' there, '{other}' now.*--force-new"):
        run(config_for(tmp_path, other))


def test_a_resume_of_an_output_from_before_the_modes_counts_it_as_mode_reference():
    from refed_ray.run.output import check_resume

    config = RunConfig()
    before_modes = {k: v for k, v in config.fingerprint("p", "r").items() if k not in ("feedback_mode", "instructions_from")}
    check_resume(Storage("memory://before-modes"), {"config": {"num_samples": 100}, "fingerprint": before_modes},
                 config.fingerprint("p", "r"), 100)
    sample = RunConfig(feedback={"mode": "sample"}).fingerprint("p", "r")
    with pytest.raises(UserError, match="different feedback_mode"):
        check_resume(Storage("memory://before-modes"), {"config": {"num_samples": 100}, "fingerprint": before_modes},
                     sample, 100)


# ---- one unit's chain, no Ray ------------------------------------------------------------------

FEEDBACK = Feedback(reference_id="ref", instruction="REF-INSTR", reference_response="REF-RESP",
                    subject_areas="SUBJECTS", relevant_skills="SKILLS", response_feedback="REFERENCE-FEEDBACK")


class Recording(FakeEngine):
    def __init__(self, config):
        super().__init__(config)
        self.calls: list[tuple[str, str]] = []  # (schema title, prompt)

    async def complete(self, request):
        self.calls.append((request.json_schema.get("title", ""), request.messages[-1]["content"]))
        return await super().complete(request)


def one_unit(mode: str, **engine_kwargs):
    config = RunConfig.model_validate({"engine": {**FAKE_ENGINE, "engine_kwargs": engine_kwargs},
                                       "instructions_per_aspect": 3, "feedback": {"mode": mode}})
    engine = Recording(config.engine)
    feedback = FEEDBACK if mode == "reference" else FEEDBACK.model_copy(update={"response_feedback": ""})
    result = asyncio.run(synthesize_unit(engine, make_unit(0, 0, "ref", "subject_areas"), feedback, config))
    return engine, result


def test_mode_sample_refines_each_response_with_its_own_feedback_without_the_reference_framing():
    engine, result = one_unit("sample")
    assert len(result.samples) == 3 and not result.rejects
    assert [title for title, _ in engine.calls].count("ResponseAnalysis") == 3
    for sample in result.samples:
        (asked,) = [p for t, p in engine.calls if t == "ResponseAnalysis" and sample.response in p]
        assert sample.instruction in asked and "REF-RESP" not in asked  # the new pair, not the reference
        (refined,) = [p for t, p in engine.calls if t == "Refinement" and sample.response in p]
        assert "similar but different" not in refined and "REFERENCE-FEEDBACK" not in refined
        assert "written for this very instruction and response" in refined
    assert result.stats["sample_feedback"].calls == result.stats["refinement"].calls == 3


def test_mode_reference_refines_with_the_reference_feedback_and_its_framing():
    engine, result = one_unit("reference")
    refinements = [p for t, p in engine.calls if t == "Refinement"]
    assert len(refinements) == 3 and all("REFERENCE-FEEDBACK" in p and "similar but different" in p for p in refinements)
    assert "ResponseAnalysis" not in {t for t, _ in engine.calls} and "sample_feedback" not in result.stats


def test_mode_none_asks_no_refinement():
    engine, result = one_unit("none")
    assert [t for t, _ in engine.calls] == ["InstructionList"] + ["SynthesizedResponse"] * 3
    assert all(s.improved_response == s.response for s in result.samples) and len(result.samples) == 3


def test_a_failed_sample_feedback_rejects_the_sample_at_that_stage_before_any_refinement():
    engine, result = one_unit("sample", invalid_rate={"ResponseAnalysis": 1.0})
    assert not result.samples and [r.stage for r in result.rejects] == ["sample_feedback"] * 3
    assert all(r.lost_samples == 1 and "(after 3 attempts)" in r.reason for r in result.rejects)
    stats = result.stats["sample_feedback"]
    assert (stats.rows_in, stats.rejected, stats.calls) == (3, 3, 9)
    assert "Refinement" not in {t for t, _ in engine.calls} and result.stats["refinement"].rows_in == 0


def test_each_mode_fingerprints_only_its_own_prompts(monkeypatch):
    from refed_ray.method import prompts
    from refed_ray.method.refiners import refiner_for

    assert "refinement_sample" in refiner_for("sample").prompts and "refinement" not in refiner_for("sample").prompts
    before = {mode: prompts.prompts_digest(refiner_for(mode).prompts) for mode in ("reference", "sample", "none")}
    assert before["reference"] == prompts.prompts_digest()  # runs of before the modes resume
    assert len(set(before.values())) == 3
    original = prompts.template
    monkeypatch.setattr(prompts, "template", lambda step: original(step) if step != "refinement_sample"
                        else type(original(step))(original(step).template + "!"))
    after = {mode: prompts.prompts_digest(refiner_for(mode).prompts) for mode in before}
    assert after["sample"] != before["sample"] and after["reference"] == before["reference"]


def test_the_sample_refinement_prompt_follows_the_prompt_rules():
    from refed_ray.method import prompts

    (message,) = prompts.render("refinement_sample", instruction="NEW", response="ANSWER", response_feedback="FB")
    content = message["content"]
    assert "$" not in content and content.index("FB") < content.index("NEW") < content.index("ANSWER")
    for step in ("Analyse the original response", "highest impact", "keep what is effective", '"original_strengths"',
                 '"improvement_opportunities"', '"relevant_feedback"', '"planned_changes"', '"rationale"',
                 '"improved_response"'):
        assert step in content
    with pytest.raises(KeyError, match="response_feedback"):
        prompts.render("refinement_sample", instruction="NEW", response="ANSWER")
