"""The sources: one reader per `data.name`, behind one registry, `SOURCES` (like the model catalog).

    splits, classes, features = SOURCES[cfg.data.name].read(cfg.data, seed)

A `Source` gives a dataset's store key (its Parquet folder under `<data.root>/parquet/`: a new key for
new contents) and reads it as arrays: images as uint8 (N, C, H, W), features as float32 (N, D). Only
`materialize` (store.py) imports this module, and only to write a dataset the first time, so serving
never imports the download code. Adding a dataset is one reader and one line in `SOURCES` (and its
name in config.DATASET_NAMES, which validates `data.name` without importing this module).
"""

from __future__ import annotations

import gzip
import hashlib
import pickle
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import DataConfig
from pipeline.data.store import DataError, Split, file_sha256

__all__ = ["LINEAR_NOISE_STD", "LINEAR_TRUE_B", "LINEAR_TRUE_W", "SOURCES", "Read", "Source"]

Read = tuple[dict[str, Split], tuple[str, ...], tuple[str, ...]]  # splits, class names, a table's feature names

# The tutorials' synthetic regression: y = Xw + b + noise.
LINEAR_TRUE_W = (2.0, -3.4)
LINEAR_TRUE_B = 4.2
LINEAR_NOISE_STD = 0.01


@dataclass(frozen=True)
class Source:
    """One `data.name`: the key of its Parquet folder, and how to read its splits."""

    key: Callable[[DataConfig, int], str]  # (data config, seed) -> store key; new contents, new key
    read: Callable[[DataConfig, int], Read]  # (data config, seed) -> splits, classes (empty for regression), features


# ---------------------------------------------------------------------------------------------------
# Store keys


def _name_key(cfg: DataConfig, seed: int) -> str:
    """A fixed download: its name is its key."""
    return cfg.name


def _synthetic_key(cfg: DataConfig, seed: int) -> str:
    return f"{cfg.name}-n{cfg.num_samples}-seed{seed}"


def _table_key(cfg: DataConfig, seed: int) -> str:
    path = _existing(Path(cfg.path or ""), "data.path")
    return f"tabular-{path.stem}-{cfg.target}-{file_sha256(path)[:12]}"


def _image_folder_key(cfg: DataConfig, seed: int) -> str:
    folder = _image_root(Path(cfg.path or ""))
    size = "x".join(map(str, cfg.image_size)) if cfg.image_size else "native"
    return f"images-{folder.name}-{size}-{_listing_hash(folder)[:12]}"


def _existing(path: Path, key: str) -> Path:
    if not path.is_file():
        raise DataError(f"{key}: file {path} does not exist")
    return path


# ---------------------------------------------------------------------------------------------------
# Readers


def _make_linear(n: int, seed: int) -> Split:
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, len(LINEAR_TRUE_W))).astype(np.float32)
    y = x @ np.array(LINEAR_TRUE_W, dtype=np.float32) + LINEAR_TRUE_B
    y += rng.normal(scale=LINEAR_NOISE_STD, size=n).astype(np.float32)
    return x, y.astype(np.float32)


def _make_circles(n: int, seed: int) -> Split:
    """Points in a square around the unit circle; label 1 inside it, 0 outside."""
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1.5, 1.5, size=(n, 2)).astype(np.float32)
    y = ((x**2).sum(axis=1) < 1.0).astype(np.int64)
    return x, y


