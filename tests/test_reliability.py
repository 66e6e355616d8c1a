"""Faults, caused for real: a training worker SIGKILLed mid-epoch, registrations of one model racing.

docs/RELIABILITY.md lists each fault, what the pipeline does, and the test here that shows it.
"""

from __future__ import annotations

import contextlib
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import psutil
import pytest

from tests.helpers import (
    CONF_DIR,
    free_port,
    last_json,
    metric_steps,
    mlflow_client,
    run_cli,
    run_dir,
    runs_of,
    start_cli,
    start_mlflow_server,
    stop_group,
    wait_for_files,
    wait_for_run_dir,
)


def _ray_processes(root: int, title: bytes = b"ray::RayTrainWorker") -> list[int]:
    """The Ray processes under `root` (a `pipeline` process and the local Ray it started) whose title starts
    with `title`: Ray Train's workers by default."""
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
                cmdline = Path(f"/proc/{child}/cmdline").read_bytes()
            except OSError:
                continue
            if cmdline.startswith(title):
                found.append(child)
    return found


@pytest.mark.ray
@pytest.mark.workers
def test_a_worker_killed_mid_epoch_is_replaced_and_the_run_finishes(tmp_path: Path) -> None:
    epochs = 4  # the kill comes in epoch 3: one more after it shows the run goes on (each epoch on Ray: seconds)
    run = start_cli("train", str(CONF_DIR / "linear_regression.yaml"), "name=worker_kill", f"storage_path={tmp_path}",
                    f"data.root={tmp_path}", "data.num_samples=20000", f"train.epochs={epochs}", "scaling.num_workers=2",
                    "train.max_failures=1", "--output", "json")  # fmt: skip
    folder = wait_for_run_dir(tmp_path, "worker_kill", run)
    wait_for_files(folder, "checkpoint_epoch=0002", run, timeout_s=240)  # then epoch 3 is under way
    workers = _ray_processes(run.pid)
    assert len(workers) == 2, workers
    os.kill(workers[-1], signal.SIGKILL)  # one of the two, as when its node goes away
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-3000:]
    summary = last_json(out)
    assert summary["metrics"]["epoch"] == epochs
    # One MLflow run, each epoch in it once (the epoch the kill interrupted ran again, logged once).
    client = mlflow_client(os.environ["MLFLOW_TRACKING_URI"])
    (found,) = runs_of(client, "worker_kill")
    assert found.info.run_id == summary["mlflow_run_id"] and found.info.status == "FINISHED"
    for key in ("epoch", "train_loss", "val_mse"):
        assert metric_steps(client, found.info.run_id, key) == list(range(1, epochs + 1))
    assert [str(v.version) for v in client.search_model_versions("name = 'worker_kill'")] == ["1"]


# The process that dies: an in-process trial's own (Tune retries the trial), or the one Ray Train worker
# of a trial on a worker group (Ray Train restarts the group inside the trial).
KILLED_IN_TRIAL = {"in_process": b"ray::ImplicitFunc", "workers": b"ray::RayTrainWorker"}


