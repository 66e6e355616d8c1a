"""The figures a person would rather look at than read, logged with each run (matplotlib, no display).

learning_curves(history, "val_accuracy")          # losses and the metric per epoch
confusion_matrix(targets, predicted, classes)     # classifiers
decision_boundary(grid_x, grid_y, surface, x, y)  # 2-D classifiers
prediction_vs_target(targets, predicted)          # regression
metric_against(values, scores, "optim.lr", ...)   # a search: the metric against one hyperparameter
trial_curves({trial: [(epoch, value)]}, ...)      # a search: every trial's learning curve
save(figure, "plot.png")                          # written, and released by pyplot

Runs draw them through pipeline/drawing.py, in a process of its own: their arguments are numbers and arrays.
"""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")  # files only: works without a screen, in workers and CI

import matplotlib.pyplot as plt
import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator

__all__ = ["confusion_matrix", "decision_boundary", "learning_curves", "metric_against", "prediction_vs_target", "save", "trial_curves"]

History = dict[str, list[tuple[int, float]]]  # metric -> (epoch, value) pairs


def save(figure: Figure, path: str) -> None:
    """Write `figure` to `path` (PNG by its suffix) and let pyplot forget it, as a process drawing many must."""
    figure.savefig(path)
    plt.close(figure)


def learning_curves(history: History, metric: str) -> Figure:
    """Train and validation loss on the left, the ranking metric on the right, against the epoch."""
    figure, (losses, score) = plt.subplots(1, 2, figsize=(10, 4), constrained_layout=True)
    for key in ("train_loss", "val_loss"):
        if key in history:
            epochs, values = zip(*history[key], strict=True)
            losses.plot(epochs, values, marker="o", label=key)
    losses.set(xlabel="epoch", ylabel="loss", title="loss")
    losses.legend()
    if metric in history:
        epochs, values = zip(*history[metric], strict=True)
        score.plot(epochs, values, marker="o", color="tab:green")
    score.set(xlabel="epoch", ylabel=metric, title=metric)
    for axes in (losses, score):
        axes.grid(alpha=0.3)
        _whole_epochs(axes)
    return figure


def confusion_matrix(targets: np.ndarray, predicted: np.ndarray, classes: tuple[str, ...]) -> Figure:
    """Counts per (true, predicted) class; the color is the share of each true class."""
    n = len(classes)
    counts = np.zeros((n, n), dtype=np.int64)
    np.add.at(counts, (targets.astype(np.int64), predicted.astype(np.int64)), 1)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    size = max(4.0, 0.6 * n + 2)
    figure, axes = plt.subplots(figsize=(size, size), constrained_layout=True)
    axes.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    for (row, col), count in np.ndenumerate(counts):
        axes.text(col, row, str(count), ha="center", va="center", color="white" if shares[row, col] > 0.5 else "black", fontsize=8)
    axes.set_xticks(range(n), classes, rotation=45, ha="right")
    axes.set_yticks(range(n), classes)
    accuracy = np.trace(counts) / max(counts.sum(), 1)
    axes.set(xlabel="predicted", ylabel="true", title=f"confusion matrix (accuracy {accuracy:.3f}, n={counts.sum()})")
    return figure


def decision_boundary(grid_x: np.ndarray, grid_y: np.ndarray, surface: np.ndarray, x: np.ndarray, y: np.ndarray) -> Figure:
    """The model's probability of class 1 over the plane (`surface`, on the grid's points), with the samples on top."""
    figure, axes = plt.subplots(figsize=(5, 5), constrained_layout=True)
    filled = axes.contourf(grid_x, grid_y, surface, levels=np.linspace(0, 1, 21), cmap="RdBu_r", alpha=0.7)
    axes.contour(grid_x, grid_y, surface, levels=[0.5], colors="black", linewidths=1.5)
    axes.scatter(x[:, 0], x[:, 1], c=y, cmap="RdBu_r", s=8, edgecolors="k", linewidths=0.2)
    figure.colorbar(filled, ax=axes, label="P(class 1)")
    axes.set(xlabel="x0", ylabel="x1", title="decision boundary (P = 0.5)", aspect="equal")
    return figure


def prediction_vs_target(targets: np.ndarray, predicted: np.ndarray) -> Figure:
    """Each sample's prediction against its target; perfect predictions lie on the diagonal."""
    figure, axes = plt.subplots(figsize=(5, 5), constrained_layout=True)
    axes.scatter(targets, predicted, s=8, alpha=0.6)
    low, high = float(min(targets.min(), predicted.min())), float(max(targets.max(), predicted.max()))
    axes.plot([low, high], [low, high], color="black", linewidth=1, label="y = x")
    mse = float(np.mean((predicted - targets) ** 2))
    axes.set(xlabel="target", ylabel="prediction", title=f"prediction vs target (MSE {mse:.4g}, n={len(targets)})")
    axes.legend()
    axes.grid(alpha=0.3)
    return figure


def metric_against(values: list, scores: list[float], key: str, metric: str, *, log_x: bool = False) -> Figure:
    """Each trial's best metric against its value of one hyperparameter (categories for lists and text)."""
    figure, axes = plt.subplots(figsize=(6, 4), constrained_layout=True)
    numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
    if numeric:
        axes.scatter(values, scores, s=30)
        if log_x:
            axes.set_xscale("log")
    else:
        labels = sorted({str(v) for v in values})
        axes.scatter([labels.index(str(v)) for v in values], scores, s=30)
        axes.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    axes.set(xlabel=key, ylabel=f"best {metric}", title=f"{metric} against {key} ({len(scores)} trials)")
    axes.grid(alpha=0.3)
    return figure


def trial_curves(
    curves: dict[str, list[tuple[int, float]]], metric: str, best: str, exploits: dict[str, list[tuple[int, str]]] | None = None
) -> Figure:
    """Every trial's metric per epoch on one figure; trials stopped early end early; the best is bold.
    `exploits` (PBT): per trial, (epoch, copied trial): a star where the trial took another's weights, its
    curve going on from there."""
    figure, axes = plt.subplots(figsize=(7, 4.5), constrained_layout=True)
    marked = False
    for trial, points in sorted(curves.items()):
        epochs, values = zip(*points, strict=True)
        bold = trial == best
        line = axes.plot(epochs, values, marker="o", markersize=3, linewidth=2.5 if bold else 1, alpha=1 if bold else 0.6,
                         label=f"{trial} (best)" if bold else trial)[0]  # fmt: skip
        at = dict(points)
        for epoch, copied in (exploits or {}).get(trial, []):
            if epoch in at:
                axes.plot([epoch], [at[epoch]], marker="*", markersize=13, color=line.get_color(), markeredgecolor="black",
                          linestyle="none", label=None if marked else "exploit: the next epoch on another trial's weights")  # fmt: skip
                axes.annotate(f"<- {copied}", (epoch, at[epoch]), textcoords="offset points", xytext=(6, 6), fontsize=6)
                marked = True
    axes.set(xlabel="epoch", ylabel=metric, title=f"{metric} of every trial" + (" (PBT)" if exploits else ""))
    axes.grid(alpha=0.3)
    _whole_epochs(axes)
    if len(curves) <= 12:
        axes.legend(fontsize=7)
    return figure


def _whole_epochs(axes: Axes) -> None:
    """Ticks at whole numbers only: the x axis counts epochs."""
    locator = axes.xaxis.get_major_locator()
    if isinstance(locator, MaxNLocator):  # the default, AutoLocator, is one; set_params(integer=) is MaxNLocator's
        locator.set_params(integer=True)