def _read_table(path: Path, target: str) -> tuple[dict[str, Split], tuple[str, ...], tuple[str, ...]]:
    import pyarrow.csv as pcsv

    path = _existing(path, "data.path")
    try:
        table = pcsv.read_csv(path) if path.suffix.lower() == ".csv" else pq.read_table(path)
    except (pa.ArrowInvalid, OSError) as err:
        raise DataError(f"data.path: cannot read {path} as {'CSV' if path.suffix == '.csv' else 'Parquet'}: {err}") from None
    if target not in table.column_names:
        raise DataError(f"data.target: column {target!r} is not in {path}; its columns are {table.column_names}")
    features = [c for c in table.column_names if c != target]
    bad = [c for c in features if not pa.types.is_integer(table[c].type) and not pa.types.is_floating(table[c].type)]
    if bad or not features:
        raise DataError(f"{path}: feature columns must be numeric; not numeric: {bad or '(no feature columns)'}")
    x = np.column_stack([table[c].to_numpy(zero_copy_only=False) for c in features]).astype(np.float32)
    if not np.isfinite(x).all():
        columns = [features[i] for i in np.flatnonzero(~np.isfinite(x).all(axis=0))]
        row = int(np.flatnonzero(~np.isfinite(x).all(axis=1))[0])
        raise DataError(f"{path}: feature columns contain NaN, infinite or empty values ({columns}, first in data row "
                        f"{row + 1}); clean or impute them first")  # fmt: skip
    y_col = table[target]
    if y_col.null_count:
        raise DataError(f"{path}: the target column {target!r} holds {y_col.null_count} empty or NaN values; drop those rows first")
    if pa.types.is_floating(y_col.type):
        y = y_col.to_numpy(zero_copy_only=False).astype(np.float32)
        if not np.isfinite(y).all():
            raise DataError(f"{path}: the target column {target!r} holds NaN or infinite values (first in data row "
                            f"{int(np.flatnonzero(~np.isfinite(y))[0]) + 1}); drop or fix those rows first")  # fmt: skip
        return {"train": (x, y)}, (), tuple(features)
    # Integer labels keep their numeric order (class 2 before class 10); others sort as text.
    values = y_col.to_numpy(zero_copy_only=False)
    labels = values if pa.types.is_integer(y_col.type) else values.astype(str)
    classes, y = np.unique(labels, return_inverse=True)
    return {"train": (x, y.astype(np.int64))}, tuple(str(c) for c in classes), tuple(features)


def _image_root(path: Path) -> Path:
    if not path.is_dir():
        raise DataError(f"data.path: folder {path} does not exist; it holds one folder of images per class")
    return path.resolve()


