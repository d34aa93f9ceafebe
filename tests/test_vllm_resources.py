"""What a vLLM engine actor asks Ray for, and how the engine is configured: no GPU and no vLLM
import needed (``actor_resources`` and ``engine_kwargs`` are plain functions of the config)."""

import json
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
    config = EngineConfig(device="cuda", tensor_parallel_size=2, pipeline_parallel_size=2)
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


# ---- issue 22: what the first GPU run met ----------------------------------------------------

from refed_ray.config import RunConfig, _digest, _REPLY_SHAPING_ENGINE_FIELDS, load_config  # noqa: E402
from refed_ray.engines import model_source, vllm_engine  # noqa: E402
from refed_ray.engines.base import EngineMisconfigured  # noqa: E402
from refed_ray.errors import UserError  # noqa: E402
from tests.conftest import run_cli  # noqa: E402

LLAMA_3_8B = {"model_type": "llama", "max_position_embeddings": 8192, "rope_scaling": None}
LLAMA_31 = {"model_type": "llama", "max_position_embeddings": 131072,
            "rope_scaling": {"rope_type": "llama3", "factor": 8.0}}
GEMMA_3 = {"model_type": "gemma3", "text_config": {"model_type": "gemma3_text", "max_position_embeddings": 131072,
                                                   "rope_scaling": {"rope_type": "linear", "factor": 8.0}}}
OLD_LINEAR_ROPE = {"model_type": "llama", "max_position_embeddings": 4096, "rope_scaling": {"type": "linear", "factor": 2.0}}
GPT2 = {"model_type": "gpt2", "n_positions": 1024}


def model_folder(tmp_path, config: dict):
    folder = tmp_path / "model"
    folder.mkdir(exist_ok=True)
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


@pytest.mark.parametrize("name", sorted(__import__("refed_ray.engines.config", fromlist=["x"]).RESOURCE_DECIDING_KWARGS))
def test_engine_kwargs_that_decide_the_gpus_are_refused_naming_the_field_to_use(name, tmp_path):
    """tensor_parallel_size: 2 in engine_kwargs gave vLLM TP 2 in an actor that reserved one GPU."""
    with pytest.raises(ValueError, match=f"engine_kwargs must not set {name}: .*(engine\\.|workers\\.|refed-ray)"):
        EngineConfig(device="cuda", engine_kwargs={name: 2})
    path = tmp_path / "run.yaml"
    path.write_text(f"engine:\n  engine_kwargs: {{{name}: 2}}\n")
    with pytest.raises(UserError, match=f"engine_kwargs must not set {name}"):
        load_config(str(path), {})


def test_pipeline_parallel_has_its_own_setting():
    config = EngineConfig(device="cuda", tensor_parallel_size=2, pipeline_parallel_size=2)
    assert actor_resources(config) == {"num_gpus": 4}
    assert engine_kwargs(config, "/models/x")["pipeline_parallel_size"] == 2


def test_the_context_window_is_read_as_vllm_reads_it():
    assert model_source.context_window(LLAMA_3_8B) == 8192
    assert model_source.context_window(LLAMA_31) == 131072  # llama3 rope: already scaled
    assert model_source.context_window(GEMMA_3) == 131072  # text_config; gemma3 already scaled
    assert model_source.context_window(OLD_LINEAR_ROPE) == 8192  # vLLM scales linear rope
    assert model_source.context_window(GPT2) == 1024
    assert model_source.context_window({"model_type": "x"}) is None


@pytest.mark.parametrize("model, expected", [(LLAMA_3_8B, 8192), (GPT2, 1024), (LLAMA_31, 16384)])
def test_max_model_len_auto_fits_the_model(model, expected, tmp_path):
    """The default, 16384, was refused by vLLM for every model with a shorter context."""
    folder = model_folder(tmp_path, model)
    assert EngineConfig().max_model_len == "auto"
    assert engine_kwargs(EngineConfig(device="cuda", model=folder), folder)["max_model_len"] == expected
    explicit = EngineConfig(device="cuda", model=folder, max_model_len=512)
    assert engine_kwargs(explicit, folder)["max_model_len"] == 512
    assert engine_kwargs(EngineConfig(device="cuda", model=folder, max_model_len=None), folder)["max_model_len"] is None


def test_an_unreadable_model_config_keeps_the_old_default(tmp_path):
    assert engine_kwargs(EngineConfig(device="cuda"), str(tmp_path / "nothing"))["max_model_len"] == 16384


def test_unset_max_model_len_keeps_the_resume_fingerprint_of_the_old_default():
    before = RunConfig().engine.model_dump(include=_REPLY_SHAPING_ENGINE_FIELDS) | {"max_model_len": 16384}
    unset = RunConfig().fingerprint("p", "r")["engine"]
    assert unset == _digest(before) == RunConfig(engine={"max_model_len": 16384}).fingerprint("p", "r")["engine"]
    assert unset != RunConfig(engine={"max_model_len": 8192}).fingerprint("p", "r")["engine"]
    assert unset != RunConfig(engine={"max_model_len": None}).fingerprint("p", "r")["engine"]


