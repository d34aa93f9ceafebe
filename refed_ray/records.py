"""Pydantic models for every record refed-ray reads, asks the teacher for, or writes.

Two kinds live here:
- teacher outputs (``InstructionAnalysis`` ... ``Refinement``): the engine is constrained to
  their JSON schema, and the reply is validated against the same model;
- table rows (``Reference``, ``Feedback``, ``WorkUnit``, ``Sample``, ``Reject``): what the
  Parquet outputs hold. ``Sample`` keeps the released REFED row format.
"""

from __future__ import annotations

from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, create_model

Aspect = Literal["subject_areas", "relevant_skills"]
ASPECTS: tuple[Aspect, ...] = ("subject_areas", "relevant_skills")
Stage = Literal["seeds", "feedback", "instructions", "responses", "refinement"]

# Bounded strings and lists keep every structured reply short enough to finish inside its
# step's max_tokens: a reply cut off by max_tokens is invalid JSON and costs a retry.


def _text(max_chars: int):
    return Annotated[str, StringConstraints(min_length=1, max_length=max_chars)]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


# ---- teacher outputs (structured-output schemas) -------------------------------------------


def instruction_analysis_model(max_chars: int) -> type[BaseModel]:
    """Step 1a's reply: what the reference instruction exercises."""
    return _model("InstructionAnalysis", subject_areas=_text(max_chars), relevant_skills=_text(max_chars))


def response_analysis_model(max_chars: int) -> type[BaseModel]:
    """Step 1b's reply: what makes the reference response good, and how it could improve."""
    return _model("ResponseAnalysis", response_feedback=_text(max_chars))


def instruction_list_model(count: int, max_chars: int) -> type[BaseModel]:
    """Step 2's reply: exactly ``count`` new instructions (K is a run setting)."""
    return _model(
        "InstructionList",
        instructions=Annotated[list[_text(max_chars)], Field(min_length=count, max_length=count)],
    )


def response_model(max_chars: int) -> type[BaseModel]:
    """Step 3's reply: the response to one new instruction."""
    return _model("SynthesizedResponse", response=_text(max_chars))


def refinement_model(max_chars: int, point_chars: int, max_points: int) -> type[BaseModel]:
    """Step 4's reply: the REFED analysis, strategy and improved response, bounded."""
    points = Annotated[list[_text(point_chars)], Field(min_length=1, max_length=max_points)]
    analysis = _model(
        "Analysis", original_strengths=points, improvement_opportunities=points, relevant_feedback=points
    )
    strategy = _model("ImplementationStrategy", planned_changes=points, rationale=_text(2 * point_chars))
    return _model(
        "Refinement", analysis=analysis, implementation_strategy=strategy, improved_response=_text(max_chars)
    )


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
