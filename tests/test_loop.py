"""The worker loop (pipeline/loop.py) on its own: no Ray, no MLflow, tiny tensors, exact expected values."""

from __future__ import annotations

import io
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.checkpoints import LocalSession
from pipeline.config import ExperimentConfig, OptimConfig, load_config
from pipeline.data.store import materialize
from pipeline.loop import (
    DivergedError,
    OneProcess,
    evaluate,
    load_checkpoint,
    make_optimizer,
    preprocessor,
    restore_optimizer,
    run_worker,
    train_epoch,
)
from tests.helpers import CONF_DIR

CPU = torch.device("cpu")


def _linear_config(tmp_path: Path, *overrides: str) -> ExperimentConfig:
    return load_config(CONF_DIR / "linear_regression.yaml", [f"data.root={tmp_path / 'data'}", "data.num_samples=256", *overrides])


def _session(folder: Path, cfg: ExperimentConfig) -> LocalSession:
    return LocalSession(folder, keep=2, metric=cfg.metric, mode=cfg.metric_mode, device=CPU)


def test_the_worker_loop_imports_neither_ray_nor_mlflow() -> None:
    code = "import sys, pipeline.loop; print(sorted({m.split('.')[0] for m in sys.modules} & {'ray', 'mlflow'}))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_evaluate_is_the_exact_mean_loss_and_accuracy_over_every_batch() -> None:
    cfg = load_config(CONF_DIR / "circles_classifier.yaml", [])
    model = nn.Identity()  # the logits are the inputs: correct where the sign matches the target
    logits = torch.tensor([[2.0], [-1.0], [0.5], [-3.0], [1.0]])
    target = torch.tensor([[1.0], [0.0], [0.0], [0.0], [1.0]])
    batches = [(logits[:2], target[:2]), (logits[2:], target[2:])]  # unequal batches: a mean of means would be wrong
    metrics = evaluate(model, batches, nn.BCEWithLogitsLoss(), lambda x: x, cfg, OneProcess(CPU), prefix="val")
    expected_loss = nn.BCEWithLogitsLoss()(logits, target).item()
    assert metrics == pytest.approx({"val_loss": expected_loss, "val_accuracy": 4 / 5})


def test_a_training_epoch_lowers_the_loss_and_counts_every_sample(tmp_path: Path) -> None:
    cfg = _linear_config(tmp_path, "optim.lr=0.05")
    spec = materialize(cfg.data, cfg.seed)
    torch.manual_seed(0)
    model = nn.Linear(2, 1)
    x = torch.randn(64, 2)
    y = x @ torch.tensor([[2.0], [-3.4]]) + 4.2
    batches = [(x[i : i + 16], y[i : i + 16]) for i in range(0, 64, 16)]
    optimizer = make_optimizer(cfg.optim, model.parameters())
    prep = preprocessor(cfg.model_copy(update={"data": cfg.data.model_copy(update={"normalize": False})}), spec, CPU)
    first = train_epoch(model, 4, batches, nn.MSELoss(), optimizer, prep, cfg, _session(tmp_path, cfg), 1, None)
    second = train_epoch(model, 4, batches, nn.MSELoss(), optimizer, prep, cfg, _session(tmp_path, cfg), 2, None)
    assert second["train_loss"] < first["train_loss"]
    assert first["samples_per_sec"] > 0 and set(first) == {"train_loss", "samples_per_sec"}


def test_a_non_finite_loss_stops_the_epoch_naming_it_and_optim_lr(tmp_path: Path) -> None:
    cfg = _linear_config(tmp_path, "optim.lr=0.05")
    spec = materialize(cfg.data, cfg.seed)
    model = nn.Linear(2, 1)
    batches = [(torch.full((4, 2), math.inf), torch.zeros(4, 1))]
    optimizer = make_optimizer(cfg.optim, model.parameters())
    with pytest.raises(DivergedError, match=r"train_loss is (nan|inf) in epoch 3.*optim\.lr \(now 0\.05\)"):
        train_epoch(model, 1, batches, nn.MSELoss(), optimizer, preprocessor(cfg, spec, CPU), cfg, _session(tmp_path, cfg), 3, None)


