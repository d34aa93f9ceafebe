"""The first GPU run (issue 22), on a simulated GPU cluster: ray.cluster_utils.Cluster with a
CPU-only head and worker nodes that declare GPUs, the driver (``refed-ray run``) in a process of
its own joined to it, and engines of the test kind ``fake-vllm`` (tests/gpu_kind.py), whose
actors ask Ray for GPUs through ``vllm_engine.actor_options`` as the vllm kind's do. Ray Data's
no-progress timeout is scaled down to NO_PROGRESS_S (its default is 1800 s).

Slow on 2 cores (every node is a raylet, every actor a process): few units, K 2, one unit a shard.
Each test makes its own cluster in a temp dir of its own (so Ray's ray_current_cluster file of
/tmp/ray is never touched) and tears it down whatever happens."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

import pytest
import yaml

from refed_ray.storage import Storage
from tests.conftest import ROOT, pairs, write_jsonl
from tests.test_faults import planned_samples, unit_samples

NO_PROGRESS_S = 4  # Ray Data's no-progress timeout, scaled down for the test (its default: 1800)
K = 2

# The driver: joins the test's cluster with the job runtime env that registers the test kind in
# every Ray worker process, then runs the CLI (which finds Ray up and uses it).
DRIVER = (
    "import sys, ray, tests.gpu_kind as kind; "
    "ray.init(runtime_env=kind.GPU_JOB_ENV, log_to_driver=False); "
    "from refed_ray.cli import main; sys.exit(main(sys.argv[1:]))"
)


@pytest.fixture
def gpu_cluster(request):
    """A Ray cluster with a CPU-only head; the test adds GPU nodes (``add_gpu_node``)."""
    from ray.cluster_utils import Cluster

    temp_dir = tempfile.mkdtemp(prefix="rg", dir="/tmp")  # short: Ray's socket paths live under it
    # Removed even when the head fails to start (an overloaded machine: Ray gives a node 30 s).
    request.addfinalizer(lambda: shutil.rmtree(temp_dir, ignore_errors=True))
    cluster = Cluster(initialize_head=True, head_node_args={
        "num_cpus": 2, "num_gpus": 0, "include_dashboard": False, "temp_dir": temp_dir,
        # A loaded 2-core machine misses Ray's default health checks (5 x 3 s): a live raylet
        # marked dead ends the run. Removed nodes are still found dead, in 30 s.
        "_system_config": {"health_check_failure_threshold": 10, "health_check_timeout_ms": 20000}})

    request.addfinalizer(cluster.shutdown)  # before the folder goes (finalizers run last first)
    cluster.temp_dir = temp_dir
    return cluster


def add_gpu_node(cluster, gpus: int = 2):
    return cluster.add_node(num_cpus=2, num_gpus=gpus, temp_dir=cluster.temp_dir)


def write_config(tmp_path, num_samples: int, workers: dict | None = None, **engine_kwargs) -> list[str]:
    """The run's arguments: ``num_samples`` samples, one unit a shard, engines of the test kind."""
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(2))
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "num_samples": num_samples, "instructions_per_aspect": K, "output_shared_filesystem": True,
        "engine": {"kind": "fake-vllm", "engine_kwargs": {"gpus_log": str(tmp_path / "gpus.log"), **engine_kwargs}},
        "workers": {"num_engines": 2, "units_per_shard": 1, **(workers or {})},
    }))
    return ["run", "--config", str(config), "--seeds", str(seeds), "--output", str(tmp_path / "out"),
            "--device", "cuda"]


