"""The ``refed-ray`` command: run, plan, doctor, status, prepare-model, export, select, compare, report."""

from __future__ import annotations

import argparse
import json
import logging
import sys

from refed_ray.errors import RunShort, RunStopped, UserError


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    try:
        return args.handler(args)
    except UserError as err:
        if args.debug:
            raise
        print(f"refed-ray: error: {err}", file=sys.stderr)
        return 2
    except RunStopped as err:
        if args.debug:
            raise
        print(f"refed-ray: stopped: {err}", file=sys.stderr)
        return 3
    except RunShort as err:
        print(f"refed-ray: short: {err}", file=sys.stderr)
        return 4
    except Exception as err:
        if args.debug or not _credentials_missing(err):
            raise
        where = ", ".join(_uris(args)) or "the output"
        print(f"refed-ray: error: no credentials to read or write {where} ({type(err).__name__}: {err}): "
              "set the store's credentials (e.g. AWS_ACCESS_KEY_ID) or storage_options in --config",
              file=sys.stderr)
        return 2


# What object stores' clients raise without credentials (botocore, google-auth), named rather
# than imported: an installation may lack either. The storage layer lets them through (fsspec
# back ends raise them from any call), so the command turns them into a user error here.
_CREDENTIAL_ERRORS = {"NoCredentialsError", "PartialCredentialsError", "DefaultCredentialsError"}


def _credentials_missing(err: BaseException | None) -> bool:
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if type(err).__name__ in _CREDENTIAL_ERRORS:
            return True
        err = err.__cause__ or err.__context__
    return False


def _uris(args: argparse.Namespace) -> list[str]:
    """The locations a command was given (its OUTPUTs), for a message about reaching them."""
    return [getattr(args, name) for name in ("output", "output_a", "output_b", "seeds")
            if isinstance(getattr(args, name, None), str)]


