"""One trial of a search, as it runs in its Ray Tune actor: a training run of its own.

A trial is the search's config with the trial's values applied (`trial_config`): its own run folder
under the search's (`<search>/trials/<name>-<trial id>/<key>`), its own MLflow child run, and its own
checkpoints, from which it resumes after an interruption. `trial_driver` trains it in the actor itself
(loop.run_worker with a `TuneSession`) or on a Ray Train worker group of its own (execution.build_trainer),
as the search's Execution says. Under PBT (pbt.py) it starts from the state Tune hands it, maybe another
trial's, and a worker-group trial trains in chunks (`train_in_chunks`).
"""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipeline import pbt
from pipeline.checkpoints import LocalSession, checkpoint_dir_name, load_state, save_state
from pipeline.config import ExperimentConfig, with_values
from pipeline.data.store import DatasetSpec
from pipeline.execution import Execution, build_trainer, checkpoint_location
from pipeline.lineage import log_datasets
from pipeline.loop import EmitFn, ranking, run_worker, warner
from pipeline.pbt import CHUNK_PREFIX, delete_folder, trial_checkpoints
from pipeline.runs import begin_run, filesystem_of, plan_run, run_folder
from pipeline.runtime import sent_in_background
from pipeline.tracking import NOTE, EpochLogger, Store, TrackedRun, open_run

__all__ = ["Emitter", "Population", "TaggedQueue", "TuneSession", "trial_config", "trial_driver", "trial_folder", "trial_run_config"]


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


def trial_run_config(base: ExperimentConfig, trial: ExperimentConfig) -> ExperimentConfig:
    """The config that names a trial's run folder: the trial's own, but under PBT (whose exploits change the
    mutated values mid-run) with those keys at the base's values, so that the trial stays one run."""
    return pbt.run_identity(trial, base) if base.tune.scheduler == "pbt" else trial


def trial_folder(base: ExperimentConfig, params: dict[str, Any], trial_id: str, search_folder: str, data_hash: str) -> str:
    """Where a trial's checkpoints are, as the search reads them afterwards."""
    return run_folder(trial_run_config(base, trial_config(base, params, trial_id, search_folder)), data_hash)


