"""train.compile (pipeline/loop.py): torch.compile before DDP, checkpoints with the plain model's keys, one
run with or without it, and a compiler that fails named in one line. In this process, on tiny data.

The first compiled run on a fresh machine pays inductor's compilation (20 s on 2 quiet CPU cores, 50 s on
busy ones); the later ones, in this session or a later one, find the graphs in inductor's cache (seconds)."""

from __future__ import annotations

import functools
from pathlib import Path

import pytest
import torch
from torch import nn

from pipeline.checkpoints import load_state
from pipeline.config import ExperimentConfig, load_config
from pipeline.data.store import DatasetSpec
from pipeline.errors import RunFailed
from pipeline.loop import load_checkpoint, plain_module
from pipeline.models import model_for
from pipeline.train import TrainingResult, run_training
from tests.helpers import CONF_DIR, tiny


def _mlp(data_root: Path, storage: Path, *extra: str) -> ExperimentConfig:
    # model.dropout=0: compiled code draws dropout's masks from another random stream than eager code, so
    # only without dropout do the two compute the same model, to float rounding.
    overrides = tiny(data_root, storage, "scaling.num_workers=0", "model.hidden=[32]", "model.dropout=0", *extra)
    return load_config(CONF_DIR / "mnist_mlp.yaml", overrides)


@pytest.fixture(scope="module")
def trained(data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, TrainingResult]:
    """One epoch of the same run, eager and compiled, each in its own storage (train.compile is no part of
    the run's identity: in one storage the second would be `already trained`)."""
    return {
        mode: run_training(_mlp(data_root, tmp_path_factory.mktemp(mode), f"train.compile={mode == 'compiled'}"), track=False)
        for mode in ("eager", "compiled")
    }


def test_a_compiled_run_checkpoints_the_plain_models_keys(trained: dict[str, TrainingResult]) -> None:
    result = trained["compiled"]
    assert result.outcome == "trained" and result.metrics["train_loss"] > 0
    state = load_state(Path(result.checkpoint))
    cfg = ExperimentConfig.model_validate(state["experiment"])
    assert cfg.train.compile
    plain = model_for(cfg, DatasetSpec.from_json(state["dataset"]))
    assert list(state["model"]) == list(plain.state_dict())  # no `_orig_mod.` prefix
    plain.load_state_dict(state["model"])  # strict: every key, no other
    model, _ = load_checkpoint(result.checkpoint)  # as predict and serving rebuild it
    assert not model.training


def test_plain_module_unwraps_torch_compile_without_compiling() -> None:
    net = nn.Linear(2, 1)
    assert plain_module(torch.compile(net)) is net  # type: ignore[arg-type]
    assert plain_module(net) is net


def test_compiled_and_eager_runs_of_one_seed_have_close_losses(trained: dict[str, TrainingResult]) -> None:
    eager, compiled = trained["eager"].metrics, trained["compiled"].metrics
    # Fused kernels add in another order: equal to float rounding, not bit for bit.
    assert compiled["train_loss"] == pytest.approx(eager["train_loss"], rel=1e-3)
    assert compiled["val_loss"] == pytest.approx(eager["val_loss"], rel=1e-3)
    assert compiled["val_accuracy"] == pytest.approx(eager["val_accuracy"], abs=0.05)  # one sample of 20 at most


def test_a_compiled_run_resumes_without_compile_and_back(data_root: Path, tmp_path: Path) -> None:
    first = run_training(_mlp(data_root, tmp_path, "train.compile=true"), track=False)
    second = run_training(_mlp(data_root, tmp_path, "train.compile=false", "train.epochs=2"), track=False)
    # CUDA graphs (train.compile_mode=reduce-overhead) on a GPU; here, on a CPU, torch compiles as `default`.
    third = run_training(
        _mlp(data_root, tmp_path, "train.compile=true", "train.compile_mode=reduce-overhead", "train.epochs=3"), track=False
    )
    assert first.run_key == second.run_key == third.run_key  # one run: train.compile(_mode) may change on resume
    assert [(r.outcome, [m["epoch"] for m in r.history]) for r in (first, second, third)] == [
        ("trained", [1]),
        ("resumed", [2]),
        ("resumed", [3]),
    ]
    assert list(load_state(Path(third.checkpoint))["model"]) == list(load_state(Path(first.checkpoint))["model"])


def test_a_compiler_that_fails_is_named_in_one_line_with_the_fix(data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def no_compiler(graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> None:
        raise RuntimeError("no working C++ compiler found")  # as inductor says on a machine without one

    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend=no_compiler))
    with pytest.raises(RunFailed) as failure:
        run_training(_mlp(data_root, tmp_path, "train.compile=true"), track=False)
    message = str(failure.value)
    assert "train.compile=true" in message and "RuntimeError: no working C++ compiler found" in message
    assert message.endswith("set train.compile=false to train without it") and "\n" not in message
