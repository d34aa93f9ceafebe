"""refed-ray doctor against a local Ray cluster that declares a GPU this machine does not have: the
missing CUDA said as such, a tensor-parallel size no node holds, an OUTPUT no node can write, and
a CPU engine config on which every check passes."""

from __future__ import annotations

import json

import pytest

from refed_ray.cli import main
from refed_ray.watch.doctor import CUDA_MIN_DRIVER, why_no_cuda

# A dense decoder's config.json, small: the model checks read it as they read a real one.
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": 64, "num_hidden_layers": 2,
    "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 1000, "intermediate_size": 128,
    "max_position_embeddings": 32768,
}


@pytest.fixture(scope="module")
def one_gpu_cluster():
    """One node that tells Ray it has a GPU: Ray hands GPU 0 to a task, torch here is a CPU build."""
    import ray

    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture
def model(tmp_path):
    folder = tmp_path / "tiny-model"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(TINY_CONFIG))
    return folder


def doctor(capsys, *flags: str) -> tuple[int, list[dict], str]:
    code = main(["doctor", "--json", *flags])
    captured = capsys.readouterr()
    return code, json.loads(captured.out), captured.err


def failed(checks: list[dict]) -> dict[str, dict]:
    return {check["name"]: check for check in checks if not check["ok"]}


def test_a_declared_gpu_without_cuda_is_named_as_such(one_gpu_cluster, capsys, model, tmp_path):
    code = main(["doctor", "--model", str(model), "--output", str(tmp_path / "out"), "--device", "cuda", "--wait", "0"])
    lines = capsys.readouterr().out.splitlines()
    assert code == 2
    (cuda,) = [line for line in lines if line.startswith("FAIL cuda")]
    assert "torch sees no GPU on node " in cuda
    assert "(torch.cuda.is_available() is False) although Ray gave this task GPU 0: " in cuda
    assert "is built without CUDA (torch.version.cuda is None)" in cuda and "jobs/Dockerfile" in cuda
    # What needs CUDA says it was not checked; what does not is checked on the node all the same.
    assert [line.split()[1] for line in lines if line.startswith("FAIL")] == ["cuda", "gpus", "memory"]
    assert any(line.startswith("ok   output") and "from this node" in line for line in lines)
    assert lines[-1] == "doctor: 3 of 11 checks failed"


def test_a_tensor_parallel_size_no_node_holds_fails_naming_the_numbers(one_gpu_cluster, capsys, model, tmp_path):
    code, checks, err = doctor(capsys, "--model", str(model), "--output", str(tmp_path / "out"), "--device", "cuda",
                               "--tensor-parallel-size", "2", "--wait", "1")
    assert code == 2
    # No node could take an engine: doctor said so, asked the autoscaler, and waited.
    assert "no node can take an engine yet (one asks for 2 GPU)" in err and "waiting up to 1 s" in err
    nodes = failed(checks)["nodes"]
    assert "an engine needs 2 GPUs on one node (tensor_parallel_size 2)" in nodes["message"]
    assert "the most any node has is 1" in nodes["message"] and "--wait 1 s" in nodes["message"]
    assert "--tensor-parallel-size 1" in nodes["fix"]
    assert all(check["where"] == "driver" for check in checks)  # no node to run the node checks on


def test_an_output_no_node_can_write_fails_naming_output(one_gpu_cluster, capsys, model, tmp_path):
    (tmp_path / "a-file").write_text("not a folder")
    output = str(tmp_path / "a-file" / "out")
    code, checks, _ = doctor(capsys, "--model", str(model), "--output", output, "--device", "cpu", "--wait", "0")
    assert code == 2
    problems = failed(checks)
    assert set(problems) == {"run", "output"}  # the driver's preflight, and the node's own write
    assert problems["output"]["where"].startswith("node ")
    assert f"OUTPUT {output} cannot be written from this node: " in problems["output"]["message"]
    assert "worker-policy.json" in problems["output"]["fix"]
    assert f"cannot write to output {output}" in problems["run"]["message"]


def test_a_cpu_engine_config_passes_every_check(one_gpu_cluster, capsys, model, tmp_path):
    code, checks, _ = doctor(capsys, "--model", str(model), "--output", str(tmp_path / "out"), "--device", "cpu",
                             "--wait", "0")
    assert code == 0, failed(checks)
    by_name = {check["name"]: check for check in checks if check["where"] != "driver"}
    assert set(by_name) == {"cuda", "gpus", "model", "context", "memory", "disk", "output", "versions"}
    assert "no CUDA needed" in by_name["cuda"]["message"]
    # The KV cache from the config's shape: 2 layers x 2 KV heads x 16 x (K, V) x 2 bytes = 256 B a token.
    assert "KiB a token" in by_name["memory"]["message"] and "sequences of max_model_len 16384" in by_name["memory"]["message"]
    assert not list((tmp_path / "out").glob(".doctor-probe-*"))  # the node's probe was deleted


def test_a_driver_older_than_torchs_cuda_is_named_with_the_branch_it_needs():
    why, fix = why_no_cuda("2.13.0", "13.0", "570.133.20", CUDA_MIN_DRIVER["13"])
    assert why == "NVIDIA driver 570.133.20 is older than torch's CUDA 13.0 needs (R580 or newer)"
    assert "driver >= 580" in fix and "ImageId" in fix
