"""The Parquet store: a source read once, written as Parquet, and read back as arrays per worker.

    spec = materialize(cfg.data, seed=cfg.seed)        # on the driver, before any worker starts
    splits = load_split_rows(spec, cfg.data, seed=cfg.seed)  # in each worker: {"train": SplitRows, ...}

Every dataset, synthetic or downloaded, is written once to Parquet under `<data.root>/parquet/<key>/`
with a manifest (shape, classes, normalization stats, row counts, content hash); later runs and every
worker read those files. The readers of the sources (sources.py) are imported only when a dataset is
written, so a served model, which needs only its `DatasetSpec`, never imports download code.
"""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.config import DataConfig
from pipeline.errors import BadInput

__all__ = [
    "FORMAT",
    "DataError",
    "DatasetSpec",
    "Split",
    "SplitRows",
    "batch_indices",
    "decoded_mb",
    "file_sha256",
    "group_reader",
    "has_validation",
    "load_split_rows",
    "load_splits",
    "load_test_split",
    "materialize",
    "shard_indices",
    "split_sizes",
    "streaming_datasets",
    "train_rows",
    "val_rows",
]

READ_BATCH_ROWS = 2048  # rows per Parquet read: bounds Arrow's scratch memory
# Rows per Parquet row group, by bytes: a row group is the unit Ray Data reads as one block, so one
# group per file would hold a whole split in one streaming worker's memory and leave nothing to overlap.
ROW_GROUP_BYTES = 8 * 2**20
# The layout of the materialized files. 2: a `row` column (each row's index in its file), by which the
# streaming reader picks the same validation rows as the in-memory one. 3: `x` as one fixed-size binary value
# per row (_split_table), not a list of values. Older folders are rewritten.
FORMAT = 3
Split = tuple[np.ndarray, np.ndarray]  # (features or uint8 images, targets)


class DataError(BadInput):
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
        return cls(
            **{
                **data,
                "input_shape": tuple(data["input_shape"]),
                "classes": tuple(data["classes"]),
                "mean": tuple(data["mean"]),
                "std": tuple(data["std"]),
                "features": tuple(data.get("features", ())),
            }
        )


# ---------------------------------------------------------------------------------------------------
# Materialization (driver side)


def materialize(cfg: DataConfig, seed: int) -> DatasetSpec:
    """Return the dataset's Parquet spec, writing the files first if this is the first time."""
    # Imported here, not at the top: only writing a dataset needs the readers (and their download code).
    from pipeline.data.sources import SOURCES

    source = SOURCES[cfg.name]
    folder = Path(cfg.root).resolve() / "parquet" / source.key(cfg, seed)
    manifest = folder / "manifest.json"
    if manifest.is_file():  # the folder may have moved since it was written: trust where it is now
        spec = DatasetSpec.from_json({**json.loads(manifest.read_text()), "directory": str(folder)})
        if spec.format == FORMAT:
            return spec
    splits, classes, features = source.read(cfg, seed)
    return _write_parquet(cfg.name, folder, splits, classes, features)


