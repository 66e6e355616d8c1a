"""A search that grows: more `tune.num_samples` on a complete search trains only the new trials.

    check_growth(cfg, plan)              # before any work: a search that cannot grow is refused (ConfigError)
    batches = plan_batches(cfg, plan)    # its Tune experiments; samples asked beyond them make a new one
    for batch in batches:                # done: read_results(batch, trainable); else a Tuner fitted in batch.folder

Each batch is one Tune experiment of its own `num_samples`: the first in the search's folder itself, as a
search that never grew, each later one in `<search folder>/grow-<n>`. Every trial trains under
`<search folder>/trials` (Tune's trial ids differ between experiments) as a child of the search's one
MLflow run, and the search's result is read from every batch: one table, one best trial, one registration.
The run record (runs.py) lists the batches, each written before it starts: an interrupted batch resumes
with its own count, whatever the next command asks.

What a new batch knows of those before it:
- random search draws new samples (Tune's sampler is not seeded, so no batch repeats another's draws);
- a grid is walked again, once per new sample (Tune's meaning of num_samples for a grid);
- Optuna is told every earlier trial and its value first (`warm_start`): it goes on from what they found;
- ASHA compares a batch's trials among themselves only (its rungs belong to one Tune experiment);
- PBT does not grow: its population is fixed when it starts (`check_growth`).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from pipeline.config import ConfigError, ExperimentConfig
from pipeline.runs import RunPlan, record_batches

if TYPE_CHECKING:  # tune imports this module
    from pipeline.tune import Trial

__all__ = ["GROW_PREFIX", "Batch", "batch_folder", "check_growth", "plan_batches", "read_results", "warm_start"]

GROW_PREFIX = "grow-"  # a later batch's folder in the search's: grow-2, grow-3, ...


@dataclass(frozen=True)
class Batch:
    """One Tune experiment of a search."""

    folder: str  # <search folder> for the first, <search folder>/grow-<n> after it
    num_samples: int
    done: bool  # complete when the search last was: its results are read, none of its trials runs again


def check_growth(cfg: ExperimentConfig, plan: RunPlan) -> None:
    """Refuse, before any work, more samples for a search that cannot grow: a PBT population is the set of
    trials that exploit one another from the start; trials added later would be a second population."""
    if plan.grow and cfg.tune.scheduler == "pbt":
        has, asked = plan.grow
        raise ConfigError(
            f"tune.num_samples: {asked} asks the PBT search {plan.name} ({plan.key}) for more trials, but a PBT population "
            f"is fixed when it starts ({has} here); set tune.num_samples={has} to resume or report it, or add --fresh "
            f"to start a search of {asked}"
        )


def plan_batches(cfg: ExperimentConfig, plan: RunPlan) -> list[Batch]:
    """The search's batches in order; samples asked beyond them make a new one, recorded before it starts.
    Fewer samples asked than it has adds nothing (an unfinished batch still finishes)."""
    sizes = plan.record.batches
    if cfg.tune.num_samples > sum(sizes):
        sizes = [*sizes, cfg.tune.num_samples - sum(sizes)]
        record_batches(plan, sizes)
    batches, total = [], 0
    for number, size in enumerate(sizes, start=1):
        total += size
        batches.append(Batch(batch_folder(plan.folder, number), size, done=total <= plan.record.samples_done))
    return batches


def batch_folder(search_folder: str, number: int) -> str:
    """The folder of the search's batch `number` (from 1): the first is the search's own, as before growth."""
    return search_folder if number == 1 else f"{search_folder}/{GROW_PREFIX}{number}"


def read_results(batch: Batch, trainable: Any) -> Any:
    """A complete batch's results (a ResultGrid) as Tune saved them: nothing of it runs again."""
    from ray import tune

    return tune.Tuner.restore(batch.folder, trainable=trainable).get_results()


def warm_start(trials: list[Trial]) -> dict[str, Any]:
    """OptunaSearch's arguments that tell it the earlier batches' trials, each with its best value of the
    search metric (what selects trials here), before it suggests any. Failed trials are left out: Optuna
    takes no value for them this way, and their points are not evidence about the space."""
    scored = [t for t in trials if t.best is not None]
    if not scored:
        return {}
    return {"points_to_evaluate": [dict(t.params) for t in scored], "evaluated_rewards": [t.best for t in scored]}
