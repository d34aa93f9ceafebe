"""``refed-ray plan``: the run's own checks and counts before anything starts, and its estimates.

The counts are checked against the runs that follow (fake teacher, tests/fake_engine.py); the
GPU model against the README's sizing table; bad input through the real CLI (exit 2, before Ray)."""

import json
import subprocess

import pytest
import yaml

from refed_ray.config import RunConfig, load_config
from refed_ray.run.pipeline import run
from refed_ray.watch.estimate import plan_run
from refed_ray.watch.sizing import gpu_estimate, model_shape
from tests.conftest import FAKE_ENGINE, ROOT, pairs, run_cli, write_jsonl
from tests.test_cli_errors import assert_user_error

SYNTHESIS_STAGES = ("instructions", "responses", "refinement")


def cli(*args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, timeout=120, cwd=ROOT)


def fake_run_config(tmp_path, seeds, output, **overrides) -> dict:
    fields = {
        "seeds": str(seeds),
        "output": str(output),
        "num_samples": 24,
        "instructions_per_aspect": 3,
        "engine": {**FAKE_ENGINE, "engine_kwargs": {"loads_log": str(tmp_path / "loads.log")}},
        "workers": {"num_engines": 2, "units_per_shard": 2},
    }
    return fields | overrides


@pytest.mark.usefixtures("local_ray")
def test_plan_counts_are_what_the_run_then_does(tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [*pairs(5), {"conversations": ["a", "b", "c", "d"]}])
    out = tmp_path / "out"
    config_file = tmp_path / "run.yaml"
    config_file.write_text(yaml.safe_dump(fake_run_config(tmp_path, seeds, out)))

    done = cli("plan", "--config", str(config_file), "--json")
    assert done.returncode == 0, done.stderr
    assert "Started a local Ray instance" not in done.stderr and not out.exists()  # no Ray, nothing written
    plan = json.loads(done.stdout)

    report = run(load_config(str(config_file), {}))
    # No sample rejected, so no retry and no top-up: the calls are the plan's first attempts.
    assert report["samples"] == 24 and report["rejects"]["samples_lost"] == 0 and report["plan"]["extra_units"] == 0
    assert plan["resume"] is False
    assert {key: plan["plan"][key] for key in ("units", "shards", "rounds", "planned_samples")} == {
        key: report["plan"][key] for key in ("units", "shards", "rounds", "planned_samples")}
    assert plan["references"] == {"usable": 5, "skipped": 1, "used": report["references"]["used"],
                                  "feedback_to_collect": report["feedback_rows"]}
    assert plan["calls"]["feedback"] == report["feedback_calls"] == 10
    for stage in SYNTHESIS_STAGES:
        assert plan["calls"][stage] == report["stages"][stage]["calls"], stage
    # One line per engine the run loaded: one pool for the feedback and the synthesis.
    loads = (tmp_path / "loads.log").read_text().splitlines()
    assert plan["engine_loads"] == {"engines": 2} and len(loads) == 2
    # The budgets bound what the teacher used (the fake one counts 4 characters a token).
    assert plan["tokens"]["source"] == "budgets"
    for stage, bound in plan["tokens"]["by_stage"].items():
        used = report["stages"][stage]
        assert 0 < used["prompt_tokens"] <= bound["prompt_tokens"] and 0 < used["completion_tokens"] <= bound["completion_tokens"]


@pytest.mark.usefixtures("local_ray")
def test_estimate_from_a_pilot_is_its_tokens_per_sample_times_n(tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(30))
    pilot_out = tmp_path / "pilot"
    pilot = run(RunConfig.model_validate(fake_run_config(tmp_path, seeds, pilot_out, num_samples=12)))

    config = RunConfig.model_validate(fake_run_config(tmp_path, seeds, tmp_path / "big", num_samples=300))
    estimate = plan_run(config, pilot=str(pilot_out))
    tokens = estimate["tokens"]
    assert tokens["source"] == "pilot" and tokens["pilot"]["accepted_samples"] == pilot["samples"] == 12
    for stage in SYNTHESIS_STAGES:
        for kind in ("prompt_tokens", "completion_tokens"):
            per_sample = pilot["stages"][stage][kind] / pilot["samples"]
            assert tokens["by_stage"][stage][kind] == round(per_sample * 300), (stage, kind)
    # Feedback is paid per reference, not per sample: the pilot's per reference, times the
    # references this run collects feedback on.
    per_reference = pilot["stages"]["feedback"]["completion_tokens"] / pilot["feedback_rows"]
    collect = estimate["references"]["feedback_to_collect"]
    assert collect == 30 and tokens["by_stage"]["feedback"]["completion_tokens"] == round(per_reference * collect)
    assert not (tmp_path / "big").exists()


