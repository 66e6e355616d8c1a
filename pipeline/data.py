"""The dataset catalog: sources -> Parquet once -> one contiguous tensor per worker -> batches by index.

    spec = materialize(cfg.data, seed=cfg.seed)        # on the driver, before any worker starts
    splits = load_split_rows(spec, cfg.data, seed=cfg.seed)  # in each worker: {"train": SplitRows, ...}

Every dataset, synthetic or downloaded, is written once to Parquet under `<data.root>/parquet/<key>/`
with a manifest (shape, classes, normalization stats, row counts, content hash); later runs and every
worker read those files. Images stay uint8 until a batch is on the device, where it is normalized
(and augmented) in one batched operation: no per-sample Python on the hot path.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import json
import math
import os
import pickle
import tempfile
import zlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
import torch.nn.functional as F
from torch import nn

from pipeline.config import AugmentConfig, DataConfig

__all__ = [
    "DataError",
    "DatasetSpec",
    "Normalize",
    "SplitRows",
    "augment",
    "batch_indices",
    "decoded_mb",
    "file_sha256",
    "has_validation",
    "load_split_rows",
    "load_splits",
    "load_test_split",
    "materialize",
    "normalizer",
    "shard_indices",
    "streaming_datasets",
    "train_rows",
    "val_rows",
]

READ_BATCH_ROWS = 2048  # rows per Parquet read: bounds Arrow's scratch memory
# The layout of the materialized files. 2: a `row` column (each row's index in its file), by which the
# streaming reader picks the same validation rows as the in-memory one. Older folders are rewritten.
FORMAT = 2
Split = tuple[np.ndarray, np.ndarray]  # (features or uint8 images, targets)

# The tutorials' synthetic regression: y = Xw + b + noise.
LINEAR_TRUE_W = (2.0, -3.4)
LINEAR_TRUE_B = 4.2
LINEAR_NOISE_STD = 0.01


class DataError(ValueError):
    """Data that cannot be read or made; the message names the file and what to do."""


@dataclass(frozen=True)
class DatasetSpec:
    """What a model, a loss and a worker need to know about a materialized dataset."""

    name: str
    task: Literal["classification", "regression"]
    input_shape: tuple[int, ...]  # one sample: (C, H, W) for images, (D,) for features
    classes: tuple[str, ...]  # empty for regression
    mean: tuple[float, ...]  # per channel (images, in [0, 1] units) or per feature
    std: tuple[float, ...]
    rows: dict[str, int]  # split -> rows in its Parquet file
    data_hash: str  # content hash of the Parquet files: the lineage of a trained model
    directory: str  # absolute path of the Parquet folder
    features: tuple[str, ...] = ()  # a table's feature columns, in the model's input order
    format: int = 1  # FORMAT when written; manifests before it had none

    @property
    def feature_names(self) -> tuple[str, ...]:
        """Column names for 1-D inputs: the table's own, or x0, x1, ... for the synthetic sets."""
        return self.features or tuple(f"x{i}" for i in range(self.input_shape[0]))

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    def to_json(self) -> dict:
        return asdict(self)

    @classmethod
    def from_json(cls, data: dict) -> DatasetSpec:
        return cls(**{**data, "input_shape": tuple(data["input_shape"]), "classes": tuple(data["classes"]),
                      "mean": tuple(data["mean"]), "std": tuple(data["std"]),
                      "features": tuple(data.get("features", ()))})


# ---------------------------------------------------------------------------------------------------
# Materialization (driver side)


def materialize(cfg: DataConfig, seed: int) -> DatasetSpec:
    """Return the dataset's Parquet spec, writing the files first if this is the first time."""
    folder = Path(cfg.root).resolve() / "parquet" / _dataset_key(cfg, seed)
    manifest = folder / "manifest.json"
    if manifest.is_file():  # the folder may have moved since it was written: trust where it is now
        spec = DatasetSpec.from_json({**json.loads(manifest.read_text()), "directory": str(folder)})
        if spec.format == FORMAT:
            return spec
    splits, classes, features = _read_source(cfg, seed)
    return _write_parquet(cfg.name, folder, splits, classes, features)


def _dataset_key(cfg: DataConfig, seed: int) -> str:
    if cfg.name in ("linear", "circles"):
        return f"{cfg.name}-n{cfg.num_samples}-seed{seed}"
    if cfg.name == "tabular":
        path = _existing(Path(cfg.path or ""), "data.path")
        return f"tabular-{path.stem}-{cfg.target}-{file_sha256(path)[:12]}"
    if cfg.name == "image_folder":
        folder = _image_root(Path(cfg.path or ""))
        size = "x".join(map(str, cfg.image_size)) if cfg.image_size else "native"
        return f"images-{folder.name}-{size}-{_listing_hash(folder)[:12]}"
    return cfg.name


