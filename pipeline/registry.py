"""The model registry: log the best checkpoint as an MLflow model, register it, crown it, load it by name.

    registration = register_best(run, "mnist_mlp", checkpoint_dir, example, metric="val_accuracy", mode="max", ...)
    model = load_model("mnist_mlp@champion")       # a Predictor: nn.Module in eval mode, preprocessing inside

Champion / challenger: a new version takes the alias `champion` only if its metric beats the current
champion's (strictly); otherwise it takes `challenger`. The decision and both values are version tags.
A version whose aliasing fails is deleted again: no orphaned versions.
"""

from __future__ import annotations

import importlib.metadata
import math
import tempfile
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import yaml

from pipeline.serving import Predictor, export_model, load_predictor
from pipeline.tracking import TrackedRun, client, resolve_store

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = ["Registration", "RegistryError", "load_model", "register_best", "resolve_version"]

CHAMPION, CHALLENGER = "champion", "challenger"
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")  # logged as the pyfunc's code
PACKAGE_DIR = Path(__file__).parent  # shipped with the model: loading needs no installed pipeline
REQUIREMENTS = ("torch", "torchvision", "numpy", "pandas", "pyarrow", "pydantic", "pyyaml", "mlflow")


class RegistryError(ValueError):
    """A model reference that does not resolve; the message lists what exists."""


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    alias: str  # champion or challenger
    metric: str
    value: float
    champion_value: float | None  # the champion's metric before this version (None: there was none)

    def summary(self) -> dict[str, Any]:
        return asdict(self)


def register_best(
    run: TrackedRun,
    name: str,
    checkpoint_dir: Path,
    example: np.ndarray | pd.DataFrame,
    *,
    metric: str,
    mode: str,
    value: float,
    tags: dict[str, str],
) -> Registration:
    """Log `checkpoint_dir` as the run's model, register it under `name`, and give it its alias."""
    from mlflow.exceptions import MlflowException

    logged = _log_model(run, checkpoint_dir, example)
    mlflow_client = client(run.uri)
    try:
        mlflow_client.create_registered_model(name)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
    version_tags = {**tags, "metric": metric, "metric_value": repr(value)}
    version = mlflow_client.create_model_version(
        name, logged.model_uri, run_id=run.run_id, tags=version_tags, model_id=logged.model_id
    )
    try:
        alias, champion_value = _crown(mlflow_client, name, version.version, metric, mode, value)
    except BaseException:
        _delete_version(mlflow_client, name, version.version)
        raise
    return Registration(name, version.version, alias, metric, value, champion_value)


def _log_model(run: TrackedRun, checkpoint_dir: Path, example: np.ndarray | pd.DataFrame) -> Any:
    """The pyfunc model: code (mlflow_model.py + the package), weights, configs, input example, signature."""
    import mlflow

    mlflow.set_tracking_uri(run.uri)
    mlflow.set_registry_uri(run.uri)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        export_model(checkpoint_dir, folder)
        # log_model links the model to the active run; the run's final status is set by the caller.
        with mlflow.start_run(run_id=run.run_id), warnings.catch_warnings():
            # The output's class_index column is an integer: MLflow's hint about missing values is moot.
            warnings.filterwarnings("ignore", message=".*Inferred schema contains integer column")
            return mlflow.pyfunc.log_model(
                name="model",
                python_model=str(MODEL_CODE),
                artifacts={"model": str(folder)},
                code_paths=[str(PACKAGE_DIR)],
                input_example=example,
                pip_requirements=_requirements(),  # listed: inferring them would load the model in a subprocess
            )


def _requirements() -> list[str]:
    pins = []
    for package in REQUIREMENTS:
        version = importlib.metadata.version(package).split("+")[0]  # torch's local tag (+cu128) is not on PyPI
        pins.append(f"{package}=={version}")
    return pins


def _crown(
    mlflow_client: MlflowClient, name: str, version: str, metric: str, mode: str, value: float
) -> tuple[str, float | None]:
    """Give the new version `champion` if it strictly beats the current one, else `challenger`.

    The registry has no transactions: another registration of the same name may move the alias between
    this read and this write. So every registration then settles the champion on the best version it
    can see, and the last one to finish has seen them all."""
    champion = _version_by_alias(mlflow_client, name, CHAMPION)
    champion_value = _metric_of(mlflow_client, champion, metric) if champion else None
    wins = champion_value is None or _better(value, champion_value, mode)
    mlflow_client.set_registered_model_alias(name, CHAMPION if wins else CHALLENGER, version)
    alias = CHAMPION if _settle_champion(mlflow_client, name, metric, mode) == str(version) else CHALLENGER
    if wins and alias == CHALLENGER:  # a better version registered meanwhile took the champion
        mlflow_client.set_registered_model_alias(name, CHALLENGER, version)
    decision = {
        "decision": alias,
        "champion_metric_value": "none" if champion_value is None else repr(champion_value),
        "champion_version": champion.version if champion else "none",
    }
    for key, text in decision.items():
        mlflow_client.set_model_version_tag(name, version, key, text)
    return alias, champion_value


