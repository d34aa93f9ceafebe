import pytest

from refed_ray import prompts


@pytest.mark.parametrize(
    "step, values",
    [
        ("feedback_instruction", {"instruction": "INSTR"}),
        ("feedback_response", {"instruction": "INSTR", "response": "RESP"}),
        ("instructions", {"instruction": "INSTR", "aspect_label": "relevant skills", "aspect_feedback": "FB", "count": 10}),
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


def test_refinement_prompt_says_feedback_is_for_another_pair():
    (message,) = prompts.render("refinement", instruction="i", response="r", response_feedback="f")
    assert "similar but different" in message["content"]


def test_digest_follows_template_text(monkeypatch):
    before = prompts.prompts_digest()
    original = prompts.template("refinement")
    monkeypatch.setattr(prompts, "template", lambda step: original if step != "refinement" else type(original)(original.template + "!"))
    assert prompts.prompts_digest() != before
