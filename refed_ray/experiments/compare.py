"""``refed-ray compare OUTPUT_A OUTPUT_B``: two runs' delivered datasets side by side, and a
pairwise judge of A's final responses against B's.

Samples pair by (unit_id, sample_index): with ``run --instructions-from OUTPUT_A`` the two runs
share their instructions unit by unit, so a pair differs only in how its response was refined. A
pair whose two instructions differ (runs made apart) is counted, and not judged: a verdict on two
answers to two questions says nothing.

What it writes, ``DIR/compare.json`` (default ``OUTPUT_A/compare/<name of B>/``): the pairs, each
run's feedback calls, calls and tokens per sample by stage, cost, lengths and diversity (from its
report.json and the paired rows), and the judge's result: wins, ties, A's win rate (a tie counts
half) with its 95% Wilson score interval. The judge's calls are a pass of their own under DIR
(``judge_pass.py``): a second compare of the same runs judges nothing again, and after a top-up
of either run only the new pairs.

What it never touches: A and B. DIR is refused (exit 2, whatever the flags) when it is A or B,
lies above either, lies inside either elsewhere than under its ``compare/`` folder, or holds a
run, a dataset or selections; ``--force-new`` only ever discards an earlier judging in DIR.
Paths are compared resolved (symlinks, ``..``), URIs normalised. Refused too, before any judge
call: a run not finished or left mid ``--force-new``, the same run twice, and two runs with no
pair to judge.
"""

from __future__ import annotations

import math
import os
import posixpath
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

from refed_ray.data.dataset import dataset_files, read_manifest
from refed_ray.data.quality import token_lengths
from refed_ray.errors import UserError
from refed_ray.experiments.judge_pass import (
    JudgeConfig,
    judge_counts,
    judge_of_run,
    pair_id,
    read_verdicts,
    run_judge_pass,
)
from refed_ray.method.judge import STAGE
from refed_ray.records.commits import read_run
from refed_ray.records.stages import CALLING_STAGES
from refed_ray.storage import Storage

RESULT = "compare.json"
ROW_COLUMNS = ["unit_id", "sample_index", "instruction", "improved_response"]
Z_95 = 1.959964
MIN_PAIRS = 30  # below it, a win rate is not read as a result whatever its interval


def compare(output_a: str, output_b: str, judge_config: str | None = None, output: str | None = None,
            force_new: bool = False) -> dict[str, Any]:
    judge = judge_of_run(Storage(output_a), judge_config)
    run_a, run_b = Storage(output_a, judge.storage_options), Storage(output_b, judge.storage_options)
    judged = {"a": _run_identity(run_a), "b": _run_identity(run_b)}
    _refuse_the_same_run(run_a, run_b, judged)
    reports = {"a": _read_report(run_a), "b": _read_report(run_b)}
    root = Storage(output or default_output(run_a, run_b), judge.storage_options)
    _refuse_output_over_runs(root, {"A": run_a, "B": run_b})
    pairs, unmatched = paired_rows(run_a, run_b)
    if not pairs.num_rows:
        raise UserError(f"{run_a.uri} and {run_b.uri} have no pair to judge ({unmatched['only_a']} samples only in "
                        f"A, {unmatched['only_b']} only in B, {unmatched['different_instruction']} with different "
                        "instructions): make B with --instructions-from OUTPUT_A")
    committed = run_judge_pass(root, pairs, judge, judged, force_new=force_new)

    result = {
        "a": run_a.uri,
        "b": run_b.uri,
        "output": root.uri,
        "pairs": pairs.num_rows,
        "unpaired": unmatched,
        "runs": {side: run_figures(reports[side]) for side in ("a", "b")},
        "response_lengths": {
            "a": length_figures(pairs.column("response_x").to_pylist()),
            "b": length_figures(pairs.column("response_y").to_pylist()),
        },
        "judge": judge_result(root, committed, judge, set(pairs.column("pair_id").to_pylist())),
    }
    root.write_json(RESULT, result)
    return result


def default_output(run_a: Storage, run_b: Storage) -> str:
    """OUTPUT_A/compare/<name of B>, B's name read from its resolved path (``B/x/..`` is named B)."""
    return f"{run_a.uri}/compare/{posixpath.basename(location(run_b)[1])}"


def location(storage: Storage) -> tuple[str, str]:
    """Where ``storage`` is, to compare folders: its protocol and its path, resolved on this
    machine (symlinks, ``..``), normalised on object stores."""
    protocol = storage.fs.protocol if isinstance(storage.fs.protocol, str) else storage.fs.protocol[0]
    path = os.path.realpath(storage.root) if storage.is_local else posixpath.normpath(storage.root)
    return protocol, path


def _within(inner: tuple[str, str], outer: tuple[str, str]) -> bool:
    """Whether ``inner`` is ``outer`` or lies inside it."""
    return inner[0] == outer[0] and (inner[1] == outer[1] or inner[1].startswith(outer[1].rstrip("/") + "/"))


