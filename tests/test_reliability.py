"""Faults, caused for real: a training worker SIGKILLed mid-epoch, registrations of one model racing.

docs/RELIABILITY.md lists each fault, what the pipeline does, and the test here that shows it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient

from tests.conftest import CONF_DIR, REPO


def _pipeline(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "pipeline", *args, "--output", "json"], cwd=REPO, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip


def _train_workers(root: int) -> list[int]:
    """The Ray Train worker processes under `root` (a `pipeline` process and the local Ray it started)."""
    children: dict[int, list[int]] = {}
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        children.setdefault(int(stat.rsplit(")", 1)[1].split()[1]), []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            todo.append(child)
            try:
                title = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if title.startswith(b"ray::RayTrainWorker"):
                found.append(child)
    return found


@pytest.mark.slow
def test_a_worker_killed_mid_epoch_is_replaced_and_the_run_finishes(tmp_path: Path) -> None:
    epochs = 6
    run = _pipeline("train", str(CONF_DIR / "linear_regression.yaml"), "name=worker_kill", f"storage_path={tmp_path}",
                    f"data.root={tmp_path}", "data.num_samples=20000", f"train.epochs={epochs}", "scaling.num_workers=2",
                    "train.max_failures=1")  # fmt: skip
    run_dir = tmp_path / "worker_kill"
    deadline = time.monotonic() + 240
    while not (run_dir / "checkpoint_epoch=0002").exists():  # then epoch 3 is under way
        assert run.poll() is None and time.monotonic() < deadline, run.communicate()
        time.sleep(0.05)
    workers = _train_workers(run.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)  # one of the two, as when its node goes away
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-3000:]
    summary = json.loads(out.strip().splitlines()[-1])
    assert summary["metrics"]["epoch"] == epochs
    # One MLflow run, each epoch in it once (the epoch the kill interrupted ran again, logged once).
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    (found,) = client.search_runs([client.get_experiment_by_name("worker_kill").experiment_id])
    assert found.info.run_id == summary["mlflow_run_id"] and found.info.status == "FINISHED"
    for key in ("epoch", "train_loss", "val_mse"):
        assert sorted(int(m.step) for m in client.get_metric_history(found.info.run_id, key)) == list(range(1, epochs + 1))
    assert [str(v.version) for v in client.search_model_versions("name = 'worker_kill'")] == ["1"]


@pytest.mark.slow
def test_concurrent_registrations_leave_every_version_and_the_best_as_champion(mlflow_server: str, tmp_path: Path) -> None:
    # Three trainings at once, registering under one name, each with its own learning rate (so their
    # val_mse differ; which is best does not matter: the best must end as champion).
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    runs = [
        _pipeline("train", str(CONF_DIR / "linear_regression.yaml"), f"name=race{i}", "tracking.register_as=race",
                  f"optim.lr={lr}", f"storage_path={tmp_path}", f"data.root={tmp_path / 'data'}", env=env)
        for i, lr in enumerate((0.003, 0.03, 0.01))
    ]  # fmt: skip
    results = [run.communicate(timeout=300) for run in runs]
    for run, (_, err) in zip(runs, results):
        assert run.returncode == 0, err[-3000:]
    registrations = [json.loads(out.strip().splitlines()[-1])["registration"] for out, _ in results]
    client = MlflowClient(mlflow_server)
    versions = client.search_model_versions("name = 'race'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3]
    best = min(registrations, key=lambda r: r["value"])
    assert len({r["value"] for r in registrations}) == 3  # no tie: the champion is determined
    assert client.get_model_version_by_alias("race", "champion").version == best["version"]
    assert all(v.tags["decision"] in ("champion", "challenger") for v in versions)


@pytest.mark.parametrize("runner", ["in_process", pytest.param("ray", marks=pytest.mark.slow)])
def test_a_corrupt_latest_checkpoint_is_named_and_the_one_before_it_resumes(runner: str, ray_local, tmp_path: Path) -> None:
    from pipeline.checkpoints import CheckpointError
    from pipeline.config import load_config
    from pipeline.train import load_checkpoint, run_training

    overrides = [f"storage_path={tmp_path}", f"data.root={tmp_path}", f"scaling.runner={runner}", "train.checkpoints_to_keep=5",
                 f"name=corrupt_{runner}"]  # fmt: skip
    run_training(load_config(CONF_DIR / "linear_regression.yaml", [*overrides, "train.epochs=3"]), track=False)
    latest = tmp_path / f"corrupt_{runner}" / "checkpoint_epoch=0003"
    state = latest / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated, as by a full disk
    with pytest.raises(CheckpointError, match=r"checkpoint .*checkpoint_epoch=0003: state.pt does not match its checksum"):
        load_checkpoint(latest)
    resumed = run_training(load_config(CONF_DIR / "linear_regression.yaml", [*overrides, "train.epochs=5"]), track=False)
    assert [m["epoch"] for m in resumed.history] == [3, 4, 5]  # from epoch 2's checkpoint: epoch 3 again


def _table(text: str):
    def write(root: Path) -> list[str]:
        (root / "table.csv").write_text(text)
        return ["data.name=tabular", f"data.path={root / 'table.csv'}"]

    return write


def _mnist(damage):
    def write(root: Path) -> list[str]:
        from tests.formats import write_mnist_like

        write_mnist_like(root, "MNIST", n_train=120, n_test=40)
        damage(root / "MNIST" / "raw")
        return ["data.name=mnist", f"data.root={root}", "data.download=false", "loss=cross_entropy", "model.name=mlp"]

    return write


def _truncate(raw: Path) -> None:
    images = raw / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])


def _drop_labels(raw: Path) -> None:
    from tests.formats import write_idx

    write_idx(raw / "train-labels-idx1-ubyte", np.zeros(7, dtype=np.uint8))  # 7 labels for 120 images


@pytest.mark.parametrize(
    ("data", "extra", "message"),
    [
        (_table("a,b\n1,2\n3,4\n"), ["data.target=label"], "data.target: column 'label' is not in"),
        (_table("a,y\n1,2.0\n3,nan\n"), ["data.target=y"], "the target column 'y' holds 1 empty or NaN values"),
        (_table("a,y\n1,2.0\ninf,3.0\n"), ["data.target=y"], "feature columns contain NaN, infinite or empty values (['a']"),
        (_mnist(_truncate), [], "truncated"),
        (_mnist(_drop_labels), [], "they must pair up"),
    ],
    ids=["csv-without-target", "nan-target", "infinite-feature", "truncated-idx", "mismatched-idx"],
)
def test_malformed_data_exits_2_and_leaves_no_run_or_version(data, extra: list[str], message: str, tmp_path: Path, tracking_store: str) -> None:
    name = f"malformed_{tmp_path.name}"[:60]
    args = ["train", str(CONF_DIR / "linear_regression.yaml"), f"name={name}", f"storage_path={tmp_path}", *data(tmp_path), *extra]
    done = subprocess.run([sys.executable, "-m", "pipeline", *args], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-2000:]
    assert message in done.stderr and "Traceback" not in done.stderr
    client = MlflowClient(tracking_store)
    assert client.get_experiment_by_name(name) is None
    assert client.search_registered_models(f"name = '{name}'") == []
