"""Training: a plain PyTorch loop per worker, and the driver that runs it under Ray Train (DDP).

    pipeline train conf/fashion_mnist_cnn.yaml train.epochs=3 scaling.num_workers=2

`train_fn_per_worker(config)` is what every Ray Train worker runs; `run_worker` is the loop itself and
takes a `Session` (checkpoints.py), so the same loop runs in this process with `scaling.num_workers=0`
and in benchmarks without Ray. `build_trainer(cfg, ...)` is the one place that builds a TorchTrainer;
tuning reuses it. `run_training(cfg)` is the whole run: data, checks, trainer, result.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from pipeline.batches import InMemory, Pair, Streamed
from pipeline.checkpoints import CheckpointError, LocalSession, RaySession, Session, load_state
from pipeline.config import ConfigError, ExperimentConfig, OptimConfig
from pipeline.data import DatasetSpec, augment, decoded_mb, has_validation, materialize, normalizer, streaming_datasets, train_rows
from pipeline.models import model_for, num_outputs
from pipeline.runs import RunPlan, begin_run, finish_run, held, plan_run
from pipeline.runtime import Needs, ResourceWaitTimeout, ResourceWatch, check_fits, ensure_ray, event_pump, on_cluster, run_interruptibly
from pipeline.tracking import EpochLogger, Store, TrackedRun, check_store, end_run, open_run, redact, resolve_store, run_exists

__all__ = [
    "DivergedError",
    "TrainingResult",
    "build_trainer",
    "load_checkpoint",
    "prepare",
    "run_training",
    "run_worker",
    "train_fn_per_worker",
]

Event = dict[str, Any]
EmitFn = Callable[[Event], None]
LogFn = Callable[[list[dict[str, Any]]], None]  # records the epochs of a history that are not yet recorded

LOSSES: dict[str, Callable[[], nn.Module]] = {
    "mse": nn.MSELoss,
    "l1": nn.L1Loss,
    "huber": nn.HuberLoss,
    "cross_entropy": nn.CrossEntropyLoss,
    "bce_with_logits": nn.BCEWithLogitsLoss,
}

BATCH_EVENT_INTERVAL_S = 0.5
CONTROLLER_POLL_INTERVAL_S = 0.2  # how often rank 0 sends a progress tick; each costs a device sync


def make_optimizer(cfg: OptimConfig, params: Iterator[nn.Parameter]) -> torch.optim.Optimizer:
    trainable = [p for p in params if p.requires_grad]  # a frozen backbone is not optimized
    common = {"lr": cfg.lr, "weight_decay": cfg.weight_decay}
    if cfg.name == "sgd":
        return torch.optim.SGD(trainable, momentum=cfg.momentum, **common)
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(trainable, momentum=cfg.momentum, **common)
    optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "adagrad": torch.optim.Adagrad}
    return optimizers[cfg.name](trainable, **common)


# ---------------------------------------------------------------------------------------------------
# The per-worker loop: plain PyTorch


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker."""
    # A user's model module (model.name=pkg.mod:Class) resolves as it does where `pipeline` was started.
    if config["driver_cwd"] not in sys.path:
        sys.path.insert(0, config["driver_cwd"])
    session = RaySession()
    queue = config.get("progress_queue")
    emit = queue.put_nowait if queue is not None and session.rank == 0 else None
    cfg = ExperimentConfig.model_validate(config["experiment"])
    log_epoch = _epoch_logger(config.get("tracking"), warner(emit)) if session.rank == 0 else None  # only rank 0 logs
    run_worker(cfg, DatasetSpec.from_json(config["dataset"]), session, emit, log_epoch, streaming=config.get("streaming", False))


def _epoch_logger(run: dict[str, Any] | None, warn: Callable[[str], None]) -> LogFn | None:
    return EpochLogger(TrackedRun.from_json(run), warn) if run else None


