"""OUTPUT/report.html: one self-contained page to look at a run and its data, offline.

No server, no network: Chart.js (charts) and jsdiff (the word diff of a refinement) are inlined
from ``refed_ray/assets``, the data is embedded as JSON, and the page's Content-Security-Policy
forbids every request. What it reads is flat in N (a few MB at 1M samples):

- report.json's figures (the caller's report);
- the feedback of the references used (``feedback/``: a few rows per reference);
- the plan's and the dataset's ``reference_id`` columns, one row group at a time (yield per
  reference);
- the synthesis commits' times, where commits record one (throughput);
- ``PAGE_SAMPLES`` rows from at most ``PAGE_GROUPS`` row groups spread over the dataset
  (``quality.sample_rows``): the sample browser and the length distributions.

Sample text is untrusted: it travels packed (gzipped JSON in base64, inert in its
``<script type="application/gzip-base64">``), and the page sets it only as text (``textContent``),
never as HTML. The page's Content-Security-Policy also allows only its own scripts, by hash.
"""

from __future__ import annotations

import base64
import gzip
import hashlib
import html
import json
import re
from collections import Counter
from datetime import datetime, timezone
from importlib.resources import files
from typing import Any

import numpy as np
import pyarrow.compute as pc

from refed_ray.data.dataset import dataset_files
from refed_ray.data.quality import sample_rows, token_lengths
from refed_ray.records.commits import Commit, CommitLog
from refed_ray.records.plan import read_plan
from refed_ray.storage import Storage

PAGE = "report.html"
PAGE_SAMPLES = 1_000  # rows the page embeds: about 9 KB each with an 8B teacher's replies, 3 KB packed
PAGE_GROUPS = 20
HISTOGRAM_BINS = 24
THROUGHPUT_POINTS = 400
SAMPLE_COLUMNS = ["unit_id", "sample_index", "reference_id", "aspect", "round", "instruction", "response",
                  "analysis", "implementation_strategy", "improved_response"]
FEEDBACK_COLUMNS = ["reference_id", "instruction", "reference_response", "subject_areas", "relevant_skills",
                    "response_feedback"]


def write_page(storage: Storage, report: dict[str, Any]) -> str:
    """Write OUTPUT/report.html for ``report`` (report.json's content); returns its path in OUTPUT."""
    storage.write_bytes(PAGE, render(page_data(storage, report)).encode())
    return PAGE


def page_data(storage: Storage, report: dict[str, Any]) -> dict[str, Any]:
    """Everything the page shows, as JSON-ready values."""
    committed = CommitLog(storage)
    files = dataset_files(storage)
    samples = sample_rows(storage, files, SAMPLE_COLUMNS, PAGE_SAMPLES, PAGE_GROUPS)
    references = _references(storage, committed)
    shown = {s["reference_id"] for s in samples}
    return {
        "report": report,
        "lengths": _lengths(samples, references),
        "yield": _yield_per_reference(storage, files, report["plan"]["instructions_per_unit"]),
        "throughput": throughput(committed.commits["synthesis"].values()),
        "samples": samples,
        "references": {r["reference_id"]: r for r in references if r["reference_id"] in shown},
        "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds"),
    }


def render(data: dict[str, Any]) -> str:
    """The page: the template with the libraries and ``data`` inlined."""
    report = data["report"]
    title = f"refed-ray: {report.get('delivered', 0):,} samples by {report.get('model', '?')}"
    values = {
        "title": html.escape(title),
        "chart_js": _inline_script(_resource("assets/chart.umd.min.js")),
        "diff_js": _inline_script(_resource("assets/diff.min.js")),
        "data": packed(data),
    }
    values["script_hashes"] = "{{script_hashes}}"  # filled last, from the page's final scripts
    # One pass: text inserted for one placeholder is never scanned for another.
    page = re.sub(r"\{\{(\w+)\}\}", lambda match: values[match.group(1)], _resource("templates/report.html"))
    # The policy is in <head>, before any data: the first occurrence is the placeholder.
    return page.replace("{{script_hashes}}", " ".join(script_hashes(page)), 1)


def script_hashes(page: str) -> list[str]:
    """CSP sources allowing exactly the page's executable scripts (``<script>`` without a type;
    the data block's type makes it inert)."""
    return [f"'sha256-{base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()}'"
            for body in re.findall(r"<script>(.*?)</script>", page, flags=re.DOTALL)]


def packed(value: Any) -> str:
    """``value`` as gzipped JSON in base64: about a third of the JSON's size for English text,
    and nothing in it (letters, digits, ``+/=``) can end or alter the <script> element holding it.
    The page unpacks it with the browser's own DecompressionStream."""
    text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return base64.b64encode(gzip.compress(text.encode(), compresslevel=9, mtime=0)).decode()