def start_driver(cluster, args: list[str], **env) -> subprocess.Popen:
    environment = {**os.environ, "RAY_ADDRESS": cluster.address,
                   "RAY_DATA_EXECUTION_NO_PROGRESS_TIMEOUT_S": str(NO_PROGRESS_S), **env}
    return subprocess.Popen([sys.executable, "-c", DRIVER, *args], cwd=ROOT, env=environment, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def finish(driver: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    try:
        stdout, stderr = driver.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(driver.pid, signal.SIGKILL)
        stdout, stderr = driver.communicate()
        pytest.fail(f"the run did not end in {timeout} s:\n{stderr[-4000:]}")
    return subprocess.CompletedProcess(driver.args, driver.returncode, stdout, stderr)


def assert_delivered_exactly(tmp_path, num_samples: int, result) -> None:
    """Exit 0, N delivered, and every planned sample committed once: nothing lost, nothing doubled."""
    assert result.returncode == 0, result.stderr[-4000:]
    assert "Traceback" not in result.stderr, result.stderr[-4000:]
    storage = Storage(str(tmp_path / "out"))
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["delivered"] == num_samples
    samples = unit_samples(storage)
    assert samples == planned_samples(storage, K)  # each (unit_id, sample_index) once
    assert len(samples) == len(set(samples))


def engines_seen(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "gpus.log").read_text().splitlines()]


def test_gpu_nodes_joining_long_after_the_start_still_get_the_run_done(gpu_cluster, tmp_path):
    """Autoscaling from zero GPU nodes: the engines wait longer than Ray Data's no-progress
    timeout for a node to hold them; the run must not stop for it."""
    driver = start_driver(gpu_cluster, write_config(tmp_path, num_samples=4))
    time.sleep(3 * NO_PROGRESS_S + 10)  # the driver is up and its actors pending well past the timeout
    assert driver.poll() is None, "".join(driver.communicate())[-6000:]
    add_gpu_node(gpu_cluster)
    assert_delivered_exactly(tmp_path, 4, finish(driver, timeout=400))
    assert all(len(engine["gpu_ids"]) == 1 for engine in engines_seen(tmp_path))


def test_a_shard_slower_than_the_no_progress_timeout_is_delivered(gpu_cluster, tmp_path):
    """And the driver's Hugging Face token reaches the engines (gated models), and nothing else."""
    add_gpu_node(gpu_cluster)
    token = "hf_DriverOnlyToken123"
    # A unit's chain is several calls: one shard takes several times the timeout.
    driver = start_driver(gpu_cluster, write_config(tmp_path, num_samples=2, delay=NO_PROGRESS_S),
                          HF_TOKEN=token, HUGGING_FACE_HUB_TOKEN=token)
    result = finish(driver, timeout=400)
    assert_delivered_exactly(tmp_path, 2, result)
    # The nodes were started without it: the engines have it from the driver.
    assert all(engine["hf_token"] and engine["hub_token"] for engine in engines_seen(tmp_path))
    written = [path for path in (tmp_path / "out").rglob("*") if path.is_file()]
    assert not [path for path in written if token.encode() in path.read_bytes()]
    assert token not in result.stdout + result.stderr


def test_a_model_folder_only_the_gpu_nodes_have_is_checked_where_the_engines_run(gpu_cluster, tmp_path):
    """On a cluster the driver (on a CPU head) may not have the folder the GPU nodes have (a baked
    image, an NVMe mount): the engines check it, and a node without it stops the run with exit 2."""
    weights = tmp_path / "weights"
    args = [*write_config(tmp_path, num_samples=2), "--model", str(weights)]
    driver = start_driver(gpu_cluster, args)
    while not (tmp_path / "out" / "run.json").exists():  # the driver's checks are behind it
        assert driver.poll() is None, "".join(driver.communicate())[-6000:]
        time.sleep(0.5)
    weights.mkdir()  # the GPU node comes with it
    (weights / "config.json").write_text(json.dumps({"max_position_embeddings": 8192}))
    add_gpu_node(gpu_cluster)
    assert_delivered_exactly(tmp_path, 2, finish(driver, timeout=400))

    elsewhere = str(tmp_path / "not-on-any-node")
    args = [*write_config(tmp_path, num_samples=2), "--model", elsewhere, "--output", str(tmp_path / "out2")]
    result = finish(start_driver(gpu_cluster, args), timeout=300)
    assert result.returncode == 2, result.stderr[-4000:]
    assert f"engine.model '{elsewhere}' is not a folder on node" in result.stderr
    assert "Traceback" not in result.stderr


def test_tensor_parallel_engines_each_hold_their_own_gpus(gpu_cluster, tmp_path):
    for _ in range(2):
        add_gpu_node(gpu_cluster, gpus=2)
    args = write_config(tmp_path, num_samples=8, delay=0.5)
    driver = start_driver(gpu_cluster, [*args, "--tensor-parallel-size", "2", "--num-engines", "4"])
    assert_delivered_exactly(tmp_path, 8, finish(driver, timeout=500))
    engines = engines_seen(tmp_path)
    assert all(len(engine["gpu_ids"]) == 2 for engine in engines)
    assert all(engine["cuda_visible"].split(",") == engine["gpu_ids"] for engine in engines)
    # Two nodes of two GPUs hold two engines of TP 2 at once, one a node, each with its node's pair.
    held = {(engine["node"], tuple(sorted(engine["gpu_ids"]))) for engine in engines}
    assert len({node for node, _ in held}) == 2


def test_the_whole_gpu_pool_lost_mid_synthesis_and_replaced_delivers_n_exactly(gpu_cluster, tmp_path):
    node = add_gpu_node(gpu_cluster)
    # One shard at a time, a few seconds each: most of the synthesis is left when the node goes.
    one_at_a_time = {"num_engines": 1, "shards_in_flight": 1}
    driver = start_driver(gpu_cluster, write_config(tmp_path, num_samples=8, workers=one_at_a_time, delay=1.0))
    markers = tmp_path / "out" / "_markers" / "synthesis"
    deadline = time.time() + 300
    while not (markers.is_dir() and len(os.listdir(markers)) >= 1):
        assert driver.poll() is None and time.time() < deadline, "".join(driver.communicate())[-6000:]
        time.sleep(0.5)
    gpu_cluster.remove_node(node, allow_graceful=False)  # every engine's node gone at once
    done_at_loss = len(os.listdir(markers))
    time.sleep(2)
    add_gpu_node(gpu_cluster)
    assert_delivered_exactly(tmp_path, 8, finish(driver, timeout=500))
    assert len({engine["node"] for engine in engines_seen(tmp_path)}) == 2  # engines ran on the new node
    shards = len(planned_samples(Storage(str(tmp_path / "out")), K)) // K  # one unit a shard
    assert done_at_loss < shards  # the replacement node did the rest


def test_tensor_parallel_no_node_can_hold_is_refused_at_once(gpu_cluster, tmp_path):
    add_gpu_node(gpu_cluster, gpus=2)
    started = time.time()
    driver = start_driver(gpu_cluster, [*write_config(tmp_path, num_samples=2), "--tensor-parallel-size", "4"])
    result = finish(driver, timeout=120)
    assert result.returncode == 2, result.stderr[-4000:]
    assert "one engine needs 4 GPUs on one node" in result.stderr
    assert "largest GPU node of the Ray cluster has 2" in result.stderr and "--tensor-parallel-size" in result.stderr
    assert "Traceback" not in result.stderr and time.time() - started < 120