def warner(emit: EmitFn | None) -> Callable[[str], None]:
    """Warnings go with the progress events where there are some (a Ray worker's stderr is hidden), else to stderr."""

    def warn(message: str) -> None:
        if emit:
            emit({"event": "warning", "message": message})
        else:
            print(f"warning: {message}", file=sys.stderr, flush=True)

    return warn


def run_worker(
    cfg: ExperimentConfig,
    spec: DatasetSpec,
    session: Session,
    emit: EmitFn | None = None,
    log_epoch: LogFn | None = None,
    *,
    streaming: bool = False,
) -> None:
    """Train from the latest checkpoint (if any) to `train.epochs`, reporting every epoch on every rank.

    `log_epoch` (rank 0) is given the run's history of epoch metrics before each checkpoint is reported
    and records the epochs not yet recorded: a failure in between repeats the epoch after the restart,
    and epochs it could not record (tracking away) are recorded later from the checkpoint's history.
    `streaming`: batches from this worker's Ray Data shards (see `streams`), else the in-memory fast path.
    """
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    device = session.device
    data = Streamed(cfg, spec, session) if streaming else InMemory(cfg, spec, session)
    model = model_for(cfg, spec).to(device, memory_format=memory_format(cfg, spec))
    optimizer = make_optimizer(cfg.optim, model.parameters())
    start_epoch, history = 1, []  # history: every epoch's metrics so far, carried in each checkpoint
    state = session.restore()
    for message in session.skipped:
        warner(emit)(message)
    if state is None and session.skipped:  # starting over would log a new model's epochs over the old ones'
        raise CheckpointError("every checkpoint of this run is damaged; run the command with --fresh to train it from scratch")
    if state is not None:
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        start_epoch = state["epoch"] + 1
        history = [m for m in state.get("history", []) if m["epoch"] <= state["epoch"]]
        if start_epoch > cfg.train.epochs:  # already finished: log what the tracking lacks, report once more
            if log_epoch:
                log_epoch(history or [state["metrics"]])
            session.report(state["metrics"], None)
            return
    model = session.wrap(model)
    loss_fn = LOSSES[cfg.loss]()
    prep = _preprocessor(cfg, spec, device)
    for epoch in range(start_epoch, cfg.train.epochs + 1):
        steps, batches = data.train_batches(epoch)
        metrics = {"epoch": epoch, **train_epoch(model, steps, batches, loss_fn, optimizer, prep, cfg, session, epoch, emit)}
        if "val" in data.splits:  # the test split is never seen here: it is for the chosen checkpoint alone
            metrics.update(evaluate(model, data.eval_batches("val"), loss_fn, prep.eval, cfg, session, prefix="val"))
        history.append(metrics)
        state = _checkpoint_state(model, optimizer, history, cfg, spec) if session.rank == 0 else None
        if log_epoch:
            log_epoch(history)
        if emit:  # before the report: a Tune scheduler may stop the trial as soon as it has the result
            emit({"event": "epoch", "metrics": metrics})
        session.report(metrics, state)


@dataclass
class _Preprocess:
    train: Callable[[torch.Tensor], torch.Tensor]
    eval: Callable[[torch.Tensor], torch.Tensor]


def _preprocessor(cfg: ExperimentConfig, spec: DatasetSpec, device: torch.device) -> _Preprocess:
    """Normalize on the device; augment training batches only; batches in the model's memory format."""
    normalize, layout = normalizer(spec, cfg.data.normalize, device), memory_format(cfg, spec)
    # .contiguous() returns the batch itself when it already has the layout (always, for NCHW).
    return _Preprocess(
        train=lambda x: augment(normalize(x), cfg.data.augment).contiguous(memory_format=layout),
        eval=lambda x: normalize(x).contiguous(memory_format=layout),
    )


def memory_format(cfg: ExperimentConfig, spec: DatasetSpec) -> torch.memory_format:
    """channels_last for image models when train.channels_last is set; feature vectors have no channels."""
    return torch.channels_last if cfg.train.channels_last and spec.is_image else torch.contiguous_format


