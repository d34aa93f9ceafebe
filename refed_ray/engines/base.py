"""What every teacher engine offers the pipeline: one async chat completion with a JSON schema."""

from __future__ import annotations

import importlib
from abc import ABC, abstractmethod
from typing import Any

from pydantic import BaseModel

from refed_ray.config import EngineConfig
from refed_ray.errors import UserError


class ChatRequest(BaseModel):
    messages: list[dict[str, str]]
    json_schema: dict[str, Any]
    max_tokens: int
    temperature: float
    top_p: float
    seed: int


class Completion(BaseModel):
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str | None = None


class RequestRejected(Exception):
    """The engine refused this one request (e.g. longer than the context window)."""


class EngineDead(Exception):
    """The engine itself died: its actor must exit so Ray restarts it and retries its batches."""


class Engine(ABC):
    """One engine per actor. ``complete`` is called concurrently from many coroutines."""

    model_name: str

    @abstractmethod
    async def complete(self, request: ChatRequest) -> Completion: ...

    def shutdown(self) -> None:  # noqa: B027 - engines without resources need nothing here
        """Release the engine's processes and memory."""


def create_engine(config: EngineConfig, rate_limiter=None) -> Engine:
    """The engine ``config`` names; ``rate_limiter`` is the run's shared limiter (API engines)."""
    if config.kind == "vllm":
        from refed_ray.engines.vllm_engine import VLLMEngine

        return VLLMEngine(config)
    if config.kind == "openai":
        from refed_ray.engines.openai_engine import OpenAIEngine

        return OpenAIEngine(config, rate_limiter)
    return load_class(config.class_path)(config)


def load_class(class_path: str | None) -> type[Engine]:
    if not class_path or ":" not in class_path:
        raise UserError(f"engine.class_path must look like 'module:Class', got {class_path!r}")
    module_name, _, class_name = class_path.partition(":")
    try:
        return getattr(importlib.import_module(module_name), class_name)
    except (ImportError, AttributeError) as err:
        raise UserError(f"engine.class_path {class_path!r} cannot be imported: {err}") from None