@pytest.mark.ray
@pytest.mark.parametrize("trial_runner", ["in_process", pytest.param("workers", marks=pytest.mark.workers)])
def test_a_tune_trial_whose_process_is_killed_is_retried_and_the_search_completes(trial_runner: str, tmp_path: Path) -> None:
    epochs = 4  # the kill comes in the first trial's epoch 3
    search = start_cli("tune", str(CONF_DIR / "linear_regression.yaml"), "name=trial_kill", f"storage_path={tmp_path}",
                       f"data.root={tmp_path}", "data.num_samples=20000", f"train.epochs={epochs}", "train.max_failures=1",
                       "tune.scheduler=fifo", "tune.num_samples=1", "tune.max_concurrent_trials=1",
                       f"tune.trial_runner={trial_runner}", "tune.space={optim.lr: {grid: [0.03, 0.02]}}", "--output", "json")  # fmt: skip
    trials = wait_for_run_dir(tmp_path, "trial_kill", search, search=True) / "trials"
    wait_for_files(trials, "*/*/checkpoint_epoch=0002", search, timeout_s=240)  # the first trial is in its third epoch
    (victim,) = _ray_processes(search.pid, KILLED_IN_TRIAL[trial_runner])
    os.kill(victim, signal.SIGKILL)
    out, err = search.communicate(timeout=400)
    assert search.returncode == 0, err[-3000:]
    summary = last_json(out)["search"]
    assert all(t["status"] == "finished" and t["epochs"] == epochs for t in summary["trials"]), summary["trials"]
    client = mlflow_client(os.environ["MLFLOW_TRACKING_URI"])
    children = runs_of(client, "trial_kill", parent=summary["mlflow_run_id"])
    assert len(children) == 2
    for child in children:  # the killed trial resumed in the same child run: each epoch once
        assert metric_steps(client, child.info.run_id, "epoch") == list(range(1, epochs + 1))


@pytest.mark.mlflow_server
def test_concurrent_registrations_leave_every_version_and_the_best_as_champion(mlflow_server: str, tmp_path: Path) -> None:
    # Three trainings at once, registering under one name, each with its own learning rate (so their
    # val_mse differ; which is best does not matter: the best must end as champion).
    env = {**os.environ, "MLFLOW_TRACKING_URI": mlflow_server}
    runs = [
        start_cli("train", str(CONF_DIR / "linear_regression.yaml"), f"name=race{i}", "tracking.register_as=race",
                  f"optim.lr={lr}", f"storage_path={tmp_path}", f"data.root={tmp_path / 'data'}", "--output", "json", env=env)
        for i, lr in enumerate((0.003, 0.03, 0.01))
    ]  # fmt: skip
    results = [run.communicate(timeout=300) for run in runs]
    for run, (_, err) in zip(runs, results, strict=True):
        assert run.returncode == 0, err[-3000:]
    registrations = [last_json(out)["registration"] for out, _ in results]
    client = mlflow_client(mlflow_server)
    versions = client.search_model_versions("name = 'race'")
    assert sorted(int(v.version) for v in versions) == [1, 2, 3]
    best = min(registrations, key=lambda r: r["value"])
    assert len({r["value"] for r in registrations}) == 3  # no tie: the champion is determined
    assert client.get_model_version_by_alias("race", "champion").version == best["version"]
    assert all(v.tags["decision"] in ("champion", "challenger") for v in versions)


@pytest.mark.parametrize("runner", ["in_process", pytest.param("ray", marks=[pytest.mark.ray, pytest.mark.workers])])
def test_a_corrupt_latest_checkpoint_is_named_and_the_one_before_it_resumes(
    runner: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    if runner == "ray":  # the session's Ray; in_process starts none
        request.getfixturevalue("ray_local")
    from pipeline.checkpoints import CheckpointError
    from pipeline.config import load_config
    from pipeline.loop import load_checkpoint
    from pipeline.train import run_training

    overrides = [f"storage_path={tmp_path}", f"data.root={tmp_path}", f"scaling.runner={runner}", "train.checkpoints_to_keep=5",
                 f"name=corrupt_{runner}"]  # fmt: skip
    run_training(load_config(CONF_DIR / "linear_regression.yaml", [*overrides, "train.epochs=3"]), track=False)
    latest = run_dir(tmp_path, f"corrupt_{runner}") / "checkpoint_epoch=0003"
    state = latest / "state.pt"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated, as by a full disk
    with pytest.raises(CheckpointError, match=r"checkpoint .*checkpoint_epoch=0003: state.pt does not match its checksum"):
        load_checkpoint(latest)
    events: list[dict] = []
    resumed = run_training(load_config(CONF_DIR / "linear_regression.yaml", [*overrides, "train.epochs=5"]), track=False,
                           on_event=events.append)  # fmt: skip
    assert [m["epoch"] for m in resumed.history] == [3, 4, 5]  # from epoch 2's checkpoint: epoch 3 again
    # The user is told, also from a Ray worker (whose own stderr only --verbose shows).
    (warning,) = [e["message"] for e in events if e["event"] == "warning"]
    assert "checkpoint_epoch=0003: state.pt does not match its checksum" in warning and "the checkpoint before it" in warning


def _table(text: str):
    def write(root: Path) -> list[str]:
        (root / "table.csv").write_text(text)
        return ["data.name=tabular", f"data.path={root / 'table.csv'}"]

    return write


def _mnist(damage):
    def write(root: Path) -> list[str]:
        from pipeline.standin import write_mnist_like

        write_mnist_like(root, "MNIST", n_train=120, n_test=40)
        damage(root / "MNIST" / "raw")
        return ["data.name=mnist", f"data.root={root}", "data.download=false", "loss=cross_entropy", "model.name=mlp"]

    return write


def _image_folder_with_a_text_file(root: Path) -> list[str]:
    from pipeline.standin import write_image_folder

    write_image_folder(root / "pets", per_class=4)
    (root / "pets" / "dog" / "readme.txt").write_text("not an image")
    return ["data.name=image_folder", f"data.path={root / 'pets'}", f"data.root={root}", "loss=cross_entropy", "model.name=mlp"]


def _truncate(raw: Path) -> None:
    images = raw / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])


