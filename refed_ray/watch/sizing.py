"""GPU time of a vLLM run: the bandwidth-and-compute model of the README's "Sizing" section.

An estimate from first principles and datasheets, not a measurement. Per engine:

- memory: KV cache = gpu_memory_utilization x GPU memory - weights - activations and CUDA graphs
  (5% of the memory, 2 GB at least); a sequence in flight holds its prompt and its reply, so the
  engine batches B = KV cache / (tokens a sequence holds x KV bytes a token) sequences, at most
  vLLM's max_num_seqs and the chains the actor keeps in flight;
- decode reads all the weights once a step for the whole batch, and each sequence's KV cache:
  bytes = weights x completion tokens / B + completion tokens x mean context x KV bytes a token;
- compute: 2 x parameters x (prompt + completion tokens) FLOPs (prefill included; prefix-cache
  hits lower it);
- the slower of bytes / bandwidth and FLOPs / peak is the ceiling; plan on half of it (grammar
  masks, scheduling, prefill and decode interleaving, tails).

A tensor-parallel engine of T GPUs has T times the memory, bandwidth and FLOPs.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from refed_ray.config import RunConfig
from refed_ray.errors import UserError

PLANNING_SHARE = 0.5  # of the ceiling: what a run gets (README, "Sizing")
GB = 1e9


@dataclass(frozen=True)
class Gpu:
    name: str
    memory_gb: float
    bandwidth_gb_s: float
    bf16_tflops: float
    fp8_tflops: float | None  # None: no FP8 tensor cores (runs FP8 weights at the bf16 rate)
    max_num_seqs: int  # vLLM's offline default on this card


# The README's table (AWS instance in brackets there), dense peaks from the datasheets.
GPUS = {
    "l4": Gpu("L4 24 GB", 24, 300, 121, 242, 256),
    "a10g": Gpu("A10G 24 GB", 24, 600, 125, None, 256),
    "l40s": Gpu("L40S 48 GB", 48, 864, 362, 733, 256),
    "a100": Gpu("A100 80 GB", 80, 2000, 312, None, 256),
    "h100": Gpu("H100 80 GB", 80, 3350, 989, 1979, 1024),
}


@dataclass(frozen=True)
class ModelShape:
    params: float
    weight_bytes_per_param: float
    kv_bytes_per_token: float
    source: str  # where the figures came from, shown with the estimate


# Llama-3.1-8B: 32 layers x 8 KV heads x 128 x (K and V) x 2 bytes.
_REFERENCE_KV_BYTES, _REFERENCE_PARAMS = 32 * 8 * 128 * 2 * 2, 8e9


def model_shape(config: RunConfig, model_params: float | None = None) -> ModelShape | None:
    """The teacher's size: from its config.json where the model folder is on this machine (the
    embedded default once prepared), else ``model_params`` (``--model-params``); None when
    neither is known (a hub id without ``--model-params``)."""
    folder = _local_folder(config)
    kv_dtype = config.engine.engine_kwargs.get("kv_cache_dtype", "auto")
    if folder is not None:
        hf = _read_config(folder)
        return shape_from_config(hf, config, f"{folder}/config.json", model_params)
    if model_params:
        # No config to read the KV layout from: Llama-3.1-8B's, scaled by the square root of the
        # size (Llama-3.1-70B's is 2.5x for 8.8x the parameters).
        kv = _REFERENCE_KV_BYTES * math.sqrt(model_params / _REFERENCE_PARAMS)
        return ModelShape(model_params, 2.0, kv / (2 if str(kv_dtype).startswith("fp8") else 1),
                          "--model-params; KV cache per token assumed like Llama-3.1-8B's, scaled")
    return None


def shape_from_config(
    hf: dict[str, Any], config: RunConfig, source: str, model_params: float | None = None,
) -> ModelShape:
    """The shape a Hugging Face config.json (``parse_config``) describes, with the run's dtypes;
    ``model_params`` overrides the parameters counted from it (a mixture of experts needs it)."""
    weight_bytes = 1.0 if _is_fp8(hf) else _dtype_bytes(config.engine.dtype)
    params = model_params or _dense_params(hf, source)
    return ModelShape(params, weight_bytes, kv_bytes_per_token(hf, config),
                      source + (" (parameters from --model-params)" if model_params else ""))


def kv_bytes_per_token(hf: dict[str, Any], config: RunConfig) -> float:
    """KV cache bytes one token holds: layers x KV heads x head size x (K and V) x the cache dtype."""
    kv_dtype = config.engine.engine_kwargs.get("kv_cache_dtype", "auto")
    kv_bytes = 1.0 if str(kv_dtype).startswith("fp8") else _dtype_bytes(config.engine.dtype)
    return _kv_elements_per_token(hf) * kv_bytes


def kv_cache_bytes(memory_bytes: float, tensor_parallel_size: int, utilization: float, weights: float) -> float:
    """What an engine of ``tensor_parallel_size`` GPUs of ``memory_bytes`` each keeps for its KV
    cache: its share of the memory less the weights, activations and CUDA graphs (5%, 2 GB at
    least, a GPU). Negative when the weights do not fit."""
    overhead = max(2 * GB, 0.05 * memory_bytes) * tensor_parallel_size
    return utilization * memory_bytes * tensor_parallel_size - weights - overhead


def gpu_estimate(
    gpu: str, shape: ModelShape, config: RunConfig, *, prompt_tokens: float, completion_tokens: float, calls: int,
) -> dict[str, Any]:
    """GPU-hours and wall time of ``calls`` calls with these token totals, on ``config``'s
    ``workers.num_engines`` engines of ``engine.tensor_parallel_size`` GPUs of kind ``gpu``."""
    card = GPUS[gpu]
    tp = config.engine.tensor_parallel_size
    weights = shape.params * shape.weight_bytes_per_param
    kv_cache = kv_cache_bytes(card.memory_gb * GB, tp, config.engine.gpu_memory_utilization, weights)
    result: dict[str, Any] = {"gpu": gpu, "name": card.name, "gpus_per_engine": tp,
                              "engines": config.workers.num_engines, "kv_cache_gb": round(kv_cache / GB, 1)}
    if kv_cache <= 0 or not calls or not completion_tokens:
        return {**result, "fits": kv_cache > 0, "batch": 0, "gpu_hours": None, "wall_hours": None}
    prompt_per_call, completion_per_call = prompt_tokens / calls, completion_tokens / calls
    per_sequence = (prompt_per_call + completion_per_call) * shape.kv_bytes_per_token
    batch = min(kv_cache / per_sequence, config.engine.max_num_seqs or card.max_num_seqs, _chains(config))
    memory_bytes = (weights * completion_tokens / batch
                    + completion_tokens * (prompt_per_call + completion_per_call / 2) * shape.kv_bytes_per_token)
    flops = 2 * shape.params * (prompt_tokens + completion_tokens)
    peak = (card.fp8_tflops or card.bf16_tflops) if shape.weight_bytes_per_param == 1 else card.bf16_tflops
    bandwidth_s, compute_s = memory_bytes / (card.bandwidth_gb_s * GB * tp), flops / (peak * 1e12 * tp)
    engine_hours = max(bandwidth_s, compute_s) / 3600 / PLANNING_SHARE
    return {
        **result,
        "fits": True,
        "batch": round(batch),
        "bound_by": "memory bandwidth" if bandwidth_s >= compute_s else "compute",
        "gpu_hours_at_ceiling": _figures(engine_hours * PLANNING_SHARE * tp),
        "gpu_hours": _figures(engine_hours * tp),  # at half the ceiling
        "wall_hours": _figures(engine_hours / config.workers.num_engines),
    }


def _figures(value: float) -> float:
    """Three significant figures: an estimate claims no more."""
    return float(f"{value:.3g}")


def _chains(config: RunConfig) -> int:
    """Calls an actor can hold at once: its shards' sample chains, or workers.requests_in_flight."""
    workers = config.workers
    chains = workers.shards_in_flight * workers.units_per_shard * config.instructions_per_aspect
    return min(chains, workers.requests_in_flight or chains)


