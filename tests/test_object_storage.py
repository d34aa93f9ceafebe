"""Every input and output on S3: a real S3 API (moto's server) on 127.0.0.1, reached through s3fs
with AWS_ENDPOINT_URL, as a user would point refed-ray at MinIO or any S3-compatible store."""

import json
import os

import pytest

ray = pytest.importorskip("ray")
moto_server = pytest.importorskip("moto.server")

from refed_ray.data.export import export  # noqa: E402
from refed_ray.engines.default_model import fetch_remote_model  # noqa: E402
from refed_ray.run.pipeline import run  # noqa: E402
from refed_ray.storage import Storage  # noqa: E402
from tests.conftest import free_port, pairs  # noqa: E402
from tests.test_pipeline import make_config, rows  # noqa: E402


@pytest.fixture(scope="module")
def bucket():
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=free_port())
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)  # before ray.init: Ray workers inherit it
    import boto3

    boto3.client("s3").create_bucket(Bucket="refed")
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    yield "s3://refed"
    ray.shutdown()
    server.stop()
    for key, value in saved.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value


def put(uri: str, data: bytes) -> None:
    Storage(uri.rsplit("/", 1)[0]).write_bytes(uri.rsplit("/", 1)[1], data)


def test_run_resume_and_export_on_s3(bucket, tmp_path):
    put(f"{bucket}/seeds/seeds.jsonl", "".join(json.dumps(p) + "\n" for p in pairs(3)).encode())
    config = make_config(tmp_path, f"{bucket}/seeds/seeds.jsonl", output=f"{bucket}/runs/one", num_samples=12)
    first = run(config)
    storage = Storage(f"{bucket}/runs/one")
    assert first["samples"] == 12 and first["all_planned_samples_accounted"]
    for folder in ("feedback", "plan", "data", "_index", "dataset"):
        assert storage.list(folder), folder
    assert storage.read_json("report.json")["samples"] == 12
    assert b"Content-Security-Policy" in storage.read_bytes("report.html")  # the page and card, on S3 too
    assert storage.read_bytes("dataset/README.md").startswith(b"---\nlicense: other")

    again = run(config.model_copy(update={"num_samples": 24}))
    assert again["units"] == {"planned": 8, "committed": 8, "resumed": 4, "this_run": 4, "retried": 0, "rejected": 0}
    samples = rows(storage, "data")
    assert len(samples) == 24 == len({(s["unit_id"], s["sample_index"]) for s in samples})

    target, count = export(f"{bucket}/runs/one", "refed-json", f"{bucket}/exports/refed.json")
    assert count == 24
    assert len(json.loads(Storage(f"{bucket}/exports").read_bytes("refed.json"))) == 24


def test_model_folder_is_fetched_once_from_s3(bucket, tmp_path, monkeypatch):
    monkeypatch.setenv("REFED_RAY_CACHE", str(tmp_path / "cache"))
    put(f"{bucket}/models/tiny/config.json", b'{"model_type": "gemma3_text"}')
    put(f"{bucket}/models/tiny/model.safetensors", b"weights")
    local = fetch_remote_model(f"{bucket}/models/tiny")
    assert (local / "config.json").read_bytes() == b'{"model_type": "gemma3_text"}'
    assert (local / "model.safetensors").read_bytes() == b"weights"
    (local / "model.safetensors").write_bytes(b"cached")
    assert fetch_remote_model(f"{bucket}/models/tiny") == local
    assert (local / "model.safetensors").read_bytes() == b"cached"  # not fetched again
    with pytest.raises(FileNotFoundError, match="no config.json"):
        fetch_remote_model(f"{bucket}/models/missing")


def test_doctor_reads_an_s3_model_and_round_trips_output_on_s3_from_a_node(bucket, capsys):
    from refed_ray.cli import main
    from tests.test_doctor import TINY_CONFIG

    put(f"{bucket}/models/doctor/config.json", json.dumps(TINY_CONFIG).encode())
    put(f"{bucket}/models/doctor/model.safetensors", b"w" * 4096)
    code = main(["doctor", "--json", "--model", f"{bucket}/models/doctor", "--output", f"{bucket}/runs/doctor",
                 "--device", "cpu", "--wait", "0"])
    checks = {check["name"]: check for check in json.loads(capsys.readouterr().out) if check["where"] != "driver"}
    assert code == 0, checks
    assert checks["model"]["message"].startswith(f"{bucket}/models/doctor: config.json read (LlamaForCausalLM)")
    assert "remote" in checks["disk"]["message"]  # where the run fetches an s3 model to
    assert checks["output"]["message"].startswith(f"OUTPUT {bucket}/runs/doctor: a file written, read back and deleted")
    assert not [name for name in Storage(f"{bucket}/runs/doctor").list("") if ".doctor-probe" in name]
