"""CPU, memory, disk, network and GPU figures of the machines a run trains on, logged to its MLflow run.

    with monitoring(run, cfg.tracking):                  # in process: this machine
    with monitoring(run, cfg.tracking, node="node_1"):   # on Ray: one monitor per node, on its local rank 0

MLflow's own monitor (psutil; nvidia-ml-py for NVIDIA GPUs) samples every
`tracking.system_metrics_interval_s` seconds in a thread and logs `system/...` metrics (with several
nodes `system/node_N/...`), which the UI's System metrics tab draws. A resumed run continues their steps.
Training runs only: trials share their nodes, several at a time, and would log the same figures N times.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from pipeline.config import TrackingConfig
from pipeline.tracking import TrackedRun

__all__ = ["monitoring", "node_name"]


@contextmanager
def monitoring(run: TrackedRun | None, cfg: TrackingConfig, node: str | None = None) -> Iterator[None]:
    """System metrics logged to `run` while the block runs (nothing when untracked or turned off)."""
    if run is None or not cfg.system_metrics:
        yield
        return
    from mlflow.system_metrics.system_metrics_monitor import SystemMetricsMonitor

    monitor = SystemMetricsMonitor(
        run.run_id, sampling_interval=cfg.system_metrics_interval_s, resume_logging=True, node_id=node, tracking_uri=run.uri
    )
    monitor.start()
    try:
        yield
    finally:
        monitor.finish()  # the last samples are logged before the run is ended


def node_name(node_rank: int, world_size: int, local_world_size: int) -> str | None:
    """The node's name in metric keys where the run spans several nodes; on one node, none (plain `system/...`)."""
    return f"node_{node_rank}" if local_world_size < world_size else None