def _refuse_output_over_runs(root: Storage, runs: dict[str, Storage]) -> None:
    """compare writes and, with --force-new, deletes in ``root``: never over a run it reads."""
    where = location(root)
    for side, run in runs.items():
        there = location(run)
        if _within(there, where):
            raise UserError(f"--output {root.uri} is run {side} ({run.uri}) or a folder above it: compare never "
                            "writes there; choose a folder of its own (default OUTPUT_A/compare/<name of B>)")
        compares = (there[0], posixpath.join(there[1], "compare"))
        if _within(where, there) and not (_within(where, compares) and where != compares):
            raise UserError(f"--output {root.uri} lies inside run {side} ({run.uri}): compare writes there only "
                            f"under its compare/ folder, e.g. {run.uri}/compare/NAME")


def _refuse_the_same_run(run_a: Storage, run_b: Storage, judged: dict[str, dict[str, str]]) -> None:
    same_id = judged["a"]["run_id"] and judged["a"]["run_id"] == judged["b"]["run_id"]  # a copy of A is A
    if location(run_a) == location(run_b) or same_id:
        raise UserError(f"{run_a.uri} and {run_b.uri} are the same run (run {judged['a']['run_id']}): "
                        "compare two runs, e.g. B made with --instructions-from OUTPUT_A")


def _read_report(run: Storage) -> dict[str, Any]:
    if not run.exists("report.json") or read_manifest(run) is None:
        raise UserError(f"{run.uri} holds no finished run (report.json and dataset/): run it to the end first")
    return run.read_json("report.json")


def _run_identity(run: Storage) -> dict[str, str]:
    """What the pairs are read from: the run (its id), not its dataset's generation, so that a
    top-up keeps the verdicts of the pairs judged before (a pair's content is fixed within a run).
    Refuses a folder holding no run, a judge's, or a run left in the middle of --force-new."""
    return {"output": "://".join(location(run)), "run_id": read_run(run).get("run_id", "")}


def read_delivered(run: Storage, columns: list[str]) -> pa.Table:
    """The delivered dataset's ``columns``, in dataset order."""
    tables = [run.read_table(name, columns=columns) for name in dataset_files(run)]
    return pa.concat_tables(tables) if tables else pa.table({c: [] for c in columns})


def paired_rows(run_a: Storage, run_b: Storage) -> tuple[pa.Table, dict[str, int]]:
    """The judge's pairs (``judge_pass.PAIR_COLUMNS``, X = A's final response, Y = B's), in A's
    dataset order, and what could not be paired: samples of one run only, and pairs whose
    instructions differ."""
    a = read_delivered(run_a, ROW_COLUMNS)
    a = a.append_column("order", pa.array(np.arange(a.num_rows), pa.int64()))
    b = read_delivered(run_b, ROW_COLUMNS)
    b = b.rename_columns(["unit_id", "sample_index", "instruction_b", "response_y"])
    joined = a.join(b, keys=["unit_id", "sample_index"], join_type="inner").sort_by("order")
    same = pc.equal(joined["instruction"], joined["instruction_b"])
    pairs = joined.filter(same)
    ids = [pair_id(u, i) for u, i in zip(pairs["unit_id"].to_pylist(), pairs["sample_index"].to_pylist())]
    pairs = pa.table({
        "pair_id": pa.array(ids, pa.string()), "unit_id": pairs["unit_id"], "sample_index": pairs["sample_index"],
        "instruction": pairs["instruction"], "response_x": pairs["improved_response"], "response_y": pairs["response_y"],
    })
    unmatched = {"only_a": a.num_rows - joined.num_rows, "only_b": b.num_rows - joined.num_rows,
                 "different_instruction": joined.num_rows - pairs.num_rows}
    return pairs, unmatched


def run_figures(report: dict[str, Any]) -> dict[str, Any]:
    """One run's cost in calls and tokens, per accepted sample and by stage, from its report.json."""
    samples = max(1, report["samples"])
    order = [str(stage) for stage in CALLING_STAGES]  # the order a sample meets them
    stages = {name: report["stages"][name] for name in order if report["stages"].get(name, {}).get("calls")}
    quality = report.get("quality") or {}
    return {
        "model": report["model"],
        "delivered": report["delivered"],
        "samples": report["samples"],
        "feedback_calls": report["feedback_calls"],
        "calls": sum(s["calls"] for s in stages.values()),
        "per_sample": {
            name: {key: round(s[key] / samples, 3) for key in ("calls", "prompt_tokens", "completion_tokens")}
            for name, s in stages.items()
        },
        "calls_per_sample": round(sum(s["calls"] for s in stages.values()) / samples, 3),
        "cost": report["cost"],
        "diversity": {key: quality.get(key) for key in
                      ("distinct_1", "distinct_2", "mean_pairwise_similarity", "improved_differs")},
        "length_tokens": quality.get("length_tokens"),
    }


