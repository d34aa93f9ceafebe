"""How full a run keeps its GPUs, from the first engine ready to the last token: a whole run on a
simulated multi-node GPU cluster (issue 24).

    python benchmarks/gpu_sim.py                       # 32 and 64 units a shard, about 15 min on 2 cores
    python benchmarks/gpu_sim.py --units-per-shard 64 --num-samples 10000
    python benchmarks/gpu_sim.py --analyse             # the figures of the last runs again

At ``--time-scale 0.25`` (the default) a simulated second takes 0.25 s: smaller scales finish sooner,
but this machine's own work (actor start-up, the driver, the pipeline's Python: some 500 calls a
real second at 0.1) then weighs more, and on a busy machine starved actors leave their engines
idle in a way no GPU node would. On a shared machine, run it with ``nice -n -10``: Ray starts its
workers 15 steps nicer than their driver, so the run's actors then go before other drivers' workers.

Each run is ``refed_ray.run.pipeline.run``, unchanged, in a fresh driver process, on a
``ray.cluster_utils.Cluster`` of ``--nodes`` nodes declaring ``--gpus-per-node`` GPUs each. The
teacher is ``benchmarks/sim_engine.py``'s simulated GPU engine (continuous batching of 256
sequences; a step of b sequences takes 9.9 ms + 0.118 ms x b, calibrated to about 6,400 output
tokens/s at a full batch and 100 for one stream: an 8B model on one H100), selected as a
``custom`` engine asking Ray for one GPU, as a vllm engine does. Every duration of the engine
(steps, loads) is multiplied by ``--time-scale``; figures are in simulated seconds (real / scale).

Printed: whole-run efficiency = tokens made / (GPUs x full-batch rate x time from the first engine
ready to the last token), and where the rest of that GPU time went, from the engines' own records
(load and ready times, every change of their batch size) and the driver's phases:

- engine loads: GPU time spent loading engines, or without an engine while others are ready;
- feedback pass: the engines under-filled while they collect the feedback (the run's engine pass
  until the driver reads the feedback for its broadcast: ``refed_ray.run.broadcast``);
- between passes: the driver's work after a pass (the dedup filter, planning a top-up) with no
  engine alive, and the exits and starts around it;
- synthesis, steady state: engines under-filled (fewer than 256 sequences) or idle between shards,
  before an engine last held a full batch;
- synthesis, tails: after an engine last held a full batch until the pass ends;
- top-up rounds: everything inside a second or later synthesis pass.

The driver's own work runs at this machine's real speed, not the simulated one, so it weighs
1/scale times more in simulated time than it would beside a real GPU; "driver at real speed"
recomputes the efficiency with the between-pass time taken at real seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))

from benchmarks.scale import write_seeds
from benchmarks.sim_engine import FULL_BATCH, TOKENS, full_batch_rate, step_s

# The driver's functions timed as phases (refed_ray.run.pipeline's names), and the one that marks
# the end of the feedback inside the run's engine pass (refed_ray.run.broadcast's).
PHASES = ("_engine_pass", "_apply_filters", "_top_up_units", "write_plan", "compact_dataset", "data_quality",
          "build_report")
FEEDBACK_READ = "read_feedback"
# A sample's tokens: its response and refinement, and its share of the K instructions.
SAMPLE_TOKENS = TOKENS["SynthesizedResponse"] + TOKENS["Refinement"] + TOKENS["InstructionList"]
K = 10  # instructions_per_aspect, the paper's


def config_for(args, seeds: Path, output: Path, records: Path, units_per_shard: int) -> dict:
    return {
        "seeds": str(seeds),
        "output": str(output),
        "num_samples": args.num_samples,
        "instructions_per_aspect": K,
        "output_shared_filesystem": True,  # the cluster's nodes are processes of one machine
        "engine": {
            "kind": "custom", "class_path": "benchmarks.sim_engine:SimGPUEngine",
            "resources": {"num_cpus": 0.5, "num_gpus": 1},
            "engine_kwargs": {"time_scale": args.time_scale, "load_s": args.load_s, "reject_rate": args.reject_rate,
                              "records_dir": str(records)},
        },
        "workers": {"num_engines": args.nodes * args.gpus_per_node, "units_per_shard": units_per_shard,
                    **({"shards_in_flight": args.shards_in_flight} if args.shards_in_flight else {})},
    }


# ---- one run, in its own driver process -------------------------------------------------------


def one(config_json: str, nodes: int, gpus_per_node: int, phases_file: str) -> None:
    import ray

    from refed_ray.config import RunConfig
    from refed_ray.run import broadcast, pipeline

    phases: list[tuple[str, float, float]] = []
    config = RunConfig.model_validate_json(config_json)
    _time_phases(pipeline, PHASES, phases, Path(config.engine.engine_kwargs["records_dir"]) / "pass_started")
    _time_phases(broadcast, (FEEDBACK_READ,), phases, None)
    cluster = start_cluster(nodes, gpus_per_node)
    try:
        ray.init(address=cluster.address, log_to_driver=False, logging_level="WARNING")
        report = pipeline.run(config)
        Path(phases_file).write_text(json.dumps({"phases": phases, "samples": report["samples"],
                                                 "delivered": report["delivered"]}))
    finally:
        ray.shutdown()
        cluster.shutdown()


def start_cluster(nodes: int, gpus_per_node: int):
    """The nodes, tried again: on a loaded 2-core machine a node can miss Ray's start-up wait."""
    from ray.cluster_utils import Cluster

    for attempt in range(3):
        cluster = None
        try:
            cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 4, "num_gpus": gpus_per_node})
            for _ in range(nodes - 1):
                cluster.add_node(num_cpus=4, num_gpus=gpus_per_node)
            return cluster
        except Exception:
            if cluster is not None:
                cluster.shutdown()
            if attempt == 2:
                raise
            time.sleep(10)