def test_the_optimizer_leaves_frozen_parameters_out() -> None:
    model = nn.Sequential(nn.Linear(3, 3), nn.Linear(3, 1))
    model[0].requires_grad_(False)
    optimizer = make_optimizer(OptimConfig(name="sgd", lr=0.1), model.parameters())
    optimized = [p for group in optimizer.param_groups for p in group["params"]]
    assert len(optimized) == 2 and all(p.requires_grad for p in optimized)


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd", "adagrad", "rmsprop"])
def test_a_fused_optimizer_is_torch_s_fused_one_where_it_has_one(name: str) -> None:
    fused = make_optimizer(OptimConfig(name=name), nn.Linear(3, 1).parameters(), fused=True)
    default = make_optimizer(OptimConfig(name=name), nn.Linear(3, 1).parameters())
    assert fused.param_groups[0].get("fused") is (None if name == "rmsprop" else True)  # rmsprop has none
    assert not default.param_groups[0].get("fused")


def _steps(model: nn.Module, optimizer: torch.optim.Optimizer, count: int) -> None:
    for step in range(count):
        torch.manual_seed(step)
        optimizer.zero_grad()
        nn.MSELoss()(model(torch.randn(8, 3)), torch.randn(8, 1)).backward()
        optimizer.step()


@pytest.mark.parametrize("saved_fused", [False, True])
def test_an_optimizer_state_resumes_in_this_run_s_implementation_with_the_same_update(saved_fused: bool) -> None:
    cfg = OptimConfig(name="adam", lr=0.01)
    torch.manual_seed(0)
    saved_model = nn.Linear(3, 1)
    saved = make_optimizer(cfg, saved_model.parameters(), fused=saved_fused)
    _steps(saved_model, saved, 3)
    checkpoint = io.BytesIO()  # as a checkpoint holds it: a copy, not the live tensors
    torch.save(saved.state_dict(), checkpoint)
    resumed: dict[bool, nn.Module] = {}
    for fused in (False, True):  # a checkpoint from a GPU run (fused) resumed on a CPU (not), and the reverse
        model = nn.Linear(3, 1)
        model.load_state_dict(saved_model.state_dict())
        optimizer = make_optimizer(cfg, model.parameters(), fused=fused)
        checkpoint.seek(0)
        restore_optimizer(optimizer, torch.load(checkpoint), cfg)
        assert bool(optimizer.param_groups[0]["fused"]) is fused  # load_state_dict alone brings back the saved one's
        _steps(model, optimizer, 2)
        resumed[fused] = model
    _steps(saved_model, saved, 2)
    for after in resumed.values():  # Adam's moments and step counts came along: the same update as not stopping
        for got, want in zip(after.parameters(), saved_model.parameters(), strict=True):
            torch.testing.assert_close(got, want)


def test_run_worker_resumes_from_its_checkpoint_and_records_every_epoch_once(tmp_path: Path) -> None:
    cfg = _linear_config(tmp_path, "train.epochs=2")
    spec = materialize(cfg.data, cfg.seed)
    logged: list[list[dict]] = []
    run_worker(cfg, spec, _session(tmp_path / "run", cfg), None, lambda history: logged.append(list(history)))
    more = cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 3})})
    session = _session(tmp_path / "run", more)
    run_worker(more, spec, session, None, lambda history: logged.append(list(history)))
    # the resumed run starts at epoch 3, with epochs 1 and 2 in its history, each as first recorded
    assert [[m["epoch"] for m in history] for history in logged] == [[1], [1, 2], [1, 2, 3]]
    assert logged[2][:2] == logged[1]
    model, state = load_checkpoint(session.best_checkpoint() or "")
    best = min(logged[2], key=lambda m: m["val_mse"])  # the run's model: its best epoch by validation
    assert state["epoch"] == best["epoch"] and state["metrics"] == best
    assert not model.training