def _read_source(cfg: DataConfig, seed: int) -> tuple[dict[str, Split], tuple[str, ...], tuple[str, ...]]:
    """The splits, the class names (empty for regression) and a table's feature column names."""
    if cfg.name == "linear":
        return {"train": _make_linear(cfg.num_samples, seed)}, (), ()
    if cfg.name == "circles":
        return {"train": _make_circles(cfg.num_samples, seed)}, ("outside", "inside"), ()
    if cfg.name == "tabular":
        return _read_table(Path(cfg.path or ""), cfg.target or "")
    if cfg.name == "image_folder":
        return *_read_image_folder(_image_root(Path(cfg.path or "")), cfg.image_size), ()
    if cfg.name == "cifar10":
        return *_read_cifar10(Path(cfg.root).resolve(), cfg.download), ()
    return *_read_mnist_like(cfg.name, Path(cfg.root).resolve(), cfg.download), ()


def _write_parquet(
    name: str, folder: Path, splits: dict[str, Split], classes: tuple[str, ...], features: tuple[str, ...]
) -> DatasetSpec:
    folder.mkdir(parents=True, exist_ok=True)
    x_train = splits["train"][0]
    mean, std = _feature_stats(x_train)
    hashes = {}
    for split, (x, y) in splits.items():
        table = pa.table({"x": _fixed_size_list(x), "y": pa.array(y), "row": pa.array(np.arange(len(y), dtype=np.int64))})
        hashes[split] = _atomic_write(folder / f"{split}.parquet", lambda path, t=table: pq.write_table(t, path))
    spec = DatasetSpec(
        name=name,
        task="classification" if classes else "regression",
        input_shape=tuple(int(d) for d in x_train.shape[1:]),
        classes=classes,
        mean=mean,
        std=std,
        rows={split: len(y) for split, (_, y) in splits.items()},
        data_hash=hashlib.sha256("".join(hashes[s] for s in sorted(hashes)).encode()).hexdigest()[:16],
        directory=str(folder),
        features=features,
        format=FORMAT,
    )
    # The manifest goes last: its presence means every Parquet file is complete.
    _atomic_write(folder / "manifest.json", lambda path: Path(path).write_text(json.dumps(spec.to_json(), indent=2)))
    return spec


def _fixed_size_list(x: np.ndarray) -> pa.FixedSizeListArray:
    flat = np.ascontiguousarray(x).reshape(len(x), -1)
    return pa.FixedSizeListArray.from_arrays(pa.array(flat.ravel()), flat.shape[1])


def _feature_stats(x: np.ndarray) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel stats for images (in [0, 1] units), per-feature stats for tables."""
    if x.ndim == 4:  # (N, C, H, W) uint8
        values = x.transpose(1, 0, 2, 3).reshape(x.shape[1], -1).astype(np.float64) / 255.0
        mean, std = values.mean(axis=1), values.std(axis=1)
    else:
        mean, std = x.mean(axis=0, dtype=np.float64), x.std(axis=0, dtype=np.float64)
    std = np.where(std > 0, std, 1.0)  # a constant column must not divide by zero
    return tuple(float(v) for v in mean), tuple(float(v) for v in std)


def _atomic_write(path: Path, write) -> str:
    """Write through a temporary file and rename, so a reader never sees half a file; return its hash."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        digest = file_sha256(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return digest


def file_sha256(path: Path) -> str:
    """A file's SHA-256, read 1 MiB at a time."""
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _existing(path: Path, key: str) -> Path:
    if not path.is_file():
        raise DataError(f"{key}: file {path} does not exist")
    return path


# ---------------------------------------------------------------------------------------------------
# Sources


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
        columns = [c for c, finite in zip(features, np.isfinite(x).all(axis=0)) if not finite]
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
        x, y = _read_idx(_idx_path(raw, images)), _read_idx(_idx_path(raw, labels))
        if x.ndim != 3 or y.ndim != 1 or len(x) != len(y):
            raise DataError(f"{raw}: {images} holds {x.shape} but {labels} holds {y.shape}; they must pair up")
        splits[split] = (x[:, None, :, :], y.astype(np.int64))
    return splits, classes


def _idx_path(raw: Path, stem: str) -> Path | None:
    for candidate in (raw / stem, raw / f"{stem}.gz"):
        if candidate.is_file():
            return candidate
    return None


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
# Loading and batching (worker side)


