"""The pre-run checks (pipeline/checks.py), called directly: each refusal names its key, and none needs Ray."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.checks import check_search, check_training
from pipeline.config import ConfigError, load_config
from tests.helpers import CONF_DIR, REPO


def _config(tmp_path: Path, conf: str, *overrides: str):
    return load_config(CONF_DIR / conf, [f"data.root={tmp_path / 'data'}", f"storage_path={tmp_path / 'runs'}", *overrides])


@pytest.mark.parametrize(
    ("conf", "overrides", "expected"),
    [
        ("linear_regression.yaml", ["scaling.runner=in_process", "scaling.num_workers=2"], "scaling.runner: in_process trains one worker"),
        ("linear_regression.yaml", ["scaling.runner=ray", "scaling.num_workers=0"], "scaling.runner: ray needs scaling.num_workers >= 1"),
        ("linear_regression.yaml", ["data.loader=stream", "scaling.num_workers=0"], "data.loader: the data streams through Ray Data"),
        ("linear_regression.yaml", ["data.root=s3://bucket/data"], "data.root: s3://bucket/data is a URI; data sets are materialized"),
        ("linear_regression.yaml", ["scaling.num_workers=[1,2]"], "scaling.num_workers: [1, 2] resizes the group when workers or nodes"),
        ("linear_regression.yaml", ["data.val_fraction=0"], "data.val_fraction: linear has no test split"),
        ("linear_regression.yaml", ["train.metric=test_mse"], "train.metric: checkpoints are ranked by validation metrics only"),
        ("linear_regression.yaml", ["data.batch_size=100000"], "data.batch_size: 100000 per worker x 1 workers is more than"),
        ("linear_regression.yaml", ["data.root=/proc/pipeline-data"], "data.root: cannot write to /proc/pipeline-data"),
        ("circles_classifier.yaml", ["loss=mse"], "loss: mse does not fit circles, a classification dataset"),
        ("circles_classifier.yaml", ["model.name=lenet"], "model.name: lenet takes images of shape (channels, height, width)"),
    ],
)
def test_a_run_that_cannot_work_is_refused_naming_its_key(conf: str, overrides: list[str], expected: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as refused:
        check_training(_config(tmp_path, conf, *overrides))
    assert expected in str(refused.value)


@pytest.mark.parametrize(
    ("overrides", "retrain", "expected"),
    [
        ([], False, "tune.space: empty"),
        (["tune.space={optim.lr: {uniform: [0.2, 0.1]}}"], False, "tune.space.optim.lr.uniform: low 0.2 must be below high 0.1"),
        (["tune.space={optim.lr: {loguniform: [0.001, 0.1]}}", "tune.metric=test_mse"], False, "tune.metric: trials are selected by validation"),
        (["tune.space={optim.lr: {loguniform: [0.001, 0.1]}}"], True, "tune.retrain_best: linear has no test split"),
        (["tune.space={optim.lr: {grid: [0.01, 0.1]}}", "tune.search=optuna"], False, "tune.search: optuna cannot search a grid"),
        (["tune.space={optim.lr: {grid: [0.01, 0.1]}}", "tune.trial_runner=in_process", "scaling.num_workers=2"], False,
         "tune.trial_runner: in_process trains each trial in one process"),
    ],
)  # fmt: skip
def test_a_search_that_cannot_work_is_refused_naming_its_key(overrides: list[str], retrain: bool, expected: str, tmp_path: Path) -> None:
    cfg = _config(tmp_path, "linear_regression.yaml", "tune.space={}", *overrides)
    with pytest.raises(ConfigError) as refused:
        check_search(cfg, retrain=retrain)
    assert expected in str(refused.value)


def test_a_valid_search_passes_with_its_parsed_space(tmp_path: Path) -> None:
    cfg = _config(tmp_path, "linear_regression.yaml", "tune.space={optim.lr: {loguniform: [0.001, 0.1]}, optim.name: {grid: [sgd, adam]}}")
    spec, dimensions = check_search(cfg)
    assert spec.name == "linear" and [(d.key, d.kind, d.args) for d in dimensions] == [
        ("optim.lr", "loguniform", (0.001, 0.1)),
        ("optim.name", "grid", ("sgd", "adam")),
    ]


def test_the_checks_run_without_starting_or_importing_ray(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from pipeline.checks import check_training\n"
        "from pipeline.config import load_config\n"
        f"check_training(load_config('conf/mnist_mlp.yaml', ['data.name=linear', 'model.name=linear_regression', 'loss=mse',"
        f" 'data.root={tmp_path}', 'storage_path={tmp_path}', 'scaling.num_workers=2']))\n"
        "print('ray' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"  # a 2-worker run, checked without Ray: Ray starts only after the checks
