"""MLflow tracking, the one front door: where runs go, one run per training, rank 0's metrics, artifacts.

    store = resolve_store(cfg.tracking.uri)           # MLFLOW_TRACKING_URI > tracking.uri > embedded default
    check_store(store)                                # unreachable: ConfigError naming the URI, before training
    run = open_run(store, cfg, spec, run_dir=..., fresh=False, tags=...)   # new, or the same run resumed
    EpochLogger(run)(metrics)                         # on rank 0, once per epoch, step = epoch
    end_run(run, "FINISHED")

The embedded default is a SQLite store and an artifact folder at absolute paths in the working directory
(`mlflow.db`, `mlartifacts/`), so every Ray worker writes to the same place whatever its own directory.
A run is found again by its `run_dir` tag (the Ray run's storage folder): a re-run or a resumed run
continues the same MLflow run, and an epoch already logged is not logged again.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pipeline.access import check_access, server_request
from pipeline.config import ConfigError, ExperimentConfig, config_hash, flatten
from pipeline.redaction import redact, safe_config
from pipeline.sqlite_store import new_sqlite_store

if TYPE_CHECKING:
    import pandas as pd
    from mlflow import MlflowClient

    from pipeline.data.store import DatasetSpec

__all__ = [
    "NOTE",
    "EpochLogger",
    "Store",
    "TrackedRun",
    "check_store",
    "child_runs",
    "end_run",
    "end_running_children",
    "git_commit",
    "log_csv",
    "log_metrics",
    "log_png",
    "log_text",
    "metric_history",
    "open_run",
    "resolve_store",
    "run_exists",
    "safe_params",
    "set_tags",
    "training_runs_link",
    "ui_command",
]

DEFAULT_DB = "mlflow.db"
DEFAULT_ARTIFACTS = "mlartifacts"
HEALTH_TIMEOUT_S = 5.0
PARAMS_PER_BATCH = 100  # MLflow's limit per log_batch call


@dataclass(frozen=True)
class Store:
    """Where runs are recorded, and which setting chose it (named in errors)."""

    uri: str
    source: str  # "MLFLOW_TRACKING_URI", "tracking.uri" or "default"
    artifact_location: str | None = None  # for SQLite stores; a server chooses its own

    @property
    def is_server(self) -> bool:
        return self.uri.startswith(("http://", "https://"))


def resolve_store(configured: str | None) -> Store:
    """MLFLOW_TRACKING_URI wins (clusters set it for every process), then tracking.uri, then the default."""
    if os.environ.get("MLFLOW_TRACKING_URI"):
        uri, source = os.environ["MLFLOW_TRACKING_URI"], "MLFLOW_TRACKING_URI"
    elif configured:
        uri, source = configured, "tracking.uri"
    else:
        uri, source = f"sqlite:///{DEFAULT_DB}", "default"
    uri = _absolute_sqlite(uri)
    return Store(uri, source, _artifact_folder(uri))


def _absolute_sqlite(uri: str) -> str:
    """sqlite:///mlflow.db is relative to each process's working directory, which differs on every Ray
    worker (their metrics would go to a new database there): resolved here, on the driver, once."""
    if not uri.startswith("sqlite:///") or uri.startswith("sqlite:////"):
        return uri
    return f"sqlite:///{Path(uri.removeprefix('sqlite:///')).expanduser().resolve()}"


def _artifact_folder(uri: str) -> str | None:
    """For a SQLite store: `mlartifacts/` beside the database file, as an absolute URI.

    MLflow's own default would be ./mlruns relative to each process's working directory, which
    differs between the driver and every Ray worker. A server chooses its own artifact store."""
    if not uri.startswith("sqlite:///"):
        return None
    return (Path(uri.removeprefix("sqlite:///")).resolve().parent / DEFAULT_ARTIFACTS).as_uri()


def ui_command(store: Store, host: str, port: int) -> list[str]:
    """The `mlflow server` command that serves a local store (SQLite and its artifact folder)."""
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", store.uri,
               "--host", host, "--port", str(port), "--workers", "1"]  # fmt: skip
    if store.artifact_location:
        command += ["--default-artifact-root", store.artifact_location]
    return command


def training_runs_link(ui_url: str) -> str:
    """The MLflow UI's experiments, opened on their training runs (the UI's `workflowType` switch, GenAI by default)."""
    return f"{ui_url.rstrip('/')}/#/experiments?workflowType=machine_learning"


def check_store(store: Store) -> None:
    """Fail before any training if runs cannot be recorded: a server that does not answer, a missing folder."""
    where = f"{store.source}={redact(store.uri)}" if store.source != "default" else redact(store.uri)
    if store.is_server:
        try:
            urllib.request.urlopen(server_request(store.uri, "/health"), timeout=HEALTH_TIMEOUT_S).close()
        except urllib.error.HTTPError:
            pass  # it answered: a server is there
        except (urllib.error.URLError, OSError) as err:
            reason = getattr(err, "reason", err)
            raise ConfigError(
                f"tracking: cannot reach the MLflow server at {where} ({reason}); start it "
                f"(`mlflow server --host 127.0.0.1 --port 5000`) or point MLFLOW_TRACKING_URI / tracking.uri elsewhere"
            ) from None
        check_access(store.uri, where)  # with authentication on: credentials refused now, not at the run's first write
    elif store.uri.startswith("sqlite:///"):
        folder = Path(store.uri.removeprefix("sqlite:///")).parent
        if not folder.is_dir():
            raise ConfigError(f"tracking: the folder of the SQLite store {where} does not exist; create {folder} or fix the URI")
        _create_sqlite_store(store)


def _create_sqlite_store(store: Store) -> None:
    """Make (or migrate) the SQLite database one process at a time: MLflow creates its tables on first use,
    and two commands doing so at once crashed one of them and could leave the schema half made."""
    import fcntl

    path = Path(store.uri.removeprefix("sqlite:///"))
    with open(f"{path}.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not path.exists():
            new_sqlite_store(path)
        client(store.uri).search_experiments(max_results=1)


def git_commit() -> str:
    """The commit of the code that trains (with -dirty for uncommitted changes), or 'unknown'."""
    try:
        found = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=40"],
            cwd=Path(__file__).parent, capture_output=True, text=True, timeout=10, check=True,
        )  # fmt: skip
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return found.stdout.strip() or "unknown"


def safe_params(cfg: ExperimentConfig) -> dict[str, str]:
    """The resolved config as flat MLflow params (dotted keys, text values), secrets replaced."""
    return {key: value if isinstance(value, str) else json.dumps(value) for key, value in flatten(safe_config(cfg)).items()}


# ---------------------------------------------------------------------------------------------------
# Runs


# MLflow's log_batch takes at most 1,000 metrics per call.
LOG_BATCH_LIMIT = 1000


@dataclass(frozen=True)
class TrackedRun:
    """An MLflow run that training writes to; plain data, so it travels to Ray workers in their config."""

    uri: str
    run_id: str
    experiment_id: str
    resumed: bool = False

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrackedRun:
        return cls(**data)


def client(uri: str) -> MlflowClient:
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


# The run's description in the UI (Markdown): the command line that made it.
NOTE = "mlflow.note.content"

# What kind of experiment this is, in MLflow 3's own terms: training runs ("custom model development"), not
# GenAI. The UI of MLflow 3.0-3.x read this tag to choose an experiment's view; newer UIs (3.17) choose it
# from a switch in the browser, GenAI by default, which a link can set: training_runs_link.
EXPERIMENT_KIND = {"mlflow.experimentKind": "custom_model_development"}


def experiment_id(store: Store, name: str) -> str:
    """The experiment's id, created on first use (on the driver only: SQLite dislikes concurrent creators)."""
    from mlflow.exceptions import MlflowException

    mlflow_client = client(store.uri)
    experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return mlflow_client.create_experiment(name, artifact_location=store.artifact_location, tags=EXPERIMENT_KIND)
        except MlflowException:  # another process created it first
            experiment = mlflow_client.get_experiment_by_name(name)
    if experiment is None or experiment.lifecycle_stage == "deleted":
        raise ConfigError(
            f"tracking.experiment: the MLflow experiment {name!r} was deleted; restore it in the UI "
            f"(or `mlflow experiments restore`), or choose another name with tracking.experiment=..."
        )
    for key, value in EXPERIMENT_KIND.items():  # an experiment made before the tag existed, or by someone else
        if key not in experiment.tags:
            mlflow_client.set_experiment_tag(experiment.experiment_id, key, value)
    return experiment.experiment_id