def train_epoch(
    model: nn.Module,
    steps: int,
    batches: Iterable[Pair],
    loss_fn: nn.Module,
    optimizer: torch.optim.Optimizer,
    prep: _Preprocess,
    cfg: ExperimentConfig,
    session: Session,
    epoch: int,
    emit: EmitFn | None,
) -> dict[str, float]:
    """One pass over this rank's batches; returns the global mean loss and samples/s (all ranks)."""
    model.train()
    use_amp = cfg.train.amp and session.device.type == "cuda"
    loss_sum = torch.zeros((), device=session.device)
    done = 0
    started = last_tick = time.perf_counter()
    for done, (x, y) in enumerate(batches, 1):
        with torch.autocast(session.device.type, dtype=torch.bfloat16, enabled=use_amp):
            loss = loss_fn(model(prep.train(x)), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_sum += loss.detach()
        if emit and time.perf_counter() - last_tick > BATCH_EVENT_INTERVAL_S:
            last_tick = time.perf_counter()
            emit({"event": "batch", "epoch": epoch, "step": done, "steps": max(steps, done), "loss": loss.item()})
    mean_loss = (_all_reduce(loss_sum / max(done, 1), session) / session.world_size).item()
    elapsed = time.perf_counter() - started  # the all-reduce above waited for the device to finish
    if not math.isfinite(mean_loss):  # every rank has the same all-reduced mean: every rank stops here
        raise DivergedError(
            f"train_loss is {mean_loss} in epoch {epoch}: the training diverged; lower optim.lr (now {cfg.optim.lr:g}) "
            "or check the data for extreme values"
        )
    samples = done * cfg.data.batch_size * session.world_size
    return {"train_loss": mean_loss, "samples_per_sec": samples / elapsed}


class DivergedError(RuntimeError):
    """The training loss became NaN or infinite: the run stops, and nothing of it is registered."""


@torch.no_grad()
def evaluate(
    model: nn.Module,
    batches: Iterable[Pair],
    loss_fn: nn.Module,
    prep: Callable[[torch.Tensor], torch.Tensor],
    cfg: ExperimentConfig,
    session: Session | OneProcess,
    prefix: str,
) -> dict[str, float]:
    """Loss and accuracy (or MSE) over the whole split: each rank its shard, then summed across ranks."""
    # The plain module, not the DDP wrapper: ranks run different numbers of eval batches, and DDP's
    # forward could otherwise wait on a buffer broadcast that the other ranks never join.
    net = getattr(model, "module", model)
    net.eval()
    sums = torch.zeros(3, device=session.device)  # loss x n, correct (or squared error), n
    for x, target in batches:
        out = net(prep(x)).float()
        sums[0] += loss_fn(out, target) * len(target)
        sums[1] += _correct(out, target, cfg.loss) if cfg.is_classifier else ((out - target) ** 2).sum()
        sums[2] += len(target)
    loss_total, score_total, count = _all_reduce(sums, session).tolist()
    score_name = "accuracy" if cfg.is_classifier else "mse"
    return {f"{prefix}_loss": loss_total / count, f"{prefix}_{score_name}": score_total / count}


def _correct(logits: torch.Tensor, target: torch.Tensor, loss: str) -> torch.Tensor:
    if loss == "bce_with_logits":
        return ((logits > 0).float() == target).sum()
    return (logits.argmax(dim=1) == target).sum()


@dataclass(frozen=True)
class OneProcess:
    """Evaluation on the driver (the test split, on the chosen checkpoint): one process, nothing to all-reduce."""

    device: torch.device
    rank: int = 0
    world_size: int = 1


def _all_reduce(value: torch.Tensor, session: Session | OneProcess) -> torch.Tensor:
    if session.world_size > 1:
        torch.distributed.all_reduce(value)
    return value


def _checkpoint_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, history: list[dict], cfg: ExperimentConfig, spec: DatasetSpec
) -> dict[str, Any]:
    net = getattr(model, "module", model)  # never the DDP wrapper
    return {
        "epoch": history[-1]["epoch"],
        "model": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "metrics": history[-1],
        "history": list(history),  # every epoch's metrics: what the MLflow run lacks is logged from it
        "experiment": cfg.model_dump(mode="json"),  # with the dataset spec: enough to rebuild the model
        "dataset": spec.to_json(),
    }


