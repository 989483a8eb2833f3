"""The `shomin` command: run | validate | list | plan.

Exit codes: 0 success, 2 bad configuration or input (one line on stderr naming
the file, field or row; no traceback), 1 a failure while running.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path


def _quiet_environment() -> None:
    """Defaults set before prefect/mlflow import: state in the project folder, no phoning home."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("DO_NOT_TRACK", "1")
    if "PREFECT_API_URL" not in os.environ and "PREFECT_HOME" not in os.environ:
        os.environ["PREFECT_HOME"] = str(Path(".prefect").resolve())


def _fail(message: str, code: int = 2) -> int:
    print(f"shomin: {message}", file=sys.stderr)
    return code


def check_pipeline(p) -> None:
    """Every check that needs no model: model source, local dataset rows and template."""
    from tasks import data, model
    if p.stages.model_init or p.stages.sft:
        model.check_source(p.model, f"pipelines.{p.name}.model.source")
    if p.dataset is not None and not data.is_hub_source(p.dataset):
        data.prepare(p.dataset, p.seed, p.stages.dataset)
    if p.model.quantization == "8bit" or (p.stages.ppo and p.stages.ppo.quantization == "8bit"):
        import torch
        if p.device == "cpu" or not torch.cuda.is_available():
            where = "model.quantization" if p.model.quantization == "8bit" else "stages.ppo.quantization"
            raise _config_error(f"pipelines.{p.name}.{where}: 8bit needs a CUDA GPU (none here); use 4bit or none")


def _config_error(msg: str):
    from tasks.config import ConfigError
    return ConfigError(msg)


def cmd_validate(args) -> int:
    from tasks.config import load_config
    config = load_config(args.file)
    for p in config.pipelines.values():
        if args.gpu_checks or not _needs_gpu(p):
            check_pipeline(p)
    print(f"{args.file}: {len(config.pipelines)} pipelines valid ({', '.join(config.pipelines)})")
    return 0


def _needs_gpu(p) -> bool:
    return p.model.quantization == "8bit" or (p.stages.ppo is not None and p.stages.ppo.quantization == "8bit")


def cmd_list(args) -> int:
    from tasks.config import load_config
    config = load_config(args.file)
    for name, p in config.pipelines.items():
        sched = f"  [schedule: {p.schedule.cron} {p.schedule.timezone}]" if p.schedule else ""
        print(f"{name:18} {' -> '.join(p.stages.names())}{sched}")
        if p.description:
            print(f"{'':18} {p.description}")
    return 0


def cmd_plan(args) -> int:
    from tasks import env_check
    from tasks.config import load_pipeline
    p = load_pipeline(args.file, args.pipeline, args.set)
    print(env_check.plan_for(p).table())
    return 0


def cmd_run(args) -> int:
    from tasks.config import ConfigError, load_pipeline
    p = load_pipeline(args.file, args.pipeline, args.set)
    check_pipeline(p)
    from flows.pipeline import StageFailed, run_pipeline
    try:
        summary = run_pipeline(args.pipeline, args.file, args.set, refresh=args.refresh,
                               on_start=lambda rid: print(f"shomin: {args.pipeline} run {rid}", file=sys.stderr))
    except StageFailed as e:
        if isinstance(e.error, ConfigError):
            return _fail(str(e.error), 2)
        return _fail(f"{e}", 1)
    run_dir = Path(p.output_dir) / p.name / summary["run_id"]
    print(f"shomin: {summary['status']}: {run_dir}/summary.json")
    for stage, entry in summary["stages"].items():
        print(f"  {stage:11} {entry['status']:9} {entry.get('seconds', 0):8.1f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shomin", description="Declarative LLM fine-tuning pipelines.")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_file(sp, positional=False):
        if positional:
            sp.add_argument("file", nargs="?", default="pipelines.yaml")
        else:
            sp.add_argument("-f", "--file", default="pipelines.yaml", help="pipelines file")
        return sp

    r = with_file(sub.add_parser("run", help="run a pipeline as a Prefect flow"))
    r.add_argument("pipeline")
    r.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a field, e.g. stages.sft.max_steps=10")
    r.add_argument("--refresh", action="store_true", help="ignore cached stages and run everything again")
    r.set_defaults(fn=cmd_run)
    v = with_file(sub.add_parser("validate", help="check a pipelines file and its local data, no model loaded"), True)
    v.add_argument("--gpu-checks", action="store_true", help="also check pipelines that need a GPU")
    v.set_defaults(fn=cmd_validate)
    with_file(sub.add_parser("list", help="list pipelines")).set_defaults(fn=cmd_list)
    pl = with_file(sub.add_parser("plan", help="print a pipeline's memory plan"))
    pl.add_argument("pipeline")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    pl.set_defaults(fn=cmd_plan)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_environment()
    from tasks.config import ConfigError
    try:
        return args.fn(args)
    except ConfigError as e:
        return _fail(str(e), 2)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)


if __name__ == "__main__":
    sys.exit(main())