def _better(value: float, than: float, mode: str) -> bool:
    return value > than if mode == "max" else value < than


def _settle_champion(mlflow_client: MlflowClient, name: str, metric: str, mode: str, attempts: int = 5) -> str | None:
    """Move `champion` to the best version ranked by `metric` (the current holder keeps it on a tie); its version."""
    holder = None
    for _ in range(attempts):
        ranked = _ranked_versions(mlflow_client, name, metric)
        champion = _version_by_alias(mlflow_client, name, CHAMPION)
        holder = str(champion.version) if champion else None
        if not ranked:
            return holder
        best_value = max(ranked.values()) if mode == "max" else min(ranked.values())
        if holder in ranked and not _better(best_value, ranked[holder], mode):
            return holder
        best = min((v for v, x in ranked.items() if x == best_value), key=int)  # the earliest of equals
        mlflow_client.set_registered_model_alias(name, CHAMPION, best)
    return holder


def _ranked_versions(mlflow_client: MlflowClient, name: str, metric: str) -> dict[str, float]:
    """Version -> its recorded value of `metric`, for the versions registered by that metric."""
    ranked = {}
    for found in mlflow_client.search_model_versions(f"name = '{name}'"):
        if found.tags.get("metric") == metric and "metric_value" in found.tags:
            value = float(found.tags["metric_value"])
            if not math.isnan(value):
                ranked[str(found.version)] = value  # str: stores differ in what they return
    return ranked


def _version_by_alias(mlflow_client: MlflowClient, name: str, alias: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_model_version_by_alias(name, alias)
    except MlflowException:
        return None


def _metric_of(mlflow_client: MlflowClient, version: Any, metric: str) -> float | None:
    """A version's metric: its own tag, or its run's final value; None if it was ranked by another metric."""
    if version.tags.get("metric") == metric and "metric_value" in version.tags:
        return float(version.tags["metric_value"])
    if version.run_id:
        value = mlflow_client.get_run(version.run_id).data.metrics.get(metric)
        return None if value is None or math.isnan(value) else value
    return None


def _delete_version(mlflow_client: MlflowClient, name: str, version: str) -> None:
    mlflow_client.delete_model_version(name, version)
    if not mlflow_client.search_model_versions(f"name = '{name}'", max_results=1):
        mlflow_client.delete_registered_model(name)  # it was created for this version alone


# ---------------------------------------------------------------------------------------------------
# Downstream


def parse_ref(ref: str) -> tuple[str, str]:
    """'name@alias' or 'name/3' -> (name, alias or version)."""
    name, sep, alias = ref.partition("@")
    if not sep:
        name, sep, alias = ref.rpartition("/")
    if not sep or not name or not alias:
        raise RegistryError(f"model reference {ref!r}: write NAME@ALIAS (e.g. mnist_mlp@champion) or NAME/VERSION")
    return name, alias


def resolve_version(mlflow_client: MlflowClient, ref: str) -> Any:
    """The model version that `ref` names, or a RegistryError listing the models or aliases that exist."""
    from mlflow.exceptions import MlflowException

    name, alias = parse_ref(ref)
    try:
        model = mlflow_client.get_registered_model(name)
    except MlflowException:
        names = sorted(m.name for m in mlflow_client.search_registered_models(max_results=50))
        raise RegistryError(f"no registered model {name!r}; registered models: {', '.join(names) or '(none yet)'}") from None
    if alias.isdigit():
        try:
            return mlflow_client.get_model_version(name, alias)
        except MlflowException:
            pass
    elif alias in model.aliases:
        return mlflow_client.get_model_version(name, model.aliases[alias])
    aliases = ", ".join(f"{a} (version {v})" for a, v in sorted(model.aliases.items())) or "(none)"
    versions = sorted(int(v.version) for v in mlflow_client.search_model_versions(f"name = '{name}'"))
    raise RegistryError(f"model {name!r} has no alias or version {alias!r}; aliases: {aliases}; versions: {versions}")


def load_model(ref: str, *, tracking_uri: str | None = None, device: str = "cpu") -> Predictor:
    """A registered model as an nn.Module in eval mode, preprocessing included: raw inputs in, outputs out.

    The weights are read as tensors only (no pickle): loading runs no code from the registry.
    """
    import mlflow.artifacts

    uri = tracking_uri or resolve_store(None).uri
    mlflow_client = client(uri)
    version = resolve_version(mlflow_client, ref)
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(
            mlflow.artifacts.download_artifacts(
                artifact_uri=mlflow_client.get_model_version_download_uri(version.name, version.version),
                dst_path=tmp,
                tracking_uri=uri,
                registry_uri=uri,
            )
        )
        return load_predictor(local / _artifact_folder(local), device)


def _artifact_folder(model_dir: Path) -> str:
    """Where the pyfunc keeps the `model` artifact, as its MLmodel file records it."""
    meta = yaml.safe_load((model_dir / "MLmodel").read_text())
    return meta["flavors"]["python_function"]["artifacts"]["model"]["path"]
