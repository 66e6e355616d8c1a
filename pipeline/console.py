"""What a person sees in the terminal: a live progress bar per epoch and a line of metrics after each.

Everything goes to stderr, so that stdout carries only the result (`--output json` prints one JSON
object as its last line). Without a terminal (CI, logs) the bar is replaced by plain epoch lines.
"""

from __future__ import annotations

import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TaskID, TextColumn, TimeElapsedColumn, TimeRemainingColumn
from rich.table import Table

__all__ = ["ScoringDisplay", "TrainingDisplay", "TrialTable", "format_metrics", "print_models", "print_runs", "print_search",
           "print_summary"]  # fmt: skip


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
        self.task: TaskID | None = None  # the epoch's bar, from its first batch to its end

    def __enter__(self) -> TrainingDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, event: dict[str, Any]) -> None:
        if event["event"] == "batch":
            self._on_batch(event)
        elif event["event"] in NOTICES:
            print_notice(self.progress.console, event)
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


class ScoringDisplay:
    """Batch inference's progress (scoring.py's events): rows scored of the total, rows per second, time left.
    Without a terminal (a cluster job's log), a line every LINE_EVERY_S seconds instead of the bar."""

    LINE_EVERY_S = 10.0

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.progress = Progress(
            TextColumn("[bold]scoring"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("rows  {task.fields[rate]:,.0f} rows/s"),
            TimeElapsedColumn(),
            TimeRemainingColumn(),
            console=self.console,
            transient=True,
            disable=not self.console.is_terminal,
        )
        self.task: TaskID | None = None
        self.done, self.total, self.started, self.said = 0, 0, 0.0, 0.0

    def __enter__(self) -> ScoringDisplay:
        self.progress.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.progress.stop()

    def __call__(self, event: dict[str, Any]) -> None:
        now = time.monotonic()
        if event["event"] == "start":
            self.total, self.started, self.said = event["rows"], now, now
            self.console.print(event["message"], soft_wrap=True)
            self.task = self.progress.add_task("score", total=self.total, rate=0.0)
        elif event["event"] == "rows" and self.task is not None:
            self.done += event["rows"]
            rate = self.done / max(now - self.started, 1e-9)
            self.progress.update(self.task, completed=self.done, rate=rate)
            if not self.console.is_terminal and (now - self.said >= self.LINE_EVERY_S or self.done == self.total):
                self.console.print(f"scored {self.done:,} of {self.total:,} rows, {rate:,.0f} rows/s", soft_wrap=True)
                self.said = now
        elif event["event"] in NOTICES:
            print_notice(self.progress.console, event)


# Events that are a line of text: what happens to the run (info), a problem (warning), a wait (waiting).
NOTICES = {"info": "", "warning": "warning: ", "waiting": ""}
NOTICE_STYLES = {"info": "bold", "warning": "yellow", "waiting": "cyan"}


def print_notice(console: Console, event: dict[str, Any], prefix: str = "") -> None:
    console.print(f"{prefix}{NOTICES[event['event']]}{event['message']}", style=NOTICE_STYLES[event["event"]], soft_wrap=True)


def print_summary(summary: dict[str, Any], console: Console | None = None) -> None:
    """The run: which one and what this command did, its last epoch, its model (checkpoint, test), registration."""
    console = console or Console()
    table = Table(title=f"run {summary['run_name']} ({summary['run_key']}): {summary['outcome']}", show_header=False)
    for key, value in summary["metrics"].items():
        table.add_row(f"last epoch: {key}" if key != "epoch" else "last epoch", _cell(value))
    model = summary.get("checkpoint_metrics") or {}
    table.add_row("model", f"{summary['checkpoint']} (epoch {model.get('epoch', '?')})")
    for key, value in model.items():
        if key.startswith(("val_", "test_")):
            table.add_row(f"model: {key}", _cell(value))
    if summary.get("mlflow_run_id"):
        table.add_row("mlflow run", summary["mlflow_run_id"])
    if registration := summary.get("registration"):
        table.add_row(
            "registered", f"{registration['name']} version {registration['version']} @{registration['alias']}: {registration['reason']}"
        )
    console.print(table)


class TrialTable:
    """A live table of a search's trials: id, hyperparameters, epochs done, last and best metric."""

    def __init__(self, metric: str, mode: str, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.metric, self.mode = metric, mode
        self.rows: dict[str, dict[str, Any]] = {}
        self.live = Live(self._table(), console=self.console, refresh_per_second=4, transient=False)

    def __enter__(self) -> TrialTable:
        if self.console.is_terminal:
            self.live.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.console.is_terminal:
            self.live.stop()

    def __call__(self, event: dict[str, Any]) -> None:
        if event["event"] in NOTICES:
            print_notice(self.console, event, prefix=f"trial {event['trial']}: " if "trial" in event else "")
            return
        row = self.rows.setdefault(event["trial"], {"params": {}, "epoch": 0, "last": None, "best": None})
        if event["event"] == "trial_start":
            row["params"] = event["params"]
        elif event["event"] == "epoch":
            value = event["metrics"].get(self.metric)  # None for a run without validation (the retrained best)
            row["epoch"], row["last"] = event["metrics"]["epoch"], value
            better = row["best"] is None or (value is not None and (value > row["best"] if self.mode == "max" else value < row["best"]))
            row["best"] = value if better else row["best"]
            if not self.console.is_terminal:
                self.console.print(f"trial {event['trial']} epoch {row['epoch']}  {format_metrics(event['metrics'])}", soft_wrap=True)
        if self.console.is_terminal:
            self.live.update(self._table())

    def _table(self) -> Table:
        keys = sorted({k for row in self.rows.values() for k in row["params"]})
        table = Table(title=f"trials ({self.metric}, {self.mode})")
        for column in ("trial", *keys, "epoch", f"last {self.metric}", "best"):
            table.add_column(column)
        for trial, row in self.rows.items():
            cells = [_cell(row["params"].get(k)) for k in keys]
            table.add_row(trial, *cells, str(row["epoch"]), _cell(row["last"]), _cell(row["best"]))
        return table


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.0f}" if value >= 1e5 else f"{value:.4g}"
    return str(value)


def print_search(summary: dict[str, Any], console: Console | None = None) -> None:
    """The finished search: every trial with its outcome, the best first."""
    console = console or Console()
    trials = sorted(
        summary["trials"], key=lambda t: (t["best"] is None, -(t["best"] or 0) if summary["mode"] == "max" else (t["best"] or 0))
    )
    keys = sorted({k for t in trials for k in t["params"]})
    table = Table(
        title=f"search {summary['name']}: best {summary['metric']} {_cell(summary['best_value'])} (trial {summary['best_trial']})"
    )
    for column in ("trial", "status", *keys, "epochs", f"best {summary['metric']}"):
        table.add_column(column)
    for t in trials:
        table.add_row(t["trial_id"], t["status"], *[_cell(t["params"].get(k)) for k in keys], str(t["epochs"]), _cell(t["best"]))
    console.print(table)
    if registration := summary.get("registration"):
        console.print(f"registered {registration['name']} version {registration['version']} @{registration['alias']}")


def print_runs(rows: list[dict[str, Any]], console: Console | None = None) -> None:
    """`pipeline runs`: one row per run, newest first, with the hyperparameters that differ between them."""
    console = console or Console()
    keys = sorted({k for row in rows for k in row["params"]})
    table = Table(title=f"{len(rows)} run{'s' if len(rows) != 1 else ''}, newest first")
    for column in ("run", "experiment", "status", "epochs", "metric", "value", "test", *keys, "started"):
        table.add_column(column)
    for row in rows:
        cells = [row["run_id"][:8], row["experiment"], row["status"], _cell(row["epochs"]), _cell(row["metric"])]
        cells += [
            _cell(row["value"]),
            _cell(row["test_value"]),
            *[_cell(row["params"].get(k)) for k in keys],
            row["started"][:16].replace("T", " "),
        ]
        table.add_row(*cells)
    console.print(table)


def print_models(rows: list[dict[str, Any]], console: Console | None = None) -> None:
    """`pipeline models`: one row per registered version, with its aliases, its measure and why it got them."""
    console = console or Console()
    table = Table(title=f"{len(rows)} registered version{'s' if len(rows) != 1 else ''}")
    for column in ("model", "version", "aliases", "metric", "split", "value", "decision: why", "run"):
        table.add_column(column)
    for row in rows:
        why = f"{row['decision']}: {row['reason']}" if row["decision"] else "-"
        table.add_row(row["model"], str(row["version"]), ", ".join(f"@{a}" for a in row["aliases"]) or "-", _cell(row["metric"]),
                      _cell(row["split"]), _cell(row["value"]), why, (row["run_id"] or "-")[:8])  # fmt: skip
    console.print(table)
