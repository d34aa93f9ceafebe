"""Credentials given by value (an Azure connection string, a URL with user:password, an
Authorization header, passwd, apikey, a key in a query) never reach run.json, report.json,
report.html or the dataset card; the run is made with the real values, and what reads run.json
back (a resume, status, export) still works."""

from __future__ import annotations

import json

import yaml

from refed_ray.secrets import mask_text, mask_value
from tests.conftest import FAKE_ENGINE, pairs, run_cli, write_jsonl

SECRETS = ["AZKEYsecretValue0123==", "hunter2pass", "qkey98765432", "tok-bearer-5551234", "pw-passwd-777",
           "ak-apikey-888", "sas-sig-3141592", "sk-live0123456789"]
STORAGE_OPTIONS = {
    "connection_string": "DefaultEndpointsProtocol=https;AccountName=acct;AccountKey=AZKEYsecretValue0123==;"
                         "EndpointSuffix=core.windows.net",
    "client_kwargs": {"headers": {"Authorization": "Bearer tok-bearer-5551234"}},
    "passwd": "pw-passwd-777",
    "apikey": "ak-apikey-888",
    "sas_url": "https://acct.blob.core.windows.net/c?sv=2024&sig=sas-sig-3141592",
    "note": "sk-live0123456789",
}
API_BASE = "https://user:hunter2pass@llm.example.com/v1?api-key=qkey98765432"


def test_masking_looks_at_values_as_well_as_names():
    masked = mask_value({"storage_options": STORAGE_OPTIONS, "api_base": API_BASE, "api_key_env": "OPENAI_API_KEY",
                         "max_tokens": 4096})
    assert not [s for s in SECRETS if s in json.dumps(masked)]
    assert masked["api_base"] == "https://***@llm.example.com/v1?api-key=***"
    assert masked["storage_options"]["connection_string"] == "***"  # by name: the whole value
    assert masked["api_key_env"] == "OPENAI_API_KEY" and masked["max_tokens"] == 4096
    assert mask_text("AccountName=acct;AccountKey=abc==;EndpointSuffix=x") == "AccountName=acct;AccountKey=***;EndpointSuffix=x"


def test_no_credential_given_by_value_is_written_and_the_run_uses_the_real_ones(tmp_path):
    out, seen = tmp_path / "out", tmp_path / "seen.jsonl"
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({
        "seeds": str(write_jsonl(tmp_path / "seeds.jsonl", pairs(2))), "output": str(out), "num_samples": 4,
        "instructions_per_aspect": 2, "storage_options": STORAGE_OPTIONS,
        "engine": {**FAKE_ENGINE, "api": {"api_base": API_BASE}, "engine_kwargs": {"config_log": str(seen)}},
        "workers": {"num_engines": 1, "units_per_shard": 2},
    }))
    first = run_cli("run", "--config", str(config), timeout=300)
    assert first.returncode == 0, first.stderr

    written = [out / "run.json", out / "report.json", out / "report.html", out / "dataset" / "README.md"]
    for path in written:
        text = path.read_text(encoding="utf-8")
        assert not [s for s in SECRETS if s in text], path.name
    assert "llm.example.com" in (out / "run.json").read_text()  # masked, not dropped
    engines = [json.loads(line) for line in seen.read_text().splitlines()]
    assert engines and all(e["api"]["api_base"] == API_BASE for e in engines)

    # run.json's masked config reads back: a resume, status and export all work with it.
    resumed = run_cli("run", "--config", str(config), timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    status = run_cli("status", str(out), "--json", timeout=120)
    assert status.returncode == 0 and json.loads(status.stdout)["state"] == "finished", status.stderr
    exported = run_cli("export", str(out), "--format", "jsonl", "--config", str(config), timeout=300)
    assert exported.returncode == 0 and json.loads(exported.stdout.splitlines()[-1])["exported"] == 4, exported.stderr