def _time_phases(module, names: tuple[str, ...], phases: list, pass_started: Path | None) -> None:
    """Wrap the pipeline's phases in timers; an engine pass's start also goes to ``pass_started``
    (the simulated engines count their load from it: sim_engine.py)."""
    for name in names:
        original = getattr(module, name)

        def timed(*args, _original=original, _name=name, **kwargs):
            started = time.time()
            if _name == "_engine_pass":
                pass_started.write_text(str(started))
            try:
                return _original(*args, **kwargs)
            finally:
                phases.append((_name, started, time.time()))

        setattr(module, name, timed)


# ---- where the GPU time went --------------------------------------------------------------------


def analyse(records: list[dict], phases: list, gpus: int, scale: float, bins: int = 40000) -> dict:
    """Integrate every GPU's state over [first engine ready, last token] in ``bins`` steps."""
    import numpy as np

    start = min(r["ready"] for r in records)
    end = max(_last_token(r) for r in records)
    t = start + (np.arange(bins) + 0.5) * (end - start) / bins
    dt = (end - start) / bins / scale  # simulated seconds per bin
    rate = full_batch_rate(FULL_BATCH)
    phase = _phase_of(t, phases)
    alive = np.zeros(bins)
    losses = {key: 0.0 for key in ("engine loads", "feedback pass", "between passes", "synthesis: under-filled",
                                   "synthesis: idle between shards", "synthesis: tails", "top-up rounds")}
    made = 0.0
    for r in records:
        gone = r.get("shutdown", r["changes"][-1][0] if r["changes"] else r["ready"])
        r["changes"] = r["changes"] or [(r["ready"], 0)]  # an engine that got no call
        loading = (t >= r["load_start"]) & (t < r["ready"])
        ready = (t >= r["ready"]) & (t < gone)
        alive += loading | ready
        times = np.array([c[0] for c in r["changes"]])
        batch = np.array([c[1] for c in r["changes"]])
        b = np.where(ready, batch[np.clip(np.searchsorted(times, t, "right") - 1, 0, None)], 0)
        produced = np.where(b > 0, b / step_s(np.maximum(b, 1)), 0.0)
        made += produced.sum() * dt
        lost = np.where(ready, rate - produced, 0.0) + np.where(loading, rate, 0.0)
        tail = t >= _last_full(r, times, batch)
        _attribute(losses, lost, loading, b, tail, phase, dt)
    empty = (gpus - alive) * rate * dt
    first = phase == 2
    first_half = t < (t[first].min() + t[first].max()) / 2 if first.any() else first
    # A GPU without an engine in the first synthesis pass: waiting for its actor early on, or left
    # by an actor that exited near the end.
    for name, mask in (("top-up rounds", phase >= 3), ("between passes", phase == 0),
                       ("engine loads", (first & first_half) | (phase == 1)), ("synthesis: tails", first & ~first_half)):
        losses[name] += empty[mask].sum()
    capacity = gpus * rate * (end - start) / scale
    between_real = ((phase == 0).sum() * (end - start) / bins)
    last_tokens = [_last_token(r) for r in records]
    last_full = [_last_full(r, [c[0] for c in r["changes"]], [c[1] for c in r["changes"]]) for r in records]
    return {"capacity": capacity, "made": made, "span_s": (end - start) / scale, "losses": losses,
            "between_real_s": between_real, "tokens": sum(sum(r["tokens"].values()) for r in records),
            "engines": len(records), "rate": rate,
            "ends_apart_s": (max(last_tokens) - min(last_tokens)) / scale, "held": _held_uncommitted(records),
            "drain_s": sum(t - f for t, f in zip(last_tokens, last_full)) / len(records) / scale}


