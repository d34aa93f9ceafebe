"""What a vLLM engine actor asks Ray for, and how the engine is configured: no GPU and no vLLM
import needed (``actor_resources`` and ``engine_kwargs`` are plain functions of the config)."""

import os
import subprocess
import sys

import pytest

from refed_ray.engines.config import EngineConfig
from refed_ray.engines.vllm_engine import (
    actor_resources,
    cpu_has_native_bf16,
    engine_kwargs,
    executor_backend,
    resolve_dtype,
)
from tests.conftest import ROOT

AVX2_ONLY = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma bmi2 sha_ni\n"
ZEN4 = "flags\t\t: fpu avx2 avx512f avx512_bf16 avx512_vnni\n"
SAPPHIRE_RAPIDS = "flags\t\t: avx2 avx512f amx_bf16 amx_tile amx_int8\n"
GRAVITON3 = "processor\t: 0\nFeatures\t: fp asimd sve bf16 i8mm\n"


def test_cpu_engine_takes_one_cpu():
    assert actor_resources(EngineConfig(device="cpu")) == {"num_cpus": 1}


def test_single_gpu_engine_reserves_its_gpu_in_process():
    config = EngineConfig(device="cuda")
    assert actor_resources(config) == {"num_gpus": 1}
    assert executor_backend(config) == "uni"


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_tensor_parallel_engine_reserves_all_its_gpus_on_one_actor(tp):
    config = EngineConfig(device="cuda", tensor_parallel_size=tp)
    resources = actor_resources(config)
    # One actor holds every GPU of the engine (hence one node); vLLM's multiprocessing executor
    # spawns the ranks. No placement group: nothing stays reserved after the actor exits.
    assert resources == {"num_gpus": tp}
    assert "ray_remote_args_fn" not in resources and "scheduling_strategy" not in resources
    assert executor_backend(config) == "mp"
    assert engine_kwargs(config, "m")["distributed_executor_backend"] == "mp"


def test_pipeline_parallel_ranks_count_too():
    config = EngineConfig(device="cuda", tensor_parallel_size=2, engine_kwargs={"pipeline_parallel_size": 2})
    assert actor_resources(config) == {"num_gpus": 4}
    assert executor_backend(config) == "mp"


def test_bf16_only_with_native_bf16_instructions():
    assert not cpu_has_native_bf16(AVX2_ONLY)
    assert cpu_has_native_bf16(ZEN4)
    assert cpu_has_native_bf16(SAPPHIRE_RAPIDS)
    assert cpu_has_native_bf16(GRAVITON3)
    assert not cpu_has_native_bf16("")


def test_dtype_auto_follows_the_cpu_and_leaves_gpus_to_vllm():
    cpu = EngineConfig(device="cpu")
    assert resolve_dtype(cpu, AVX2_ONLY) == "float32"
    assert resolve_dtype(cpu, ZEN4) == "bfloat16"
    assert resolve_dtype(EngineConfig(device="cuda"), AVX2_ONLY) == "auto"


@pytest.mark.parametrize("dtype", ["bfloat16", "float16", "float32"])
def test_dtype_override_wins(dtype):
    assert resolve_dtype(EngineConfig(device="cpu", dtype=dtype), AVX2_ONLY) == dtype
    assert resolve_dtype(EngineConfig(device="cuda", dtype=dtype)) == dtype


def test_dtype_is_validated():
    with pytest.raises(ValueError, match="dtype"):
        EngineConfig(dtype="fp8")


def test_engine_kwargs_are_plain_and_engine_kwargs_override(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    config = EngineConfig(
        device="cpu", dtype="float32", max_num_seqs=64, cpu_kvcache_space_gib=2,
        engine_kwargs={"enable_prefix_caching": True, "max_num_seqs": 32},
    )
    kwargs = engine_kwargs(config, "/models/x")
    assert kwargs["model"] == "/models/x" and kwargs["dtype"] == "float32"
    assert kwargs["enforce_eager"] and kwargs["distributed_executor_backend"] == "uni"
    assert kwargs["max_num_seqs"] == 32 and kwargs["enable_prefix_caching"] is True
    assert kwargs["structured_outputs_config"] == {"backend": "xgrammar", "disable_any_whitespace": True}
    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "2"


def test_the_driver_sizes_engines_without_importing_vllm():
    code = (
        "import sys; from refed_ray.config import EngineConfig; "
        "from refed_ray.engines.vllm_engine import actor_resources, engine_kwargs; "
        "c = EngineConfig(device='cuda', tensor_parallel_size=4); actor_resources(c); engine_kwargs(c, 'm'); "
        "assert 'vllm' not in sys.modules and 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