def _parser() -> argparse.ArgumentParser:
    from refed_ray.watch.sizing import GPUS

    parser = argparse.ArgumentParser(prog="refed-ray", description=__doc__)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show tracebacks of user errors")
    commands = parser.add_subparsers(required=True, metavar="COMMAND")

    run = commands.add_parser("run", parents=[common], help="collect feedback, plan and synthesize")
    add_run_arguments(run)
    run.set_defaults(handler=_run)

    plan = commands.add_parser("plan", parents=[common], help="check a run and estimate its work and cost; starts nothing")
    add_run_arguments(plan)
    plan.add_argument("--pilot", metavar="OUTPUT", help="a finished or running pilot run: its measured tokens per sample")
    plan.add_argument("--gpu", choices=list(GPUS),
                      help="vLLM engines: the GPU to estimate for (default: every one of these)")
    plan.add_argument("--model-params", type=float, metavar="N",
                      help="vLLM engines: the teacher's parameters, e.g. 8e9 (default: from a local model's config.json)")
    plan.add_argument("--json", action="store_true", help="print the plan as JSON")
    plan.set_defaults(handler=_plan)

    doctor = commands.add_parser("doctor", parents=[common],
                                 help="check on the cluster what would fail the run later: CUDA, GPUs, model, memory, "
                                      "disk, OUTPUT from a node, versions")
    add_run_arguments(doctor)
    doctor.add_argument("--wait", type=float, default=600, metavar="S",
                        help="when no node can take an engine yet, wait up to S seconds for the autoscaler (default 600)")
    doctor.add_argument("--json", action="store_true", help="print the checks as JSON")
    doctor.set_defaults(handler=_doctor)

    status = commands.add_parser("status", parents=[common], help="where a run in OUTPUT stands, while it runs or after")
    status.add_argument("output", help="a run's OUTPUT URI")
    status.add_argument("--watch", type=float, metavar="S", help="print again every S seconds until the run finishes")
    status.add_argument("--json", action="store_true", help="print the status as JSON (one line a read with --watch)")
    status.add_argument("--config", help="a YAML config, for its storage_options")
    status.set_defaults(handler=_status)

    prepare = commands.add_parser("prepare-model", parents=[common], help="convert the embedded default model once")
    prepare.set_defaults(handler=_prepare_model)

    export = commands.add_parser("export", parents=[common], help="write committed samples for training frameworks")
    export.add_argument("output", help="a run's OUTPUT URI")
    export.add_argument("--format", default="refed-json", choices=["refed-json", "jsonl", "sharegpt", "messages"])
    export.add_argument("--to", help="target file or URI (default: OUTPUT/export/FORMAT.json[l])")
    export.add_argument("--config", help="the run's YAML config, for its storage_options")
    export.add_argument("--selection", metavar="METHOD-N", help="export the selection OUTPUT/selected/METHOD-N "
                        "(refed-ray select) instead of the dataset")
    export.set_defaults(handler=_export)

    select = commands.add_parser("select", parents=[common],
                                 help="select N samples of a run's dataset (judge, ROUGE-L diversity, random)")
    select.add_argument("output", help="a run's OUTPUT URI")
    select.add_argument("--method", required=True, choices=["judge", "rougel", "random"],
                        help="judge: improved response beats the original in both orders; rougel: greedy, "
                             "ROUGE-L F of instructions below --threshold; random: a seeded subset")
    select.add_argument("--size", type=int, required=True, metavar="N", help="samples to select")
    select.add_argument("--threshold", type=float, metavar="T", help="rougel: ROUGE-L F threshold (default 0.7)")
    select.add_argument("--seed", type=int, metavar="S", help="random: the subset's seed; judge: the judge's sampling seed (default: the run's)")
    select.add_argument("--judge-config", metavar="FILE", help="judge: a YAML config whose engine judges "
                        "(default: the run's teacher)")
    select.add_argument("--config", help="the run's YAML config, for its storage_options")
    select.set_defaults(handler=_select)

    report = commands.add_parser("report", parents=[common], help="write report.html and the dataset card again")
    report.add_argument("output", help="a run's OUTPUT URI")
    report.add_argument("--config", help="the run's YAML config, for its storage_options")
    report.add_argument("--samples", type=int, default=3, help="samples to print (default 3)")
    report.set_defaults(handler=_report)

    compare = commands.add_parser("compare", parents=[common],
                                  help="two runs side by side, and a judge of A's final responses against B's")
    compare.add_argument("output_a", help="run A's OUTPUT URI")
    compare.add_argument("output_b", help="run B's OUTPUT URI (ideally made with --instructions-from OUTPUT_A)")
    compare.add_argument("--judge-config", help="YAML with an engine: section (and optional sampling:, workers:); "
                                                "default: A's teacher")
    compare.add_argument("--output", help="where compare.json and the judge's verdicts go "
                                          "(default: OUTPUT_A/compare/<name of B>)")
    compare.add_argument("--force-new", action="store_true", help="discard verdicts of another judging in --output")
    compare.add_argument("--json", action="store_true", help="print compare.json instead of the summary")
    compare.set_defaults(handler=_compare)
    return parser


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags of ``refed-ray run``, shared with jobs/synthesize.py."""
    from refed_ray.engines import kinds

    parser.add_argument("--config", help="YAML file of RunConfig fields; flags override it")
    parser.add_argument("--seeds", help="seed file URI (JSONL, JSON or Parquet)")
    parser.add_argument("--output", help="output URI (local path, s3://, gs://, ...)")
    parser.add_argument("--num-samples", type=int, help="samples to synthesize")
    parser.add_argument("--model", help="teacher: Hugging Face id or local folder")
    parser.add_argument("--engine", choices=kinds.names(), help="teacher engine kind")
    parser.add_argument("--api-base", help="OpenAI-compatible endpoint, e.g. http://host:8000/v1")
    parser.add_argument("--num-engines", type=int, help="engine actors (one engine each)")
    parser.add_argument("--device", choices=["auto", "cuda", "cpu"],
                        help="vLLM engines: auto = cuda when the cluster has GPUs now (pass cuda on "
                             "autoscaling clusters whose GPU workers start at zero)")
    parser.add_argument("--tensor-parallel-size", type=int, help="GPUs per engine")
    parser.add_argument("--seed", type=int, help="run seed")
    parser.add_argument("--max-bad-seeds", type=int, help="bad seed rows skipped before stopping")
    parser.add_argument("--max-extra-units", type=float,
                        help="top-up budget: units beyond ceil(N/K) to replace rejects, as a share of them")
    parser.add_argument("--feedback-mode", choices=_feedback_modes(),
                        help="reference: the method (default); sample: the paper's baseline, one feedback call per "
                             "response; none: no refinement")
    parser.add_argument("--instructions-from", metavar="OUTPUT_A",
                        help="refine again the instructions and original responses of the run in OUTPUT_A, unit by "
                             "unit (same references and plan): an A/B of refinement alone")
    parser.add_argument("--force-new", action="store_true", help="discard an incompatible earlier run in OUTPUT")


def run_from_args(args: argparse.Namespace) -> dict:
    from refed_ray.reports.report import summary
    from refed_ray.run.pipeline import run

    report = run(config_from_args(args), force_new=args.force_new)
    print(summary(report))
    return report


def config_from_args(args: argparse.Namespace):
    """The RunConfig of ``run``'s flags (``add_run_arguments``) over its ``--config`` file."""
    from refed_ray.config import load_config

    return load_config(
        args.config,
        {
            "seeds": args.seeds,
            "output": args.output,
            "num_samples": args.num_samples,
            "seed": args.seed,
            "max_bad_seeds": args.max_bad_seeds,
            "max_extra_units": args.max_extra_units,
            "engine.model": args.model,
            "engine.kind": args.engine,
            "engine.api.api_base": args.api_base,
            "engine.device": args.device,
            "engine.tensor_parallel_size": args.tensor_parallel_size,
            "workers.num_engines": args.num_engines,
            "feedback.mode": args.feedback_mode,
            "instructions_from": args.instructions_from,
        },
    )


