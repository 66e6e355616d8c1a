"""Population Based Training that exploits for real: trials copy the weights of better trials and train on.

    tune:
      scheduler: pbt
      perturbation_interval: 2          # epochs between exploits
      space: {optim.lr: {loguniform: [1.0e-4, 1.0e-1]}}
      hyperparam_mutations: {optim.lr: {loguniform: [1.0e-4, 1.0e-1]}}   # default: the space (grids aside)

Ray Tune's PopulationBasedTraining clones a trial by handing it another trial's latest *Tune* checkpoint,
which a trial on Ray Train's recommended pattern never reports (its TuneReportCallback reports a path), so
PBT skips every exploit. Here every trial reports a Tune checkpoint each `perturbation_interval` epochs (our
checkpoint folder, with ORIGIN_FILE naming the trial that wrote it) and starts from whatever checkpoint
Tune hands it (`start_state`):
- in process, the trial's loop restores that state (trial.TuneSession);
- on a worker group, the trial trains in chunks of `perturbation_interval` epochs, one Ray Train run per
  chunk (`train_in_chunks`), each starting from the state Tune handed it and reporting its last checkpoint.
PBT runs synchronously: every trial stops at the same epoch, the worst quantile copies one of the best at
that epoch, so an exploiting trial's curve goes on at the next epoch with the copied weights. The trial keeps
its own run folder and MLflow run across exploits (the mutated keys do not name the run: `run_identity`),
and records each exploit (`exploits.json` beside its checkpoints; tags and exploits.csv in MLflow).
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, ExperimentConfig, with_values
from pipeline.runs import filesystem_of
from pipeline.space import Dimension, parse_dimensions

__all__ = [
    "ORIGIN_FILE",
    "Exploit",
    "check_pbt",
    "check_population_fits",
    "mutated_keys",
    "mutations",
    "read_exploits",
    "record_exploit",
    "report_with_checkpoint",
    "run_identity",
    "start_state",
    "weights_checksum",
]

ORIGIN_FILE = "trial.json"  # in a checkpoint reported to Tune: the trial that wrote it, and its values
EXPLOITS_FILE = "exploits.json"  # in a trial's run folder: every exploit it made, oldest first
TUNE_CHECKPOINTS_KEPT = 4  # per trial; PBT clones the latest, and Ray warns that 2 or fewer may be pruned too early


@dataclass(frozen=True)
class Exploit:
    """One exploit: at `epoch`, this trial took `copied_trial`'s weights and optimizer, then `params`."""

    epoch: int
    copied_trial: str
    copied_params: dict[str, Any]
    params: dict[str, Any]  # the perturbed values it trains with from epoch + 1
    weights_sha256: str  # of the weights it continues from: the copied trial's at `epoch`

    def line(self) -> str:
        now = ", ".join(f"{k}={_short(v)}" for k, v in self.params.items())
        return f"epoch {self.epoch}: copied trial {self.copied_trial}, now {now}"


