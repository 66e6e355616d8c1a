"""Hyperparameter search with Ray Tune over any config key, each trial trained by train.py's own code.

    pipeline tune conf/fashion_mnist_cnn.yaml tune.num_samples=8
    pipeline run conf/fashion_mnist_cnn.yaml          # search, then register (or retrain) the best

The search space is the config's `tune.space`: `key.path: {loguniform|uniform: [low, high]}`,
`{randint: [low, high]}` (high exclusive), `{choice: [...]}` or `{grid: [...]}`. Each trial is a Tune
function (`trial_driver`) that applies its values to the config and trains it one of two ways:
- in_process: `train.run_worker` in the trial's own actor with a `TuneSession` (no worker group: a
  trial of a small model is not dominated by the ~10 s start of a worker group);
- workers: `train.build_trainer(...)` with Ray's `TuneReportCallback` (Train V2's Tune pattern), N DDP
  workers per trial.
ASHA (time attribute: epoch) stops poor trials early. MLflow gets one parent run per search and one
child run per trial; the best trial's best checkpoint is registered once (champion / challenger).
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ray.tune import ProgressReporter

from pipeline.checkpoints import LocalSession
from pipeline.config import ConfigError, ExperimentConfig, with_values
from pipeline.data import DatasetSpec
from pipeline.tracking import (
    Store,
    TrackedRun,
    check_store,
    child_runs,
    end_run,
    log_csv,
    log_figure,
    log_metrics,
    log_text,
    open_run,
    resolve_store,
    safe_config,
    set_tags,
)
from pipeline.train import (
    EmitFn,
    EpochLogger,
    build_trainer,
    check_stream_fits,
    ensure_ray,
    epoch_metrics,
    event_pump,
    prepare,
    recording,
    run_training,
    run_worker,
    storage_uri,
    streams,
    uses_gpu,
    warner,
)

__all__ = ["SearchResult", "parse_space", "run_pipeline", "run_search", "search_dir", "trial_config"]

CHECKPOINT_PATH = "checkpoint_path"  # the metric key under which each report names its checkpoint
_NUMERIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")
_TRIAL_ID = re.compile(r"_([0-9a-f]{5}_\d{5})(_|$)")  # in Tune's trial folder names


# ---------------------------------------------------------------------------------------------------
# The search space


@dataclass(frozen=True)
class Dimension:
    key: str  # a config key path, e.g. optim.lr
    kind: str  # loguniform, uniform, randint, choice, grid
    args: tuple[Any, ...]

    def candidates(self) -> tuple[Any, ...]:
        """Values to validate the key with: the bounds, or every listed value."""
        if self.kind == "randint":
            return (self.args[0], self.args[1] - 1)
        return self.args

    def to_ray(self) -> Any:
        from ray import tune

        if self.kind in ("choice", "grid"):
            values = list(self.args)
            return tune.grid_search(values) if self.kind == "grid" else tune.choice(values)
        return {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint}[self.kind](*self.args)


def parse_space(cfg: ExperimentConfig) -> list[Dimension]:
    """`tune.space` checked before any trial: real config keys, sane bounds, values the config accepts."""
    if not cfg.tune.space:
        raise ConfigError("tune.space: empty; add e.g. `tune: {space: {optim.lr: {loguniform: [1.0e-4, 1.0e-1]}}}` to the conf")
    dimensions = []
    for key, spec in cfg.tune.space.items():
        kind, args = next(iter(spec.items()))
        dimension = Dimension(key, kind, _arguments(key, kind, args))
        for value in dimension.candidates():
            with_values(cfg, {key: value}, source=f"tune.space.{key}")  # unknown key or bad value: ConfigError
        dimensions.append(dimension)
    return dimensions


def _arguments(key: str, kind: str, args: Any) -> tuple[Any, ...]:
    where = f"tune.space.{key}.{kind}"
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: give a non-empty list of values, e.g. [32, 64]")
        return tuple(_number_if_numeric(value) for value in args)
    if not isinstance(args, list) or len(args) != 2:
        raise ConfigError(f"{where}: give [low, high], e.g. [1.0e-4, 1.0e-1]")
    low, high = (_number(where, value) for value in args)
    if low >= high:
        raise ConfigError(f"{where}: low {low} must be below high {high}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: bounds must be > 0 for a log scale (got low={low})")
    if kind == "randint":
        if low != int(low) or high != int(high):
            raise ConfigError(f"{where}: integer bounds, please (got [{low}, {high}])")
        return int(low), int(high)
    return low, high


def _number_if_numeric(value: Any) -> Any:
    """YAML reads 1e-4 (no dot) as text; a listed value that is a number in disguise becomes one."""
    if isinstance(value, str) and _NUMERIC.match(value.strip()):
        return float(value)
    return value


def _number(where: str, value: Any) -> float:
    try:
        return float(value)  # YAML reads 1e-4 (no dot) as text
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a number") from None


def search_metric(cfg: ExperimentConfig) -> tuple[str, str]:
    metric = cfg.tune.metric or cfg.metric
    if metric not in epoch_metrics(cfg):
        raise ConfigError(f"tune.metric: training never reports {metric!r}; use one of {', '.join(sorted(epoch_metrics(cfg)))}")
    mode = cfg.tune.mode or (cfg.metric_mode if metric == cfg.metric else ("max" if "accuracy" in metric else "min"))
    return metric, mode


def search_dir(cfg: ExperimentConfig) -> str:
    return f"{storage_uri(cfg)}/{cfg.name}-tune"


def trial_config(base: ExperimentConfig, params: dict[str, Any], trial_id: str) -> ExperimentConfig:
    """The experiment with one trial's values: its own run name and checkpoints, the search's MLflow experiment."""
    trial = with_values(base, params, source=f"trial {trial_id}")
    return trial.model_copy(
        update={
            "name": f"{base.name}-{trial_id}",
            "storage_path": f"{search_dir(base)}/trials",
            "tracking": trial.tracking.model_copy(update={"experiment": base.tracking.experiment or base.name}),
        }
    )


# ---------------------------------------------------------------------------------------------------
# One trial (runs in a Tune actor)


class TuneSession(LocalSession):
    """In-process trial: checkpoints written as LocalSession writes them; every epoch reported to Tune."""

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        from ray import tune

        super().report(metrics, state)
        latest = self.checkpoints()[-1] if state is not None else None
        tune.report({**metrics, **({CHECKPOINT_PATH: str(latest)} if latest else {})})


def trial_driver(
    params: dict[str, Any], *, base: dict, dataset: dict, store: dict, parent_run_id: str, queue: Any, in_process: bool
) -> None:
    """Tune's function trainable: train one point of the space, resuming its own checkpoints if any."""
    import ray
    import torch
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(ExperimentConfig.model_validate(base), params, trial_id)
    spec = DatasetSpec.from_json(dataset)
    tags = {"trial_id": trial_id, **{f"hp.{key}": str(value) for key, value in params.items()}}
    run = open_run(Store(**store), cfg, spec, run_dir=f"{storage_uri(cfg)}/{cfg.name}", fresh=False, tags=tags, parent_run_id=parent_run_id)
    queue.put_nowait({"event": "trial_start", "trial": trial_id, "params": params})
    tagged = _TaggedQueue(queue, trial_id)
    if in_process:
        device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
        session = TuneSession(Path(storage_uri(cfg)) / cfg.name, keep=cfg.train.checkpoints_to_keep,
                              metric=cfg.metric, mode=cfg.metric_mode, device=device)  # fmt: skip
        run_worker(cfg, spec, session, tagged.put_nowait, EpochLogger(run, warner(tagged.put_nowait)))
    else:
        from ray.tune.integration.ray_train import TuneReportCallback

        build_trainer(cfg, spec, progress_queue=tagged, callbacks=[TuneReportCallback()], tracking=run).fit()


