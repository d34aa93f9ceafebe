"""The run configuration: one pydantic model, loaded from YAML and overridden by CLI flags."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from refed_ray.engines.config import DEFAULT_MAX_MODEL_LEN, EngineConfig
from refed_ray.errors import UserError
from refed_ray.records.commits import RUN_FILE, read_run
from refed_ray.records.plan import tail_shard_units
from refed_ray.secrets import is_secret_name, mask_text, mask_value
from refed_ray.storage import Storage


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class SamplingConfig(_Section):
    """Decoding settings and per-step budgets; the defaults are the authors' (temperature 1.0,
    top_p 1.0, 4,096 tokens a call) and are meant for real teachers.

    No reply is ever accepted cut off: free text (feedback, instructions, responses) is unbounded
    in the grammar unless a ``*_max_chars`` is set, so a reply that runs out of ``*_max_tokens``
    is caught by its finish reason; a string that reaches a char bound set here also counts as
    truncated. Either way the call is retried, then rejected with a reason that says "truncated".
    The validator refuses budgets that cannot hold their reply (see ``budget_problems``).
    """

    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    max_attempts: int = Field(3, ge=1, le=10, description="tries per call before a reject")
    feedback_max_tokens: int = Field(4096, ge=16)
    instructions_max_tokens: int = Field(4096, ge=16, description="for all K instructions of a call")
    response_max_tokens: int = Field(4096, ge=16)
    refinement_max_tokens: int = Field(4096, ge=16)
    feedback_max_chars: int | None = Field(
        None, ge=20, description="bound on each feedback string; unset = none (max_tokens decides)"
    )
    instruction_max_chars: int | None = Field(
        None, ge=20, description="bound on each new instruction; unset = none (max_tokens decides)"
    )
    response_max_chars: int | None = Field(
        None, ge=20, description="bound on response and improved_response; unset = none (max_tokens decides)"
    )
    point_max_chars: int = Field(
        250, ge=20, description="each point of the refinement analysis (the rationale: 3 points' worth)"
    )
    max_points: int = Field(5, ge=1, le=20, description="points per list of the refinement analysis")

    @model_validator(mode="after")
    def _replies_fit_their_budgets(self) -> SamplingConfig:
        problems = self.budget_problems()
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def budget_problems(self, instructions_per_aspect: int | None = None) -> list[str]:
        """Budgets that cannot hold their step's reply: a reply whose strings all stay inside
        their char bounds must fit its max_tokens (at ``records.CHARS_PER_TOKEN`` characters a
        token), and where the reply also has unbounded text, its bounded parts may take at most
        half of max_tokens. The instruction step depends on K, so it is checked only when
        ``instructions_per_aspect`` is given (by ``RunConfig``)."""
        from refed_ray.records import models as records

        steps = [
            ("feedback_max_tokens", records.instruction_analysis_model(self.feedback_max_chars),
             ["feedback_max_chars"]),
            ("feedback_max_tokens", records.response_analysis_model(self.feedback_max_chars),
             ["feedback_max_chars"]),
            ("response_max_tokens", records.response_model(self.response_max_chars), ["response_max_chars"]),
            ("refinement_max_tokens",
             records.refinement_model(self.response_max_chars, self.point_max_chars, self.max_points),
             ["response_max_chars", "point_max_chars", "max_points"]),
        ]
        if instructions_per_aspect is not None:
            steps.append((
                "instructions_max_tokens",
                records.instruction_list_model(instructions_per_aspect, self.instruction_max_chars),
                ["instruction_max_chars", f"K={instructions_per_aspect} (instructions_per_aspect)"],
            ))
        problems = []
        for budget_field, reply, bounds in steps:
            budget = getattr(self, budget_field)
            worst, unbounded = records.worst_case_tokens(reply)
            named = ", ".join(
                bound if "=" in bound else f"sampling.{bound}={_shown(getattr(self, bound))}" for bound in bounds
            )
            if not unbounded and worst > budget:
                problems.append(
                    f"sampling.{budget_field}={budget} cannot hold the longest {reply.__name__} reply that "
                    f"{named} allow ({worst} tokens at {records.CHARS_PER_TOKEN} characters a token): "
                    f"raise sampling.{budget_field} to {worst} or more, or lower those bounds"
                )
            elif unbounded and worst > budget // 2:
                problems.append(
                    f"sampling.{budget_field}={budget}: the bounded parts of a {reply.__name__} reply "
                    f"({named}) may take {worst} tokens at {records.CHARS_PER_TOKEN} characters a token, "
                    f"more than half of it, leaving too little for its unbounded text: raise "
                    f"sampling.{budget_field} to {2 * worst} or more, or lower those bounds"
                )
        return list(dict.fromkeys(problems))


def _shown(bound: int | None) -> str:
    return "unset" if bound is None else str(bound)


class DedupConfig(_Section):
    """Near-duplicate instructions (refed_ray/method/similarity.py states the measure)."""

    enabled: bool = True
    threshold: float = Field(0.7, gt=0, le=1, description="Jaccard similarity of word n-gram sets at which two instructions are duplicates")
    ngram: int = Field(3, ge=1, le=10, description="words per shingle")
    num_perm: int = Field(128, ge=16, le=1024, description="MinHash values per instruction")
    rows_per_task: int = Field(200_000, ge=1000, description="instructions one signature task hashes")


class FeedbackConfig(_Section):
    """Which feedback refines the responses (refed_ray/method/refiners.py: one refiner per mode)."""

    mode: Literal["reference", "sample", "none"] = Field(
        "reference",
        description="reference: the method, two feedback calls per reference and each response refined with its "
        "reference's response feedback; sample: the paper's baseline, one feedback call per reference (its "
        "instruction) and one per response, which is refined with its own feedback; none: one feedback call "
        "per reference, no refinement (the final response is the response)",
    )


# The units one actor holds when workers.shards_in_flight is unset: at least UNITS_IN_FLIGHT of
# whole shards, and at least TAIL_UNITS_IN_FLIGHT of the plan's last, small ones
# (``records/plan.py``: 6 x 8 units): fewer under-filled the engines while the pass's last tenth ran
# (issue 24). The older shards' calls go first, so the shards beyond what fills the engine have
# only their opening calls done: a death redoes little more with more of them (simulated, 64 units
# a shard: 699K tokens at 6 in flight, 601K at 3).
UNITS_IN_FLIGHT = 192
TAIL_UNITS_IN_FLIGHT = 48
# References a feedback shard holds at most when workers.references_per_feedback_shard is unset:
# Ray Data hands an actor its shards in flight as soon as it is ready, so 16 feedback shards of 64
# (1,000 references) went 6, 6, 2, 2 and two simulated GPUs waited a third of the feedback for the
# broadcast (issue 24). Shards of 32 spread as they free up and still fill an engine: 6 in flight
# hold 384 calls. A resumed run cuts only the references without feedback, whatever the size.
FEEDBACK_SHARD_REFERENCES = 32


class WorkersConfig(_Section):
    """How the plan is spread over engine actors, and how they survive spot clusters."""

    num_engines: int = Field(1, ge=1, description="engine actors (each holds one engine)")
    feedback_references_per_engine: int = Field(
        1000, ge=1, description="ignored: the feedback and the synthesis share one pool of engines (each loads "
        "once); accepted so that configs written before still load"
    )
    units_per_shard: int = Field(
        64, ge=1, description="work units per shard: the unit of commit, and of work redone when an actor dies"
    )
    references_per_feedback_shard: int | None = Field(
        None, ge=1, description="references per feedback shard (the feedback pass's unit of commit); "
        "unset = workers.units_per_shard, at most 32"
    )
    shards_in_flight: int | None = Field(
        None, ge=1, le=64, validate_default=True,
        description="shards one actor works on at once (older shards' calls go first, so the newer ones only fill "
        "what the older leave idle); unset = enough for 192 units and for 48 of the plan's last 8-unit shards "
        "(6 at 64 or 32 units a shard, 12 at 16)",
    )
    requests_in_flight: int | None = Field(
        None, ge=1, description="calls one engine holds at once; unset = the engine's own capacity (vLLM max_num_seqs)"
    )
    max_restarts: int = Field(-1, ge=-1, description="restarts of a dead engine actor; -1 = as often as nodes are lost")
    max_task_retries: int = Field(-1, ge=-1, description="Ray's retries of a shard lost with its actor; -1 = unbounded "
                                  "(max_shard_attempts bounds them)")
    max_shard_attempts: int = Field(
        4, ge=1, description="attempts at a shard whose engine dies every time before it becomes rejects"
    )
    outage_patience_s: float = Field(
        1800, gt=0, description="how long a call waits out an unavailable engine or API before the run stops"
    )
    hang_timeout_s: float = Field(
        900, gt=0, description="an engine with calls in flight and no answer for this long is restarted"
    )

    @field_validator("shards_in_flight")
    @classmethod
    def _enough_units_in_flight(cls, value: int | None, info: ValidationInfo) -> int | None:
        # What keeps an engine full is the units its actor holds, not the shard count: on the
        # simulated GPU cluster 2 x 32 units kept 0.88 of the engines' time, 4 x 32 0.94 (its last
        # 8-unit shards under-filled), 6 x 32 0.96; at 64 units, 3 in flight 0.95 (its last shards
        # 16 units), 6 0.96 with 8-unit ones (README, "GPU efficiency (simulated)").
        units = info.data.get("units_per_shard")
        if value is not None or units is None:
            return value
        whole = -(-UNITS_IN_FLIGHT // units)
        last = -(-TAIL_UNITS_IN_FLIGHT // tail_shard_units(units))
        return min(64, max(whole, last))

    def feedback_shard_size(self) -> int:
        return self.references_per_feedback_shard or min(self.units_per_shard, FEEDBACK_SHARD_REFERENCES)


class RunConfig(_Section):
    seeds: str | None = Field(None, description="seed file URI; unset = the bundled references")
    output: str = "output/run"
    num_samples: int = Field(100, ge=1)
    instructions_per_aspect: int = Field(10, ge=1, le=50, description="K of the paper")
    seed: int = Field(0, ge=0, description="run seed: the plan and every sampling seed follow it")
    max_bad_seeds: int = Field(10, ge=0, description="bad seed rows skipped before the run stops")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options for the output URI (and the seeds by default)"
    )
    seeds_storage_options: dict[str, Any] | None = Field(
        None, description="fsspec options for the seeds URI when they differ (e.g. anon: true)"
    )
    output_shared_filesystem: bool = Field(
        False, description="a local OUTPUT path that every node of a multi-node cluster mounts (NFS, EFS, Lustre)"
    )
    dataset_file_mb: int = Field(256, ge=1, description="target size of the compacted dataset's Parquet files")
    max_extra_units: float = Field(
        0.5, ge=0, le=5, description="top-up: units planned beyond ceil(N/K) to replace rejects, as a share of them"
    )
    engine: EngineConfig = Field(default_factory=EngineConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)
    dedup: DedupConfig = Field(default_factory=DedupConfig)
    feedback: FeedbackConfig = Field(default_factory=FeedbackConfig)
    instructions_from: str | None = Field(
        None, description="an earlier run's OUTPUT whose instructions and original responses this run refines "
        "again, unit by unit (same references and plan); unset = synthesize them",
    )

    @model_validator(mode="after")
    def _instruction_budget_fits(self) -> RunConfig:
        """The instruction step's reply holds K instructions: its budget is checked here, with K."""
        problems = self.sampling.budget_problems(self.instructions_per_aspect)
        if problems:
            raise ValueError("; ".join(problems))
        return self

    def seeds_options(self) -> dict[str, Any]:
        return self.storage_options if self.seeds_storage_options is None else self.seeds_storage_options

    def model_name(self) -> str:
        return self.engine.model_name()

    def fingerprint(self, prompts_digest: str, references_digest: str) -> dict[str, str]:
        """What a resumed run must share with the run that wrote OUTPUT, part by part."""
        return {
            "model": self.model_name(),
            "engine": _digest(_reply_shaping_engine(self.engine)),
            "prompts": prompts_digest,
            "references": references_digest,
            "sampling": _digest(self.sampling.model_dump()),
            "plan": _digest({"seed": self.seed, "k": self.instructions_per_aspect}),
            "feedback_mode": self.feedback.mode,
            # The earlier run's URI and run id (instructions_from.py fills them in: it reads that run).
            "instructions_from": "",
        }


    def public_dump(self) -> dict[str, Any]:
        """The config as written to run.json and report.json: credentials masked (``secrets.py``)."""
        return mask_value(self.model_dump())


