"""OUTPUT/dataset/README.md: the dataset card, in the Hugging Face Hub's format.

A YAML header (license placeholder, task categories, size category, ``configs`` naming the
dataset's Parquet files) and what the data is, how it was made and how to load it, with the
counts, lengths and diversity figures of report.json. Written after the dataset is compacted,
from the manifest's file list (the files a reader should load, whatever the folder's layout),
so ``dataset/`` can be uploaded as it is (``hf upload NAME OUTPUT/dataset . --repo-type dataset``,
README, "The dataset card").
"""

from __future__ import annotations

import posixpath
from importlib.resources import files
from string import Template
from typing import Any

import yaml

from refed_ray.data.dataset import dataset_files
from refed_ray.storage import Storage

CARD = "dataset/README.md"
LENGTH_ROWS = ("instruction", "reference_instruction", "response", "improved_response", "reference_response")
# The Hub's size buckets (its `size_categories` values), by upper bound.
SIZE_CATEGORIES = [(1_000, "n<1K"), (10_000, "1K<n<10K"), (100_000, "10K<n<100K"), (1_000_000, "100K<n<1M"),
                   (10**7, "1M<n<10M"), (10**8, "10M<n<100M"), (10**9, "100M<n<1B"), (10**10, "1B<n<10B"),
                   (10**11, "10B<n<100B"), (10**12, "100B<n<1T")]


def write_card(storage: Storage, report: dict[str, Any]) -> str:
    """Write the card for ``report`` (report.json's content); returns its path in OUTPUT."""
    storage.write_bytes(CARD, card_text(storage, report).encode())
    return CARD


def card_text(storage: Storage, report: dict[str, Any]) -> str:
    header = yaml.safe_dump(card_header(storage, report), sort_keys=False, allow_unicode=True)
    body = Template((files("refed_ray") / "templates" / "dataset_card.md").read_text(encoding="utf-8"))
    return f"---\n{header}---\n\n{body.substitute(_values(storage, report))}"


def card_header(storage: Storage, report: dict[str, Any]) -> dict[str, Any]:
    # One config. The messages export is not a second one: `datasets` reads every config of a
    # folder with the one builder its files' format picks (Parquet here), so a JSONL config fails.
    configs = [{"config_name": "default", "default": True,
                "data_files": [{"split": "train", "path": [_in_dataset(f) for f in dataset_files(storage)]}]}]
    return {
        "license": "other",  # a placeholder: the publisher sets it (see the card's "License")
        "pretty_name": _title(report),
        "task_categories": ["text-generation"],
        "size_categories": [size_category(report["delivered"])],
        "tags": ["synthetic", "instruction-tuning", "reference-level-feedback", "refed"],
        "configs": configs,
    }


def size_category(rows: int) -> str:
    for bound, name in SIZE_CATEGORIES:
        if rows < bound:
            return name
    return "n>1T"


def _values(storage: Storage, report: dict[str, Any]) -> dict[str, Any]:
    config, references, dedup = report["config"], report["references"], report["deduplicated"]
    run = storage.read_json("run.json")
    mode = (config.get("feedback") or {}).get("mode")
    return {
        "title": _title(report),
        "model": report["model"],
        "feedback_mode_row": f"| Feedback mode | {mode} |\n" if mode else "",
        "references_used": f"{references['used']:,}",
        "references_usable": f"{references['usable']:,}",
        "references_skipped": f"{references['skipped']:,}",
        "seeds": config.get("seeds") or "the bundled reference set (refed_ray/default_references.jsonl)",
        "references_digest": run["fingerprint"]["references"],
        "temperature": config["sampling"]["temperature"],
        "top_p": config["sampling"]["top_p"],
        "seed": config["seed"],
        "k": config["instructions_per_aspect"],
        "dedup_method": _dedup_method(config["dedup"]),
        "planned": f"{report['plan']['planned_samples']:,}",
        "accepted": f"{report['samples']:,}",
        "delivered": f"{report['delivered']:,}",
        "rejected": f"{report['rejected_samples']:,}",
        "deduplicated": f"{dedup['total']:,}",
        "dedup_in_unit": f"{dedup['in_unit']:,}",
        "dedup_across": f"{dedup['across_units']:,}",
        "near_duplicate_rate": f"{dedup['near_duplicate_rate']:.1%}",
        "reject_table": _reject_table(report["rejects"]["by_reason"]),
        "quality": _quality(report.get("quality")),
        "dataset_uri": storage.full_uri("dataset") if not storage.is_local else storage.path("dataset"),
        "output": storage.uri,
    }


def _dedup_method(dedup: dict[str, Any]) -> str:
    if not dedup["enabled"]:
        return "Near-duplicate removal was off for this run."
    return (f"Instructions that nearly repeat another (Jaccard similarity of word {dedup['ngram']}-grams "
            f"{dedup['threshold']} or more) are dropped,\n   in their unit before their response and across "
            "the whole run after synthesis.")


def _reject_table(by_reason: dict[str, int]) -> str:
    if not by_reason:
        return "None."
    lines = ["| stage | reason | rows |", "|---|---|---:|"]
    for key, count in by_reason.items():
        stage, _, reason = key.partition(": ")
        lines.append(f"| {stage} | {_cell(reason)} | {count:,} |")
    return "\n".join(lines)


def _quality(quality: dict[str, Any] | None) -> str:
    if not quality or not quality.get("sampled_rows"):
        return "Not measured (no samples)."
    lines = [
        f"Measured on {quality['sampled_rows']:,} rows spread over the dataset. Lengths are in words and "
        "punctuation marks (model tokens run about 1.3 per such token in English).",
        "",
        "| | p10 | median | p90 |",
        "|---|---:|---:|---:|",
    ]
    lengths = quality["length_tokens"]
    for name in LENGTH_ROWS:
        values = lengths[name]
        lines.append(f"| {name.replace('_', ' ')} | {values['p10']:.0f} | {values['p50']:.0f} | {values['p90']:.0f} |")
    lines += [
        "",
        f"Instructions: distinct-1 {quality['distinct_1']}, distinct-2 {quality['distinct_2']} (distinct n-grams "
        f"over all n-grams), mean pairwise similarity {quality['mean_pairwise_similarity']} (Jaccard of word "
        f"n-grams, random pairs). The refinement changed {quality['improved_differs']:.0%} of the responses.",
    ]
    return "\n".join(lines)


def _title(report: dict[str, Any]) -> str:
    return f"REFED-style instruction data from {report['model']}"



def _in_dataset(name: str) -> str:
    """A file's path relative to dataset/, where the card lives."""
    return posixpath.relpath(name, "dataset")


def _cell(text: str) -> str:
    """Text safe in a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")
