"""What the records say ran is what ran: a custom engine without ``engine.model`` is not named
the embedded default (report.json, run.json, the card, the page, plan); plan refuses a pilot whose
stages are not the run's; the page's reject reasons show the real threshold, read from the chart
a real browser drew (tests/browser.py)."""

from __future__ import annotations

import json

import pytest
import yaml

from tests.browser import open_page, screenshot
from tests.conftest import FAKE_ENGINE, run_cli
from tests.test_card import deduplicated  # noqa: F401  (a finished custom-engine run with dedup rejects)

pytestmark = pytest.mark.usefixtures("local_ray")
NAME = "tests.fake_engine:FakeEngine (engine.model unset)"


def plan_config(tmp_path, run, **overrides) -> str:
    config = tmp_path / "plan.yaml"
    config.write_text(yaml.safe_dump({
        "seeds": str(run.seeds), "output": str(tmp_path / "next"), "num_samples": 48, "instructions_per_aspect": 4,
        "engine": FAKE_ENGINE, **overrides}))
    return str(config)


def test_a_custom_engine_without_a_model_is_named_by_its_class_everywhere(deduplicated, tmp_path):  # noqa: F811
    out = deduplicated.out
    assert deduplicated.report["model"] == NAME
    assert json.loads((out / "run.json").read_text())["fingerprint"]["model"] == NAME
    assert f"| Teacher model | `{NAME}` |" in (out / "dataset" / "README.md").read_text()
    for path in (out / "report.json", out / "run.json", out / "dataset" / "README.md"):
        assert "gemma" not in path.read_text(), path.name
    planned = run_cli("plan", "--config", plan_config(tmp_path, deduplicated), "--pilot", str(out), "--json",
                      timeout=120)
    assert planned.returncode == 0, planned.stderr
    estimate = json.loads(planned.stdout)
    assert estimate["model"] == estimate["tokens"]["pilot"]["model"] == NAME
    assert estimate["tokens"]["pilot"]["same_model"] is True


def test_plan_refuses_a_pilot_of_another_feedback_mode(deduplicated, tmp_path):  # noqa: F811
    planned = run_cli("plan", "--config", plan_config(tmp_path, deduplicated), "--feedback-mode", "sample",
                      "--pilot", str(deduplicated.out), timeout=120)
    assert planned.returncode == 2, planned.stderr
    assert (f"--pilot {deduplicated.out} ran feedback mode reference, this run feedback mode sample: their "
            "stages differ") in planned.stderr and "Traceback" not in planned.stderr


def test_the_page_shows_reject_reasons_with_their_real_threshold(deduplicated, tmp_path):  # noqa: F811
    probe, _ = open_page(deduplicated.out / "report.html", tmp_path)
    assert probe["errors"] == []
    labels = next(chart["labels"] for chart in probe["charts"] if chart["name"] == "rejects")
    dedup = [label for label in labels if label.startswith("dedup:")]
    assert dedup and all("(Jaccard >= 0.7)" in label for label in dedup), labels
    assert not [label for label in labels if "N.N" in label or " N " in label], labels
    screenshot(deduplicated.out / "report.html", tmp_path / "rejects.png", fragment="rejects")
