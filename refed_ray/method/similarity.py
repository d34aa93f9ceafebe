"""What "near-duplicate instruction" means, in one place: the measure, its MinHash and LSH bands.

Measure: the Jaccard similarity of two instructions' sets of word n-grams (``dedup.ngram`` words,
3 by default) after normalisation (lower case, punctuation dropped, whitespace collapsed); an
instruction shorter than n words is one shingle. Two instructions at or above ``dedup.threshold``
(0.7 by default) are near-duplicates; equal normalised texts (Jaccard 1) are exact duplicates.

MinHash estimates the Jaccard similarity with ``dedup.num_perm`` hash functions (multiply-shift
hashing, 32-bit values). Locality-sensitive hashing cuts each signature into b bands of r values;
two instructions that agree on a whole band become candidates. b and r are chosen as datasketch
does: the (b, r) with b*r <= num_perm that makes a pair at the threshold a candidate with probability
0.99 or more, with the fewest candidates below the threshold. Every candidate pair is then
verified: its MinHash estimate (the share of equal signature values, standard error about 0.04
at 0.7 with 128 values) must reach the threshold.
"""

from __future__ import annotations

import re
import zlib
from functools import cache

import numpy as np

_WORD = re.compile(r"[^\W_]+", re.UNICODE)
_MASK64 = np.uint64(2**64 - 1)


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def shingles(text: str, ngram: int) -> set[str]:
    tokens = words(text)
    if len(tokens) <= ngram:
        return {" ".join(tokens)}
    return {" ".join(tokens[i:i + ngram]) for i in range(len(tokens) - ngram + 1)}


def jaccard(a: str, b: str, ngram: int) -> float:
    """The exact measure, for tests and for the in-unit check."""
    left, right = shingles(a, ngram), shingles(b, ngram)
    return len(left & right) / len(left | right)


@cache
def lsh_bands(threshold: float, num_perm: int, recall: float = 0.99) -> tuple[int, int]:
    """(bands, rows) that make a pair at the threshold a candidate with probability >= ``recall``,
    with the fewest candidates below it (each is verified, so a false candidate costs a check)."""
    grid = np.linspace(0.0, threshold, 101)
    best, best_cost = (num_perm, 1), float("inf")
    for bands in range(1, num_perm + 1):
        for rows in range(1, num_perm // bands + 1):
            if 1 - (1 - threshold**rows) ** bands < recall:
                continue
            cost = np.trapezoid(1 - (1 - grid**rows) ** bands, grid)  # candidates below the threshold
            if cost < best_cost:
                best, best_cost = (bands, rows), cost
    return best


@cache
def _permutations(num_perm: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0x5EED)  # fixed: signatures must agree across processes and runs
    multipliers = rng.integers(1, 2**63, size=num_perm, dtype=np.uint64) | np.uint64(1)  # odd
    offsets = rng.integers(0, 2**63, size=num_perm, dtype=np.uint64)
    return multipliers, offsets


def signatures(texts: list[str], ngram: int, num_perm: int, chunk: int = 2048) -> np.ndarray:
    """MinHash signatures, shape (len(texts), num_perm), uint32; vectorised over chunks of texts."""
    out = np.empty((len(texts), num_perm), dtype=np.uint32)
    multipliers, offsets = _permutations(num_perm)
    for start in range(0, len(texts), chunk):
        part = texts[start:start + chunk]
        hashed = [np.fromiter((zlib.crc32(s.encode()) for s in shingles(t, ngram)), dtype=np.uint64) for t in part]
        lengths = np.array([len(h) for h in hashed])
        flat = np.concatenate(hashed)
        with np.errstate(over="ignore"):  # multiply-shift hashing: products wrap modulo 2**64 on purpose
            values = ((flat[:, None] * multipliers[None, :] + offsets[None, :]) & _MASK64) >> np.uint64(32)
        bounds = np.concatenate([[0], np.cumsum(lengths)[:-1]])
        out[start:start + len(part)] = np.minimum.reduceat(values, bounds, axis=0).astype(np.uint32)
    return out


@cache
def _band_mixers(rows: int) -> np.ndarray:
    rng = np.random.default_rng(0xBA9D)
    return rng.integers(1, 2**63, size=rows + 1, dtype=np.uint64) | np.uint64(1)


def band_keys(signature: np.ndarray, bands: int, rows: int) -> np.ndarray:
    """One 64-bit key per (text, band), shape (len, bands): equal keys = equal band (up to 2**-64)."""
    mixers = _band_mixers(rows)
    keys = np.empty((signature.shape[0], bands), dtype=np.uint64)
    with np.errstate(over="ignore"):
        for band in range(bands):
            part = signature[:, band * rows:(band + 1) * rows].astype(np.uint64)
            key = np.full(signature.shape[0], np.uint64(band) * mixers[-1], dtype=np.uint64)
            for column in range(rows):
                key = (key ^ part[:, column]) * mixers[column]
                key ^= key >> np.uint64(29)
            keys[:, band] = key
    return keys


def near_duplicates_within(texts: list[str], others: list[tuple[str, str]], ngram: int, threshold: float) -> list[tuple[int, str]]:
    """For a handful of texts (one unit's K instructions): ``(index, what it duplicates)`` for each
    text at or above the threshold against ``others`` (e.g. the reference instruction) or an
    earlier text of the list. Exact Jaccard: K is small."""
    found, kept = [], []
    sets = [shingles(t, ngram) for t in texts]
    fixed = [(label, shingles(t, ngram)) for label, t in others]
    for index, current in enumerate(sets):
        match = next((label for label, other in fixed + kept
                      if len(current & other) / len(current | other) >= threshold), None)
        if match is None:
            # Not its index: a reason names what a reject duplicates, the same for every row it counts with.
            kept.append(("an earlier instruction of this unit", current))
        else:
            found.append((index, match))
    return found