@dataclass
class SplitRows:
    """A split as the arrays of the file it lives in and which of their rows belong to it.

    train and val share the training file's arrays: the carve-out is two index arrays, not copies."""

    x: np.ndarray
    y: np.ndarray
    rows: np.ndarray | None  # None: every row, in file order

    def __len__(self) -> int:
        return len(self.y) if self.rows is None else len(self.rows)

    def arrays(self) -> Split:
        """The split's own (x, y) (a copy unless it is the whole file)."""
        return (self.x, self.y) if self.rows is None else (self.x[self.rows], self.y[self.rows])


def load_split_rows(spec: DatasetSpec, cfg: DataConfig, seed: int, *, test: bool = True) -> dict[str, SplitRows]:
    """Read the Parquet files once: train and val (carved from train by `val_fraction`), and (`test`) test."""
    x, y = _read_parquet_split(spec, "train")
    train, val = _carve(len(y), cfg.val_fraction, seed)
    splits = {"train": SplitRows(x, y, train)}
    if len(val):
        splits["val"] = SplitRows(x, y, val)
    if test and "test" in spec.rows:
        splits["test"] = SplitRows(*_read_parquet_split(spec, "test"), None)
    if cfg.limit:
        for split in splits.values():
            split.rows = (np.arange(len(split.y)) if split.rows is None else split.rows)[: cfg.limit]
    return splits


def load_splits(spec: DatasetSpec, cfg: DataConfig, seed: int) -> dict[str, Split]:
    """Each split as its own (x, y) arrays: for plots and inspection; training uses `load_split_rows`."""
    return {name: split.arrays() for name, split in load_split_rows(spec, cfg, seed).items()}


def load_test_split(spec: DatasetSpec, cfg: DataConfig) -> Split:
    """The test split alone (its first `limit` rows where set), for the evaluation of a chosen checkpoint."""
    x, y = _read_parquet_split(spec, "test")
    return (x[: cfg.limit], y[: cfg.limit]) if cfg.limit else (x, y)


def has_validation(spec: DatasetSpec, cfg: DataConfig) -> bool:
    """Whether training holds out validation rows (data.val_fraction > 0 of at least one row)."""
    return val_rows(spec.rows["train"], cfg.val_fraction) > 0


