"""Engine kinds (refed_ray/engines/kinds.py): one registry entry per kind decides what its actors
ask Ray for, what the driver checks, which secrets it hands over; config and CLI accept the
registered kinds. No Ray cluster, no GPU, no vLLM needed: the actors' Ray options are plain
values, and Ray validates them as actor options without starting."""

import subprocess
import sys

import pyarrow
import pytest
import ray

from refed_ray import cli
from refed_ray.config import RunConfig, load_config
from refed_ray.engines import kinds
from refed_ray.engines.config import EngineConfig
from refed_ray.engines.kinds import create_engine
from refed_ray.errors import UserError
from refed_ray.run.passes import engine_map_args as _engine_map_args
from refed_ray.run.pipeline import _check_engine, _engine_secrets, resolve_device_on_cluster
from tests.conftest import FAKE_ENGINE, ROOT
from tests.fake_engine import FakeEngine

# What _engine_map_args adds for the pass itself; the rest is the engine actor's Ray options.
PASS_ARGS = {"batch_size", "batch_format", "compute", "max_restarts", "max_task_retries"}


@pytest.fixture
def gpu_fake_kind():
    """A kind of this test's own: the fake teacher on an actor that reserves one GPU."""
    kind = kinds.register(kinds.EngineKind(
        name="fake-gpu",
        build=lambda config, rate_limiter: FakeEngine(config),
        actor_resources=lambda config: {"num_gpus": 1},
    ))
    yield kind
    kinds.unregister(kind.name)


def actor_options(config: RunConfig, engines: int = 2) -> dict:
    """The Ray options of the run's engine actors, checked by Ray as actor options."""
    args = _engine_map_args(config, engines)
    assert args["batch_size"] is None and args["compute"].max_size == min(config.workers.num_engines, engines)
    options = {name: value for name, value in args.items() if name not in PASS_ARGS}
    ray.remote(**options)(FakeEngine)  # raises on an option Ray would refuse when the actor starts
    return options


def test_a_registered_kind_is_accepted_by_config_and_cli_and_sizes_its_actors(gpu_fake_kind, tmp_path):
    args = cli._parser().parse_args(["run", "--engine", "fake-gpu", "--output", str(tmp_path / "out")])
    config = cli.config_from_args(args)
    assert config.engine.kind == "fake-gpu"
    assert actor_options(config) == {"num_gpus": 1}
    assert isinstance(create_engine(config.engine), FakeEngine)
    _check_engine(config)  # nothing to check by default
    assert _engine_secrets(config) == {}
    assert resolve_device_on_cluster(config) is config


def test_a_custom_engine_asks_ray_for_its_engine_resources(tmp_path):
    default = RunConfig(engine=FAKE_ENGINE)
    assert actor_options(default) == {"num_cpus": 1}
    path = tmp_path / "run.yaml"
    path.write_text("engine:\n  kind: custom\n  class_path: tests.fake_engine:FakeEngine\n"
                    "  resources: {num_cpus: 2, num_gpus: 1, resources: {big_memory_node: 0.5}}\n")
    config = load_config(str(path), {})
    assert actor_options(config) == {"num_cpus": 2, "num_gpus": 1, "resources": {"big_memory_node": 0.5}}


def test_engine_resources_name_gpus_with_num_gpus():
    with pytest.raises(ValueError, match="GPU is set with num_gpus, not in resources"):
        EngineConfig(**FAKE_ENGINE, resources={"resources": {"GPU": 1}})


def test_vllm_actors_are_sized_by_vllm_and_refuse_engine_resources():
    gpu = actor_options(RunConfig(engine={"device": "cuda", "tensor_parallel_size": 2}))
    assert gpu == {"num_gpus": 2, "runtime_env": {"env_vars": {"RAY_kill_child_processes_on_worker_exit": "false"}}}
    assert actor_options(RunConfig(engine={"device": "cpu"}))["num_cpus"] == 1
    with pytest.raises(ValueError, match="engine.resources is not read by engine kind 'vllm'"):
        EngineConfig(device="cuda", resources={"num_gpus": 1})