def _write_parquet(name: str, folder: Path, splits: dict[str, Split], classes: tuple[str, ...], features: tuple[str, ...]) -> DatasetSpec:
    folder.mkdir(parents=True, exist_ok=True)
    x_train = splits["train"][0]
    mean, std = _feature_stats(x_train)
    hashes = {}
    for split, (x, y) in splits.items():
        table = _split_table(x, y)
        group = max(1024, ROW_GROUP_BYTES // max(x[:1].nbytes, 1))
        hashes[split] = _atomic_write(folder / f"{split}.parquet", lambda path, t=table, g=group: pq.write_table(t, path, row_group_size=g))
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


def _split_table(x: np.ndarray, y: np.ndarray) -> pa.Table:
    """A split as the store writes it: `x`, each row's values (pixels, features) as one fixed-size binary value,
    their dtype in the field's metadata; `y`; `row`, each row's index in the file.

    Not a list column: Parquet stores a list with a repetition and a definition level per value, which its
    reader decodes one by one. One binary value per row read 60,000 MNIST images with a tenth of the CPU
    (0.02 s against 0.22 s, docs/BENCHMARKS.md)."""
    flat = np.ascontiguousarray(x).reshape(len(x), math.prod(x.shape[1:]))
    width = flat.shape[1] * flat.itemsize
    rows = pa.FixedSizeBinaryArray.from_buffers(pa.binary(width), len(flat), [None, pa.py_buffer(flat)])
    schema = pa.schema([pa.field("x", pa.binary(width), metadata={"dtype": flat.dtype.str}),
                        pa.field("y", pa.from_numpy_dtype(y.dtype)), pa.field("row", pa.int64())])  # fmt: skip
    return pa.Table.from_arrays([rows, pa.array(y), pa.array(np.arange(len(y), dtype=np.int64))], schema=schema)


def _x_dtype(schema: pa.Schema) -> np.dtype:
    """The dtype of the `x` column's values, as _split_table wrote it."""
    return np.dtype(schema.field("x").metadata[b"dtype"].decode())


def _x_rows(column: pa.ChunkedArray | pa.Array, dtype: np.dtype) -> np.ndarray:
    """An `x` column -> a (rows, values) array: a read-only view of Arrow's buffer, not a copy."""
    values = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    width = values.type.byte_width
    data = np.frombuffer(values.buffers()[1], dtype=np.uint8)[values.offset * width : (values.offset + len(values)) * width]
    return data.view(dtype).reshape(len(values), width // dtype.itemsize)


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


def split_sizes(spec: DatasetSpec, cfg: DataConfig) -> dict[str, int]:
    """The rows a run trains, validates and tests on (after the val carve-out and `limit`); splits it lacks are left out."""
    limit = cfg.limit or max(spec.rows.values())
    sizes = {"train": train_rows(spec, cfg), "val": min(val_rows(spec.rows["train"], cfg.val_fraction), limit)}
    if "test" in spec.rows:
        sizes["test"] = min(spec.rows["test"], limit)
    return {split: rows for split, rows in sizes.items() if rows > 0}


def val_rows(train_rows: int, val_fraction: float) -> int:
    """How many of the materialized training rows are held out for validation."""
    return int(round(train_rows * val_fraction))


def _read_parquet_split(spec: DatasetSpec, split: str) -> Split:
    """One split as arrays, read in batches of rows into arrays made once, so that Arrow's own copy of the data
    is one batch at a time, not the whole split beside the arrays."""
    parquet = pq.ParquetFile(Path(spec.directory) / f"{split}.parquet")
    schema, rows = parquet.schema_arrow, parquet.metadata.num_rows
    dtype = _x_dtype(schema)
    x = np.empty((rows, math.prod(spec.input_shape)), dtype=dtype)
    y = np.empty(rows, dtype=schema.field("y").type.to_pandas_dtype())
    start = 0
    for batch in parquet.iter_batches(batch_size=READ_BATCH_ROWS, columns=["x", "y"]):
        end = start + batch.num_rows
        x[start:end] = _x_rows(batch.column("x"), dtype)
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
    split is not among them: it is evaluated on the driver, on the checkpoint the run chose.

    Each row group of the training file is read by a task of its own into a block of its own, in a new random
    order each epoch; rows are shuffled within each block on the worker (batches.Streamed). The order comes from
    `randomize_block_order()` on the group numbers, one number per block, before the read: only those tiny blocks
    wait for each other (after the read, every group would be read before the first was handed out). Not
    `random_shuffle()` of the numbers: it deals them to blocks at random, so one task read two or three groups
    into one block."""
    import ray.data

    path = str(Path(spec.directory) / "train.parquet")
    held_out = np.sort(_carve(spec.rows["train"], cfg.val_fraction, seed)[1])
    groups = pq.ParquetFile(path).metadata.num_row_groups
    numbers = ray.data.range(groups, override_num_blocks=groups)
    datasets = {"train": numbers.randomize_block_order().map_batches(group_reader(path, held_out, keep=False), batch_size=1)}
    if len(held_out):
        datasets["val"] = numbers.map_batches(group_reader(path, held_out, keep=True), batch_size=1)
    if cfg.limit:
        datasets = {name: dataset.limit(cfg.limit) for name, dataset in datasets.items()}
    return datasets


def group_reader(path: str, held_out: np.ndarray, keep: bool) -> Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]:
    """A batch function: {"id": [row group]} -> that group's rows in `held_out` (sorted), or all the others,
    with `x` as one 2-D array (Ray's own Parquet reader hands a column of arrays or of binary rows to numpy as an
    object array of one object per row, which every later step pays for: 4x slower end to end, measured)."""

    def read(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        table = pq.ParquetFile(path).read_row_groups([int(i) for i in batch["id"]], columns=["x", "y", "row"])
        mask = np.isin(table.column("row").to_numpy(), held_out, assume_unique=True)
        if not keep:
            mask = ~mask
        return {"x": _x_rows(table.column("x"), _x_dtype(table.schema))[mask], "y": table.column("y").to_numpy()[mask]}

    return read


def shard_indices(n: int, rank: int, world_size: int) -> np.ndarray:
    """The evaluation shard of one rank: every world_size-th sample, so shards differ by at most one."""
    return np.arange(rank, n, world_size)


def batch_indices(n: int, batch_size_per_worker: int, rank: int, world_size: int, *, epoch: int, seed: int) -> Iterator[np.ndarray]:
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