def _run(args: argparse.Namespace) -> int:
    report = run_from_args(args)
    if report["shortfall"]:  # exit 0 means N samples delivered
        raise RunShort(report["shortfall"]["message"])
    return 0


def _plan(args: argparse.Namespace) -> int:
    from refed_ray.errors import UserError
    from refed_ray.watch.estimate import describe, plan_run

    if args.model_params is not None and not args.model_params > 0:
        raise UserError(f"--model-params must be a positive number of parameters, e.g. 8e9 (got {args.model_params:g})")
    estimate = plan_run(config_from_args(args), force_new=args.force_new, pilot=args.pilot, gpu=args.gpu,
                        model_params=args.model_params)
    print(json.dumps(estimate, indent=2) if args.json else describe(estimate))
    return 0


def _doctor(args: argparse.Namespace) -> int:
    from refed_ray.watch.doctor import as_json, describe, doctor

    checks = doctor(config_from_args(args), force_new=args.force_new, wait_s=args.wait,
                    say=lambda line: print(line, file=sys.stderr, flush=True))
    print(json.dumps(as_json(checks), indent=2) if args.json else describe(checks))
    return 0 if all(check.ok for check in checks) else 2


def _status(args: argparse.Namespace) -> int:
    import time

    from refed_ray.config import load_config
    from refed_ray.errors import UserError
    from refed_ray.storage import Storage
    from refed_ray.watch.status import describe, read_status

    if args.watch is not None and not args.watch > 0:
        raise UserError(f"--watch takes a positive number of seconds (got {args.watch:g})")
    storage_options = load_config(args.config, {}).storage_options if args.config else None
    storage = Storage(args.output, storage_options)
    try:
        while True:
            status = read_status(storage)
            print(json.dumps(status, indent=None if args.watch else 2) if args.json else describe(status), flush=True)
            if not args.watch or status["state"] == "finished":
                return 0
            time.sleep(args.watch)
    except KeyboardInterrupt:
        return 0


def _prepare_model(args: argparse.Namespace) -> int:
    from refed_ray.engines.default_model import prepare_default_model

    print(prepare_default_model())
    return 0


def _say_result(text: str) -> None:
    """Print a command's result last on stdout, where scripts read it. Ray forwards its raylet's
    and workers' lines to this process's stdout until it shuts down (a raylet warning once came
    after an export's JSON line), so Ray, if this command started it, shuts down first."""
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        ray.shutdown()
    print(text, flush=True)


def _export(args: argparse.Namespace) -> int:
    from refed_ray.config import load_config
    from refed_ray.data.export import export

    storage_options = load_config(args.config, {}).storage_options if args.config else None
    target, count = export(args.output, args.format, args.to, storage_options, selection=args.selection)
    _say_result(json.dumps({"exported": count, "to": target, "format": args.format}))
    return 0


def _select(args: argparse.Namespace) -> int:
    from refed_ray.config import load_config
    from refed_ray.experiments.select import describe, select

    storage_options = load_config(args.config, {}).storage_options if args.config else None
    summary = select(args.output, args.method, args.size, args.threshold, args.seed, args.judge_config, storage_options)
    _say_result(describe(summary) + "\n" + json.dumps(summary))
    if summary["shortfall"]:  # exit 0 means N samples selected
        raise RunShort(summary["shortfall"])
    return 0


def _report(args: argparse.Namespace) -> int:
    from refed_ray.config import load_config
    from refed_ray.reports.views import refresh

    print(refresh(args.output, load_config(args.config, {}).storage_options if args.config else None, args.samples))
    return 0


def _compare(args: argparse.Namespace) -> int:
    from refed_ray.experiments.compare import compare, summary

    result = compare(args.output_a, args.output_b, args.judge_config, args.output, args.force_new)
    _say_result(json.dumps(result, indent=2) if args.json else summary(result))
    return 0


def _feedback_modes() -> list[str]:
    """The modes config.FeedbackConfig accepts (one refiner each, refiners.py): listed once, there."""
    import typing

    from refed_ray.config import FeedbackConfig

    return list(typing.get_args(FeedbackConfig.model_fields["mode"].annotation))


if __name__ == "__main__":
    sys.exit(main())

