"""How much of its engine a run delivers: a real pipeline pass against bare vLLM on the same requests.

    python benchmarks/engine_efficiency.py                       # jobs/demo.yaml, CPU, about 15 min on 2 cores
    python benchmarks/engine_efficiency.py --config jobs/demo.yaml --num-samples 4 --runs 1   # a quick look
    python benchmarks/engine_efficiency.py --num-samples 32 --max-num-seqs 8 --matched  # an engine of 8 kept full

On GPUs, from a machine that reaches the cluster (or on a GPU node itself), with the config of the
real run (model, tensor parallelism, workers) and enough samples to fill an engine for minutes:

    RAY_ADDRESS=auto python benchmarks/engine_efficiency.py --config my-gpu.yaml \\
        --output s3://bucket/efficiency --device cuda --num-samples 4000

Each run is interleaved: pipeline, bare, pipeline, bare (``--runs``, default 2), all in one Ray
cluster and process tree, and the medians are printed.

- **Pipeline**: ``refed_ray.run.pipeline.run`` into a fresh OUTPUT (``--force-new``), unchanged, with
  every ``VLLMEngine`` request recorded (messages, JSON schema, max_tokens, sampling, submit and
  finish times, tokens) by a Ray worker setup hook that wraps ``VLLMEngine.complete`` in each
  worker process. Its throughput is the synthesis requests' completion tokens per engine-second
  of synthesis: each synthesis engine's window runs from its first synthesis request submitted to
  its last one finished, summed over engines (parallel ones, and a top-up round's second pass).
  Engine loads are outside it (reported apart); everything the pipeline does between requests is
  inside it.
- **Bare**: the same synthesis requests, tokenized first with the same chat template, sent to
  ``vllm.LLM.generate`` as one batch with the same engine settings (``engine_kwargs``: dtype,
  max_num_seqs, structured-outputs backend, KV cache), the same JSON schemas and sampling, in a Ray
  task holding the resources an engine actor holds. Throughput: completion tokens over the
  ``generate`` call.

The ratio pipeline / bare is the run's engine efficiency. "Where the difference goes" reads the
records: engine idle time inside the window (no request in flight), mean requests in flight
(the pipeline's chains wait on each other: a refinement starts when its response ends; bare
submits everything at once), time from engine loaded to its first request. vLLM exposes no
per-request grammar (structured outputs) time without its profiler, so none is printed; run
``--unconstrained`` to replay the bare batch a second time without schemas and see what the
grammar costs the engine itself. ``--matched`` replays the requests a third way: bare, but keeping
only as many in flight as the pipeline averaged (a closed loop). Pipeline / matched is then the
pipeline's own overhead, matched / bare what its work's shape costs (chains wait on each other,
and a small run has few chains: the demo's 2 units x K=4 are 8 at most, where the bare batch
submits all its requests at once).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any

import ray

RECORDER = "refed-efficiency-recorder"
NAMESPACE = "refed-efficiency"
# Schema titles of the feedback pass's replies (refed_ray.records.models); every other request is synthesis.
FEEDBACK_TITLES = {"InstructionAnalysis", "ResponseAnalysis"}


@ray.remote(num_cpus=0)
class Recorder:
    """Collects the records every engine sends; the driver drains it after each pipeline run."""

    def __init__(self) -> None:
        self.records: list[dict[str, Any]] = []

    def add(self, record: dict[str, Any]) -> None:
        self.records.append(record)

    def drain(self) -> list[dict[str, Any]]:
        records, self.records = self.records, []
        return records


def install_recorder() -> None:
    """Ray worker setup hook: wrap ``VLLMEngine`` in this worker process so it reports each load
    and each request to the Recorder actor. The engine itself is unchanged."""
    import os
    import socket

    from refed_ray.engines import vllm_engine

    cls = vllm_engine.VLLMEngine
    if getattr(cls, "_efficiency_recorded", False):
        return
    original_init, original_complete = cls.__init__, cls.complete
    handle: list = []

    def send(record: dict[str, Any]) -> None:
        if not handle:
            handle.append(ray.get_actor(RECORDER, namespace=NAMESPACE))
        handle[0].add.remote(record)  # fire and forget: never on the request's path

    def __init__(self, config):
        started = time.time()
        original_init(self, config)
        self._efficiency_id = f"{socket.gethostname()}:{os.getpid()}:{id(self):x}"
        send({"kind": "load", "engine": self._efficiency_id, "start": started, "end": time.time(),
              "max_num_seqs": getattr(self, "max_num_seqs", None), "dtype": getattr(self, "dtype", None)})

    async def complete(self, request):
        submitted = time.time()
        record = {
            "kind": "request", "engine": getattr(self, "_efficiency_id", "?"),
            "title": request.json_schema.get("title", ""), "messages": request.messages,
            "json_schema": request.json_schema, "max_tokens": request.max_tokens,
            "temperature": request.temperature, "top_p": request.top_p, "submit": submitted,
        }
        try:
            completion = await original_complete(self, request)
        except Exception as err:
            send(record | {"done": time.time(), "error": f"{type(err).__name__}: {err}",
                           "prompt_tokens": 0, "completion_tokens": 0})
            raise
        send(record | {"done": time.time(), "prompt_tokens": completion.prompt_tokens,
                       "completion_tokens": completion.completion_tokens,
                       "finish_reason": completion.finish_reason})
        return completion

    cls.__init__, cls.complete = __init__, complete
    cls._efficiency_recorded = True


def bare_replay(config_json: str, requests: list[dict[str, Any]], unconstrained: bool,
                matched: int | None) -> dict[str, Any]:
    """The recorded requests through ``vllm.LLM.generate``, one batch, the engine's own settings;
    optionally again with at most ``matched`` requests in flight (a closed loop, no dependencies)."""
    from vllm import LLM, SamplingParams
    from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams

    from refed_ray.engines.config import EngineConfig
    from refed_ray.engines.vllm_engine import (
        encode_chat,
        engine_kwargs,
        resolve_model_path,
        with_vllm_objects,
    )

    config = EngineConfig.model_validate_json(config_json)
    started = time.time()
    llm = LLM(**with_vllm_objects(engine_kwargs(config, resolve_model_path(config))))
    loaded = time.time()
    tokenizer = llm.get_tokenizer()
    max_len = llm.llm_engine.model_config.max_model_len
    prompts, params = [], []
    for request in requests:
        ids = encode_chat(tokenizer, request["messages"])
        prompts.append({"prompt_token_ids": ids})
        params.append(SamplingParams(
            max_tokens=min(request["max_tokens"], max_len - len(ids)),
            temperature=request["temperature"],
            top_p=request["top_p"],
            structured_outputs=StructuredOutputsParams(json=request["json_schema"]),
            output_kind=RequestOutputKind.FINAL_ONLY,
        ))
    result: dict[str, Any] = {"load_seconds": loaded - started}
    runs = [("bare", params)]
    if unconstrained:
        runs.append(("unconstrained", [_without_schema(p) for p in params]))
    for name, run_params in runs:
        begin = time.time()
        outputs = llm.generate(prompts, run_params, use_tqdm=False)
        result[name] = _figures(outputs, requests, time.time() - begin)
    if matched:
        begin = time.time()
        outputs = _closed_loop(llm, prompts, params, matched)
        result["matched"] = _figures(outputs, requests, time.time() - begin) | {"in_flight": matched}
    result["max_num_seqs"] = llm.llm_engine.vllm_config.scheduler_config.max_num_seqs
    return result


def _figures(outputs, requests: list[dict[str, Any]], seconds: float) -> dict[str, Any]:
    tokens = [len(o.outputs[0].token_ids) for o in outputs]
    by_title: dict[str, int] = {}
    for request, count in zip(requests, tokens):
        by_title[request["title"]] = by_title.get(request["title"], 0) + count
    return {"seconds": seconds, "completion_tokens": sum(tokens), "requests": len(outputs),
            "tokens_per_second": sum(tokens) / max(seconds, 1e-9), "tokens_by_step": by_title}


def _closed_loop(llm, prompts: list, params: list, in_flight: int) -> list:
    """Keep ``in_flight`` requests in the engine, adding the next as one finishes: the pipeline's
    concurrency without its dependencies (a refinement waits for its response) or its overhead."""
    engine = llm.llm_engine
    outputs: dict[int, Any] = {}
    submitted = running = 0
    while submitted < len(prompts) or engine.has_unfinished_requests():
        while submitted < len(prompts) and running < in_flight:
            engine.add_request(str(submitted), prompts[submitted], params[submitted])
            submitted += 1
            running += 1
        for output in engine.step():
            if output.finished:
                outputs[int(output.request_id)] = output
                running -= 1
    return [outputs[i] for i in sorted(outputs)]


def _without_schema(params):
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(max_tokens=params.max_tokens, temperature=params.temperature, top_p=params.top_p,
                          output_kind=RequestOutputKind.FINAL_ONLY)


def pipeline_figures(records: list[dict[str, Any]]) -> dict[str, Any]:
    """Synthesis throughput per engine-second of synthesis, and where that time went.

    Each engine's synthesis window runs from its first synthesis request submitted to its last one
    finished; a run can hold several (``num_engines`` in parallel, and a top-up round's pass after
    the first), so the windows are summed: tokens per engine-second, comparable to one bare engine.
    """
    requests = [r for r in records if r["kind"] == "request"]
    synthesis = [r for r in requests if r["title"] not in FEEDBACK_TITLES]
    loads = {r["engine"]: r for r in records if r["kind"] == "load"}
    if not synthesis:
        raise SystemExit("no synthesis request was recorded: was the engine vllm?")
    per_engine: dict[str, list[dict[str, Any]]] = {}
    for r in synthesis:
        per_engine.setdefault(r["engine"], []).append(r)
    window = idle = area = under = slots = 0.0
    first_after_load = []
    for engine, mine in per_engine.items():
        start = min(r["submit"] for r in mine)
        window += max(r["done"] for r in mine) - start
        batch = (loads.get(engine) or {}).get("max_num_seqs") or 0
        # Time with no synthesis request in flight on this engine, the mean number in flight, and
        # time with fewer in flight than the engine batches (its batch under-filled).
        events = sorted([(r["submit"], 1) for r in mine] + [(r["done"], -1) for r in mine])
        in_flight, last = 0, start
        for moment, step in events:
            if in_flight == 0:
                idle += moment - last
            if in_flight < batch:
                under += moment - last
            area += in_flight * (moment - last)
            slots += min(in_flight, batch) * (moment - last) / max(batch, 1)
            in_flight += step
            last = moment
        if engine in loads:
            first_after_load.append(round(start - loads[engine]["end"], 1))
    window = max(window, 1e-9)
    tokens = sum(r["completion_tokens"] for r in synthesis)
    return {
        "requests": synthesis,
        "all_requests": len(requests),
        "completion_tokens": tokens,
        "seconds": window,
        "tokens_per_second": tokens / window,
        "idle_seconds": idle,
        "mean_in_flight": area / window,
        "underfilled_seconds": under,
        "batch_occupancy": slots / window,
        "engines": len(per_engine),
        "engine_loads": len(loads),
        "load_seconds": [round(r["end"] - r["start"], 1) for r in loads.values()],
        "first_request_after_load": first_after_load,
        "errors": sum(1 for r in synthesis if r.get("error")),
        "max_num_seqs": sorted({r.get("max_num_seqs") for r in loads.values()} - {None}),
        "dtype": sorted({r.get("dtype") for r in loads.values()} - {None}),
    }


def _by_step(requests: list[dict[str, Any]]) -> dict[str, int]:
    totals: dict[str, int] = {}
    for r in requests:
        totals[r["title"]] = totals.get(r["title"], 0) + r["completion_tokens"]
    return totals


def wait_for_idle_cluster(timeout: float = 120) -> None:
    """The pass's engine actors hold memory (and on GPUs, the GPUs) until Ray reaps them."""
    deadline = time.time() + timeout
    total = ray.cluster_resources()
    while time.time() < deadline:
        free = ray.available_resources()
        if all(free.get(k, 0) >= v - 1e-6 for k, v in total.items() if k in ("CPU", "GPU")):
            return
        time.sleep(1)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="jobs/demo.yaml")
    parser.add_argument("--output", default="/tmp/refed-efficiency")
    parser.add_argument("--num-samples", type=int)
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"])
    parser.add_argument("--max-num-seqs", type=int, help="engine.max_num_seqs (vLLM's batch), for both sides")
    parser.add_argument("--num-cpus", type=int,
                        help="CPUs of the local Ray instance this starts (default: Ray's, all cores)")
    parser.add_argument("--runs", type=int, default=2, help="pipeline/bare pairs, interleaved")
    parser.add_argument("--unconstrained", action="store_true",
                        help="also replay the bare batch without JSON schemas")
    parser.add_argument("--matched", action="store_true",
                        help="also replay the requests keeping as many in flight as the pipeline did on average")
    parser.add_argument("--records", help="write each run's request timings here (JSON lines, no messages)")
    args = parser.parse_args()

    from refed_ray.config import load_config
    from refed_ray.engines.vllm_engine import actor_resources
    from refed_ray.run.pipeline import run

    config = load_config(args.config, {
        "output": args.output, "num_samples": args.num_samples, "engine.device": args.device,
        "engine.max_num_seqs": args.max_num_seqs,
    })
    if config.engine.kind != "vllm":
        raise SystemExit("engine_efficiency measures the vLLM engine: engine.kind must be vllm")
    ray.init(namespace=NAMESPACE, num_cpus=args.num_cpus,
             runtime_env={"worker_process_setup_hook": install_recorder})
    recorder = Recorder.options(name=RECORDER, namespace=NAMESPACE).remote()

    pipeline_rates, bare_rates = [], []
    for index in range(1, args.runs + 1):
        began = time.time()
        report = run(config, force_new=True)
        wait_for_idle_cluster()
        figures = pipeline_figures(ray.get(recorder.drain.remote()))
        engine = config.engine.model_copy(update={"device": report["device"]})
        replay = [{k: r[k] for k in ("title", "messages", "json_schema", "max_tokens", "temperature", "top_p")}
                  for r in figures["requests"]]
        matched = max(1, round(figures["mean_in_flight"])) if args.matched else None
        task = ray.remote(max_calls=1, **actor_resources(engine))(bare_replay)
        bare = ray.get(task.remote(engine.model_dump_json(), replay, args.unconstrained, matched))
        wait_for_idle_cluster()
        pipeline_rates.append(figures["tokens_per_second"])
        bare_rates.append(bare["bare"]["tokens_per_second"])
        print_run(index, report, figures, bare, time.time() - began)
        if args.records:
            write_records(args.records, index, figures["requests"])

    pipeline_median, bare_median = statistics.median(pipeline_rates), statistics.median(bare_rates)
    print(f"\nmedians over {args.runs} interleaved runs: pipeline {pipeline_median:.2f} tokens/s, "
          f"bare vLLM {bare_median:.2f} tokens/s, ratio {pipeline_median / max(bare_median, 1e-9):.2f}")
    return 0


