"""Numbers on the data: diversity and lengths of the delivered samples, next to the references'.

Computed on an evenly spread sample of the compacted dataset (``SAMPLE_ROWS`` rows at most, from
``SAMPLE_GROUPS`` row groups at most), so its cost and memory are flat in N. "Tokens" here are words and
punctuation marks (``\\w+|[^\\w\\s]``), a tokenizer-free stand-in that runs anywhere; model tokens
run about 1.3 per such token for English.
"""

from __future__ import annotations

import random
import re
from typing import Any

import numpy as np

from refed_ray.method.similarity import jaccard, words
from refed_ray.records.models import Reference
from refed_ray.storage import Storage

SAMPLE_ROWS = 20_000
SAMPLE_GROUPS = 20  # row groups the sample is drawn from, spread over the dataset
SAMPLE_COLUMNS = ["instruction", "response", "improved_response"]
SIMILARITY_PAIRS = 2_000
_TOKEN = re.compile(r"\w+|[^\w\s]")


def data_quality(storage: Storage, dataset_files: list[str], references: list[Reference], ngram: int,
                 seed: int = 0) -> dict[str, Any]:
    rows = _sample(storage, dataset_files)
    instructions = [r["instruction"] for r in rows]
    return {
        "sampled_rows": len(rows),
        "distinct_1": _distinct(instructions, 1),
        "distinct_2": _distinct(instructions, 2),
        "mean_pairwise_similarity": _mean_similarity(instructions, ngram, seed),
        "length_tokens": {
            "instruction": _percentiles(instructions),
            "response": _percentiles([r["response"] for r in rows]),
            "improved_response": _percentiles([r["improved_response"] for r in rows]),
            "reference_instruction": _percentiles([r.instruction for r in references]),
            "reference_response": _percentiles([r.response for r in references]),
        },
        "improved_differs": round(
            sum(r["improved_response"].strip() != r["response"].strip() for r in rows) / max(1, len(rows)), 3),
    }


def _sample(storage: Storage, files: list[str]) -> list[dict[str, str]]:
    return sample_rows(storage, files, SAMPLE_COLUMNS, SAMPLE_ROWS, SAMPLE_GROUPS)


def sample_rows(storage: Storage, files: list[str], columns: list[str], max_rows: int,
                max_groups: int = SAMPLE_GROUPS) -> list[dict]:
    """About ``max_rows`` rows spread over the dataset: from up to ``max_groups`` row groups
    spaced evenly across its files, evenly spaced rows of each. Memory holds one row group (see
    ``dataset.ROWS_PER_GROUP``) at a time, and only the picked rows become Python objects: a
    dataset file whole would take gigabytes as dicts."""
    picked_files = [files[i] for i in _spread(len(files), max_groups)]
    groups_per_file = -(-max_groups // max(1, len(picked_files)))
    # Footers first, to share the rows among the groups; then one open file at a time (an
    # object store's file handle keeps a read-ahead buffer until it closes).
    picked: list[tuple[str, list[int]]] = []
    for name in picked_files:
        with storage.parquet_file(name) as parquet:
            picked.append((name, _spread(parquet.num_row_groups, groups_per_file)))
    rows_per_group = -(-max_rows // max(1, sum(len(groups) for _, groups in picked)))
    rows: list[dict] = []
    for name, groups in picked:
        with storage.parquet_file(name) as parquet:
            for group in groups:
                table = parquet.read_row_group(group, columns=columns)
                rows += table.take(_spread(table.num_rows, rows_per_group)).to_pylist()
    return rows[:max_rows]


def _spread(total: int, count: int) -> list[int]:
    """``count`` indices of ``range(total)`` spread evenly from first to last (all when fewer)."""
    if total <= count:
        return list(range(total))
    return sorted({round(i * (total - 1) / max(1, count - 1)) for i in range(count)})


def _distinct(texts: list[str], n: int) -> float:
    """Distinct n-grams over all n-grams of the texts (Li et al. 2016's distinct-n)."""
    grams = [tuple(tokens[i:i + n]) for tokens in map(words, texts) for i in range(len(tokens) - n + 1)]
    return round(len(set(grams)) / len(grams), 3) if grams else 0.0


def _mean_similarity(texts: list[str], ngram: int, seed: int) -> float:
    """Mean Jaccard similarity (the dedup measure) of random pairs of different texts."""
    if len(texts) < 2:
        return 0.0
    rng = random.Random(seed)
    pairs = [rng.sample(range(len(texts)), 2) for _ in range(SIMILARITY_PAIRS)]
    return round(float(np.mean([jaccard(texts[a], texts[b], ngram) for a, b in pairs])), 3)


def token_lengths(texts: list[str]) -> list[int]:
    """Lengths in this module's tokens (words and punctuation marks)."""
    return [len(_TOKEN.findall(t)) for t in texts]


def _percentiles(texts: list[str]) -> dict[str, float]:
    if not texts:
        return {"p10": 0, "p50": 0, "p90": 0}
    lengths = token_lengths(texts)
    p10, p50, p90 = np.percentile(lengths, [10, 50, 90])
    return {"p10": float(p10), "p50": float(p50), "p90": float(p90)}
