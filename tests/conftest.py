"""Shared fixtures: one real local Ray, a real MLflow store and server, small data in the real formats."""

from __future__ import annotations

import os
import secrets
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline.standin import write_cifar10, write_mnist_like
from tests.helpers import Stack, free_port, start_mlflow_on_stack, start_mlflow_server, start_postgres, start_s3, stop_group

# What these fixtures start, and the marker (pyproject.toml) a test that takes one must carry: without it,
# the test would run in the fast tier, `-m "not (ray or workers or cluster or mlflow_server or browser)"`.
FIXTURE_MARKERS = {"ray_local": "ray", "mlflow_server": "mlflow_server", "production_stack": "mlflow_server", "cluster": "cluster"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    unmarked = [f"{item.nodeid}: takes {fixture} but is not marked {marker}"
                for item in items for fixture, marker in FIXTURE_MARKERS.items()
                if fixture in getattr(item, "fixturenames", ()) and item.get_closest_marker(marker) is None]  # fmt: skip
    if unmarked:
        raise pytest.UsageError("a test names what it starts with its marker:\n" + "\n".join(unmarked))


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


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 with a SQLite backend and served artifacts in a temp folder."""
    port = free_port()
    server = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"), port)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_group(server)


@pytest.fixture(scope="session")
def production_stack() -> Iterator[Stack]:
    """MLflow as k8s/ deploys it: `mlflow server` on a real PostgreSQL, artifacts in an S3-compatible bucket
    (moto's HTTP server), authentication on (user admin: Stack.credentials()), all on 127.0.0.1 (about 15 s)."""
    # Not pytest's temp dir: PostgreSQL runs as its own user, who cannot enter root's private folders.
    root = Path(tempfile.mkdtemp(prefix="stack", dir="/tmp"))
    root.chmod(0o711)  # PostgreSQL's user may pass through to its own folder, and list nothing
    (root / "pg").mkdir()
    pg_port, s3_port, port = free_port(), free_port(), free_port()
    password = secrets.token_hex(8)
    servers: dict = {}
    try:
        servers["postgres"] = start_postgres(root / "pg", pg_port, password)
        servers["s3"] = start_s3(s3_port, "mlflow")
        stack = Stack(f"http://127.0.0.1:{port}", f"postgresql://mlflow:{password}@127.0.0.1:{pg_port}/mlflow",
                      f"http://127.0.0.1:{s3_port}", "mlflow", secrets.token_hex(8), root / "pg", servers)  # fmt: skip
        servers["mlflow"] = start_mlflow_on_stack(root, port, stack)
        yield stack
    finally:
        for server in reversed(servers.values()):  # MLflow first: PostgreSQL's shutdown waits for its clients
            stop_group(server)
        shutil.rmtree(root, ignore_errors=True)


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with room for two workers and a driver, started once (about 5 s).

    With its dashboard: Ray Train's placement-group cleaner asks it whether a trainer has died, which
    Tune trials on worker groups that ASHA stops early depend on (see pipeline.runtime.ensure_ray)."""
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