def throughput(commits) -> list[list[float]]:
    """``[seconds since the first commit, samples committed by then]`` of the synthesis commits,
    at most ``THROUGHPUT_POINTS`` of them (one point: one timed commit, nothing to draw over time yet);
    empty where commits carry no time (``committed_at``: epoch seconds or ISO 8601), as in outputs
    of versions that did not record it."""
    timed = sorted((moment, commit.stats.samples) for commit in commits
                   if (moment := _commit_time(commit)) is not None)
    if not timed:
        return []
    start, total, points = timed[0][0], 0, []
    for moment, samples in timed:
        total += samples
        points.append([round(moment - start, 1), total])
    step = -(-len(points) // THROUGHPUT_POINTS)
    return points[::step] if (len(points) - 1) % step == 0 else [*points[::step], points[-1]]


def _commit_time(commit: Commit) -> float | None:
    moment = getattr(commit, "committed_at", None)
    if isinstance(moment, str):
        return datetime.fromisoformat(moment).timestamp()
    return float(moment) if moment else None  # 0: committed before times were recorded


def _references(storage: Storage, committed: CommitLog) -> list[dict[str, str]]:
    """The feedback rows (one per reference used), each reference once."""
    rows: dict[str, dict[str, str]] = {}
    for name in committed.files("feedback"):
        for row in storage.read_table(name, columns=FEEDBACK_COLUMNS).to_pylist():
            rows.setdefault(row["reference_id"], row)
    return sorted(rows.values(), key=lambda row: row["reference_id"])


def _lengths(samples: list[dict], references: list[dict]) -> dict[str, Any]:
    """Length histograms (words and punctuation, as in report.json's quality) of the sampled
    rows beside the references', as shares of each series so that 40 references and 2,000
    samples compare."""
    def lengths(rows, field):
        return token_lengths([row[field] for row in rows])

    return {
        "instruction": histogram({"Synthesized instructions": lengths(samples, "instruction"),
                                  "Reference instructions": lengths(references, "instruction")}),
        "response": histogram({"Responses": lengths(samples, "response"),
                               "Improved responses": lengths(samples, "improved_response"),
                               "Reference responses": lengths(references, "reference_response")}),
    }


def histogram(series: dict[str, list[int]]) -> dict[str, Any]:
    """``HISTOGRAM_BINS`` bins of a whole width from 0 to the 99th percentile of all series (the
    last takes the longer ones), and each series' share of its values per bin, in percent."""
    everything = [n for values in series.values() for n in values]
    if not everything:
        return {"labels": [], "series": []}
    width = max(1, int(np.ceil((np.percentile(everything, 99) + 1) / HISTOGRAM_BINS)))
    starts = [i * width for i in range(HISTOGRAM_BINS)]
    labels = [f"{start}-{start + width - 1}" if width > 1 else str(start) for start in starts]
    labels[-1] = f"{starts[-1]}+"
    out = []
    for name, values in series.items():
        counts = np.bincount(np.minimum(np.asarray(values, dtype=int) // width, HISTOGRAM_BINS - 1),
                             minlength=HISTOGRAM_BINS)
        out.append({"name": name, "count": len(values),
                    "shares": [round(100 * c / max(1, len(values)), 2) for c in counts.tolist()]})
    return {"labels": labels, "series": out}


def _yield_per_reference(storage: Storage, files: list[str], k: int) -> dict[str, list]:
    """Per reference: samples planned (its units x K) and delivered (rows of the dataset),
    sorted by yield. Reads one column, a batch at a time, dictionary-encoded."""
    plan = read_plan(storage, columns=["reference_id"])
    planned = {row["values"]: row["counts"] * k for row in pc.value_counts(plan["reference_id"]).to_pylist()}
    delivered: Counter[str] = Counter()
    for name in files:
        with storage.parquet_file(name) as parquet:
            for batch in parquet.iter_batches(columns=["reference_id"]):
                delivered.update({row["values"]: row["counts"]
                                  for row in pc.value_counts(batch.column(0)).to_pylist()})
    order = sorted(planned, key=lambda ref: (-delivered[ref] / planned[ref], ref))
    return {"references": order, "planned": [planned[r] for r in order],
            "delivered": [delivered[r] for r in order]}


def _resource(relative: str) -> str:
    return (files("refed_ray") / relative).read_text(encoding="utf-8")


def _inline_script(source: str) -> str:
    """A library's source inside <script>: a literal ``</script`` in it would end the element."""
    return re.sub(r"</(script)", r"<\\/\1", source, flags=re.IGNORECASE)
