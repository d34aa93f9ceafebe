"""``rougel``: diversity selection by ROUGE-L, exact and scalable.

Greedy, in dataset order: a sample is selected when its instruction's ROUGE-L F-measure against
every instruction selected before it stays below the threshold T, until N are selected. The
measure is rouge_score's without a stemmer: lowercase ``[a-z0-9]+`` tokens, LCS over tokens,
F = 2 * LCS / (|a| + |b|) (0 when either has no token).

Comparing each sample with every selected one is quadratic (10^10 LCS at 100K). Instead an exact
candidate filter finds the only selected instructions that can reach T, and LCS runs on those:

- a bag of tokens becomes a set of (token, occurrence number) elements, so the multiset overlap
  O is a set intersection; LCS <= O, so F >= T needs 2 * O >= T * (|a| + |b|);
- length filter: LCS <= min(|a|, |b|), so F >= T needs |b| >= |a| * T / (2 - T) (and the converse);
- prefix filter: together these need O >= ceil(|x| * T / (2 - T)) for both x = a and x = b, so
  with every element set sorted in one global order (rarest first), a's first
  ``|a| - ceil(|a| * T / (2 - T)) + 1`` elements and b's likewise share at least one element.

Each selected instruction's prefix goes into an inverted index; a new instruction probes it with
its own prefix, keeps the hits that pass the length filter, and computes LCS (bit-parallel, on
Python integers) on those only. Nothing at or above T is ever selected; the filters only skip
pairs that provably stay below it. A kept sample's reason names the nearest instruction among
those checked (every other selected one is below T by the filters, not measured).
"""

from __future__ import annotations

import math
import re
from array import array
from collections import Counter, defaultdict
from collections.abc import Sequence

import numpy as np
import pyarrow as pa

from refed_ray.experiments.selections.decisions import decisions_table

DEFAULT_THRESHOLD = 0.7
_TOKEN = re.compile(r"[a-z0-9]+")
_SLACK = 1e-9  # the filters' bounds are widened by this: float rounding never drops a true candidate


def rougel_diversity(samples: pa.Table, size: int, context) -> pa.Table:
    threshold = DEFAULT_THRESHOLD if context.threshold is None else context.threshold
    keys = [f"{u}#{i}" for u, i in zip(samples.column("unit_id").to_pylist(), samples.column("sample_index").to_pylist())]
    texts = [tokens(t) for t in samples.column("instruction").to_pylist()]
    keep, reasons = greedy_selection(texts, size, threshold, keys)
    return decisions_table(samples, keep, reasons)


def tokens(text: str) -> list[str]:
    """rouge_score's tokens without a stemmer: lowercase runs of ASCII letters and digits."""
    return _TOKEN.findall(text.lower())


def rouge_l(a: Sequence, b: Sequence) -> float:
    """ROUGE-L F-measure of two token sequences."""
    if not a or not b:
        return 0.0
    return 2 * lcs_length(a, b) / (len(a) + len(b))


def lcs_length(a: Sequence, b: Sequence) -> int:
    """Length of the longest common subsequence of two token sequences."""
    return _lcs_with_masks(_position_masks(a), len(a), b)


def _position_masks(a: Sequence) -> dict:
    """``token -> bit mask of its positions in a``, for the bit-parallel LCS."""
    masks: dict = defaultdict(int)
    for position, token in enumerate(a):
        masks[token] |= 1 << position
    return masks


def _lcs_with_masks(masks: dict, length: int, b: Sequence) -> int:
    """Bit-parallel LCS (Allison-Dix, Hyyro): one word operation a token of b, the bits being a's
    positions; the zeros left in ``row`` count the LCS."""
    full = (1 << length) - 1
    row = full
    for token in b:
        match = row & masks.get(token, 0)
        row = ((row + match) | (row - match)) & full
    return length - row.bit_count()


def greedy_selection(texts: list[list[str]], size: int, threshold: float,
                     keys: list[str]) -> tuple[list[bool], list[str]]:
    """Keep flags and reasons for ``texts`` (token lists, in dataset order), named by ``keys``."""
    if not 0 < threshold <= 1:
        raise ValueError(f"the ROUGE-L threshold must be in (0, 1] (got {threshold:g})")
    as_ids = _token_ids(texts)
    selected = _SelectedIndex(threshold)
    keep, reasons = [False] * len(texts), [""] * len(texts)
    for position, (text, own) in enumerate(zip(as_ids, _rare_first_elements(as_ids))):
        if len(selected) >= size:
            reasons[position] = f"size {size} reached"
            continue
        verdict = _closest(text, selected.candidates(own), as_ids, threshold)
        if verdict is not None and verdict[0] >= threshold:
            reasons[position] = f"ROUGE-L F {verdict[0]:.2f} >= {threshold:g} with {keys[verdict[1]]}"
            continue
        reasons[position] = _kept_reason(len(selected), threshold, verdict, keys)
        keep[position] = True
        selected.add(position, own)
    return keep, reasons


