"""After a tracked training: the resolved config, the plots, and the best checkpoint in the registry.

    registration = report_run(run, cfg, best_checkpoint, register=True)

The plots are made from what MLflow recorded (every epoch, across resumes) and from the best
checkpoint's predictions on the validation split (the test split where there is no validation split):
learning curves always; a confusion matrix for classifiers; the decision boundary for 2-D classifiers;
prediction against target for regression.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pandas as pd
import torch
import yaml

from pipeline import plots
from pipeline.checkpoints import load_state
from pipeline.config import ExperimentConfig
from pipeline.data import DatasetSpec, load_splits
from pipeline.registry import Registration, register_best
from pipeline.serving import Predictor, build_predictor
from pipeline.tracking import TrackedRun, client, log_figure, log_text, metric_history, safe_config

__all__ = ["registered_name", "report_run"]

EXAMPLE_ROWS = 4
LINEAGE_TAGS = ("config_hash", "data_hash", "git_commit", "ray_run", "run_dir")


def registered_name(cfg: ExperimentConfig) -> str:
    return cfg.tracking.register_as or cfg.tracking.experiment or cfg.name


def report_run(run: TrackedRun, cfg: ExperimentConfig, checkpoint: str, *, register: bool) -> Registration | None:
    """Log the config and plots to `run`; with `register`, register the best checkpoint (champion rule)."""
    with local_checkpoint(checkpoint) as folder:
        state = load_state(folder)
        spec = DatasetSpec.from_json(state["dataset"])
        predictor = build_predictor(cfg, spec, state["model"])
        x, y = _evaluation_split(cfg, spec)
        log_text(run, yaml.safe_dump(safe_config(cfg), sort_keys=False), "config.yaml")
        _log_plots(run, cfg, spec, predictor, x, y)
        if not register:
            return None
        tags = {k: v for k, v in client(run.uri).get_run(run.run_id).data.tags.items() if k in LINEAGE_TAGS}
        return register_best(
            run,
            registered_name(cfg),
            folder,
            _input_example(spec, x[:EXAMPLE_ROWS]),
            metric=cfg.metric,
            mode=cfg.metric_mode,
            value=float(state["metrics"][cfg.metric]),
            tags=tags,
        )


@contextmanager
def local_checkpoint(checkpoint: str) -> Iterator[Path]:
    """A checkpoint folder on this disk: as it is, or copied from an object store first."""
    if "://" not in checkpoint:
        yield Path(checkpoint)
        return
    import pyarrow.fs

    with tempfile.TemporaryDirectory() as tmp:
        filesystem, path = pyarrow.fs.FileSystem.from_uri(checkpoint)
        pyarrow.fs.copy_files(path, tmp, source_filesystem=filesystem)
        yield Path(tmp)


def _evaluation_split(cfg: ExperimentConfig, spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    splits = load_splits(spec, cfg.data, cfg.seed)
    return splits["val"] if "val" in splits else splits["test"]


def _input_example(spec: DatasetSpec, x: np.ndarray) -> np.ndarray | pd.DataFrame:
    """Raw samples as a user would send them: uint8 images, or a table with the feature columns."""
    if spec.is_image:
        return np.ascontiguousarray(x)
    # float64 columns: what pandas makes of a CSV, so that a user's table passes the signature's check.
    return pd.DataFrame(x, columns=list(spec.feature_names)).astype("float64")


def _log_plots(run: TrackedRun, cfg: ExperimentConfig, spec: DatasetSpec, predictor: Predictor, x: np.ndarray, y: np.ndarray) -> None:
    history = metric_history(run, ["train_loss", "val_loss", cfg.metric])
    log_figure(run, plots.learning_curves(history, cfg.metric), "plots/learning_curves.png")
    table = predictor.predict_table(x)
    if not cfg.is_classifier:
        log_figure(run, plots.prediction_vs_target(y.reshape(-1), table["value"].to_numpy()), "plots/prediction_vs_target.png")
        return
    log_figure(run, plots.confusion_matrix(y, table["class_index"].to_numpy(), spec.classes), "plots/confusion_matrix.png")
    if spec.input_shape == (2,) and spec.num_classes == 2:
        log_figure(run, plots.decision_boundary(_probability_of_1(predictor), x, y), "plots/decision_boundary.png")


def _probability_of_1(predictor: Predictor):
    @torch.no_grad()
    def probability(points: np.ndarray) -> np.ndarray:
        out = predictor(torch.from_numpy(points)).float()
        p1 = torch.sigmoid(out[:, 0]) if out.shape[1] == 1 else torch.softmax(out, dim=1)[:, 1]
        return p1.numpy()

    return probability
