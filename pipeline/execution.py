"""Where a run executes: one plan decided once per run, and the runners that carry it out.

    execution = plan_execution(cfg, spec)    # in-process or Ray workers, streaming or in memory, GPU or not
    trained = execute(cfg, spec, folder, execution, emit, tracked_run)

In process, the worker loop (loop.run_worker) runs here with a LocalSession: no Ray, no ~10 s worker-group
start. On Ray, `build_trainer` is the one place that builds a TorchTrainer (training and every Tune trial
on workers), and `train_fn_per_worker` is what each of its workers runs. The local Ray itself, progress
events from the workers and interrupts are runtime.py's.
"""

from __future__ import annotations

import os
import sys
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch

from pipeline.checkpoints import LocalSession, RaySession
from pipeline.config import ExperimentConfig
from pipeline.data.store import DatasetSpec, decoded_mb, streaming_datasets
from pipeline.errors import RunFailed
from pipeline.loop import EmitFn, ranking, run_worker, warner
from pipeline.runtime import Needs, ResourceWatch, check_fits, ensure_ray, event_pump, on_cluster, run_interruptibly, sent_in_background
from pipeline.system_metrics import monitoring, node_name
from pipeline.tracking import EpochLogger, TrackedRun

__all__ = [
    "Execution",
    "Trained",
    "TrainingError",
    "build_trainer",
    "checkpoint_location",
    "execute",
    "execution_for",
    "plan_execution",
    "runs_in_process",
    "stream_threshold_mb",
    "streams",
    "train_fn_per_worker",
    "training_needs",
    "trials_in_process",
]

CONTROLLER_POLL_INTERVAL_S = 0.2  # how often Ray Train's controller collects reports


class TrainingError(RunFailed):
    """Training failed on a worker (in this process or on Ray); the message is the worker's own error."""


@dataclass(frozen=True)
class Execution:
    """Where a run executes, decided once (plan_execution) and passed down to every part that needs it."""

    in_process: bool  # the loop in this process (or a Tune trial's actor), else a Ray Train worker group
    workers: int  # scaling.num_workers
    streaming: bool  # batches stream from Ray Data shards, else each worker holds its split in memory
    use_gpu: bool

    def tags(self) -> dict[str, str]:
        """The plan as MLflow tags of the run."""
        return {
            "runner": "in_process" if self.in_process else "ray",
            "num_workers": str(self.workers),
            "device": "cuda" if self.use_gpu else "cpu",
            "loader": "stream" if self.streaming else "memory",
        }

    def describe(self) -> str:
        """One line for --verbose: `executes on 2 Ray Train workers, cpu, data in memory`."""
        where = "in this process" if self.in_process else f"on {self.workers} Ray Train worker{'s' if self.workers != 1 else ''}"
        data = "data streamed by Ray Data" if self.streaming else "data in memory"
        return f"executes {where}, {'cuda' if self.use_gpu else 'cpu'}, {data}"


def plan_execution(cfg: ExperimentConfig, spec: DatasetSpec, *, verbose: bool = False) -> Execution:
    """Decide where the run executes; for Ray workers, start (or join) Ray and refuse a run it cannot hold."""
    in_process = runs_in_process(cfg, spec)
    if not in_process:
        ensure_ray(verbose)  # only now: bad input has been refused without the cost of starting Ray
    execution = execution_for(cfg, spec, in_process)
    if not in_process:
        check_fits(training_needs(cfg, execution), "lower scaling.num_workers or scaling.cpus_per_worker")
    return execution


def execution_for(cfg: ExperimentConfig, spec: DatasetSpec, in_process: bool) -> Execution:
    """The plan for a chosen runner (a search chooses its trials' own): streaming and GPU follow from it."""
    return Execution(in_process, cfg.scaling.num_workers, streams(cfg, spec), uses_gpu(cfg, in_process))


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
    return decoded_mb(spec) > stream_threshold_mb(cfg)


# bench.scale (docs/BENCHMARKS.md): an in-memory worker's peak RSS grows by about this many times the
# decoded training file (each worker holds the whole file: the arrays, their tensor copy, Arrow's
# scratch); a streaming worker's stays flat. 2.08x to 2.10x at 16x and 2.01x to 2.12x at 4x in four runs on
# 2026-12-05 (2.45x before the store's FORMAT 3, whose footer understated the decoded size of a list column
# by about 1.3x).
IN_MEMORY_GROWTH = 2.1
MEMORY_SHARE = 0.5  # of a machine's memory, what the workers' copies of the data may take; the rest is theirs and the OS's