def _short(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


# ---------------------------------------------------------------------------------------------------
# The search side: checks and the scheduler


def mutations(cfg: ExperimentConfig) -> list[Dimension]:
    """tune.hyperparam_mutations, or by default the space's keys that are not grids."""
    if cfg.tune.hyperparam_mutations:
        return parse_dimensions(cfg, cfg.tune.hyperparam_mutations, "tune.hyperparam_mutations")
    return [d for d in parse_dimensions(cfg, cfg.tune.space, "tune.space") if d.kind != "grid"]


def mutated_keys(cfg: ExperimentConfig) -> list[str]:
    return list(cfg.tune.hyperparam_mutations) or [k for k, spec in cfg.tune.space.items() if "grid" not in spec]


def check_pbt(cfg: ExperimentConfig, retrain: bool) -> None:
    """What PBT cannot do, refused before Ray starts."""
    if cfg.tune.search != "random":
        raise ConfigError("tune.search: PBT chooses new values itself and takes no search algorithm; set tune.search=random")
    if retrain:
        raise ConfigError("tune.retrain_best: a PBT trial's model comes from a schedule of values, not one config to retrain; "
                          "set it to false (the search registers its best trial)")  # fmt: skip
    if cfg.train.epochs <= cfg.tune.perturbation_interval:
        raise ConfigError(f"tune.perturbation_interval: {cfg.tune.perturbation_interval} is not below train.epochs "
                          f"({cfg.train.epochs}), so no trial would ever exploit; lower it or raise train.epochs")  # fmt: skip
    if population(cfg) < 2:
        raise ConfigError("tune.num_samples: PBT needs a population of at least 2 trials; raise it to 2 or more")
    found = mutations(cfg)
    if not found:
        raise ConfigError("tune.hyperparam_mutations: nothing to mutate; name keys in tune: {hyperparam_mutations: {optim.lr: "
                          "{loguniform: [1.0e-4, 1.0e-1]}}} (the space's grids are never mutated)")  # fmt: skip
    for dimension in found:
        if dimension.kind == "grid":
            raise ConfigError(f"tune.hyperparam_mutations.{dimension.key}: a grid cannot be mutated; use choice")


@dataclass(frozen=True)
class InRange:
    """PBT multiplies a value by 0.8 or 1.2: kept inside its range (and whole for randint), where the config
    may refuse what lies outside (a momentum above 1). A class, not a closure: Tune pickles its scheduler."""

    bounds: dict[str, tuple[str, tuple[Any, ...]]]

    def __call__(self, config: dict[str, Any]) -> dict[str, Any]:
        for key, (kind, (low, high)) in self.bounds.items():
            if key in config:
                value = min(max(config[key], low), high - 1 if kind == "randint" else high)
                config[key] = round(value) if kind == "randint" else float(value)
        return config


def population(cfg: ExperimentConfig) -> int:
    """How many trials the search has: num_samples of every grid point."""
    return cfg.tune.num_samples * math.prod(len(spec["grid"]) for spec in cfg.tune.space.values() if "grid" in spec)


def check_population_fits(cfg: ExperimentConfig, concurrency: int) -> None:
    """Synchronous PBT with trials waiting for resources restarted its running trials over and over (seen with
    4 trials on 2 CPUs in Ray 2.60): the whole population must train at once."""
    if cfg.tune.scheduler == "pbt" and population(cfg) > concurrency:
        raise ConfigError(f"tune.num_samples: PBT trains its whole population at once, and {population(cfg)} trials do not "
                          f"fit: this cluster holds {concurrency} at a time (tune.max_concurrent_trials, scaling.*); "
                          f"lower tune.num_samples to {concurrency} or give the trials fewer resources")  # fmt: skip


def tune_checkpoint_config() -> Any:
    from ray import tune

    return tune.CheckpointConfig(num_to_keep=TUNE_CHECKPOINTS_KEPT)


# ---------------------------------------------------------------------------------------------------
# The trial side: what Tune hands a trial, what it reports, what it records


def run_identity(trial: ExperimentConfig, base: ExperimentConfig) -> ExperimentConfig:
    """The config that names a PBT trial's run: its mutated keys at the base's values, so that an exploit (which
    changes them) continues the trial's run folder and MLflow run rather than starting another."""
    keys = mutated_keys(base)
    flat = {key: _value(base, key) for key in keys}
    return with_values(trial, flat, source="tune.hyperparam_mutations")


def _value(cfg: ExperimentConfig, key: str) -> Any:
    node: Any = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def start_state(trial_id: str, params: dict[str, Any], own_history: list[dict[str, Any]]) -> tuple[dict | None, Exploit | None]:
    """The state Tune hands this trial (None: it starts from scratch), and the exploit it means if another trial
    wrote it. The history carried on is the trial's own (`own_history`, its latest checkpoint's): its curve."""
    from ray import tune

    from pipeline.checkpoints import load_state

    handed = tune.get_checkpoint()
    if handed is None:
        return None, None
    with handed.as_directory() as directory:
        state = load_state(Path(directory))
        origin = json.loads((Path(directory) / ORIGIN_FILE).read_text())
    state["history"] = [m for m in own_history if m["epoch"] <= state["epoch"]] or state["history"]
    if origin["trial_id"] == trial_id:
        return state, None
    exploit = Exploit(int(state["epoch"]), origin["trial_id"], origin["params"], params, weights_checksum(state["model"]))
    return state, exploit


def weights_checksum(weights: dict[str, Any]) -> str:
    """SHA-256 of a state dict's tensors, in key order: equal for equal weights, whatever file holds them."""
    digest = hashlib.sha256()
    for key in sorted(weights):
        digest.update(key.encode())
        digest.update(weights[key].detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def report_with_checkpoint(metrics: dict[str, Any], directory: Path, trial_id: str, params: dict[str, Any]) -> None:
    """Report an epoch to Tune with its checkpoint folder as a Tune checkpoint, marked with the trial that wrote it."""
    from ray import tune

    (directory / ORIGIN_FILE).write_text(json.dumps({"trial_id": trial_id, "params": params}))
    tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(str(directory)))


def due(epoch: int, cfg: ExperimentConfig) -> bool:
    """Whether an epoch's report carries a Tune checkpoint: at each perturbation, where PBT compares trials."""
    return epoch % cfg.tune.perturbation_interval == 0


def read_exploits(folder: str) -> list[Exploit]:
    """A trial's exploits, from its run folder (local or object store); none when it made none."""
    with _file(folder, EXPLOITS_FILE, "rb") as handle:
        raw = json.loads(handle.read()) if handle else []
    return [Exploit(**item) for item in raw]


def record_exploit(folder: str, exploit: Exploit, run: Any) -> None:
    """Add an exploit to the trial's record and to its MLflow run: a tag per exploit, and exploits.csv."""
    import pandas as pd

    from pipeline.tracking import log_csv, set_tags

    done = [e for e in read_exploits(folder) if e.epoch < exploit.epoch]  # a retried exploit is recorded once
    exploits = [*done, exploit]
    with _file(folder, EXPLOITS_FILE, "wb") as handle:
        handle.write(json.dumps([asdict(e) for e in exploits]).encode())
    set_tags(run, {"pbt.exploits": str(len(exploits)), f"pbt.exploit.{len(exploits)}": exploit.line()})
    rows = [{"epoch": e.epoch, "copied_trial": e.copied_trial, **{f"new.{k}": v for k, v in e.params.items()},
             **{f"copied.{k}": v for k, v in e.copied_params.items()}, "weights_sha256": e.weights_sha256} for e in exploits]  # fmt: skip
    log_csv(run, pd.DataFrame(rows), "exploits.csv")


@contextmanager
def _file(folder: str, name: str, mode: str) -> Iterator[Any]:
    """A file in a run folder on this disk or in an object store; reading a missing one yields None."""
    import pyarrow.fs

    filesystem, path = filesystem_of(folder)
    target = f"{path}/{name}"
    if mode == "rb":
        if filesystem.get_file_info(target).type != pyarrow.fs.FileType.File:
            yield None
            return
        with filesystem.open_input_stream(target) as handle:
            yield handle
        return
    filesystem.create_dir(path)
    with filesystem.open_output_stream(target) as handle:
        yield handle


def chunk_end(start_epoch: int, cfg: ExperimentConfig) -> int:
    """The last epoch of the chunk that starts at `start_epoch`: the next perturbation, or the run's end."""
    interval = cfg.tune.perturbation_interval
    return min(math.ceil(start_epoch / interval) * interval, cfg.train.epochs)


CHUNK_PREFIX = "chunk_epoch="  # a worker-group trial's Ray Train run per chunk, named by its first epoch


def trial_checkpoints(folder: str) -> dict[int, tuple[str, dict[str, Any]]]:
    """A trial's complete checkpoints: its run folder's, and a chunked trial's in each chunk (later chunks win)."""
    import pyarrow.fs

    from pipeline.checkpoints import run_checkpoints

    found = run_checkpoints(folder)
    filesystem, path = filesystem_of(folder)
    if filesystem.get_file_info(path).type != pyarrow.fs.FileType.Directory:
        return found
    scheme = folder.partition("://")[0] + "://" if "://" in folder else ""
    chunks = sorted(e.path for e in filesystem.get_file_info(pyarrow.fs.FileSelector(path)) if e.base_name.startswith(CHUNK_PREFIX))
    for chunk in chunks:
        found.update(run_checkpoints(f"{scheme}{chunk}"))
    return found


def delete_folder(folder: str) -> None:
    """A folder on this disk or in an object store, gone if it was there."""
    import pyarrow.fs

    filesystem, path = filesystem_of(folder)
    if filesystem.get_file_info(path).type == pyarrow.fs.FileType.Directory:
        filesystem.delete_dir(path)
