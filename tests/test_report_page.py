"""report.html: written by a fake-engine run, opened in a real headless browser (tests/browser.py)."""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from importlib.resources import files as files_of
from pathlib import Path
from types import SimpleNamespace

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from refed_ray.config import RunConfig
from refed_ray.data.dataset import MANIFEST, read_manifest
from refed_ray.records.commits import Commit
from refed_ray.records.models import Sample, arrow_schema
from refed_ray.reports import page
from refed_ray.run.pipeline import run
from refed_ray.storage import Storage
from tests.browser import open_page, screenshot
from tests.conftest import FAKE_ENGINE, pairs, run_cli, write_jsonl

HOSTILE = '</script><img src=x onerror="document.body.dataset.pwned=1"> <b>bold</b> & {{data}}'
CHARTS = {"lengths-instruction", "lengths-response", "rejects", "yield", "near-duplicates"}
# The page's size at 100K samples (page.PAGE_SAMPLES = 1,000 rows embedded) of an 8B teacher's
# lengths with every refinement note at its bound, as random English words (which compress worse
# than prose): 6.2 MB measured on 2026-11-28. Flat in N beyond PAGE_SAMPLES rows.
SIZE_LIMIT = 8 * 2**20


@pytest.fixture(scope="module")
def finished(tmp_path_factory, local_ray):
    """A finished run with rejects (a quarter of refinements never validate) and a reference
    whose text is hostile markup."""
    root = tmp_path_factory.mktemp("page")
    seeds = write_jsonl(root / "seeds.jsonl", [*pairs(5), {"instruction": HOSTILE, "response": "It is <i>fine</i>."}])
    config = RunConfig.model_validate({
        "seeds": str(seeds), "output": str(root / "out"), "num_samples": 30, "instructions_per_aspect": 3,
        "engine": {**FAKE_ENGINE, "engine_kwargs": {"invalid_rate": {"Refinement": 0.25}}},
        "workers": {"num_engines": 1, "units_per_shard": 2},
    })
    report = run(config)
    return SimpleNamespace(root=root, out=root / "out", storage=Storage(str(root / "out")), report=report)


def dataset_rows(storage: Storage, columns=("unit_id", "sample_index", "reference_id", "aspect")) -> list[dict]:
    return [row for name in read_manifest(storage)["files"]
            for row in storage.read_table(name, columns=list(columns)).to_pylist()]


def listed(dom) -> list[tuple[str, str, str, str]]:
    return sorted((a["data-reference"], a["data-aspect"], a["data-unit"], a["data-index"])
                  for a in dom.find("article", class_="sample"))


def test_a_run_writes_a_page_that_opens_offline_with_every_chart_drawn(finished, tmp_path):
    assert finished.report["rejects"]["samples_lost"] > 0  # the rejects chart has something to draw
    probe, dom = open_page(finished.out / "report.html", tmp_path)

    assert probe["errors"] == [] and probe["ready"] == "1"
    drawn = {chart["name"]: chart["painted"] for chart in probe["charts"]}
    # Commits record their time where another change adds it; without it the throughput
    # figure says so instead of drawing.
    timed = "committed_at" in Commit.model_fields
    assert set(drawn) == CHARTS | ({"throughput"} if timed else set())
    assert all(painted > 500 for painted in drawn.values()), drawn
    if not timed:
        assert any("commits record no times" in text for text in dom.text)
    shot = screenshot(finished.out / "report.html", tmp_path / "report.png")
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 20_000


def test_the_sample_browser_lists_the_samples_and_filters_by_reference_and_aspect(finished, tmp_path):
    rows = dataset_rows(finished.storage)
    expected = sorted((r["reference_id"], r["aspect"], r["unit_id"], str(r["sample_index"])) for r in rows)
    _, dom = open_page(finished.out / "report.html", tmp_path)
    assert len(rows) == finished.report["delivered"] == 30
    assert listed(dom) == expected  # 30 rows: fewer than one page of the browser, all listed

    reference, _ = Counter(r["reference_id"] for r in rows).most_common(1)[0]
    _, dom = open_page(finished.out / "report.html", tmp_path, f"reference={reference}")
    assert listed(dom) == [e for e in expected if e[0] == reference]
    # The reference's feedback heads its samples.
    assert [a["data-reference"] for a in dom.find("section", class_="reference")] == [reference]

    _, dom = open_page(finished.out / "report.html", tmp_path, f"reference={reference}&aspect=relevant_skills")
    only = [e for e in expected if e[0] == reference and e[1] == "relevant_skills"]
    assert only and listed(dom) == only


def test_sample_text_is_shown_as_text_never_run_as_markup(finished, tmp_path):
    (hostile,) = [r["reference_id"] for r in page.page_data(finished.storage, finished.report)["references"].values()
                  if r["instruction"] == HOSTILE]
    probe, dom = open_page(finished.out / "report.html", tmp_path, f"reference={hostile}")
    assert probe["errors"] == []
    assert HOSTILE in dom.text  # shown, literally, as text
    assert not dom.find("img") and not dom.find("b")
    assert "data-pwned" not in dom.find("body")[0]