def open_run(
    store: Store,
    cfg: ExperimentConfig,
    spec: DatasetSpec,
    *,
    run_dir: str,
    fresh: bool,
    tags: dict[str, str],
    parent_run_id: str | None = None,
) -> TrackedRun:
    """The run that records this training: the same run as before for the same Ray run, unless `fresh`."""
    exp_id = experiment_id(store, cfg.tracking.experiment or cfg.name)
    mlflow_client = client(store.uri)
    commit = git_commit()
    run_dir = redact(run_dir)  # credentials in an object-store URI never reach a tag (nor the lookup by it)
    all_tags = {
        "run_dir": run_dir,
        "ray_run": cfg.name,
        "config_hash": config_hash(cfg),
        "data_hash": spec.data_hash,
        "git_commit": commit,
        "mlflow.source.git.commit": commit,
        **tags,
        **({"mlflow.parentRunId": parent_run_id} if parent_run_id else {}),
    }
    previous = None if fresh else _find_run(mlflow_client, exp_id, run_dir)
    if previous is None:
        run = mlflow_client.create_run(exp_id, run_name=cfg.name, tags=all_tags)
        _log_params(mlflow_client, run.info.run_id, safe_params(cfg))
        return TrackedRun(store.uri, run.info.run_id, exp_id)
    _continue_run(mlflow_client, previous, safe_params(cfg), all_tags)
    return TrackedRun(store.uri, previous.info.run_id, exp_id, resumed=True)


