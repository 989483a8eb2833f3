"""The `shomin` command: run | validate | list | plan | schema | serve | server | runs | compare | chat | export.

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
    # Prefect's ephemeral API server gets 20 s to start by default; on a busy 2-core laptop that
    # is not always enough (seen here), and the whole run then fails before its first stage
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
    if "PREFECT_API_URL" not in os.environ and "PREFECT_HOME" not in os.environ:
        os.environ["PREFECT_HOME"] = str(Path(".prefect").resolve())


def _one_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _fail(message: str, code: int = 2) -> int:
    print(f"shomin: {message}", file=sys.stderr)
    return code


def prepare_tracking(p, workdir: str = ".") -> None:
    """Create (or migrate) a sqlite MLflow store and the pipeline's experiment under a file lock.
    Two first runs started at once would otherwise both run MLflow's schema migrations on
    the same new database, or both create the experiment, and one of them would crash."""
    from shomin.tasks.ground.tracking import Tracker, check_reachable, tracking_uri
    uri = tracking_uri(p.tracking, workdir)
    if not uri.startswith("sqlite:///"):
        check_reachable(uri)   # a server that is not there: one line now, not a traceback after the first stage
        return  # a server serialises the store's set-up itself
    db = Path(uri.removeprefix("sqlite:///"))
    db.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:
        return
    with open(db.with_name(f".{db.name}.lock"), "a+") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released on close, or when the process dies
        Tracker(p.tracking, p.tracking.experiment or p.name, workdir)


def prefect_gone() -> str | None:
    """PREFECT_API_URL when it is set and its server does not answer, else None."""
    from shomin.tasks.ground.tracking import server_gone
    api = os.environ.get("PREFECT_API_URL")
    return api if api and server_gone(api) else None


def cmd_validate(args) -> int:
    from shomin.tasks import registry
    pipelines = registry.load_config(args.file)
    for p in pipelines.values():
        if args.gpu_checks or not registry.needs_gpu(p):
            registry.check_pipeline(p, args.file)
    print(f"{args.file}: {len(pipelines)} pipelines valid ({', '.join(pipelines)})")
    return 0


def cmd_list(args) -> int:
    from shomin.tasks import registry
    for name, p in registry.load_config(args.file).items():
        sched = f"  [schedule: {p.schedule.cron} {p.schedule.timezone}]" if p.schedule else ""
        print(f"{name:18} {' -> '.join(p.stages.names())}{sched}")
        if p.description:
            print(f"{'':18} {p.description}")
    return 0


def cmd_plan(args) -> int:
    from shomin.tasks import registry
    p = registry.load_pipeline(args.file, args.pipeline, args.set)
    if args.longest_context:
        from shomin.tasks.ground.contract import GIB
        tokens, terms = registry.longest_context(p)
        sft = p.stages.sft
        where = f"{p.device_memory_gib:g} GiB (device_memory_gib)" if p.device_memory_gib else "this GPU"
        print(f"{args.pipeline}: longest stages.sft.max_seq_length that fits {where} at micro_batch_size "
              f"{sft.micro_batch_size}: {tokens} tokens" + (f" (planned SFT peak {terms['total'] / GIB:.2f} GiB)" if tokens else ""))
        return 0
    print(registry.plan_for(p)["plan"].table())
    return 0


def cmd_run(args) -> int:
    from shomin.tasks import registry
    from shomin.tasks.ground.errors import ConfigError
    if args.quiet:  # no progress bars (cron, CI logs); the stage lines and errors stay
        from shomin.flows.deploy import QUIET_ENV
        os.environ.update(QUIET_ENV)
    p = registry.load_pipeline(args.file, args.pipeline, args.set)
    registry.check_pipeline(p, args.file, before_run=True)
    if api := prefect_gone():
        raise ConfigError(f"PREFECT_API_URL: the Prefect server at {api} does not answer; start it "
                          "(`shomin server --detach`), or unset PREFECT_API_URL to run on a throwaway server")
    try:
        prepare_tracking(p)
    except ConfigError as e:
        raise ConfigError(registry.locate(str(e), args.file, p.name)) from None
    from shomin.flows.pipeline import StageFailed, run_pipeline
    from shomin.tasks.ground.rundir import settle
    started: list[str] = []

    def on_start(run_id: str) -> None:
        started.append(run_id)
        print(f"shomin: {args.pipeline} run {run_id}", file=sys.stderr)
    try:
        summary = run_pipeline(args.pipeline, args.file, args.set, refresh=args.refresh, on_start=on_start)
    except Exception as e:
        if api := prefect_gone():   # the server died under the run; summary.json says how far it got
            summary = settle(Path(p.output_dir) / p.name / started[0] / "summary.json") if started else None
            if summary and summary.get("status") == "completed":   # the stages carry on without it
                print(f"shomin: warning: the Prefect server at {api} stopped answering during the run; every stage "
                      "finished, but its UI does not show the end of this run", file=sys.stderr)
                return _report(summary, p)
            return _fail(f"the Prefect server at {api} stopped answering ({type(e).__name__}); the run stopped and "
                         "its summary.json says where; start the server again (`shomin server --detach`) and run "
                         "the same command again: finished stages come from the cache", 1)
        if not isinstance(e, StageFailed):
            raise
        if isinstance(e.error, ConfigError):  # a user mistake found only inside a stage
            return _fail(f"stage '{e.stage}': {_one_line(e.error)}", 2)
        return _fail(_one_line(e), 1)
    return _report(summary, p)


def _report(summary: dict, p) -> int:
    run_dir = Path(p.output_dir) / p.name / summary["run_id"]
    print(f"shomin: {summary['status']}: {run_dir}/summary.json")
    for stage, entry in summary["stages"].items():
        print(f"  {stage:11} {entry['status']:9} {entry.get('seconds', 0):8.1f}s")
    return 0


# ---------------------------------------------------------------- operations: schema, server, serve, runs


def cmd_schema(args) -> int:
    import json

    from shomin.tasks.registry import config_schema
    print(json.dumps(config_schema(), indent=2, ensure_ascii=False))
    return 0


def _server_api_url() -> str | None:
    """PREFECT_API_URL, else the Prefect server `shomin server --detach` left running here."""
    if os.environ.get("PREFECT_API_URL"):
        return os.environ["PREFECT_API_URL"]
    from shomin.flows import server
    running = server.load(".")
    s = running.get("prefect") if running else None
    return f"{s.url}/api" if s and server.alive(s) else None


def cmd_serve(args) -> int:
    from shomin.tasks.registry import load_config
    load_config(args.file)  # a bad file is exit 2 before anything starts
    api = args.api_url or _server_api_url()
    if not api:
        return _fail("serve needs a Prefect server: start one with `shomin server` (or `--detach`), "
                     "or set PREFECT_API_URL", 2)
    os.environ["PREFECT_API_URL"] = api
    os.environ.setdefault("PREFECT_HOME", str(Path(".prefect").resolve()))
    from shomin.flows.deploy import scheduled, serve
    names = [p.name for p in scheduled(args.file, args.pipelines or None)]
    print(f"shomin: serving {', '.join(names) or 'nothing'} against {api}"
          f"{' (quiet)' if not args.progress else ''}; Ctrl-C stops", file=sys.stderr)
    serve(args.file, args.pipelines or None, workdir=".", quiet=not args.progress, limit=args.limit)
    return 0


def cmd_server(args) -> int:
    from shomin.flows import server
    if args.stop:
        running = server.load(".")
        if not running:
            print("shomin: no detached servers recorded in .prefect/")
            return 0
        running.stop()
        print("shomin: stopped " + ", ".join(f"{s.name} ({s.url})" for s in running.servers))
        return 0
    if args.status:
        running = server.load(".")
        for s in (running.servers if running else []):
            print(f"{s.name:8} {s.url:28} {'up' if server.alive(s) else 'down'}  pid {s.pid}  log {s.log}")
        return 0
    try:
        servers = server.start(".", prefect_port=args.prefect_port, mlflow_port=args.mlflow_port,
                               prefect=not args.no_prefect, mlflow=not args.no_mlflow)
    except (RuntimeError, TimeoutError) as e:
        return _fail(str(e), 1)
    for s in servers.servers:
        print(f"shomin: {s.name} UI at {s.url}  (log {s.log})")
    if servers.get("prefect"):
        print(f"  export PREFECT_API_URL={servers.prefect_api_url}")
    if servers.get("mlflow"):
        print(f"  export MLFLOW_TRACKING_URI=sqlite:///{Path('mlflow.db').resolve()}   # or {servers.get('mlflow').url}")
        print(f"  export SHOMIN_MLFLOW_UI={servers.get('mlflow').url}")
    if args.detach:
        state = servers.save()
        print(f"shomin: running in the background ({state}); `shomin server --stop` stops them")
        return 0
    print("shomin: Ctrl-C stops them", flush=True)
    import signal
    import time
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    try:
        while all(s.proc.poll() is None for s in servers.servers):
            time.sleep(1)
        dead = [s.name for s in servers.servers if s.proc.poll() is not None]
        return _fail(f"{', '.join(dead)} server exited; see its log", 1)
    except KeyboardInterrupt:
        return 0
    finally:
        servers.stop()


def cmd_runs(args) -> int:
    from shomin.flows.runs import collect, render, watch
    if args.watch:
        return watch(args.file, args.pipeline)
    rows = collect(args.file, args.pipeline, workdir=".", mlflow=not args.no_mlflow, limit=args.limit)
    if args.json:
        import json
        print(json.dumps(rows, indent=2, default=str))
    else:
        print(render(rows))
    return 0


def cmd_compare(args) -> int:
    from shomin.flows.compare import compare, metrics_of, render
    from shomin.tasks.ground.outputs import find_run
    a, b = find_run(args.run_a), find_run(args.run_b)
    rows = compare(metrics_of(a), metrics_of(b))
    if args.json:
        import json
        print(json.dumps(rows, indent=2, default=str))
    else:
        print(render(rows, f"A: {a.parent.name}/{a.name}", f"B: {b.parent.name}/{b.name}"))
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
    r.add_argument("--quiet", action="store_true", help="no progress bars (for schedules and logs)")
    r.set_defaults(fn=cmd_run)
    v = with_file(sub.add_parser("validate", help="check a pipelines file and its local data, no model loaded"), True)
    v.add_argument("--gpu-checks", action="store_true", help="also check pipelines that need a GPU")
    v.set_defaults(fn=cmd_validate)
    with_file(sub.add_parser("list", help="list pipelines")).set_defaults(fn=cmd_list)
    pl = with_file(sub.add_parser("plan", help="print a pipeline's memory plan"))
    pl.add_argument("pipeline")
    pl.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    pl.add_argument("--longest-context", action="store_true",
                    help="the longest stages.sft.max_seq_length whose planned peak fits the card (or device_memory_gib)")
    pl.set_defaults(fn=cmd_plan)

    sub.add_parser("schema", help="print the JSON Schema of pipelines.yaml").set_defaults(fn=cmd_schema)
    sv = with_file(sub.add_parser("serve", help="register the scheduled pipelines as Prefect deployments and run them"))
    sv.add_argument("pipelines", nargs="*", metavar="PIPELINE", help="default: every pipeline with a schedule")
    sv.add_argument("--api-url", help="Prefect API (default $PREFECT_API_URL or the `shomin server` here)")
    sv.add_argument("--progress", action="store_true", help="keep progress bars (scheduled runs are quiet by default)")
    sv.add_argument("--limit", type=int, default=1, help="flow runs at once (default 1: one GPU)")
    sv.set_defaults(fn=cmd_serve)
    se = sub.add_parser("server", help="start Prefect and MLflow servers on 127.0.0.1 (state in this folder)")
    se.add_argument("--prefect-port", type=int, default=4200)
    se.add_argument("--mlflow-port", type=int, default=5000)
    se.add_argument("--no-prefect", action="store_true")
    se.add_argument("--no-mlflow", action="store_true")
    se.add_argument("--detach", action="store_true", help="leave them running in the background")
    se.add_argument("--stop", action="store_true", help="stop servers started with --detach")
    se.add_argument("--status", action="store_true", help="show servers started with --detach")
    se.set_defaults(fn=cmd_server)
    ru = with_file(sub.add_parser("runs", help="list past runs: status, stage times, key metrics"))
    ru.add_argument("pipeline", nargs="?")
    ru.add_argument("--limit", type=int, default=20, help="most recent N per pipeline")
    ru.add_argument("--no-mlflow", action="store_true", help="only summary.json files")
    ru.add_argument("--json", action="store_true")
    ru.add_argument("--watch", action="store_true", help="follow running pipelines: stage, step, metrics, time left")
    ru.set_defaults(fn=cmd_runs)
    co = sub.add_parser("compare", help="two runs' metrics side by side, with standard errors and what is within noise")
    co.add_argument("run_a", help="a run folder (runs/PIPELINE/RUN_ID) or PIPELINE/RUN_ID")
    co.add_argument("run_b")
    co.add_argument("--json", action="store_true")
    co.set_defaults(fn=cmd_compare)
    from shomin.flows import chat
    chat.add_parser(sub, with_file)
    chat.add_export_parser(sub, with_file)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    _quiet_environment()
    from shomin.tasks.ground.errors import ConfigError
    try:
        return args.fn(args)
    except ConfigError as e:
        return _fail(_one_line(e), 2)
    except KeyboardInterrupt:
        return _fail("interrupted", 130)
    except OSError as e:
        from shomin.tasks.ground.errors import is_disk_full
        if not is_disk_full(e):
            raise
        return _fail(f"no space left on the disk holding {e.filename or 'the run folder'}; free space and run the "
                     "same command again", 1)


if __name__ == "__main__":
    sys.exit(main())
