"""The `pipeline` command: parse arguments, call the package, turn its two kinds of error into exit codes.

    pipeline train conf/fashion_mnist_cnn.yaml train.epochs=3 scaling.num_workers=2
    pipeline predict fashion_mnist_cnn@champion shoe.png --out predictions.csv
    pipeline predict circles_classifier@champion 'points/*.parquet' --out scored/   # a data set: Ray Data if large
    pipeline tune conf/fashion_mnist_cnn.yaml tune.num_samples=8
    pipeline run conf/fashion_mnist_cnn.yaml            # search, then register (or retrain) the best
    pipeline ui
    pipeline runs fashion_mnist_cnn                     # the tracked runs; `pipeline models` the registered versions
    pipeline submit jobs/linear_regression_smoke.yaml --address http://127.0.0.1:8265 --follow
    pipeline jobs status ID --address http://127.0.0.1:8265
    python -m pipeline train conf/linear_regression.yaml --output json

Options and key.path=value overrides may come in any order. Exit codes: 0 done (also: already trained),
1 training failed, 2 bad input (config, data, arguments, model reference, resources this machine lacks),
130 interrupted by Ctrl-C, 143 stopped by SIGTERM.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import math
import os
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING

from pipeline.config import ConfigError, load_config
from pipeline.errors import BadInput, RunFailed
from pipeline.runtime import Terminated, exit_now, install_signal_handlers, ray_call_left_running

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

EXIT_FAILED, EXIT_BAD_INPUT = 1, 2
EXIT_INTERRUPTED, EXIT_TERMINATED = 128 + signal.SIGINT, 128 + signal.SIGTERM  # 130, 143: the shells' convention
RESUME_HINT = {
    "train": "run the same command again to resume from the latest checkpoint",
    "tune": "run the same command again to continue the search; finished trials are kept",
    "submit": "stopped following; the job goes on: `pipeline jobs stop ID` stops it",
}


def _experiment_command(commands: argparse._SubParsersAction, name: str, text: str) -> argparse.ArgumentParser:
    """The arguments train, tune and run share: a conf, its overrides, and what to record and show."""
    command = commands.add_parser(name, help=text)
    command.add_argument("conf", help="experiment YAML, e.g. conf/fashion_mnist_cnn.yaml")
    command.add_argument("overrides", nargs="*", metavar="key.path=value", help="e.g. optim.lr=0.01 train.epochs=3")
    command.add_argument("--fresh", action="store_true", help="delete what an earlier run of this name left and start over")
    command.add_argument("--no-register", action="store_true", help="track in MLflow but register no model version")
    command.add_argument("--output", choices=("text", "json"), default="text", help="json: one JSON object, last line of stdout")
    command.add_argument("--verbose", action="store_true", help="show Ray's, Ray Tune's and MLflow's own output")
    return command


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="pipeline", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    train = _experiment_command(commands, "train", "train one experiment (resumes from its latest checkpoint)")
    train.add_argument("--dry-run", action="store_true", help="1 epoch over 4 batches, as run NAME-dry-run, not registered")
    for name, text in (("tune", "search the conf's tune.space with Ray Tune; register the best trial"),
                       ("run", "the whole job: search, then (tune.retrain_best) retrain the best on train+val and test it")):  # fmt: skip
        search = _experiment_command(commands, name, text)
        search.add_argument("--resume", action="store_true", help="accepted for older scripts: the same command resumes anyway")
    _predict_command(commands)
    _serve_command(commands)
    ui = commands.add_parser("ui", help="serve the MLflow UI for the tracking store (the embedded default here)")
    ui.add_argument("--host", default="127.0.0.1", help="address to bind; anything else than 127.0.0.1 exposes the UI")
    ui.add_argument("--port", type=int, default=5000)
    ui.add_argument("--verbose", action="store_true", help="show the server's own logs")
    runs = commands.add_parser("runs", help="the tracked runs, newest first: status, epochs, metric, what differs (reads only)")
    runs.add_argument("experiment", nargs="?", help="one experiment (default: every experiment)")
    runs.add_argument("--limit", type=int, default=50, help="at most this many runs (default 50)")
    models = commands.add_parser("models", help="registered models: versions, aliases, metric values, decisions (reads only)")
    models.add_argument("name", nargs="?", help="one registered model (default: every one)")
    for listing in (runs, models):
        listing.add_argument("--output", choices=("text", "json"), default="text", help="json: one JSON list on stdout")
        listing.add_argument("--verbose", action="store_true", help="show MLflow's own logs")
    submit = _cluster_command(commands, "submit", "submit a job spec (jobs/*.yaml) to a Ray cluster; prints the job id")
    submit.add_argument("job", help="job spec, e.g. jobs/fashion_mnist_cnn.yaml")
    submit.add_argument("overrides", nargs="*", metavar="key.path=value", help="appended to the spec's entrypoint overrides")
    submit.add_argument("--follow", action="store_true", help="stream the job's logs; exit 0 only if it SUCCEEDED")
    jobs = _cluster_command(commands, "jobs", "a submitted job: its status, its logs, or stop it")
    jobs.add_argument("action", choices=("status", "logs", "stop"))
    jobs.add_argument("job_id", metavar="ID", help="what `pipeline submit` printed")
    jobs.add_argument("--follow", action="store_true", help="logs: stream until the job ends; exit 0 only if it SUCCEEDED")
    return parser


def _serve_command(commands: argparse._SubParsersAction) -> None:
    serve = commands.add_parser("serve", help="serve a registered model over HTTP (Ray Serve), following its alias")
    serve.add_argument("model", metavar="NAME@ALIAS", help="e.g. mnist_mlp@champion (followed as it moves), or NAME/VERSION (pinned)")
    serve.add_argument("--host", help="address to bind (default 127.0.0.1; on a cluster, RAY_ADDRESS set: 0.0.0.0)")
    serve.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    serve.add_argument("--replicas", type=int, help="a fixed number of replicas (default 1)")
    serve.add_argument("--min-replicas", type=int, help="autoscaling: at least this many replicas (with --max-replicas)")
    serve.add_argument("--max-replicas", type=int, help="autoscaling: at most this many replicas")
    serve.add_argument("--poll-s", type=float, default=10.0, help="how often each replica looks where the alias points (default 10)")
    serve.add_argument("--max-batch-size", type=int, default=32, help="requests run through the model at once, at most (default 32)")
    serve.add_argument("--batch-wait-ms", type=float, default=5.0, help="how long a batch waits to fill (default 5)")
    serve.add_argument("--verbose", action="store_true", help="show Ray Serve's and MLflow's own logs, access logs included")


def _cluster_command(commands: argparse._SubParsersAction, name: str, text: str) -> argparse.ArgumentParser:
    command = commands.add_parser(name, help=text)
    command.add_argument("--address", help="the Ray dashboard, http://HOST:8265 (default: $RAY_API_SERVER_ADDRESS)")
    command.add_argument("--verbose", action="store_true", help="show Ray's own logs")
    return command


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    """Options and overrides in any order: `train CONF --fresh a=1 b=2` as well as `train CONF a=1 b=2 --fresh`."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    overrides = [arg for arg in extra if "=" in arg and not arg.startswith("-")]
    if overrides and hasattr(args, "overrides"):
        args.overrides = [*args.overrides, *overrides]
        extra = [arg for arg in extra if arg not in overrides]
    if extra:
        parser.error(f"unrecognized arguments: {' '.join(extra)}")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_arguments(argv)
    install_signal_handlers()  # SIGTERM ends a run as Ctrl-C does: runs marked KILLED, Ray stopped, exit 143
    # Your own model (model.name=my_nets:Net) imports from where you run `pipeline`, as `python -m
    # pipeline` has it: the console script's sys.path starts at its own folder instead.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    # MLflow prints each run's URL with the tracking URI as given, credentials included: never.
    os.environ.setdefault("MLFLOW_SUPPRESS_PRINTING_URL_TO_STDOUT", "true")
    if not args.verbose:
        _quiet_libraries()
    commands = {"train": _train, "tune": _search, "run": _search, "predict": _predict, "ui": _ui, "serve": _serve, "runs": _records, "models": _records,
                "submit": _submit, "jobs": _jobs}  # fmt: skip
    with _imports_out_of_the_collectors_way():
        code = _run_command(args, commands[args.command])
    if ray_call_left_running():  # Train's or Tune's fit, left on an error: Ray cannot shut down under it
        exit_now(code)
    return code