def run_exists(store: Store, run_id: str) -> bool:
    """Whether this store holds the run (a run recorded in another store, or deleted since, does not count)."""
    from mlflow.exceptions import MlflowException

    try:
        return client(store.uri).get_run(run_id).info.lifecycle_stage == "active"
    except MlflowException:
        return False


def _find_run(mlflow_client: MlflowClient, exp_id: str, run_dir: str) -> Any:
    quoted = run_dir.replace("'", "\\'")
    found = mlflow_client.search_runs(
        [exp_id], filter_string=f"tags.run_dir = '{quoted}'", order_by=["attributes.start_time DESC"], max_results=1
    )
    return found[0] if found else None


def _continue_run(mlflow_client: MlflowClient, run: Any, params: dict[str, str], tags: dict[str, str]) -> None:
    """Resume: params that are new are logged; a changed one (more epochs, say) is noted in a tag,
    since MLflow keeps a param's first value for good."""
    before = run.data.params
    _log_params(mlflow_client, run.info.run_id, {k: v for k, v in params.items() if k not in before})
    changed = [f"{k}: {before[k]} -> {v}" for k, v in params.items() if k in before and before[k] != v]
    if changed:
        history = run.data.tags.get("changed_on_resume")
        tags = {**tags, "changed_on_resume": "; ".join(filter(None, [history, *changed]))}
    for key, value in tags.items():
        mlflow_client.set_tag(run.info.run_id, key, value)
    mlflow_client.update_run(run.info.run_id, status="RUNNING")


def _log_params(mlflow_client: MlflowClient, run_id: str, params: dict[str, str]) -> None:
    from mlflow.entities import Param

    items = [Param(key, value) for key, value in params.items()]
    for start in range(0, len(items), PARAMS_PER_BATCH):
        mlflow_client.log_batch(run_id, params=items[start : start + PARAMS_PER_BATCH])


def end_run(run: TrackedRun, status: str) -> None:
    """FINISHED, FAILED or KILLED: the UI shows which runs completed."""
    client(run.uri).set_terminated(run.run_id, status=status)


