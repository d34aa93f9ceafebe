import pytest

from refed_ray.config import RunConfig, load_config
from refed_ray.errors import UserError


def test_yaml_then_flag_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("num_samples: 50\nengine:\n  model: some/model\nsampling:\n  temperature: 0.2\n")
    config = load_config(str(path), {"num_samples": 7, "engine.tensor_parallel_size": 2, "seeds": None})
    assert (config.num_samples, config.engine.model, config.engine.tensor_parallel_size) == (7, "some/model", 2)
    assert config.sampling.temperature == 0.2 and config.seeds is None


@pytest.mark.parametrize(
    "yaml_text, expected",
    [
        ("num_samples: -3\n", "num_samples: Input should be greater than or equal to 1 (got -3)"),
        ("sampling:\n  temperature: 3.5\n", "sampling.temperature: Input should be less than or equal to 2 (got 3.5)"),
        ("engine:\n  kind: tgi\n", "engine.kind: Input should be 'vllm', 'openai' or 'custom' (got 'tgi')"),
        ("num_sample: 5\n", "num_sample: unknown key"),
        ("workers:\n  num_engines: 0\n", "workers.num_engines: Input should be greater than or equal to 1"),
    ],
)
def test_bad_values_name_the_field(tmp_path, yaml_text, expected):
    path = tmp_path / "bad.yaml"
    path.write_text(yaml_text)
    with pytest.raises(UserError) as caught:
        load_config(str(path), {})
    assert f"invalid config ({path}):" in str(caught.value)
    assert expected in str(caught.value)


def test_unreadable_config_files(tmp_path):
    with pytest.raises(UserError, match="config file not found"):
        load_config(str(tmp_path / "missing.yaml"), {})
    broken = tmp_path / "broken.yaml"
    broken.write_text("a: [1, 2\n")
    with pytest.raises(UserError, match="not valid YAML"):
        load_config(str(broken), {})
    listed = tmp_path / "list.yaml"
    listed.write_text("- 1\n")
    with pytest.raises(UserError, match="must hold a mapping"):
        load_config(str(listed), {})


def test_fingerprint_separates_incompatible_settings():
    base = RunConfig()
    same = RunConfig(num_samples=10_000, workers={"num_engines": 8})
    other = RunConfig(engine={"model": "meta-llama/Llama-3.1-8B-Instruct"}, sampling={"temperature": 0.1})
    assert base.fingerprint("p", "r") == same.fingerprint("p", "r")
    changed = {k for k, v in other.fingerprint("p", "r").items() if base.fingerprint("p", "r")[k] != v}
    assert changed == {"model", "sampling"}


def test_secrets_never_reach_the_written_config():
    config = RunConfig(
        storage_options={"key": "AKIAEXAMPLE", "secret": "s3cr3t", "client_kwargs": {"endpoint_url": "http://x"}},
        engine={"model_storage_options": {"token": "hf_abc", "anon": False}},
    )
    dumped = str(config.public_dump())
    assert "AKIAEXAMPLE" not in dumped and "s3cr3t" not in dumped and "hf_abc" not in dumped
    assert "http://x" in dumped
    assert config.fingerprint("p", "r") == RunConfig().fingerprint("p", "r")


def test_errors_and_dumps_never_show_credentials_but_keep_settings(tmp_path):
    misspelt = tmp_path / "key.yaml"
    misspelt.write_text("engine:\n  api:\n    api_key: sk-live-123\n")
    with pytest.raises(UserError) as caught:
        load_config(str(misspelt), {})
    assert "engine.api.api_key: unknown key" in str(caught.value) and "sk-live-123" not in str(caught.value)
    dumped = RunConfig(engine={"kind": "openai", "model": "m", "api": {"api_key_env": "MY_KEY", "tokens_per_minute": 9}}).public_dump()
    assert dumped["engine"]["api"]["api_key_env"] == "MY_KEY" and dumped["engine"]["api"]["tokens_per_minute"] == 9
    assert dumped["sampling"]["response_max_tokens"] == 4096


def test_null_sections_and_non_utf8_files(tmp_path):
    nulls = tmp_path / "null.yaml"
    nulls.write_text("engine: null\n")
    assert load_config(str(nulls), {"engine.model": "m"}).engine.model == "m"
    binary = tmp_path / "latin1.yaml"
    binary.write_bytes(b"seed: 1\nnote: caf\xe9\n")
    with pytest.raises(UserError, match="is not UTF-8 text"):
        load_config(str(binary), {})


def test_an_engine_its_actor_cannot_fill_is_warned_about(caplog):
    from refed_ray.run.workers import _warn_if_underfilled

    config = RunConfig.model_validate({"instructions_per_aspect": 4, "workers": {"units_per_shard": 8, "shards_in_flight": 2}})
    with caplog.at_level("WARNING", logger="refed_ray.run.workers"):
        _warn_if_underfilled(config, 64)  # 2 x 8 x 4 = 64 chains: full
    assert not caplog.records
    with caplog.at_level("WARNING", logger="refed_ray.run.workers"):
        _warn_if_underfilled(config, 256)  # vLLM's default max_num_seqs on GPUs
    assert "can batch 256 requests but its actor holds at most 64 sample chains" in caplog.text
    assert "workers.units_per_shard" in caplog.text


def test_shards_in_flight_unset_holds_192_units_and_48_of_the_last_small_shards():
    def in_flight(**workers):
        return RunConfig.model_validate({"workers": workers}).workers.shards_in_flight

    assert in_flight() == 6  # 64 units a shard: 6 of the plan's last shards of 8 fill an engine (3 x 64 would)
    assert in_flight(units_per_shard=32) == 6  # simulated GPU cluster: 0.88 of the engines' time at 2, 0.96 at 6
    assert in_flight(units_per_shard=16) == 12  # 192 units of whole shards
    assert in_flight(units_per_shard=100) == 6
    assert in_flight(units_per_shard=1) == 64  # the setting's bound
    assert in_flight(units_per_shard=32, shards_in_flight=1) == 1  # a setting is kept as it is