# Engine settings that change the replies, and so must match on resume. Credentials, memory,
# parallelism and rate limits do not.
_REPLY_SHAPING_ENGINE_FIELDS = {
    "kind": True,
    "class_path": True,
    "max_model_len": True,
    "engine_kwargs": True,
    "api": {"api_base": True, "json_schema": True},
}


def _reply_shaping_engine(engine: EngineConfig) -> dict[str, Any]:
    """The reply-shaping engine settings as the fingerprint digests them. max_model_len auto (the
    default since issue 22) is digested as 16384, the default before it: an output started with
    the old default resumes under the new one, which gives vLLM the same 16384 wherever the model
    allowed it (where it did not, that run could not start)."""
    fields = engine.model_dump(include=_REPLY_SHAPING_ENGINE_FIELDS)
    if fields["max_model_len"] == "auto":
        fields["max_model_len"] = DEFAULT_MAX_MODEL_LEN
    return fields


def _digest(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def load_config(path: str | None, overrides: dict[str, Any]) -> RunConfig:
    """Read the YAML file (if any), apply dotted-key overrides, and validate."""
    data: dict[str, Any] = {}
    where = "the command line"
    if path:
        where = path
        try:
            data = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except FileNotFoundError:
            raise UserError(f"config file not found: {path}") from None
        except UnicodeDecodeError as err:
            raise UserError(f"config file {path} is not UTF-8 text (byte {err.start})") from None
        except yaml.YAMLError as err:
            raise UserError(f"config file {path} is not valid YAML: {err}") from None
        if not isinstance(data, dict):
            raise UserError(f"config file {path} must hold a mapping, not {type(data).__name__}")
    for dotted, value in overrides.items():
        if value is None:
            continue
        node = data
        *parents, leaf = dotted.split(".")
        for key in parents:
            if node.get(key) is None:
                node[key] = {}
            if not isinstance(node[key], dict):
                raise UserError(f"invalid config ({where}): {key} must be a mapping, got {node[key]!r}")
            node = node[key]
        node[leaf] = value
    try:
        return RunConfig.model_validate(data)
    except ValidationError as err:
        raise UserError(format_validation_error(err, where)) from None


def format_validation_error(err: ValidationError, where: str) -> str:
    lines = [f"invalid config ({where}):"]
    for problem in err.errors():
        field = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        message = problem["msg"]
        if problem["type"] == "extra_forbidden":
            message = "unknown key"
        # No value to show when missing; never one that may be a credential (a secret field, or
        # an unknown key: perhaps a misspelt secret).
        hidden = problem["type"] in ("missing", "extra_forbidden") or any(map(is_secret_name, problem["loc"]))
        got = "" if hidden else f" (got {mask_text(repr(problem.get('input')))})"
        lines.append(f"  {field}: {message}{got}")
    return "\n".join(lines)


def run_config(storage: Storage) -> RunConfig:
    """The config of the run in OUTPUT (run.json's, secrets masked)."""
    try:
        return RunConfig.model_validate(read_run(storage)["config"])
    except ValidationError as err:
        raise UserError(format_validation_error(err, f"{storage.uri}/{RUN_FILE}")) from None