# ---------------------------------------------------------------------------------------------------
# The driver


@dataclass
class TrainingResult:
    run_name: str
    run_key: str  # the hash of what defines the run (runs.run_key): its folder is <storage_path>/<name>/<key>
    run_dir: str
    outcome: str  # "trained" (a new run), "resumed", or "already trained" (nothing was trained)
    epochs: int  # the last epoch the run has trained
    metrics: dict[str, Any]  # the last epoch's
    checkpoint: str | None  # the run's model: the best checkpoint by validation, else the last
    checkpoint_metrics: dict[str, Any] = field(default_factory=dict)  # its epoch's metrics, and test_* measured on it
    history: list[dict[str, Any]] = field(default_factory=list)  # this invocation's epochs, in order
    mlflow_run_id: str | None = None
    registration: dict[str, Any] | None = None  # name, version, alias, metric, split, value, champion_value, reason

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def validation_metrics(cfg: ExperimentConfig) -> tuple[str, str]:
    """What may rank checkpoints and trials: the validation split's figures, never the test split's."""
    return "val_loss", f"val_{'accuracy' if cfg.is_classifier else 'mse'}"


def prepare(cfg: ExperimentConfig) -> DatasetSpec:
    """Everything that can fail on bad input, done before Ray starts: folders, data, task, model, shapes."""
    _check_writable("data.root", cfg.data.root)
    if "://" not in cfg.storage_path:
        _check_writable("storage_path", cfg.storage_path)
    spec = materialize(cfg.data, cfg.seed)
    if cfg.is_classifier != (spec.task == "classification"):
        raise ConfigError(f"loss: {cfg.loss} does not fit {cfg.data.name}, a {spec.task} dataset")
    if cfg.loss == "bce_with_logits" and spec.num_classes != 2:
        raise ConfigError(f"loss: bce_with_logits needs 2 classes; {cfg.data.name} has {spec.num_classes}")
    if cfg.scaling.runner == "in_process" and cfg.scaling.num_workers > 1:
        raise ConfigError(f"scaling.runner: in_process trains one worker; scaling.num_workers={cfg.scaling.num_workers} needs runner ray or auto")
    if cfg.scaling.runner == "ray" and cfg.scaling.num_workers == 0:
        raise ConfigError("scaling.runner: ray needs scaling.num_workers >= 1")
    if streams(cfg, spec) and (cfg.scaling.runner == "in_process" or cfg.scaling.num_workers == 0):
        raise ConfigError(
            f"data.loader: the data streams through Ray Data (loader {cfg.data.loader}, {decoded_mb(spec):,.0f} MB), which "
            "needs Ray Train workers: scaling.runner=ray (or auto) and scaling.num_workers >= 1, or data.loader=memory"
        )
    if runs_in_process(cfg, spec) and "://" in cfg.storage_path:
        raise ConfigError(f"storage_path: {cfg.storage_path} is a URI; in-process runs need a local folder (or scaling.runner=ray)")
    if not has_validation(spec, cfg.data) and "test" not in spec.rows:
        raise ConfigError(f"data.val_fraction: {cfg.data.name} has no test split, so it must hold out validation rows (> 0)")
    if cfg.metric not in validation_metrics(cfg):
        raise ConfigError(f"train.metric: checkpoints are ranked by validation metrics only; use one of {', '.join(validation_metrics(cfg))}")
    _check_batch_fits(cfg, spec)
    _check_model_accepts(cfg, spec)
    return spec


