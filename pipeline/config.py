"""The typed experiment config: one source of defaults, YAML deltas in conf/, dotted overrides.

    cfg = load_config("conf/fashion_mnist_cnn.yaml", ["optim.lr=0.01", "train.epochs=3"])

The defaults live here, in the dataclass-like pydantic models; a YAML file in conf/ holds only what
its experiment changes. Every key is checked: an unknown key, a wrong type, an out-of-range value or
an unknown dataset / model / optimizer / loss name raises ConfigError naming the key path and what is
allowed. Nothing here imports torch or Ray, so a bad config fails in well under a second.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from pipeline.config_yaml import apply_override, read_yaml
from pipeline.errors import ConfigError, describe_invalid

__all__ = [
    "DATASET_NAMES",
    "LOSS_NAMES",
    "MODEL_NAMES",
    "OPTIMIZER_NAMES",
    "ConfigError",
    "ExperimentConfig",
    "config_hash",
    "flatten",
    "load_config",
    "with_values",
]

# The catalogs' names. data/sources.py and models.py map each name to a reader or builder; tests/test_config.py checks
# that both sides agree, so a name can be validated here without importing torch.
DATASET_NAMES = ("linear", "circles", "mnist", "fashion_mnist", "cifar10", "tabular", "image_folder")
MODEL_NAMES = (
    "linear_regression",
    "softmax_regression",
    "mlp",
    "lenet",
    "cnn",
    "resnet18",
    "circle_classifier",
)
OPTIMIZER_NAMES = ("sgd", "adam", "adamw", "rmsprop", "adagrad")
LOSS_NAMES = ("mse", "l1", "huber", "cross_entropy", "bce_with_logits")
CLASSIFICATION_LOSSES = ("cross_entropy", "bce_with_logits")

# A user's own nn.Module: "package.module:ClassName".
_IMPORT_PATH = re.compile(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$")
# An MLflow registered model name: MLflow refuses "/" and ":" (they separate names in models:/ URIs) and "".
_MODEL_NAME = re.compile(r"^[\w-][\w .-]{0,199}$")
# $VAR and ${VAR}: os.path.expandvars' own pattern, so every variable it would expand is checked first.
_ENV_VAR = re.compile(r"\$(\w+|\{[^}]*\})", re.ASCII)
_PATH_SCHEMES = ("sqlite:///", "file://", "file:")  # URIs whose remainder is a local path


class _Section(BaseModel):
    # allow_inf_nan=False: optim.lr=.inf or a NaN weight decay is refused here, not discovered as a diverged run.
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class AugmentConfig(_Section):
    """Training-time augmentation, applied batched on the device (images only)."""

    hflip: bool = False
    rotation_degrees: float = Field(0.0, ge=0, le=180)
    # Random resized crop: the crop covers this fraction of the image area at least (1.0 = off).
    crop_min_scale: float = Field(1.0, gt=0, le=1)


class DataConfig(_Section):
    name: Literal[DATASET_NAMES] = "mnist"  # type: ignore[valid-type]
    root: str = "data"
    download: bool = True
    batch_size: int = Field(64, ge=1, description="per worker; the global batch is this x workers")
    val_fraction: float = Field(0.1, ge=0, lt=1)
    normalize: bool = True
    augment: AugmentConfig = AugmentConfig()
    # Synthetic sets (linear, circles): how many samples to make.
    num_samples: int = Field(1000, ge=2)
    # Keep only the first N rows of each split: quick dry runs and tests.
    limit: int | None = Field(None, ge=1)
    # Where batches come from. memory: each worker reads the splits into one tensor and slices batches
    # by index (the fast path). stream: Ray Data reads the Parquet files as the epoch goes, each worker
    # its shard (data larger than memory; Ray Train workers only). auto: stream when the training file
    # holds more than stream_above_mb decoded; unset, that is what this machine's memory allows
    # (execution.stream_threshold_mb).
    loader: Literal["auto", "memory", "stream"] = "auto"
    stream_above_mb: float | None = Field(None, gt=0)
    # The user's own table (data.name=tabular): a CSV or Parquet file and its target column.
    # The user's own images (data.name=image_folder): a folder of class folders (torchvision's
    # ImageFolder layout), or of train/ and test/ folders of class folders.
    path: str | None = None
    target: str | None = None
    # image_folder: [height, width] to resize every image to; unset, all images must share one size.
    image_size: tuple[int, int] | None = None

    @field_validator("root", "path")
    @classmethod
    def _expand(cls, path: str | None) -> str | None:
        return None if path is None else _expand_path(path)

    @model_validator(mode="after")
    def _user_data_needs_a_path(self) -> DataConfig:
        if self.name == "tabular" and (not self.path or not self.target):
            raise ValueError("data.name=tabular needs data.path (a .csv or .parquet file) and data.target (a column)")
        if self.name == "image_folder" and not self.path:
            raise ValueError("data.name=image_folder needs data.path: a folder with one folder of images per class")
        if self.image_size is not None and min(self.image_size) < 1:
            raise ValueError(f"data.image_size: {list(self.image_size)} must be two positive sizes, [height, width]")
        return self


class ModelConfig(_Section):
    name: str = "mlp"
    hidden: list[int] = Field(default_factory=lambda: [256, 128])
    dropout: float = Field(0.0, ge=0, lt=1)
    pretrained: bool = False
    freeze_backbone: bool = False
    # Keyword arguments for a user's own module (model.name=pkg.module:Class).
    kwargs: dict[str, Any] = Field(default_factory=dict)

    @field_validator("name")
    @classmethod
    def _known_or_import_path(cls, name: str) -> str:
        if name in MODEL_NAMES or _IMPORT_PATH.match(name):
            return name
        raise ValueError(f"unknown model {name!r}; use one of {', '.join(MODEL_NAMES)} or 'package.module:Class'")

    @field_validator("hidden")
    @classmethod
    def _positive_widths(cls, hidden: list[int]) -> list[int]:
        if any(width < 1 for width in hidden):
            raise ValueError(f"every hidden width must be >= 1, got {hidden}")
        return hidden

    @model_validator(mode="after")
    def _kwargs_for_own_models(self) -> ModelConfig:
        if self.kwargs and self.name in MODEL_NAMES:  # a catalog model would ignore them without a word
            raise ValueError(f"model.kwargs are for your own model (model.name=package.module:Class); {self.name} takes "
                             "model.hidden, model.dropout, model.pretrained, model.freeze_backbone")  # fmt: skip
        return self


class OptimConfig(_Section):
    name: Literal[OPTIMIZER_NAMES] = "adam"  # type: ignore[valid-type]
    lr: float = Field(1e-3, gt=0)
    momentum: float = Field(0.9, ge=0, lt=1, description="sgd and rmsprop only")
    weight_decay: float = Field(0.0, ge=0)
    # torch's fused step: one kernel per device and dtype updates every parameter, where the default runs
    # a dozen multi-tensor kernels (GPU) or a loop over the parameters (CPU) from Python. Adam's step took
    # 0.16 ms against 0.44 ms for the MNIST MLP on a CPU core (its whole step 1.2x as fast), and a small model's
    # GPU step waits on launches (docs/BENCHMARKS.md). For adam, adamw, sgd and adagrad (rmsprop has none).
    # The same update, to float rounding: a run may resume with it changed.
    fused: bool = Field(True, description="torch's fused optimizer step (adam, adamw, sgd, adagrad)")


class TrainConfig(_Section):
    epochs: int = Field(10, ge=1)
    max_failures: int = Field(0, ge=-1, description="worker-group restarts; -1 = unlimited")
    amp: bool = Field(False, description="bf16 autocast on CUDA; ignored on CPU")
    # NHWC weights and batches, the layout the fastest convolution kernels take (cuDNN, oneDNN): the CNN
    # trained 1.5x as fast on 2 CPU cores, 1.08x on an H200 (docs/BENCHMARKS.md). Image models only.
    channels_last: bool = Field(False, description="channels-last memory format for image models")
    # torch.compile: the model's forward and backward traced once, their elementwise ops fused into fewer
    # kernels (fewer launches and memory passes). The first steps pay the compilation (tens of seconds on
    # 2 CPU cores without inductor's cache; again for evaluation and each new batch shape), and whether the
    # later steps gain depends on the model and the device (docs/BENCHMARKS.md). Off by default. Checkpoints
    # hold the plain model's weights (loop.plain_module): with or without it, the same run.
    compile: bool = Field(False, description="torch.compile the model (the first steps pay compilation)")
    # torch.compile's own `mode`. reduce-overhead also records the compiled forward and backward as CUDA
    # graphs, replayed with one launch each: the cure for small models whose GPU waits on the host's kernel
    # launches (on CPU it compiles as `default`). max-autotune also tries several kernels per op: longer compiles.
    compile_mode: Literal["default", "reduce-overhead", "max-autotune"] = "default"
    checkpoints_to_keep: int = Field(2, ge=1)
    # The metric that ranks checkpoints (and, later, registered models); default by task.
    metric: str | None = None
    mode: Literal["min", "max"] | None = None

    @model_validator(mode="after")
    def _compile_mode_needs_compile(self) -> TrainConfig:
        if self.compile_mode != "default" and not self.compile:  # it would be ignored without a word
            raise ValueError(f"train.compile_mode={self.compile_mode} applies only with train.compile=true; set both")
        return self


class ScalingSection(_Section):
    num_workers: int = Field(1, ge=0, description="0 trains in this process, without a worker group")
    # Elastic (Ray Train's elastic scaling): a group of min_workers..num_workers, as many as fit, restarted
    # from the latest checkpoint at another size when workers or nodes are lost or added. Written
    # `num_workers: [min, max]`; a lost node is a failure, so it needs train.max_failures >= 1.
    min_workers: int | None = Field(None, ge=1)
    # Where training runs. auto: in this process when it is one worker on this machine (no RAY_ADDRESS)
    # without worker restarts (train.max_failures=0), since a worker group costs ~10 s to start;
    # on Ray Train otherwise. ray: always a Ray Train worker group. in_process: always here.
    runner: Literal["auto", "ray", "in_process"] = "auto"
    use_gpu: bool | None = Field(None, description="None: use GPUs when the Ray cluster has them")
    # Ray sizes each worker's torch thread pool by its CPUs: more CPUs, more threads for one worker.
    cpus_per_worker: int = Field(1, ge=1)
    # How Ray places the workers across nodes: PACK fills one node first (fast, shared memory), SPREAD
    # and STRICT_SPREAD put them on different nodes (STRICT: one per node, or the run waits for nodes).
    placement_strategy: Literal["PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"] = "PACK"
    # On a cluster (RAY_ADDRESS), how long a run may wait for its workers' resources before it gives up
    # (exit 1). Unset: as long as it takes, as an autoscaling cluster adding nodes needs. A local Ray that
    # can never fit the run refuses it at once instead (exit 2).
    resource_wait_s: float | None = Field(None, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _elastic_range(cls, data: Any) -> Any:
        """`num_workers: [min, max]` is min_workers=min, num_workers=max."""
        bounds = data.get("num_workers") if isinstance(data, dict) else None
        if not isinstance(bounds, (list, tuple)):
            return data
        if len(bounds) != 2 or not all(isinstance(b, int) and b >= 1 for b in bounds) or bounds[0] > bounds[1]:
            raise ValueError(f"num_workers: {list(bounds)}: give a count, or [min, max] with 1 <= min <= max for an elastic group")
        return {**data, "min_workers": bounds[0], "num_workers": bounds[1]}


class TrackingConfig(_Section):
    experiment: str | None = None
    register_as: str | None = None
    uri: str | None = None
    system_metrics: bool = True  # CPU, memory, disk, network, GPU of each node, logged while a training run trains
    system_metrics_interval_s: float = Field(5.0, gt=0, description="seconds between system metric samples")

    @field_validator("register_as")
    @classmethod
    def _a_name_mlflow_accepts(cls, name: str | None) -> str | None:
        if name is None or _MODEL_NAME.match(name):
            return name
        raise ValueError("a registered model name is 1-200 letters, digits, '_', '.', '-' and spaces, not starting with a space or '.'")

    @field_validator("uri")
    @classmethod
    def _expand(cls, uri: str | None) -> str | None:
        return None if uri is None else _expand_path(uri)


DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")


class TuneSection(_Section):
    """A hyperparameter search over any config key (pipeline tune / pipeline run)."""

    # config key path -> {distribution: arguments}, e.g. optim.lr: {loguniform: [1.0e-4, 1.0e-1]}
    space: dict[str, dict[str, Any]] = Field(default_factory=dict)
    num_samples: int = Field(4, ge=1, description="samples of the space (each grid point num_samples times)")
    metric: str | None = Field(None, description="default: train.metric")
    mode: Literal["min", "max"] | None = None
    scheduler: Literal["asha", "fifo", "pbt"] = "asha"
    grace_period: int = Field(1, ge=1, description="ASHA: epochs every trial runs before it may be stopped")
    reduction_factor: float = Field(2.0, gt=1)
    # Population Based Training (pbt.py): every perturbation_interval epochs the worst quantile_fraction of
    # the trials copy the weights and optimizer of one of the best and perturb its hyperparam_mutations.
    perturbation_interval: int = Field(2, ge=1, description="PBT: epochs between exploits")
    hyperparam_mutations: dict[str, dict[str, Any]] = Field(default_factory=dict, description="PBT: tune.space's syntax")
    quantile_fraction: float = Field(0.25, gt=0, le=0.5, description="PBT: the share of trials that exploit (and are copied)")
    resample_probability: float = Field(0.25, ge=0, le=1, description="PBT: resampled, else multiplied by 0.8 or 1.2")
    search: Literal["random", "optuna"] = "random"
    max_concurrent_trials: int | None = Field(None, ge=1, description="default: as many as the cluster's CPUs/GPUs fit")
    # in_process: each trial trains in its Tune actor (one worker, no worker group); workers: a Ray Train
    # worker group per trial; auto: in_process for 1-worker trials on a one-node cluster.
    trial_runner: Literal["auto", "in_process", "workers"] = "auto"
    retrain_best: bool = Field(False, description="pipeline run: retrain the best config on train+val, test it")

    @field_validator("space", "hyperparam_mutations")
    @classmethod
    def _one_distribution_per_key(cls, space: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
        for key, spec in space.items():
            if not isinstance(spec, dict) or len(spec) != 1 or next(iter(spec)) not in DISTRIBUTIONS:
                raise ValueError(f"{key}: write one of {', '.join(DISTRIBUTIONS)}, e.g. {{loguniform: [1.0e-4, 1.0e-1]}}; got {spec!r}")
        return space


class ExperimentConfig(_Section):
    # One safe path segment: the run's folder is <storage_path>/<name>/ (no "." or "..", no leading dot).
    name: str = Field("experiment", pattern=r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$", max_length=200)
    seed: int = Field(0, ge=0)
    loss: Literal[LOSS_NAMES] = "cross_entropy"  # type: ignore[valid-type]
    storage_path: str = "runs"
    data: DataConfig = DataConfig()
    model: ModelConfig = ModelConfig()
    optim: OptimConfig = OptimConfig()
    train: TrainConfig = TrainConfig()
    scaling: ScalingSection = ScalingSection()
    tracking: TrackingConfig = TrackingConfig()
    tune: TuneSection = TuneSection()

    @field_validator("storage_path")
    @classmethod
    def _expand(cls, path: str) -> str:
        return _expand_path(path)

    def dry_run(self) -> ExperimentConfig:
        """The same experiment shrunk to seconds, as a separate run: 1 epoch over 4 global batches."""
        workers = max(self.scaling.num_workers, 1)
        return self.model_copy(
            update={
                "name": f"{self.name}-dry-run",
                "train": self.train.model_copy(update={"epochs": 1}),
                "data": self.data.model_copy(update={"limit": 4 * self.data.batch_size * workers}),
            }
        )

    @property
    def is_classifier(self) -> bool:
        return self.loss in CLASSIFICATION_LOSSES

    @property
    def metric(self) -> str:
        """The metric that ranks checkpoints: accuracy for classifiers, MSE for regression."""
        return self.train.metric or ("val_accuracy" if self.is_classifier else "val_mse")

    @property
    def metric_mode(self) -> Literal["min", "max"]:
        if self.train.mode:
            return self.train.mode
        return "max" if self.metric.endswith("accuracy") else "min"


def load_config(path: str | Path | None, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """Read a YAML experiment, apply `key.path=value` overrides, and validate everything."""
    raw = read_yaml(Path(path)) if path is not None else {}
    source = str(path) if path is not None else "overrides"
    for override in overrides:
        apply_override(raw, override)
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None


def with_values(cfg: ExperimentConfig, values: dict[str, Any], source: str = "values") -> ExperimentConfig:
    """`cfg` with dotted keys set to (already parsed) values, validated: {"optim.lr": 0.01}."""
    raw = cfg.model_dump(mode="json")
    for key, value in values.items():
        *parents, leaf = key.split(".")
        node = raw
        for depth, part in enumerate(parents):
            child = node.get(part)
            if not isinstance(child, dict):
                raise ConfigError(f"{source}: {key}: {'.'.join(parents[: depth + 1])} is not a config section")
            node = child
        node[leaf] = value
    try:
        return ExperimentConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_describe(err, source)) from None


def _expand_path(path: str) -> str:
    """~ and $VAR / ${VAR} expanded, else a literal `~` or `$VAR` folder appears; not made absolute here.
    ~ only where a path is local (~/runs, sqlite:///~/mlflow.db, file:~/mlruns): a server URI gets $VARs only."""
    path = _expand_vars(path)
    scheme = next((prefix for prefix in _PATH_SCHEMES if path.startswith(prefix)), "")
    return scheme + os.path.expanduser(path.removeprefix(scheme))


def _expand_vars(text: str) -> str:
    for match in _ENV_VAR.finditer(text):
        name = match.group(1).strip("{}")
        if name not in os.environ:  # expandvars would leave it in the path as text
            raise ValueError(f"${name} is not set in the environment; export it or write the path out")
    return os.path.expandvars(text)


def config_hash(cfg: ExperimentConfig) -> str:
    """A short, stable hash of the resolved config: the same experiment gets the same hash."""
    canonical = json.dumps(cfg.model_dump(mode="json"), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def flatten(tree: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested sections as dotted keys: {"optim": {"lr": 0.1}} -> {"optim.lr": 0.1}."""
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def _describe(err: ValidationError, source: str) -> str:
    return describe_invalid(err, source, ExperimentConfig, "config")
