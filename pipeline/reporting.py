"""After a training: the chosen checkpoint tested, the config and plots logged, the model registered.

    metrics = evaluate_checkpoint(cfg, spec, checkpoint)      # its epoch's metrics, and test_* measured on it
    registration = report_run(run, cfg, spec, checkpoint, metrics, register=True)

The checkpoint was chosen by validation metrics (or is the last, without validation); the test split is
evaluated on it here and never took part in choosing it. The registry compares versions on the same rows:
the test split's metric where the data set has one, else the validation metric (`registry_metric`).
The plots are made from what MLflow recorded (every epoch, across resumes) and from the checkpoint's
predictions on the test split (the validation split where there is none): learning curves always; a
confusion matrix for classifiers; the decision boundary for 2-D classifiers; prediction against target
for regression. They are drawn by a process of their own (pipeline/drawing.py) while this one goes on.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd
import torch
import yaml

from pipeline import drawing
from pipeline.batches import target_for
from pipeline.checkpoints import load_state, local_checkpoint
from pipeline.config import ExperimentConfig
from pipeline.data.store import DatasetSpec, load_split_rows, load_test_split
from pipeline.loop import LOSSES, OneProcess, evaluate
from pipeline.redaction import safe_config
from pipeline.registry import Registration, register_best
from pipeline.serving import EVAL_BATCH, Predictor, build_predictor
from pipeline.tracking import NOTE, TrackedRun, client, log_metrics, log_png, log_text, metric_history, set_tags

__all__ = ["evaluate_checkpoint", "registered_name", "registry_metric", "report_run"]

EXAMPLE_ROWS = 4
LINEAGE_TAGS = ("config_hash", "data_hash", "git_commit", "ray_run", "run_dir", "run_key")


def registered_name(cfg: ExperimentConfig) -> str:
    return cfg.tracking.register_as or cfg.tracking.experiment or cfg.name


def registry_metric(cfg: ExperimentConfig, spec: DatasetSpec) -> tuple[str, str]:
    """The metric that ranks registered versions, and its split: the test split's where there is one."""
    return (f"test_{cfg.metric.removeprefix('val_')}", "test") if "test" in spec.rows else (cfg.metric, "val")


def evaluate_checkpoint(cfg: ExperimentConfig, spec: DatasetSpec, checkpoint: str) -> dict[str, Any]:
    """The checkpoint's own epoch metrics, and the test split's loss and score measured on it."""
    with local_checkpoint(checkpoint) as folder:
        state = load_state(folder)
    metrics = dict(state["metrics"])
    if "test" in spec.rows:
        predictor = build_predictor(cfg, spec, state["model"])
        metrics.update(_test_metrics(predictor, cfg, spec))
    return metrics


@torch.no_grad()
def _test_metrics(predictor: Predictor, cfg: ExperimentConfig, spec: DatasetSpec) -> dict[str, float]:
    """The loop's own exact evaluation (`train.evaluate`), over the whole test split, preprocessing included."""
    x, y = load_test_split(spec, cfg.data)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    predictor = predictor.to(device)
    batches = (
        (torch.from_numpy(np.require(x[i : i + EVAL_BATCH], requirements=("C", "W"))).to(device),
         target_for(torch.from_numpy(np.require(y[i : i + EVAL_BATCH], requirements=("C", "W"))), cfg.loss).to(device))
        for i in range(0, len(y), EVAL_BATCH)
    )  # fmt: skip
    return evaluate(predictor, batches, LOSSES[cfg.loss](), lambda batch: batch, cfg, OneProcess(device), prefix="test")