def _drop_labels(raw: Path) -> None:
    from pipeline.standin import write_idx

    write_idx(raw / "train-labels-idx1-ubyte", np.zeros(7, dtype=np.uint8))  # 7 labels for 120 images


@pytest.mark.parametrize(
    ("data", "extra", "message"),
    [
        (_table("a,b\n1,2\n3,4\n"), ["data.target=label"], "data.target: column 'label' is not in"),
        (_table("a,y\n1,2.0\n3,nan\n"), ["data.target=y"], "the target column 'y' holds 1 empty or NaN values"),
        (_table("a,y\n1,2.0\ninf,3.0\n"), ["data.target=y"], "feature columns contain NaN, infinite or empty values (['a']"),
        (_mnist(_truncate), [], "truncated"),
        (_mnist(_drop_labels), [], "they must pair up"),
        (_image_folder_with_a_text_file, [], "readme.txt: not an image that can be read"),
    ],
    ids=["csv-without-target", "nan-target", "infinite-feature", "truncated-idx", "mismatched-idx", "non-image-file"],
)
def test_malformed_data_exits_2_and_leaves_no_run_or_version(
    data, extra: list[str], message: str, tmp_path: Path, tracking_store: str
) -> None:
    from pipeline.config import load_config
    from pipeline.errors import BadInput
    from pipeline.train import run_training

    name = f"malformed_{tmp_path.name}"[:60]
    overrides = [f"name={name}", f"storage_path={tmp_path}", *data(tmp_path), *extra]
    # In this process (a `pipeline` process costs seconds to start): BadInput is what it exits 2 for, without a traceback.
    with pytest.raises(BadInput) as refused:
        run_training(load_config(CONF_DIR / "linear_regression.yaml", overrides))
    assert message in str(refused.value)
    client = mlflow_client(tracking_store)
    assert client.get_experiment_by_name(name) is None
    assert client.search_registered_models(f"name = '{name}'") == []


