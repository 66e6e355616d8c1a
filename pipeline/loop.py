"""What every worker does: plain PyTorch, readable top to bottom, with neither Ray nor MLflow imported.

    run_worker(cfg, spec, LocalSession(folder, ...))    # in this process, as `scaling.num_workers=0` runs
    run_worker(cfg, spec, RaySession(), emit, log)      # on each Ray Train worker (execution.py)

`run_worker` restores the latest checkpoint, then runs `train_epoch` and `evaluate` (validation only) once
per epoch and hands each epoch's metrics and checkpoint state to its `Session` (checkpoints.py): the seam
that makes the same loop run in-process, on Ray Train workers, in a Tune trial, and in benchmarks.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel

from pipeline.batches import InMemory, Pair, Streamed
from pipeline.checkpoints import CheckpointError, Session, load_state
from pipeline.config import ExperimentConfig, OptimConfig
from pipeline.data.store import DatasetSpec, has_validation
from pipeline.data.transforms import augment, normalizer
from pipeline.errors import RunFailed
from pipeline.models import model_for

__all__ = [
    "LOSSES",
    "CompileError",
    "DivergedError",
    "OneProcess",
    "Preprocess",
    "evaluate",
    "load_checkpoint",
    "make_optimizer",
    "memory_format",
    "plain_module",
    "preprocessor",
    "ranking",
    "restore_optimizer",
    "run_worker",
    "train_epoch",
    "validation_metrics",
    "warner",
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


class DivergedError(RunFailed):
    """The training loss became NaN or infinite: the run stops, and nothing of it is registered."""


class CompileError(RunFailed):
    """torch.compile could not compile the model (train.compile=true): no C++ compiler, no Triton, ..."""


def make_optimizer(cfg: OptimConfig, params: Iterator[nn.Parameter], *, fused: bool = False) -> torch.optim.Optimizer:
    """The config's optimizer over the trainable parameters; `fused`: torch's one-kernel step where the
    optimizer has one (all but rmsprop), else torch's default implementation."""
    trainable = [p for p in params if p.requires_grad]  # a frozen backbone is not optimized
    lr, decay = cfg.lr, cfg.weight_decay
    if cfg.name == "rmsprop":
        return torch.optim.RMSprop(trainable, lr=lr, momentum=cfg.momentum, weight_decay=decay)
    implementation = {"fused": True} if fused else {}
    if cfg.name == "sgd":
        return torch.optim.SGD(trainable, lr=lr, momentum=cfg.momentum, weight_decay=decay, **implementation)
    optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW, "adagrad": torch.optim.Adagrad}
    return optimizers[cfg.name](trainable, lr=lr, weight_decay=decay, **implementation)


def restore_optimizer(optimizer: torch.optim.Optimizer, saved: dict[str, Any], cfg: OptimConfig) -> None:
    """A checkpoint's optimizer state, kept in this run's implementation (fused or not: load_state_dict would
    bring back the saved one's, and with it where its step counts live) and with the config's values."""
    implementation = {k: v for k, v in optimizer.param_groups[0].items() if k in ("fused", "foreach")}
    optimizer.load_state_dict({**saved, "param_groups": [{**g, **implementation} for g in saved["param_groups"]]})
    apply_optim_values(optimizer, cfg)


def apply_optim_values(optimizer: torch.optim.Optimizer, cfg: OptimConfig) -> None:
    """The config's learning rate, weight decay and momentum over those a restored optimizer state carries. A
    resumed run's are the same (they name the run); a PBT trial restored from another trial's state would
    otherwise train on with that trial's values, not its own perturbed ones."""
    for group in optimizer.param_groups:
        group["lr"], group["weight_decay"] = cfg.lr, cfg.weight_decay
        if "momentum" in group:
            group["momentum"] = cfg.momentum


def validation_metrics(cfg: ExperimentConfig) -> tuple[str, str]:
    """What may rank checkpoints and trials: the validation split's figures, never the test split's."""
    return "val_loss", f"val_{'accuracy' if cfg.is_classifier else 'mse'}"