class EpochLogger:
    """Rank 0's per-epoch metrics, step = epoch, each epoch once.

    It is given the whole history of the run's epochs (carried in every checkpoint) and logs those the
    MLflow run lacks: after a worker restart the epochs logged before it are skipped, and epochs that
    could not be logged (the server away) are logged when it answers again, even by a later process
    that resumed from the checkpoint. While the server is away, training goes on: one warning, then a
    new attempt every RETRY_AFTER_S, not a stalled epoch per attempt."""

    RETRY_AFTER_S = 30.0

    def __init__(self, run: TrackedRun, warn: Callable[[str], None] | None = None) -> None:
        self.warn = warn or (lambda message: print(f"warning: {message}", file=sys.stderr, flush=True))
        # A down server fails fast in this process (rank 0 logs nothing else): 3 tries over ~7 s, not
        # MLflow's default of 7 tries over minutes per call.
        for name, value in (("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "3"), ("MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR", "1"),
                            ("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")):  # fmt: skip
            os.environ.setdefault(name, value)
        self.client = client(run.uri)
        self.uri = run.uri
        self.run_id = run.run_id
        self.logged: set[int] | None = None  # read from the run on the first successful call
        self.retry_at = 0.0
        self.warned = False

    def __call__(self, history: list[dict[str, Any]]) -> None:
        from mlflow.entities import Metric

        if time.monotonic() < self.retry_at:
            return
        try:
            if self.logged is None:
                self.logged = {int(m.step) for m in self.client.get_metric_history(self.run_id, "epoch")}
            pending = [m for m in history if int(m["epoch"]) not in self.logged]
            now = int(time.time() * 1000)
            values = [Metric(key, float(value), now, int(m["epoch"])) for m in pending for key, value in m.items()]
            for start in range(0, len(values), LOG_BATCH_LIMIT):  # one call per epoch or so: logged whole
                self.client.log_batch(self.run_id, metrics=values[start : start + LOG_BATCH_LIMIT])
        except Exception as err:
            self.retry_at = time.monotonic() + self.RETRY_AFTER_S
            if not self.warned:
                self.warn(f"MLflow at {redact(self.uri)} is not answering ({type(err).__name__}); training goes on, "
                          "and the epochs' metrics are kept in the checkpoints and logged when it answers")  # fmt: skip
                self.warned = True
            return
        self.logged.update(int(m["epoch"]) for m in pending)
        if self.warned and pending:
            self.warn(f"MLflow at {redact(self.uri)} answers again: {len(pending)} epochs logged")
            self.warned = False


def metric_history(run: TrackedRun, keys: list[str]) -> dict[str, list[tuple[int, float]]]:
    """Each metric's (step, value) pairs from the run itself: every epoch, across resumes."""
    mlflow_client = client(run.uri)
    history = {}
    for key in keys:
        points = sorted((int(m.step), m.value) for m in mlflow_client.get_metric_history(run.run_id, key))
        if points:
            history[key] = points
    return history


def log_png(run: TrackedRun, png: Path, artifact_file: str) -> None:
    """Log the file `png` (pipeline/drawing.py's: it is moved) as `artifact_file` (folder/name.png) of `run`."""
    folder, _, name = artifact_file.rpartition("/")
    with tempfile.TemporaryDirectory() as tmp:
        named = Path(tmp) / name
        shutil.move(png, named)
        client(run.uri).log_artifact(run.run_id, str(named), folder or None)


def log_text(run: TrackedRun, text: str, artifact_file: str) -> None:
    client(run.uri).log_text(run.run_id, text, artifact_file)


def log_csv(run: TrackedRun, table: pd.DataFrame, artifact_file: str) -> None:
    log_text(run, table.to_csv(index=False), artifact_file)


def log_metrics(run: TrackedRun, metrics: dict[str, float], step: int = 0) -> None:
    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    client(run.uri).log_batch(run.run_id, metrics=[Metric(k, float(v), now, step) for k, v in metrics.items()])


def set_tags(run: TrackedRun, tags: dict[str, str]) -> None:
    mlflow_client = client(run.uri)
    for key, value in tags.items():
        mlflow_client.set_tag(run.run_id, key, value)


def end_running_children(parent: TrackedRun, status: str) -> None:
    """End the parent's child runs that are still RUNNING (trials cut short by Ctrl-C, say) with `status`."""
    found = client(parent.uri).search_runs(
        [parent.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}' and attributes.status = 'RUNNING'",
        max_results=10_000,
    )  # fmt: skip
    for run in found:
        end_run(TrackedRun(parent.uri, run.info.run_id, parent.experiment_id), status)


def child_runs(parent: TrackedRun) -> dict[str, str]:
    """trial id -> run id of the parent's child runs."""
    found = client(parent.uri).search_runs(
        [parent.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent.run_id}'", max_results=10_000
    )
    return {run.data.tags["trial_id"]: run.info.run_id for run in found if "trial_id" in run.data.tags}
