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
ASHA (time attribute: epoch) stops poor trials early. Trials are selected on validation metrics only.
MLflow gets one parent run per search and one child run per trial; the best trial's best checkpoint is
tested on the test split and registered once (champion / challenger). A search is a run (runs.py): the
same command resumes it or reports it complete; a changed config or space is a new search.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import yaml
from ray.tune import ProgressReporter

from pipeline.checkpoints import LocalSession, run_checkpoints
from pipeline.config import ConfigError, ExperimentConfig, with_values
from pipeline.data import DatasetSpec, has_validation
from pipeline.runs import RunPlan, begin_run, finish_run, held, plan_run, run_folder
from pipeline.runtime import Needs, ResourceWatch, check_fits, ensure_ray, event_pump, on_cluster, run_interruptibly
from pipeline.tracking import (
    Store,
    TrackedRun,
    check_store,
    child_runs,
    end_run,
    end_running_children,
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
    TrainingError,
    build_trainer,
    nothing_new,
    prepare,
    ranking,
    recording,
    run_training,
    run_worker,
    streams,
    training_needs,
    uses_gpu,
    validation_metrics,
    warner,
)

__all__ = ["SearchResult", "parse_space", "run_pipeline", "run_search", "trial_config"]

TRIAL_DRIVER_MEMORY = 256 * 2**20  # bytes Ray sets aside for a trial's driver process (scheduling only)
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
        if kind in ("uniform", "loguniform"):
            _check_fractions(cfg, dimension)
        dimensions.append(dimension)
    return dimensions


def _check_fractions(cfg: ExperimentConfig, dimension: Dimension) -> None:
    """An integer key accepts the bounds 16.0 and 64.0, then refuses every trial's 37.4: try a fraction inside."""
    low, high = dimension.args
    middle = (low + high) / 2
    # A whole middle ([2, 4]) moves by a quarter of the range, at most 0.5: still inside, no longer whole.
    inside = middle if middle != int(middle) else middle + min(0.5, (high - low) / 4)
    try:
        with_values(cfg, {dimension.key: inside})
    except ConfigError:
        whole = f"randint: [{math.ceil(low)}, {math.floor(high) + 1}]"  # randint's high is exclusive
        where = f"tune.space.{dimension.key}.{dimension.kind}"
        raise ConfigError(f"{where}: {dimension.key} takes whole numbers; use {whole} or choice: [...]") from None


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
    """The metric that selects trials, and its order: a validation metric, never the test split's."""
    metric = cfg.tune.metric or cfg.metric
    if metric not in validation_metrics(cfg):
        raise ConfigError(f"tune.metric: trials are selected by validation metrics only; use one of {', '.join(validation_metrics(cfg))}")
    mode = cfg.tune.mode or (cfg.metric_mode if metric == cfg.metric else ("max" if "accuracy" in metric else "min"))
    return metric, mode