def test_throughput_is_drawn_from_commit_times(finished, tmp_path):
    def commit(at, samples):
        return SimpleNamespace(committed_at=at, stats=SimpleNamespace(samples=samples))

    # Epoch seconds or ISO 8601, in any order; commits without a time are left out.
    commits = [commit(1_000_060.0, 20), commit("1970-01-12T13:46:40+00:00", 10), commit(None, 5),
               commit(1_000_600.0, 30)]
    assert page.throughput(commits) == [[0.0, 10], [60.0, 30], [600.0, 60]]
    assert page.throughput([commit(None, 5), commit(0.0, 3), SimpleNamespace(stats=SimpleNamespace(samples=1))]) == []
    assert page.throughput([commit(1_000_060.0, 20), commit(None, 5)]) == [[0.0, 20]]  # one shard: one point
    many = [commit(float(i), 1) for i in range(1, 1002)]  # (0 is "no time": commits.Commit.committed_at)
    points = page.throughput(many)
    assert len(points) <= page.THROUGHPUT_POINTS and points[0] == [0.0, 1] and points[-1] == [1000.0, 1001]

    data = page.page_data(finished.storage, finished.report)
    data["throughput"] = page.throughput(commits)
    (tmp_path / "timed.html").write_text(page.render(data), encoding="utf-8")
    probe, _ = open_page(tmp_path / "timed.html", tmp_path)
    drawn = {chart["name"]: chart["painted"] for chart in probe["charts"]}
    assert probe["errors"] == [] and drawn["throughput"] > 500


def test_the_page_embeds_a_bounded_spread_sample_and_stays_small_at_100k_samples(finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished.out, out)
    storage = Storage(str(out))
    references = sorted({r["reference_id"] for r in dataset_rows(finished.storage)})
    files = _synthetic_dataset(storage, references, files=10, rows=10_000)

    data = page.page_data(storage, {**finished.report, "delivered": 100_000})
    samples = data["samples"]
    assert len(samples) == page.PAGE_SAMPLES
    assert len({s["response"] for s in samples}) > 0.9 * len(samples)  # sized on distinct texts
    assert {s["unit_id"].split("-")[0] for s in samples} == {f"f{i}" for i in range(10)}  # every file
    assert set(data["references"]) == {s["reference_id"] for s in samples}
    assert sum(data["yield"]["delivered"]) == 100_000

    page.write_page(storage, {**finished.report, "delivered": 100_000})
    size = (out / "report.html").stat().st_size
    print(f"report.html at 100K samples, {len(files)} files: {size / 2**20:.2f} MB")
    assert size < SIZE_LIMIT
    probe, dom = open_page(out / "report.html", tmp_path)
    assert probe["errors"] == [] and len(dom.find("article", class_="sample")) == 50  # the first page of them


def _synthetic_dataset(storage: Storage, references: list[str], files: int, rows: int) -> list[str]:
    """``files`` x ``rows`` samples of about the length an 8B teacher writes (instruction 60
    words, responses 400-450, notes near their default bounds), replacing OUTPUT's dataset. The
    words are drawn at random with their frequencies in the bundled references' English, so
    the text compresses about as real text does (no long repeats)."""
    corpus = Path(files_of("refed_ray") / "default_references.jsonl").read_text()
    words = [w for line in corpus.splitlines() for value in json.loads(line).values() for w in str(value).split()]
    rng = random.Random(0)

    def text(n):
        return " ".join(rng.choices(words, k=n))

    def points():
        return [text(40) for _ in range(5)]

    # Distinct texts for more rows than the page embeds, shared out cyclically (a prime count, so
    # the evenly spaced rows the page picks get different ones).
    pool = [{"instruction": text(60), "response": text(400), "improved_response": text(450),
             "analysis": {"original_strengths": points(), "improvement_opportunities": points(),
                          "relevant_feedback": points()},
             "implementation_strategy": {"planned_changes": points(), "rationale": text(100)}}
            for _ in range(2003)]
    storage.delete_many(storage.list("dataset"))
    names = []
    for f in range(files):
        table = pa.Table.from_pylist([{
            **pool[(f * rows + i) % len(pool)],
            "unit_id": f"f{f}-{i // 3}", "reference_id": references[i % len(references)],
            "aspect": ("subject_areas", "relevant_skills")[i % 2], "round": i // 100, "sample_index": i % 3,
            "model": "m", "prompt_tokens": 1, "completion_tokens": 1,
        } for i in range(rows)], schema=arrow_schema(Sample))
        names.append(f"dataset/train-{f:05d}-of-{files:05d}.parquet")
        pq.write_table(table, storage.path(names[-1]), row_group_size=10_000, compression="zstd")
    storage.write_json(MANIFEST, {"digest": "synthetic", "files": names, "rows": files * rows, "shard_files": 0})
    return names


def test_report_command_writes_the_page_and_card_and_shows_samples(finished, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(finished.out, out)
    (out / "report.html").unlink()
    (out / "dataset" / "README.md").unlink()
    result = run_cli("report", str(out), "--samples", "2", timeout=300)
    assert result.returncode == 0, result.stderr
    assert (out / "report.html").exists() and (out / "dataset" / "README.md").exists()
    printed = result.stdout
    instructions = {r["instruction"] for r in dataset_rows(Storage(str(out)), ["instruction"])}
    shown = [line.split("instruction", 1)[1].strip() for line in printed.splitlines()
             if line.startswith("  instruction")]
    assert len(shown) == 2 and all(s in instructions for s in shown)
    assert printed.count("  improved ") == 2
    for where in (f"{out}/dataset/", f"{out}/report.html", f"{out}/dataset/README.md"):
        assert where in printed

    empty = tmp_path / "empty"
    empty.mkdir()
    refused = run_cli("report", str(empty), timeout=120)
    assert refused.returncode == 2 and "holds no report.json" in refused.stderr
    assert json.loads((out / "report.json").read_text())["delivered"] == 30


def test_a_page_that_cannot_be_written_does_not_fail_the_finished_run(tmp_path, caplog, monkeypatch):
    from refed_ray.reports import views

    def full_disk(storage, report):
        raise OSError("No space left on device")

    monkeypatch.setattr(views, "write_page", full_disk)
    views.write_views_after_run(Storage(str(tmp_path)), {})
    assert "No space left on device" in caplog.text and f"`refed-ray report {tmp_path}`" in caplog.text