def _check_writable(key: str, folder: str) -> None:
    """A folder the run will write to must be one it can make: tried in its nearest existing parent with a
    temporary folder, left as it was (permissions alone do not tell: root may not write to /proc)."""
    import tempfile

    path = Path(folder).resolve()
    existing = next(p for p in (path, *path.parents) if p.exists())
    try:
        tempfile.TemporaryDirectory(dir=existing).cleanup()
    except OSError as err:
        raise ConfigError(f"{key}: cannot write to {path} ({existing}: {err.strerror}); set {key} to a folder you can write") from None


def _check_batch_fits(cfg: ExperimentConfig, spec: DatasetSpec) -> None:
    rows = train_rows(spec, cfg.data)
    global_batch = cfg.data.batch_size * max(cfg.scaling.num_workers, 1)
    if global_batch > rows:
        raise ConfigError(
            f"data.batch_size: {cfg.data.batch_size} per worker x {max(cfg.scaling.num_workers, 1)} workers is more "
            f"than the {rows} training samples; lower data.batch_size or scaling.num_workers"
        )


def _check_model_accepts(cfg: ExperimentConfig, spec: DatasetSpec) -> None:
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
        raise ConfigError(f"model.name: {cfg.model.name} cannot take {cfg.data.name} samples of shape {spec.input_shape}: {err}{hint}") from None
    expected = (2, num_outputs(cfg, spec))
    if tuple(out.shape) != expected:
        raise ConfigError(f"model.name: {cfg.model.name} returns shape {tuple(out.shape)}; {cfg.loss} on {cfg.data.name} needs {expected}")


def run_training(
    cfg: ExperimentConfig,
    *,
    fresh: bool = False,
    on_event: EmitFn | None = None,
    verbose: bool = False,
    track: bool = True,
    register: bool = True,
    parent_run_id: str | None = None,
) -> TrainingResult:
    """Train the run that `cfg` identifies (runs.py) to `train.epochs`: a new run, resumed from its latest
    checkpoint, or, when it is complete and nothing new is asked, not trained at all ("already trained").

    `fresh` starts that run over. With `track`, it is recorded in MLflow (one MLflow run per run, continued
    on resume) and, with `register`, its checkpoint is registered through the champion rule, at most once.
    Bad input (data, model, resources a local Ray lacks, an unreachable tracking server) is refused before
    any MLflow run exists. `verbose` shows Ray's own logs."""
    spec = prepare(cfg)
    store = resolve_store(cfg.tracking.uri) if track else None
    if store:
        check_store(store)
    plan = plan_run(cfg, spec.data_hash, fresh=fresh)
    if on_event and (plan.state != "new" or plan.previous_key or plan.fresh):
        on_event({"event": "info", "message": plan.describe()})
    if plan.state == "finished" and nothing_new(plan, store, cfg, register):
        return TrainingResult(**{**(plan.record.result or {}), "outcome": "already trained", "history": []})
    in_process = runs_in_process(cfg, spec)
    if not in_process:
        ensure_ray(verbose)  # only now: bad input has been refused without the cost of starting Ray
        check_fits(training_needs(cfg, spec), "lower scaling.num_workers or scaling.cpus_per_worker")
    with held(plan):
        begin_run(plan, cfg)
        return _train(cfg, spec, plan, store, in_process, on_event, register, parent_run_id)


def _train(
    cfg: ExperimentConfig, spec: DatasetSpec, plan: RunPlan, store: Store | None, in_process: bool,
    on_event: EmitFn | None, register: bool, parent_run_id: str | None,
) -> TrainingResult:  # fmt: skip
    """The run's training proper, recorded as one MLflow run that ends FINISHED, FAILED or KILLED."""
    history: list[dict[str, Any]] = []

    def collect(event: Event) -> None:
        if event["event"] == "epoch":
            history.append(event["metrics"])
        if on_event:
            on_event(event)

    run = _open_tracked_run(store, cfg, spec, plan, parent_run_id) if store else None
    with recording(run):
        runner = _run_in_process if in_process else _run_on_ray
        trained = runner(cfg, spec, plan, collect, run)
        return _conclude(cfg, spec, plan, trained, history, run, store, register)


