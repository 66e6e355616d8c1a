"""Training: the driver of one run, from its config to a tested, tracked and registered checkpoint.

    pipeline train conf/fashion_mnist_cnn.yaml train.epochs=3 scaling.num_workers=2

`run_training(cfg)` is the whole run: the checks (checks.py), the run's identity and folder (runs.py),
where it executes (execution.py: this process or Ray Train workers, each running loop.py's worker loop),
the MLflow run (tracking.py), the test split on the chosen checkpoint and the registration
(reporting.py), and a `TrainingResult`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline import drawing
from pipeline.checks import check_training
from pipeline.config import ConfigError, ExperimentConfig
from pipeline.data.store import DatasetSpec
from pipeline.errors import RunFailed
from pipeline.execution import Execution, Trained, TrainingError, execute, plan_execution
from pipeline.lineage import log_datasets
from pipeline.loop import EmitFn, Event
from pipeline.redaction import invocation, redact
from pipeline.runs import RunPlan, begin_run, finish_run, held, plan_run
from pipeline.tracking import NOTE, Store, TrackedRun, check_store, end_run, open_run, resolve_store, run_exists

__all__ = ["TrackingUnavailable", "TrainingResult", "nothing_new", "recording", "run_training"]


@dataclass
class TrainingResult:
    run_name: str
    run_key: str  # the hash of what defines the run (runs.run_key): its folder is <storage_path>/<name>/<key>
    run_dir: str
    outcome: str  # "trained" (a new run), "resumed", or "already trained" (nothing was trained)
    epochs: int  # the last epoch the run has trained
    metrics: dict[str, Any]  # the last epoch's
    checkpoint: str  # the run's model: the best checkpoint by validation, else the last
    checkpoint_metrics: dict[str, Any] = field(default_factory=dict)  # its epoch's metrics, and test_* measured on it
    history: list[dict[str, Any]] = field(default_factory=list)  # this invocation's epochs, in order
    mlflow_run_id: str | None = None
    registration: dict[str, Any] | None = None  # name, version, alias, metric, split, value, champion_value, reason

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def run_training(
    cfg: ExperimentConfig,
    *,
    fresh: bool = False,
    on_event: EmitFn | None = None,
    verbose: bool = False,
    track: bool = True,
    register: bool = True,
    parent_run_id: str | None = None,
) -> TrainingResult:
    """Train the run that `cfg` identifies (runs.py) to `train.epochs`: a new run, resumed from its latest
    checkpoint, or, when it is complete and nothing new is asked, not trained at all ("already trained").

    `fresh` starts that run over. With `track`, it is recorded in MLflow (one MLflow run per run, continued
    on resume) and, with `register`, its checkpoint is registered through the champion rule, at most once.
    Bad input (data, model, resources a local Ray lacks, an unreachable tracking server) is refused before
    any MLflow run exists. `verbose` shows Ray's own logs."""
    spec = check_training(cfg)
    store = resolve_store(cfg.tracking.uri) if track else None
    if store:
        check_store(store)
    plan = plan_run(cfg, spec.data_hash, fresh=fresh)
    if on_event and (plan.state != "new" or plan.previous_key or plan.fresh):
        on_event({"event": "info", "message": plan.describe()})
    if plan.state == "finished" and nothing_new(plan, store, cfg, register):
        return TrainingResult(**{**(plan.record.result or {}), "outcome": "already trained", "history": []})
    execution = plan_execution(cfg, spec, verbose=verbose)
    if on_event and verbose:
        on_event({"event": "info", "message": execution.describe()})
    with held(plan):
        begin_run(plan, cfg)
        return _train(cfg, spec, plan, store, execution, on_event, register, parent_run_id)


