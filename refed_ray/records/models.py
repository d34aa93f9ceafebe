"""Pydantic models for every record refed-ray reads, asks the teacher for, or writes.

Two kinds live here:
- teacher outputs (``InstructionAnalysis`` ... ``Refinement``): the engine is constrained to
  their JSON schema, and the reply is validated against the same model;
- table rows (``Reference``, ``Feedback``, ``WorkUnit``, ``Sample``, ``Reject``): what the
  Parquet outputs hold. ``Sample`` keeps the released REFED row format.
"""

from __future__ import annotations

from functools import cache
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model

from refed_ray.records.stages import StageName

Aspect = Literal["subject_areas", "relevant_skills"]
ASPECTS: tuple[Aspect, ...] = ("subject_areas", "relevant_skills")
Stage = StageName  # the names live in stages.py

# Free text (feedback, instructions, responses) is unbounded in the grammar unless a config sets
# a char bound: a reply that runs past its step's max_tokens ends with finish_reason "length" and
# is rejected as truncated (structured.ask). Where a bound is set it is a safety net, never a way
# to end a reply: the grammar closes a string at its bound, cut mid-text but valid JSON, so a
# string AT its bound also counts as truncated. The refinement's notes (analysis points and
# rationale) are always bounded, so the improved response written after them keeps its room.

#: Characters per token assumed when a schema's longest reply is sized against max_tokens.
#: English prose and code run at 3.5 to 4.5 with current tokenizers; 3 leaves a margin.
CHARS_PER_TOKEN = 3