def training_needs(cfg: ExperimentConfig, spec: DatasetSpec) -> Needs:
    """What a run on Ray Train workers takes: each worker's CPUs (and GPU), and a CPU for Ray Data's readers."""
    workers, cpus = cfg.scaling.num_workers, cfg.scaling.cpus_per_worker
    gpus = workers if uses_gpu(cfg, in_process=False) else 0
    reader = 1 if streams(cfg, spec) else 0
    what = f"{workers} workers x {cpus} CPU{'s' if cpus > 1 else ''}" + (" + 1 CPU for Ray Data's readers" if reader else "")
    return Needs(workers * cpus + reader, gpus, what + (f", {gpus} GPUs" if gpus else ""))


def nothing_new(plan: RunPlan, store: Store | None, cfg: ExperimentConfig, register: bool) -> bool:
    """A complete run whose record this store has (its MLflow run, and its registration under this name)."""
    from pipeline.reporting import registered_name

    result = plan.record.result or {}
    if store is None:
        return True
    if not result.get("mlflow_run_id") or not run_exists(store, result["mlflow_run_id"]):
        return False  # tracked elsewhere or not at all before: recorded here from the checkpoints
    registration = result.get("registration")
    return not register or (registration is not None and registration["name"] == registered_name(cfg))


@dataclass
class _Trained:
    """What a runner hands back: the last epoch's metrics and the checkpoint that stands for the run."""

    metrics: dict[str, Any]
    checkpoint: str | None


def _conclude(
    cfg: ExperimentConfig, spec: DatasetSpec, plan: RunPlan, trained: _Trained, history: list[dict[str, Any]],
    run: TrackedRun | None, store: Store | None, register: bool,
) -> TrainingResult:  # fmt: skip
    """Test the run's checkpoint, report it to MLflow (and register it), and record the run as complete."""
    from pipeline.reporting import evaluate_checkpoint

    if trained.checkpoint is None:
        raise TrainingError("the training reported no checkpoint")
    checkpoint_metrics = evaluate_checkpoint(cfg, spec, trained.checkpoint)
    result = TrainingResult(
        cfg.name, plan.key, plan.folder, "trained" if plan.state == "new" else "resumed", int(trained.metrics["epoch"]),
        trained.metrics, trained.checkpoint, checkpoint_metrics, history,
    )  # fmt: skip
    if run is not None and store is not None:
        result.mlflow_run_id = run.run_id
        result.registration = _report(run, store, cfg, spec, trained.checkpoint, checkpoint_metrics, register)
    finish_run(plan, {k: v for k, v in result.summary().items() if k not in ("history", "outcome")})
    return result


def _report(
    run: TrackedRun, store: Store, cfg: ExperimentConfig, spec: DatasetSpec, checkpoint: str, metrics: dict[str, Any], register: bool
) -> dict[str, Any] | None:
    """Artifacts and registration at the end of a run; a tracking server that went away is said plainly."""
    from pipeline.reporting import report_run

    try:
        registration = report_run(run, cfg, spec, checkpoint, metrics, register=register)
    except Exception as err:
        try:
            check_store(store)
        except ConfigError:
            raise TrackingUnavailable(
                f"the MLflow server went away before the end of the run ({type(err).__name__}); the training finished and "
                f"its checkpoints are in {redact(checkpoint.rsplit('/', 1)[0])}: run the same command again when the server "
                "answers, and it logs what is missing and registers the model without training again"
            ) from err
        raise
    return registration.summary() if registration else None


class TrackingUnavailable(RuntimeError):
    """The MLflow server stopped answering during a run; the checkpoints are safe, a re-run completes it."""