@pytest.mark.usefixtures("local_ray")
def test_plan_of_a_resume_counts_only_the_work_left(tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(4))
    first = run(RunConfig.model_validate(fake_run_config(tmp_path, seeds, tmp_path / "out", num_samples=12)))
    config = RunConfig.model_validate(fake_run_config(tmp_path, seeds, tmp_path / "out", num_samples=24))
    plan = plan_run(config)
    assert plan["resume"] and plan["committed"] == {"units": 4, "shards": 2, "samples": 12}
    assert plan["to_do"] == {"units": 4, "shards": 2, "samples": 12}
    again = run(config)
    assert again["units"]["this_run"] == plan["to_do"]["units"] and again["shards"]["this_run"] == plan["to_do"]["shards"]
    assert plan["calls"]["feedback"] == again["feedback_calls"] - first["feedback_calls"] == 2  # a 4th reference
    for stage in SYNTHESIS_STAGES:
        assert plan["calls"][stage] == again["stages"][stage]["calls"] - first["stages"][stage]["calls"], stage


def test_budget_bound_and_api_cost(tmp_path, monkeypatch):
    monkeypatch.setenv("TEST_API_KEY", "sk-test")
    config = RunConfig.model_validate({
        "seeds": str(write_jsonl(tmp_path / "seeds.jsonl", pairs(6))),
        "output": str(tmp_path / "out"),
        "num_samples": 40,
        "instructions_per_aspect": 4,
        "engine": {"kind": "openai", "model": "teacher-x", "api": {
            "api_key_env": "TEST_API_KEY", "prices": {"teacher-x": {"input_per_million": 1.0, "output_per_million": 2.0}}}},
    })
    estimate = plan_run(config)
    tokens = estimate["tokens"]
    assert estimate["calls"] == {"feedback": 12, "instructions": 10, "responses": 40, "refinement": 40, "total": 102}
    # Every reply at its max_tokens (4,096), first attempts.
    assert tokens["by_stage"]["refinement"]["completion_tokens"] == 40 * 4096
    assert tokens["completion_tokens"] == 102 * 4096
    assert estimate["cost"]["total"] == pytest.approx(tokens["prompt_tokens"] / 1e6 + 2 * tokens["completion_tokens"] / 1e6)
    assert estimate["gpu"] is None  # an API teacher: cost, not GPU time
    assert "sk-test" not in json.dumps(estimate)


LLAMA_31_8B = {  # the shapes of meta-llama/Llama-3.1-8B-Instruct's config.json
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
}


@pytest.mark.parametrize("gpu, fp8, gpu_hours", [
    ("l4", False, 2200), ("a10g", False, 1100), ("l4", True, 320), ("l40s", False, 220), ("a100", False, 90),
    ("h100", False, 45)])
def test_gpu_model_reproduces_the_readme_sizing_table(tmp_path, gpu, fp8, gpu_hours):
    """README "Sizing": 1M samples of 2,000 prompt and 1,100 completion tokens (2.1 calls a sample)
    with Llama-3.1-8B in bf16 (or an FP8 checkpoint with an FP8 KV cache), at half the ceiling;
    16 L40S engines take about 14 hours."""
    (tmp_path / "llama").mkdir()
    quantized = {"quantization_config": {"quant_method": "fp8"}} if fp8 else {}
    (tmp_path / "llama" / "config.json").write_text(json.dumps(LLAMA_31_8B | quantized))
    engine = {"model": str(tmp_path / "llama"), "device": "cuda", "engine_kwargs": {"kv_cache_dtype": "fp8"} if fp8 else {}}
    config = RunConfig.model_validate({"engine": engine, "workers": {"num_engines": 16}})
    shape = model_shape(config)
    assert shape.params == pytest.approx(8.03e9, rel=0.01)
    assert shape.kv_bytes_per_token == 128 * 1024 / (2 if fp8 else 1) and shape.weight_bytes_per_param == (1 if fp8 else 2)
    row = gpu_estimate(gpu, shape, config, prompt_tokens=2000e6, completion_tokens=1100e6, calls=2_100_000)
    assert row["gpu_hours"] == pytest.approx(gpu_hours, rel=0.15)
    if gpu == "l40s":
        assert row["wall_hours"] == pytest.approx(14, rel=0.15) and row["batch"] == pytest.approx(125, rel=0.1)


