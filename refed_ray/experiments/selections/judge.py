"""Selection by judge (the authors' best filter): keep a sample when the teacher, asked in both
orders, prefers its improved response to its original response both times.

A filter (see the brief's contract): per sample of the run, in dataset order, keep or drop with
a reason; at most ``size`` keeps, the first ones. Its judge calls are the judge pass
(``judge_pass.py``) under the selection's folder, ``<selection>/judge/<judge id>/``: sharded, committed,
resumed and counted there like a compare's.
"""

from __future__ import annotations

import hashlib
import json

import pyarrow as pa

from refed_ray.experiments.judge_pass import (
    judge_counts,
    judge_of_run,
    pair_id,
    read_rejects,
    read_verdicts,
    run_judge_pass,
)
from refed_ray.experiments.selections.decisions import SelectionContext, decisions_table
from refed_ray.storage import Storage

JUDGE_FOLDER = "judge"
REASONS = {
    "x": "improved response won both orders",
    "y": "original response won both orders",
    "tie": "tie: the judge's two orders disagreed",
}


def judge_improvements(samples: pa.Table, size: int, context: SelectionContext) -> pa.Table:
    """``unit_id``, ``sample_index``, ``keep``, ``reason``: one row per sample, in its order."""
    ids = [pair_id(u, i) for u, i in zip(samples["unit_id"].to_pylist(), samples["sample_index"].to_pylist())]
    pairs = pa.table({
        "pair_id": pa.array(ids, pa.string()), "unit_id": samples["unit_id"], "sample_index": samples["sample_index"],
        "instruction": samples["instruction"], "response_x": samples["improved_response"],
        "response_y": samples["response"],
    })
    judge = judge_of_run(context.run, context.judge_config)
    # The judge's actors write under the run's OUTPUT: with its storage options (run.json masks them).
    judge = judge.model_copy(update={
        "storage_options": context.run.storage_options,
        "sampling": judge.sampling.model_copy(update={"seed": context.seed}),
    })
    # One folder per judge: another judge (or seed) starts its own verdicts instead of being
    # refused, and switching back reuses the first one's. Pair ids name the samples, so after a
    # top-up the verdicts of samples judged before are kept: only new shards are judged.
    judge_id = hashlib.sha256(json.dumps(judge.fingerprint(), sort_keys=True).encode()).hexdigest()[:12]
    root = Storage(f"{context.selection.uri}/{JUDGE_FOLDER}/{judge_id}", context.run.storage_options)
    committed = run_judge_pass(root, pairs, judge, {"run": context.run.uri})
    verdicts = read_verdicts(root, committed)
    winners = dict(zip(verdicts["pair_id"].to_pylist(), verdicts["winner"].to_pylist()))
    rejects = read_rejects(root, committed)
    rejected = {} if rejects is None else {
        pair_id(u, i): reason for u, i, reason in
        zip(rejects["unit_id"].to_pylist(), rejects["sample_index"].to_pylist(), rejects["reason"].to_pylist())}
    keeps, reasons = [], []
    for pair in ids:
        winner = winners.get(pair)
        if winner is None:
            keeps.append(False)
            reasons.append(f"not judged: {rejected.get(pair, 'no verdict')}")
            continue
        keep = winner == "x" and sum(keeps) < size
        keeps.append(keep)
        reasons.append(REASONS[winner] + ("" if keep or winner != "x" else f", beyond the first {size}"))
    context.stats.update(judge_counts(root, committed, judge))  # calls, tokens and cost: _selection.json
    return decisions_table(samples, keeps, reasons)