def _text(max_chars: int | None):
    return Annotated[str, StringConstraints(min_length=1, max_length=max_chars)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- teacher outputs (structured-output schemas) -------------------------------------------


@cache  # a model class per settings, built once: building one costs milliseconds
def instruction_analysis_model(max_chars: int | None = None) -> type[BaseModel]:
    """Step 1a's reply: the reference instruction's subject areas and relevant skills, each with
    what makes the instruction effective for instruction tuning."""
    return _model("InstructionAnalysis", subject_areas=_text(max_chars), relevant_skills=_text(max_chars))


@cache  # a model class per settings, built once: building one costs milliseconds
def response_analysis_model(max_chars: int | None = None) -> type[BaseModel]:
    """Step 1b's reply: what makes the reference response good, and how it could improve."""
    return _model("ResponseAnalysis", response_feedback=_text(max_chars))


@cache  # a model class per settings, built once: building one costs milliseconds
def instruction_list_model(count: int, max_chars: int | None = None) -> type[BaseModel]:
    """Step 2's reply: exactly ``count`` new instructions (K is a run setting)."""
    return _model(
        "InstructionList",
        instructions=Annotated[list[_text(max_chars)], Field(min_length=count, max_length=count)],
    )


@cache  # a model class per settings, built once: building one costs milliseconds
def response_model(max_chars: int | None = None) -> type[BaseModel]:
    """Step 3's reply: the response to one new instruction."""
    return _model("SynthesizedResponse", response=_text(max_chars))


#: The refinement's rationale may run to this many analysis points.
RATIONALE_POINTS = 3


@cache  # a model class per settings, built once: building one costs milliseconds
def refinement_model(max_chars: int | None, point_chars: int, max_points: int) -> type[BaseModel]:
    """Step 4's reply: the REFED analysis and strategy (bounded notes), then the improved response."""
    points = Annotated[list[_text(point_chars)], Field(min_length=1, max_length=max_points)]
    analysis = _model(
        "Analysis", original_strengths=points, improvement_opportunities=points, relevant_feedback=points
    )
    strategy = _model(
        "ImplementationStrategy", planned_changes=points, rationale=_text(RATIONALE_POINTS * point_chars)
    )
    return _model(
        "Refinement", analysis=analysis, implementation_strategy=strategy, improved_response=_text(max_chars)
    )


@cache  # a model class per settings, built once: building one costs milliseconds
def judge_verdict_model(reasoning_chars: int) -> type[BaseModel]:
    """The pairwise judge's reply: its reasoning first (bounded, so the verdict after it keeps its
    room), then which of the two responses is better."""
    return _model("JudgeVerdict", reasoning=_text(reasoning_chars), better=Literal["1", "2"])


def worst_case_tokens(model: type[BaseModel]) -> tuple[int, bool]:
    """Tokens of the longest compact JSON reply ``model``'s schema admits, at ``CHARS_PER_TOKEN``,
    and whether the schema also has unbounded parts (strings or lists, counted empty here)."""
    schema = model.model_json_schema()
    chars, unbounded = _longest_json(schema, schema.get("$defs", {}))
    return -(-chars // CHARS_PER_TOKEN), unbounded


def _longest_json(schema: dict, defs: dict) -> tuple[int, bool]:
    if "$ref" in schema:
        return _longest_json(defs[schema["$ref"].rsplit("/", 1)[-1]], defs)
    kind = schema.get("type")
    if kind == "object":
        parts = [_longest_json(sub, defs) for sub in schema.get("properties", {}).values()]
        keys = sum(len(name) + 3 for name in schema.get("properties", {}))  # "name":
        return 2 + keys + max(len(parts) - 1, 0) + sum(c for c, _ in parts), any(u for _, u in parts)
    if kind == "array":
        item, unbounded = _longest_json(schema.get("items", {}), defs)
        if "maxItems" not in schema:
            return 2, True
        count = schema["maxItems"]
        return 2 + count * item + max(count - 1, 0), unbounded
    if kind == "string":
        if "maxLength" not in schema:
            return 2, True
        return 2 + schema["maxLength"], False
    return 20, False  # numbers, booleans, null


def string_at_bound(schema: dict, value: object) -> str | None:
    """Where ``value`` (a reply valid under ``schema``) holds a string that reached its
    ``maxLength``, e.g. "improved_response reached its bound of 3000 characters"; else None.

    The grammar ends such a string at its bound whatever the model meant to write, so the
    reply is valid JSON but cut: it counts as truncated."""
    return _at_bound(schema, value, schema.get("$defs", {}), "")


def _at_bound(schema: dict, value: object, defs: dict, where: str) -> str | None:
    if "$ref" in schema:
        return _at_bound(defs[schema["$ref"].rsplit("/", 1)[-1]], value, defs, where)
    kind = schema.get("type")
    if kind == "object" and isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            found = _at_bound(sub, value.get(name), defs, f"{where}.{name}" if where else name)
            if found:
                return found
    elif kind == "array" and isinstance(value, list):
        for index, item in enumerate(value):
            found = _at_bound(schema.get("items", {}), item, defs, f"{where}[{index}]")
            if found:
                return found
    elif kind == "string" and isinstance(value, str) and "maxLength" in schema:
        if len(value) >= schema["maxLength"]:
            return f"{where or '(reply)'} reached its bound of {schema['maxLength']} characters"
    return None


def _model(name: str, **fields) -> type[BaseModel]:
    return create_model(
        name, __config__=ConfigDict(extra="forbid"), **{key: (kind, ...) for key, kind in fields.items()}
    )


# ---- table rows ------------------------------------------------------------------------------


class Reference(_Strict):
    """One curated reference pair, as read from the seeds."""

    reference_id: str
    instruction: str
    response: str
    source: str = Field(description="file:line (or file:row) the pair was read from")


class Feedback(_Strict):
    """One row of OUTPUT/feedback: the reference-level feedback shared by every worker."""

    reference_id: str
    instruction: str
    reference_response: str
    subject_areas: str
    relevant_skills: str
    response_feedback: str


class WorkUnit(_Strict):
    """One row of OUTPUT/plan: K new instructions for one (round, reference, aspect)."""

    unit_id: str
    round: int
    reference_id: str
    aspect: Aspect
    seed: int


class Analysis(_Strict):
    original_strengths: list[str]
    improvement_opportunities: list[str]
    relevant_feedback: list[str]


class ImplementationStrategy(_Strict):
    planned_changes: list[str]
    rationale: str


class RefedRow(_Strict):
    """The released REFED row format."""

    instruction: str
    response: str
    analysis: Analysis
    implementation_strategy: ImplementationStrategy
    improved_response: str


class Sample(RefedRow):
    """One row of OUTPUT/data: a REFED row plus where it came from and what it cost."""

    unit_id: str
    reference_id: str
    aspect: Aspect
    round: int
    sample_index: int
    model: str
    prompt_tokens: int
    completion_tokens: int


class Reject(_Strict):
    """One row of OUTPUT/rejects. ``lost_samples`` is how many planned samples it accounts for."""

    stage: Stage
    reason: str
    unit_id: str = ""
    reference_id: str = ""
    aspect: str = ""
    sample_index: int = -1
    lost_samples: int = 0
    source: str = ""
    detail: str = Field(default="", description="the offending output or input, truncated")


# ---- Arrow schemas of the table rows ---------------------------------------------------------


def arrow_schema(model: type[BaseModel]):
    """The Parquet schema of a row model, so empty shards and nested structs stay typed."""
    import pyarrow as pa

    return pa.schema([(name, _arrow_type(f.annotation)) for name, f in model.model_fields.items()])


def _arrow_type(annotation):
    import typing

    import pyarrow as pa

    origin = typing.get_origin(annotation)
    if origin is Annotated:
        return _arrow_type(typing.get_args(annotation)[0])
    if origin is list:
        return pa.list_(_arrow_type(typing.get_args(annotation)[0]))
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return pa.struct(list(arrow_schema(annotation)))
    return {int: pa.int64(), str: pa.string()}.get(annotation, pa.string())


def to_table(rows: list[BaseModel], model: type[BaseModel]):
    import pyarrow as pa

    return pa.Table.from_pylist([row.model_dump() for row in rows], schema=arrow_schema(model))
