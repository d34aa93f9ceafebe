"""cluster.yaml against Ray's own cluster-config schema; the KubeRay RayJob against its shape."""

import copy
import shlex

import yaml
from ray.autoscaler._private.util import prepare_config, validate_config

from tests.conftest import ROOT


def test_cluster_yaml_validates_with_spot_gpu_workers_and_an_on_demand_head():
    config = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    validate_config(prepare_config(copy.deepcopy(config)))  # what `ray up` runs first
    assert config["provider"]["type"] == "aws"
    nodes = config["available_node_types"]
    head = nodes[config["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"]
    workers = [n for name, n in nodes.items() if name != config["head_node_type"]]
    assert workers and all(w["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for w in workers)
    assert all(w["min_workers"] <= w["max_workers"] for w in workers)
    assert any("refed-ray[gpu]" in command for command in config["setup_commands"])


def test_rayjob_manifest_shape():
    job = yaml.safe_load((ROOT / "jobs" / "rayjob.yaml").read_text())
    assert (job["apiVersion"], job["kind"]) == ("ray.io/v1", "RayJob")
    spec = job["spec"]
    entry = shlex.split(spec["entrypoint"])
    assert entry[:2] == ["python", "jobs/synthesize.py"] and "--output" in entry
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"]
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    worker = group["template"]["spec"]["containers"][0]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert "command" not in worker  # KubeRay injects `ray start` into the container command