def stream_threshold_mb(cfg: ExperimentConfig) -> float:
    """data.stream_above_mb, or unset: the largest training file whose in-memory copies, one per worker, all
    on one machine as PACK places them, fit in MEMORY_SHARE of this machine's memory (the driver's: on a
    cluster whose workers have less, set data.stream_above_mb)."""
    if cfg.data.stream_above_mb is not None:
        return cfg.data.stream_above_mb
    import psutil

    memory_mb = psutil.virtual_memory().total / 2**20
    return MEMORY_SHARE * memory_mb / (IN_MEMORY_GROWTH * max(cfg.scaling.num_workers, 1))


def uses_gpu(cfg: ExperimentConfig, in_process: bool) -> bool:
    """GPUs when asked for, or (unset) when there are some: here in-process, or on the Ray cluster."""
    if in_process:
        return cfg.scaling.use_gpu is not False and torch.cuda.is_available()
    if cfg.scaling.use_gpu is not None:
        return cfg.scaling.use_gpu
    import ray

    return ray.cluster_resources().get("GPU", 0) > 0


def training_needs(cfg: ExperimentConfig, execution: Execution) -> Needs:
    """What a run on Ray Train workers takes: each worker's CPUs (and GPU), and a CPU for Ray Data's readers."""
    workers, cpus = cfg.scaling.min_workers or cfg.scaling.num_workers, cfg.scaling.cpus_per_worker  # elastic: the least it runs on
    gpus = workers if execution.use_gpu else 0
    reader = 1 if execution.streaming else 0
    what = f"{workers} workers x {cpus} CPU{'s' if cpus > 1 else ''}" + (" + 1 CPU for Ray Data's readers" if reader else "")
    return Needs(workers * cpus + reader, gpus, what + (f", {gpus} GPUs" if gpus else ""))


# ---------------------------------------------------------------------------------------------------
# The runners


@dataclass
class Trained:
    """What a runner hands back: the last epoch's metrics and the checkpoint that stands for the run."""

    metrics: dict[str, Any]
    checkpoint: str | None


def execute(cfg: ExperimentConfig, spec: DatasetSpec, folder: str, execution: Execution, emit: EmitFn, run: TrackedRun | None) -> Trained:
    """Train the run in `folder` (runs.RunPlan.folder) as planned; `run`: the MLflow run that rank 0 logs to."""
    if execution.in_process:
        return _run_in_process(cfg, spec, folder, execution, emit, run)
    return _run_on_ray(cfg, spec, folder, execution, emit, run)


def _run_in_process(
    cfg: ExperimentConfig, spec: DatasetSpec, folder: str, execution: Execution, emit: EmitFn, run: TrackedRun | None
) -> Trained:
    device = torch.device("cuda" if execution.use_gpu else "cpu")
    metric, mode = ranking(cfg, spec)
    session = LocalSession(folder, keep=cfg.train.checkpoints_to_keep, metric=metric, mode=mode, device=device)
    try:
        with monitoring(run, cfg.tracking):
            run_worker(cfg, spec, session, emit, EpochLogger(run, warner(emit)) if run else None)
    except Exception as err:  # as on Ray: the training's own error, named as the worker's
        raise TrainingError(f"worker 0: {type(err).__name__}: {err}") from err
    return Trained(session.last_metrics or {}, session.best_location())


def _run_on_ray(
    cfg: ExperimentConfig, spec: DatasetSpec, folder: str, execution: Execution, emit: EmitFn, run: TrackedRun | None
) -> Trained:
    from ray.train import TrainingFailedError

    with event_pump(emit) as queue:
        trainer = build_trainer(cfg, spec, folder, execution, progress_queue=queue, tracking=run, system_metrics=True)
        try:
            result = run_interruptibly(trainer.fit, ResourceWatch(emit, cfg.scaling.resource_wait_s))
        except TrainingFailedError as err:
            raise TrainingError(_worker_failure(err)) from err
    metric, mode = ranking(cfg, spec)
    best = result.get_best_checkpoint(metric=metric, mode=mode) if metric and result.best_checkpoints else result.checkpoint
    metrics = {k: v for k, v in (result.metrics or {}).items() if not k.startswith("_")}
    return Trained(metrics, checkpoint_location(cfg, best.path) if best else None)