class TuneSession(LocalSession):
    """In-process trial: checkpoints written as LocalSession writes them; every epoch reported to Tune.

    Under PBT (`population`): it starts from the state Tune handed the trial (`start`, maybe another trial's),
    and each perturbation epoch's report carries its checkpoint folder as a Tune checkpoint."""

    def __init__(self, *args: Any, start: dict[str, Any] | None = None, population: Population | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.start, self.population = start, population

    def restore(self) -> dict[str, Any] | None:
        return self.start if self.start is not None else super().restore()

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        from ray import tune

        super().report(metrics, state)
        member = self.population
        if member is not None and state is not None and pbt.due(state["epoch"], member.cfg):
            pbt.report_with_checkpoint(metrics, self.run_dir / checkpoint_dir_name(state["epoch"]), member.trial_id, member.params)
        else:
            tune.report(metrics)


@dataclass(frozen=True)
class Population:
    """A PBT trial, as its session needs to know it."""

    trial_id: str
    params: dict[str, Any]
    cfg: ExperimentConfig


def trial_driver(
    params: dict[str, Any], *, base: dict, dataset: dict, store: dict, parent_run_id: str, queue: Any,
    execution: Execution, search_folder: str,
) -> None:  # fmt: skip
    """Tune's function trainable: train one point of the space as a run of its own, resuming its checkpoints."""
    import ray
    import torch
    from ray import tune

    trial_id = tune.get_context().get_trial_id()
    search = ExperimentConfig.model_validate(base)
    cfg = trial_config(search, params, trial_id, search_folder)
    spec = DatasetSpec.from_json(dataset)
    plan = plan_run(trial_run_config(search, cfg), spec.data_hash, fresh=False)
    begin_run(plan, cfg)
    note = f"Trial {trial_id} of search run {parent_run_id}, which records the command line."
    tags = {"trial_id": trial_id, "run_key": plan.key, NOTE: note, **{f"hp.{key}": str(value) for key, value in params.items()}}
    run = open_run(Store(**store), cfg, spec, run_dir=plan.folder, fresh=False, tags=tags, parent_run_id=parent_run_id)
    log_datasets(run, cfg, spec)
    queue.put_nowait({"event": "trial_start", "trial": trial_id, "params": params})
    tagged = TaggedQueue(queue, trial_id)
    population = Population(trial_id, params, cfg) if search.tune.scheduler == "pbt" else None
    start = _pbt_start(population, plan.folder, run, tagged) if population else None
    if execution.in_process:
        device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
        metric, mode = ranking(cfg, spec)
        session = TuneSession(plan.folder, keep=cfg.train.checkpoints_to_keep, metric=metric, mode=mode, device=device,
                              start=start, population=population)  # fmt: skip
        with sent_in_background(tagged.put_nowait) as emit:
            run_worker(cfg, spec, session, emit, EpochLogger(run, warner(emit)))
    elif population:
        train_in_chunks(cfg, spec, plan.folder, execution, tagged, run, start, population)
    else:
        from ray.tune.integration.ray_train import TuneReportCallback

        build_trainer(cfg, spec, plan.folder, execution, progress_queue=tagged, callbacks=[TuneReportCallback()], tracking=run).fit()


def _pbt_start(population: Population, folder: str, run: TrackedRun, tagged: TaggedQueue) -> dict[str, Any] | None:
    """The state Tune handed a PBT trial; an exploit (another trial's state) is recorded and shown."""
    own = trial_checkpoints(folder)
    history = own[max(own)][1].get("history", []) if own else []
    start, exploit = pbt.start_state(population.trial_id, population.params, history)
    if exploit is not None:
        pbt.record_exploit(folder, exploit, run)
        tagged.put_nowait({"event": "info", "message": f"trial {population.trial_id}: {exploit.line()}"})
    return start


def train_in_chunks(
    cfg: ExperimentConfig, spec: DatasetSpec, folder: str, execution: Execution, tagged: TaggedQueue, run: TrackedRun,
    start: dict[str, Any] | None, population: Population,
) -> None:  # fmt: skip
    """A PBT trial on a worker group: one Ray Train run per `perturbation_interval` epochs, each starting from the
    state Tune handed the trial and reporting its last checkpoint to Tune, where PBT pauses (or clones) the trial.
    The worker group is gone by then: a pause stops nothing midway. Each chunk is a fresh Train run
    (`chunk_epoch=NNNN`), so that Ray Train never resumes its own snapshot over the state Tune handed."""
    from ray import tune

    epoch = start["epoch"] + 1 if start else 1
    start_from = _put_start(folder, start) if start else None
    while epoch <= cfg.train.epochs:
        end = pbt.chunk_end(epoch, cfg)
        chunk = with_values(cfg, {"train.epochs": end})
        chunk_folder = f"{folder}/{CHUNK_PREFIX}{epoch:04d}"
        delete_folder(chunk_folder)
        trainer = build_trainer(chunk, spec, chunk_folder, execution, progress_queue=tagged, tracking=run, start_from=start_from)
        result = trainer.fit()
        with result.checkpoint.as_directory() as directory:
            history = [m for m in load_state(Path(directory))["history"] if epoch <= m["epoch"] <= end]
            for metrics in history[:-1]:
                tune.report(metrics)
            pbt.report_with_checkpoint(history[-1], Path(directory), population.trial_id, population.params)
        start_from, epoch = checkpoint_location(cfg, result.checkpoint.path), end + 1


def _put_start(folder: str, state: dict[str, Any]) -> str:
    """The handed state as a checkpoint in the trial's folder, where every worker can read it."""
    import pyarrow.fs

    target = f"{folder}/start_epoch={state['epoch']:04d}"
    with tempfile.TemporaryDirectory() as tmp:
        save_state(Path(tmp), state)
        delete_folder(target)
        filesystem, path = filesystem_of(target)
        filesystem.create_dir(path)
        pyarrow.fs.copy_files(tmp, path, destination_filesystem=filesystem)
    return target


@dataclass
class TaggedQueue:
    """Progress events of one trial, marked with its id, into the search's shared queue (batch ticks dropped)."""

    queue: Any
    trial: str

    def put_nowait(self, event: dict[str, Any]) -> None:
        if event["event"] != "batch":
            self.queue.put_nowait({**event, "trial": self.trial})


@dataclass
class Emitter:
    """An event callback with the queue's face, for TaggedQueue."""

    put_nowait: EmitFn