def _listing_hash(folder: Path) -> str:
    """A fingerprint of a folder tree (names, sizes, modification times): new or changed images, a new key."""
    digest = hashlib.sha256()
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            stat = path.stat()
            digest.update(f"{path.relative_to(folder)}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _read_image_folder(root: Path, size: tuple[int, int] | None) -> tuple[dict[str, Split], tuple[str, ...]]:
    """ImageFolder layouts: <root>/<class>/<image>, or <root>/{train,test}/<class>/<image>."""
    split_dirs = {"train": root / "train", "test": root / "test"} if (root / "train").is_dir() else {"train": root}
    classes = tuple(sorted(d.name for d in split_dirs["train"].iterdir() if d.is_dir() and not d.name.startswith(".")))
    if len(classes) < 2:
        raise DataError(f"data.path: {split_dirs['train']} needs a folder per class (at least 2), holding that class's images")
    first: list = []  # the first image's (mode, size, path): the shape every other image must have
    splits = {split: _read_class_folders(folder, classes, size, first) for split, folder in split_dirs.items() if folder.is_dir()}
    return splits, classes


def _read_class_folders(folder: Path, classes: tuple[str, ...], size: tuple[int, int] | None, first: list) -> Split:
    images, labels = [], []
    for label, name in enumerate(classes):
        files = sorted(p for p in (folder / name).glob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise DataError(f"{folder / name}: no images in this class folder")
        for path in files:
            images.append(_read_image(path, size, first))
            labels.append(label)
    return np.stack(images), np.array(labels, dtype=np.int64)


def _read_image(path: Path, size: tuple[int, int] | None, first: list) -> np.ndarray:
    """One image as uint8 (C, H, W) by the images.py contract (the one `pipeline predict` reads by): grayscale
    or RGB as the first image is, at `size` or the first's size."""
    from pipeline.images import ImageError, channels_of, open_image, to_pixels

    try:
        image = open_image(path)
    except ImageError as err:  # it names the file
        raise DataError(f"{err}; convert it or remove it from the folder") from None
    if not first:
        first.extend([channels_of(image), size or image.size[::-1], path])
    channels, (height, width), reference = first
    if not size and image.size[::-1] != (height, width):
        raise DataError(f"{path}: {image.size[1]}x{image.size[0]} pixels, but {reference} is {height}x{width}; "
                        f"set data.image_size=[{height}, {width}] to resize every image")  # fmt: skip
    try:
        return to_pixels(image, channels, size)
    except ImageError as err:
        raise DataError(f"{path}: {err}; convert it or remove it from the folder") from None


_MNIST_LIKE = {
    # dataset name -> (torchvision class, class names)
    "mnist": ("MNIST", tuple(str(d) for d in range(10))),
    "fashion_mnist": (
        "FashionMNIST",
        ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"),
    ),
}
_MNIST_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}


def _read_mnist_like(name: str, root: Path, download: bool) -> tuple[dict[str, Split], tuple[str, ...]]:
    """Read torchvision's own layout: <root>/<MNIST|FashionMNIST>/raw/*-ubyte[.gz]."""
    tv_name, classes = _MNIST_LIKE[name]
    raw = root / tv_name / "raw"
    wanted = [f for pair in _MNIST_FILES.values() for f in pair]
    if any(_idx_path(raw, f) is None for f in wanted):
        _download_or_explain(name, raw, wanted, download)
    splits = {}
    for split, (images, labels) in _MNIST_FILES.items():
        x, y = _read_idx(_downloaded_idx(raw, images)), _read_idx(_downloaded_idx(raw, labels))
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{raw}: {images} holds {x.shape} but {labels} holds {y.shape}; they must pair up")
        splits[split] = (x[:, None, :, :], y.astype(np.int64))
    return splits, classes


def _idx_path(raw: Path, stem: str) -> Path | None:
    for candidate in (raw / stem, raw / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


def _downloaded_idx(raw: Path, stem: str) -> Path:
    """An IDX file that is there, or was just downloaded; a download that did not bring it is a DataError."""
    path = _idx_path(raw, stem)
    if path is None:
        raise DataError(f"{raw}: {stem} is still missing after the download; delete {raw} and download again")
    return path


def _read_idx(path: Path) -> np.ndarray:
    """Parse an IDX file (the MNIST format): magic, big-endian dims, then uint8 data."""
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
    except (OSError, EOFError, zlib.error) as err:
        raise DataError(f"{path}: cannot be read ({err}); delete it and download again") from None
    if len(data) < 4 or data[0:2] != b"\x00\x00" or data[2] != 0x08:
        raise DataError(f"{path}: not an IDX file of unsigned bytes; delete it and download again")
    ndim = data[3]
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    start, expected = 4 + 4 * ndim, int(np.prod(dims))
    if len(data) - start != expected:
        raise DataError(
            f"{path}: truncated or corrupt: the header says {dims} ({expected} bytes), "
            f"the file holds {len(data) - start}; delete it and download again"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=start).reshape(dims)


_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{i}" for i in range(1, 6))


def _read_cifar10(root: Path, download: bool) -> tuple[dict[str, Split], tuple[str, ...]]:
    """Read torchvision's own layout: <root>/cifar-10-batches-py/{data_batch_1..5,test_batch,batches.meta}."""
    folder = root / _CIFAR_FOLDER
    wanted = [*_CIFAR_TRAIN, "test_batch", "batches.meta"]
    if any(not (folder / f).is_file() for f in wanted):
        _download_or_explain("cifar10", folder, wanted, download)
    classes = tuple(_unpickle(folder / "batches.meta")["label_names"])
    train = [_read_cifar_batch(folder / f) for f in _CIFAR_TRAIN]
    splits = {
        "train": (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])),
        "test": _read_cifar_batch(folder / "test_batch"),
    }
    return splits, classes


def _read_cifar_batch(path: Path) -> Split:
    batch = _unpickle(path)
    try:
        x = np.asarray(batch["data"], dtype=np.uint8).reshape(-1, 3, 32, 32)
        y = np.asarray(batch["labels"], dtype=np.int64)
    except (KeyError, ValueError) as err:
        raise DataError(f"{path}: not a CIFAR-10 batch ({err}); delete it and download again") from None
    if len(x) != len(y):
        raise DataError(f"{path}: {len(x)} images but {len(y)} labels; delete it and download again")
    return x, y


