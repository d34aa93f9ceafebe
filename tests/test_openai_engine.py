"""Engine openai against a local server of the tests' own that injects every fault it must survive."""

import pytest

from refed_ray.engines.openai_engine import RateLimiter
from refed_ray.pipeline import run
from refed_ray.storage import Storage
from tests.conftest import pairs, write_jsonl
from tests.fault_server import FAILURES, FaultServer
from tests.test_pipeline import make_config, rows

pytestmark = pytest.mark.usefixtures("local_ray")
PRICES = {"teacher": {"input_per_million": 0.15, "output_per_million": 0.60}}


def api_engine(url: str, **api) -> dict:
    return {"kind": "openai", "model": "teacher",
            "api": {"api_base": url, "max_retries": 3, "request_timeout_s": 2, "prices": PRICES, **api}}


def test_faults_are_retried_as_configured_and_give_ups_are_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    transient = ["RATE429", "RATE429BARE", "ERR500", "HANG", "DROP"]
    always = ["OFFSCHEMA"]  # a content fault; an API that keeps failing is an outage (below)
    seeds = write_jsonl(tmp_path / "seeds.jsonl", [
        *pairs(2), *({"instruction": f"{m}: explain caching", "response": "Keep results."} for m in transient + always)])
    with FaultServer() as server:
        # Rate limits far above what the test sends: the shared limiter must be running, not hit.
        config = make_config(tmp_path, seeds, num_samples=60,
                             engine=api_engine(server.url, requests_per_minute=60_000, tokens_per_minute=10**8),
                             workers={"num_engines": 1, "units_per_shard": 4})
        report = run(config)
    storage = Storage(config.output)
    rejects = rows(storage, "rejects")
    failed_feedback = {r["source"]: r["reason"] for r in rejects if r["stage"] == "feedback" and not r["unit_id"]}

    # Transient faults were retried through: their references got feedback.
    for marker in transient:
        assert server.hits[marker] > FAILURES
    assert not any(m in reason for reason in failed_feedback.values() for m in transient)
    # Replies that never validate became rejects with their reason, and the run completed.
    reasons = " | ".join(failed_feedback.values())
    assert "output does not validate" in reasons  # OFFSCHEMA
    assert len(failed_feedback) == 1
    assert report["all_planned_samples_accounted"]
    assert report["cost"]["total"] > 0
    assert "sk-test-not-a-real-key" not in (tmp_path / "out" / "report.json").read_text()
    assert "sk-test-not-a-real-key" not in (tmp_path / "out" / "run.json").read_text()


def test_server_without_json_schema_falls_back_to_json_mode(tmp_path, monkeypatch):
    """One request slot per actor: the fallback must not wait on the slot its own call holds."""
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(2))
    with FaultServer(json_schema=False) as server:
        config = make_config(tmp_path, seeds, num_samples=6, engine=api_engine(server.url, max_concurrent_requests=1),
                             workers={"num_engines": 1, "units_per_shard": 2})
        report = run(config)
    assert server.hits["REFUSED_SCHEMA"] >= 1
    assert report["samples"] == 6 and not rows(Storage(config.output), "rejects")


def test_api_outage_longer_than_retries_is_never_a_reject(tmp_path, monkeypatch):
    """The server answers 503 to everything for longer than the client's retries: the run waits
    it out (patience) or stops with a clear message; nothing is committed as rejected for it, and
    the resubmission completes with every planned sample accounted for."""
    import time

    from refed_ray.errors import RunStopped

    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(3))
    with FaultServer() as server:
        server.outage_until = time.monotonic() + 3600
        config = make_config(tmp_path, seeds, num_samples=12, engine=api_engine(server.url, max_retries=1),
                             workers={"num_engines": 1, "units_per_shard": 2, "outage_patience_s": 3})
        with pytest.raises(RunStopped, match=r"unavailable .*HTTP 503.*submit the same command again"):
            run(config)
        assert server.hits["OUTAGE"] > 2  # the SDK's retries, then ours, all met the outage
        assert not rows(Storage(config.output), "rejects")
        # The resubmission meets the tail of the outage (its first 6 requests), waits it out, and
        # completes. Stray retries of the stopped run must not eat the tail, and the SDK must not
        # absorb it (one retry each for 6 calls in flight would): without SDK retries, every 503
        # reaches our patience.
        server.wait_quiet()
        server.outage_until, server.outage_requests = 0.0, 6
        waited = config.model_copy(update={
            "engine": config.engine.model_copy(update={"api": config.engine.api.model_copy(update={"max_retries": 0})}),
            "workers": config.workers.model_copy(update={"outage_patience_s": 120})})
        report = run(waited)
    assert report["samples"] == 12 and report["rejected_samples"] == 0 and report["all_planned_samples_accounted"]
    assert report["infrastructure"]["outage_retries"] > 0


def test_missing_api_key_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    from refed_ray.config import EngineConfig
    from refed_ray.engines.openai_engine import OpenAIEngine
    from refed_ray.errors import UserError

    with pytest.raises(UserError, match="API key in the environment variable OPENAI_API_KEY"):
        OpenAIEngine(EngineConfig(**api_engine("http://127.0.0.1:9/v1")))


def test_rate_limiter_spaces_requests_after_the_burst():
    limiter = RateLimiter(requests_per_minute=60, tokens_per_minute=None)  # 1 a second, 10 s burst
    delays = [limiter.reserve(100) for _ in range(13)]
    assert delays[:10] == [0.0] * 10
    assert 0.9 < delays[10] < 1.1 and 1.9 < delays[11] < 2.1 and 2.9 < delays[12] < 3.1
    by_tokens = RateLimiter(requests_per_minute=None, tokens_per_minute=6000)  # 100 tokens a second
    assert by_tokens.reserve(1000) == 0.0 and 4.9 < by_tokens.reserve(500) < 5.1