@dataclass
class _TaggedQueue:
    """Progress events of one trial, marked with its id, into the search's shared queue (batch ticks dropped)."""

    queue: Any
    trial: str

    def put_nowait(self, event: dict[str, Any]) -> None:
        if event["event"] != "batch":
            self.queue.put_nowait({**event, "trial": self.trial})


def runs_in_process(cfg: ExperimentConfig, spec: DatasetSpec) -> bool:
    """Whether trials train in their own Tune actor (no worker group): the driver decides, once."""
    if cfg.tune.trial_runner == "in_process" and cfg.scaling.num_workers > 1:
        raise ConfigError(
            f"tune.trial_runner: in_process trains each trial in one process; scaling.num_workers={cfg.scaling.num_workers} "
            f"needs tune.trial_runner=workers (or scaling.num_workers=1)"
        )
    streaming = streams(cfg, spec)
    if cfg.tune.trial_runner == "in_process" and streaming:
        raise ConfigError("tune.trial_runner: in_process cannot stream data (data.loader); use tune.trial_runner=workers or data.loader=memory")
    if cfg.tune.trial_runner != "auto":
        return cfg.tune.trial_runner == "in_process"
    if cfg.scaling.num_workers > 1 or streaming:  # Ray Data shards are for Ray Train workers
        return False
    if not os.environ.get("RAY_ADDRESS"):
        return True  # a local Ray is one node
    import ray

    return len([node for node in ray.nodes() if node["Alive"]]) == 1


