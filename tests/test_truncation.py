"""No reply is accepted cut off: strings at their grammar bound and replies stopped at max_tokens
are retried, then rejected as "truncated"; budgets that cannot hold their reply are refused."""

import asyncio
import json

import pytest
from pydantic import ValidationError

from refed_ray.config import RunConfig, SamplingConfig, load_config
from refed_ray.engines.base import ChatRequest, Completion, Engine
from refed_ray.errors import UserError
from refed_ray.method.structured import ask
from refed_ray.records import models as records
from refed_ray.records.models import Reject, Sample, refinement_model, response_model, string_at_bound
from refed_ray.run.pipeline import run
from refed_ray.storage import Storage
from tests.conftest import ROOT, committed_tables, pairs, write_jsonl


class Scripted(Engine):
    """Answers with the given (text, finish_reason) replies in turn, the last one repeated."""

    model_name = "scripted"

    def __init__(self, *replies):
        self.replies = list(replies)
        self.requests: list[ChatRequest] = []

    async def complete(self, request: ChatRequest) -> Completion:
        self.requests.append(request)
        text, finish = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        return Completion(text=text, prompt_tokens=10, completion_tokens=len(text) // 4, finish_reason=finish)


def asked(engine: Engine, schema, sampling: SamplingConfig | None = None):
    sampling = sampling or SamplingConfig()
    messages = [{"role": "user", "content": "hi"}]
    return asyncio.run(ask(engine, messages, schema, max_tokens=256, sampling=sampling, seed=1))


def test_a_string_at_its_bound_is_retried_then_rejected_as_truncated():
    engine = Scripted((json.dumps({"response": "x" * 40}), "stop"))
    answer = asked(engine, response_model(40))
    assert answer.value is None and answer.calls == 3 and len(engine.requests) == 3
    assert answer.error == "output truncated: response reached its bound of 40 characters (after 3 attempts)"
    assert answer.prompt_tokens == 3 * 10  # every attempt's tokens stay counted


def test_a_retry_that_ends_inside_the_bound_is_accepted():
    engine = Scripted((json.dumps({"response": "x" * 40}), "stop"), (json.dumps({"response": "done."}), "stop"))
    answer = asked(engine, response_model(40))
    assert answer.value.response == "done." and answer.calls == 2 and answer.error == ""
    assert engine.requests[0].seed != engine.requests[1].seed


def test_a_reply_stopped_by_max_tokens_is_truncated():
    answer = asked(Scripted(('{"response": "a long ans', "length")), response_model())
    assert answer.value is None and "truncated at max_tokens=256" in answer.error


def test_bounds_inside_nested_lists_are_found():
    schema = refinement_model(None, 20, 2).model_json_schema()
    reply = {
        "analysis": {"original_strengths": ["ok"], "improvement_opportunities": ["fine", "y" * 20],
                     "relevant_feedback": ["a"]},
        "implementation_strategy": {"planned_changes": ["b"], "rationale": "short"},
        "improved_response": "z" * 5000,  # unbounded: any length is whole
    }
    where = string_at_bound(schema, reply)
    assert where == "analysis.improvement_opportunities[1] reached its bound of 20 characters"
    reply["analysis"]["improvement_opportunities"][1] = "y" * 19
    assert string_at_bound(schema, reply) is None


def test_long_text_is_unbounded_by_default():
    sampling = SamplingConfig()
    assert (sampling.temperature, sampling.top_p) == (1.0, 1.0)
    assert sampling.response_max_tokens == sampling.refinement_max_tokens == 4096
    assert "maxLength" not in response_model(sampling.response_max_chars).model_json_schema()["properties"]["response"]
    refinement = refinement_model(sampling.response_max_chars, sampling.point_max_chars, sampling.max_points)
    schema = refinement.model_json_schema()
    assert "maxLength" not in schema["properties"]["improved_response"]
    assert schema["$defs"]["Analysis"]["properties"]["relevant_feedback"]["items"]["maxLength"] == 250


# ---- budgets ---------------------------------------------------------------------------------


def test_defaults_and_the_demo_budgets_fit():
    assert SamplingConfig().budget_problems(instructions_per_aspect=10) == []
    demo = load_config(str(ROOT / "jobs" / "demo.yaml"), {})
    assert demo.sampling.budget_problems(demo.instructions_per_aspect) == []
    assert demo.sampling.response_max_tokens < 4096  # the demo keeps tight budgets


def test_a_bounded_reply_longer_than_its_budget_is_refused_naming_the_fields():
    with pytest.raises(ValidationError) as refused:
        SamplingConfig(response_max_chars=3000, response_max_tokens=512, refinement_max_tokens=8192)
    message = str(refused.value)
    assert "sampling.response_max_tokens=512 cannot hold the longest SynthesizedResponse reply" in message
    assert "sampling.response_max_chars=3000" in message and "raise sampling.response_max_tokens to 1005" in message


def test_notes_that_leave_no_room_for_the_improved_response_are_refused():
    with pytest.raises(UserError) as refused:
        load_config(None, {"sampling.refinement_max_tokens": 2048})
    message = str(refused.value)
    assert "sampling.refinement_max_tokens=2048" in message and "sampling.point_max_chars=250" in message
    assert "sampling.max_points=5" in message and "more than half" in message
    RunConfig.model_validate({"sampling": {"refinement_max_tokens": 2048, "max_points": 2}})  # fewer notes fit


def test_the_instruction_budget_is_checked_against_k():
    sampling = SamplingConfig(instruction_max_chars=600, instructions_max_tokens=1000)
    (problem,) = sampling.budget_problems(instructions_per_aspect=10)
    assert "sampling.instructions_max_tokens=1000" in problem and "K=10" in problem
    assert sampling.budget_problems(instructions_per_aspect=4) == []


def test_worst_case_counts_every_bounded_character():
    tokens, unbounded = records.worst_case_tokens(response_model(300))
    assert not unbounded and tokens == -(-len(json.dumps({"response": "x" * 300}, separators=(",", ":"))) // 3)
    assert records.worst_case_tokens(response_model(None))[1]


# ---- the whole pipeline ----------------------------------------------------------------------


@pytest.mark.usefixtures("local_ray")
def test_cut_replies_are_never_samples(tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(3))
    engine = {
        "kind": "custom",
        "class_path": "tests.truncating_engine:TruncatingEngine",
        "engine_kwargs": {"bound_rate": {"SynthesizedResponse": 0.3, "Refinement": 0.3},
                          "length_rate": {"Refinement": 0.2}},
    }
    config = RunConfig.model_validate({
        "seeds": str(seeds), "output": str(tmp_path / "out"), "num_samples": 24, "instructions_per_aspect": 3,
        "engine": engine, "workers": {"num_engines": 1, "units_per_shard": 2},
        "sampling": {"response_max_chars": 200, "point_max_chars": 100, "max_points": 2},
    })
    report = run(config)
    storage = Storage(str(tmp_path / "out"))
    samples = [Sample(**r) for t in committed_tables(storage, "data") for r in t.to_pylist()]
    rejects = [Reject(**r) for t in committed_tables(storage, "rejects") for r in t.to_pylist()]

    assert samples and report["all_planned_samples_accounted"]
    for sample in samples:
        assert len(sample.response) < 200 and len(sample.improved_response) < 200
        notes = [*sample.analysis.original_strengths, *sample.analysis.improvement_opportunities,
                 *sample.analysis.relevant_feedback, *sample.implementation_strategy.planned_changes]
        assert all(len(note) < 100 for note in notes)
    cut = [r for r in rejects if "truncated" in r.reason]
    assert {r.stage for r in cut} == {"responses", "refinement"}
    assert any("reached its bound" in r.reason for r in cut) and any("max_tokens" in r.reason for r in cut)
    assert all(r.reason.endswith("(after 3 attempts)") and r.lost_samples == 1 for r in cut)
    assert len(samples) + sum(r.lost_samples for r in rejects) == report["plan"]["planned_samples"]
