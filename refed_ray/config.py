"""The run configuration: one pydantic model, loaded from YAML and overridden by CLI flags."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from refed_ray.errors import UserError


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class Price(_Section):
    input_per_million: float = Field(ge=0, description="price of 1M prompt tokens")
    output_per_million: float = Field(ge=0, description="price of 1M completion tokens")


class ApiConfig(_Section):
    """An OpenAI-compatible endpoint (engine kind ``openai``)."""

    api_base: str | None = Field(None, description="e.g. http://host:8000/v1; unset = api.openai.com")
    api_key_env: str = Field("OPENAI_API_KEY", description="environment variable holding the key")
    azure_api_version: str | None = Field(None, description="set for Azure OpenAI (api_base = endpoint)")
    json_schema: bool = Field(True, description="response_format json_schema; false = JSON mode")
    max_retries: int = Field(5, ge=0, le=20, description="retries of 429/5xx/timeouts/dropped connections")
    request_timeout_s: float = Field(120, gt=0, description="one HTTP attempt")
    request_deadline_s: float = Field(600, gt=0, description="one call, retries and backoff included")
    max_concurrent_requests: int = Field(32, ge=1, description="in flight per engine actor")
    requests_per_minute: int | None = Field(None, ge=1, description="shared by the whole run")
    tokens_per_minute: int | None = Field(None, ge=1, description="shared by the whole run")
    prices: dict[str, Price] = Field(default_factory=dict, description="per model name, for the cost report")


class EngineConfig(_Section):
    """The teacher model and how each worker hosts it."""

    kind: Literal["vllm", "openai", "custom"] = Field(
        "vllm",
        description="vllm: in-process vLLM engine; openai: an OpenAI-compatible API; "
        "custom: class_path names an engine class",
    )
    model: str | None = Field(
        None, description="Hugging Face id or local folder; unset = the embedded Gemma 3 270M"
    )
    model_storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options when model is an s3:// (or other) folder"
    )
    device: Literal["auto", "cuda", "cpu"] = "auto"
    tensor_parallel_size: int = Field(1, ge=1)
    max_model_len: int | None = Field(4096, ge=256)
    gpu_memory_utilization: float = Field(0.90, gt=0, le=1)
    cpu_kvcache_space_gib: int = Field(4, ge=1, description="KV cache size on CPU engines")
    max_num_seqs: int | None = Field(None, ge=1)
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra vllm.AsyncEngineArgs fields"
    )
    class_path: str | None = Field(None, description="module:Class of a custom engine")
    api: ApiConfig = Field(default_factory=ApiConfig)

    @model_validator(mode="after")
    def _kind_has_what_it_needs(self) -> EngineConfig:
        if self.kind == "openai" and not self.model:
            raise ValueError("engine kind 'openai' needs model (the served model's name, --model)")
        if self.kind == "custom" and not self.class_path:
            raise ValueError("engine kind 'custom' needs class_path ('module:Class')")
        return self


class SamplingConfig(_Section):
    """Decoding settings and per-step budgets. Char limits bound the structured outputs."""

    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.95, gt=0, le=1)
    max_attempts: int = Field(3, ge=1, le=10, description="tries per call before a reject")
    feedback_max_tokens: int = Field(768, ge=16)
    instructions_max_tokens: int = Field(1536, ge=16)
    response_max_tokens: int = Field(1024, ge=16)
    refinement_max_tokens: int = Field(2048, ge=16)
    feedback_max_chars: int = Field(1200, ge=20)
    instruction_max_chars: int = Field(600, ge=20)
    response_max_chars: int = Field(3000, ge=20)
    point_max_chars: int = Field(300, ge=20, description="each point of the refinement analysis")
    max_points: int = Field(5, ge=1, le=20, description="points per list of the refinement analysis")


class WorkersConfig(_Section):
    """How the plan is spread over engine actors."""

    num_engines: int = Field(1, ge=1, description="engine actors (each holds one engine)")
    units_per_batch: int = Field(8, ge=1, description="work units per Ray Data batch")
    batches_in_flight: int = Field(
        2, ge=1, le=64, description="batches one actor works on at once (keeps its engine busy)"
    )
    max_restarts: int = Field(3, ge=0, description="restarts of a dead engine actor")
    max_task_retries: int = Field(3, ge=0, description="retries of a batch lost with its actor")


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
    engine: EngineConfig = Field(default_factory=EngineConfig)
    sampling: SamplingConfig = Field(default_factory=SamplingConfig)
    workers: WorkersConfig = Field(default_factory=WorkersConfig)

    def seeds_options(self) -> dict[str, Any]:
        return self.storage_options if self.seeds_storage_options is None else self.seeds_storage_options

    def model_name(self) -> str:
        return self.engine.model or "gemma-3-270m (embedded default)"

    def fingerprint(self, prompts_digest: str, references_digest: str) -> dict[str, str]:
        """What a resumed run must share with the run that wrote OUTPUT, part by part."""
        return {
            "model": self.model_name(),
            "engine": _digest(self.engine.model_dump(include=_REPLY_SHAPING_ENGINE_FIELDS)),
            "prompts": prompts_digest,
            "references": references_digest,
            "sampling": _digest(self.sampling.model_dump()),
            "plan": _digest({"seed": self.seed, "k": self.instructions_per_aspect}),
        }


    def public_dump(self) -> dict[str, Any]:
        """The config as written to run.json and report.json: secret-looking values masked."""
        return _redact(self.model_dump())


# Engine settings that change the replies, and so must match on resume. Credentials, memory,
# parallelism and rate limits do not.
_REPLY_SHAPING_ENGINE_FIELDS = {
    "kind": True,
    "class_path": True,
    "max_model_len": True,
    "engine_kwargs": True,
    "api": {"api_base": True, "json_schema": True},
}


def is_secret_name(name: object) -> bool:
    """Keys whose values are credentials (s3fs ``key``/``secret``, ``api_key``, ``session_token``,
    ``aws_secret_access_key``, ...), not ones that merely mention them (``api_key_env``, ``max_tokens``)."""
    name = str(name).lower()
    return name in {"key", "secret", "token", "password", "credentials"} or name.endswith(
        ("_key", "_secret", "_token", "_password", "secret_access_key", "_credentials")
    )


def _redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: "***" if is_secret_name(k) and v else _redact(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_redact(v) for v in value]
    return value


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
        got = "" if hidden else f" (got {problem.get('input')!r})"
        lines.append(f"  {field}: {message}{got}")
    return "\n".join(lines)
