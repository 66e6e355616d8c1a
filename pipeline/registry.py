"""The model registry: log a run's checkpoint as an MLflow model, register it, crown it, load it by name.

    registration = register_best(run, "mnist_mlp", checkpoint_dir, example, metric="test_accuracy", split="test", ...)
    model = load_model("mnist_mlp@champion")       # a Predictor: nn.Module in eval mode, preprocessing inside

Champion / challenger: a new version takes the alias `champion` only if its metric strictly beats the
current champion's, measured on the same rows: the same metric of the same split (test where the data
set has one) of the same data (data hash). A version that cannot be compared with the champion (other
data, another metric) becomes challenger, and its tags say why. The decision, both values, the metric
and its split are version tags. A checkpoint is registered at most once: registering the same run's
same epoch again returns that version. A version whose aliasing fails is deleted again: no orphans.
"""

from __future__ import annotations

import importlib.metadata
import math
import tempfile
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import yaml

from pipeline.errors import BadInput
from pipeline.serving import Predictor, export_model, load_predictor
from pipeline.tracking import TrackedRun, client, resolve_store

if TYPE_CHECKING:
    from mlflow import MlflowClient

__all__ = ["Registration", "RegistryError", "load_model", "register_best", "resolve_version"]

CHAMPION, CHALLENGER = "champion", "challenger"
MODEL_CODE = Path(__file__).with_name("mlflow_model.py")  # logged as the pyfunc's code
PACKAGE_DIR = Path(__file__).parent  # shipped with the model: loading needs no installed pipeline
REQUIREMENTS = ("torch", "torchvision", "numpy", "pandas", "pyarrow", "pydantic", "pyyaml", "mlflow")


class RegistryError(BadInput):
    """A model reference that does not resolve; the message lists what exists."""