def _held_uncommitted(records: list[dict]) -> float:
    """Tokens an engine's actor holds in shards not committed yet, averaged over its time from ready
    to last token: what a death at a random moment would redo (Ray retries every shard in flight
    on the dead actor). A shard's work counts from each call's end to the shard's last call's end
    (its commit follows at once)."""
    held = []
    for r in records:
        answered = r.get("answered", [])
        if not answered:
            continue
        ends: dict[int, float] = {}
        for done, order, _ in answered:
            ends[order] = max(ends.get(order, done), done)
        token_seconds = sum(tokens * (ends[order] - done) for done, order, tokens in answered)
        held.append(token_seconds / max(_last_token(r) - r["ready"], 1e-9))
    return sum(held) / len(held) if held else 0.0


def _attribute(losses, lost, loading, b, tail, phase, dt) -> None:
    first = phase == 2
    losses["feedback pass"] += lost[(phase == 1) & ~loading].sum() * dt
    losses["between passes"] += lost[phase == 0].sum() * dt
    losses["top-up rounds"] += lost[phase >= 3].sum() * dt
    losses["engine loads"] += lost[(first | (phase == 1)) & loading].sum() * dt
    steady, ending = first & ~loading & ~tail, first & ~loading & tail
    losses["synthesis: under-filled"] += lost[steady & (b > 0)].sum() * dt
    losses["synthesis: idle between shards"] += lost[steady & (b == 0)].sum() * dt
    losses["synthesis: tails"] += lost[ending].sum() * dt


def _phase_of(t, phases: list):
    """Per instant: 1 the feedback (from the first engine pass's start until its feedback is read
    for the broadcast), 2 the rest of the first engine pass (synthesis), 3+ a top-up round's pass,
    0 else."""
    import numpy as np

    phase = np.zeros(len(t), dtype=int)
    passes = sorted(p for p in phases if p[0] == "_engine_pass")
    for number, (_, begin, finish) in enumerate(passes):
        phase[(t >= begin) & (t < finish)] = 2 + number
    read = [finish for name, _, finish in phases if name == FEEDBACK_READ]
    if passes and read:
        phase[(t >= passes[0][1]) & (t < min(read))] = 1
    return phase


def _last_token(record: dict) -> float:
    busy = [c[0] for c in record["changes"] if c[1] == 0]
    return busy[-1] if busy else record["ready"]


def _last_full(record: dict, times, batch) -> float:
    """When the engine last dropped below a full batch (its tail starts there)."""
    full = record["max_num_seqs"]
    drops = [times[i] for i in range(1, len(batch)) if batch[i - 1] == full and batch[i] < full]
    return drops[-1] if drops else record["ready"]


def run_one(args, work: Path, seeds: Path, units_per_shard: int) -> dict:
    output, records = work / f"out-{units_per_shard}", work / f"records-{units_per_shard}"
    phases_file = work / f"phases-{units_per_shard}.json"
    started = time.time()
    for attempt in range(0 if args.analyse else 3):
        # A fresh output each try: on a shared machine another user's `ray stop` kills the nodes.
        subprocess.run(["rm", "-rf", str(output), str(records)], check=True)
        records.mkdir(parents=True)
        config = config_for(args, seeds, output, records, units_per_shard)
        done = subprocess.run([sys.executable, __file__, "--one", json.dumps(config), "--nodes", str(args.nodes),
                               "--gpus-per-node", str(args.gpus_per_node), "--phases", str(phases_file)],
                              capture_output=True, text=True, check=False)
        if not done.returncode:
            break
        print(f"  (run failed, {done.returncode}: {done.stderr.strip().splitlines()[-1][:200]}; trying again)")
        if attempt == 2:
            raise SystemExit(f"run failed ({done.returncode}):\n{done.stderr[-4000:]}")
        started = time.time()
    driver = json.loads(phases_file.read_text())
    engine_records = [json.loads(p.read_text()) for p in sorted(records.glob("*.json"))]
    result = analyse(engine_records, driver["phases"], args.nodes * args.gpus_per_node, args.time_scale)
    return {**result, **driver, "wall_s": time.time() - started}


