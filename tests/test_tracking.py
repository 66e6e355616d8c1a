"""MLflow end to end: runs, metrics, tags and artifacts; the registry's champion rule; downstream loading.

Against a real `mlflow server` on 127.0.0.1 (SQLite backend, served artifacts) and, for the embedded
default, a SQLite store in the working directory. Nothing is mocked.
"""

from __future__ import annotations

import json
import os
import secrets
import sqlite3
import subprocess
import sys
import threading
from contextlib import closing
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
from mlflow import MlflowClient
from pandas.testing import assert_frame_equal

from pipeline.config import ExperimentConfig, load_config
from pipeline.data.store import DatasetSpec, load_splits, materialize, split_sizes
from pipeline.lineage import log_datasets
from pipeline.loop import load_checkpoint
from pipeline.sqlite_store import template_path
from pipeline.tracking import Store, TrackedRun, check_store
from pipeline.train import run_training
from tests.helpers import CONF_DIR, REPO, Stack, free_port, last_json, metric_steps, mlflow_client, run_cli, runs_of, tiny

PNG_CLASSES = 3  # test images per predict call


def _server_env(monkeypatch: pytest.MonkeyPatch, url: str) -> MlflowClient:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
    return MlflowClient(url, url)


@pytest.mark.ray
@pytest.mark.workers
@pytest.mark.mlflow_server
def test_a_ray_run_is_one_mlflow_run_with_every_epoch_once_and_its_lineage(
    mlflow_server: str, ray_local, data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = _server_env(monkeypatch, mlflow_server)
    overrides = tiny(data_root, tmp_path, "name=tracked_mlp", "scaling.runner=ray", "model.hidden=[32]")
    first = run_training(load_config(CONF_DIR / "mnist_mlp.yaml", [*overrides, "train.epochs=2"]))
    again = run_training(load_config(CONF_DIR / "mnist_mlp.yaml", [*overrides, "train.epochs=3"]))  # continues

    (run,) = runs_of(client, "tracked_mlp")
    assert first.mlflow_run_id == again.mlflow_run_id == run.info.run_id
    assert run.info.status == "FINISHED"
    for key in ("epoch", "train_loss", "val_loss", "val_accuracy", "samples_per_sec"):
        assert metric_steps(client, run.info.run_id, key) == [1, 2, 3], key
    # The test split, measured on each invocation's model (its best epoch by validation), once per model.
    models = sorted({first.checkpoint_metrics["epoch"], again.checkpoint_metrics["epoch"]})
    assert metric_steps(client, run.info.run_id, "test_accuracy") == models
    params = run.data.params
    assert params["optim.lr"] == "0.001" and params["model.hidden"] == "[32]" and params["data.name"] == "mnist"
    assert params["train.epochs"] == "2" and "train.epochs: 2 -> 3" in run.data.tags["changed_on_resume"]
    tags = run.data.tags
    assert tags["num_workers"] == "1" and tags["runner"] == "ray" and tags["device"] == "cpu" and tags["ray_run"] == "tracked_mlp"
    assert len(tags["config_hash"]) == 12 and tags["run_dir"] == f"{tmp_path}/tracked_mlp/{first.run_key}"
    assert tags["run_key"] == first.run_key == again.run_key
    assert tags["data_hash"] == json.loads((data_root / "parquet" / "mnist" / "manifest.json").read_text())["data_hash"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True, check=True).stdout.strip()
    assert tags["git_commit"].removesuffix("-dirty").endswith(head)  # `git describe`: the commit, after a tag if any
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)} | {a.path for a in client.list_artifacts(run.info.run_id, "plots")}
    assert {"config.yaml", "plots/learning_curves.png", "plots/confusion_matrix.png"} <= artifacts

    versions = client.search_model_versions("name = 'tracked_mlp'")
    assert len(versions) == len(models)  # a checkpoint is registered once: one version per model the run stood for
    assert {v.run_id for v in versions} == {run.info.run_id}
    assert {v.tags["checkpoint_epoch"] for v in versions} == {str(epoch) for epoch in models}