def _open_tracked_run(store: Store, cfg: ExperimentConfig, spec: DatasetSpec, plan: RunPlan, parent_run_id: str | None) -> TrackedRun:
    in_process = runs_in_process(cfg, spec)
    tags = {
        "run_key": plan.key,
        "num_workers": str(cfg.scaling.num_workers),
        "runner": "in_process" if in_process else "ray",
        "device": "cuda" if uses_gpu(cfg, in_process) else "cpu",
        "loader": "stream" if streams(cfg, spec) else "memory",
    }
    return open_run(store, cfg, spec, run_dir=plan.folder, fresh=plan.state == "new", tags=tags, parent_run_id=parent_run_id)


@contextmanager
def recording(run: TrackedRun | None) -> Iterator[None]:
    """End the MLflow run with the outcome: FINISHED, FAILED, or KILLED on Ctrl-C and SIGTERM."""
    try:
        yield
    except KeyboardInterrupt:
        if run:
            _end_quietly(run, "KILLED")
        raise
    except BaseException:
        if run:
            _end_quietly(run, "FAILED")
        raise
    if run:
        end_run(run, "FINISHED")


def _end_quietly(run: TrackedRun, status: str) -> None:
    """Mark a failed run, unless the server is what failed: the original error is the one to see."""
    try:
        end_run(run, status)
    except Exception:  # noqa: BLE001, S110 - the run stays RUNNING; a re-run of the command finds and finishes it
        pass


def runs_in_process(cfg: ExperimentConfig, spec: DatasetSpec | None = None) -> bool:
    """Train in this process (no worker group): scaling.runner, or for auto one worker on this machine
    (unless the data streams (`spec` given): Ray Data shards are for Ray Train workers)."""
    if cfg.scaling.runner != "auto":
        return cfg.scaling.runner == "in_process"
    if spec is not None and streams(cfg, spec):
        return False
    one_local_worker = cfg.scaling.num_workers <= 1 and not on_cluster()
    return cfg.scaling.num_workers == 0 or (one_local_worker and cfg.train.max_failures == 0)


def streams(cfg: ExperimentConfig, spec: DatasetSpec) -> bool:
    """Whether batches stream through Ray Data: data.loader, or for auto a training file above the threshold."""
    if cfg.data.loader != "auto":
        return cfg.data.loader == "stream"
    return decoded_mb(spec) > cfg.data.stream_above_mb


def uses_gpu(cfg: ExperimentConfig, in_process: bool) -> bool:
    """GPUs when asked for, or (unset) when there are some: here in-process, or on the Ray cluster."""
    if in_process:
        return cfg.scaling.use_gpu is not False and torch.cuda.is_available()
    if cfg.scaling.use_gpu is not None:
        return cfg.scaling.use_gpu
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def ranking(cfg: ExperimentConfig, spec: DatasetSpec) -> tuple[str | None, str]:
    """The metric and order that rank a run's checkpoints: validation only; without it (None), recency."""
    return (cfg.metric, cfg.metric_mode) if has_validation(spec, cfg.data) else (None, "max")


def _run_in_process(cfg: ExperimentConfig, spec: DatasetSpec, plan: RunPlan, emit: EmitFn, run: TrackedRun | None) -> _Trained:
    device = torch.device("cuda" if uses_gpu(cfg, in_process=True) else "cpu")
    metric, mode = ranking(cfg, spec)
    session = LocalSession(Path(plan.folder), keep=cfg.train.checkpoints_to_keep, metric=metric, mode=mode, device=device)
    try:
        run_worker(cfg, spec, session, emit, EpochLogger(run, warner(emit)) if run else None)
    except Exception as err:  # as on Ray: the training's own error, named as the worker's
        raise TrainingError(f"worker 0: {type(err).__name__}: {err}") from err
    best = session.best_checkpoint()
    return _Trained(session.last_metrics or {}, str(best) if best else None)