def _run_command(args: argparse.Namespace, command: Callable[[argparse.Namespace], int]) -> int:
    """The command's exit code; an error it raises is said on one line, and becomes the exit code for its kind."""
    try:
        return command(args)
    except BadInput as err:  # the message names the key path, file or value, and the fix
        print(f"error: {err}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except RunFailed as err:  # the cause on one line (a worker's own error), without Ray's stack
        what = {"predict": "batch inference", "serve": "serving"}.get(args.command, "training")
        print(f"error: {what} failed: {err}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt as interrupt:  # Ctrl-C, or SIGTERM (Terminated): what ran is marked KILLED already
        how = "stopped by SIGTERM" if isinstance(interrupt, Terminated) else "interrupted"
        hint = RESUME_HINT.get({"run": "tune", "jobs": "submit"}.get(args.command, args.command))
        print(f"{how}{'; ' + hint if hint else ''}", file=sys.stderr, flush=True)
        # Ray's processes are going down already (they had the signal too), Tune's threads may still call them:
        # no ray.shutdown (see exit_now), and no Ray process of ours outlives this one.
        exit_now(EXIT_TERMINATED if isinstance(interrupt, Terminated) else EXIT_INTERRUPTED)


@contextmanager
def _imports_out_of_the_collectors_way() -> Iterator[None]:
    """A command imports torch, MLflow, SQLAlchemy, pandas, matplotlib and torch's compiler stack as it goes: some
    700,000 objects that live as long as the process, which CPython's full collections walk again each time the
    heap has grown by a quarter, and once more at exit, to free nothing. After a full collection that follows new
    imports, what survived it is frozen (gc.freeze: left out of later collections, still freed by reference
    counting); with imports over, as while training, collections go on as before. A 1-epoch linear regression,
    tracked and registered: 12.0 s before, 9.3 s after (medians of 7, interleaved, 2 cores; bench/fixed_costs.py)."""
    modules = len(sys.modules)

    def freeze_after_imports(phase: str, info: dict[str, int]) -> None:
        nonlocal modules
        if phase == "stop" and info["generation"] == 2 and len(sys.modules) > modules:
            modules = len(sys.modules)
            gc.freeze()

    gc.callbacks.append(freeze_after_imports)
    try:
        yield
    finally:
        gc.callbacks.remove(freeze_after_imports)
        gc.freeze()  # the process ends next: its last collection would walk every object to free nothing the OS keeps


def _quiet_libraries() -> None:
    """MLflow's INFO lines are noise in a terminal; --verbose shows them."""
    os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")  # read when mlflow is imported, here and in workers
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    # Every local Ray announces that it turned token authentication on, with how to turn it off: it
    # stays on, and this process's Ray is its own, so there is nothing for the user to do.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)


def _train(args: argparse.Namespace) -> int:
    cfg = load_config(args.conf, args.overrides)  # before importing torch or Ray: bad input fails fast
    if args.dry_run:
        cfg = cfg.dry_run()
    from pipeline.console import TrainingDisplay, print_summary
    from pipeline.redaction import redact_tree
    from pipeline.train import run_training

    with TrainingDisplay(cfg.train.epochs) as display:
        result = run_training(
            cfg,
            fresh=args.fresh or args.dry_run,
            on_event=display,
            verbose=args.verbose,
            register=not (args.no_register or args.dry_run),
        )
    summary = redact_tree(result.summary())  # credentials in an object-store storage_path stay off the console
    if args.output == "json":
        print(json_line(summary))
    else:
        print_summary(summary)
    return 0


def json_line(result: object) -> str:
    """Strict JSON (RFC 8259): a NaN or infinite value is null, never the bare NaN that parsers refuse."""

    def finite(value: object) -> object:
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: finite(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [finite(v) for v in value]
        return value

    return json.dumps(finite(result), default=str, allow_nan=False)


def _search(args: argparse.Namespace) -> int:
    cfg = load_config(args.conf, args.overrides)
    from pipeline.checks import search_metric
    from pipeline.console import TrialTable, print_search, print_summary
    from pipeline.redaction import redact_tree
    from pipeline.tune import run_pipeline, run_search

    with TrialTable(*search_metric(cfg)) as table:
        if args.command == "tune":
            search = run_search(cfg, fresh=args.fresh, register=not args.no_register, on_event=table, verbose=args.verbose)
            result = {"search": search.summary()}
        else:
            result = run_pipeline(cfg, fresh=args.fresh, register=not args.no_register, on_event=table, verbose=args.verbose)
    result = redact_tree(result)
    if args.output == "json":
        print(json_line(result))
        return 0
    print_search(result["search"])
    if "retrained" in result:
        print_summary(result["retrained"])
    return 0


def _predict_command(commands: argparse._SubParsersAction) -> None:
    predict = commands.add_parser("predict", help="run a registered model on files, or on a data set of any size (batch inference)")
    predict.add_argument("model", metavar="NAME@ALIAS", help="e.g. mnist_mlp@champion, or NAME/VERSION")
    predict.add_argument("inputs", nargs="+", metavar="INPUT", help=".png/.jpg images, .npy arrays, .csv/.parquet tables; or one data set: "
                         "a folder, a quoted glob ('data/*.parquet') or a URI (s3://...) of Parquet files or images")  # fmt: skip
    predict.add_argument("--out", help="files: a .csv or .parquet file (default: the table on stdout); a data set: a new folder")
    data_set = predict.add_argument_group("data sets (batch inference)")
    data_set.add_argument("--engine", choices=("auto", "local", "ray"), default="auto",
                          help="local: in this process; ray: Ray Data actors (RAY_ADDRESS: on that cluster); auto: ray from 256 MiB of input")  # fmt: skip
    data_set.add_argument("--actors", type=_positive, help="ray: model copies (default: one per GPU, else one per 2 CPUs)")
    data_set.add_argument("--batch-size", type=_positive, help="rows per model call (default 4096 table rows, 256 images)")
    predict.add_argument("--verbose", action="store_true", help="show MLflow's and Ray Data's own logs")


def _positive(text: str) -> int:
    if not text.isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a whole number, 1 or more")
    return int(text)


def _predict(args: argparse.Namespace) -> int:
    from pipeline.predict import check_out, predict_files, write_table
    from pipeline.registry import load_model
    from pipeline.scoring_inputs import find_data_set
    from pipeline.serving import InputError
    from pipeline.tracking import check_store, resolve_store

    data = find_data_set(args.inputs)  # a folder, a glob or a URI: a data set, scored into a folder of Parquet files
    if data is None:
        check_out(args.out)
        if args.engine == "ray":
            raise InputError("--engine ray: for a data set (a folder, a glob or a URI); files are scored in this process")
    elif args.out is None:
        raise InputError(f"{data.source}: a data set is written as a folder of Parquet files: give --out FOLDER")
    check_store(resolve_store(None))  # a server that does not answer: said in 5 s, not after MLflow's minutes of retries
    if data is None:
        write_table(predict_files(load_model(args.model), args.inputs), args.out)
        return 0
    from pipeline.console import ScoringDisplay
    from pipeline.scoring import ScoringOptions, score_data_set

    options = ScoringOptions(args.engine, args.actors, args.batch_size, args.verbose)
    with ScoringDisplay() as display:
        scored = score_data_set(args.model, data, args.out, options, display)
    print(scored.line())
    return 0


def _records(args: argparse.Namespace) -> int:
    """`pipeline runs` and `pipeline models`: what the tracking store holds, as a table or JSON."""
    from pipeline.console import print_models, print_runs
    from pipeline.records import model_rows, run_rows
    from pipeline.tracking import resolve_store

    store = resolve_store(None)
    if args.command == "runs":
        rows, show = run_rows(store, args.experiment, args.limit), print_runs
    else:
        rows, show = model_rows(store, args.name), print_models
    if args.output == "json":
        print(json_line(rows))
    else:
        show(rows)
    return 0


def _ui(args: argparse.Namespace) -> int:
    from pipeline.redaction import redact
    from pipeline.tracking import resolve_store, training_runs_link, ui_command

    store = resolve_store(None)
    if store.is_server:
        print(f"the tracking store is already a server: open {training_runs_link(redact(store.uri))}")
        return 0
    command = ui_command(store, args.host, args.port)
    _check_port_free(args.host, args.port)
    url = f"http://{args.host}:{args.port}"
    print(f"MLflow UI for {redact(store.uri)} at {url}  (Ctrl-C stops it)", flush=True)
    print(f"the training runs: {training_runs_link(url)}", flush=True)
    # Its own process group: `mlflow server` runs uvicorn as a child, and stopping the group stops both
    # (SIGTERM, raised as Terminated, leaves through `finally` as Ctrl-C does).
    server = subprocess.Popen(command, stdout=None if args.verbose else subprocess.DEVNULL,
                              stderr=None if args.verbose else subprocess.PIPE, start_new_session=True)  # fmt: skip
    try:
        _, stderr = server.communicate()
    finally:
        if server.poll() is None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait()
    if server.returncode != 0:
        print(f"error: the MLflow server stopped (exit {server.returncode}):\n{(stderr or b'').decode()[-2000:]}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def _serve(args: argparse.Namespace) -> int:
    """`pipeline serve`: deploy, then (on this machine) serve until Ctrl-C; on a cluster the application stays there."""
    from pipeline.runtime import on_cluster
    from pipeline.service import deploy, parse_args, shutdown, watch_versions

    names = ("model", "replicas", "min_replicas", "max_replicas", "poll_s", "max_batch_size", "batch_wait_ms")
    serve_args = parse_args({name: getattr(args, name) for name in names if getattr(args, name) is not None})
    if not on_cluster():
        _check_port_free(args.host or "127.0.0.1", args.port)
    deployed = deploy(serve_args, host=args.host, port=args.port, verbose=args.verbose)
    where = f"port {args.port} of the cluster's nodes, e.g. {deployed.url}" if deployed.on_cluster else deployed.url
    print(f"serving {args.model} (version {deployed.version}) at {where}", flush=True)
    print(f"  curl {deployed.url}/healthz\n  curl {deployed.url}/predict -H 'Content-Type: application/json' "
          f"-d '{{\"images\": [\"'$(base64 -w0 digit.png)'\"]}}'", flush=True)  # fmt: skip
    if deployed.on_cluster:  # the application lives on the cluster, without this process
        print("it runs on the cluster until stopped: `serve status -a http://HEAD:8265` shows it, "
              "`serve shutdown -a http://HEAD:8265` stops it (HEAD: the Ray head, its dashboard port)", flush=True)  # fmt: skip
        return 0
    print("Ctrl-C stops it", flush=True)
    try:
        watch_versions(deployed, lambda line: print(line, flush=True), every_s=min(serve_args.poll_s, 5.0))
    except KeyboardInterrupt as stop:
        if not isinstance(stop, Terminated):  # SIGTERM: exit_now ends Ray's processes at once
            shutdown()
        raise
    return 0


def _check_port_free(host: str, port: int) -> None:
    """A taken port is said before the server starts: it would fail quietly, and the browser would show
    whatever else answers there."""
    import socket

    with socket.socket() as probe:
        # As servers bind (uvicorn, Ray Serve's proxy): a port that a server just left, its connections in
        # TIME_WAIT for a minute, is free; only a program that listens there makes the bind fail (Linux).
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind((host, port))
        except OSError as err:
            raise ConfigError(
                f"--port {port}: {host}:{port} is in use by another program ({err.strerror}); choose another, e.g. --port {port + 1}"
            ) from None


def _submit(args: argparse.Namespace) -> int:
    from pipeline.cluster import connect, load_job, submit
    from pipeline.redaction import printable

    job = load_job(args.job, args.overrides)  # every check before the cluster is contacted
    client = connect(args.address, quiet=not args.verbose)
    job_id = submit(client, job)
    print(job_id, flush=True)
    print(f"submitted {job.name}: {printable(job.entrypoint)}", file=sys.stderr)
    return _follow(client, job_id) if args.follow else 0


def _jobs(args: argparse.Namespace) -> int:
    from pipeline.cluster import connect, job_outcome

    client = connect(args.address, quiet=not args.verbose)
    status, message = job_outcome(client, args.job_id)  # also: an unknown id is exit 2, said plainly
    if args.action == "status":
        print(f"{status}{': ' + message if message else ''}")
    elif args.action == "stop":
        stopped = client.stop_job(args.job_id)
        print(f"{args.job_id}: {'stopping' if stopped else 'already ended (' + status + ')'}")
    elif args.follow:
        return _follow(client, args.job_id)
    else:
        sys.stdout.write(client.get_job_logs(args.job_id))
    return 0


def _follow(client: JobSubmissionClient, job_id: str) -> int:
    """Stream a job's logs to its end; exit 0 only if it SUCCEEDED."""
    from pipeline.cluster import follow_logs, job_outcome

    follow_logs(client, job_id)
    status, message = job_outcome(client, job_id)
    print(f"job {job_id}: {status}{': ' + message if message else ''}", file=sys.stderr)
    return 0 if status == "SUCCEEDED" else EXIT_FAILED
