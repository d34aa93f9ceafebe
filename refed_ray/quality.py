"""Numbers on the data: diversity and lengths of the delivered samples, next to the references'.

Computed on an evenly spread sample of the compacted dataset (``SAMPLE_ROWS`` rows at most, whole
dataset files read until it is reached), so the cost is flat in N. "Tokens" here are words and
punctuation marks (``\\w+|[^\\w\\s]``), a tokenizer-free stand-in that runs anywhere; model tokens
run about 1.3 per such token for English.
"""

from __future__ import annotations

import random
import re
from typing import Any

import numpy as np

from refed_ray.records import Reference
from refed_ray.similarity import jaccard, words
from refed_ray.storage import Storage

SAMPLE_ROWS = 20_000
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
    columns = ["instruction", "response", "improved_response"]
    if not files:
        return []
    first = storage.read_table(files[0], columns=columns)
    per_file = max(1, first.num_rows)
    wanted = min(len(files), max(1, -(-SAMPLE_ROWS // per_file)))
    picked = sorted({round(i * (len(files) - 1) / max(1, wanted - 1)) for i in range(wanted)})
    tables = [first if i == 0 else storage.read_table(files[i], columns=columns) for i in picked]
    rows = [row for table in tables for row in table.to_pylist()]
    step = max(1, len(rows) // SAMPLE_ROWS)
    return rows[::step][:SAMPLE_ROWS]


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


def _percentiles(texts: list[str]) -> dict[str, float]:
    if not texts:
        return {"p10": 0, "p50": 0, "p90": 0}
    lengths = [len(_TOKEN.findall(t)) for t in texts]
    p10, p50, p90 = np.percentile(lengths, [10, 50, 90])
    return {"p10": float(p10), "p50": float(p50), "p90": float(p90)}