def trial_config(base: ExperimentConfig, params: dict[str, Any], trial_id: str, search_folder: str) -> ExperimentConfig:
    """The experiment with one trial's values: its own run under the search's folder, the search's MLflow experiment."""
    trial = with_values(base, params, source=f"trial {trial_id}")
    return trial.model_copy(
        update={
            "name": f"{base.name}-{trial_id}",
            "storage_path": f"{search_folder}/trials",
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
        tune.report(metrics)


def trial_driver(
    params: dict[str, Any], *, base: dict, dataset: dict, store: dict, parent_run_id: str, queue: Any, in_process: bool,
    search_folder: str,
) -> None:  # fmt: skip
    """Tune's function trainable: train one point of the space as a run of its own, resuming its checkpoints."""
    import ray
    import torch
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(ExperimentConfig.model_validate(base), params, trial_id, search_folder)
    spec = DatasetSpec.from_json(dataset)
    plan = plan_run(cfg, spec.data_hash, fresh=False)
    begin_run(plan, cfg)
    tags = {"trial_id": trial_id, "run_key": plan.key, **{f"hp.{key}": str(value) for key, value in params.items()}}
    run = open_run(Store(**store), cfg, spec, run_dir=plan.folder, fresh=False, tags=tags, parent_run_id=parent_run_id)
    queue.put_nowait({"event": "trial_start", "trial": trial_id, "params": params})
    tagged = _TaggedQueue(queue, trial_id)
    if in_process:
        device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
        metric, mode = ranking(cfg, spec)
        session = TuneSession(Path(plan.folder), keep=cfg.train.checkpoints_to_keep, metric=metric, mode=mode, device=device)
        run_worker(cfg, spec, session, tagged.put_nowait, EpochLogger(run, warner(tagged.put_nowait)))
    else:
        from ray.tune.integration.ray_train import TuneReportCallback

        build_trainer(cfg, spec, plan.folder, progress_queue=tagged, callbacks=[TuneReportCallback()], tracking=run).fit()


@dataclass
class _TaggedQueue:
    """Progress events of one trial, marked with its id, into the search's shared queue (batch ticks dropped)."""

    queue: Any
    trial: str

    def put_nowait(self, event: dict[str, Any]) -> None:
        if event["event"] != "batch":
            self.queue.put_nowait({**event, "trial": self.trial})


@dataclass
class _Emitter:
    """An event callback with the queue's face, for _TaggedQueue."""

    put_nowait: EmitFn


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
    if not on_cluster():
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
    best: float | None  # the trial's best value of the search metric (validation)
    history: list[tuple[int, float]] = field(default_factory=list)  # (epoch, metric), every epoch the trial ran
    best_checkpoint: str | None = None
    error: str | None = None


@dataclass
class SearchResult:
    name: str
    key: str  # the search's run key (runs.run_key): its folder is <storage_path>/<name>-tune/<key>
    outcome: str  # "searched", "resumed", or "already searched" (nothing was trained)
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
            "key": self.key,
            "outcome": self.outcome,
            "metric": self.metric,
            "mode": self.mode,
            "best_trial": self.best.trial_id,
            "best_params": self.best.params,
            "best_value": self.best.best,
            "trials": [asdict(t) for t in self.trials],
            "mlflow_run_id": self.mlflow_run_id,
            "registration": self.registration,
        }

    @classmethod
    def recorded(cls, summary: dict[str, Any], cfg: ExperimentConfig) -> SearchResult:
        """A complete search, as its run record holds it."""
        trials = [Trial(**{**t, "history": [tuple(p) for p in t["history"]]}) for t in summary["trials"]]
        best = next(t for t in trials if t.trial_id == summary["best_trial"])
        return cls(summary["name"], summary["key"], "already searched", summary["metric"], summary["mode"], trials, best,
                   with_values(cfg, best.params), summary["mlflow_run_id"], summary["registration"])  # fmt: skip


def run_search(
    cfg: ExperimentConfig,
    *,
    fresh: bool = False,
    register: bool = True,
    on_event: EmitFn | None = None,
    verbose: bool = False,
) -> SearchResult:
    """Search `tune.space`, track every trial, and register the best checkpoint (unless `register` is off).

    The search is a run (runs.py): the same command resumes an unfinished search (finished trials kept,
    unfinished ones from their checkpoints) or reports a complete one; a changed space or config is a new
    search. Ctrl-C and SIGTERM stop it at once, its MLflow runs KILLED."""
    spec = prepare(cfg)
    dimensions = parse_space(cfg)
    metric, mode = search_metric(cfg)
    if not has_validation(spec, cfg.data):
        raise ConfigError("data.val_fraction: a search selects its trials on validation rows; set it above 0 (e.g. 0.1)")
    store = resolve_store(cfg.tracking.uri)
    check_store(store)
    plan = plan_run(cfg, spec.data_hash, fresh=fresh, search=True)
    emit = on_event or (lambda event: None)
    if plan.state != "new" or plan.previous_key or plan.fresh:
        emit({"event": "info", "message": plan.describe()})
    if plan.state == "finished" and nothing_new(plan, store, cfg, register):
        return SearchResult.recorded(plan.record.result or {}, cfg)
    in_process = runs_in_process(cfg, spec)
    ensure_ray(verbose, dashboard=not in_process)
    needs = trial_needs(cfg, spec, in_process)
    check_fits(needs, "lower scaling.num_workers or scaling.cpus_per_worker")
    concurrency = max_concurrent_trials(cfg, needs)
    tags = {"kind": "search", "run_key": plan.key, "scheduler": cfg.tune.scheduler, "search": cfg.tune.search,
            "trial_runner": "in_process" if in_process else "workers"}  # fmt: skip
    with held(plan):
        begin_run(plan, cfg)
        parent = open_run(store, cfg, spec, run_dir=plan.folder, fresh=plan.state == "new", tags=tags)
        with recording(parent):
            result = _search(cfg, spec, plan, store, parent, dimensions, (metric, mode), concurrency, emit, verbose, in_process)
            if register:
                result.registration = _register_best(parent, cfg, spec, result.best, plan.folder)
            finish_run(plan, {**result.summary(), "epochs": cfg.train.epochs})
    return result


def _search(
    cfg: ExperimentConfig, spec: DatasetSpec, plan: RunPlan, store: Store, parent: TrackedRun, dimensions: list[Dimension],
    objective: tuple[str, str], concurrency: int, emit: EmitFn, verbose: bool, in_process: bool,
) -> SearchResult:  # fmt: skip
    """Run (or resume) the trials, then read each one's whole history from its checkpoints and report."""
    metric, mode = objective
    with event_pump(emit) as queue:
        trainable = _trainable(cfg, spec, store, parent, queue, in_process, plan.folder)
        tuner = _tuner(cfg, trainable, dimensions, metric, mode, concurrency, plan.folder, verbose, in_process)
        try:
            with _tune_console(verbose):
                grid = run_interruptibly(tuner.fit, ResourceWatch(emit, cfg.scaling.resource_wait_s))
        except KeyboardInterrupt:
            end_running_children(parent, "KILLED")
            raise
    trials = [_trial(result, cfg, spec, plan.folder, metric, mode) for result in grid]
    best = _best(trials, mode)
    outcome = "searched" if plan.state == "new" else "resumed"
    result = SearchResult(cfg.name, plan.key, outcome, metric, mode, trials, best, with_values(cfg, best.params), parent.run_id)
    _report_search(parent, cfg, result, dimensions)
    return result


def run_pipeline(
    cfg: ExperimentConfig,
    *,
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
    search = run_search(cfg, fresh=fresh, register=register and not retrain, on_event=on_event, verbose=verbose)
    if not retrain:
        return {"search": search.summary()}
    best = search.best_config
    final = best.model_copy(update={
        "name": f"{cfg.name}-best",
        # train on train+val: no validation, so the last epoch is the model; tested on the test split
        "data": best.data.model_copy(update={"val_fraction": 0.0}),
        "tracking": best.tracking.model_copy(update={"experiment": cfg.tracking.experiment or cfg.name}),
    })  # fmt: skip
    shown = _TaggedQueue(_Emitter(on_event), "retrained") if on_event else None  # a row of the trial table
    retrained = run_training(final, fresh=fresh, register=register, verbose=verbose, on_event=shown and shown.put_nowait,
                             parent_run_id=search.mlflow_run_id)  # fmt: skip
    return {"search": search.summary(), "retrained": retrained.summary()}


def trial_needs(cfg: ExperimentConfig, spec: DatasetSpec, in_process: bool) -> Needs:
    """What one trial takes: its actor's CPUs (and GPU) in process; else its workers' (the trial's own driver
    only waits on them and takes no CPU), and a CPU for Ray Data's readers when the data streams."""
    gpu = uses_gpu(cfg, in_process)
    if in_process:
        return Needs(cfg.scaling.cpus_per_worker, 1 if gpu else 0, f"1 trial actor x {cfg.scaling.cpus_per_worker} CPU")
    return training_needs(cfg, spec)


def max_concurrent_trials(cfg: ExperimentConfig, needs: Needs) -> int:
    """As many trials as the cluster's CPUs (and GPUs) hold at once (check_fits made sure one does here)."""
    import ray

    cluster = ray.cluster_resources()
    fit = int(cluster.get("CPU", 0) // needs.cpus) if needs.cpus else cfg.tune.max_concurrent_trials or 1
    if needs.gpus:
        fit = min(fit, int(cluster.get("GPU", 0) // needs.gpus))
    return max(1, min(cfg.tune.max_concurrent_trials or fit, fit))


def _trainable(
    cfg: ExperimentConfig, spec: DatasetSpec, store: Store, parent: TrackedRun, queue: Any, in_process: bool, search_folder: str
) -> Any:
    from ray import tune

    needs = trial_needs(cfg, spec, in_process)
    # In process, the trial's actor trains and reserves what training needs. Otherwise it only waits on its
    # worker group: it reserves memory for its process and no CPU (a whole CPU per trial driver kept
    # 2-worker trials off 2 cores; Tune refuses a trial that reserves nothing at all).
    resources = {"CPU": needs.cpus, "GPU": needs.gpus} if in_process else {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY}
    base = cfg.model_dump(mode="json")
    store_json = {"uri": store.uri, "source": store.source, "artifact_location": store.artifact_location}
    with_params = tune.with_parameters(trial_driver, base=base, dataset=spec.to_json(), store=store_json, parent_run_id=parent.run_id,
                                       queue=queue, in_process=in_process, search_folder=search_folder)  # fmt: skip
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
           concurrency: int, folder: str, verbose: bool, in_process: bool) -> Any:  # fmt: skip
    """A new search in `folder`, or the one Tune saved there, resumed: its finished and failed trials kept,
    the unfinished ones continued (each from its own checkpoints)."""
    from ray import tune

    if tune.Tuner.can_restore(folder):
        return tune.Tuner.restore(folder, trainable=trainable, resume_unfinished=True, resume_errored=False)
    storage, _, name = folder.rpartition("/")
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
            name=name,
            storage_path=storage,
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


def _trial(result: Any, base: ExperimentConfig, spec: DatasetSpec, search_folder: str, metric: str, mode: str) -> Trial:
    """A trial as its own checkpoints tell it: every epoch it ran (across interruptions and retries, which
    Tune's own record of a resumed trial lacks), its best validation value, and the checkpoint of that epoch."""
    params = dict(result.config)
    found = _TRIAL_ID.search(Path(result.path).name)
    trial_id = (result.metrics or {}).get("trial_id") or (found.group(1) if found else Path(result.path).name)
    checkpoints = run_checkpoints(run_folder(trial_config(base, params, trial_id, search_folder), spec.data_hash))
    history = checkpoints[max(checkpoints)][1].get("history", []) if checkpoints else []
    # The last epoch Tune saw: a worker group may finish an epoch after the scheduler stopped its trial,
    # and what the scheduler did not see does not count.
    seen = int((result.metrics or {}).get("epoch", 0))
    error = _error_line(result.error)
    scored = [(int(m["epoch"]), float(m[metric])) for m in history if int(m["epoch"]) <= seen and math.isfinite(m.get(metric, math.nan))]
    if not scored:
        return Trial(trial_id, params, "failed", seen, None, error=error or f"no epoch reported {metric}")
    pick = max if mode == "max" else min
    best_epoch, best_value = pick(scored, key=lambda point: point[1])
    kept = [epoch for epoch, _ in scored if epoch in checkpoints]
    chosen = best_epoch if best_epoch in checkpoints else pick(kept, key=dict(scored).__getitem__, default=None)
    status = "failed" if error else ("finished" if seen >= base.train.epochs else "stopped early")
    return Trial(trial_id, params, status, seen, best_value, scored, checkpoints[chosen][0] if chosen else None, error)


def _error_line(error: BaseException | None) -> str | None:
    return None if error is None else f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


def _best(trials: list[Trial], mode: str) -> Trial:
    scored = [t for t in trials if t.best is not None and t.best_checkpoint]
    if not scored:
        errors = "; ".join(f"{t.trial_id}: {t.error}" for t in trials if t.error) or "no trial reported a checkpoint"
        raise TrainingError(f"every trial failed: {errors}; fix the cause and run the command again with --fresh")
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


def _register_best(parent: TrackedRun, cfg: ExperimentConfig, spec: DatasetSpec, best: Trial, search_folder: str) -> dict[str, Any] | None:
    """Register the best trial's best checkpoint (chosen on validation), tested on the test split, from its own child run."""
    from pipeline.reporting import evaluate_checkpoint, report_run

    child = TrackedRun(parent.uri, child_runs(parent)[best.trial_id], parent.experiment_id)
    trial = trial_config(cfg, best.params, best.trial_id, search_folder)
    checkpoint = best.best_checkpoint or ""
    registration = report_run(child, trial, spec, checkpoint, evaluate_checkpoint(trial, spec, checkpoint), register=True)
    if registration is None:
        return None
    set_tags(parent, {"registered": f"{registration.name}/{registration.version}@{registration.alias}"})
    return registration.summary()
