"""Training end to end: every conf trains, DDP matches one worker, runs resume, the tutorial result holds."""

from __future__ import annotations

import json
import os
import threading
from pathlib import Path

import pytest
import torch
from mlflow import MlflowClient
from torch import nn

from pipeline.checks import check_training
from pipeline.config import ConfigError, load_config
from pipeline.data.sources import LINEAR_TRUE_B, LINEAR_TRUE_W
from pipeline.loop import load_checkpoint, preprocessor
from pipeline.runtime import sent_in_background
from pipeline.train import run_training
from tests.helpers import CONF_DIR, last_json, metric_steps, start_cli, tiny, wait_for_files, wait_for_run_dir

CONFS = sorted(CONF_DIR.glob("*.yaml"))


@pytest.mark.parametrize("conf", CONFS, ids=lambda p: p.stem)
def test_every_conf_trains_one_epoch_on_tiny_data(conf: Path, data_root: Path, tmp_path: Path) -> None:
    # In this process (num_workers=0): the same loop the Ray workers run, without a worker group.
    # model.pretrained=false: no network here for ImageNet weights.
    overrides = tiny(data_root, tmp_path, "scaling.num_workers=0", "model.pretrained=false", "data.num_samples=200")
    cfg = load_config(conf, overrides)
    result = run_training(cfg)
    assert [m["epoch"] for m in result.history] == [1]
    metrics = result.metrics
    assert metrics["train_loss"] > 0 and metrics["samples_per_sec"] > 0
    assert {"val_loss", cfg.metric} <= set(metrics)  # val_accuracy for a classifier, val_mse for the regression
    assert Path(result.checkpoint, "state.pt").is_file()


def test_linear_regression_recovers_w_and_b(tmp_path: Path) -> None:
    cfg = load_config(CONF_DIR / "linear_regression.yaml", [f"storage_path={tmp_path}", f"data.root={tmp_path}"])
    result = run_training(cfg)  # one worker on this machine: in this process (scaling.runner=auto)
    model, _ = load_checkpoint(result.checkpoint)
    assert isinstance(model, nn.Linear)
    assert torch.allclose(model.weight.detach()[0], torch.tensor(LINEAR_TRUE_W), atol=0.1)
    assert abs(model.bias.item() - LINEAR_TRUE_B) < 0.1


@pytest.mark.ray
@pytest.mark.workers
def test_two_ddp_workers_follow_one_worker_on_the_same_global_batch(ray_local, data_root: Path, tmp_path: Path) -> None:
    # No dropout or batch norm: with the same global batches, DDP's averaged gradient is the 1-worker gradient.
    common = tiny(data_root, tmp_path, "train.epochs=3", "optim.name=sgd", "optim.lr=0.05", "model.dropout=0")
    one = run_training(
        load_config(CONF_DIR / "mnist_mlp.yaml", [*common, "name=one", "scaling.runner=ray", "scaling.num_workers=1", "data.batch_size=32"])
    )
    two = run_training(load_config(CONF_DIR / "mnist_mlp.yaml", [*common, "name=two", "scaling.num_workers=2", "data.batch_size=16"]))
    for key in ("train_loss", "val_loss", "val_accuracy"):
        assert [m[key] for m in two.history] == pytest.approx([m[key] for m in one.history], rel=1e-4, abs=1e-6), key
    assert one.history[0]["train_loss"] > one.history[-1]["train_loss"]


def test_a_rerun_with_more_epochs_continues_from_the_checkpoint(data_root: Path, tmp_path: Path) -> None:
    overrides = tiny(data_root, tmp_path, "scaling.num_workers=0", "model.dropout=0")
    first = run_training(load_config(CONF_DIR / "mnist_mlp.yaml", [*overrides, "train.epochs=2"]))
    second = run_training(load_config(CONF_DIR / "mnist_mlp.yaml", [*overrides, "train.epochs=4"]))
    assert [m["epoch"] for m in first.history] == [1, 2]
    assert [m["epoch"] for m in second.history] == [3, 4]
    assert second.history[0]["train_loss"] < first.history[0]["train_loss"], "it went on from trained weights"
    fresh = run_training(load_config(CONF_DIR / "mnist_mlp.yaml", [*overrides, "train.epochs=1"]), fresh=True)
    assert [m["epoch"] for m in fresh.history] == [1]


