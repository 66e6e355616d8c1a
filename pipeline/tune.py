"""Hyperparameter search with Ray Tune over any config key, each trial trained by the training's own code.

    pipeline tune conf/fashion_mnist_cnn.yaml tune.num_samples=8
    pipeline run conf/fashion_mnist_cnn.yaml          # search, then register (or retrain) the best

The space (`tune.space`) is parsed by space.py and the search checked by checks.py before Ray starts.
Each trial (trial.py) applies its values to the config and trains as a run of its own, where the
search's Execution says: in its own Tune actor (loop.run_worker with a `TuneSession`; no worker group,
whose ~10 s start would dominate a small model's trial), or on N DDP workers (execution.build_trainer
with Ray's `TuneReportCallback`, Train V2's Tune pattern).
ASHA (time attribute: epoch) stops poor trials early. Trials are selected on validation metrics only.
MLflow gets one parent run per search and one child run per trial; the best trial's best checkpoint is
tested on the test split and registered once (champion / challenger). A search is a run (runs.py): the
same command resumes it, grows it (more tune.num_samples) or reports it complete; a changed config or space is a new search.
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

from pipeline import drawing
from pipeline.checks import check_search, search_metric
from pipeline.config import ExperimentConfig, with_values
from pipeline.data.store import DatasetSpec
from pipeline.execution import Execution, TrainingError, execution_for, training_needs, trials_in_process
from pipeline.loop import EmitFn
from pipeline.pbt import check_population_fits, read_exploits, trial_checkpoints, tune_checkpoint_config
from pipeline.pbt_scheduler import pbt_scheduler
from pipeline.redaction import invocation, safe_config
from pipeline.runs import RunPlan, begin_run, finish_run, held, plan_run
from pipeline.runtime import Needs, ResourceWatch, check_fits, ensure_ray, event_pump, run_interruptibly
from pipeline.search_batches import Batch, check_growth, plan_batches, read_results, warm_start
from pipeline.space import Dimension
from pipeline.tracking import (
    NOTE,
    Store,
    TrackedRun,
    check_store,
    child_runs,
    end_run,
    end_running_children,
    log_csv,
    log_metrics,
    log_png,
    log_text,
    open_run,
    resolve_store,
    set_tags,
)
from pipeline.train import nothing_new, recording, run_training
from pipeline.trial import Emitter, TaggedQueue, trial_config, trial_driver, trial_folder

__all__ = ["SearchResult", "Trial", "run_pipeline", "run_search"]

TRIAL_DRIVER_MEMORY = 256 * 2**20  # bytes Ray sets aside for a trial's driver process (scheduling only)
_TRIAL_ID = re.compile(r"_([0-9a-f]{5}_\d{5})(_|$)")  # in Tune's trial folder names


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
    exploits: list[dict[str, Any]] = field(default_factory=list)  # PBT: each weights copy it made (pbt.Exploit)


@dataclass
class SearchResult:
    name: str
    key: str  # the search's run key (runs.run_key): its folder is <storage_path>/<name>-tune/<key>
    outcome: str  # "searched", "resumed", "grown" (new trials added), or "already searched" (nothing was trained)
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
    retrain: bool = False,
) -> SearchResult:
    """Search `tune.space`, track every trial, and register the best checkpoint (unless `register` is off).
    `retrain`: the best config is trained again afterwards (`run_pipeline`), which needs a test split.

    The search is a run (runs.py): the same command resumes an unfinished search (finished trials kept,
    unfinished ones from their checkpoints) or reports a complete one; a changed space or config is a new
    search. Ctrl-C and SIGTERM stop it at once, its MLflow runs KILLED."""
    spec, dimensions = check_search(cfg, retrain=retrain)
    metric, mode = search_metric(cfg)
    store = resolve_store(cfg.tracking.uri)
    check_store(store)
    plan = plan_run(cfg, spec.data_hash, fresh=fresh, search=True)
    check_growth(cfg, plan)
    emit = on_event or (lambda event: None)
    if plan.state != "new" or plan.previous_key or plan.fresh:
        emit({"event": "info", "message": plan.describe()})
    if plan.state == "finished" and nothing_new(plan, store, cfg, register):
        return SearchResult.recorded(plan.record.result or {}, cfg)
    in_process = trials_in_process(cfg, spec)
    ensure_ray(verbose, dashboard=not in_process)
    execution = execution_for(cfg, spec, in_process)  # every trial's, decided once for the search
    if verbose:
        emit({"event": "info", "message": f"each trial {execution.describe()}"})
    needs = trial_needs(cfg, execution)
    check_fits(needs, "lower scaling.num_workers or scaling.cpus_per_worker")
    concurrency = max_concurrent_trials(cfg, needs)
    check_population_fits(cfg, concurrency)
    tags = {"kind": "search", "run_key": plan.key, "scheduler": cfg.tune.scheduler, "search": cfg.tune.search,
            "trial_runner": "in_process" if in_process else "workers", NOTE: f"Made by `{invocation()}`"}  # fmt: skip
    with held(plan):
        begin_run(plan, cfg)
        drawing.start()  # ready with matplotlib imported when the search's figures are asked for
        parent = open_run(store, cfg, spec, run_dir=plan.folder, fresh=plan.state == "new", tags=tags)
        with recording(parent):
            result = _search(cfg, spec, plan, store, parent, dimensions, (metric, mode), concurrency, emit, verbose, execution)
            if register:
                result.registration = _register_best(parent, cfg, spec, result.best, plan.folder)
            finish_run(plan, {**result.summary(), "epochs": cfg.train.epochs, "num_samples": sum(plan.record.batches)})
    return result


def _search(
    cfg: ExperimentConfig, spec: DatasetSpec, plan: RunPlan, store: Store, parent: TrackedRun, dimensions: list[Dimension],
    objective: tuple[str, str], concurrency: int, emit: EmitFn, verbose: bool, execution: Execution,
) -> SearchResult:  # fmt: skip
    """Run the batches not yet complete (search_batches.py), then read every trial's whole history from its checkpoints and report."""
    metric, mode = objective
    trials: list[Trial] = []
    with event_pump(emit) as queue:
        trainable = _trainable(cfg, spec, store, parent, queue, execution, plan.folder)
        for batch in plan_batches(cfg, plan):
            if batch.done:
                grid = read_results(batch, trainable)
            else:
                tuner = _tuner(cfg, trainable, dimensions, metric, mode, concurrency, batch, verbose, execution.in_process, trials)
                try:
                    with _tune_console(verbose):
                        grid = run_interruptibly(tuner.fit, ResourceWatch(emit, cfg.scaling.resource_wait_s))
                except KeyboardInterrupt:
                    end_running_children(parent, "KILLED")
                    raise
            trials += [_trial(result, cfg, spec, plan.folder, metric, mode) for result in grid]
    best = _best(trials, mode)
    outcome = "searched" if plan.state == "new" else "grown" if plan.grow else "resumed"
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
    search = run_search(cfg, fresh=fresh, register=register and not retrain, on_event=on_event, verbose=verbose, retrain=retrain)
    if not retrain:
        return {"search": search.summary()}
    best = search.best_config
    final = best.model_copy(update={
        "name": f"{cfg.name}-best",
        # train on train+val: no validation, so the last epoch is the model; tested on the test split
        "data": best.data.model_copy(update={"val_fraction": 0.0}),
        "tracking": best.tracking.model_copy(update={"experiment": cfg.tracking.experiment or cfg.name}),
    })  # fmt: skip
    shown = TaggedQueue(Emitter(on_event), "retrained") if on_event else None  # a row of the trial table
    retrained = run_training(final, fresh=fresh, register=register, verbose=verbose, on_event=shown.put_nowait if shown else None,
                             parent_run_id=search.mlflow_run_id)  # fmt: skip
    return {"search": search.summary(), "retrained": retrained.summary()}


