"""What a person sees in the terminal: a live progress bar per epoch and a line of metrics after each.

Everything goes to stderr, so that stdout carries only the result (`--output json` prints one JSON
object as its last line). Without a terminal (CI, logs) the bar is replaced by plain epoch lines.
"""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

__all__ = ["TrainingDisplay", "format_metrics", "print_summary"]


def format_metrics(metrics: dict[str, Any]) -> str:
    parts = []
    for key, value in metrics.items():
        if key == "epoch":
            continue
        parts.append(f"{key}={value:,.0f}" if key == "samples_per_sec" else f"{key}={value:.4g}")
    return "  ".join(parts)


class TrainingDisplay:
    """Consumes the training events (`batch`, `epoch`) and draws them; use as a context manager."""

    def __init__(self, epochs: int, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.epochs = epochs
        self.progress = Progress(
            TextColumn("[bold]epoch {task.fields[epoch]}/{task.fields[epochs]}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]:.4f}"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
            disable=not self.console.is_terminal,
        )
        self.task = None

    def __enter__(self) -> TrainingDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, event: dict[str, Any]) -> None:
        if event["event"] == "batch":
            self._on_batch(event)
        elif event["event"] == "epoch":
            metrics = event["metrics"]
            self.progress.console.print(f"epoch {metrics['epoch']}/{self.epochs}  {format_metrics(metrics)}", soft_wrap=True)
            if self.task is not None:
                self.progress.remove_task(self.task)
                self.task = None

    def _on_batch(self, event: dict[str, Any]) -> None:
        fields = {"epoch": event["epoch"], "epochs": self.epochs, "loss": event["loss"]}
        if self.task is None:
            self.task = self.progress.add_task("train", total=event["steps"], **fields)
        self.progress.update(self.task, completed=event["step"], **fields)


def print_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    console = console or Console()
    table = Table(title=f"run {summary['run_name']}", show_header=False)
    for key, value in summary["metrics"].items():
        table.add_row(key, f"{value:.6g}" if isinstance(value, float) else str(value))
    table.add_row("best checkpoint", str(summary["checkpoint"]))
    if summary.get("mlflow_run_id"):
        table.add_row("mlflow run", summary["mlflow_run_id"])
    if registration := summary.get("registration"):
        table.add_row("registered", f"{registration['name']} version {registration['version']} @{registration['alias']}")
    console.print(table)
