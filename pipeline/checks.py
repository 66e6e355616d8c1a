"""Every check that refuses a run before Ray starts: folders, data, task, runner, model, search.

    spec = check_training(cfg)                 # `pipeline train`: the materialized data set, or BadInput
    spec, dimensions = check_search(cfg)       # `pipeline tune` / `run`: also the space and the metric

Each failure is a ConfigError (exit 2) naming the key path, the value and the fix, raised before any
MLflow run, Ray process or folder exists. Checks that need the cluster (resources: runtime.check_fits)
run once Ray is up.
"""

from __future__ import annotations

import importlib.util
import tempfile
from pathlib import Path

import torch

from pipeline.config import ConfigError, ExperimentConfig
from pipeline.data.store import DatasetSpec, decoded_mb, has_validation, materialize, train_rows
from pipeline.execution import streams
from pipeline.loop import memory_format, validation_metrics
from pipeline.models import model_for, num_outputs
from pipeline.pbt import check_pbt
from pipeline.runs import filesystem_of
from pipeline.space import Dimension, parse_space

__all__ = ["check_search", "check_training", "search_metric"]


def check_training(cfg: ExperimentConfig) -> DatasetSpec:
    """Everything that can fail on bad input, done before Ray starts: folders, data, task, runner, model."""
    if "://" in cfg.data.root:  # the data sets are written and memory-mapped as local files (data/store.py)
        raise ConfigError(f"data.root: {cfg.data.root} is a URI; data sets are materialized to Parquet files in a folder that every "
                          "node reads: give a local path, or on a cluster a shared volume (NFS, ReadWriteMany) mounted on each node")  # fmt: skip
    _check_writable("data.root", cfg.data.root)
    if "://" in cfg.storage_path:
        _check_bucket(cfg.storage_path)
    else:
        _check_writable("storage_path", cfg.storage_path)
    spec = materialize(cfg.data, cfg.seed)
    _check_task(cfg, spec)
    _check_runner(cfg, spec)
    if not has_validation(spec, cfg.data) and "test" not in spec.rows:
        raise ConfigError(f"data.val_fraction: {cfg.data.name} has no test split, so it must hold out validation rows (> 0)")
    if cfg.metric not in validation_metrics(cfg):
        raise ConfigError(
            f"train.metric: checkpoints are ranked by validation metrics only; use one of {', '.join(validation_metrics(cfg))}"
        )
    _check_batch_fits(cfg, spec)
    _check_model_accepts(cfg, spec)
    return spec


def check_search(cfg: ExperimentConfig, *, retrain: bool = False) -> tuple[DatasetSpec, list[Dimension]]:
    """A search's checks: those of training, the space, the selection metric, validation rows, the trial
    runner and search algorithm, and (`retrain`: `pipeline run` with tune.retrain_best) a test split."""
    spec = check_training(cfg)
    dimensions = parse_space(cfg)
    search_metric(cfg)
    if not has_validation(spec, cfg.data):
        raise ConfigError("data.val_fraction: a search selects its trials on validation rows; set it above 0 (e.g. 0.1)")
    if retrain and "test" not in spec.rows:
        raise ConfigError(f"tune.retrain_best: {cfg.data.name} has no test split to evaluate the retrained model on; set it to false")
    _check_trial_runner(cfg, spec)
    if cfg.tune.scheduler == "pbt":
        check_pbt(cfg, retrain)
    if cfg.tune.search == "optuna":
        _check_optuna(dimensions)
    return spec, dimensions


def search_metric(cfg: ExperimentConfig) -> tuple[str, str]:
    """The metric that selects trials, and its order: a validation metric, never the test split's."""
    metric = cfg.tune.metric or cfg.metric
    if metric not in validation_metrics(cfg):
        raise ConfigError(f"tune.metric: trials are selected by validation metrics only; use one of {', '.join(validation_metrics(cfg))}")
    mode = cfg.tune.mode or (cfg.metric_mode if metric == cfg.metric else ("max" if "accuracy" in metric else "min"))
    return metric, mode


def _check_bucket(uri: str) -> None:
    """An object-store storage_path must be reachable and its bucket exist (it is never created here)."""
    import pyarrow.fs

    from pipeline.redaction import redact

    try:
        filesystem, path = filesystem_of(uri)
        found = filesystem.get_file_info(path.split("/", 1)[0]).type == pyarrow.fs.FileType.Directory
    except (OSError, ValueError) as err:  # no such scheme, endpoint or credentials (ArrowInvalid is a ValueError)
        raise ConfigError(f"storage_path: cannot reach {redact(uri)} ({str(err).splitlines()[0]}); check the URI, and the "
                          "endpoint and credentials in AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY") from None  # fmt: skip
    if not found:
        raise ConfigError(f"storage_path: the bucket of {redact(uri)} does not exist; create it, or name one that does")