# ---------------------------------------------------------------------------------------------------
# The search (runs on the driver)


@dataclass
class Trial:
    trial_id: str
    params: dict[str, Any]
    status: str  # finished, stopped early, failed
    epochs: int
    best: float | None  # the trial's best value of the search metric
    history: list[tuple[int, float]] = field(default_factory=list)
    best_checkpoint: str | None = None
    error: str | None = None


@dataclass
class SearchResult:
    name: str
    metric: str
    mode: str
    trials: list[Trial]
    best: Trial
    best_config: ExperimentConfig  # the base experiment with the best trial's values (its own name)
    mlflow_run_id: str
    registration: dict[str, Any] | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "metric": self.metric,
            "mode": self.mode,
            "best_trial": self.best.trial_id,
            "best_params": self.best.params,
            "best_value": self.best.best,
            "trials": [{k: v for k, v in t.__dict__.items() if k != "history"} for t in self.trials],
            "mlflow_run_id": self.mlflow_run_id,
            "registration": self.registration,
        }


def run_search(
    cfg: ExperimentConfig,
    *,
    resume: bool = False,
    fresh: bool = False,
    register: bool = True,
    on_event: EmitFn | None = None,
    verbose: bool = False,
) -> SearchResult:
    """Search `tune.space`, track every trial, and register the best checkpoint (unless `register` is off)."""
    spec = prepare(cfg)
    dimensions = parse_space(cfg)
    metric, mode = search_metric(cfg)
    store = resolve_store(cfg.tracking.uri)
    check_store(store)
    _check_search_dir(cfg, resume, fresh)
    in_process = runs_in_process(cfg, spec)
    ensure_ray(verbose, dashboard=not in_process)
    check_stream_fits(cfg, spec)
    concurrency = max_concurrent_trials(cfg, in_process)
    tags = {"kind": "search", "scheduler": cfg.tune.scheduler, "search": cfg.tune.search, "trial_runner": "in_process" if in_process else "workers"}
    parent = open_run(store, cfg, spec, run_dir=search_dir(cfg), fresh=not resume, tags=tags)
    with recording(parent), event_pump(on_event or (lambda event: None)) as queue:
        trainable = _trainable(cfg, spec, store, parent, queue, in_process)
        tuner = _tuner(cfg, trainable, dimensions, metric, mode, concurrency, resume, verbose, in_process)
        with _tune_console(verbose):
            grid = tuner.fit()
        trials = [_trial(result, metric, mode, cfg.train.epochs) for result in grid]
        best = _best(trials, mode)
        result = SearchResult(cfg.name, metric, mode, trials, best, with_values(cfg, best.params), parent.run_id)
        _report_search(parent, cfg, result, dimensions)
        if register:
            result.registration = _register_best(parent, cfg, best, spec)
    return result


