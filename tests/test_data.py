"""The dataset catalog: real files in, Parquet out, the same pixels back; clear errors; batches by index.

Every test writes small files in the datasets' real formats (pipeline/standin.py) into its own folder, so
the exact arrays are known and nothing is shared. The download tests serve those files from a real
HTTP server on 127.0.0.1 and point torchvision's URLs at it; torchvision's md5 checks stay on.
"""

from __future__ import annotations

import hashlib
import http.server
import tarfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import torchvision

from pipeline.config import AugmentConfig, DataConfig
from pipeline.data.sources import LINEAR_TRUE_B, LINEAR_TRUE_W
from pipeline.data.store import DataError, batch_indices, load_splits, materialize, shard_indices, val_rows
from pipeline.data.transforms import augment
from pipeline.standin import CIFAR_CLASSES, patterned_images, write_cifar10, write_idx, write_image_folder

FASHION_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
MNIST_STEMS = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
ROWS = {"train": 120, "test": 30}


# ---------------------------------------------------------------------------------------------------
# Helpers


def write_mnist_files(raw: Path, *, compress: bool = False, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """The four IDX files in `raw`; returns split -> (images (N, 28, 28), labels (N,)) as written."""
    written = {}
    for offset, (split, (images_stem, labels_stem)) in enumerate(MNIST_STEMS.items()):
        images, labels = patterned_images(ROWS[split], 1, 28, 10, seed + offset)
        write_idx(raw / images_stem, images[:, 0], compress=compress)
        write_idx(raw / labels_stem, labels, compress=compress)
        written[split] = (images[:, 0], labels)
    return written


def cifar_as_written(per_batch: int = 40, n_test: int = 40, seed: int = 0) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """What write_cifar10 writes, regenerated: split -> (images (N, 3, 32, 32), labels)."""
    train = [patterned_images(per_batch, 3, 32, 10, seed + i) for i in range(5)]
    return {
        "train": (np.concatenate([x for x, _ in train]), np.concatenate([y for _, y in train])),
        "test": patterned_images(n_test, 3, 32, 10, seed + 5),
    }


def unshuffled_train(splits: dict, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Undo load_splits' val carve-out: train + val back in the materialized row order."""
    x_train, y_train = splits["train"]
    x_val, y_val = splits.get("val", (x_train[:0], y_train[:0]))
    n = len(y_train) + len(y_val)
    order = np.random.default_rng(seed).permutation(n)
    x, y = np.empty_like(x_train, shape=(n, *x_train.shape[1:])), np.empty_like(y_train, shape=(n,))
    x[order], y[order] = np.concatenate([x_val, x_train]), np.concatenate([y_val, y_train])
    return x, y


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------------------------------------------
# MNIST and FashionMNIST


@pytest.mark.parametrize("compress", [False, True], ids=["idx", "idx.gz"])
@pytest.mark.parametrize(
    ("name", "folder", "classes"),
    [("mnist", "MNIST", tuple(str(d) for d in range(10))), ("fashion_mnist", "FashionMNIST", FASHION_CLASSES)],
)
def test_mnist_like_idx_files_become_parquet_with_the_right_spec(
    tmp_path: Path, name: str, folder: str, classes: tuple[str, ...], compress: bool
) -> None:
    write_mnist_files(tmp_path / folder / "raw", compress=compress)
    spec = materialize(DataConfig(name=name, root=str(tmp_path), download=False), seed=0)

    assert spec.name == name and spec.task == "classification"
    assert spec.input_shape == (1, 28, 28) and spec.is_image
    assert spec.num_classes == 10 and spec.classes == classes
    assert spec.rows == ROWS
    parquet = tmp_path / "parquet" / name
    assert spec.directory == str(parquet.resolve())
    assert sorted(p.name for p in parquet.iterdir()) == ["manifest.json", "test.parquet", "train.parquet"]
    assert pq.read_metadata(parquet / "train.parquet").num_rows == ROWS["train"]


def test_a_copy_in_an_earlier_layout_is_rewritten_with_rows_as_binary_values(tmp_path: Path) -> None:
    written = write_mnist_files(tmp_path / "MNIST" / "raw", seed=5)
    cfg = DataConfig(name="mnist", root=str(tmp_path), download=False, val_fraction=0)
    spec = materialize(cfg, seed=0)
    train = Path(spec.directory) / "train.parquet"
    field = pq.read_schema(train).field("x")
    assert field.type == pa.binary(28 * 28) and field.metadata == {b"dtype": b"|u1"}
    # Format 2, as an earlier version wrote it: the pixels as a list column.
    old = pq.read_table(train)
    pixels = np.frombuffer(old.column("x").combine_chunks().buffers()[1], dtype=np.uint8)
    lists = pa.FixedSizeListArray.from_arrays(pa.array(pixels), 28 * 28)
    pq.write_table(old.set_column(0, "x", lists), train)
    manifest = Path(spec.directory) / "manifest.json"
    manifest.write_text(manifest.read_text().replace('"format": 3', '"format": 2'))

    rewritten = materialize(cfg, seed=0)
    assert rewritten.format == 3 and pq.read_schema(train).field("x").type == pa.binary(28 * 28)
    assert rewritten.data_hash == spec.data_hash  # the same rows, written the same way again
    x, y = load_splits(rewritten, cfg, seed=0)["test"]
    np.testing.assert_array_equal(x[:, 0], written["test"][0])
    np.testing.assert_array_equal(y, written["test"][1])


@pytest.mark.parametrize("compress", [False, True], ids=["idx", "idx.gz"])
def test_mnist_pixels_and_labels_round_trip_exactly(tmp_path: Path, compress: bool) -> None:
    written = write_mnist_files(tmp_path / "MNIST" / "raw", compress=compress, seed=7)
    cfg = DataConfig(name="mnist", root=str(tmp_path), download=False, val_fraction=0.2)
    splits = load_splits(materialize(cfg, seed=3), cfg, seed=3)

    assert len(splits["val"][1]) == val_rows(ROWS["train"], 0.2) == 24
    x, y = unshuffled_train(splits, seed=3)
    assert x.dtype == np.uint8 and x.shape == (ROWS["train"], 1, 28, 28)
    np.testing.assert_array_equal(x[:, 0], written["train"][0])
    np.testing.assert_array_equal(y, written["train"][1])
    x_test, y_test = splits["test"]  # the test split keeps its order
    np.testing.assert_array_equal(x_test[:, 0], written["test"][0])
    np.testing.assert_array_equal(y_test, written["test"][1])


def test_without_a_val_fraction_train_holds_every_row(tmp_path: Path) -> None:
    written = write_mnist_files(tmp_path / "MNIST" / "raw")
    cfg = DataConfig(name="mnist", root=str(tmp_path), download=False, val_fraction=0)
    splits = load_splits(materialize(cfg, seed=0), cfg, seed=0)

    assert set(splits) == {"train", "test"}
    x, y = unshuffled_train(splits, seed=0)
    np.testing.assert_array_equal(x[:, 0], written["train"][0])
    np.testing.assert_array_equal(y, written["train"][1])


def test_limit_keeps_the_first_rows_of_each_split(tmp_path: Path) -> None:
    write_mnist_files(tmp_path / "MNIST" / "raw")
    cfg = DataConfig(name="mnist", root=str(tmp_path), download=False, limit=10)
    splits = load_splits(materialize(cfg, seed=0), cfg, seed=0)

    assert {name: len(y) for name, (_, y) in splits.items()} == {"train": 10, "val": 10, "test": 10}


def test_a_second_materialize_reuses_the_parquet_files(tmp_path: Path) -> None:
    write_mnist_files(tmp_path / "MNIST" / "raw")
    cfg = DataConfig(name="mnist", root=str(tmp_path), download=False)
    first = materialize(cfg, seed=0)
    folder = Path(first.directory)
    stamps = {p.name: p.stat().st_mtime_ns for p in folder.iterdir()}

    second = materialize(cfg, seed=0)

    assert second == first
    assert {p.name: p.stat().st_mtime_ns for p in folder.iterdir()} == stamps


def test_a_moved_data_root_is_read_from_its_new_place(tmp_path: Path) -> None:
    write_mnist_files(tmp_path / "old" / "MNIST" / "raw")
    materialize(DataConfig(name="mnist", root=str(tmp_path / "old"), download=False), seed=0)
    (tmp_path / "old").rename(tmp_path / "new")

    cfg = DataConfig(name="mnist", root=str(tmp_path / "new"), download=False)
    spec = materialize(cfg, seed=0)

    assert spec.directory == str((tmp_path / "new" / "parquet" / "mnist").resolve())
    assert len(load_splits(spec, cfg, seed=0)["test"][1]) == ROWS["test"]


# ---------------------------------------------------------------------------------------------------
# CIFAR-10


def test_cifar10_pickles_become_parquet_and_round_trip(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    cfg = DataConfig(name="cifar10", root=str(tmp_path), download=False, val_fraction=0.1)
    spec = materialize(cfg, seed=0)

    assert spec.input_shape == (3, 32, 32) and spec.classes == tuple(CIFAR_CLASSES)
    assert spec.rows == {"train": 200, "test": 40}
    assert len(spec.mean) == len(spec.std) == 3
    written = cifar_as_written()
    splits = load_splits(spec, cfg, seed=0)
    x, y = unshuffled_train(splits, seed=0)
    np.testing.assert_array_equal(x, written["train"][0])
    np.testing.assert_array_equal(y, written["train"][1])
    np.testing.assert_array_equal(splits["test"][0], written["test"][0])
    np.testing.assert_array_equal(splits["test"][1], written["test"][1])


def test_image_stats_are_per_channel_in_unit_range(tmp_path: Path) -> None:
    write_cifar10(tmp_path)
    spec = materialize(DataConfig(name="cifar10", root=str(tmp_path), download=False), seed=0)

    pixels = cifar_as_written()["train"][0].astype(np.float64) / 255.0
    np.testing.assert_allclose(spec.mean, pixels.mean(axis=(0, 2, 3)), rtol=1e-9)
    np.testing.assert_allclose(spec.std, pixels.std(axis=(0, 2, 3)), rtol=1e-9)


# ---------------------------------------------------------------------------------------------------
# Errors that name the file and the fix


def test_missing_mnist_file_without_download_names_it_the_folder_and_data_download(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    write_mnist_files(raw)
    (raw / "t10k-labels-idx1-ubyte").unlink()

    with pytest.raises(DataError) as err:
        materialize(DataConfig(name="mnist", root=str(tmp_path), download=False), seed=0)

    message = str(err.value)
    assert "missing t10k-labels-idx1-ubyte in" in message and str(raw) in message
    assert "train-images-idx3-ubyte" not in message  # only what is actually missing
    assert "data.download" in message
    assert not (tmp_path / "parquet").exists()


def test_missing_cifar_folder_without_download_names_every_file(tmp_path: Path) -> None:
    with pytest.raises(DataError) as err:
        materialize(DataConfig(name="cifar10", root=str(tmp_path), download=False), seed=0)

    message = str(err.value)
    assert str(tmp_path / "cifar-10-batches-py") in message and "data.download" in message
    for name in ("data_batch_1", "data_batch_5", "test_batch", "batches.meta"):
        assert name in message


def test_truncated_idx_file_is_named_and_called_truncated(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    write_mnist_files(raw)
    images = raw / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:-100])

    with pytest.raises(DataError) as err:
        materialize(DataConfig(name="mnist", root=str(tmp_path), download=False), seed=0)

    message = str(err.value)
    assert str(images.resolve()) in message or str(images) in message
    assert "truncated" in message and "download again" in message
    assert f"the file holds {ROWS['train'] * 28 * 28 - 100}" in message


def test_truncated_gz_idx_file_is_named(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    write_mnist_files(raw, compress=True)
    labels = raw / "train-labels-idx1-ubyte.gz"
    labels.write_bytes(labels.read_bytes()[:-20])

    with pytest.raises(DataError, match=r"train-labels-idx1-ubyte\.gz: cannot be read .*download again"):
        materialize(DataConfig(name="mnist", root=str(tmp_path), download=False), seed=0)


def test_corrupt_deflate_data_in_gz_idx_file_is_a_data_error(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    write_mnist_files(raw, compress=True)
    images = raw / "t10k-images-idx3-ubyte.gz"
    damaged = bytearray(images.read_bytes())
    damaged[10] |= 0b110  # first deflate block header (after the 10-byte gzip header): reserved block type
    images.write_bytes(bytes(damaged))

    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte\.gz: cannot be read"):
        materialize(DataConfig(name="mnist", root=str(tmp_path), download=False), seed=0)


def test_a_file_that_is_not_idx_is_named(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    write_mnist_files(raw)
    (raw / "train-labels-idx1-ubyte").write_bytes(b"<html>404</html>")

    with pytest.raises(DataError, match="train-labels-idx1-ubyte: not an IDX file"):
        materialize(DataConfig(name="mnist", root=str(tmp_path), download=False), seed=0)


def test_images_and_labels_of_different_lengths_are_named(tmp_path: Path) -> None:
    raw = tmp_path / "MNIST" / "raw"
    write_mnist_files(raw)
    write_idx(raw / "t10k-labels-idx1-ubyte", np.zeros(ROWS["test"] - 1, dtype=np.uint8))

    with pytest.raises(DataError, match=r"t10k-images-idx3-ubyte holds \(30, 28, 28\) but t10k-labels-idx1-ubyte"):
        materialize(DataConfig(name="mnist", root=str(tmp_path), download=False), seed=0)


def test_truncated_cifar_pickle_is_named(tmp_path: Path) -> None:
    folder = write_cifar10(tmp_path)
    batch = folder / "data_batch_3"
    batch.write_bytes(batch.read_bytes()[: batch.stat().st_size // 2])

    with pytest.raises(DataError) as err:
        materialize(DataConfig(name="cifar10", root=str(tmp_path), download=False), seed=0)

    message = str(err.value)
    assert f"{batch}: truncated or corrupt" in message and "download again" in message


# ---------------------------------------------------------------------------------------------------
# Downloads, from a real HTTP server on 127.0.0.1


@dataclass
class LocalServer:
    folder: Path
    url: str
    requested: list[str] = field(default_factory=list)


@pytest.fixture
def server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[LocalServer]:
    """http.server serving a temp folder on 127.0.0.1 at a free port; records the paths asked for."""
    for var in ("http_proxy", "HTTP_PROXY", "https_proxy", "HTTPS_PROXY", "all_proxy", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # 127.0.0.1 must not go through a proxy
    folder = tmp_path / "served"
    folder.mkdir()
    requested: list[str] = []

    class Handler(http.server.SimpleHTTPRequestHandler):
        def __init__(self, *args, **kwargs) -> None:
            super().__init__(*args, directory=str(folder), **kwargs)

        def do_GET(self) -> None:
            requested.append(self.path)
            super().do_GET()

        def log_message(self, *args) -> None:
            pass

    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield LocalServer(folder, f"http://127.0.0.1:{httpd.server_port}/", requested)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join()


def serve_mnist(server: LocalServer, monkeypatch: pytest.MonkeyPatch, mirrors: list[str]) -> dict:
    """Put MNIST's four .gz files on the server and point torchvision's MNIST at it, with their real md5s."""
    written = write_mnist_files(server.folder, compress=True, seed=5)
    names = [f"{stem}.gz" for pair in MNIST_STEMS.values() for stem in pair]
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", mirrors)
    monkeypatch.setattr(torchvision.datasets.MNIST, "resources", [(n, md5(server.folder / n)) for n in names])
    return written


def test_mnist_downloads_from_the_mirror_with_md5_checked(server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    written = serve_mnist(server, monkeypatch, [server.url])
    root = tmp_path / "root"
    cfg = DataConfig(name="mnist", root=str(root), download=True, val_fraction=0)

    spec = materialize(cfg, seed=0)

    raw = root / "MNIST" / "raw"
    for pair in MNIST_STEMS.values():
        for stem in pair:
            assert (raw / f"{stem}.gz").read_bytes() == (server.folder / f"{stem}.gz").read_bytes()
            assert (raw / stem).is_file()  # extracted next to the archive
    assert {f"/{stem}.gz" for pair in MNIST_STEMS.values() for stem in pair} <= set(server.requested)
    assert spec.rows == ROWS
    splits = load_splits(spec, cfg, seed=0)
    x, y = unshuffled_train(splits, seed=0)
    np.testing.assert_array_equal(x[:, 0], written["train"][0])
    np.testing.assert_array_equal(y, written["train"][1])
    np.testing.assert_array_equal(splits["test"][1], written["test"][1])


def test_a_dead_mirror_falls_back_to_the_next(server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    serve_mnist(server, monkeypatch, [f"{server.url}gone/", server.url])

    spec = materialize(DataConfig(name="mnist", root=str(tmp_path / "root"), download=True), seed=0)

    assert spec.rows == ROWS
    assert "/gone/train-images-idx3-ubyte.gz" in server.requested  # tried first, answered 404


def test_mnist_download_with_a_wrong_md5_is_a_data_error_that_says_what_to_do(
    server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    serve_mnist(server, monkeypatch, [server.url])
    # The server now hands out a different file than the one whose md5 torchvision expects.
    write_idx(server.folder / "train-images-idx3-ubyte", np.zeros((3, 28, 28), dtype=np.uint8), compress=True)
    root = tmp_path / "root"

    with pytest.raises(DataError) as err:
        materialize(DataConfig(name="mnist", root=str(root), download=True), seed=0)

    message = str(err.value)
    assert message.startswith("mnist: download failed")
    assert "File not found or corrupted" in message  # torchvision's md5 check
    assert str(root / "MNIST" / "raw") in message and "data.download=false" in message
    assert "train-images-idx3-ubyte" in message
    assert not (root / "parquet").exists()
    assert not list((root / "MNIST").rglob("*-ubyte*")), "no unverified file is left to pass for the data later"


def test_mnist_download_from_a_server_without_the_files_is_a_data_error(
    server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(torchvision.datasets.MNIST, "mirrors", [server.url])

    with pytest.raises(DataError, match=r"mnist: download failed \(could not fetch train-images-idx3-ubyte.gz.*404"):
        materialize(DataConfig(name="mnist", root=str(tmp_path / "root"), download=True), seed=0)


def serve_cifar(server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, md5_of: str | None = None):
    """A tar.gz of cifar-10-batches-py on the server; CIFAR10.url and tgz_md5 pointed at it."""
    folder = write_cifar10(tmp_path / "staging")
    archive = server.folder / "cifar-10-python.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(folder, arcname=folder.name)
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "url", f"{server.url}cifar-10-python.tar.gz")
    monkeypatch.setattr(torchvision.datasets.CIFAR10, "tgz_md5", md5_of or md5(archive))


def test_cifar10_downloads_and_extracts_the_archive(server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    serve_cifar(server, tmp_path, monkeypatch)
    root = tmp_path / "root"
    cfg = DataConfig(name="cifar10", root=str(root), download=True, val_fraction=0)

    spec = materialize(cfg, seed=0)

    assert (root / "cifar-10-python.tar.gz").is_file()
    assert (root / "cifar-10-batches-py" / "batches.meta").is_file()
    assert spec.rows == {"train": 200, "test": 40} and spec.classes == tuple(CIFAR_CLASSES)
    x, _ = unshuffled_train(load_splits(spec, cfg, seed=0), seed=0)
    np.testing.assert_array_equal(x, cifar_as_written()["train"][0])


def test_cifar10_download_with_a_wrong_md5_is_a_data_error(server: LocalServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    serve_cifar(server, tmp_path, monkeypatch, md5_of="0" * 32)
    root = tmp_path / "root"

    with pytest.raises(DataError) as err:
        materialize(DataConfig(name="cifar10", root=str(root), download=True), seed=0)

    message = str(err.value)
    assert message.startswith("cifar10: download failed (File not found or corrupted.)")
    assert str(root / "cifar-10-batches-py") in message and "data.download=false" in message
    assert not (root / "cifar-10-batches-py").exists()  # nothing extracted from an unverified archive


# ---------------------------------------------------------------------------------------------------
# Synthetic sets


def linear_arrays(root: Path, seed: int) -> tuple[np.ndarray, np.ndarray]:
    cfg = DataConfig(name="linear", root=str(root), num_samples=500, val_fraction=0)
    return unshuffled_train(load_splits(materialize(cfg, seed=seed), cfg, seed=seed), seed=seed)


def test_linear_is_deterministic_from_the_seed(tmp_path: Path) -> None:
    x_a, y_a = linear_arrays(tmp_path / "a", seed=1)
    x_b, y_b = linear_arrays(tmp_path / "b", seed=1)
    x_c, y_c = linear_arrays(tmp_path / "c", seed=2)

    np.testing.assert_array_equal(x_a, x_b)
    np.testing.assert_array_equal(y_a, y_b)
    assert not np.array_equal(x_a, x_c) and not np.array_equal(y_a, y_c)


def test_linear_follows_the_tutorial_line_within_its_noise(tmp_path: Path) -> None:
    cfg = DataConfig(name="linear", root=str(tmp_path), num_samples=1000)
    spec = materialize(cfg, seed=0)
    x, y = unshuffled_train(load_splits(spec, cfg, seed=0), seed=0)

    assert spec.task == "regression" and spec.classes == () and spec.input_shape == (2,)
    assert x.shape == (1000, 2) and x.dtype == y.dtype == np.float32
    residual = y - (x @ np.array(LINEAR_TRUE_W, dtype=np.float32) + LINEAR_TRUE_B)
    assert 0.005 < residual.std() < 0.02  # the noise std is 0.01
    assert np.abs(residual).max() < 0.05


def test_circles_labels_are_exactly_inside_the_unit_circle(tmp_path: Path) -> None:
    cfg = DataConfig(name="circles", root=str(tmp_path), num_samples=800)
    spec = materialize(cfg, seed=4)
    x, y = unshuffled_train(load_splits(spec, cfg, seed=4), seed=4)

    assert spec.classes == ("outside", "inside") and spec.task == "classification"
    np.testing.assert_array_equal(y, (x[:, 0] ** 2 + x[:, 1] ** 2 < 1).astype(np.int64))
    assert 0 < y.sum() < len(y)  # both classes occur


def test_synthetic_sets_are_keyed_by_size_and_seed(tmp_path: Path) -> None:
    a = materialize(DataConfig(name="circles", root=str(tmp_path), num_samples=100), seed=0)
    b = materialize(DataConfig(name="circles", root=str(tmp_path), num_samples=100), seed=1)
    c = materialize(DataConfig(name="circles", root=str(tmp_path), num_samples=200), seed=0)

    assert len({a.directory, b.directory, c.directory}) == 3
    assert a.data_hash != b.data_hash and c.rows == {"train": 200}


# ---------------------------------------------------------------------------------------------------
# Tabular: the user's own CSV or Parquet


def tabular(path: Path, target: str, root: Path) -> DataConfig:
    return DataConfig(name="tabular", path=str(path), target=target, root=str(root), val_fraction=0)


def test_csv_with_a_string_target_is_classification_with_sorted_classes(tmp_path: Path) -> None:
    csv = tmp_path / "flowers.csv"
    csv.write_text("petal,sepal,species\n1.5,3,virginica\n0.2,1,setosa\n4.0,2,versicolor\n0.3,5,setosa\n")
    cfg = tabular(csv, "species", tmp_path)

    spec = materialize(cfg, seed=0)
    x, y = unshuffled_train(load_splits(spec, cfg, seed=0), seed=0)

    assert spec.task == "classification" and spec.classes == ("setosa", "versicolor", "virginica")
    assert spec.input_shape == (2,) and spec.rows == {"train": 4}
    np.testing.assert_array_equal(x, np.array([[1.5, 3], [0.2, 1], [4.0, 2], [0.3, 5]], dtype=np.float32))
    assert [spec.classes[i] for i in y] == ["virginica", "setosa", "versicolor", "setosa"]
    np.testing.assert_allclose(spec.mean, [1.5, 2.75], rtol=1e-6)


def test_parquet_with_a_string_target_is_classification(tmp_path: Path) -> None:
    path = tmp_path / "table.parquet"
    pq.write_table(pa.table({"a": [1, 2, 3], "b": [0.5, -0.5, 2.0], "label": ["no", "yes", "no"]}), path)
    cfg = tabular(path, "label", tmp_path)

    spec = materialize(cfg, seed=0)
    x, y = unshuffled_train(load_splits(spec, cfg, seed=0), seed=0)

    assert spec.classes == ("no", "yes")
    np.testing.assert_array_equal(x, np.array([[1, 0.5], [2, -0.5], [3, 2.0]], dtype=np.float32))
    np.testing.assert_array_equal(y, [0, 1, 0])


def test_a_float_target_is_regression(tmp_path: Path) -> None:
    path = tmp_path / "prices.parquet"
    pq.write_table(pa.table({"rooms": [1, 2, 3, 4], "price": [10.5, 20.0, 31.25, 39.0]}), path)
    cfg = tabular(path, "price", tmp_path)

    spec = materialize(cfg, seed=0)
    _, y = unshuffled_train(load_splits(spec, cfg, seed=0), seed=0)

    assert spec.task == "regression" and spec.classes == ()
    np.testing.assert_array_equal(y, np.array([10.5, 20.0, 31.25, 39.0], dtype=np.float32))


def test_a_missing_target_column_lists_the_columns(tmp_path: Path) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text("a,b,label\n1,2,x\n3,4,y\n")

    with pytest.raises(DataError) as err:
        materialize(tabular(csv, "target", tmp_path), seed=0)

    message = str(err.value)
    assert "data.target: column 'target' is not in" in message and str(csv) in message
    assert "['a', 'b', 'label']" in message


def test_a_non_numeric_feature_column_is_named(tmp_path: Path) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text("size,color,label\n1,red,x\n3,blue,y\n")

    with pytest.raises(DataError, match=r"feature columns must be numeric; not numeric: \['color'\]"):
        materialize(tabular(csv, "label", tmp_path), seed=0)


@pytest.mark.parametrize(
    "rows",
    ["1,2.5,x\n3,nan,y", "1,2.5,x\n3,,y", "1,2,x\n,4,y"],
    ids=["nan", "empty-float-cell", "empty-int-cell"],
)
def test_nan_in_the_features_is_a_data_error(tmp_path: Path, rows: str) -> None:
    csv = tmp_path / "t.csv"
    csv.write_text(f"a,b,label\n{rows}\n")

    with pytest.raises(DataError, match=r"feature columns contain NaN, infinite or empty values \(\[.(a|b).\], first in data row 2\)"):
        materialize(tabular(csv, "label", tmp_path), seed=0)


def test_a_missing_table_file_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataError, match=r"data.path: file .*nowhere.csv does not exist"):
        materialize(tabular(tmp_path / "nowhere.csv", "y", tmp_path), seed=0)


# ---------------------------------------------------------------------------------------------------
# Batching and sharding


def test_two_workers_see_exactly_the_global_batches_of_one_worker() -> None:
    n, b = 103, 8
    one = list(batch_indices(n, 2 * b, rank=0, world_size=1, epoch=3, seed=9))
    rank0 = list(batch_indices(n, b, rank=0, world_size=2, epoch=3, seed=9))
    rank1 = list(batch_indices(n, b, rank=1, world_size=2, epoch=3, seed=9))

    assert len(one) == len(rank0) == len(rank1) == n // (2 * b) == 6  # the last 7 samples are dropped
    for whole, part0, part1 in zip(one, rank0, rank1, strict=True):
        assert len(part0) == len(part1) == b
        assert set(part0).isdisjoint(part1)
        assert set(part0) | set(part1) == set(whole)
    seen = np.concatenate(one)
    assert len(set(seen)) == 96 and seen.min() >= 0 and seen.max() < n


def test_a_dataset_smaller_than_one_global_batch_gives_no_batches() -> None:
    assert list(batch_indices(15, 8, rank=0, world_size=2, epoch=0, seed=0)) == []


def test_epochs_shuffle_differently_and_the_seed_repeats_them() -> None:
    def epoch_order(epoch: int, seed: int = 0) -> np.ndarray:
        return np.concatenate(list(batch_indices(64, 16, rank=0, world_size=1, epoch=epoch, seed=seed)))

    assert not np.array_equal(epoch_order(0), epoch_order(1))
    np.testing.assert_array_equal(epoch_order(1), epoch_order(1))
    assert sorted(epoch_order(0)) == sorted(epoch_order(1)) == list(range(64))


@pytest.mark.parametrize(("n", "world_size"), [(10, 3), (7, 2), (5, 8), (12, 4)])
def test_shard_indices_partition_the_rows(n: int, world_size: int) -> None:
    shards = [shard_indices(n, rank, world_size) for rank in range(world_size)]

    assert sorted(np.concatenate(shards).tolist()) == list(range(n))
    sizes = [len(s) for s in shards]
    assert max(sizes) - min(sizes) <= 1


# ---------------------------------------------------------------------------------------------------
# Augmentation


def test_augment_is_the_identity_when_every_option_is_off() -> None:
    x = torch.rand(4, 3, 8, 8)
    assert augment(x, AugmentConfig()) is x


def test_augment_keeps_shape_and_dtype() -> None:
    x = torch.rand(16, 3, 12, 10)
    cfg = AugmentConfig(hflip=True, rotation_degrees=20, crop_min_scale=0.6)

    out = augment(x, cfg, torch.Generator().manual_seed(0))

    assert out.shape == x.shape and out.dtype == x.dtype
    assert not torch.equal(out, x)


def test_hflip_only_mirrors_some_samples_exactly_and_leaves_the_rest() -> None:
    x = torch.rand(64, 3, 8, 8)
    out = augment(x, AugmentConfig(hflip=True), torch.Generator().manual_seed(0))

    flipped = []
    for sample, result in zip(x, out, strict=True):
        same = torch.allclose(result, sample, atol=1e-5)
        mirrored = torch.allclose(result, torch.flip(sample, dims=[-1]), atol=1e-5)
        assert same or mirrored
        flipped.append(mirrored)
    assert 0 < sum(flipped) < len(flipped)


def test_augment_with_the_same_generator_seed_repeats() -> None:
    x = torch.rand(8, 1, 28, 28)
    cfg = AugmentConfig(hflip=True, rotation_degrees=15, crop_min_scale=0.8)

    first = augment(x, cfg, torch.Generator().manual_seed(3))
    second = augment(x, cfg, torch.Generator().manual_seed(3))

    assert torch.equal(first, second)


# ---------------------------------------------------------------------------------------------------
# The user's image folders


def _images(path: Path, **extra: object) -> DataConfig:
    return DataConfig(name="image_folder", path=str(path), root=str(path.parent / "data"), **extra)


def test_an_image_folder_becomes_a_classification_set_of_its_class_folders(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "pets", classes=("cat", "dog", "eel"), per_class=5, size=(6, 10), mode="RGB")
    spec = materialize(_images(tmp_path / "pets"), seed=0)
    assert spec.classes == ("cat", "dog", "eel") and spec.input_shape == (3, 6, 10) and spec.rows == {"train": 15}
    x, y = load_splits(spec, _images(tmp_path / "pets", val_fraction=0), seed=0)["train"]
    assert x.dtype == np.uint8 and sorted(np.bincount(y)) == [5, 5, 5]


def test_an_image_folder_with_train_and_test_folders_keeps_both(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "pets" / "train", per_class=6)
    write_image_folder(tmp_path / "pets" / "test", per_class=2, seed=1)
    spec = materialize(_images(tmp_path / "pets"), seed=0)
    assert spec.rows == {"train": 12, "test": 4} and spec.input_shape == (1, 8, 8)


def test_images_of_another_size_are_refused_naming_both_or_resized(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "pets", per_class=3)
    write_image_folder(tmp_path / "odd", classes=("dog",), per_class=1, size=(5, 7))
    (tmp_path / "odd" / "dog" / "0.png").rename(tmp_path / "pets" / "dog" / "z.png")
    with pytest.raises(DataError, match=r"z.png: 5x7 pixels, but .*cat/0.png is 8x8; set data.image_size=\[8, 8\]"):
        materialize(_images(tmp_path / "pets"), seed=0)
    spec = materialize(_images(tmp_path / "pets", image_size=(4, 4)), seed=0)
    assert spec.input_shape == (1, 4, 4) and spec.rows == {"train": 7}


def test_a_file_that_is_not_an_image_is_named(tmp_path: Path) -> None:
    write_image_folder(tmp_path / "pets", per_class=3)
    (tmp_path / "pets" / "dog" / "notes.txt").write_text("not a picture")
    with pytest.raises(DataError, match=r"dog/notes.txt: not an image that can be read .*remove it from the folder"):
        materialize(_images(tmp_path / "pets"), seed=0)


def test_sixteen_bit_and_palette_images_are_scaled_and_converted_not_clipped(tmp_path: Path) -> None:
    from PIL import Image

    write_image_folder(tmp_path / "eight", per_class=4, size=(8, 8))
    for path in sorted((tmp_path / "eight").rglob("*.png")):  # the same pictures, as 16-bit and palette files
        target = tmp_path / "wide" / path.relative_to(tmp_path / "eight")
        target.parent.mkdir(parents=True, exist_ok=True)
        pixels = np.asarray(Image.open(path))
        image = Image.fromarray(pixels.astype(np.uint16) * 257) if path.stem in ("0", "1") else Image.fromarray(pixels).convert("P")
        image.save(target)
    eight = load_splits(materialize(_images(tmp_path / "eight"), seed=0), _images(tmp_path / "eight", val_fraction=0), seed=0)
    wide = load_splits(materialize(_images(tmp_path / "wide"), seed=0), _images(tmp_path / "wide", val_fraction=0), seed=0)
    np.testing.assert_array_equal(wide["train"][0], eight["train"][0])  # 16-bit 65535 is 8-bit 255, not every pixel white


def test_a_floating_point_image_in_a_folder_is_refused_naming_it(tmp_path: Path) -> None:
    from PIL import Image

    write_image_folder(tmp_path / "pets", per_class=2, size=(8, 8))
    Image.fromarray(np.zeros((8, 8), dtype=np.float32), "F").save(tmp_path / "pets" / "dog" / "float.tiff")
    with pytest.raises(DataError, match=r"float.tiff: a 32-bit floating-point image"):
        materialize(_images(tmp_path / "pets"), seed=0)