def test_a_changed_model_is_a_new_run_named_by_what_changed(data_root: Path, tmp_path: Path) -> None:
    overrides = tiny(data_root, tmp_path, "scaling.num_workers=0")
    first = run_training(load_config(CONF_DIR / "mnist_mlp.yaml", [*overrides, "model.hidden=[32]"]))
    events: list[dict] = []
    changed = run_training(load_config(CONF_DIR / "mnist_mlp.yaml", [*overrides, "model.hidden=[64]", "train.epochs=2"]),
                           on_event=events.append)  # fmt: skip
    assert changed.outcome == "trained" and [m["epoch"] for m in changed.history] == [1, 2]
    assert changed.run_key != first.run_key and changed.run_dir != first.run_dir
    assert changed.mlflow_run_id != first.mlflow_run_id
    (info,) = [e["message"] for e in events if e["event"] == "info"]
    assert f"a new run; it differs from run {first.run_key} in model.hidden: [32] -> [64]" in info
    assert Path(first.checkpoint).is_dir(), "the first run is untouched"


def test_a_killed_run_resumes_at_the_next_epoch(tmp_path: Path) -> None:
    # In-process; on Ray workers, resuming the same command after an interrupt is
    # test_reliability.py::test_an_interrupted_ray_training_exits_at_once_killed_and_resumes_with_the_same_command.
    epochs = 12
    args = ["train", "conf/linear_regression.yaml", f"storage_path={tmp_path}", f"data.root={tmp_path}", f"train.epochs={epochs}",
            "data.num_samples=3000", "scaling.num_workers=0", "--output", "json"]  # fmt: skip
    run = start_cli(*args)
    run_dir = wait_for_run_dir(tmp_path, "linear_regression", run)
    wait_for_files(run_dir, "checkpoint_epoch=0003", run)
    run.kill()  # SIGKILL: no chance to clean up, as when a machine goes away
    run.wait()
    # The complete checkpoints are the folders with their meta.json (written last).
    resume_from = max(int(json.loads(p.read_text())["epoch"]) for p in run_dir.glob("checkpoint_epoch=*/meta.json"))
    again = start_cli(*args)
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err
    summary = last_json(out)
    assert resume_from >= 1
    assert [m["epoch"] for m in summary["history"]] == list(range(resume_from + 1, epochs + 1))
    # The same MLflow run goes on, and holds each epoch once: those before the kill and those after.
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    experiment = client.get_experiment_by_name("linear_regression")
    assert experiment is not None
    (tracked,) = client.search_runs([experiment.experiment_id], filter_string=f"tags.run_dir = '{run_dir}'")
    assert tracked.info.run_id == summary["mlflow_run_id"] and tracked.info.status == "FINISHED"
    for key in ("epoch", "train_loss", "val_mse"):
        assert metric_steps(client, tracked.info.run_id, key) == list(range(1, epochs + 1))


@pytest.mark.ray
@pytest.mark.workers
def test_a_user_module_trains_on_ray_workers(ray_local, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_nets.py").write_text(
        "from torch import nn\n"
        "class TinyNet(nn.Module):\n"
        "    def __init__(self, hidden: int):\n"
        "        super().__init__()\n"
        "        self.net = nn.Sequential(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, 1))\n"
        "    def forward(self, x):\n"
        "        return self.net(x)\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    cfg = load_config(
        CONF_DIR / "circles_classifier.yaml",
        ["model.name=my_nets:TinyNet", "model.kwargs={hidden: 8}", "train.epochs=2", "data.root=data", "scaling.runner=ray"],
    )
    result = run_training(cfg)
    assert [m["epoch"] for m in result.history] == [1, 2]
    assert result.metrics["val_accuracy"] > 0.5


def test_an_image_folder_trains(tmp_path: Path) -> None:
    from pipeline.standin import write_image_folder

    write_image_folder(tmp_path / "pets", per_class=40, size=(8, 8))
    overrides = [f"storage_path={tmp_path}", f"data.root={tmp_path}", "data.name=image_folder", f"data.path={tmp_path / 'pets'}",
                 "model.hidden=[16]", "data.batch_size=8", "train.epochs=3", "scaling.num_workers=0", "data.val_fraction=0.25"]  # fmt: skip
    result = run_training(load_config(CONF_DIR / "mnist_mlp.yaml", overrides), track=False)
    assert result.metrics["val_accuracy"] > 0.8  # the two classes differ in brightness: learnable


