"""What the tracking store holds, read only: `pipeline runs` and `pipeline models` answer from here.

    rows = run_rows(store, "mnist_mlp")       # one dict per run: status, epochs, its metric, what differs
    rows = model_rows(store, "mnist_mlp")     # one dict per registered version: aliases, metric, decision

Nothing here writes: a SQLite store that does not exist yet is not created (MLflow would create it on
first use), it is named in a BadInput.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

from pipeline.errors import BadInput
from pipeline.redaction import redact
from pipeline.tracking import NOTE, Store, check_store, client

__all__ = ["NotFound", "model_rows", "run_rows"]

# Params that say where a run's files went, not what it is: never shown as a difference between runs.
WHERE = ("storage_path", "data.root", "tracking.")


class NotFound(BadInput):
    """An experiment or registered model the store does not hold; the message lists those it does."""


def run_rows(store: Store, experiment: str | None = None, limit: int = 50) -> list[dict[str, Any]]:
    """The newest `limit` runs of `experiment` (else of every experiment), with the hyperparameters that differ."""
    mlflow_client = _reader(store)
    experiments = _named(mlflow_client.search_experiments(), experiment, "experiment", store)
    runs = mlflow_client.search_runs([e.experiment_id for e in experiments], max_results=limit, order_by=["attributes.start_time DESC"])
    names = {e.experiment_id: e.name for e in experiments}
    differing = _differing_params([run.data.params for run in runs])
    return [_run_row(run, names[run.info.experiment_id], differing) for run in runs]


def model_rows(store: Store, name: str | None = None) -> list[dict[str, Any]]:
    """Every version of the registered model `name` (else of every registered model), newest first."""
    mlflow_client = _reader(store)
    models = _named(mlflow_client.search_registered_models(), name, "registered model", store)
    rows = []
    for model in sorted(models, key=lambda m: m.name):
        aliases: dict[str, list[str]] = {}
        for alias, version in (model.aliases or {}).items():
            aliases.setdefault(str(version), []).append(alias)
        versions = mlflow_client.search_model_versions(f"name = '{model.name}'")
        for version in sorted(versions, key=lambda v: int(v.version), reverse=True):
            rows.append(_version_row(model.name, version, sorted(aliases.get(str(version.version), []))))
    return rows


def _named(items: list[Any], name: str | None, what: str, store: Store) -> list[Any]:
    """All `items` (experiments or registered models), or the one called `name`; NotFound lists those there are."""
    if name is None:
        return items
    chosen = [item for item in items if item.name == name]
    if not chosen:
        known = ", ".join(sorted(item.name for item in items)) or "none"
        raise NotFound(f"no {what} {name!r} in {redact(store.uri)}; the {what}s: {known}")
    return chosen


def _reader(store: Store) -> Any:
    """A client for the store, refusing to make a SQLite store that is not there (reading must not write)."""
    if store.uri.startswith("sqlite:///") and not Path(store.uri.removeprefix("sqlite:///")).is_file():
        raise BadInput(
            f"tracking: no store at {store.uri.removeprefix('sqlite:///')}: nothing has been tracked here yet; "
            "run this where you trained, or set MLFLOW_TRACKING_URI"
        )
    if store.is_server:
        check_store(store)  # a server that does not answer is named in 5 s, not after MLflow's retries
    return client(store.uri)


def _differing_params(params: list[dict[str, str]]) -> list[str]:
    """The params whose values are not the same in every run (missing counts as a value), places excluded."""
    keys = sorted({key for run in params for key in run if not key.startswith(WHERE)})
    return [key for key in keys if len({run.get(key) for run in params}) > 1]


def _run_row(run: Any, experiment: str, differing: list[str]) -> dict[str, Any]:
    metrics, params = run.data.metrics, run.data.params
    metric = _ranked_by(params, metrics)
    return {
        "experiment": experiment,
        "run_id": run.info.run_id,
        "name": run.info.run_name,
        "status": run.info.status,
        "epochs": int(metrics["epoch"]) if "epoch" in metrics else None,
        "metric": metric,
        "value": metrics.get(metric) if metric else None,
        "test_value": metrics.get(f"test_{metric.removeprefix('val_')}") if metric else None,
        "params": {key: params[key] for key in differing if key in params},
        "started": dt.datetime.fromtimestamp(run.info.start_time / 1000, dt.timezone.utc).isoformat(timespec="seconds"),
        "command": run.data.tags.get(NOTE, ""),
    }


def _ranked_by(params: dict[str, str], metrics: dict[str, float]) -> str | None:
    """The metric the run ranked its checkpoints by: train.metric, else the default the config derives."""
    if params.get("train.metric") not in (None, "None", "null"):
        return params["train.metric"]
    return next((m for m in ("val_accuracy", "val_mse", "val_loss") if m in metrics), None)


def _version_row(name: str, version: Any, aliases: list[str]) -> dict[str, Any]:
    tags = version.tags
    value = tags.get("metric_value")
    return {
        "model": name,
        "version": int(version.version),
        "aliases": aliases,
        "metric": tags.get("metric"),
        "split": tags.get("metric_split"),
        "value": float(value) if value is not None else None,
        "decision": tags.get("decision"),
        "reason": tags.get("decision_reason"),
        "run_id": version.run_id,
        "registered": dt.datetime.fromtimestamp(version.creation_timestamp / 1000, dt.timezone.utc).isoformat(timespec="seconds"),
    }
