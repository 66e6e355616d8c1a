"""Small files in the real formats of MNIST, FashionMNIST and CIFAR-10 (and an ImageFolder), written
offline and laid out as torchvision lays them out: for tests, benchmarks and trying a conf without a network.

The images are learnable: each class lights up its own patch, over noise, so a model trained on a
few hundred of them beats chance quickly.
"""

from __future__ import annotations

import gzip
import pickle
from pathlib import Path

import numpy as np


def patterned_images(n: int, channels: int, size: int, num_classes: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """uint8 images (N, C, H, W) whose class is the position of a bright patch; labels (N,)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, num_classes, size=n)
    images = rng.integers(0, 60, size=(n, channels, size, size), dtype=np.uint8)
    patch = size // 4
    for i, label in enumerate(labels):
        row, col = divmod(int(label), 4)
        images[i, :, row * patch : (row + 1) * patch, col * patch : (col + 1) * patch] = 255
    return images, labels.astype(np.uint8)


def write_idx(path: Path, array: np.ndarray, *, compress: bool = False) -> Path:
    """IDX: two zero bytes, type 0x08 (unsigned byte), the number of dims, big-endian dims, the data."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(int(d).to_bytes(4, "big") for d in array.shape)
    payload = header + np.ascontiguousarray(array, dtype=np.uint8).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    if compress:
        path = path.with_name(path.name + ".gz")
        path.write_bytes(gzip.compress(payload))
    else:
        path.write_bytes(payload)
    return path


def write_mnist_like(root: Path, folder: str = "MNIST", *, n_train: int = 200, n_test: int = 50, seed: int = 0) -> Path:
    """<root>/<folder>/raw/{train,t10k}-{images-idx3,labels-idx1}-ubyte, as torchvision's MNIST reads them."""
    raw = root / folder / "raw"
    for prefix, n, offset in (("train", n_train, 0), ("t10k", n_test, 1)):
        images, labels = patterned_images(n, 1, 28, 10, seed + offset)
        write_idx(raw / f"{prefix}-images-idx3-ubyte", images[:, 0])
        write_idx(raw / f"{prefix}-labels-idx1-ubyte", labels)
    return raw


CIFAR_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def write_cifar10(root: Path, *, per_batch: int = 40, n_test: int = 40, seed: int = 0) -> Path:
    """<root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}: pickled dicts, as released."""
    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for i, name in enumerate(names):
        images, labels = patterned_images(n_test if name == "test_batch" else per_batch, 3, 32, 10, seed + i)
        batch = {"batch_label": name, "labels": labels.tolist(), "data": images.reshape(len(images), -1)}
        with (folder / name).open("wb") as f:
            pickle.dump(batch, f)
    with (folder / "batches.meta").open("wb") as f:
        pickle.dump({"label_names": CIFAR_CLASSES, "num_vis": 3072}, f)
    return folder


def write_image_folder(root: Path, *, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 12, size: tuple[int, int] = (8, 8),
                       mode: str = "L", seed: int = 0) -> Path:  # fmt: skip
    """<root>/<class>/<i>.png, torchvision's ImageFolder layout; each class a brightness band, so it is learnable."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    channels = 1 if mode == "L" else 3
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            base = 40 + 160 * label / max(len(classes) - 1, 1)
            pixels = np.clip(rng.normal(base, 20, size=(*size, channels)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode).save(root / name / f"{i}.png")
    return root
