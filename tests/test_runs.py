"""Runs that mean what they say: what a run is (its key), what a re-run does, which split decides what.

Against a real SQLite MLflow store: through the command a user types (`pipeline train ...`) where what it
prints matters, else through run_training in this process (a `pipeline` process costs ~15 s on 2 cores to
start and track). The key itself is checked without training. Nothing here starts Ray.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.runs import RESUMABLE_KEYS, delete_run, run_key
from pipeline.train import run_training
from tests.helpers import CONF_DIR, metric_steps, mlflow_client, run_cli, run_dir, summary_of, tiny


def _train(overrides: list[str], conf: str = "mnist_mlp.yaml", *, register: bool = True, fresh: bool = False) -> dict:
    """A run trained in this process: the summary `pipeline train --output json` prints."""
    return run_training(load_config(CONF_DIR / conf, overrides), register=register, fresh=fresh).summary()


@pytest.mark.parametrize(
    "override",
    ["optim.lr=0.01", "data.val_fraction=0.2", "data.augment.hflip=true", "data.batch_size=32", "model.hidden=[64]", "seed=1",
     "loss=mse", "train.metric=val_loss", "data.limit=64", "data.normalize=false", "data.num_samples=500",
     "data.image_size=[14, 14]", "optim.name=sgd", "train.amp=true"],
)  # fmt: skip
def test_a_key_that_defines_the_result_makes_another_run(override: str) -> None:
    base = load_config(CONF_DIR / "mnist_mlp.yaml")
    assert run_key(load_config(CONF_DIR / "mnist_mlp.yaml", [override]), "data") != run_key(base, "data")


@pytest.mark.parametrize(
    "override",
    ["train.epochs=30", "train.max_failures=2", "scaling.num_workers=4", "scaling.runner=ray", "storage_path=/elsewhere",
     "data.root=/mnt/data", "data.download=false", "data.loader=stream", "tracking.uri=http://mlflow:5000",
     "tracking.register_as=other", "train.channels_last=true", "train.compile=true", "tune.num_samples=9"],
)  # fmt: skip
def test_a_key_that_may_change_on_resume_keeps_the_run(override: str) -> None:
    base = load_config(CONF_DIR / "mnist_mlp.yaml")
    assert run_key(load_config(CONF_DIR / "mnist_mlp.yaml", [override]), "data") == run_key(base, "data")
    assert any(override.startswith(f"{key}.") or override.startswith(f"{key}=") for key in RESUMABLE_KEYS)


def test_other_data_makes_another_run_and_a_search_is_keyed_by_its_space() -> None:
    cfg = load_config(CONF_DIR / "mnist_mlp.yaml")
    assert run_key(cfg, "data-a") != run_key(cfg, "data-b")  # the Parquet manifest's content hash
    other = load_config(CONF_DIR / "mnist_mlp.yaml", ["tune.space={optim.lr: {uniform: [0.01, 0.1]}}"])
    assert run_key(other, "data", search=True) != run_key(cfg, "data", search=True)
    more = load_config(CONF_DIR / "mnist_mlp.yaml", ["tune.num_samples=9"])  # the same search, grown (search_batches.py)
    assert run_key(more, "data", search=True) == run_key(cfg, "data", search=True)
    assert run_key(load_config(CONF_DIR / "mnist_mlp.yaml", ["tune.max_concurrent_trials=1"]), "data", search=True) == run_key(
        cfg, "data", search=True
    )


def test_rerun_changed_config_fresh_and_more_epochs_through_the_command_line(data_root: Path, tmp_path: Path, tracking_store: str) -> None:
    args = ["train", "conf/mnist_mlp.yaml", *tiny(data_root, tmp_path, "name=rerun_mlp", "model.hidden=[16]"), "--output", "json"]
    first = _train(args[2:-2])  # in this process (the steps whose console output is asserted go through the command)
    assert first["outcome"] == "trained" and first["registration"]["version"] in (1, "1")

    # The command of that run: nothing trained, nothing registered, the same run and numbers shown.
    again = run_cli(*args)
    repeated = summary_of(again)
    assert repeated["outcome"] == "already trained" and repeated["history"] == []
    assert f"rerun_mlp ({first['run_key']}) is already trained" in again.stderr
    assert {k: repeated[k] for k in ("run_key", "mlflow_run_id", "metrics", "checkpoint", "registration")} == {
        k: first[k] for k in ("run_key", "mlflow_run_id", "metrics", "checkpoint", "registration")
    }
    client = mlflow_client(tracking_store)
    assert len(client.search_model_versions("name = 'rerun_mlp'")) == 1

    # Another learning rate (the override after an option: any order): a new run, its difference named.
    changed = run_cli("train", "conf/mnist_mlp.yaml", "--output", "json", *tiny(data_root, tmp_path, "name=rerun_mlp", "model.hidden=[16]"),
                      "optim.lr=0.01")  # fmt: skip
    new = summary_of(changed)
    assert new["outcome"] == "trained" and new["run_key"] != first["run_key"]
    assert f"differs from run {first['run_key']} in optim.lr: 0.001 -> 0.01" in changed.stderr
    assert new["mlflow_run_id"] != first["mlflow_run_id"] and new["registration"]["version"] in (2, "2")
    assert Path(first["checkpoint"]).is_dir(), "the first run's folder is untouched"

    # More epochs of the first run: it resumes (same key, same MLflow run) and trains the new epoch only.
    more = _train([*args[2:-2], "train.epochs=2"])
    assert more["outcome"] == "resumed" and more["run_key"] == first["run_key"] and more["mlflow_run_id"] == first["mlflow_run_id"]
    assert [m["epoch"] for m in more["history"]] == [2]
    registered = client.search_model_versions(f"name = 'rerun_mlp' and run_id = '{first['mlflow_run_id']}'")
    assert len(registered) == len({1, more["checkpoint_metrics"]["epoch"]}), "a checkpoint is registered once"

    # --fresh: that run from scratch, as a new MLflow run; the other run stays.
    fresh = _train(args[2:-2], fresh=True)
    assert fresh["outcome"] == "trained" and fresh["run_key"] == first["run_key"]
    assert fresh["mlflow_run_id"] != first["mlflow_run_id"] and [m["epoch"] for m in fresh["history"]] == [1]
    assert Path(new["checkpoint"]).is_dir()


def test_without_validation_the_last_epoch_is_the_model_and_the_test_split_is_measured_on_it(
    data_root: Path, tmp_path: Path, tracking_store: str
) -> None:
    summary = _train(tiny(data_root, tmp_path, "name=no_val", "data.val_fraction=0", "train.epochs=3"))
    assert all(not key.startswith("val_") for epoch in summary["history"] for key in epoch), "no validation, no val_* metrics"
    assert summary["checkpoint"].endswith("checkpoint_epoch=0003") and summary["checkpoint_metrics"]["epoch"] == 3
    assert {"test_loss", "test_accuracy"} <= set(summary["checkpoint_metrics"])
    registration = summary["registration"]
    assert (registration["metric"], registration["split"]) == ("test_accuracy", "test")
    assert registration["value"] == summary["checkpoint_metrics"]["test_accuracy"]
    client = mlflow_client(tracking_store)
    run = client.get_run(summary["mlflow_run_id"])
    assert not any(key.startswith("val_") for key in run.data.metrics)
    assert metric_steps(client, run.info.run_id, "test_accuracy") == [3]


def test_the_checkpoint_is_chosen_on_validation_and_only_then_tested(data_root: Path, tmp_path: Path, tracking_store: str) -> None:
    import numpy as np

    from pipeline.data.store import load_test_split, materialize
    from pipeline.registry import load_model

    overrides = tiny(data_root, tmp_path, "name=chosen", "train.epochs=4", "optim.lr=0.05", "train.checkpoints_to_keep=1")
    summary = _train(overrides)
    history = {m["epoch"]: m["val_accuracy"] for m in summary["history"]}
    best = max(history, key=lambda epoch: (history[epoch], -epoch))  # the earliest of equals, as Ray and LocalSession rank
    assert summary["checkpoint_metrics"]["epoch"] == best
    # The registered number is the registered model's accuracy on the test rows, recomputed here.
    cfg = load_config(CONF_DIR / "mnist_mlp.yaml", overrides)
    x, y = load_test_split(materialize(cfg.data, cfg.seed), cfg.data)
    os.environ["MLFLOW_TRACKING_URI"] = tracking_store
    predicted = load_model("chosen@champion").predict_table(x)["class_index"].to_numpy()
    assert summary["registration"]["value"] == pytest.approx(float(np.mean(predicted == y)), abs=1e-6)
    version = mlflow_client(tracking_store).get_model_version("chosen", summary["registration"]["version"])
    assert version.tags["metric_split"] == "test" and version.tags["checkpoint_epoch"] == str(best)


def test_a_version_trained_on_other_data_is_not_compared_with_the_champion(tmp_path: Path, tracking_store: str) -> None:
    common = [f"storage_path={tmp_path}", f"data.root={tmp_path}", "tracking.register_as=other_data", "scaling.num_workers=0"]
    first = _train([*common, "name=data_a", "data.num_samples=400"], "linear_regression.yaml")
    second = _train([*common, "name=data_b", "data.num_samples=600", "train.epochs=20"], "linear_regression.yaml")
    assert first["registration"]["alias"] == "champion"
    assert second["registration"]["alias"] == "challenger", "its numbers are on other rows: not comparable"
    assert "not compared" in second["registration"]["reason"] and "other data" in second["registration"]["reason"]
    tags = mlflow_client(tracking_store).get_model_version("other_data", second["registration"]["version"]).tags
    assert tags["decision"] == "challenger" and "other data" in tags["decision_reason"]
    assert (
        tags["data_hash"]
        != mlflow_client(tracking_store).get_model_version("other_data", first["registration"]["version"]).tags["data_hash"]
    )


@pytest.mark.parametrize("name", [".", "..", ".hidden", "a/b"])
def test_a_run_name_is_one_safe_folder_name(name: str, tmp_path: Path) -> None:
    (tmp_path / "keep").mkdir()
    done = run_cli("train", "conf/linear_regression.yaml", f"name={name}", f"storage_path={tmp_path / 'runs'}", "--fresh")
    assert done.returncode == 2 and "name: String should match pattern" in done.stderr and "Traceback" not in done.stderr
    assert (tmp_path / "keep").is_dir() and not (tmp_path / "runs").exists()


def test_fresh_deletes_only_the_run_s_own_folder(tmp_path: Path) -> None:
    cfg = load_config(CONF_DIR / "linear_regression.yaml", [f"storage_path={tmp_path}"])
    for outside in (str(tmp_path), f"{tmp_path}/linear_regression", f"{tmp_path}/linear_regression/..", f"{tmp_path}/other/key"):
        with pytest.raises(ConfigError, match="refusing to delete"):
            delete_run(cfg, outside)


def test_the_record_says_what_a_run_is(data_root: Path, tmp_path: Path) -> None:
    summary = _train(tiny(data_root, tmp_path, "name=recorded"), register=False)
    record = json.loads((run_dir(tmp_path, "recorded") / "run.json").read_text())
    assert record["key"] == summary["run_key"] and record["identity"]["optim.lr"] == 0.001
    assert "train.epochs" not in record["identity"] and "data_hash" in record["identity"]
    assert record["result"]["checkpoint"] == summary["checkpoint"] and record["result"]["registration"] is None
    # Asked to register now: nothing is trained, the recorded checkpoint is registered.
    registered = _train(tiny(data_root, tmp_path, "name=recorded"))
    assert registered["history"] == [] and registered["registration"]["alias"] == "champion"
    assert registered["checkpoint"] == summary["checkpoint"]


def test_a_refused_rerun_leaves_the_finished_run_as_it_was(data_root: Path, tmp_path: Path, tracking_store: str) -> None:
    args = tiny(data_root, tmp_path, "name=kept_finished")
    first = _train(args)
    (tmp_path / "empty").mkdir()
    refused = run_cli("train", "conf/mnist_mlp.yaml", *args, f"data.root={tmp_path / 'empty'}")  # the data files are gone
    assert refused.returncode == 2 and "train-images-idx3-ubyte" in refused.stderr
    run = mlflow_client(tracking_store).get_run(first["mlflow_run_id"])
    assert run.info.status == "FINISHED"
    assert mlflow_client(tracking_store).get_model_version_by_alias("kept_finished", "champion").run_id == run.info.run_id
