"""Shared fixtures: one real local Ray for the whole test run, and small data in the real formats."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from tests.formats import write_cifar10, write_mnist_like

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with room for two workers and a driver, started once (about 4 s)."""
    import ray

    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False, configure_logging=False)
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