def _worker_failure(err: Exception) -> str:
    """The first failed worker's own error on one line, without Ray's stack."""
    causes = getattr(err, "worker_failures", None) or {}
    if causes:
        rank, cause = sorted(causes.items())[0]
        return f"worker {rank}: {type(cause).__name__}: {cause}"
    return str(err).strip().splitlines()[0]


def checkpoint_location(cfg: ExperimentConfig, path: str) -> str:
    """Ray gives object-store paths without their scheme; put it back so that the path can be opened."""
    scheme, sep, _ = cfg.storage_path.partition("://")
    return f"{scheme}://{path}" if sep and "://" not in path else path


def build_trainer(
    cfg: ExperimentConfig,
    spec: DatasetSpec,
    folder: str,
    execution: Execution,
    *,
    progress_queue: Any = None,
    callbacks: list | None = None,
    tracking: TrackedRun | None = None,
    system_metrics: bool = False,
    start_from: str | None = None,
) -> Any:
    """The one TorchTrainer of the project: training and every Tune trial on workers are built here.

    `folder`: the run's own folder (runs.RunPlan.folder), where Ray keeps its checkpoints and finds them
    again on resume. `tracking`: the MLflow run that rank 0 logs each epoch to (None: not tracked), and,
    with `system_metrics`, each node's local rank 0 its node's figures (system_metrics.py). `start_from`: a
    checkpoint folder that a run without checkpoints of its own starts from (a PBT chunk: trial.train_in_chunks)."""
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    # Ray Train's controller collects each report when it polls the workers, every 2 s by default, and a
    # worker's next report waits for that: epochs shorter than the interval would each last 2 s.
    os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", str(CONTROLLER_POLL_INTERVAL_S))
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
            "system_metrics": system_metrics,
            "streaming": execution.streaming,
            "start_from": start_from,
        },
        datasets=streaming_datasets(spec, cfg.data, cfg.seed) if execution.streaming else None,
        scaling_config=ScalingConfig(
            num_workers=_group_size(cfg),
            use_gpu=execution.use_gpu,
            resources_per_worker={"CPU": cfg.scaling.cpus_per_worker, **({"GPU": 1} if execution.use_gpu else {})},
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


def _group_size(cfg: ExperimentConfig) -> Any:
    """A worker count, or (min, max) for an elastic group: Ray Train V2 takes both (its type hints are V1's)."""
    return (cfg.scaling.min_workers, cfg.scaling.num_workers) if cfg.scaling.min_workers else cfg.scaling.num_workers


def train_fn_per_worker(config: dict[str, Any]) -> None:
    """Ray Train's entry point on every worker."""
    # A user's model module (model.name=pkg.mod:Class) resolves as it does where `pipeline` was started.
    if config["driver_cwd"] not in sys.path:
        sys.path.insert(0, config["driver_cwd"])
    session = RaySession(config.get("start_from"))
    queue = config.get("progress_queue")
    cfg = ExperimentConfig.model_validate(config["experiment"])
    run = config.get("tracking")
    with sent_in_background(queue.put_nowait if queue is not None and session.rank == 0 else None) as emit, _node_monitor(config, session):
        log_epoch = EpochLogger(TrackedRun.from_json(run), warner(emit)) if run and session.rank == 0 else None  # only rank 0 logs
        run_worker(cfg, DatasetSpec.from_json(config["dataset"]), session, emit, log_epoch, streaming=config.get("streaming", False))


def _node_monitor(config: dict[str, Any], session: RaySession) -> AbstractContextManager[None]:
    """This node's system metrics, logged by one worker per node (its local rank 0)."""
    import ray.train

    context = ray.train.get_context()
    if not config.get("system_metrics") or not config.get("tracking") or context.get_local_rank() != 0:
        return nullcontext()
    cfg = ExperimentConfig.model_validate(config["experiment"]).tracking
    node = node_name(context.get_node_rank(), session.world_size, context.get_local_world_size())
    return monitoring(TrackedRun.from_json(config["tracking"]), cfg, node)


def trials_in_process(cfg: ExperimentConfig, spec: DatasetSpec) -> bool:
    """Whether a search's trials train in their own Tune actor (no worker group): tune.trial_runner, or for
    auto one worker, data in memory, on one node (checks.check_search refused the impossible choices)."""
    if cfg.tune.trial_runner != "auto":
        return cfg.tune.trial_runner == "in_process"
    if cfg.scaling.num_workers > 1 or streams(cfg, spec):  # Ray Data shards are for Ray Train workers
        return False
    if not on_cluster():
        return True  # a local Ray is one node
    import ray

    return len([node for node in ray.nodes() if node["Alive"]]) == 1