def _local_folder(config: RunConfig) -> Path | None:
    model = config.engine.model
    if not model:
        from refed_ray.engines.default_model import default_model_path

        folder = default_model_path()
    elif "://" in model and not model.startswith("file://"):
        return None
    else:
        folder = Path(os.path.expanduser(model.removeprefix("file://")))
    return folder if (folder / "config.json").is_file() else None


def _read_config(folder: Path) -> dict[str, Any]:
    try:
        return parse_config((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise UserError(f"cannot read {folder}/config.json: {err}") from None


def parse_config(text: str) -> dict[str, Any]:
    """A Hugging Face config.json's fields, a multimodal model's language model's over its own."""
    hf = json.loads(text)
    return {**hf, **hf.get("text_config", {})}


def _dense_params(hf: dict[str, Any], folder: str) -> float:
    """Parameters of a dense decoder (Llama, Qwen, Mistral, Gemma: gated MLP, GQA attention)."""
    if any(key in hf for key in ("num_local_experts", "num_experts", "n_routed_experts")):
        raise UserError(f"{folder} describes a mixture-of-experts model: pass --model-params "
                        "(its active parameters per token)")
    try:
        hidden, layers, vocab = hf["hidden_size"], hf["num_hidden_layers"], hf["vocab_size"]
        heads, ffn = hf["num_attention_heads"], hf["intermediate_size"]
    except KeyError as err:
        raise UserError(f"{folder} has no {err.args[0]}: pass --model-params") from None
    head_dim = hf.get("head_dim") or hidden // heads
    kv_heads = hf.get("num_key_value_heads") or heads
    attention = 2 * hidden * heads * head_dim + 2 * hidden * kv_heads * head_dim
    embeddings = vocab * hidden * (1 if hf.get("tie_word_embeddings", False) else 2)
    return float(embeddings + layers * (attention + 3 * hidden * ffn))


def _kv_elements_per_token(hf: dict[str, Any]) -> int:
    heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // heads
    return hf["num_hidden_layers"] * (hf.get("num_key_value_heads") or heads) * head_dim * 2


def _is_fp8(hf: dict[str, Any]) -> bool:
    return str(hf.get("quantization_config", {}).get("quant_method", "")).startswith("fp8")


def _dtype_bytes(dtype: str) -> float:
    """vLLM on GPUs runs ``auto`` as the checkpoint's 16-bit dtype (float32 ones as bfloat16)."""
    return 4.0 if dtype == "float32" else 2.0


def describe_shape(shape: ModelShape) -> dict[str, Any]:
    return {**asdict(shape), "params": float(f"{shape.params:.3g}")}