def ranking(cfg: ExperimentConfig, spec: DatasetSpec) -> tuple[str | None, Literal["min", "max"]]:
    """The metric and order that rank a run's checkpoints: validation only; without it (None), recency."""
    return (cfg.metric, cfg.metric_mode) if has_validation(spec, cfg.data) else (None, "max")


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
    `streaming`: batches from this worker's Ray Data shards (batches.Streamed), else the in-memory fast path.
    """
    torch.manual_seed(cfg.seed)  # the same initial weights on every rank
    device = session.device
    data = Streamed(cfg, spec, session) if streaming else InMemory(cfg, spec, session)
    # Two calls: torch's stubs have no Module.to(device, memory_format=...), though it works.
    model = model_for(cfg, spec).to(device).to(memory_format=memory_format(cfg, spec))
    optimizer = make_optimizer(cfg.optim, model.parameters(), fused=cfg.optim.fused)
    start_epoch, history = 1, []  # history: every epoch's metrics so far, carried in each checkpoint
    state = session.restore()
    for message in session.skipped:
        warner(emit)(message)
    if state is None and session.skipped:  # starting over would log a new model's epochs over the old ones'
        raise CheckpointError("every checkpoint of this run is damaged; run the command with --fresh to train it from scratch")
    if state is not None:
        model.load_state_dict(state["model"])
        restore_optimizer(optimizer, state["optimizer"], cfg.optim)
        start_epoch = state["epoch"] + 1
        history = [m for m in state.get("history", []) if m["epoch"] <= state["epoch"]]
        if start_epoch > cfg.train.epochs:  # already finished: log what the tracking lacks, report once more
            if log_epoch:
                log_epoch(history or [state["metrics"]])
            session.report(state["metrics"], None)
            return
    with compile_errors(cfg.train.compile):  # torch.compile compiles at the first steps, not when called
        # Compiled with the checkpoint's weights in, before DDP wraps it; checkpoints keep plain keys (plain_module).
        model = session.wrap(compiled(model, cfg.train.compile_mode) if cfg.train.compile else model)
        loss_fn = LOSSES[cfg.loss]()
        prep = preprocessor(cfg, spec, device)
        for epoch in range(start_epoch, cfg.train.epochs + 1):
            steps, batches = data.train_batches(epoch)
            # workers: the group's size this epoch, which an elastic group changes when nodes come and go.
            metrics = {"epoch": epoch, "workers": session.world_size,
                       **train_epoch(model, steps, batches, loss_fn, optimizer, prep, cfg, session, epoch, emit)}  # fmt: skip
            if "val" in data.splits:  # the test split is never seen here: it is for the chosen checkpoint alone
                metrics.update(evaluate(model, data.eval_batches("val"), loss_fn, prep.eval, cfg, session, prefix="val"))
            history.append(metrics)
            state = checkpoint_state(model, optimizer, history, cfg, spec) if session.rank == 0 else None
            if log_epoch:
                log_epoch(history)
            if emit:  # before the report: a Tune scheduler may stop the trial as soon as it has the result
                emit({"event": "epoch", "metrics": metrics})
            session.report(metrics, state)


COMPILE_FIX = "set train.compile=false to train without it"


def compiled(model: nn.Module, mode: str = "default") -> nn.Module:
    """torch.compile's module around `model`, with the same parameters; it compiles at the first steps.
    mode="reduce-overhead" replays the compiled forward and backward as CUDA graphs (on a GPU): the loop
    reads each step's loss before the next step, as graph outputs are overwritten by the next replay."""
    try:
        return cast(nn.Module, torch.compile(model, mode=mode))
    except RuntimeError as err:  # a Python that torch.compile does not support (3.15+, ...)
        raise CompileError(f"train.compile=true: {err}; {COMPILE_FIX}") from err


@contextmanager
def compile_errors(compiling: bool) -> Iterator[None]:
    """A failure of torch.compile (train.compile) as one line naming its cause and the fix, not inductor's
    pages of traceback. Without compile, torch._dynamo (seconds to import) is not imported at all."""
    if not compiling:
        yield
        return
    import torch._dynamo.exc

    try:
        yield
    except torch._dynamo.exc.TorchDynamoException as err:
        inner = getattr(err, "inner_exception", err)  # the backend's own error (InvalidCxxCompiler, ...)
        cause = next((line.strip() for line in str(inner).splitlines() if line.strip()), "")[:300]
        raise CompileError(
            f"train.compile=true: torch.compile could not compile the model: {type(inner).__name__}: {cause}; {COMPILE_FIX}"
        ) from err


def plain_module(model: nn.Module) -> nn.Module:
    """The network itself, under DDP's wrapper and torch.compile's: its state_dict has the plain keys (no
    `module.` or `_orig_mod.` prefix), which every checkpoint holds, compiled or not."""
    net = model.module if isinstance(model, DistributedDataParallel) else model
    return getattr(net, "_orig_mod", net)  # torch.compile's OptimizedModule, without importing torch._dynamo


@dataclass
class Preprocess:
    train: Callable[[torch.Tensor], torch.Tensor]
    eval: Callable[[torch.Tensor], torch.Tensor]


def preprocessor(cfg: ExperimentConfig, spec: DatasetSpec, device: torch.device) -> Preprocess:
    """Normalize on the device; augment training batches only; batches in the model's memory format."""
    normalize, layout = normalizer(spec, cfg.data.normalize, device), memory_format(cfg, spec)
    # .contiguous() returns the batch itself when it already has the layout (always, for NCHW).
    return Preprocess(
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
    prep: Preprocess,
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
    # forward could otherwise wait on a buffer broadcast that the other ranks never join. Under
    # train.compile, the compiled module: evaluation is compiled too (once, at the first epoch's end).
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


def checkpoint_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, history: list[dict], cfg: ExperimentConfig, spec: DatasetSpec
) -> dict[str, Any]:
    """What a checkpoint holds: weights, optimizer, every epoch's metrics, and what rebuilds the model."""
    net = plain_module(model)  # never the DDP or torch.compile wrapper: plain keys
    return {
        "epoch": history[-1]["epoch"],
        "model": net.state_dict(),
        "optimizer": optimizer.state_dict(),
        "metrics": history[-1],
        "history": list(history),  # every epoch's metrics: what the MLflow run lacks is logged from it
        "experiment": cfg.model_dump(mode="json"),  # with the dataset spec: enough to rebuild the model
        "dataset": spec.to_json(),
    }


def load_checkpoint(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the trained model from a checkpoint folder alone: no training code or config file needed."""
    state = load_state(Path(path))
    cfg = ExperimentConfig.model_validate(state["experiment"])
    spec = DatasetSpec.from_json(state["dataset"])
    model = model_for(cfg, spec)
    model.load_state_dict(state["model"])
    return model.eval(), state