def _unpickle(path: Path) -> dict:
    # CIFAR's batches are Python pickles; only read them from a data root you trust.
    try:
        with path.open("rb") as f:
            return pickle.load(f, encoding="latin1")
    except (OSError, EOFError, pickle.UnpicklingError, ValueError) as err:
        raise DataError(f"{path}: truncated or corrupt ({err}); delete it and download again") from None


def _download_or_explain(name: str, folder: Path, wanted: list[str], download: bool) -> None:
    missing = ", ".join(f for f in wanted if not (folder / f).is_file() and not (folder / f"{f}.gz").is_file())
    if not download:
        raise DataError(
            f"{name}: missing {missing} in {folder}; put torchvision's files there, "
            f"or set data.download=true where the network allows"
        )
    before = set(folder.parent.rglob("*")) if folder.parent.exists() else set()
    try:
        _torchvision_download(name, folder)
    except (RuntimeError, OSError) as err:
        _remove_new_files(folder.parent, before)  # an unverified download must not pass for the data later
        reason = (str(err).strip().splitlines() or [type(err).__name__])[-1]
        raise DataError(
            f"{name}: download failed ({reason}); without network, put torchvision's "
            f"files ({missing}) in {folder} and set data.download=false"
        ) from None


def _remove_new_files(root: Path, before: set[Path]) -> None:
    for path in sorted(set(root.rglob("*")) - before, reverse=True):  # files before their folders
        if not path.is_dir():
            path.unlink()
        elif not any(path.iterdir()):
            path.rmdir()


def _torchvision_download(name: str, folder: Path) -> None:
    """Fetch the archives from torchvision's mirrors, checksums verified."""
    from torchvision import datasets
    from torchvision.datasets.utils import download_and_extract_archive

    if name == "cifar10":
        cifar = datasets.CIFAR10
        download_and_extract_archive(cifar.url, str(folder.parent), filename=cifar.filename, md5=cifar.tgz_md5)
        return
    source = getattr(datasets, _MNIST_LIKE[name][0])
    for filename, md5 in source.resources:
        errors = []
        for mirror in source.mirrors:
            try:
                download_and_extract_archive(f"{mirror}{filename}", str(folder), filename=filename, md5=md5)
                break
            except (RuntimeError, OSError) as err:
                errors.append(f"{mirror}: {err}")
        else:
            raise RuntimeError(f"could not fetch {filename}: " + "; ".join(errors))


# ---------------------------------------------------------------------------------------------------
# The registry: `data.name` -> Source


def _linear(cfg: DataConfig, seed: int) -> Read:
    return {"train": _make_linear(cfg.num_samples, seed)}, (), ()


def _circles(cfg: DataConfig, seed: int) -> Read:
    return {"train": _make_circles(cfg.num_samples, seed)}, ("outside", "inside"), ()


def _mnist_like(cfg: DataConfig, seed: int) -> Read:
    return *_read_mnist_like(cfg.name, Path(cfg.root).resolve(), cfg.download), ()


def _cifar10(cfg: DataConfig, seed: int) -> Read:
    return *_read_cifar10(Path(cfg.root).resolve(), cfg.download), ()


def _tabular(cfg: DataConfig, seed: int) -> Read:
    return _read_table(Path(cfg.path or ""), cfg.target or "")


def _image_folder(cfg: DataConfig, seed: int) -> Read:
    return *_read_image_folder(_image_root(Path(cfg.path or "")), cfg.image_size), ()


SOURCES: dict[str, Source] = {
    "linear": Source(_synthetic_key, _linear),
    "circles": Source(_synthetic_key, _circles),
    "mnist": Source(_name_key, _mnist_like),
    "fashion_mnist": Source(_name_key, _mnist_like),
    "cifar10": Source(_name_key, _cifar10),
    "tabular": Source(_table_key, _tabular),
    "image_folder": Source(_image_folder_key, _image_folder),
}