@dataclass(frozen=True)
class Registration:
    name: str
    version: str
    alias: str  # champion or challenger (or none, for an earlier registration whose alias moved on)
    metric: str
    split: str  # the rows the metric was measured on: test, or val where the data set has no test split
    value: float
    champion_value: float | None  # the champion's metric before this version (None: none, or not comparable)
    reason: str  # why this alias, in words

    def summary(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Measure:
    """What a version is ranked by: a metric, measured on a split of one data set (its content hash)."""

    metric: str
    split: str
    data_hash: str
    mode: str

    def of(self, version: Any) -> float | None:
        """`version`'s value of this measure, or None if it was measured otherwise (not comparable)."""
        tags = version.tags
        if tags.get("metric") != self.metric or tags.get("metric_split", self.split) != self.split:
            return None
        if tags.get("data_hash") != self.data_hash or "metric_value" not in tags:
            return None
        value = float(tags["metric_value"])
        return None if math.isnan(value) else value

    def better(self, value: float, than: float) -> bool:
        return value > than if self.mode == "max" else value < than


def register_best(
    run: TrackedRun,
    name: str,
    checkpoint_dir: Path,
    example: np.ndarray | pd.DataFrame,
    *,
    metric: str,
    split: str,
    mode: str,
    value: float,
    epoch: int,
    tags: dict[str, str],
    about: str,
    made_by: str,
    before_version: Callable[[], None] = lambda: None,
) -> Registration:
    """Log `checkpoint_dir` (epoch `epoch` of `run`) as the run's model, register it under `name`, alias it.

    `about` describes the registered model (set when it has no description yet); `made_by`, the run's own
    description (the command line), goes into the version's description with its metric and decision.
    `before_version` runs once, after the model is logged and before anything is registered (or before the
    version that holds this checkpoint already is returned): what must be in the run before its model is
    registered and may still be in the making (the run's figures)."""
    from mlflow.exceptions import MlflowException

    if not math.isfinite(value):
        raise RegistryError(f"{metric} is {value}: a model with a non-finite {metric} is not registered")
    mlflow_client = client(run.uri)
    earlier = _registered(mlflow_client, name, run.run_id, epoch)
    if earlier is not None:
        before_version()
        return earlier
    logged = _log_model(run, checkpoint_dir, example)
    before_version()
    try:
        mlflow_client.create_registered_model(name, description=about)
    except MlflowException as err:
        if err.error_code not in ("RESOURCE_ALREADY_EXISTS", "ALREADY_EXISTS"):
            raise
        if not mlflow_client.get_registered_model(name).description:  # registered before descriptions were written
            mlflow_client.update_registered_model(name, description=about)
    measure = Measure(metric, split, tags.get("data_hash", ""), mode)
    version_tags = {**tags, "metric": metric, "metric_split": split, "metric_value": repr(value), "checkpoint_epoch": str(epoch)}
    version = mlflow_client.create_model_version(name, logged.model_uri, run_id=run.run_id, tags=version_tags, model_id=logged.model_id)
    try:
        alias, champion_value, reason = _crown(mlflow_client, name, version.version, measure, value)
        registration = Registration(name, version.version, alias, metric, split, value, champion_value, reason)
        mlflow_client.update_model_version(name, version.version, description=_describe(registration, run, epoch, made_by))
    except BaseException:
        _delete_version(mlflow_client, name, version.version)
        raise
    return registration


def _describe(registration: Registration, run: TrackedRun, epoch: int, made_by: str) -> str:
    """The version's description (Markdown): where it comes from, what it measured, why its alias."""
    return (
        f"Run `{run.run_id}`, the checkpoint of epoch {epoch}. {made_by}\n\n"
        f"{registration.metric} on the {registration.split} split: {registration.value:.6g}.\n\n"
        f"Registered as {registration.alias}: {registration.reason}."
    )


def _registered(mlflow_client: MlflowClient, name: str, run_id: str, epoch: int) -> Registration | None:
    """The version that already holds this run's checkpoint of `epoch`, if there is one."""
    from mlflow.exceptions import MlflowException

    try:
        found = mlflow_client.search_model_versions(f"name = '{name}' and run_id = '{run_id}'")
    except MlflowException:
        return None
    for version in found:
        tags = version.tags
        if tags.get("checkpoint_epoch") == str(epoch) and "metric_value" in tags:
            aliases = mlflow_client.get_registered_model(name).aliases
            alias = next((a for a, v in aliases.items() if str(v) == str(version.version)), "none")
            champion_value = tags.get("champion_metric_value", "none")
            return Registration(
                name, str(version.version), alias, tags["metric"], tags.get("metric_split", "val"), float(tags["metric_value"]),
                None if champion_value == "none" else float(champion_value), "already registered: this checkpoint is this version",
            )  # fmt: skip
    return None


def _log_model(run: TrackedRun, checkpoint_dir: Path, example: np.ndarray | pd.DataFrame) -> Any:
    """The pyfunc model: code (mlflow_model.py + the package), weights, configs, input example, signature."""
    import mlflow

    mlflow.set_tracking_uri(run.uri)
    mlflow.set_registry_uri(run.uri)
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "model"
        export_model(checkpoint_dir, folder)
        predictor = load_predictor(folder)
        # log_model links the model to the active run; the run's final status is set by the caller.
        with mlflow.start_run(run_id=run.run_id), warnings.catch_warnings(), _no_requirement_check():
            # The output's class_index column is an integer: MLflow's hint about missing values is moot.
            warnings.filterwarnings("ignore", message=".*Inferred schema contains integer column")
            return mlflow.pyfunc.log_model(
                name="model",
                python_model=str(MODEL_CODE),
                artifacts={"model": str(folder)},
                code_paths=[str(PACKAGE_DIR)],
                input_example=example,
                signature=_signature(predictor, example),
                metadata={"inputs": predictor.describe_input()},  # in the MLmodel file, for whoever loads it
                pip_requirements=_requirements(),  # listed: inferring them would load the model in a subprocess
            )


@contextmanager
def _no_requirement_check() -> Iterator[None]:
    """log_model checks every listed requirement against the installed packages, twice (saving the model, then
    loading it back to validate the input example), and maps the modules of every installed distribution to do
    so: over a second of a 1-epoch `pipeline train` (docs/BENCHMARKS.md). Ours are this environment's own
    versions (_requirements): satisfied by construction, so the check is skipped. Modules where MLflow no
    longer has it under this name are left as they are."""
    import mlflow.pyfunc
    import mlflow.utils.environment

    name = "warn_dependency_requirement_mismatches"
    holders = [module for module in (mlflow.utils.environment, mlflow.pyfunc) if hasattr(module, name)]
    checks = [getattr(module, name) for module in holders]
    for module in holders:
        setattr(module, name, lambda model_requirements: None)
    try:
        yield
    finally:
        for module, check in zip(holders, checks, strict=True):
            setattr(module, name, check)


def _signature(predictor: Predictor, example: np.ndarray | pd.DataFrame) -> Any:
    """A table's columns are its input schema. Images come in several layouts (NCHW, NHWC, NHW for one
    channel, one image without N), which one tensor schema (fixed rank) cannot say: their signature names
    the outputs only, and the model itself refuses other shapes and dtypes, naming the layouts it takes."""
    from mlflow.models import ModelSignature, infer_signature

    inferred = infer_signature(example, predictor.predict_table(example))
    return inferred if isinstance(example, pd.DataFrame) else ModelSignature(inputs=None, outputs=inferred.outputs)


def _requirements() -> list[str]:
    pins = []
    for package in REQUIREMENTS:
        version = importlib.metadata.version(package).split("+")[0]  # torch's local tag (+cu128) is not on PyPI
        pins.append(f"{package}=={version}")
    return pins


def _crown(mlflow_client: MlflowClient, name: str, version: str, measure: Measure, value: float) -> tuple[str, float | None, str]:
    """Give the new version `champion` if it strictly beats the current one on the same measure, else `challenger`.

    The registry has no transactions: another registration of the same name may move the alias between
    this read and this write. So every registration then settles the champion on the best comparable
    version it can see, and the last one to finish has seen them all."""
    champion = _version_by_alias(mlflow_client, name, CHAMPION)
    champion_value = measure.of(champion) if champion else None
    if champion is None:
        wins, reason = True, "the first version measured so"
    elif champion_value is None:
        wins, reason = False, _not_comparable(champion, measure)
    else:
        wins = measure.better(value, champion_value)
        relation = "beats" if wins else "does not beat"
        reason = f"{measure.metric} {value:.6g} {relation} champion version {champion.version}'s {champion_value:.6g}"
    mlflow_client.set_registered_model_alias(name, CHAMPION if wins else CHALLENGER, version)
    alias = CHAMPION if _settle_champion(mlflow_client, name, measure) == str(version) else CHALLENGER
    if wins and alias == CHALLENGER:  # a better version registered meanwhile took the champion
        mlflow_client.set_registered_model_alias(name, CHALLENGER, version)
        reason = "a better version registered at the same time took the champion"
    decision = {
        "decision": alias,
        "decision_reason": reason,
        "champion_metric_value": "none" if champion_value is None else repr(champion_value),
        "champion_version": champion.version if champion else "none",
    }
    for key, text in decision.items():
        mlflow_client.set_model_version_tag(name, version, key, text)
    return alias, champion_value, reason


def _not_comparable(champion: Any, measure: Measure) -> str:
    tags = champion.tags
    if tags.get("data_hash") != measure.data_hash:
        return (f"not compared: champion version {champion.version} was trained and measured on other data "
                f"(data_hash {tags.get('data_hash', 'unknown')}, this one {measure.data_hash})")  # fmt: skip
    return (f"not compared: champion version {champion.version} is ranked by {tags.get('metric', 'unknown')} on "
            f"{tags.get('metric_split', 'unknown')}, this one by {measure.metric} on {measure.split}")  # fmt: skip


def _settle_champion(mlflow_client: MlflowClient, name: str, measure: Measure, attempts: int = 5) -> str | None:
    """Move `champion` to the best version comparable with it (the holder keeps it on a tie); its version."""
    holder = None
    for _ in range(attempts):
        champion = _version_by_alias(mlflow_client, name, CHAMPION)
        holder = str(champion.version) if champion else None
        if champion is None or measure.of(champion) is None:
            return holder  # a champion measured otherwise is not ours to move
        ranked = {str(v.version): x for v in mlflow_client.search_model_versions(f"name = '{name}'") if (x := measure.of(v)) is not None}
        best_value = max(ranked.values()) if measure.mode == "max" else min(ranked.values())
        if holder in ranked and not measure.better(best_value, ranked[holder]):
            return holder
        best = min((v for v, x in ranked.items() if x == best_value), key=int)  # the earliest of equals
        mlflow_client.set_registered_model_alias(name, CHAMPION, best)
    return holder


def _version_by_alias(mlflow_client: MlflowClient, name: str, alias: str) -> Any:
    from mlflow.exceptions import MlflowException

    try:
        return mlflow_client.get_model_version_by_alias(name, alias)
    except MlflowException:
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