def _train(
    cfg: ExperimentConfig, spec: DatasetSpec, plan: RunPlan, store: Store | None, execution: Execution,
    on_event: EmitFn | None, register: bool, parent_run_id: str | None,
) -> TrainingResult:  # fmt: skip
    """The run's training proper, recorded as one MLflow run that ends FINISHED, FAILED or KILLED."""
    history: list[dict[str, Any]] = []

    def collect(event: Event) -> None:
        if event["event"] == "epoch":
            history.append(event["metrics"])
        if on_event:
            on_event(event)

    if store:
        drawing.start()  # imports matplotlib on another core while this process trains: the figures are ready sooner
    tags = {"run_key": plan.key, NOTE: f"Made by `{invocation()}`", **execution.tags()}
    run = (
        open_run(store, cfg, spec, run_dir=plan.folder, fresh=plan.state == "new", tags=tags, parent_run_id=parent_run_id)
        if store
        else None
    )
    with recording(run):
        if run:
            log_datasets(run, cfg, spec)
        trained = execute(cfg, spec, plan.folder, execution, collect, run)
        return _conclude(cfg, spec, plan, trained, history, run, store, register)


def nothing_new(plan: RunPlan, store: Store | None, cfg: ExperimentConfig, register: bool) -> bool:
    """A complete run whose record this store has (its MLflow run, and its registration under this name)."""
    from pipeline.reporting import registered_name

    result = plan.record.result or {}
    if store is None:
        return True
    if not result.get("mlflow_run_id") or not run_exists(store, result["mlflow_run_id"]):
        return False  # tracked elsewhere or not at all before: recorded here from the checkpoints
    registration = result.get("registration")
    return not register or (registration is not None and registration["name"] == registered_name(cfg))


def _conclude(
    cfg: ExperimentConfig, spec: DatasetSpec, plan: RunPlan, trained: Trained, history: list[dict[str, Any]],
    run: TrackedRun | None, store: Store | None, register: bool,
) -> TrainingResult:  # fmt: skip
    """Test the run's checkpoint, report it to MLflow (and register it), and record the run as complete."""
    from pipeline.reporting import evaluate_checkpoint

    if trained.checkpoint is None:
        raise TrainingError("the training reported no checkpoint")
    checkpoint_metrics = evaluate_checkpoint(cfg, spec, trained.checkpoint)
    result = TrainingResult(
        cfg.name, plan.key, plan.folder, "trained" if plan.state == "new" else "resumed", int(trained.metrics["epoch"]),
        trained.metrics, trained.checkpoint, checkpoint_metrics, history,
    )  # fmt: skip
    if run is not None and store is not None:
        result.mlflow_run_id = run.run_id
        result.registration = _report(run, store, cfg, spec, trained.checkpoint, checkpoint_metrics, register)
    finish_run(plan, {k: v for k, v in result.summary().items() if k not in ("history", "outcome")})
    return result


def _report(
    run: TrackedRun, store: Store, cfg: ExperimentConfig, spec: DatasetSpec, checkpoint: str, metrics: dict[str, Any], register: bool
) -> dict[str, Any] | None:
    """Artifacts and registration at the end of a run; a tracking server that went away is said plainly."""
    from pipeline.reporting import report_run

    try:
        registration = report_run(run, cfg, spec, checkpoint, metrics, register=register)
    except Exception as err:
        try:
            check_store(store)
        except ConfigError:
            raise TrackingUnavailable(
                f"the MLflow server went away before the end of the run ({type(err).__name__}); the training finished and "
                f"its checkpoints are in {redact(checkpoint.rsplit('/', 1)[0])}: run the same command again when the server "
                "answers, and it logs what is missing and registers the model without training again"
            ) from err
        raise
    return registration.summary() if registration else None


class TrackingUnavailable(RunFailed):
    """The MLflow server stopped answering during a run; the checkpoints are safe, a re-run completes it."""


@contextmanager
def recording(run: TrackedRun | None) -> Iterator[None]:
    """End the MLflow run with the outcome: FINISHED, FAILED, or KILLED on Ctrl-C and SIGTERM."""
    try:
        yield
    except KeyboardInterrupt:
        if run:
            _end_quietly(run, "KILLED")
        raise
    except BaseException:
        if run:
            _end_quietly(run, "FAILED")
        raise
    if run:
        end_run(run, "FINISHED")


def _end_quietly(run: TrackedRun, status: str) -> None:
    """Mark a failed run, unless the server is what failed: the original error is the one to see."""
    with suppress(Exception):  # the run stays RUNNING then; a re-run of the command finds and finishes it
        end_run(run, status)