def show(result: dict, args, units_per_shard: int) -> None:
    scale, gpus = args.time_scale, args.nodes * args.gpus_per_node
    shard_tokens = units_per_shard * K * SAMPLE_TOKENS
    print(f"\n{units_per_shard} units a shard (a commit every {shard_tokens / result['rate'] / 60:.1f} simulated "
          f"minutes per engine at a full batch): {result['delivered']:,} samples delivered, "
          f"{result['engines']} engine loads, {result['wall_s']:.0f} s real")
    print(f"  span {result['span_s'] / 60:.1f} simulated minutes; tokens made {result['made'] / 1e6:.2f}M "
          f"(engines' count {result['tokens'] / 1e6:.2f}M)")
    passes = sorted((b, f) for n, b, f in result["phases"] if n == "_engine_pass")
    read = min((f for n, _, f in result["phases"] if n == FEEDBACK_READ), default=None)
    print("  engine passes (simulated minutes): " + ", ".join(f"{(f - b) / scale / 60:.1f}" for b, f in passes)
          + (f"; feedback broadcast {(read - passes[0][0]) / scale / 60:.1f} after the first began"
             if read and passes else ""))
    efficiency = result["made"] / result["capacity"]
    print(f"  whole-run efficiency {efficiency:.3f}")
    for name, lost in result["losses"].items():
        print(f"    {name:<32} {lost / result['capacity']:.3f}")
    accounted = efficiency + sum(result["losses"].values()) / result["capacity"]
    print(f"    {'(sum, with efficiency)':<32} {accounted:.3f}")
    print(f"  the engines' last tokens {result['ends_apart_s']:.0f} simulated s apart; an engine's last full batch "
          f"{result['drain_s']:.0f} s before its last token (mean)")
    held = result.get("held")
    if held:  # records of an engine from before it noted its calls have none
        print(f"  a death at a random moment redoes {held / 1e3:.0f}K tokens on average (the calls answered for "
              f"its actor's uncommitted shards): {held / result['rate']:.0f} simulated s of a full batch, "
              f"{held / SAMPLE_TOKENS:.0f} samples' worth")
    between = result["losses"]["between passes"]
    real_between = result["between_real_s"] * gpus * result["rate"]
    print(f"  between passes: {result['between_real_s']:.1f} s real = {result['between_real_s'] / scale / 60:.1f} "
          f"simulated minutes; driver at real speed: efficiency "
          f"{result['made'] / (result['capacity'] - between + real_between):.3f}")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-samples", type=int, default=20000)
    parser.add_argument("--references", type=int, default=1000)
    parser.add_argument("--units-per-shard", default="32,64")
    parser.add_argument("--nodes", type=int, default=2)
    parser.add_argument("--gpus-per-node", type=int, default=2)
    parser.add_argument("--shards-in-flight", type=int,
                        help="workers.shards_in_flight (default: the config's: 6 at 64 or 32 units a shard)")
    parser.add_argument("--time-scale", type=float, default=0.25, help="real seconds per simulated second")
    parser.add_argument("--load-s", type=float, default=120, help="simulated seconds of one engine load")
    parser.add_argument("--reject-rate", type=float, default=0.03, help="share of refinements rejected")
    parser.add_argument("--workdir", default="/tmp/refed-gpu-sim")
    parser.add_argument("--analyse", action="store_true", help="print the figures of the runs in --workdir again")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    parser.add_argument("--phases", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        one(args.one, args.nodes, args.gpus_per_node, args.phases)
        return 0
    work = Path(args.workdir)
    seeds = work / "seeds.jsonl"
    if not args.analyse:
        subprocess.run(["rm", "-rf", str(work)], check=True)
        work.mkdir(parents=True)
        write_seeds(seeds, args.references)
    print(f"refed-ray on a simulated GPU cluster: {args.nodes} nodes x {args.gpus_per_node} GPUs, "
          f"N={args.num_samples:,}, K={K}, {args.references} references, engine load {args.load_s:g} s, "
          f"refinement reject rate {args.reject_rate:g}, time scale {args.time_scale:g}, {time.strftime('%Y-%m-%d')}")
    print(f"engine: full batch {FULL_BATCH} at {full_batch_rate():,.0f} tokens/s, one stream {1 / step_s(1):.0f}")
    for size in [int(s) for s in args.units_per_shard.split(",")]:
        show(run_one(args, work, seeds, size), args, size)
    return 0


if __name__ == "__main__":
    sys.exit(main())