def _run_on_ray(cfg: ExperimentConfig, spec: DatasetSpec, plan: RunPlan, emit: EmitFn, run: TrackedRun | None) -> _Trained:
    with event_pump(emit) as queue:
        trainer = build_trainer(cfg, spec, plan.folder, progress_queue=queue, tracking=run)
        result = run_interruptibly(trainer.fit, ResourceWatch(emit, cfg.scaling.resource_wait_s))
    metric, mode = ranking(cfg, spec)
    best = result.get_best_checkpoint(metric=metric, mode=mode) if metric and result.best_checkpoints else result.checkpoint
    metrics = {k: v for k, v in (result.metrics or {}).items() if not k.startswith("_")}
    return _Trained(metrics, _checkpoint_location(cfg, best.path) if best else None)


def _checkpoint_location(cfg: ExperimentConfig, path: str) -> str:
    """Ray gives object-store paths without their scheme; put it back so that the path can be opened."""
    scheme, sep, _ = cfg.storage_path.partition("://")
    return f"{scheme}://{path}" if sep and "://" not in path else path


def build_trainer(
    cfg: ExperimentConfig,
    spec: DatasetSpec,
    folder: str,
    *,
    progress_queue: Any = None,
    callbacks: list | None = None,
    tracking: TrackedRun | None = None,
):
    """The one TorchTrainer of the project: training and every Tune trial are built here.

    `folder`: the run's own folder (runs.RunPlan.folder), where Ray keeps its checkpoints and finds them
    again on resume. `tracking`: the MLflow run that rank 0 logs each epoch to (None: not tracked)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Ray Train's controller collects each report when it polls the workers, every 2 s by default, and a
    # worker's next report waits for that: epochs shorter than the interval would each last 2 s.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(CONTROLLER_POLL_INTERVAL_S))
    use_gpu = uses_gpu(cfg, in_process=False)
    streaming = streams(cfg, spec)
    metric, mode = ranking(cfg, spec)
    storage, _, name = folder.rpartition("/")
    return TorchTrainer(
        train_fn_per_worker,
        train_loop_config={
            "experiment": cfg.model_dump(mode="json"),
            "dataset": spec.to_json(),
            "progress_queue": progress_queue,
            "driver_cwd": os.getcwd(),
            "tracking": tracking.to_json() if tracking else None,
            "streaming": streaming,
        },
        datasets=streaming_datasets(spec, cfg.data, cfg.seed) if streaming else None,
        scaling_config=ScalingConfig(
            num_workers=cfg.scaling.num_workers,
            use_gpu=use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
            placement_strategy=cfg.scaling.placement_strategy,
        ),
        run_config=RunConfig(
            name=name,  # the run's key, no timestamp: the same run is how a re-run resumes
            storage_path=storage,
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            # Without validation (metric None), the newest checkpoints are kept and the last is the model.
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.checkpoints_to_keep, checkpoint_score_attribute=metric, checkpoint_score_order=mode
            ),
            callbacks=callbacks or [],
        ),
    )


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the trained model from a checkpoint folder alone: no training code or config file needed."""
    state = load_state(Path(path))
    cfg = ExperimentConfig.model_validate(state["experiment"])
    spec = DatasetSpec.from_json(state["dataset"])
    model = model_for(cfg, spec)
    model.load_state_dict(state["model"])
    return model.eval(), state


class TrainingError(RuntimeError):
    """Training failed in this process (in-process runs); the message names the error."""


def training_failure(err: BaseException) -> str | None:
    """A one-line account of a failed training (the worker's own error), or None if it is not one."""
    if isinstance(err, (TrainingError, TrackingUnavailable, ResourceWaitTimeout)):
        return str(err)
    from ray.train import TrainingFailedError

    if not isinstance(err, TrainingFailedError):
        return None
    causes = getattr(err, "worker_failures", None) or {}
    if causes:
        rank, cause = sorted(causes.items())[0]
        return f"worker {rank}: {type(cause).__name__}: {cause}"
    return str(err).strip().splitlines()[0]