def trial_needs(cfg: ExperimentConfig, execution: Execution) -> Needs:
    """What one trial takes: its actor's CPUs (and GPU) in process; else its workers' (the trial's own driver
    only waits on them and takes no CPU), and a CPU for Ray Data's readers when the data streams."""
    if execution.in_process:
        return Needs(cfg.scaling.cpus_per_worker, 1 if execution.use_gpu else 0, f"1 trial actor x {cfg.scaling.cpus_per_worker} CPU")
    return training_needs(cfg, execution)


def max_concurrent_trials(cfg: ExperimentConfig, needs: Needs) -> int:
    """As many trials as the cluster's CPUs (and GPUs) hold at once (check_fits made sure one does here)."""
    import ray

    cluster = ray.cluster_resources()
    fit = int(cluster.get("CPU", 0) // needs.cpus) if needs.cpus else cfg.tune.max_concurrent_trials or 1
    if needs.gpus:
        fit = min(fit, int(cluster.get("GPU", 0) // needs.gpus))
    return max(1, min(cfg.tune.max_concurrent_trials or fit, fit))


def _trainable(
    cfg: ExperimentConfig, spec: DatasetSpec, store: Store, parent: TrackedRun, queue: Any, execution: Execution, search_folder: str
) -> Any:
    from ray import tune

    needs = trial_needs(cfg, execution)
    # In process, the trial's actor trains and reserves what training needs. Otherwise it only waits on its
    # worker group: it reserves memory for its process and no CPU (a whole CPU per trial driver kept
    # 2-worker trials off 2 cores; Tune refuses a trial that reserves nothing at all).
    resources: dict[str, float] = (
        {"CPU": needs.cpus, "GPU": needs.gpus} if execution.in_process else {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY}
    )
    base = cfg.model_dump(mode="json")
    store_json = {"uri": store.uri, "source": store.source, "artifact_location": store.artifact_location}
    with_params = tune.with_parameters(trial_driver, base=base, dataset=spec.to_json(), store=store_json, parent_run_id=parent.run_id,
                                       queue=queue, execution=execution, search_folder=search_folder)  # fmt: skip
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
           concurrency: int, batch: Batch, verbose: bool, in_process: bool, known: list[Trial]) -> Any:  # fmt: skip
    """A new batch of the search in its folder, or the one Tune saved there, resumed: its finished and failed
    trials kept, the unfinished ones continued (each from its own checkpoints). `known`: the earlier batches' trials."""
    from ray import tune

    if tune.Tuner.can_restore(batch.folder):
        return tune.Tuner.restore(batch.folder, trainable=trainable, resume_unfinished=True, resume_errored=False)
    storage, _, name = batch.folder.rpartition("/")
    return tune.Tuner(
        trainable,
        param_space={d.key: d.to_ray() for d in dimensions},
        tune_config=tune.TuneConfig(
            metric=metric,
            mode=mode,
            num_samples=batch.num_samples,
            max_concurrent_trials=concurrency,
            reuse_actors=in_process,  # an in-process trial's actor has torch and the data loaded already
            scheduler=_scheduler(cfg),
            search_alg=_search_algorithm(cfg, metric, mode, known),
        ),
        run_config=tune.RunConfig(
            name=name,
            storage_path=storage,
            failure_config=tune.FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=tune_checkpoint_config() if cfg.tune.scheduler == "pbt" else None,
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
    if cfg.tune.scheduler == "pbt":
        return pbt_scheduler(cfg)
    # time_attr=epoch: a resumed trial keeps its epoch count, where Tune's own iteration count restarts.
    # stop_last_trials=False: a trial that reaches max_t ends on its own, its worker group shut down cleanly.
    return ASHAScheduler(time_attr="epoch", max_t=cfg.train.epochs, grace_period=min(cfg.tune.grace_period, cfg.train.epochs),
                         reduction_factor=cfg.tune.reduction_factor, stop_last_trials=False)  # fmt: skip


def _search_algorithm(cfg: ExperimentConfig, metric: str, mode: str, known: list[Trial]) -> Any:
    if cfg.tune.search == "random":
        return None  # Tune's default: random sampling (unseeded: a new batch draws new samples), and every grid point
    from ray.tune.search.optuna import OptunaSearch  # checks.check_search made sure optuna is installed

    return OptunaSearch(metric=metric, mode=mode, **warm_start(known))  # a grown search's Optuna goes on from its trials


def _trial(result: Any, base: ExperimentConfig, spec: DatasetSpec, search_folder: str, metric: str, mode: str) -> Trial:
    """A trial as its own checkpoints tell it: every epoch it ran (across interruptions and retries, which
    Tune's own record of a resumed trial lacks), its best validation value, and the checkpoint of that epoch."""
    params = dict(result.config)
    found = _TRIAL_ID.search(Path(result.path).name)
    trial_id = (result.metrics or {}).get("trial_id") or (found.group(1) if found else Path(result.path).name)
    folder = trial_folder(base, params, trial_id, search_folder, spec.data_hash)
    checkpoints = trial_checkpoints(folder)
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
    exploits = [asdict(e) for e in read_exploits(folder)]
    return Trial(trial_id, params, status, seen, best_value, scored, checkpoints[chosen][0] if chosen else None, error, exploits)


def _error_line(error: BaseException | None) -> str | None:
    return None if error is None else f"{type(error).__name__}: {str(error).strip().splitlines()[0] if str(error).strip() else ''}"


def _best(trials: list[Trial], mode: str) -> Trial:
    scored = [t for t in trials if t.best is not None and t.best_checkpoint]
    if not scored:
        errors = "; ".join(f"{t.trial_id}: {t.error}" for t in trials if t.error) or "no trial reported a checkpoint"
        raise TrainingError(f"every trial failed: {errors}; fix the cause and run the command again with --fresh")
    return (max if mode == "max" else min)(scored, key=_score)


def _score(trial: Trial) -> float:
    """A scored trial's best value of the search metric (the best trial, and those that `scored` lists, have one)."""
    if trial.best is None:
        raise TrainingError(f"trial {trial.trial_id} reported no value of the search metric")
    return trial.best


def _report_search(parent: TrackedRun, cfg: ExperimentConfig, result: SearchResult, dimensions: list[Dimension]) -> None:
    """The parent run: the best config, a table of every trial, the search plots; child runs get their outcome."""
    import pandas as pd

    statuses = {"finished": "FINISHED", "stopped early": "FINISHED", "failed": "FAILED"}
    children = child_runs(parent)
    for trial in result.trials:
        if trial.trial_id in children:
            child = TrackedRun(parent.uri, children[trial.trial_id], parent.experiment_id)
            set_tags(child, {"outcome": trial.status})
            end_run(child, statuses[trial.status])
    rows = [
        {
            "trial_id": t.trial_id,
            "status": t.status,
            "epochs": t.epochs,
            f"best_{result.metric}": t.best,
            **t.params,
            **({"exploits": len(t.exploits)} if cfg.tune.scheduler == "pbt" else {}),
            "error": t.error or "",
        }
        for t in result.trials
    ]
    table = pd.DataFrame(rows)
    log_csv(parent, table, "trials.csv")
    log_text(parent, yaml.safe_dump(safe_config(result.best_config), sort_keys=False), "best_config.yaml")
    log_metrics(parent, {f"best_{result.metric}": _score(result.best)})
    set_tags(parent, {"best_trial_id": result.best.trial_id, **{f"best.{k}": str(v) for k, v in result.best.params.items()}})
    scored = [t for t in result.trials if t.best is not None]
    figures = {
        f"plots/search_{dimension.key}.png": drawing.draw(
            "metric_against", [t.params[dimension.key] for t in scored], [_score(t) for t in scored], dimension.key,
            result.metric, log_x=dimension.kind == "loguniform",
        )
        for dimension in dimensions
    }  # fmt: skip
    curves = {t.trial_id: t.history for t in result.trials if t.history}
    exploits = (
        {t.trial_id: [(e["epoch"], e["copied_trial"]) for e in t.exploits] for t in result.trials} if cfg.tune.scheduler == "pbt" else None
    )
    figures["plots/trial_curves.png"] = drawing.draw("trial_curves", curves, result.metric, result.best.trial_id, exploits)
    for artifact_file, figure in figures.items():
        log_png(parent, figure.png(), artifact_file)


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