def report_run(
    run: TrackedRun, cfg: ExperimentConfig, spec: DatasetSpec, checkpoint: str, metrics: dict[str, Any], *, register: bool
) -> Registration | None:
    """Log the test metrics, config and plots to `run`; with `register`, register the checkpoint (champion rule)."""
    epoch = int(metrics["epoch"])
    tested = {k: v for k, v in metrics.items() if k.startswith("test_")}
    if tested and epoch not in dict(metric_history(run, [next(iter(tested))]).get(next(iter(tested)), [])):
        log_metrics(run, tested, step=epoch)  # at the step of the checkpoint they were measured on, once
    set_tags(run, {"model_epoch": str(epoch)})
    with local_checkpoint(checkpoint) as folder:
        predictor = build_predictor(cfg, spec, load_state(folder)["model"])
        x, y = _plotted_split(cfg, spec)
        figures = _ask_for_figures(run, cfg, spec, predictor, x, y)  # drawn meanwhile, by another process

        def log_figures() -> None:
            for artifact_file, figure in figures.items():
                log_png(run, figure.png(), artifact_file)

        log_text(run, yaml.safe_dump(safe_config(cfg), sort_keys=False), "config.yaml")
        if not register:
            log_figures()
            return None
        metric, split = registry_metric(cfg, spec)
        run_tags = client(run.uri).get_run(run.run_id).data.tags
        better = "higher" if cfg.metric_mode == "max" else "lower"
        about = (f"{cfg.model.name} trained on {cfg.data.name} by `pipeline`. Versions are compared on {metric} "
                 f"({better} is better) on the {split} split of the same data; the alias `champion` marks the best of them.")  # fmt: skip
        return register_best(
            run, registered_name(cfg), folder, _input_example(spec, x[:EXAMPLE_ROWS]),
            metric=metric, split=split, mode=cfg.metric_mode, value=float(metrics[metric]), epoch=epoch,
            tags={k: v for k, v in run_tags.items() if k in LINEAGE_TAGS}, about=about, made_by=run_tags.get(NOTE, ""),
            before_version=log_figures,  # drawn while the model was logged; a figure that failed registers nothing
        )  # fmt: skip


def _plotted_split(cfg: ExperimentConfig, spec: DatasetSpec) -> tuple[np.ndarray, np.ndarray]:
    if "test" in spec.rows:
        return load_test_split(spec, cfg.data)
    return load_split_rows(spec, cfg.data, cfg.seed, test=False)["val"].arrays()


def _input_example(spec: DatasetSpec, x: np.ndarray) -> np.ndarray | pd.DataFrame:
    """Raw samples as a user would send them: uint8 images, or a table with the feature columns."""
    if spec.is_image:
        return np.ascontiguousarray(x)
    # float64 columns: what pandas makes of a CSV, so that a user's table passes the signature's check.
    return pd.DataFrame(x, columns=list(spec.feature_names)).astype("float64")


def _ask_for_figures(
    run: TrackedRun, cfg: ExperimentConfig, spec: DatasetSpec, predictor: Predictor, x: np.ndarray, y: np.ndarray
) -> dict[str, drawing.QueuedFigure]:  # fmt: skip
    """The run's figures by artifact file, queued for drawing (pipeline/plots.py says what each shows)."""
    history = metric_history(run, ["train_loss", "val_loss", cfg.metric])
    figures = {"plots/learning_curves.png": drawing.draw("learning_curves", history, cfg.metric)}
    table = predictor.predict_table(x)
    if not cfg.is_classifier:
        figures["plots/prediction_vs_target.png"] = drawing.draw("prediction_vs_target", y.reshape(-1), table["value"].to_numpy())
        return figures
    figures["plots/confusion_matrix.png"] = drawing.draw("confusion_matrix", y, table["class_index"].to_numpy(), spec.classes)
    if spec.input_shape == (2,) and spec.num_classes == 2:
        figures["plots/decision_boundary.png"] = drawing.draw("decision_boundary", *_probability_of_1_over(x, predictor), x, y)
    return figures


@torch.no_grad()
def _probability_of_1_over(x: np.ndarray, predictor: Predictor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The model's probability of class 1 on a 200 x 200 grid over the samples `x` (2-D) and a margin."""
    low, high = x.min(axis=0) - 0.25, x.max(axis=0) + 0.25
    grid_x, grid_y = np.meshgrid(np.linspace(low[0], high[0], 200), np.linspace(low[1], high[1], 200))
    points = np.column_stack([grid_x.ravel(), grid_y.ravel()]).astype(np.float32)
    out = predictor(torch.from_numpy(points)).float()
    p1 = torch.sigmoid(out[:, 0]) if out.shape[1] == 1 else torch.softmax(out, dim=1)[:, 1]
    return grid_x, grid_y, p1.numpy().reshape(grid_x.shape)
