"""What a run was made from, recorded in MLflow: its data sets, one input per split it uses.

    log_datasets(run, cfg, spec)     # training, validation and test: name, source, digest, schema, rows

The UI's Datasets view and the run page then show what the model was trained and measured on. The
digest is the Parquet manifest's content hash (`data_hash`): two runs on the same digest saw the same
bytes, however their files were named.
"""

from __future__ import annotations

import json
from typing import Any

from pipeline.config import ExperimentConfig
from pipeline.data.store import DatasetSpec, split_sizes
from pipeline.tracking import TrackedRun, client

__all__ = ["CONTEXTS", "log_datasets"]

CONTEXTS = {"train": "training", "val": "validation", "test": "test"}  # MLflow's names for what a split is used for


def log_datasets(run: TrackedRun, cfg: ExperimentConfig, spec: DatasetSpec) -> None:
    """Log the run's splits as MLflow dataset inputs (once: a resumed run that has them logs nothing)."""
    from mlflow.entities import Dataset, DatasetInput, InputTag
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    mlflow_client = client(run.uri)
    logged = mlflow_client.get_run(run.run_id).inputs
    if logged is not None and logged.dataset_inputs:
        return
    schema = json.dumps({"input_shape": list(spec.input_shape), "features": list(spec.feature_names) if not spec.is_image else [],
                         "task": spec.task, "classes": list(spec.classes)})  # fmt: skip
    inputs = []
    for split, rows in split_sizes(spec, cfg.data).items():
        file = "train.parquet" if split == "val" else f"{split}.parquet"  # validation rows are carved out of the training file
        source = json.dumps({"uri": f"{spec.directory}/{file}", "split": split})
        # One name per split: MLflow keeps one dataset per (name, digest) in an experiment.
        dataset = Dataset(f"{spec.name}-{split}", spec.data_hash[:16], "local", source, schema, json.dumps({"num_rows": rows}))
        inputs.append(DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, CONTEXTS[split])]))
    _log_inputs(mlflow_client, run.run_id, inputs)


def _log_inputs(mlflow_client: Any, run_id: str, inputs: list[Any]) -> None:
    """log_inputs, once more when another run inserted the same data set first. MLflow's SQL store looks each
    data set up, then inserts the missing ones: the trials of a search, logging the same data at once, race,
    and the later insert breaks the unique (experiment, name, digest) key. The transaction is rolled back, and
    the second try finds the data set and only links it."""
    from mlflow.exceptions import MlflowException

    try:
        mlflow_client.log_inputs(run_id, datasets=inputs)
    except MlflowException as err:
        if not _is_duplicate_key(err):
            raise
        mlflow_client.log_inputs(run_id, datasets=inputs)


def _is_duplicate_key(err: Exception) -> bool:
    """The database's words for a broken unique key: SQLite's, PostgreSQL's, MySQL's (through a server too)."""
    text = str(err).lower()
    return "unique constraint" in text or "duplicate key" in text or "duplicate entry" in text
