"""The command line as a user meets it: exit codes, one-line errors naming the key, JSON output."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.helpers import REPO, free_port, last_json, run_cli, tiny


@pytest.mark.parametrize(
    ("overrides", "expected"),
    [
        (["optim.lr=0"], "optim.lr: Input should be greater than 0"),
        (["train.epochs=0"], "train.epochs: Input should be greater than or equal to 1"),
        (["scaling.num_workers=-2"], "scaling.num_workers: Input should be greater than or equal to 0"),
        (["model.name=gpt"], "model.name: unknown model 'gpt'; use one of linear_regression"),
        (["data.name=imagenet"], "data.name: Input should be 'linear', 'circles'"),
        (["optim.name=lion"], "optim.name: Input should be 'sgd', 'adam', 'adamw', 'rmsprop' or 'adagrad'"),
        (["loss=hinge"], "loss: Input should be 'mse', 'l1', 'huber', 'cross_entropy' or 'bce_with_logits'"),
        (["optim.learning_rate=0.1"], "optim.learning_rate: unknown key; the keys here are: fused, lr, momentum"),
        (["train.epochs=ten"], "train.epochs: Input should be a valid integer"),
        (["optim.lr"], "override 'optim.lr': write it as key.path=value"),
        (["model.kwargs={hidden: 8}"], "model.kwargs are for your own model (model.name=package.module:Class); mlp takes"),
    ],
)
def test_bad_input_exits_2_naming_the_key_without_a_traceback(overrides: list[str], expected: str, tmp_path: Path) -> None:
    result = run_cli("train", "conf/mnist_mlp.yaml", *overrides, f"storage_path={tmp_path}")
    assert result.returncode == 2, result.stderr
    assert expected in result.stderr
    assert "Traceback" not in result.stderr
    assert not any(tmp_path.iterdir()), "nothing was written: the error came before any work"


@pytest.mark.parametrize("key", ["storage_path", "data.root"])
def test_a_folder_that_cannot_be_written_exits_2_naming_the_key(key: str, tmp_path: Path) -> None:
    folders = {"storage_path": str(tmp_path / "runs"), "data.root": str(tmp_path / "data"), key: "/proc/not_here"}
    result = run_cli("train", "conf/linear_regression.yaml", *(f"{k}={v}" for k, v in folders.items()))
    assert result.returncode == 2 and f"{key}: cannot write to /proc/not_here" in result.stderr and "Traceback" not in result.stderr


def test_malformed_yaml_and_a_missing_conf_exit_2(tmp_path: Path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("name: x\ndata: {name: mnist\n")
    result = run_cli("train", str(broken))
    assert result.returncode == 2 and "is not valid YAML" in result.stderr and str(broken) in result.stderr
    result = run_cli("train", "conf/no_such_experiment.yaml")
    assert result.returncode == 2 and "no such config file" in result.stderr


def test_missing_data_offline_names_the_file_and_where_it_goes(tmp_path: Path) -> None:
    result = run_cli("train", "conf/mnist_mlp.yaml", f"data.root={tmp_path}", "data.download=false", f"storage_path={tmp_path}")
    assert result.returncode == 2
    assert "train-images-idx3-ubyte" in result.stderr and str(tmp_path / "MNIST" / "raw") in result.stderr
    assert "data.download" in result.stderr and "Traceback" not in result.stderr


def test_a_model_that_does_not_fit_the_data_is_refused_before_training(tmp_path: Path) -> None:
    result = run_cli("train", "conf/linear_regression.yaml", "loss=cross_entropy", f"data.root={tmp_path}", f"storage_path={tmp_path}")
    assert result.returncode == 2 and "loss: cross_entropy does not fit linear, a regression dataset" in result.stderr


def test_an_image_model_on_a_table_is_refused_naming_model_name_and_the_shape(tmp_path: Path) -> None:
    result = run_cli("train", "conf/circles_classifier.yaml", "model.name=lenet", f"data.root={tmp_path}", f"storage_path={tmp_path}")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert "model.name: lenet takes images of shape (channels, height, width); this data set's samples have shape (2,)" in result.stderr


def test_options_and_overrides_come_in_any_order() -> None:
    from pipeline.cli import parse_arguments

    for argv in (["train", "c.yaml", "--fresh", "a=1", "b=2"], ["train", "--fresh", "c.yaml", "a=1", "b=2"],
                 ["train", "c.yaml", "a=1", "--fresh", "b=2"], ["train", "c.yaml", "a=1", "b=2", "--fresh"]):  # fmt: skip
        args = parse_arguments(argv)
        assert (args.conf, args.overrides, args.fresh) == ("c.yaml", ["a=1", "b=2"], True), argv
    result = run_cli("train", "conf/linear_regression.yaml", "--no-such-option")
    assert result.returncode == 2 and "unrecognized arguments: --no-such-option" in result.stderr


def test_the_console_script_is_installed() -> None:
    result = run_cli("--help", console_script=True)
    assert result.returncode == 0 and result.stdout.startswith("usage: pipeline [-h]")
    assert "{train,tune,run,predict,serve,ui,runs,models,submit,jobs}" in result.stdout  # argparse wraps the usage line


def test_the_console_script_trains_a_model_of_the_current_directory_and_json_output_is_the_last_line(tmp_path: Path) -> None:
    # One training (a `pipeline` process costs ~15 s on 2 cores) for both: `python -m pipeline` has the current
    # directory on sys.path, and the console script must too; --output json puts the summary last on stdout.
    (tmp_path / "my_nets.py").write_text(
        "from torch import nn\n"
        "class TinyNet(nn.Sequential):\n"
        "    def __init__(self, hidden: int):\n"
        "        super().__init__(nn.Linear(2, hidden), nn.ReLU(), nn.Linear(hidden, 1))\n"
    )
    result = run_cli("train", str(REPO / "conf/circles_classifier.yaml"), "model.name=my_nets:TinyNet", "model.kwargs={hidden: 8}",
                     *tiny(tmp_path, tmp_path, "scaling.num_workers=0"), "--output", "json", cwd=tmp_path, console_script=True)  # fmt: skip
    assert result.returncode == 0, result.stderr
    summary = last_json(result.stdout)
    assert summary["run_name"] == "circles_classifier" and summary["metrics"]["epoch"] == 1
    assert set(summary["metrics"]) >= {"epoch", "train_loss", "val_loss", "val_accuracy", "samples_per_sec"}
    assert Path(summary["checkpoint"], "state.pt").is_file()
    assert "epoch 1/1" in result.stderr, "progress goes to stderr, results to stdout"


def test_a_failing_worker_exits_1_with_the_worker_s_error(tmp_path: Path) -> None:
    # Builds and answers the driver's shape check (eval mode), then fails in training: in this process
    # (one worker, runner auto), named as Ray names a worker's error.
    (tmp_path / "fragile.py").write_text(
        "from torch import nn\n"
        "class Fragile(nn.Linear):\n"
        "    def __init__(self):\n"
        "        super().__init__(2, 1)\n"
        "    def forward(self, x):\n"
        "        if self.training:\n"
        "            raise RuntimeError('fragile breaks in training')\n"
        "        return super().forward(x)\n"
    )
    result = run_cli(
        "train",
        str(REPO / "conf/circles_classifier.yaml"),
        "model.name=fragile:Fragile",
        f"storage_path={tmp_path}",
        f"data.root={tmp_path}",
        cwd=tmp_path,
    )
    assert result.returncode == 1, result.stderr
    assert "error: training failed: worker 0: RuntimeError: fragile breaks in training" in result.stderr
    assert "Traceback" not in result.stderr


def test_a_user_model_that_cannot_be_imported_exits_2(tmp_path: Path) -> None:
    result = run_cli(
        "train", "conf/circles_classifier.yaml", "model.name=no_such_package.nets:Net", f"data.root={tmp_path}", f"storage_path={tmp_path}"
    )
    assert result.returncode == 2
    assert "model.name: cannot import 'no_such_package.nets'" in result.stderr and "Traceback" not in result.stderr


def test_dry_run_trains_four_batches_as_a_separate_run(data_root: Path, tmp_path: Path) -> None:
    result = run_cli(
        "train",
        "conf/mnist_lenet.yaml",
        f"data.root={data_root}",
        "data.download=false",
        f"storage_path={tmp_path}",
        "scaling.num_workers=0",
        "data.batch_size=8",
        "--dry-run",
        "--output",
        "json",
    )
    assert result.returncode == 0, result.stderr
    summary = last_json(result.stdout)
    assert summary["run_name"] == "mnist_lenet-dry-run" and [m["epoch"] for m in summary["history"]] == [1]
    assert (tmp_path / "mnist_lenet-dry-run").is_dir() and not (tmp_path / "mnist_lenet").exists()


def test_strict_json_never_holds_a_bare_nan() -> None:
    from pipeline.cli import json_line

    line = json_line({"metrics": {"val_loss": float("nan"), "val_mse": float("inf"), "epoch": 3}, "history": [{"x": float("-inf")}]})
    assert json.loads(line) == {"metrics": {"val_loss": None, "val_mse": None, "epoch": 3}, "history": [{"x": None}]}
    assert "NaN" not in line and "Infinity" not in line


def test_the_ui_on_a_taken_port_exits_2_naming_it() -> None:
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = run_cli("ui", "--port", str(port))
    assert result.returncode == 2 and f"--port {port}: 127.0.0.1:{port} is in use by another program" in result.stderr


def test_predict_against_a_server_that_does_not_answer_exits_2_in_seconds(tmp_path: Path) -> None:
    import os
    import time

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    result = run_cli("predict", "mnist_mlp@champion", str(tmp_path / "x.png"), env={**os.environ, "MLFLOW_TRACKING_URI": url}, timeout=120)
    assert result.returncode == 2 and f"cannot reach the MLflow server at MLFLOW_TRACKING_URI={url}" in result.stderr
    assert time.monotonic() - started < 30
