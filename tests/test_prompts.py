import asyncio
import os
import shutil

import pytest

from refed_ray.config import RunConfig
from refed_ray.method import prompts
from refed_ray.method.feedback import collect_feedback
from refed_ray.method.instructions import facet_choice, instruction_messages, synthesize_instructions
from refed_ray.method.refinement import refine_response
from refed_ray.method.refiners import refiner_for
from refed_ray.method.responses import synthesize_response
from refed_ray.records.models import Feedback, Reference
from refed_ray.records.plan import make_unit
from tests.conftest import FAKE_ENGINE
from tests.fake_engine import FakeEngine


@pytest.mark.parametrize(
    "step, values",
    [
        ("feedback_instruction", {"instruction": "INSTR", "response": "RESP"}),
        ("feedback_response", {"instruction": "INSTR", "response": "RESP"}),
        ("instructions", {"instruction": "INSTR", "aspect_label": "relevant skills", "aspect_feedback": "FB",
                          "count": 10, "variation": "VARIATION"}),
        ("response", {"reference_instruction": "INSTR", "reference_response": "RESP", "instruction": "NEW"}),
        ("refinement", {"instruction": "NEW", "response": "RESP", "response_feedback": "FB"}),
    ],
)
def test_every_step_renders_its_values(step, values):
    (message,) = prompts.render(step, **values)
    assert message["role"] == "user"
    for value in values.values():
        assert str(value) in message["content"]
    assert "$" not in message["content"]


def test_missing_value_is_an_error():
    with pytest.raises(KeyError, match="response"):
        prompts.render("feedback_response", instruction="x")
    with pytest.raises(KeyError, match="response"):
        prompts.render("feedback_instruction", instruction="x")  # it sees the response too


def text(step: str, **values) -> str:
    return prompts.render(step, **values)[0]["content"]


def test_instruction_feedback_sees_the_response_and_asks_what_makes_it_effective():
    content = text("feedback_instruction", instruction="INSTR", response="RESP")
    for asked in ("subject areas", "skills", "instruction tuning", "clear", "actionable", "structur",
                  '"subject_areas"', '"relevant_skills"'):
        assert asked in content


def test_response_feedback_covers_content_communication_and_fit():
    content = text("feedback_response", instruction="INSTR", response="RESP")
    for asked in ("accurate", "depth", "clear", "organised", "tone", "scope", "implied", "strengths",
                  "improved", '"response_feedback"'):
        assert asked in content


def test_response_prompt_lists_the_requirements():
    content = text("response", reference_instruction="INSTR", reference_response="RESP", instruction="NEW")
    for requirement in ("every part", "expertise", "examples or evidence", "step by step", "length",
                        "formatting", '"response"'):
        assert requirement in content


def test_refinement_prompt_walks_the_quality_assessment():
    content = text("refinement", instruction="i", response="r", response_feedback="f")
    assert "similar but different" in content
    for step in ("Analyse the original response", "ignore those that do not apply", "highest impact",
                 "keep what is effective", '"original_strengths"', '"improvement_opportunities"',
                 '"relevant_feedback"', '"planned_changes"', '"rationale"', '"improved_response"'):
        assert step in content


def test_shared_text_comes_first_and_per_sample_text_last():
    pair = {"instruction": "INSTR", "response": "RESP"}
    on_instruction, on_response = text("feedback_instruction", **pair), text("feedback_response", **pair)
    shared = os.path.commonprefix([on_instruction, on_response])
    assert "INSTR" in shared and "RESP" in shared  # one cached prefix serves both feedback calls

    response = text("response", reference_instruction="INSTR", reference_response="RESP", instruction="NEW")
    assert response.index("INSTR") < response.index("RESP") < response.index("NEW")
    refinement = text("refinement", instruction="NEW", response="ANSWER", response_feedback="FB")
    assert refinement.index("FB") < refinement.index("NEW") < refinement.index("ANSWER")
    instructions = text("instructions", instruction="INSTR", aspect_label="subject areas", aspect_feedback="FB",
                        count=3, variation="VARIATION")
    assert instructions.index("INSTR") < instructions.index("FB") < instructions.index("VARIATION")