def test_an_explicit_max_model_len_above_the_model_is_exit_2_before_ray(tmp_path):
    folder = model_folder(tmp_path, LLAMA_3_8B)
    vllm_engine.check(EngineConfig(device="cuda", model=folder))  # auto fits
    vllm_engine.check(EngineConfig(device="cuda", model=folder, max_model_len=8192))
    config = tmp_path / "run.yaml"
    config.write_text(f"engine:\n  model: {folder}\n  max_model_len: 16384\n")
    result = run_cli("run", "--config", str(config), "--output", str(tmp_path / "out"), "--device", "cuda", timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert f"engine.max_model_len 16384 is longer than {folder}'s context window of 8192 tokens" in result.stderr
    assert "Traceback" not in result.stderr and "Ray" not in result.stderr, result.stderr
    assert not (tmp_path / "out" / "run.json").exists()  # refused before the run started


def test_a_model_folder_missing_on_the_driver_is_left_to_the_engines_on_a_cluster(tmp_path, monkeypatch):
    missing = EngineConfig(device="cuda", model=str(tmp_path / "on-the-gpu-nodes-only"))
    monkeypatch.setenv("RAY_ADDRESS", "local")
    with pytest.raises(UserError, match="is not a folder on this machine"):
        vllm_engine.check(missing)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")  # a cluster's head (ray job submit sets it)
    vllm_engine.check(missing)
    with pytest.raises(EngineMisconfigured, match=r"engine.model '.*on-the-gpu-nodes-only' is not a folder on node"):
        vllm_engine.resolve_model_path(missing)  # where the engine starts


def test_the_hugging_face_token_goes_to_the_engines_as_a_secret(monkeypatch):
    from refed_ray.run.pipeline import _engine_secrets

    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    assert _engine_secrets(RunConfig()) == {}
    monkeypatch.setenv("HF_TOKEN", "hf_secretvalue123")
    monkeypatch.setenv("HUGGING_FACE_HUB_TOKEN", "hf_secretvalue123")
    config = RunConfig(engine={"model": "meta-llama/Llama-3.1-8B-Instruct"})
    assert _engine_secrets(config) == {"HF_TOKEN": "hf_secretvalue123", "HUGGING_FACE_HUB_TOKEN": "hf_secretvalue123"}
    assert "hf_secretvalue123" not in json.dumps(config.public_dump())


@pytest.fixture
def refusing_hub(monkeypatch):
    """A local stand-in for the Hugging Face hub: org/gated is gated (HTTP 401), org/other has no
    config.json (HTTP 404, EntryNotFound), org/missing does not exist (HTTP 404, RepoNotFound)."""
    import http.server
    import threading

    from huggingface_hub import constants

    class Refuse(http.server.BaseHTTPRequestHandler):
        def do_GET(self):
            repo = "/".join(self.path.split("/")[1:3])  # /org/name/resolve/main/config.json
            code, error = {"org/gated": (401, "GatedRepo"), "org/missing": (404, "RepoNotFound")}.get(
                repo, (404, "EntryNotFound"))
            self.send_response(code)
            self.send_header("X-Error-Code", error)
            self.end_headers()

        do_HEAD = do_GET

        def log_message(self, *args):
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Refuse)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    endpoint = f"http://127.0.0.1:{server.server_address[1]}"
    monkeypatch.setattr(constants, "ENDPOINT", endpoint)
    monkeypatch.setenv("HF_ENDPOINT", endpoint)  # for the CLI's own process
    yield endpoint
    server.shutdown()


def test_a_model_the_hub_refuses_is_exit_2_naming_hf_token_before_ray(refusing_hub, tmp_path, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    with pytest.raises(UserError, match=r"hub refused engine.model 'org/gated' \(HTTP 401\).*HF_TOKEN"):
        vllm_engine.check(EngineConfig(device="cuda", model="org/gated"))
    with pytest.raises(UserError, match=r"hub refused engine.model 'org/missing' \(HTTP 404\)"):
        vllm_engine.check(EngineConfig(device="cuda", model="org/missing"))
    vllm_engine.check(EngineConfig(device="cuda", model="org/other"))  # no config.json: vLLM's to judge
    result = run_cli("run", "--model", "org/gated", "--output", str(tmp_path / "out"), "--device", "cuda",
                     timeout=120)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "the Hugging Face hub refused engine.model 'org/gated'" in result.stderr and "HF_TOKEN" in result.stderr
    assert "Traceback" not in result.stderr and not (tmp_path / "out" / "run.json").exists()


def test_vllm_loading_a_gated_model_is_misconfigured_naming_hf_token():
    """In the engine actor, vLLM (through transformers) meets the hub's refusal wrapped in OSError."""
    import httpx
    from huggingface_hub.errors import GatedRepoError

    response = httpx.Response(403, request=httpx.Request("GET", "https://huggingface.co/org/gated"))

    def load():
        try:
            raise GatedRepoError("Access to model org/gated is restricted", response=response)
        except GatedRepoError as err:
            raise OSError("You are trying to access a gated repo.") from err

    with pytest.raises(EngineMisconfigured, match=r"hub refused engine.model 'org/gated' \(GatedRepoError\).*HF_TOKEN"):
        with model_source.hub_refusals_named(EngineConfig(model="org/gated")):
            load()
    with pytest.raises(ValueError, match="other"):  # anything else is left as it is
        with model_source.hub_refusals_named(EngineConfig(model="org/gated")):
            raise ValueError("other")