def run_pipeline(
    cfg: ExperimentConfig,
    *,
    resume: bool = False,
    fresh: bool = False,
    register: bool = True,
    on_event: EmitFn | None = None,
    verbose: bool = False,
) -> dict[str, Any]:
    """`pipeline run`: the search; then, with tune.retrain_best, the best config trained on train+val,
    tested on the test split, tracked as a child of the search and registered (the search registers
    nothing then). Without retrain_best, the search registers its best trial."""
    retrain = cfg.tune.retrain_best
    if retrain and "test" not in prepare(cfg).rows:
        raise ConfigError(f"tune.retrain_best: {cfg.data.name} has no test split to evaluate the retrained model on; set it to false")
    search = run_search(cfg, resume=resume, fresh=fresh, register=register and not retrain, on_event=on_event, verbose=verbose)
    if not retrain:
        return {"search": search.summary()}
    best = search.best_config
    final = best.model_copy(update={
        "name": f"{cfg.name}-best",
        "data": best.data.model_copy(update={"val_fraction": 0.0}),  # train on train+val; evaluate on test
        "tracking": best.tracking.model_copy(update={"experiment": cfg.tracking.experiment or cfg.name}),
    })  # fmt: skip
    retrained = run_training(final, fresh=True, register=register, verbose=verbose, parent_run_id=search.mlflow_run_id)
    return {"search": search.summary(), "retrained": retrained.summary()}


def _check_search_dir(cfg: ExperimentConfig, resume: bool, fresh: bool) -> None:
    import shutil

    folder = Path(search_dir(cfg))
    if "://" in str(folder):
        return
    if fresh:
        shutil.rmtree(folder, ignore_errors=True)
    elif resume and not (folder / "tuner.pkl").exists():
        raise ConfigError(f"--resume: no search to resume at {folder}; run without --resume to start one")
    elif not resume and folder.exists():
        raise ConfigError(f"a search named {cfg.name!r} exists at {folder}; add --resume to continue it or --fresh to start over")


