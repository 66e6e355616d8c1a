"""Ray Tune's PopulationBasedTraining as pbt.py uses it (a module of its own: Tune pickles its scheduler, whose
class must be importable, and the rest of pbt.py imports no Ray before a search starts)."""

from __future__ import annotations

from typing import Any

from ray.tune.schedulers import PopulationBasedTraining, TrialScheduler

from pipeline.config import ExperimentConfig
from pipeline.pbt import InRange, mutations

__all__ = ["LastEpochIgnored", "pbt_scheduler"]


def pbt_scheduler(cfg: ExperimentConfig) -> Any:
    """Ray Tune's PBT, synchronous, on epochs, with the mutated values kept inside their ranges (the metric and
    mode are the Tuner's)."""
    import logging
    import warnings

    # Tune suggests reusing actors with PBT: in-process trials do (tune._tuner); a worker-group trial's actor only
    # waits on its chunk's workers, which are gone when PBT pauses it, so there is nothing worth reusing.
    warnings.filterwarnings("ignore", message="Consider boosting PBT performance", category=UserWarning)
    # A trial restored from a checkpoint makes Tune's JSON logger look for its result.json, which the search never
    # reads (each trial's history is in its own checkpoints): "Remote file not found" on the console, per restart.
    logging.getLogger("ray.tune.logger.logger").setLevel(logging.ERROR)
    found = mutations(cfg)
    return LastEpochIgnored(
        cfg.train.epochs,
        time_attr="epoch",
        perturbation_interval=cfg.tune.perturbation_interval,
        hyperparam_mutations={d.key: list(d.args) if d.kind == "choice" else d.to_ray() for d in found},
        quantile_fraction=cfg.tune.quantile_fraction,
        resample_probability=cfg.tune.resample_probability,
        custom_explore_fn=InRange({d.key: (d.kind, d.args) for d in found if d.kind != "choice"}),
        # Synchronous: trials are compared, and copied, at the same epoch; an exploiting trial's MLflow curve has
        # one value per epoch, and its next epoch is the first on the copied weights.
        synch=True,
        log_config=False,  # our own record (exploits.json, MLflow) says what each trial did
    )


class LastEpochIgnored(PopulationBasedTraining):
    """PBT that does not perturb at the last epoch. There is nothing left to train there, and a trial paused (or
    cloned) at its last epoch is restarted only to report that epoch again, which synchronous PBT pauses again:
    the trial never ends, and the paused trials behind it never get its CPUs back."""

    def __init__(self, last_epoch: int, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.last_epoch = last_epoch

    def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
        if result.get("epoch", 0) >= self.last_epoch:
            return TrialScheduler.CONTINUE
        return super().on_trial_result(tune_controller, trial, result)
