"""`pipeline runs` and `pipeline models`: what the tracking store holds, read from the terminal, never written."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.config import load_config
from pipeline.records import NotFound, model_rows, run_rows
from pipeline.tracking import resolve_store
from pipeline.train import run_training
from tests.helpers import CONF_DIR, run_cli


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """Two in-process trainings of one experiment that differ in optim.lr, both registered: (first, second) run ids."""
    folder = tmp_path_factory.mktemp("records")
    base = [f"storage_path={folder}", f"data.root={folder}", "name=records", "scaling.num_workers=0", "data.num_samples=400"]
    first = run_training(load_config(CONF_DIR / "linear_regression.yaml", [*base, "optim.lr=0.05", "train.epochs=3"]))
    second = run_training(load_config(CONF_DIR / "linear_regression.yaml", [*base, "optim.lr=0.001", "train.epochs=1"]))
    assert first.mlflow_run_id and second.mlflow_run_id
    return first.mlflow_run_id, second.mlflow_run_id


def test_runs_are_listed_newest_first_with_what_differs_between_them(two_runs: tuple[str, str]) -> None:
    first, second = two_runs
    rows = run_rows(resolve_store(None), "records")
    assert [row["run_id"] for row in rows] == [second, first]
    assert [row["params"] for row in rows] == [{"optim.lr": "0.001", "train.epochs": "1"}, {"optim.lr": "0.05", "train.epochs": "3"}]
    assert [(row["status"], row["epochs"], row["metric"]) for row in rows] == [("FINISHED", 1, "val_mse"), ("FINISHED", 3, "val_mse")]
    assert rows[1]["value"] < rows[0]["value"], "three epochs at lr 0.05 fit better than one at 0.001"
    assert all(row["command"].startswith("Made by `") for row in rows)


def test_models_list_every_version_with_its_alias_and_decision(two_runs: tuple[str, str]) -> None:
    first, second = two_runs
    rows = model_rows(resolve_store(None), "records")
    assert [(row["version"], row["aliases"], row["decision"], row["run_id"]) for row in rows] == [
        (2, ["challenger"], "challenger", second),
        (1, ["champion"], "champion", first),
    ]
    assert rows[0]["reason"].startswith("val_mse") and "does not beat champion version 1" in rows[0]["reason"]
    assert {(row["metric"], row["split"]) for row in rows} == {("val_mse", "val")}


def test_an_unknown_name_is_refused_listing_what_exists(two_runs: tuple[str, str]) -> None:
    with pytest.raises(NotFound, match=r"no experiment 'nope' in sqlite:.*; the experiments: .*records"):
        run_rows(resolve_store(None), "nope")
    with pytest.raises(NotFound, match=r"no registered model 'nope' in sqlite:.*; the registered models: .*records"):
        model_rows(resolve_store(None), "nope")


def test_the_commands_print_json_and_never_create_a_store(two_runs: tuple[str, str], tmp_path: Path) -> None:
    done = run_cli("models", "records", "--output", "json")
    assert done.returncode == 0, done.stderr
    assert [row["version"] for row in json.loads(done.stdout)] == [2, 1]
    # Where nothing was tracked: exit 2 naming the store, and no mlflow.db made by looking.
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    empty = run_cli("runs", cwd=tmp_path, env=env)
    assert empty.returncode == 2 and f"no store at {tmp_path / 'mlflow.db'}: nothing has been tracked here yet" in empty.stderr
    assert list(tmp_path.iterdir()) == []