def max_concurrent_trials(cfg: ExperimentConfig, in_process: bool) -> int:
    """As many trials as the cluster's CPUs (and GPUs) hold at once: a trial's actor and its workers all
    need resources, and trials that can never all be placed would wait forever."""
    import ray

    cluster = ray.cluster_resources()
    cpus, gpus = _trial_resources(cfg, in_process)
    fit = int(cluster.get("CPU", 0) // cpus)
    if gpus:
        fit = min(fit, int(cluster.get("GPU", 0) // gpus))
    if fit < 1:
        raise ConfigError(
            f"scaling: one trial needs {cpus} CPUs and {gpus} GPUs ({cfg.scaling.num_workers} workers x "
            f"{cfg.scaling.cpus_per_worker} CPUs{'' if in_process else ' + 1 for the trial driver'}), the cluster has "
            f"{cluster.get('CPU', 0):g} CPUs and {cluster.get('GPU', 0):g} GPUs; lower scaling.num_workers or scaling.cpus_per_worker"
        )
    return min(cfg.tune.max_concurrent_trials or fit, fit)


def _trial_resources(cfg: ExperimentConfig, in_process: bool) -> tuple[float, int]:
    gpu = uses_gpu(cfg, in_process)
    if in_process:
        return cfg.scaling.cpus_per_worker, 1 if gpu else 0
    return 1 + cfg.scaling.num_workers * cfg.scaling.cpus_per_worker, cfg.scaling.num_workers if gpu else 0


def _trainable(cfg: ExperimentConfig, spec: DatasetSpec, store: Store, parent: TrackedRun, queue: Any, in_process: bool) -> Any:
    from ray import tune

    cpus, gpus = _trial_resources(cfg, in_process)
    # The trial actor reserves the training's resources when it trains in process, one CPU otherwise.
    resources = {"CPU": cpus, "GPU": gpus} if in_process else {"CPU": 1}
    base = cfg.model_dump(mode="json")
    store_json = {"uri": store.uri, "source": store.source, "artifact_location": store.artifact_location}
    with_params = tune.with_parameters(trial_driver, base=base, dataset=spec.to_json(), store=store_json,
                                       parent_run_id=parent.run_id, queue=queue, in_process=in_process)  # fmt: skip
    return tune.with_resources(with_params, resources)


@contextmanager
def _tune_console(verbose: bool) -> Iterator[None]:
    """Tune's older console output while the search runs, unless `verbose`: the newer one prints its banner
    at any verbosity and ignores a progress reporter; the live table (console.TrialTable) shows the trials.
    Tune reads the choice from the environment, so it is set for the fit alone and then taken back."""
    if verbose or "RAY_AIR_NEW_OUTPUT" in os.environ:
        yield
        return
    os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    try:
        yield
    finally:
        del os.environ["RAY_AIR_NEW_OUTPUT"]


def _tuner(cfg: ExperimentConfig, trainable: Any, dimensions: list[Dimension], metric: str, mode: str,
           concurrency: int, resume: bool, verbose: bool, in_process: bool) -> Any:  # fmt: skip
    from ray import tune

    if resume:
        return tune.Tuner.restore(search_dir(cfg), trainable=trainable, resume_unfinished=True, resume_errored=True)
    return tune.Tuner(
        trainable,
        param_space={d.key: d.to_ray() for d in dimensions},
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            num_samples=cfg.tune.num_samples,
            max_concurrent_trials=concurrency,
            reuse_actors=in_process,  # an in-process trial's actor has torch and the data loaded already
            scheduler=_scheduler(cfg),
            search_alg=_search_algorithm(cfg, dimensions, metric, mode),
        ),
        run_config=tune.RunConfig(
            name=f"{cfg.name}-tune",
            storage_path=storage_uri(cfg),
            failure_config=tune.FailureConfig(max_failures=cfg.train.max_failures),
            verbose=None if verbose else 0,
            progress_reporter=None if verbose else _Silent(),
        ),
    )


class _Silent(ProgressReporter):
    """A Tune progress reporter that reports nothing."""

    def should_report(self, trials: list, done: bool = False) -> bool:
        return False

    def report(self, trials: list, done: bool, *sys_info: Any) -> None:
        pass


def _scheduler(cfg: ExperimentConfig) -> Any:
    from ray.tune.schedulers import ASHAScheduler, FIFOScheduler

    if cfg.tune.scheduler == "fifo":
        return FIFOScheduler()
    # time_attr=epoch: a resumed trial keeps its epoch count, where Tune's own iteration count restarts.
    # stop_last_trials=False: a trial that reaches max_t ends on its own, its worker group shut down cleanly.
    return ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs, grace_period=min(cfg.tune.grace_period, cfg.train.epochs),
                         reduction_factor=cfg.tune.reduction_factor, stop_last_trials=False)  # fmt: skip


def _search_algorithm(cfg: ExperimentConfig, dimensions: list[Dimension], metric: str, mode: str) -> Any:
    if cfg.tune.search == "random":
        return None  # Tune's default: random sampling, and every grid point
    if any(d.kind == "grid" for d in dimensions):
        raise ConfigError("tune.search: optuna cannot search a grid; use choice, or tune.search=random")
    try:
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(metric=metric, mode=mode)
    except (ImportError, AssertionError):
        raise ConfigError("tune.search: optuna is not installed; `pip install -e '.[optuna]'`") from None


def _trial(result: Any, metric: str, mode: str, max_epochs: int) -> Trial:
    frame = result.metrics_dataframe
    params = dict(result.config)
    found = _TRIAL_ID.search(Path(result.path).name)
    trial_id = (result.metrics or {}).get("trial_id") or (found.group(1) if found else Path(result.path).name)
    if frame is None or metric not in frame:
        return Trial(trial_id, params, "failed", 0, None, error=_error_line(result.error))
    rows = frame.dropna(subset=[metric]).drop_duplicates(subset="epoch", keep="last").sort_values("epoch")
    best_row = rows.loc[rows[metric].idxmax() if mode == "max" else rows[metric].idxmin()]
    epochs = int(rows["epoch"].max())
    status = "failed" if result.error else ("finished" if epochs >= max_epochs else "stopped early")
    checkpoint = best_row.get(CHECKPOINT_PATH) if CHECKPOINT_PATH in rows else None
    return Trial(trial_id, params, status, epochs, float(best_row[metric]),
                 list(zip(rows["epoch"].astype(int), rows[metric].astype(float))),
                 checkpoint if isinstance(checkpoint, str) else None, _error_line(result.error))  # fmt: skip


def _error_line(error: BaseException | None) -> str | None:
    return None if error is None else f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


def _best(trials: list[Trial], mode: str) -> Trial:
    scored = [t for t in trials if t.best is not None and t.best_checkpoint and not math.isnan(t.best)]
    if not scored:
        errors = "; ".join(f"{t.trial_id}: {t.error}" for t in trials if t.error) or "no trial reported a checkpoint"
        raise RuntimeError(f"every trial failed: {errors}")
    return (max if mode == "max" else min)(scored, key=lambda t: t.best)


def _report_search(parent: TrackedRun, cfg: ExperimentConfig, result: SearchResult, dimensions: list[Dimension]) -> None:
    """The parent run: the best config, a table of every trial, the search plots; child runs get their outcome."""
    import pandas as pd

    from pipeline import plots

    statuses = {"finished": "FINISHED", "stopped early": "FINISHED", "failed": "FAILED"}
    children = child_runs(parent)
    for trial in result.trials:
        if trial.trial_id in children:
            child = TrackedRun(parent.uri, children[trial.trial_id], parent.experiment_id)
            set_tags(child, {"outcome": trial.status})
            end_run(child, statuses[trial.status])
    table = pd.DataFrame(
        [{"trial_id": t.trial_id, "status": t.status, "epochs": t.epochs, f"best_{result.metric}": t.best,
          **t.params, "error": t.error or ""} for t in result.trials]  # fmt: skip
    )
    log_csv(parent, table, "trials.csv")
    log_text(parent, yaml.safe_dump(safe_config(result.best_config), sort_keys=False), "best_config.yaml")
    log_metrics(parent, {f"best_{result.metric}": result.best.best})
    set_tags(parent, {"best_trial_id": result.best.trial_id, **{f"best.{k}": str(v) for k, v in result.best.params.items()}})
    scored = [t for t in result.trials if t.best is not None]
    for dimension in dimensions:
        figure = plots.metric_against(
            [t.params[dimension.key] for t in scored], [t.best for t in scored], dimension.key, result.metric,
            log_x=dimension.kind == "loguniform",
        )  # fmt: skip
        log_figure(parent, figure, f"plots/search_{dimension.key}.png")
    curves = {t.trial_id: t.history for t in result.trials if t.history}
    log_figure(parent, plots.trial_curves(curves, result.metric, result.best.trial_id), "plots/trial_curves.png")


def _register_best(parent: TrackedRun, cfg: ExperimentConfig, best: Trial, spec: DatasetSpec) -> dict[str, Any] | None:
    """Register the best trial's best checkpoint, from its own child run, through the champion rule."""
    from pipeline.reporting import report_run

    child = TrackedRun(parent.uri, child_runs(parent)[best.trial_id], parent.experiment_id)
    registration = report_run(child, trial_config(cfg, best.params, best.trial_id), best.best_checkpoint or "", register=True)
    if registration is None:
        return None
    set_tags(parent, {"registered": f"{registration.name}/{registration.version}@{registration.alias}"})
    return registration.summary()