def test_channels_last_trains_the_same_model_as_the_default_layout(data_root: Path, tmp_path: Path) -> None:
    # The layout changes how the convolutions run, not what they compute: same seed, the same losses up to
    # float rounding (other convolution kernels sum in another order, and Adam carries the difference on).
    common = tiny(
        data_root, tmp_path, "scaling.num_workers=0", "train.epochs=2", "data.augment.hflip=false", "data.augment.rotation_degrees=0"
    )
    nchw = run_training(load_config(CONF_DIR / "fashion_mnist_cnn.yaml", [*common, "name=nchw", "train.channels_last=false"]), track=False)
    cfg = load_config(CONF_DIR / "fashion_mnist_cnn.yaml", [*common, "name=nhwc", "train.channels_last=true"])
    nhwc = run_training(cfg, track=False)
    for key in ("train_loss", "val_loss", "val_accuracy"):
        assert [m[key] for m in nhwc.history] == pytest.approx([m[key] for m in nchw.history], rel=1e-2, abs=1e-3), key
    # One channel is laid out alike either way; three show which layout the loop's batches have.
    rgb = load_config(CONF_DIR / "cifar10_resnet18.yaml", tiny(data_root, tmp_path, "model.pretrained=false"))
    for channels_last in (True, False):
        cfg = rgb.model_copy(update={"train": rgb.train.model_copy(update={"channels_last": channels_last})})
        prep = preprocessor(cfg, check_training(cfg), torch.device("cpu"))
        for batch in (prep.train(torch.zeros(4, 3, 32, 32, dtype=torch.uint8)), prep.eval(torch.zeros(4, 3, 32, 32, dtype=torch.uint8))):
            assert batch.is_contiguous(memory_format=torch.channels_last) is channels_last
            assert batch.is_contiguous() is not channels_last
    model, _ = load_checkpoint(nhwc.checkpoint)  # the trained model takes ordinary NCHW batches
    assert model(torch.zeros(2, 1, 28, 28)).shape == (2, 10)


def test_a_module_that_views_nhwc_activations_is_refused_with_train_channels_last_named(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "viewing_net.py").write_text(
        "from torch import nn\n"
        "class ViewingNet(nn.Module):  # x.view(n, -1) needs NCHW-contiguous activations\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.conv, self.head = nn.Conv2d(1, 4, 3, padding=1), nn.Linear(4 * 28 * 28, 10)\n"
        "    def forward(self, x):\n"
        "        h = self.conv(x)\n"
        "        return self.head(h.view(h.size(0), -1))\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    overrides = tiny(data_root, tmp_path, "model.name=viewing_net:ViewingNet", "scaling.num_workers=0")
    with pytest.raises(ConfigError, match=r"model.name: viewing_net:ViewingNet .*train.channels_last=false"):
        check_training(load_config(CONF_DIR / "fashion_mnist_cnn.yaml", overrides))  # the conf sets channels_last
    assert check_training(load_config(CONF_DIR / "fashion_mnist_cnn.yaml", [*overrides, "train.channels_last=false"])).is_image


def test_a_training_run_logs_its_machines_system_metrics_unless_turned_off(tmp_path: Path) -> None:
    common = [f"storage_path={tmp_path}", f"data.root={tmp_path}", "data.num_samples=20000", "train.epochs=2"]
    monitored = run_training(load_config(CONF_DIR / "linear_regression.yaml", [*common, "tracking.system_metrics_interval_s=0.2"]))
    quiet = run_training(load_config(CONF_DIR / "linear_regression.yaml", [*common, "name=quiet", "tracking.system_metrics=false"]))

    assert monitored.mlflow_run_id is not None and quiet.mlflow_run_id is not None  # tracked
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    logged = client.get_run(monitored.mlflow_run_id).data.metrics
    for key in ("cpu_utilization_percentage", "system_memory_usage_megabytes", "disk_usage_percentage", "network_receive_megabytes"):
        assert f"system/{key}" in logged, key  # on one machine: no node name in the key
    assert 0 < logged["system/system_memory_usage_megabytes"] < 1e7
    assert len(metric_steps(client, monitored.mlflow_run_id, "system/cpu_utilization_percentage")) >= 2  # sampled as it trained
    assert not [key for key in client.get_run(quiet.mlflow_run_id).data.metrics if key.startswith("system/")]


def test_system_metrics_name_the_node_only_where_a_run_spans_several() -> None:
    from pipeline.system_metrics import node_name

    assert node_name(node_rank=0, world_size=2, local_world_size=2) is None  # one node: system/cpu_...
    assert [node_name(rank, world_size=4, local_world_size=2) for rank in (0, 1)] == ["node_0", "node_1"]  # system/node_1/cpu_...


def test_progress_events_leave_in_order_without_holding_up_the_loop() -> None:
    # A Ray queue's put waits for the queue actor's answer: here, until the gate opens.
    gate, received = threading.Event(), []

    def put(event: dict) -> None:
        assert gate.wait(30)
        received.append(event["step"])

    with sent_in_background(put) as emit:
        assert emit is not None
        for step in range(5):
            emit({"event": "batch", "step": step})
        assert received == []  # all five handed over while the first put still waits: the loop went on
        gate.set()
    assert received == [0, 1, 2, 3, 4]  # and all of them put, in order, once the block ends

    def broken(event: dict) -> None:
        raise RuntimeError("the queue actor is gone")

    with pytest.raises(RuntimeError, match="the queue actor is gone"), sent_in_background(broken) as emit:
        assert emit is not None
        emit({"event": "epoch"})