def length_figures(texts: list[str]) -> dict[str, float]:
    """Lengths in quality.py's tokens (words and punctuation marks)."""
    lengths = token_lengths(texts) or [0]
    p10, p50, p90 = np.percentile(lengths, [10, 50, 90])
    return {"mean": round(float(np.mean(lengths)), 1), "p10": round(float(p10), 1), "p50": round(float(p50), 1),
            "p90": round(float(p90), 1)}


def judge_result(root: Storage, committed, judge: JudgeConfig, pair_ids: set[str]) -> dict[str, Any]:
    verdicts = read_verdicts(root, committed)
    winners = [w for p, w in zip(verdicts["pair_id"].to_pylist(), verdicts["winner"].to_pylist()) if p in pair_ids]
    counts = {side: winners.count(side) for side in ("x", "y", "tie")}
    stats = committed.stats(STAGE)
    rate, interval = win_rate(counts["x"], counts["y"], counts["tie"])
    return {
        "model": judge.model_name(),
        "judged": len(winners),
        "a_wins": counts["x"],
        "b_wins": counts["y"],
        "ties": counts["tie"],
        "rejected": sum(stats.reject_reasons.values()),
        "reject_reasons": stats.reject_reasons,
        "win_rate_a": rate,
        "ci95": interval,
        "ci_method": "Wilson score interval of the win rate, a tie counted as half a win",
        "inconclusive": conclusion(len(winners), interval),
        **judge_counts(root, committed, judge),
    }


def win_rate(wins: int, losses: int, ties: int) -> tuple[float | None, list[float] | None]:
    """A's win rate (a tie counts half) and its 95% Wilson score interval, None without pairs.
    Wilson, not the normal approximation: that one gives an interval of zero width when every
    pair goes one way (2 of 2: "100% to 100%"); Wilson's stays honest at small n and at 0 or 1.
    Ties counted as half a win make its variance an upper bound: the interval errs wide."""
    n = wins + losses + ties
    if n == 0:
        return None, None
    rate = (wins + 0.5 * ties) / n
    z2 = Z_95 ** 2
    centre = (rate + z2 / (2 * n)) / (1 + z2 / n)
    half = Z_95 / (1 + z2 / n) * math.sqrt(rate * (1 - rate) / n + z2 / (4 * n * n))
    return round(rate, 4), [round(max(0.0, centre - half), 4), round(min(1.0, centre + half), 4)]


def conclusion(pairs: int, interval: list[float] | None) -> str | None:
    """Why the judged pairs cannot conclude which run is better, or None when they can."""
    if interval is None:
        return "no pair judged"
    if pairs < MIN_PAIRS:
        return f"too few pairs to conclude anything ({pairs} judged, fewer than {MIN_PAIRS})"
    if interval[0] <= 0.5 <= interval[1]:
        return "no difference shown: the interval contains 50%"
    return None


def summary(result: dict[str, Any]) -> str:
    judge, runs = result["judge"], result["runs"]
    lines = [f"refed-ray compare: {result['pairs']} pairs of {result['a']} (A) and {result['b']} (B)"
             f" -> {result['output']}/{RESULT}"]
    unpaired = result["unpaired"]
    if any(unpaired.values()):
        lines.append(f"  not paired: {unpaired['only_a']} only in A, {unpaired['only_b']} only in B, "
                     f"{unpaired['different_instruction']} with different instructions (not judged)")
    for side in ("a", "b"):
        run = runs[side]
        cost = f"  cost {run['cost']['total']:.4f}" if run["cost"] else ""
        by_stage = ", ".join(f"{name} {stage['calls']}" for name, stage in run["per_sample"].items())
        lines.append(f"  {side.upper()}: {run['delivered']} delivered, {run['feedback_calls']} feedback calls, "
                     f"{run['calls_per_sample']} calls a sample "
                     f"({by_stage}){cost}; "
                     f"final response p50 {result['response_lengths'][side]['p50']:.0f} tokens")
    if judge["win_rate_a"] is None:
        lines.append(f"  judge ({judge['model']}): no pair judged ({judge['rejected']} rejected)")
    else:
        low, high = judge["ci95"]
        lines.append(f"  judge ({judge['model']}, both orders): A wins {judge['a_wins']}, B wins {judge['b_wins']}, "
                     f"ties {judge['ties']}, rejected {judge['rejected']}; win rate A {judge['win_rate_a']:.1%} "
                     f"(95% CI {low:.1%} to {high:.1%}, Wilson); {judge['calls']} judge calls")
        if judge["inconclusive"]:
            lines.append(f"  not conclusive: {judge['inconclusive']}")
    if judge["cost"]:
        lines.append(f"  judge cost: {judge['cost']['total']:.4f}")
    return "\n".join(lines)
