"""What a run was made from, recorded in MLflow: its data sets, one input per split it uses.

    log_datasets(run, cfg, spec)     # training, validation and test: name, source, digest, schema, rows

The UI's Datasets view and the run page then show what the model was trained and measured on. The
digest is the Parquet manifest's content hash (`data_hash`): two runs on the same digest saw the same
bytes, however their files were named.
"""

from __future__ import annotations

import json

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
    mlflow_client.log_inputs(run.run_id, datasets=inputs)
