"""Near-duplicate instructions, before and after the seeded variation, and the dedup pass's speed.

Part 1 (the embedded CPU teacher, real vLLM): one reference, both aspects, ``--rounds`` rounds of
the instruction step only, K as the demo (jobs/demo.yaml). Two designs, side by side:
- "same prompt": every round sends round 0's prompt (only the seed changes), as before;
- "seeded variation": round r >= 1 carries its own facet combination (refed_ray/method/instructions.py).
For each, the near-duplicate rate: the share of instructions at Jaccard >= threshold (the dedup
measure, refed_ray/method/similarity.py) with the reference or an earlier instruction of the set. Then
the dedup pass (in-unit check + the global MinHash-LSH pass, as a run does them) and the pairs
above the threshold that survive it (target 0).

Part 2 (no model): the global dedup pass over ``--synthetic`` instructions (1M by default) written
as committed shards, 10% of them near-duplicates: instructions per second per core and the peak
memory of the driver and of the Ray worker processes.

    python benchmarks/diversity.py                      # both parts (part 1: about 10 minutes on 2 cores)
    python benchmarks/diversity.py --skip-engine        # part 2 only
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import os
import random
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from refed_ray.dedup import deduplicate, dropped_keys

from refed_ray.method.similarity import jaccard


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--synthetic", type=int, default=1_000_000)
    parser.add_argument("--skip-engine", action="store_true")
    parser.add_argument("--skip-synthetic", action="store_true")
    parser.add_argument("--model", help="teacher folder or hub id (default: the embedded one)")
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False)
    if not args.skip_engine:
        engine_part(args.rounds, args.model)
    if not args.skip_synthetic:
        synthetic_part(args.synthetic)


# ---- part 1: the real teacher ----------------------------------------------------------------


def engine_part(rounds: int, model: str | None) -> None:
    from refed_ray.config import RunConfig
    from refed_ray.data.seeds import read_seeds
    from refed_ray.engines.kinds import create_engine
    from refed_ray.method.feedback import collect_feedback
    from refed_ray.method.instructions import synthesize_instructions
    from refed_ray.method.refiners import refiner_for
    from refed_ray.method.structured import derive_seed
    from refed_ray.records.models import ASPECTS, WorkUnit

    config = RunConfig.model_validate(yaml.safe_load((ROOT / "jobs/demo.yaml").read_text()))
    config = config.model_copy(update={"engine": config.engine.model_copy(update={"device": "cpu", "model": model})})
    reference = read_seeds(None, 0).references[0]
    started = time.time()
    engine = create_engine(config.engine)
    print(f"engine: {engine.model_name}, loaded in {time.time() - started:.0f} s; reference "
          f"{reference.reference_id!r}, K={config.instructions_per_aspect}, {rounds} rounds x 2 aspects per design")

    async def both_designs():
        steps = refiner_for(config.feedback.mode).reference_feedback
        feedback = (await collect_feedback(engine, reference, config, steps)).feedback
        if feedback is None:
            raise SystemExit("the teacher's feedback on the reference did not validate; run again")
        designs = {}
        for name, as_round in (("same prompt", lambda r: 0), ("seeded variation", lambda r: r)):
            units = [WorkUnit(unit_id=f"{aspect}-{r}", round=as_round(r), reference_id=reference.reference_id,
                              aspect=aspect, seed=derive_seed(config.seed, "bench", aspect, r))
                     for r in range(rounds) for aspect in ASPECTS]
            begun = time.time()
            answers = await asyncio.gather(*(synthesize_instructions(engine, u, feedback, config) for u in units))
            designs[name] = (units, answers, time.time() - begun)
        return feedback, designs

    feedback, designs = asyncio.run(both_designs())
    threshold, ngram = config.dedup.threshold, config.dedup.ngram
    print(f"\nnear-duplicates at Jaccard >= {threshold:g} (word {ngram}-grams):")
    print(f"{'design':<18}{'replies ok':>11}{'instructions':>14}{'near-dup rate':>15}{'of reference':>14}"
          f"{'after dedup':>13}{'pairs >= t left':>17}{'seconds':>9}")
    rates = {}
    for name, (units, answers, seconds) in designs.items():
        instructions = [(u, i, text) for u, a in zip(units, answers) if a.value is not None
                        for i, text in enumerate(a.value.instructions)]
        texts = [text for _, _, text in instructions]
        rates[name] = near_duplicate_rate(texts, feedback.instruction, ngram, threshold)
        echoes = sum(jaccard(t, feedback.instruction, ngram) >= threshold for t in texts) / max(1, len(texts))
        kept = after_dedup(instructions, feedback.instruction, config)
        left = sum(1 for a, b in itertools.combinations(kept, 2) if jaccard(a, b, ngram) >= threshold)
        print(f"{name:<18}{sum(a.value is not None for a in answers):>7}/{len(answers):<3}{len(texts):>14}"
              f"{rates[name]:>15.1%}{echoes:>14.1%}{len(kept):>13}{left:>17}{seconds:>9.0f}")
        for text in texts[:: max(1, len(texts) // 6)][:6]:
            print(f"    e.g. {text[:150]!r}")
    before, after = rates["same prompt"], rates["seeded variation"]
    print(f"seeded variation / same prompt: {after / before:.2f}x the near-duplicate rate" if before else
          "the same-prompt design wrote no near-duplicates in this sample")
    engine.shutdown()


def near_duplicate_rate(texts: list[str], reference: str, ngram: int, threshold: float) -> float:
    """Share of texts at or above the threshold with the reference or an earlier text."""
    hits = sum(1 for i, text in enumerate(texts)
               if any(jaccard(text, other, ngram) >= threshold for other in [reference, *texts[:i]]))
    return hits / max(1, len(texts))


def after_dedup(instructions, reference: str, config) -> list[str]:
    """What a run keeps: the in-unit check, then the global pass over the committed rest."""
    from refed_ray.method.similarity import near_duplicates_within

    by_unit: dict[str, list[str]] = {}
    for unit, _, text in instructions:
        by_unit.setdefault(unit.unit_id, []).append(text)
    survivors = []
    for unit_id, texts in by_unit.items():
        dropped = dict(near_duplicates_within(texts, [("reference", reference)], config.dedup.ngram,
                                              config.dedup.threshold))
        survivors += [(unit_id, i, t) for i, t in enumerate(texts) if i not in dropped]
    with tempfile.TemporaryDirectory() as work:
        storage, log = commit_texts(Path(work), [t for _, _, t in survivors], shard_rows=50)
        deduplicate(storage, log, config.dedup)
        dropped = {(r["unit_id"], r["sample_index"]) for r in dropped_keys(storage, log, config.dedup).to_pylist()}
        return [row["instruction"] for name in log.files("data") for row in storage.read_table(name).to_pylist()
                if (row["unit_id"], row["sample_index"]) not in dropped]


# ---- part 2: the pass at a million -----------------------------------------------------------


def synthetic_part(count: int) -> None:
    import psutil

    from refed_ray.config import DedupConfig
    from tests.fake_engine import VOCABULARY

    rng = random.Random(0)
    originals = count - count // 10
    started = time.time()
    texts = [" ".join(rng.choices(VOCABULARY, k=rng.randint(12, 40))) for _ in range(originals)]
    for i in range(count - originals):  # a near-duplicate: one word changed at the end
        words = texts[rng.randrange(originals)].split()
        texts.append(" ".join(words[:-1] + [rng.choice(VOCABULARY) + "x"]))
    rng.shuffle(texts)
    with tempfile.TemporaryDirectory() as work:
        storage, log = commit_texts(Path(work), texts, shard_rows=10_000)
        print(f"\nsynthetic: {count:,} instructions ({count - originals:,} near-duplicates injected) in "
              f"{len(log.commits['synthesis'])} shards, written in {time.time() - started:.0f} s")
        peak = {"workers": 0}
        stop = threading.Event()

        def watch():
            while not stop.is_set():
                for proc in psutil.process_iter(["name", "cmdline", "memory_info"]):
                    cmd = " ".join(proc.info["cmdline"] or [])
                    if "ray::" in (proc.info["name"] or "") or "default_worker.py" in cmd:
                        peak["workers"] = max(peak["workers"], proc.info["memory_info"].rss)
                stop.wait(0.5)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        begun = time.time()
        commit = deduplicate(storage, log, DedupConfig())
        seconds = time.time() - begun
        stop.set()
        cores = int(__import__("ray").cluster_resources().get("CPU", 1))
        driver = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"dedup pass: {seconds:.1f} s, {commit.stats.lost_samples:,} dropped; "
              f"{count / seconds:,.0f} instructions/s = {count / seconds / cores:,.0f} per core ({cores} cores)")
        print(f"peak RSS: driver {driver:,.0f} MB (texts generated in it included), "
              f"largest Ray worker {peak['workers'] / 2**20:,.0f} MB")


def commit_texts(work: Path, texts: list[str], shard_rows: int):
    """``texts`` as committed synthesis shards of an OUTPUT, the way a run leaves them."""
    import pyarrow as pa

    from refed_ray.records import commits
    from refed_ray.records.commits import CommitLog
    from refed_ray.records.models import Sample, arrow_schema
    from refed_ray.records.stats import ShardStats
    from refed_ray.storage import Storage

    storage = Storage(str(work / "out"))
    log = CommitLog(storage)
    schema = arrow_schema(Sample)
    for shard, start in enumerate(range(0, len(texts), shard_rows)):
        part = texts[start:start + shard_rows]
        units = [f"s{shard}-u{i // 10}" for i in range(len(part))]
        columns = {name: pa.nulls(len(part), field.type) for name, field in zip(schema.names, schema)}
        columns |= {"instruction": pa.array(part), "unit_id": pa.array(units),
                    "sample_index": pa.array([i % 10 for i in range(len(part))], pa.int64()),
                    "reference_id": pa.array(["ref"] * len(part)), "aspect": pa.array(["subject_areas"] * len(part))}
        tables = {"data": pa.table(columns, schema=schema)}
        log.add(commits.commit_shard(storage, "synthesis", f"synthesis-{shard:05d}", sorted(set(units)), tables,
                                     ShardStats.of(tables, {})))
    return storage, log


if __name__ == "__main__":
    main()