def test_plan_takes_the_size_from_model_params_when_the_model_is_not_local(tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(3))
    config = RunConfig.model_validate({"seeds": str(seeds), "output": str(tmp_path / "out"), "num_samples": 30,
                                       "engine": {"model": "org/some-hub-model", "device": "cuda"}})
    assert "pass --model-params" in plan_run(config)["gpu"]["note"]
    gpu = plan_run(config, gpu="l40s", model_params=8e9)["gpu"]
    assert gpu["model"]["params"] == 8e9 and [row["gpu"] for row in gpu["estimates"]] == ["l40s"]
    assert gpu["estimates"][0]["gpu_hours"] > 0


# ---- bad input: exit 2, before Ray, as `run` refuses it ---------------------------------------


def test_bad_seeds_config_and_output_are_refused_as_run_refuses_them(tmp_path):
    out = str(tmp_path / "out")
    (tmp_path / "empty.jsonl").write_text("")
    assert_user_error(cli("plan", "--seeds", str(tmp_path / "empty.jsonl"), "--output", out), "empty.jsonl is empty")
    bad = write_jsonl(tmp_path / "bad.jsonl", [*pairs(2), '{"instruction": "x", "response": 5}', "{oops"])
    assert_user_error(cli("plan", "--seeds", str(bad), "--output", out, "--max-bad-seeds", "1"),
                   "2 bad rows", "bad.jsonl:3: field 'response' must be a string, got int", "bad.jsonl:4: malformed JSON")
    assert_user_error(cli("plan", "--seeds", str(tmp_path / "missing.jsonl"), "--output", out), "seed file not found")
    config = tmp_path / "run.yaml"
    config.write_text("num_samples: -1\nsampling:\n  temperature: 9\nbogus: 1\n")
    assert_user_error(cli("plan", "--config", str(config), "--output", out), f"invalid config ({config})",
                   "num_samples: Input should be greater than or equal to 1", "bogus: unknown key")
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    assert_user_error(cli("plan", "--output", str(blocker / "out")), f"cannot write to output {blocker}/out")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "notes.txt").write_text("mine")
    assert_user_error(cli("plan", "--output", str(tmp_path / "taken")), "is not empty and holds no refed-ray run")
    assert not (tmp_path / "out").exists()


def test_bad_engine_settings_and_missing_key_are_refused(tmp_path, monkeypatch):
    out = str(tmp_path / "out")
    assert_user_error(cli("plan", "--output", out, "--engine", "openai"), "engine kind 'openai' needs model")
    assert_user_error(cli("plan", "--output", out, "--model", str(tmp_path / "no-such-model")),
                   f"engine.model '{tmp_path}/no-such-model' is not a folder on this machine")
    config = tmp_path / "custom.yaml"
    config.write_text("engine:\n  kind: custom\n  class_path: 'no_such_module:Engine'\n")
    assert_user_error(cli("plan", "--output", out, "--config", str(config)),
                   "engine.class_path 'no_such_module:Engine' cannot be imported")
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    assert_user_error(cli("plan", "--output", out, "--engine", "openai", "--model", "gpt-4o-mini"),
                   "needs an API key in the environment variable OPENAI_API_KEY")


def test_an_incompatible_output_and_bad_plan_flags_are_refused(tmp_path):
    earlier = tmp_path / "earlier"
    earlier.mkdir()
    (earlier / "run.json").write_text(json.dumps({"fingerprint": {"model": "another-model"}, "config": {"num_samples": 8}}))
    assert_user_error(cli("plan", "--output", str(earlier)), "holds a run with a different model", "--force-new")
    out = str(tmp_path / "out")
    assert_user_error(cli("plan", "--output", out, "--pilot", str(tmp_path / "nothing-here")),
                   f"--pilot {tmp_path}/nothing-here holds no refed-ray run")
    assert_user_error(cli("plan", "--output", out, "--model-params", "-1"), "--model-params must be a positive number")