@pytest.mark.mlflow_server
def test_the_mlflow_server_going_away_loses_nothing_and_a_rerun_completes_the_run(tmp_path: Path) -> None:
    root, port = tmp_path / "mlflow", free_port()
    root.mkdir()
    url = f"http://127.0.0.1:{port}"
    # The server is gone, not slow: MLflow's retries (3 over ~7 s a call, as the pipeline sets them) would only wait.
    env = {**os.environ, "MLFLOW_TRACKING_URI": url, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    epochs = 8
    args = ["train", str(CONF_DIR / "linear_regression.yaml"), "name=server_away", f"storage_path={tmp_path}",
            f"data.root={tmp_path}", "data.num_samples=20000", f"train.epochs={epochs}"]  # fmt: skip
    server = start_mlflow_server(root, port)
    try:
        run = start_cli(*args, "--output", "json", env=env)
        folder = wait_for_run_dir(tmp_path, "server_away", run)
        wait_for_files(folder, "checkpoint_epoch=0002", run)
        stop_group(server)  # the server goes away for the rest of the run
        out, err = run.communicate(timeout=300)
        assert run.returncode == 1, err[-3000:]
        assert "is not answering" in err and "training goes on" in err
        assert "the MLflow server went away" in err and "run the same command again" in err
        assert (folder / f"checkpoint_epoch={epochs:04d}").is_dir()  # training went on to the end

        server = start_mlflow_server(root, port)  # back, with the same store
        again = start_cli(*args, "--output", "json", env=env)
        out, err = again.communicate(timeout=300)
        assert again.returncode == 0, err[-3000:]
        summary = last_json(out)
        assert summary["history"] == []  # nothing trained again
        client = mlflow_client(url)
        (found,) = runs_of(client, "server_away")
        assert found.info.run_id == summary["mlflow_run_id"] and found.info.status == "FINISHED"
        # The epochs the server missed were logged from the checkpoint's history, each once.
        for key in ("epoch", "val_mse"):
            assert metric_steps(client, found.info.run_id, key) == list(range(1, epochs + 1))
        assert summary["registration"]["version"] == "1"
    finally:
        stop_group(server)


# --- security ---------------------------------------------------------------------------------------


@pytest.mark.mlflow_server
def test_secrets_in_the_config_never_reach_mlflow_or_the_console(mlflow_server: str, tmp_path: Path) -> None:
    # A user's model that takes an API token, and a tracking URI with a password in it.
    (tmp_path / "secret_net.py").write_text(
        "from torch import nn\n\nclass Net(nn.Linear):\n    def __init__(self, api_token: str):\n        super().__init__(2, 1)\n"
    )
    host = mlflow_server.removeprefix("http://")
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    done = run_cli(
        "train", str(CONF_DIR / "linear_regression.yaml"), "name=secretive", "model.name=secret_net:Net",
        "model.kwargs={api_token: hunter2-token}", f"tracking.uri=http://alice:hunter2-pw@{host}", f"storage_path={tmp_path}",
        f"data.root={tmp_path}", "train.epochs=1", "--output", "json", cwd=tmp_path, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    for secret in ("hunter2-token", "hunter2-pw"):
        assert secret not in done.stdout and secret not in done.stderr
    client = mlflow_client(mlflow_server)
    (run,) = runs_of(client, "secretive")
    recorded = [
        *run.data.params.values(),
        *run.data.tags.values(),
        client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path)),
    ]
    recorded[-1] = Path(recorded[-1]).read_text()
    version = client.get_model_version_by_alias("secretive", "champion")
    described = version.description or ""
    recorded += [*version.tags.values(), described, client.get_registered_model("secretive").description]
    assert run.data.params["model.kwargs.api_token"] == "***"
    # The command line is the run's description and part of the version's, with its secrets hidden.
    note = run.data.tags["mlflow.note.content"]
    assert note.startswith("Made by `python -m pipeline train ") and "name=secretive" in note and "tracking.uri=http://***@" in note
    assert note in described and run.info.run_id in described
    assert not [text for text in recorded if "hunter2" in text]


def test_the_ui_binds_to_127_0_0_1_unless_told_otherwise() -> None:
    from pipeline.cli import build_parser
    from pipeline.tracking import Store, ui_command

    args = build_parser().parse_args(["ui"])
    assert args.host == "127.0.0.1"
    command = ui_command(Store("sqlite:////tmp/x/mlflow.db", "default", "/tmp/x/mlartifacts"), args.host, args.port)
    assert command[command.index("--host") + 1] == "127.0.0.1"


