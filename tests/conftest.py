"""Shared fixtures: one real local Ray, a real MLflow store and server, small data in the real formats."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.formats import write_cifar10, write_mnist_like

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"


@pytest.fixture(scope="session", autouse=True)
def tracking_store(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """Every test's runs go to one SQLite store in a temp folder, never to ./mlflow.db in the repo.

    Set in the environment, so that `pipeline` subprocesses use it too; tests of the embedded default
    remove it for themselves (monkeypatch.delenv)."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"
    previous = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri
    yield uri
    if previous is None:
        os.environ.pop("MLFLOW_TRACKING_URI", None)
    else:
        os.environ["MLFLOW_TRACKING_URI"] = previous


def mlflow_client(uri: str):
    """A client of `uri` for runs and the registry alike: a test before may have left MLFLOW_REGISTRY_URI
    pointing elsewhere (mlflow.set_registry_uri sets it for the whole process)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args} exited with {process.returncode}: {process.communicate()}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend and served artifacts in a temp folder."""
    port = free_port()
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(server)


def start_mlflow_server(root: Path, port: int) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port, its store and artifacts in `root` (the same root: the same runs)."""
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
    ]  # fmt: skip
    server = subprocess.Popen(command, cwd=root, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", server)
    except BaseException:
        stop_group(server)
        raise
    return server


def stop_group(process: subprocess.Popen) -> None:
    """Stop a process started with start_new_session=True and its children (mlflow server runs uvicorn)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with room for two workers and a driver, started once (about 5 s).

    With its dashboard: Ray Train's placement-group cleaner asks it whether a trainer has died, which
    Tune trials on worker groups that ASHA stops early depend on (see pipeline.train.ensure_ray)."""
    import ray

    # address="local": a Ray of its own, never a cluster that this machine happens to run (as ensure_ray).
    ray.init(address="local", num_cpus=4, include_dashboard=True, log_to_driver=False, configure_logging=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def data_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """MNIST, FashionMNIST and CIFAR-10 in torchvision's layout, a few hundred samples each."""
    root = tmp_path_factory.mktemp("data")
    write_mnist_like(root, "MNIST", seed=1)
    write_mnist_like(root, "FashionMNIST", seed=2)
    write_cifar10(root)
    return root


def run_dir(storage: Path, name: str, *, search: bool = False) -> Path:
    """The folder of the one run (or search) of `name` under `storage`: <storage>/<name>[-tune]/<key>."""
    (folder,) = [record.parent for record in (storage / f"{name}{'-tune' if search else ''}").glob("*/run.json")]
    return folder


def wait_for_run_dir(storage: Path, name: str, process: subprocess.Popen, *, search: bool = False, timeout_s: float = 120) -> Path:
    """run_dir, once the `pipeline` process has made it."""
    deadline = time.monotonic() + timeout_s
    while not list((storage / f"{name}{'-tune' if search else ''}").glob("*/run.json")):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    return run_dir(storage, name, search=search)


def tiny(data_root: Path, storage: Path, *extra: str) -> list[str]:
    """Overrides that shrink any experiment to seconds: local data, one epoch, small batches, no download."""
    return [
        f"data.root={data_root}",
        "data.download=false",
        f"storage_path={storage}",
        "train.epochs=1",
        "data.batch_size=16",
        *extra,
    ]