FEEDBACK = Feedback(reference_id="ref", instruction="REF-INSTR", reference_response="REF-RESP",
                    subject_areas="SUBJECTS", relevant_skills="SKILLS", response_feedback="RESP-FEEDBACK")


class Recording(FakeEngine):
    def __init__(self, config):
        super().__init__(config)
        self.prompts: list[str] = []

    async def complete(self, request):
        self.prompts.append(request.messages[-1]["content"])
        return await super().complete(request)


def engine_and_config(**overrides):
    config = RunConfig.model_validate({"engine": FAKE_ENGINE, "instructions_per_aspect": 3, **overrides})
    return Recording(config.engine), config


def test_each_step_sends_what_the_method_needs():
    engine, config = engine_and_config()
    reference = Reference(reference_id="ref", instruction="REF-INSTR", response="REF-RESP", source="s:1")
    asyncio.run(collect_feedback(engine, reference, config, refiner_for(config.feedback.mode).reference_feedback))
    assert len(engine.prompts) == 2 and all("REF-INSTR" in p and "REF-RESP" in p for p in engine.prompts)

    engine.prompts.clear()
    asyncio.run(synthesize_instructions(engine, make_unit(0, 0, "ref", "relevant_skills"), FEEDBACK, config))
    asyncio.run(synthesize_response(engine, "NEW-INSTR", FEEDBACK, 1, config))
    asyncio.run(refine_response(engine, "NEW-INSTR", "NEW-RESP", FEEDBACK, 2, config))
    on_instructions, on_response, on_refinement = engine.prompts
    assert "REF-INSTR" in on_instructions and "SKILLS" in on_instructions and "SUBJECTS" not in on_instructions
    assert all(s in on_response for s in ("REF-INSTR", "REF-RESP", "NEW-INSTR"))
    assert all(s in on_refinement for s in ("RESP-FEEDBACK", "NEW-INSTR", "NEW-RESP"))
    assert "REF-RESP" not in on_refinement  # the refinement sees the feedback, not the reference


def test_rounds_of_one_unit_render_different_instruction_prompts():
    _, config = engine_and_config()
    rendered = [
        instruction_messages(make_unit(config.seed, round_, "ref", "subject_areas"), FEEDBACK, config)[0]["content"]
        for round_ in range(6)
    ]
    assert len(set(rendered)) == 6
    assert "For this batch" not in rendered[0] and all("For this batch" in r for r in rendered[1:])
    again = instruction_messages(make_unit(config.seed, 3, "ref", "subject_areas"), FEEDBACK, config)[0]["content"]
    assert again == rendered[3]  # the same unit always renders the same prompt
    other_run = engine_and_config(seed=1)[1]
    assert instruction_messages(make_unit(1, 3, "ref", "subject_areas"), FEEDBACK, other_run)[0]["content"] != again


def test_every_round_up_to_the_number_of_combinations_gets_its_own():
    total = 1
    for choices in prompts.facets().values():
        total *= len(choices)
    assert set(prompts.facets()) == {"audience", "form", "difficulty", "setting"} and total >= 1000
    for reference, aspect in (("ref", "subject_areas"), ("other", "relevant_skills")):
        combos = {tuple(facet_choice(0, reference, aspect, r).values()) for r in range(1, total + 1)}
        assert len(combos) == total
    assert facet_choice(0, "ref", "subject_areas", 0) == {}


def test_digest_follows_template_text(monkeypatch):
    before = prompts.prompts_digest()
    original = prompts.template("refinement")
    monkeypatch.setattr(prompts, "template", lambda step: original if step != "refinement" else type(original)(original.template + "!"))
    assert prompts.prompts_digest() != before


def test_digest_follows_the_facets(tmp_path, monkeypatch):
    before = prompts.prompts_digest()
    copy = tmp_path / "prompts"
    shutil.copytree(prompts.prompts_dir(), copy)
    with open(copy / prompts.FACETS_FILE, "a") as handle:
        handle.write("a night-shift worker\n")
    monkeypatch.setattr(prompts, "prompts_dir", lambda: copy)
    prompts.template.cache_clear()
    prompts.facets.cache_clear()
    try:
        assert prompts.prompts_digest() != before
        assert prompts.facets()["setting"][-1] == "a night-shift worker"
    finally:
        prompts.template.cache_clear()
        prompts.facets.cache_clear()