def _live_members(group: int) -> list[str]:
    """The processes of a process group that still run (zombies, already ended, are not counted)."""
    found = []
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        state, _, pgrp = stat.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == group and state != "Z":
            found.append(stat.split(")", 1)[0])
    return found


def _still_running_after(running: Callable[[], list[str]], timeout_s: float = 20) -> list[str]:
    """What `running()` names once it names nothing or `timeout_s` has passed: the processes that outlived the run."""
    deadline = time.monotonic() + timeout_s
    while (alive := running()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return alive


def _group_ends(group: int) -> list[str]:
    return _still_running_after(lambda: _live_members(group))


def _descendants(pid: int) -> dict[psutil.Process, str]:
    """The processes a run started (a local Ray's GCS, raylet, agents and workers), in whatever process group,
    each with its PID and name, taken while it runs (one that ends meanwhile, a short-lived task's, is left out)."""
    found = {}
    for child in psutil.Process(pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            found[child] = f"{child.pid} {child.name()}"
    return found


def _runs(process: psutil.Process) -> bool:
    """Whether `process` still runs: not ended, not a zombie, and its PID not reused (psutil checks)."""
    try:
        return process.is_running() and process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def _outliving(processes: dict[psutil.Process, str]) -> list[str]:
    return _still_running_after(lambda: [name for process, name in processes.items() if _runs(process)])


def _terminal_job() -> None:
    """In the child, before exec: its own session (its process group gets the signal) and SIGINT at its default,
    as a command typed in a terminal has it; a shell script's background job (a CI runner may be one) inherits
    SIGINT ignored, and Python then never turns Ctrl-C into KeyboardInterrupt."""
    os.setsid()
    signal.signal(signal.SIGINT, signal.SIG_DFL)


# How the signal comes: Ctrl-C in a terminal (SIGINT to the foreground process group), SIGTERM from
# Kubernetes or Docker (to the process), SIGTERM from GNU `timeout` or `kill -- -PGID` (to the group).
INTERRUPTS = {"ctrl_c": (signal.SIGINT, True, 130), "sigterm": (signal.SIGTERM, False, 143), "sigterm_group": (signal.SIGTERM, True, 143)}


@pytest.mark.ray
@pytest.mark.workers
@pytest.mark.parametrize("how", list(INTERRUPTS))
def test_an_interrupted_ray_training_exits_at_once_killed_and_resumes_with_the_same_command(how: str, tmp_path: Path) -> None:
    signum, to_group, code = INTERRUPTS[how]
    epochs = 4  # the signal comes in epoch 3: the resumed run trains what is left
    args = ["train", str(CONF_DIR / "linear_regression.yaml"), f"name=stopped_{how}", f"storage_path={tmp_path}",
            f"data.root={tmp_path}", "data.num_samples=20000", f"train.epochs={epochs}", "scaling.num_workers=2"]  # fmt: skip
    run = start_cli(*args, "--output", "json", preexec_fn=_terminal_job)
    folder = wait_for_run_dir(tmp_path, f"stopped_{how}", run)
    wait_for_files(folder, "checkpoint_epoch=0002", run, timeout_s=240)
    ray_processes = _descendants(run.pid)
    (raylet,) = [process for process, name in ray_processes.items() if name.endswith(" raylet")]
    assert os.getpgid(raylet.pid) != run.pid, "a local Ray's processes run outside the command's process group"
    sent = time.monotonic()
    (os.killpg if to_group else os.kill)(run.pid, signum)
    _, err = run.communicate(timeout=60)
    assert run.returncode == code, err[-3000:]
    assert time.monotonic() - sent < 15
    assert "run the same command again to resume" in err and "Traceback" not in err and "SIGTERM received" not in err
    assert _outliving(ray_processes) == [], "a Ray process outlived the run"
    assert _group_ends(run.pid) == [], "a process of the run's group outlived it"
    client = mlflow_client(os.environ["MLFLOW_TRACKING_URI"])
    (killed,) = runs_of(client, f"stopped_{how}")
    assert killed.info.status == "KILLED"
    if how != "ctrl_c":  # resuming does not depend on how the run was stopped: shown once, to keep CI short
        return

    again = start_cli(*args, "--output", "json")
    out, err = again.communicate(timeout=300)
    assert again.returncode == 0, err[-3000:]
    summary = last_json(out)
    assert summary["outcome"] == "resumed" and summary["mlflow_run_id"] == killed.info.run_id
    assert client.get_run(killed.info.run_id).info.status == "FINISHED"
    assert metric_steps(client, killed.info.run_id, "epoch") == list(range(1, epochs + 1))


@pytest.mark.ray
def test_ctrl_c_stops_a_search_registering_nothing_and_the_same_command_finishes_it(tmp_path: Path) -> None:
    epochs = 5
    args = ["tune", str(CONF_DIR / "linear_regression.yaml"), "name=stopped_search", f"storage_path={tmp_path}",
            f"data.root={tmp_path}", "data.num_samples=20000", f"train.epochs={epochs}", "tune.scheduler=fifo",
            "tune.num_samples=1", "tune.max_concurrent_trials=1", "tune.space={optim.lr: {grid: [0.03, 0.02]}}"]  # fmt: skip
    search = start_cli(*args, "--output", "json", preexec_fn=_terminal_job)
    trials = wait_for_run_dir(tmp_path, "stopped_search", search, search=True) / "trials"
    wait_for_files(trials, "*/*/checkpoint_epoch=0002", search, timeout_s=240)
    ray_processes = _descendants(search.pid)
    os.killpg(search.pid, signal.SIGINT)
    _, err = search.communicate(timeout=60)
    assert search.returncode == 130, err[-3000:]
    assert "run the same command again to continue the search" in err and "Traceback" not in err
    assert _outliving(ray_processes) == [] and _group_ends(search.pid) == []
    client = mlflow_client(os.environ["MLFLOW_TRACKING_URI"])
    assert {r.info.status for r in runs_of(client, "stopped_search")} == {"KILLED"}, "the search and its started trials"
    assert client.search_registered_models("name = 'stopped_search'") == [], "nothing half-trained is registered"

    again = start_cli(*args, "--output", "json")
    out, err = again.communicate(timeout=400)
    assert again.returncode == 0, err[-3000:]
    summary = last_json(out)["search"]
    assert summary["outcome"] == "resumed"
    # Each trial's whole history, the epochs before the interruption included, decides its best value.
    assert all(t["status"] == "finished" and [e for e, _ in t["history"]] == list(range(1, epochs + 1)) for t in summary["trials"])
    for child in runs_of(client, "stopped_search", parent=summary["mlflow_run_id"]):
        assert child.info.status == "FINISHED"
        assert metric_steps(client, child.info.run_id, "epoch") == list(range(1, epochs + 1))
    assert len(client.search_model_versions("name = 'stopped_search'")) == 1


@pytest.mark.ray  # the check asks the local Ray what this machine has
def test_a_run_larger_than_this_machine_is_refused_before_any_mlflow_run(ray_local, tmp_path: Path) -> None:
    from pipeline.config import load_config
    from pipeline.errors import BadInput
    from pipeline.train import run_training

    # On the session's Ray (4 CPUs), not a `pipeline` process with a Ray of its own (~20 s on 2 cores to start):
    # BadInput is what the command exits 2 for, without a traceback.
    overrides = ["name=too_many", f"storage_path={tmp_path}", f"data.root={tmp_path}", "scaling.num_workers=64"]
    with pytest.raises(BadInput) as refused:
        run_training(load_config(CONF_DIR / "linear_regression.yaml", overrides))
    assert "scaling: the run needs 64 CPUs and 0 GPUs (64 workers x 1 CPU); this machine's Ray has" in str(refused.value)
    assert "lower scaling.num_workers" in str(refused.value)
    assert mlflow_client(os.environ["MLFLOW_TRACKING_URI"]).get_experiment_by_name("too_many") is None
    assert not (tmp_path / "too_many").exists()


def test_a_run_whose_every_checkpoint_is_damaged_stops_and_says_fresh(tmp_path: Path) -> None:
    from pipeline.config import load_config
    from pipeline.train import run_training

    overrides = ["name=all_damaged", f"storage_path={tmp_path}", f"data.root={tmp_path}"]
    run_training(load_config(CONF_DIR / "linear_regression.yaml", [*overrides, "train.epochs=2"]))  # in this process: ~15 s less
    for state in run_dir(tmp_path, "all_damaged").glob("checkpoint_epoch=*/state.pt"):
        state.write_bytes(b"not a checkpoint")
    again = run_cli("train", str(CONF_DIR / "linear_regression.yaml"), *overrides, "train.epochs=3")
    assert again.returncode == 1, again.stderr[-3000:]
    assert "every checkpoint of this run is damaged; run the command with --fresh" in again.stderr and "Traceback" not in again.stderr
    client = mlflow_client(os.environ["MLFLOW_TRACKING_URI"])
    (run,) = runs_of(client, "all_damaged")
    assert metric_steps(client, run.info.run_id, "epoch") == [1, 2], "no new model's epochs"


def test_a_damaged_checkpoint_summary_is_named_and_skipped(tmp_path: Path) -> None:
    from pipeline.config import load_config
    from pipeline.train import run_training

    overrides = [
        f"storage_path={tmp_path}",
        f"data.root={tmp_path}",
        "scaling.num_workers=0",
        "train.checkpoints_to_keep=5",
        "name=bad_meta",
    ]
    run_training(load_config(CONF_DIR / "linear_regression.yaml", [*overrides, "train.epochs=3"]), track=False)
    (run_dir(tmp_path, "bad_meta") / "checkpoint_epoch=0003" / "meta.json").write_text("{not json")
    events: list[dict] = []
    resumed = run_training(load_config(CONF_DIR / "linear_regression.yaml", [*overrides, "train.epochs=4"]), track=False,
                           on_event=events.append)  # fmt: skip
    assert [m["epoch"] for m in resumed.history] == [3, 4]
    assert any("checkpoint_epoch=0003: meta.json is damaged" in e["message"] for e in events if e["event"] == "warning")


def test_a_diverged_run_stops_and_registers_nothing(tmp_path: Path) -> None:
    done = run_cli(
        "train",
        str(CONF_DIR / "linear_regression.yaml"),
        "name=diverged",
        f"storage_path={tmp_path}",
        f"data.root={tmp_path}",
        "optim.lr=1000",
        "--output",
        "json",
    )
    assert done.returncode == 1, done.stderr[-3000:]
    assert "DivergedError: train_loss is" in done.stderr and "the training diverged; lower optim.lr (now 1000)" in done.stderr
    assert done.stdout.strip() == "" and "Traceback" not in done.stderr
    client = mlflow_client(os.environ["MLFLOW_TRACKING_URI"])
    (run,) = runs_of(client, "diverged")
    assert run.info.status == "FAILED"
    assert client.search_registered_models("name = 'diverged'") == []


def test_the_same_run_twice_at_once_trains_once_and_a_fresh_store_takes_two_commands_at_once(tmp_path: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'fresh.db'}"}  # a store no command has made yet
    args = ["train", str(CONF_DIR / "linear_regression.yaml"), f"storage_path={tmp_path}", f"data.root={tmp_path}",
            "data.num_samples=20000", "train.epochs=6", "--output", "json"]  # fmt: skip
    first, other = start_cli(*args, "name=twice", env=env), start_cli(*args, "name=other", env=env)
    wait_for_run_dir(tmp_path, "twice", first)
    second = start_cli(*args, "name=twice", env=env)
    (_, err1), (out2, err2), (_, err3) = first.communicate(timeout=300), second.communicate(timeout=300), other.communicate(timeout=300)
    assert first.returncode == 0 and other.returncode == 0, err1[-2000:] + err3[-2000:]
    if second.returncode == 2:  # it came while the first trained
        assert "twice (" in err2 and "is being run right now by another process" in err2
    else:  # the first had finished already
        assert second.returncode == 0 and last_json(out2)["outcome"] == "already trained"
    client = mlflow_client(env["MLFLOW_TRACKING_URI"])
    (run,) = runs_of(client, "twice")
    assert metric_steps(client, run.info.run_id, "epoch") == list(range(1, 7))
    assert len(client.search_model_versions("name = 'twice'")) == 1


@pytest.mark.ray
@pytest.mark.workers
def test_a_relative_sqlite_store_gets_every_ray_worker_s_metrics(tmp_path: Path) -> None:
    # sqlite:///runs.db is relative to each process's directory, and a Ray worker's is not this one.
    env = {**os.environ, "MLFLOW_TRACKING_URI": "sqlite:///relative.db"}
    done = run_cli(
        "train",
        str(CONF_DIR / "linear_regression.yaml"),
        "name=relative",
        "storage_path=runs",
        "data.root=data",
        "train.epochs=2",
        "scaling.runner=ray",
        "--output",
        "json",
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    client = mlflow_client(f"sqlite:///{tmp_path / 'relative.db'}")
    (run,) = runs_of(client, "relative")
    assert metric_steps(client, run.info.run_id, "val_mse") == [1, 2]
    # A run on Ray shows only the pipeline's own lines (Ray's own go to its logs): checked on this run, not
    # on a Ray run of its own (~40 s on 2 cores).
    lines = done.stderr.strip().splitlines()
    assert lines and all(line.startswith(("epoch ", "warning: ")) for line in lines), lines


@pytest.mark.ray
def test_one_diverged_trial_fails_alone_and_the_search_completes(ray_local, tmp_path: Path) -> None:
    from pipeline.config import load_config
    from pipeline.tune import run_search

    overrides = [f"storage_path={tmp_path}", f"data.root={tmp_path}", "name=nan_trial", "train.epochs=2", "tune.scheduler=fifo",
                 "tune.num_samples=1", "tune.max_concurrent_trials=1", "tune.space={optim.lr: {grid: [0.03, 1000.0]}}"]  # fmt: skip
    result = run_search(load_config(CONF_DIR / "linear_regression.yaml", overrides))
    statuses = {t.params["optim.lr"]: t for t in result.trials}
    assert statuses[0.03].status == "finished" and statuses[1000.0].status == "failed"
    assert "DivergedError" in (statuses[1000.0].error or "")
    assert result.best.params["optim.lr"] == 0.03
    client = mlflow_client(os.environ["MLFLOW_TRACKING_URI"])
    children = runs_of(client, "nan_trial", parent=result.mlflow_run_id)
    assert sorted(c.info.status for c in children) == ["FAILED", "FINISHED"]
    # The finished trial is registered, the first version of its name, as champion.
    (version,) = client.search_model_versions("name = 'nan_trial'")
    # str(): a version number comes back as int or str depending on the store
    assert result.registration is not None
    assert (str(version.version), str(result.registration["version"]), result.registration["alias"]) == ("1", "1", "champion")
    assert version.run_id == next(c.info.run_id for c in children if c.info.status == "FINISHED")


def test_credentials_in_a_run_folder_uri_never_reach_its_run_dir_tag(tracking_store: str, tmp_path: Path) -> None:
    from pipeline.config import load_config
    from pipeline.data.store import materialize
    from pipeline.tracking import open_run, resolve_store

    cfg = load_config(CONF_DIR / "linear_regression.yaml", [f"data.root={tmp_path}", "name=with_credentials"])
    spec = materialize(cfg.data, cfg.seed)
    folder = "s3://AKIAEXAMPLE:very-secret@bucket/runs/with_credentials/0123456789ab"
    run = open_run(resolve_store(None), cfg, spec, run_dir=folder, fresh=True, tags={})
    assert "very-secret" not in mlflow_client(tracking_store).get_run(run.run_id).data.tags["run_dir"]