def write_records(path: str, index: int, requests: list[dict[str, Any]]) -> None:
    """The synthesis requests' timings, for a closer look at where the window went."""
    import json

    keep = ("engine", "title", "submit", "done", "prompt_tokens", "completion_tokens", "finish_reason", "error")
    with open(path, "a", encoding="utf-8") as out:
        for r in requests:
            out.write(json.dumps({"run": index} | {k: r.get(k) for k in keep}) + "\n")


def print_run(index: int, report: dict, f: dict, bare: dict, seconds: float) -> None:
    this_run = report.get("this_run", {})
    b = bare["bare"]
    print(f"\nrun {index} ({seconds:.0f} s): {report.get('model')} on {report.get('device')}, "
          f"dtype {','.join(map(str, f['dtype'])) or '?'}, max_num_seqs {f['max_num_seqs']}, "
          f"{f['engines']} synthesis engine(s) (passes x engines), {f['engine_loads']} engine load(s) in the run "
          f"({', '.join(f'{s} s' for s in f['load_seconds'])})")
    print(f"  pipeline: {f['completion_tokens']} completion tokens in {f['seconds']:.1f} engine-s of synthesis "
          f"= {f['tokens_per_second']:.2f} tokens/s per engine ({len(f['requests'])} synthesis requests, "
          f"{f['all_requests']} in all, {f['errors']} failed)")
    print(f"    report.json: {this_run.get('completion_tokens_per_second')} tokens/s over "
          f"{this_run.get('synthesis_seconds')} s (its synthesis pass, engine start included), "
          f"wall {this_run.get('wall_seconds')} s")
    print(f"    where the window went: engine idle {f['idle_seconds']:.1f} s, mean {f['mean_in_flight']:.1f} "
          f"requests in flight, first request {', '.join(f'{s} s' for s in f['first_request_after_load'])} "
          f"after its engine loaded")
    print(f"    fewer requests in flight than max_num_seqs for {f['underfilled_seconds']:.1f} s; batch slots "
          f"held {f['batch_occupancy']:.2f} of the window")
    print(f"  bare vLLM: {b['completion_tokens']} completion tokens in {b['seconds']:.1f} s "
          f"= {b['tokens_per_second']:.2f} tokens/s ({b['requests']} requests in one batch, "
          f"max_num_seqs {bare['max_num_seqs']}, load {bare['load_seconds']:.0f} s)")
    print(f"  completion tokens by step, pipeline: {_by_step(f['requests'])}; bare: {b['tokens_by_step']}")
    if "unconstrained" in bare:
        u = bare["unconstrained"]
        print(f"  bare vLLM without schemas: {u['completion_tokens']} tokens in {u['seconds']:.1f} s "
              f"= {u['tokens_per_second']:.2f} tokens/s")
    if "matched" in bare:
        m = bare["matched"]
        print(f"  bare vLLM at the pipeline's concurrency ({m['in_flight']} in flight, no dependencies): "
              f"{m['completion_tokens']} tokens in {m['seconds']:.1f} s = {m['tokens_per_second']:.2f} tokens/s; "
              f"pipeline / this: {f['tokens_per_second'] / max(m['tokens_per_second'], 1e-9):.2f}")
    print(f"  ratio pipeline / bare: {f['tokens_per_second'] / max(b['tokens_per_second'], 1e-9):.2f}")
    sys.stdout.flush()


if __name__ == "__main__":
    sys.exit(main())