class _SelectedIndex:
    """The selected instructions' elements, inverted (element -> slots), probed with a new
    instruction's rare prefix; slots are selection order, ``positions[slot]`` the text."""

    def __init__(self, threshold: float):
        self.threshold = threshold
        self.postings: dict[int, array] = {}
        self.positions = array("q")
        self.lengths = array("q")

    def __len__(self) -> int:
        return len(self.positions)

    def add(self, position: int, elements: list[int]) -> None:
        slot = len(self.positions)
        for element in elements:
            self.postings.setdefault(element, array("i")).append(slot)
        self.positions.append(position)
        self.lengths.append(len(elements))

    def candidates(self, elements: list[int]) -> list[int]:
        """Positions of the selected texts that may reach F >= T with a text of these elements
        (sorted rare first), in selection order. A partner at F >= T shares O >= need =
        ceil(T * (a + b) / 2) elements; at most the a - p elements after the prefix are among
        them, so the prefix holds at least need - (a - p) of them; its length is such that this
        is at least 1 whenever the length filter passes."""
        length = len(elements)
        prefix = _prefix_length(length, self.threshold)
        lists = [self.postings[e] for e in elements[:prefix] if e in self.postings]
        if not lists:
            return []
        slots, shared = np.unique(np.concatenate([np.frombuffer(p, np.int32) for p in lists]), return_counts=True)
        other = np.frombuffer(self.lengths, np.int64)[slots]
        need = np.ceil(self.threshold * (length + other) / 2 - _SLACK) - (length - prefix)
        fits = (other >= length * self.threshold / (2 - self.threshold) - _SLACK) & (shared >= need)
        return np.frombuffer(self.positions, np.int64)[slots[fits]].tolist()


def _kept_reason(count: int, threshold: float, verdict: tuple[float, int] | None, keys: list[str]) -> str:
    if count == 0:
        return "the first instruction selected"
    nearest = (f"nearest checked {verdict[0]:.2f} with {keys[verdict[1]]}" if verdict
               else "none shares enough words to come near")
    return f"ROUGE-L F below {threshold:g} against all {count} selected so far ({nearest})"


def _token_ids(texts: list[list[str]]) -> list[list[int]]:
    """Tokens as small integers (faster dictionary keys, less memory)."""
    vocabulary: dict[str, int] = {}
    return [[vocabulary.setdefault(token, len(vocabulary)) for token in text] for text in texts]


def _rare_first_elements(texts: list[list[int]]) -> list[list[int]]:
    """Each text's (token, occurrence number) elements as integers, sorted in one global order:
    fewest texts holding the element first (then by the element, for a total order)."""
    code: dict[tuple[int, int], int] = {}
    per_text = []
    for text in texts:
        seen: Counter = Counter()
        own = []
        for token in text:
            seen[token] += 1
            own.append(code.setdefault((token, seen[token]), len(code)))
        per_text.append(own)
    frequency = Counter(element for own in per_text for element in own)
    rank = {element: r for r, element in enumerate(sorted(frequency, key=lambda e: (frequency[e], e)))}
    return [sorted((rank[e] for e in own)) for own in per_text]


def _prefix_length(length: int, threshold: float) -> int:
    """Elements of a set of ``length`` that must hold one of any partner's at F >= T: every
    partner shares at least ceil(length * T / (2 - T)) elements with it."""
    if not length:
        return 0
    needed = max(1, math.ceil(length * threshold / (2 - threshold) - _SLACK))
    return length - needed + 1


def _closest(text: list[int], candidates: list[int], texts: list[list[int]],
             threshold: float) -> tuple[float, int] | None:
    """``(F, position)`` of the first candidate at or above T, else of the nearest candidate
    (None without candidates)."""
    masks, best = _position_masks(text), None
    for position in candidates:
        other = texts[position]
        score = 2 * _lcs_with_masks(masks, len(text), other) / (len(text) + len(other))
        if score >= threshold:
            return score, position
        if best is None or score > best[0]:
            best = (score, position)
    return best