def test_an_unknown_kind_is_refused_naming_the_known_kinds(gpu_fake_kind, tmp_path, capsys):
    path = tmp_path / "run.yaml"
    path.write_text("engine:\n  kind: tgi\n")
    with pytest.raises(UserError, match=r"engine.kind: Input should be 'vllm', 'openai', 'custom' or 'fake-gpu'"):
        load_config(str(path), {})
    with pytest.raises(UserError, match=r"engine.kind 'tgi' is not a known engine kind: 'vllm', 'openai', "):
        kinds.engine_kind("tgi")
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["run", "--engine", "tgi"])
    refused = capsys.readouterr().err
    assert "invalid choice: 'tgi'" in refused and all(name in refused for name in kinds.names())
    assert kinds.names() == ["vllm", "openai", "custom", "fake-gpu"]


def test_a_kind_unregistered_is_refused_again(gpu_fake_kind):
    kinds.unregister(gpu_fake_kind.name)
    with pytest.raises(ValueError, match="Input should be 'vllm', 'openai' or 'custom'"):
        EngineConfig(kind="fake-gpu")


def test_the_openai_key_is_checked_once_for_driver_and_actors(monkeypatch):
    config = RunConfig(engine={"kind": "openai", "model": "teacher", "api": {"api_key_env": "TEACHER_KEY"}})
    monkeypatch.delenv("TEACHER_KEY", raising=False)
    from refed_ray.engines.openai_engine import OpenAIEngine

    refusals = set()
    for attempt in (lambda: _check_engine(config), lambda: _engine_secrets(config),
                    lambda: OpenAIEngine(config.engine)):
        with pytest.raises(UserError) as caught:
            attempt()
        refusals.add(str(caught.value))
    assert refusals == {"engine openai needs an API key in the environment variable TEACHER_KEY"}
    monkeypatch.setenv("TEACHER_KEY", "sk-test-123456")
    _check_engine(config)
    assert _engine_secrets(config) == {"TEACHER_KEY": "sk-test-123456"}
    assert actor_options(config) == {"num_cpus": 1}


def test_only_vllm_resolves_device_auto(monkeypatch):
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8, "GPU": 4})
    assert resolve_device_on_cluster(RunConfig()).engine.device == "cuda"
    monkeypatch.setattr(ray, "cluster_resources", lambda: {"CPU": 8})
    assert resolve_device_on_cluster(RunConfig()).engine.device == "cpu"
    custom = RunConfig(engine=FAKE_ENGINE)
    assert resolve_device_on_cluster(custom) is custom


def test_the_registry_imports_no_engine_module():
    code = ("import sys; from refed_ray.config import RunConfig; from refed_ray.engines import kinds; "
            "RunConfig(engine={'kind': 'openai', 'model': 'm'}); "
            "assert kinds.names()[:3] == ['vllm', 'openai', 'custom']; "
            "assert not {'vllm', 'openai', 'refed_ray.engines.vllm_engine', 'refed_ray.engines.openai_engine'} "
            "& set(sys.modules), sorted(m for m in sys.modules if 'engine' in m)")
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.parametrize("engine", [
    {"device": "cuda"},  # the default vLLM engine on a GPU cluster
    {**FAKE_ENGINE, "resources": {"num_gpus": 1}},
])
def test_a_pass_whose_engines_reserve_a_gpu_builds_its_ray_dataset(engine, local_ray):
    """Ray 2.60's public map_batches refuses num_gpus with batch_size=None (one shard a batch):
    every GPU run failed before its first actor. The pass's dataset must build, lazily (no GPU
    here), with one whole shard a batch and the GPU in its actors' options."""
    from refed_ray.run.passes import engine_dataset
    from refed_ray.run.workers import RunWorker

    config = RunConfig(engine=engine)
    blocks = [pyarrow.table({"shard": ["s-0"], "unit_id": ["u-0"]})]
    dataset = engine_dataset(blocks, RunWorker, {}, config, engines=1)
    operator = dataset._logical_plan.dag
    assert operator.batch_size is None and operator.min_rows_per_bundled_input is None
    assert operator.ray_remote_args["num_gpus"] == 1
    # Ray Data's no-progress timeout (1800 s by default) would stop a pass whose shard, or whose
    # GPU node, takes longer: off for the pass's executor (issue 22; tests/test_gpu_cluster.py runs it).
    assert dataset.context.execution_no_progress_timeout_s == -1