def _carve(n: int, val_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The training file's rows for train and for val: one seeded permutation, the same for every reader."""
    order = np.random.default_rng(seed).permutation(n)
    n_val = val_rows(n, val_fraction)
    return order[n_val:], order[:n_val]


def train_rows(spec: DatasetSpec, cfg: DataConfig) -> int:
    """How many rows the train split has, after the val carve-out and `limit`."""
    rows = spec.rows["train"] - val_rows(spec.rows["train"], cfg.val_fraction)
    return min(rows, cfg.limit or rows)


def val_rows(train_rows: int, val_fraction: float) -> int:
    """How many of the materialized training rows are held out for validation."""
    return int(round(train_rows * val_fraction))


def _read_parquet_split(spec: DatasetSpec, split: str) -> Split:
    """One split as arrays, read in batches of rows into arrays made once.

    Reading the nested `x` column whole costs Arrow about 14x the data in scratch memory (measured:
    +640 MiB for 45 MiB of FashionMNIST pixels); a few thousand rows at a time, about +160 MiB.
    """
    parquet = pq.ParquetFile(Path(spec.directory) / f"{split}.parquet")
    schema, rows = parquet.schema_arrow, parquet.metadata.num_rows
    x = np.empty((rows, math.prod(spec.input_shape)), dtype=schema.field("x").type.value_type.to_pandas_dtype())
    y = np.empty(rows, dtype=schema.field("y").type.to_pandas_dtype())
    start = 0
    for batch in parquet.iter_batches(batch_size=READ_BATCH_ROWS, columns=["x", "y"]):
        end = start + batch.num_rows
        x[start:end] = batch.column("x").flatten().to_numpy().reshape(batch.num_rows, -1)
        y[start:end] = batch.column("y").to_numpy()
        start = end
    pa.default_memory_pool().release_unused()  # hand the read's scratch memory back to the system
    return x.reshape(rows, *spec.input_shape), y


def decoded_mb(spec: DatasetSpec, split: str = "train") -> float:
    """A split's size in memory, from its Parquet footer (uncompressed bytes): the size the fast path holds."""
    return _decoded_mb(str(Path(spec.directory) / f"{split}.parquet"), spec.data_hash)


@functools.lru_cache(maxsize=32)
def _decoded_mb(path: str, data_hash: str) -> float:
    # Asked several times per run (which runner, which loader): the footer is read once per file version.
    metadata = pq.ParquetFile(path).metadata
    return sum(metadata.row_group(i).total_byte_size for i in range(metadata.num_row_groups)) / 2**20


def streaming_datasets(spec: DatasetSpec, cfg: DataConfig, seed: int) -> dict:
    """The splits as Ray Data datasets read from the Parquet files, for `TorchTrainer(datasets=...)`.

    Nothing is read here: each worker streams its shard of each epoch. train and val are the rows
    that `load_split_rows` would pick (the same seeded permutation, matched on the `row` column). The test
    split is not among them: it is evaluated on the driver, on the checkpoint the run chose."""
    import ray.data

    directory = Path(spec.directory)
    held_out = np.sort(_carve(spec.rows["train"], cfg.val_fraction, seed)[1])
    source = ray.data.read_parquet(str(directory / "train.parquet")).select_columns(["x", "y", "row"])
    # Ray Data hands out blocks in the order their reads finish: shuffle whole blocks, then rows
    # within a buffer (iter_torch_batches' local shuffle); a global shuffle would move all the data.
    datasets = {"train": source.randomize_block_order().map_batches(_rows_in(held_out, keep=False), batch_format="numpy")}
    if len(held_out):
        datasets["val"] = source.map_batches(_rows_in(held_out, keep=True), batch_format="numpy")
    if cfg.limit:
        datasets = {name: dataset.limit(cfg.limit) for name, dataset in datasets.items()}
    return datasets


def _rows_in(held_out: np.ndarray, keep: bool):
    """A batch function: keep the rows in `held_out` (sorted), or all the others."""

    def select(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        mask = np.isin(batch["row"], held_out, assume_unique=True)
        if not keep:
            mask = ~mask
        return {"x": batch["x"][mask], "y": batch["y"][mask]}

    return select


def shard_indices(n: int, rank: int, world_size: int) -> np.ndarray:
    """The evaluation shard of one rank: every world_size-th sample, so shards differ by at most one."""
    return np.arange(rank, n, world_size)


def batch_indices(
    n: int, batch_size_per_worker: int, rank: int, world_size: int, *, epoch: int, seed: int
) -> Iterator[np.ndarray]:
    """This rank's part of each global batch of one epoch.

    Every rank draws the same permutation (seed + epoch), cuts it into global batches of
    batch_size_per_worker x world_size samples and takes its own slice. So N workers see exactly the
    batches that one worker with an N times larger batch would, and DDP's averaged gradients match.
    An incomplete last global batch is dropped so that every rank runs the same number of steps.
    """
    order = np.random.default_rng([seed, epoch]).permutation(n)
    global_batch = batch_size_per_worker * world_size
    for start in range(0, n - global_batch + 1, global_batch):
        first = start + rank * batch_size_per_worker
        yield order[first : first + batch_size_per_worker]


class Normalize(nn.Module):
    """uint8 images -> float in [0, 1] -> standardized per channel; features standardized per column.

    A module, so that the statistics move with `.to(device)` and travel inside a served model.
    """

    def __init__(self, spec: DatasetSpec, enabled: bool) -> None:
        super().__init__()
        shape = (1, -1, 1, 1) if spec.is_image else (1, -1)
        self.enabled = enabled
        self.register_buffer("mean", torch.tensor(spec.mean, dtype=torch.float32).view(shape))
        self.register_buffer("std", torch.tensor(spec.std, dtype=torch.float32).view(shape))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()
        return (x - self.mean) / self.std if self.enabled else x


def normalizer(spec: DatasetSpec, enabled: bool, device: torch.device) -> Normalize:
    return Normalize(spec, enabled).to(device)  # the statistics are made once, not per batch


def augment(x: torch.Tensor, cfg: AugmentConfig, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random flip, rotation and resized crop for a whole batch at once, as one affine warp per sample."""
    if x.dim() != 4 or (not cfg.hflip and cfg.rotation_degrees == 0 and cfg.crop_min_scale == 1.0):
        return x
    n = x.shape[0]

    def uniform(low: float, high: float) -> torch.Tensor:
        return torch.rand(n, generator=generator, device=x.device) * (high - low) + low

    angle = torch.deg2rad(uniform(-cfg.rotation_degrees, cfg.rotation_degrees))
    scale = uniform(cfg.crop_min_scale, 1.0).sqrt()  # side of a crop covering that fraction of the area
    shift_x, shift_y = (uniform(-1, 1) * (1 - scale) for _ in range(2))
    flip = torch.where(uniform(0, 1) < 0.5, -1.0, 1.0) if cfg.hflip else torch.ones(n, device=x.device)
    cos, sin = torch.cos(angle) * scale, torch.sin(angle) * scale
    theta = torch.stack([torch.stack([cos * flip, -sin, shift_x], 1), torch.stack([sin * flip, cos, shift_y], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