def _check_writable(key: str, folder: str) -> None:
    """A folder the run will write to must be one it can make: tried in its nearest existing parent with a
    temporary folder, left as it was (permissions alone do not tell: root may not write to /proc)."""
    path = Path(folder).resolve()
    existing = next(p for p in (path, *path.parents) if p.exists())
    try:
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as err:
        raise ConfigError(f"{key}: cannot write to {path} ({existing}: {err.strerror}); set {key} to a folder you can write") from None


def _check_task(cfg: ExperimentConfig, spec: DatasetSpec) -> None:
    if cfg.is_classifier != (spec.task == "classification"):
        raise ConfigError(f"loss: {cfg.loss} does not fit {cfg.data.name}, a {spec.task} dataset")
    if cfg.loss == "bce_with_logits" and spec.num_classes != 2:
        raise ConfigError(f"loss: bce_with_logits needs 2 classes; {cfg.data.name} has {spec.num_classes}")


def _check_runner(cfg: ExperimentConfig, spec: DatasetSpec) -> None:
    """scaling.runner, scaling.num_workers, data.loader and storage_path must describe one possible run."""
    if cfg.scaling.runner == "in_process" and cfg.scaling.num_workers > 1:
        raise ConfigError(
            f"scaling.runner: in_process trains one worker; scaling.num_workers={cfg.scaling.num_workers} needs runner ray or auto"
        )
    if cfg.scaling.runner == "ray" and cfg.scaling.num_workers == 0:
        raise ConfigError("scaling.runner: ray needs scaling.num_workers >= 1")
    if cfg.scaling.min_workers is not None and cfg.train.max_failures < 1:
        raise ConfigError(f"scaling.num_workers: [{cfg.scaling.min_workers}, {cfg.scaling.num_workers}] resizes the group when workers or "
                          "nodes are lost, which Ray counts as failures: set train.max_failures >= 1 (the restarts it may make)")  # fmt: skip
    if streams(cfg, spec) and (cfg.scaling.runner == "in_process" or cfg.scaling.num_workers == 0):
        raise ConfigError(
            f"data.loader: the data streams through Ray Data (loader {cfg.data.loader}, {decoded_mb(spec):,.0f} MB), which "
            "needs Ray Train workers: scaling.runner=ray (or auto) and scaling.num_workers >= 1, or data.loader=memory"
        )


def _check_batch_fits(cfg: ExperimentConfig, spec: DatasetSpec) -> None:
    rows = train_rows(spec, cfg.data)
    global_batch = cfg.data.batch_size * max(cfg.scaling.num_workers, 1)
    if global_batch > rows:
        raise ConfigError(
            f"data.batch_size: {cfg.data.batch_size} per worker x {max(cfg.scaling.num_workers, 1)} workers is more "
            f"than the {rows} training samples; lower data.batch_size or scaling.num_workers"
        )


def _check_model_accepts(cfg: ExperimentConfig, spec: DatasetSpec) -> None:
    """The model builds, takes two samples in the layout training uses, and returns the loss's shape."""
    try:
        model = model_for(cfg, spec).eval()
    except ValueError as err:  # the builders say which key is wrong
        raise ConfigError(str(err)) from None
    layout = memory_format(cfg, spec)  # the layout training uses: a module that views NHWC activations fails here
    try:
        with torch.no_grad():
            out = model.to(memory_format=layout)(torch.zeros(2, *spec.input_shape).contiguous(memory_format=layout))
    except (ValueError, RuntimeError, TypeError) as err:
        hint = ""
        if layout == torch.channels_last:
            hint = " (train.channels_last=true: a module must reshape, not view, its activations; or set train.channels_last=false)"
        raise ConfigError(
            f"model.name: {cfg.model.name} cannot take {cfg.data.name} samples of shape {spec.input_shape}: {err}{hint}"
        ) from None
    expected = (2, num_outputs(cfg, spec))
    if tuple(out.shape) != expected:
        raise ConfigError(f"model.name: {cfg.model.name} returns shape {tuple(out.shape)}; {cfg.loss} on {cfg.data.name} needs {expected}")


def _check_trial_runner(cfg: ExperimentConfig, spec: DatasetSpec) -> None:
    """tune.trial_runner=in_process trains each trial in its own actor: one worker, data in memory."""
    if cfg.tune.trial_runner != "in_process":
        return
    if cfg.scaling.num_workers > 1:
        raise ConfigError(
            f"tune.trial_runner: in_process trains each trial in one process; scaling.num_workers={cfg.scaling.num_workers} "
            f"needs tune.trial_runner=workers (or scaling.num_workers=1)"
        )
    if streams(cfg, spec):
        raise ConfigError(
            "tune.trial_runner: in_process cannot stream data (data.loader); use tune.trial_runner=workers or data.loader=memory"
        )


def _check_optuna(dimensions: list[Dimension]) -> None:
    if any(d.kind == "grid" for d in dimensions):
        raise ConfigError("tune.search: optuna cannot search a grid; use choice, or tune.search=random")
    if importlib.util.find_spec("optuna") is None:
        raise ConfigError("tune.search: optuna is not installed; `pip install -e '.[optuna]'`")
