"""One trial of a search, as it runs in its Ray Tune actor: a training run of its own.

A trial is the search's config with the trial's values applied (`trial_config`): its own run folder
under the search's (`<search>/trials/<name>-<trial id>/<key>`), its own MLflow child run, and its own
checkpoints, from which it resumes after an interruption. `trial_driver` trains it in the actor itself
(loop.run_worker with a `TuneSession`) or on a Ray Train worker group of its own (execution.build_trainer),
as the search's Execution says.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pipeline.checkpoints import LocalSession
from pipeline.config import ExperimentConfig, with_values
from pipeline.data.store import DatasetSpec
from pipeline.execution import Execution, build_trainer
from pipeline.lineage import log_datasets
from pipeline.loop import EmitFn, ranking, run_worker, warner
from pipeline.runs import begin_run, plan_run
from pipeline.tracking import NOTE, EpochLogger, Store, open_run

__all__ = ["Emitter", "TaggedQueue", "TuneSession", "trial_config", "trial_driver"]


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


class TuneSession(LocalSession):
    """In-process trial: checkpoints written as LocalSession writes them; every epoch reported to Tune."""

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        from ray import tune

        super().report(metrics, state)
        tune.report(metrics)


def trial_driver(
    params: dict[str, Any], *, base: dict, dataset: dict, store: dict, parent_run_id: str, queue: Any,
    execution: Execution, search_folder: str,
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
    note = f"Trial {trial_id} of search run {parent_run_id}, which records the command line."
    tags = {"trial_id": trial_id, "run_key": plan.key, NOTE: note, **{f"hp.{key}": str(value) for key, value in params.items()}}
    run = open_run(Store(**store), cfg, spec, run_dir=plan.folder, fresh=False, tags=tags, parent_run_id=parent_run_id)
    log_datasets(run, cfg, spec)
    queue.put_nowait({"event": "trial_start", "trial": trial_id, "params": params})
    tagged = TaggedQueue(queue, trial_id)
    if execution.in_process:
        device = torch.device("cuda" if ray.get_gpu_ids() else "cpu")
        metric, mode = ranking(cfg, spec)
        session = TuneSession(plan.folder, keep=cfg.train.checkpoints_to_keep, metric=metric, mode=mode, device=device)
        run_worker(cfg, spec, session, tagged.put_nowait, EpochLogger(run, warner(tagged.put_nowait)))
    else:
        from ray.tune.integration.ray_train import TuneReportCallback

        build_trainer(cfg, spec, plan.folder, execution, progress_queue=tagged, callbacks=[TuneReportCallback()], tracking=run).fit()


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
