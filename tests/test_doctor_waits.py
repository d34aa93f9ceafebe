"""refed-ray doctor on a cluster that has no node for the engines yet (GPU workers scaling from
zero): it says so, waits, and checks the node that joins within the wait."""

from __future__ import annotations

import json

import pytest

from refed_ray.config import load_config
from refed_ray.watch.doctor import doctor
from tests.test_doctor import TINY_CONFIG


@pytest.fixture
def cpu_head_only():
    """A head without GPUs, as cluster.yaml's; the test adds a GPU worker while doctor waits."""
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "num_gpus": 0})
    ray.init(address=cluster.address, include_dashboard=False, log_to_driver=False)
    yield cluster
    ray.shutdown()
    cluster.shutdown()


def test_doctor_waits_for_a_node_that_can_take_an_engine(cpu_head_only, tmp_path):
    model = tmp_path / "tiny-model"
    model.mkdir()
    (model / "config.json").write_text(json.dumps(TINY_CONFIG))
    config = load_config(None, {"engine.model": str(model), "output": str(tmp_path / "out"), "engine.device": "cuda"})
    said = []

    def a_gpu_worker_joins(line: str) -> None:  # as the autoscaler would, once asked
        said.append(line)
        cpu_head_only.add_node(num_cpus=1, num_gpus=1)

    checks = {check.name: check for check in doctor(config, wait_s=120, say=a_gpu_worker_joins)}
    assert said == ["doctor: no node can take an engine yet (one asks for 1 GPU): asked the autoscaler for one, "
                    "waiting up to 120 s"]
    assert checks["nodes"].ok and checks["nodes"].message.startswith("1 node(s) can take an engine (1 GPU each)")
    # The node that joined ran the node checks: its GPU is declared, torch here has no CUDA.
    assert checks["cuda"].where.endswith("(1 CPU, 1 GPU)")
    assert not checks["cuda"].ok and "although Ray gave this task GPU 0" in checks["cuda"].message
    assert checks["versions"].ok and checks["model"].ok