def _linear(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return [f"name={name}", f"storage_path={tmp_path}", f"data.root={tmp_path}", "scaling.num_workers=0",
            "data.num_samples=400", "tracking.register_as=linear_champion", *extra]  # fmt: skip


@pytest.mark.mlflow_server
def test_a_worse_model_stays_challenger_and_a_better_one_takes_champion(
    mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = _server_env(monkeypatch, mlflow_server)
    conf = CONF_DIR / "linear_regression.yaml"
    good = run_training(load_config(conf, _linear(tmp_path, "lin_good", "train.epochs=3", "optim.lr=0.05")))
    worse = run_training(load_config(conf, _linear(tmp_path, "lin_worse", "train.epochs=1", "optim.lr=0.001")))
    better = run_training(load_config(conf, _linear(tmp_path, "lin_better", "train.epochs=20", "optim.lr=0.05")))

    first, second, third = good.registration, worse.registration, better.registration
    assert first is not None and second is not None and third is not None, "every run registers a version"
    assert first["alias"] == "champion" and first["champion_value"] is None
    assert second["alias"] == "challenger"
    assert second["value"] > first["value"]  # val_mse: lower is better
    assert third["alias"] == "champion"
    assert third["value"] < third["champion_value"] == first["value"]
    model = client.get_registered_model("linear_champion")
    assert model.aliases == {"champion": third["version"], "challenger": second["version"]}
    # Descriptions a person reads in the UI: the model's, and each version's metric and decision.
    assert client.get_registered_model("linear_champion").description.startswith("linear_regression trained on linear by `pipeline`.")
    described = client.get_model_version("linear_champion", second["version"]).description or ""
    assert f"val_mse on the val split: {second['value']:.6g}" in described and "Registered as challenger: val_mse" in described
    experiment = client.get_experiment_by_name("lin_good")
    assert experiment is not None and experiment.tags["mlflow.experimentKind"] == "custom_model_development"  # opens on runs
    tags = client.get_model_version("linear_champion", second["version"]).tags
    assert tags["decision"] == "challenger" and tags["metric"] == "val_mse"
    assert float(tags["metric_value"]) == second["value"]
    assert float(tags["champion_metric_value"]) == first["value"]


@pytest.mark.mlflow_server
def test_no_register_and_dry_run_track_but_register_nothing(mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client = _server_env(monkeypatch, mlflow_server)
    args = _linear(tmp_path, "lin_unregistered", "train.epochs=1", "tracking.register_as=never_registered")
    for flag in ("--no-register", "--dry-run"):
        done = run_cli("train", "conf/linear_regression.yaml", *args, flag)
        assert done.returncode == 0, done.stderr
    assert {r.info.run_name for r in runs_of(client, "lin_unregistered")} == {"lin_unregistered"}
    assert {r.info.run_name for r in runs_of(client, "lin_unregistered-dry-run")} == {"lin_unregistered-dry-run"}
    assert client.search_registered_models("name = 'never_registered'") == []


@pytest.fixture(scope="module")
def registered_mnist(mlflow_server: str, data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict:
    """A small MNIST MLP trained in-process and registered on the server, with raw test images."""
    storage = tmp_path_factory.mktemp("registered")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        overrides = tiny(data_root, storage, "name=served_mlp", "scaling.num_workers=0", "model.hidden=[32]", "train.epochs=2")
        cfg = load_config(CONF_DIR / "mnist_mlp.yaml", overrides)
        result = run_training(cfg)
    model, state = load_checkpoint(result.checkpoint)
    from pipeline.data.store import DatasetSpec
    from pipeline.data.transforms import normalizer

    spec = DatasetSpec.from_json(state["dataset"])
    images = load_splits(spec, cfg.data, cfg.seed)["test"][0][:20]  # raw uint8, (N, 1, 28, 28)
    import torch

    with torch.no_grad():
        expected = model(normalizer(spec, True, torch.device("cpu"))(torch.from_numpy(images))).argmax(1).numpy()
    return {"ref": "served_mlp@champion", "images": images, "expected": expected, "classes": spec.classes, "dir": storage}


@pytest.mark.mlflow_server
def test_load_model_in_a_fresh_process_predicts_what_the_trained_model_did(
    registered_mnist: dict, mlflow_server: str, tmp_path: Path
) -> None:
    np.save(tmp_path / "images.npy", registered_mnist["images"])
    script = f"""
import json, sys, numpy as np, mlflow
from pipeline import load_model
images = np.load({str(tmp_path / "images.npy")!r})
model = load_model({registered_mnist["ref"]!r})
assert not model.training
ours = model.predict_table(images)["class_index"].tolist()
pyfunc = mlflow.pyfunc.load_model("models:/{registered_mnist["ref"]}").predict(images)["class_index"].tolist()
print(json.dumps({{"ours": ours, "pyfunc": pyfunc}}))
"""
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    answer = last_json(done.stdout)
    assert answer["ours"] == answer["pyfunc"] == registered_mnist["expected"].tolist()


@pytest.mark.mlflow_server
def test_a_registered_model_pins_this_environment_s_versions(
    registered_mnist: dict, mlflow_server: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import importlib.metadata

    import mlflow

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
    listed = Path(mlflow.pyfunc.get_model_dependencies(f"models:/{registered_mnist['ref']}")).read_text().split()
    for package in ("torch", "mlflow", "numpy"):  # torch without its local tag (+cu130): PyPI has none
        assert f"{package}=={importlib.metadata.version(package).split('+')[0]}" in listed


def test_log_model_s_requirement_check_is_skipped_while_logging_and_back_after() -> None:
    import mlflow.pyfunc
    import mlflow.utils.environment

    from pipeline.registry import _no_requirement_check

    modules = (mlflow.utils.environment, mlflow.pyfunc)  # where log_model and load_model call it
    checks = [module.warn_dependency_requirement_mismatches for module in modules]
    with _no_requirement_check():
        assert all(module.warn_dependency_requirement_mismatches is not check for module, check in zip(modules, checks, strict=True))
    assert all(module.warn_dependency_requirement_mismatches is check for module, check in zip(modules, checks, strict=True))


@pytest.mark.mlflow_server
def test_load_model_and_the_pyfunc_take_images_in_every_usual_layout(registered_mnist: dict, mlflow_server: str, tmp_path: Path) -> None:
    images = registered_mnist["images"][:4]  # uint8 (N, 1, 28, 28)
    layouts = {"nchw": images, "nhw": images[:, 0], "nhwc": images.transpose(0, 2, 3, 1), "one_chw": images[0],
               "one_hw": images[0, 0], "one_hwc": images[0].transpose(1, 2, 0)}  # fmt: skip
    np.savez(tmp_path / "layouts.npz", **layouts, float_nchw=images.astype(np.float32), two_channels=np.zeros((2, 2, 28, 28), np.uint8))
    script = f"""
import json, numpy as np, mlflow
from pipeline import load_model
arrays = np.load({str(tmp_path / "layouts.npz")!r})
ours, pyfunc = load_model({registered_mnist["ref"]!r}), mlflow.pyfunc.load_model("models:/{registered_mnist["ref"]}")
answers = {{}}
for name in arrays.files:
    for who, model in (("ours", ours.predict_table), ("pyfunc", pyfunc.predict)):
        try:
            answers[f"{{who}}:{{name}}"] = model(arrays[name])["class_index"].tolist()
        except Exception as err:
            answers[f"{{who}}:{{name}}"] = f"{{type(err).__name__}}: {{err}}"
print(json.dumps(answers))
"""
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    done = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, capture_output=True, text=True, timeout=300, env=env)
    assert done.returncode == 0, done.stderr
    answers = last_json(done.stdout)
    expected = registered_mnist["expected"][:4].tolist()
    for who in ("ours", "pyfunc"):
        for name in ("nchw", "nhw", "nhwc"):
            assert answers[f"{who}:{name}"] == expected, (who, name)
        for name in ("one_chw", "one_hw", "one_hwc"):
            assert answers[f"{who}:{name}"] == expected[:1], (who, name)
        assert (
            "InputError" in answers[f"{who}:two_channels"]
            and "(N, 1, 28, 28) or (N, 28, 28, 1) or (N, 28, 28)" in answers[f"{who}:two_channels"]
        )
        assert "dtype float32" in answers[f"{who}:float_nchw"] and ".astype(np.uint8)" in answers[f"{who}:float_nchw"]


def test_an_rgb_model_takes_numpy_s_channels_last_arrays_as_it_takes_pytorch_s(data_root: Path) -> None:
    import torch

    from pipeline.data.store import materialize
    from pipeline.models import model_for
    from pipeline.serving import InputError, build_predictor

    cfg = load_config(CONF_DIR / "cifar10_resnet18.yaml", [f"data.root={data_root}", "data.download=false", "model.name=cnn"])
    spec = materialize(cfg.data, cfg.seed)
    torch.manual_seed(0)
    predictor = build_predictor(cfg, spec, model_for(cfg, spec).state_dict())
    images = np.random.default_rng(0).integers(0, 256, size=(5, 3, 32, 32), dtype=np.uint8)
    nchw = predictor.predict_table(images)
    # The same classes, and probabilities equal to float32's rounding (a batch of 1 or of N, another memory layout).
    assert_frame_equal(
        predictor.predict_table(images.transpose(0, 2, 3, 1)), nchw, check_exact=False, rtol=1e-5
    )  # NumPy / PIL: (N, H, W, C)
    assert_frame_equal(
        predictor.predict_table(images[2].transpose(1, 2, 0)), nchw.iloc[[2]].reset_index(drop=True), check_exact=False, rtol=1e-5
    )
    with pytest.raises(InputError, match=r"\(N, 3, 32, 32\) or \(N, 32, 32, 3\), or one image without N: RGB 32x32"):
        predictor.predict_table(images[:, 0])  # no channel axis: only one-channel models take that


def _write_pngs(images: np.ndarray, folder: Path, mode: str = "L") -> list[str]:
    from PIL import Image

    paths = []
    for i, image in enumerate(images):
        path = folder / f"digit{i}.png"
        Image.fromarray(image[0]).convert(mode).save(path)
        paths.append(str(path))
    return paths


@pytest.mark.mlflow_server
def test_pipeline_predict_on_png_files_writes_class_label_and_probability(
    registered_mnist: dict, mlflow_server: str, tmp_path: Path
) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    pngs = _write_pngs(registered_mnist["images"][:PNG_CLASSES], tmp_path)
    done = run_cli("predict", registered_mnist["ref"], *pngs, "--out", str(tmp_path / "out.csv"), env=env)
    assert done.returncode == 0, done.stderr
    import pandas as pd

    table = pd.read_csv(tmp_path / "out.csv")
    assert table["input"].tolist() == pngs
    assert table["class_index"].tolist() == registered_mnist["expected"][:PNG_CLASSES].tolist()
    assert table["label"].astype(str).tolist() == [registered_mnist["classes"][i] for i in table["class_index"]]
    assert ((table["probability"] > 0) & (table["probability"] <= 1)).all()
    printed = run_cli("predict", registered_mnist["ref"], pngs[0], env=env)
    assert printed.returncode == 0 and "class_index" in printed.stdout and "probability" in printed.stdout
    assert "Warning" not in done.stderr + printed.stderr, "the table alone: no library warnings for the user to decode"


@pytest.mark.mlflow_server
def test_image_files_are_read_as_training_read_them_whatever_their_mode(registered_mnist: dict, mlflow_server: str, tmp_path: Path) -> None:
    from PIL import Image

    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    digit = registered_mnist["images"][0, 0]
    Image.fromarray(digit).convert("RGB").save(tmp_path / "rgb.png")
    Image.fromarray(digit).convert("RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(digit).convert("P").save(tmp_path / "palette.png")
    Image.fromarray(digit.astype(np.uint16) * 257).save(tmp_path / "sixteen.png")  # 16-bit: 255 -> 65535
    files = [str(tmp_path / name) for name in ("rgb.png", "rgba.png", "palette.png", "sixteen.png")]
    done = run_cli("predict", registered_mnist["ref"], *files, "--out", str(tmp_path / "out.csv"), env=env)
    assert done.returncode == 0, done.stderr
    import pandas as pd

    assert pd.read_csv(tmp_path / "out.csv")["class_index"].tolist() == [registered_mnist["expected"][0]] * 4


@pytest.mark.mlflow_server
def test_bad_model_references_and_inputs_exit_2_naming_what_exists(registered_mnist: dict, mlflow_server: str, tmp_path: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    png = _write_pngs(registered_mnist["images"][:1], tmp_path)[0]
    unknown = run_cli("predict", "no_such_model@champion", png, env=env)
    assert unknown.returncode == 2 and "no registered model 'no_such_model'" in unknown.stderr
    assert "served_mlp" in unknown.stderr and "Traceback" not in unknown.stderr
    alias = run_cli("predict", "served_mlp@best", png, env=env)
    assert alias.returncode == 2 and "no alias or version 'best'" in alias.stderr and "champion (version" in alias.stderr
    from PIL import Image

    Image.fromarray(registered_mnist["images"][0, 0]).resize((32, 32)).save(tmp_path / "big.png")
    wrong = run_cli("predict", registered_mnist["ref"], str(tmp_path / "big.png"), env=env)
    assert (
        wrong.returncode == 2 and "(N, 1, 28, 28)" in wrong.stderr and "grayscale 28x28" in wrong.stderr and "(1, 32, 32)" in wrong.stderr
    )
    np.save(tmp_path / "flat.npy", np.zeros((2, 784), dtype=np.uint8))
    flat = run_cli("predict", registered_mnist["ref"], str(tmp_path / "flat.npy"), env=env)
    assert flat.returncode == 2 and "(2, 784)" in flat.stderr


def test_an_unreachable_server_fails_before_training_naming_the_uri(tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    env = {**os.environ, "MLFLOW_TRACKING_URI": url}
    done = run_cli("train", "conf/linear_regression.yaml", f"storage_path={tmp_path}", f"data.root={tmp_path}", env=env)
    assert done.returncode == 2
    assert f"cannot reach the MLflow server at MLFLOW_TRACKING_URI={url}" in done.stderr
    assert not (tmp_path / "linear_regression").exists(), "nothing was trained"


def test_a_new_sqlite_store_holds_the_tables_and_rows_mlflow_itself_makes(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # check_store makes new stores by copying an empty one it keeps in the cache folder (sqlite_store.py): the first
    # (ours.db) makes that template, the second (again.db) is a copy of it. MLflow makes the third its own way.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    for name in ("ours.db", "again.db"):
        check_store(Store(f"sqlite:///{tmp_path / name}", "tracking.uri"))
    MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}").search_experiments(max_results=1)

    def contents(name: str) -> list:
        with closing(sqlite3.connect(tmp_path / name)) as db:
            # A statement's lines as a set: MLflow's own second store in a process orders a table's CHECKs otherwise.
            schema = sorted(
                (*row[:3], sorted((row[3] or "").splitlines())) for row in db.execute("SELECT type, name, tbl_name, sql FROM sqlite_master")
            )
            rows = [db.execute(f"SELECT * FROM {table}").fetchall() for table in ("alembic_version", "experiments")]
            columns = [column[1] for column in db.execute("PRAGMA table_info(experiments)")]
        times = {columns.index("creation_time"), columns.index("last_update_time")}  # the Default experiment's, a clock apart
        return [schema, rows[0], [tuple(v for i, v in enumerate(row) if i not in times) for row in rows[1]]]

    assert contents("ours.db") == contents("again.db") == contents("mlflow.db")
    made = ["again.db", "again.db.lock", "cache", "mlflow.db", "ours.db", "ours.db.lock"]
    assert sorted(p.name for p in tmp_path.iterdir()) == made, "no half-made file left"
    assert list((tmp_path / "cache" / "pipeline").iterdir()) == [template_path()]


def test_a_cache_folder_that_cannot_be_written_still_gets_a_new_store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "cache").write_text("a file where the cache folder would be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    check_store(Store(f"sqlite:///{tmp_path / 'ours.db'}", "tracking.uri"))
    client = MlflowClient(f"sqlite:///{tmp_path / 'ours.db'}")
    assert [e.name for e in client.search_experiments()] == ["Default"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cache", "ours.db", "ours.db.lock"]


@pytest.mark.mlflow_server
def test_bad_data_leaves_no_mlflow_run(mlflow_server: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    client = _server_env(monkeypatch, mlflow_server)
    (tmp_path / "table.csv").write_text("a,b\n1,2\n3,4\n")
    done = run_cli("train", "conf/linear_regression.yaml", "name=bad_table", "data.name=tabular",
                   f"data.path={tmp_path / 'table.csv'}", "data.target=label", f"storage_path={tmp_path}")  # fmt: skip
    assert done.returncode == 2 and "data.target" in done.stderr
    assert runs_of(client, "bad_table") == []


@pytest.mark.ray
@pytest.mark.workers
def test_the_embedded_default_store_serves_ray_workers_and_tables_downstream(
    ray_local, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    monkeypatch.chdir(tmp_path)
    cfg = load_config(CONF_DIR / "circles_classifier.yaml", ["train.epochs=2", "data.num_samples=300", "scaling.runner=ray"])
    result = run_training(cfg)  # rank 0 runs in a Ray worker, whose working directory is not this one
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    (run,) = runs_of(client, "circles_classifier")
    assert metric_steps(client, run.info.run_id, "val_accuracy") == [1, 2]
    assert run.info.artifact_uri.startswith((tmp_path / "mlartifacts").as_uri())
    assert {a.path for a in client.list_artifacts(run.info.run_id, "plots")} >= {"plots/decision_boundary.png"}
    assert result.registration is not None and result.registration["alias"] == "champion"

    import mlflow
    import pandas as pd

    points = pd.DataFrame({"x0": [0.0, 1.4, -0.2], "x1": [0.1, 1.4, 0.3]})  # a user's table: float64 columns
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path / 'mlflow.db'}")
    from_pyfunc = mlflow.pyfunc.load_model("models:/circles_classifier@champion").predict(points)
    points.to_csv(tmp_path / "points.csv", index=False)
    done = run_cli("predict", "circles_classifier@champion", "points.csv", "--out", "preds.parquet", cwd=tmp_path,
                   env={k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"})  # fmt: skip
    assert done.returncode == 0, done.stderr
    from_cli = pd.read_parquet(tmp_path / "preds.parquet")
    assert from_cli["input"].tolist() == ["points.csv:0", "points.csv:1", "points.csv:2"]
    assert from_cli["class_index"].tolist() == from_pyfunc["class_index"].tolist()
    assert from_cli["label"].tolist() == [("outside", "inside")[i] for i in from_pyfunc["class_index"]]  # the circles' classes


def test_a_run_logs_the_splits_it_uses_as_mlflow_datasets(data_root: Path, tmp_path: Path) -> None:
    cfg = load_config(CONF_DIR / "mnist_mlp.yaml", tiny(data_root, tmp_path, "name=lineage", "scaling.num_workers=0", "data.limit=64"))
    result = run_training(cfg, register=False)
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    run = client.get_run(str(result.mlflow_run_id))
    assert run.inputs is not None
    logged = {
        next(t.value for t in d.tags if t.key == "mlflow.data.context"): (
            d.dataset.name,
            d.dataset.digest,
            json.loads(d.dataset.profile or "null"),
        )
        for d in run.inputs.dataset_inputs
    }
    digest = run.data.tags["data_hash"][:16]  # the Parquet manifest's content hash
    # The rows each split holds, from the Parquet files: val is carved out of train.parquet, then limit=64.
    folder = data_root / "parquet" / "mnist"
    in_train, in_test = (pq.ParquetFile(folder / f"{split}.parquet").metadata.num_rows for split in ("train", "test"))
    held_out = round(in_train * cfg.data.val_fraction)
    assert logged == {
        "training": ("mnist-train", digest, {"num_rows": min(in_train - held_out, 64)}),
        "validation": ("mnist-val", digest, {"num_rows": min(held_out, 64)}),
        "test": ("mnist-test", digest, {"num_rows": min(in_test, 64)}),
    }
    again = run_training(cfg.model_copy(update={"train": cfg.train.model_copy(update={"epochs": 2})}), register=False)  # resumes
    assert again.mlflow_run_id == result.mlflow_run_id
    rerun = client.get_run(str(result.mlflow_run_id)).inputs
    assert rerun is not None and len(rerun.dataset_inputs) == 3, "a resumed run logs its data sets once"


def _log_datasets_at_once(runs: list[TrackedRun], cfg: ExperimentConfig, spec: DatasetSpec) -> list[Exception]:
    """log_datasets for every run, each in a thread, released together; the errors they raised."""
    start, errors = threading.Barrier(len(runs)), []

    def log(run: TrackedRun) -> None:
        start.wait()
        try:
            log_datasets(run, cfg, spec)
        except Exception as err:  # collected: the test's assertion names it
            errors.append(err)

    threads = [threading.Thread(target=log, args=(run,)) for run in runs]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return errors


def test_trials_logging_the_same_data_sets_at_once_each_get_them(tmp_path: Path) -> None:
    # The trials of a search log the same data sets at the same moment. MLflow's SQL store looks a data set up,
    # then inserts it: a later insert broke the (experiment, name, digest) key and failed its trial (CI saw it).
    cfg = load_config(CONF_DIR / "linear_regression.yaml", [f"data.root={tmp_path}", "data.num_samples=200"])
    spec = materialize(cfg.data, cfg.seed)
    uri = os.environ["MLFLOW_TRACKING_URI"]
    client = MlflowClient(uri)
    for _ in range(4):  # a new experiment each round: its data sets are not yet there
        experiment = client.create_experiment(f"lineage_race_{secrets.token_hex(4)}")
        runs = [TrackedRun(uri, client.create_run(experiment).info.run_id, experiment) for _ in range(4)]
        errors = _log_datasets_at_once(runs, cfg, spec)
        assert not errors, errors
        for run in runs:
            inputs = client.get_run(run.run_id).inputs
            assert inputs is not None and len(inputs.dataset_inputs) == len(split_sizes(spec, cfg.data))  # train, val (no test)


@pytest.mark.mlflow_server
def test_a_server_with_authentication_takes_credentials_from_the_environment_and_refuses_wrong_ones_before_training(
    production_stack: Stack, tmp_path: Path
) -> None:
    url, password = production_stack.tracking_uri, production_stack.admin_password  # the stack's basic-auth app
    args = ["train", "conf/linear_regression.yaml", f"storage_path={tmp_path}", f"data.root={tmp_path}", "name=authed", "train.epochs=1"]
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "MLFLOW_TRACKING_USERNAME": "admin"}
    for given, said in (("a-wrong-one", "its credentials were refused (HTTP 401)"), (None, "none were given")):
        attempt = {**env, "MLFLOW_TRACKING_PASSWORD": given} if given else {k: v for k, v in env.items() if k != "MLFLOW_TRACKING_USERNAME"}
        refused = run_cli(*args, env=attempt)
        assert refused.returncode == 2, refused.stderr
        assert f"the MLflow server at MLFLOW_TRACKING_URI={url} has authentication on" in refused.stderr and said in refused.stderr
        assert "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD" in refused.stderr
        assert not (tmp_path / "authed").exists(), "refused before any work: no run folder"

    done = run_cli(*args, "--output", "json", env={**env, "MLFLOW_TRACKING_PASSWORD": password})
    assert done.returncode == 0, done.stderr
    assert password not in done.stdout + done.stderr
    admin = mlflow_client(f"http://admin:{password}@127.0.0.1:{url.rsplit(':', 1)[1]}")  # registry too: not MLFLOW_REGISTRY_URI
    (run,) = runs_of(admin, "authed")
    assert run.info.status == "FINISHED" and password not in json.dumps([run.data.params, run.data.tags])
    assert admin.get_model_version_by_alias("authed", "champion").run_id == run.info.run_id
