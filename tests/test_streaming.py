"""The streaming data path: Ray Data reads the Parquet files while the epoch runs (data.loader=stream)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.checks import check_training
from pipeline.config import ConfigError, load_config
from pipeline.data.store import decoded_mb, load_split_rows, materialize, streaming_datasets
from pipeline.execution import IN_MEMORY_GROWTH, MEMORY_SHARE, runs_in_process, stream_threshold_mb, streams
from pipeline.standin import write_mnist_like
from pipeline.train import run_training
from tests.helpers import CONF_DIR, tiny


def _rows(dataset) -> set[bytes]:
    """A dataset's samples, each as its bytes: a set to compare splits by content."""
    return {np.asarray(x).tobytes() for batch in dataset.iter_batches(batch_format="numpy") for x in batch["x"]}


@pytest.mark.ray  # Ray Data, in this process
def test_streamed_splits_hold_the_same_rows_as_the_in_memory_ones(ray_local, data_root: Path) -> None:
    cfg = load_config(CONF_DIR / "mnist_mlp.yaml", [f"data.root={data_root}", "data.download=false", "data.val_fraction=0.2"])
    spec = materialize(cfg.data, cfg.seed)
    in_memory = load_split_rows(spec, cfg.data, cfg.seed)
    streamed = streaming_datasets(spec, cfg.data, cfg.seed)
    assert set(streamed) == {"train", "val"}  # the test split is for the chosen checkpoint, on the driver
    for split in ("train", "val"):
        x, _ = in_memory[split].arrays()
        assert _rows(streamed[split]) == {sample.tobytes() for sample in x}, split
        assert streamed[split].count() == len(x), split


def test_auto_streams_above_the_threshold_and_then_trains_on_ray_workers(data_root: Path, tmp_path: Path) -> None:
    overrides = tiny(data_root, tmp_path, "scaling.num_workers=1")
    small = load_config(CONF_DIR / "mnist_mlp.yaml", overrides)
    spec = check_training(small)
    assert not streams(small, spec) and runs_in_process(small, spec)  # a few KB: the fast path, here
    # Unset, the threshold is what this machine's memory holds of the workers' in-memory copies.
    import psutil

    one, two = (load_config(CONF_DIR / "mnist_mlp.yaml", [*overrides, f"scaling.num_workers={n}"]) for n in (1, 2))
    memory_mb = psutil.virtual_memory().total / 2**20
    assert stream_threshold_mb(one) == pytest.approx(MEMORY_SHARE * memory_mb / IN_MEMORY_GROWTH)
    assert stream_threshold_mb(two) == pytest.approx(stream_threshold_mb(one) / 2), "two workers on one machine, two copies"
    big = load_config(CONF_DIR / "mnist_mlp.yaml", [*overrides, f"data.stream_above_mb={decoded_mb(spec) / 2}"])
    assert streams(big, spec) and not runs_in_process(big, spec)
    # Asked to train here anyway: refused, naming the key and the ways out.
    with pytest.raises(ConfigError, match=r"data.loader: the data streams through Ray Data .* scaling.runner=ray"):
        check_training(load_config(CONF_DIR / "mnist_mlp.yaml", [*overrides, "data.loader=stream", "scaling.runner=in_process"]))


@pytest.mark.ray
@pytest.mark.workers
def test_two_workers_train_on_streamed_shards(ray_local, tmp_path: Path) -> None:
    # Two epochs: each streamed epoch costs tens of seconds on 2 cores, and two show the loss going down.
    overrides = [f"storage_path={tmp_path}", f"data.root={tmp_path}", "data.loader=stream", "scaling.num_workers=2", "train.epochs=2"]
    result = run_training(load_config(CONF_DIR / "circles_classifier.yaml", overrides), track=False)
    assert [m["epoch"] for m in result.history] == [1, 2]
    assert result.history[-1]["train_loss"] < result.history[0]["train_loss"]
    assert result.metrics["val_accuracy"] > 0.8  # the circles are learnable: the batches are real data


@pytest.mark.ray
def test_streaming_without_a_cpu_for_ray_data_is_refused_before_any_run(ray_local, tmp_path: Path, tracking_store: str) -> None:
    # ray_local has 4 CPUs: 4 workers leave none for Ray Data's read tasks, and the run would wait forever.
    from mlflow import MlflowClient

    overrides = [f"storage_path={tmp_path}", f"data.root={tmp_path}", "data.loader=stream", "scaling.num_workers=4", "name=stream_no_cpu"]
    match = r"needs 5 CPUs and 0 GPUs \(4 workers x 1 CPU \+ 1 CPU for Ray Data's readers\); this machine's Ray has 4 CPUs"
    with pytest.raises(ConfigError, match=match):
        run_training(load_config(CONF_DIR / "circles_classifier.yaml", overrides))
    assert MlflowClient(tracking_store).get_experiment_by_name("stream_no_cpu") is None


@pytest.mark.ray  # Ray Data, in this process
def test_a_streamed_epoch_is_whole_shuffled_batches_of_every_row_but_the_last_part_batch(
    ray_local, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.batches import READ_AHEAD_BLOCKS, Streamed
    from pipeline.checkpoints import LocalSession
    from pipeline.data import store

    monkeypatch.setattr(store, "ROW_GROUP_BYTES", 512 * 28 * 28)  # row groups of 512 images: 6 blocks an epoch, and a part
    data_root = write_mnist_like(tmp_path, n_train=3300, seed=3).parents[1]
    overrides = [f"data.root={data_root}", "data.download=false", "data.batch_size=64", "train.epochs=2"]
    cfg = load_config(CONF_DIR / "mnist_mlp.yaml", overrides)
    spec = materialize(cfg.data, cfg.seed)
    session = LocalSession(data_root / "unused", keep=1, metric=None, mode="min", device=torch.device("cpu"))
    streamed = Streamed(cfg, spec, session, shards=streaming_datasets(spec, cfg.data, cfg.seed))
    x, y = load_split_rows(spec, cfg.data, cfg.seed)["train"].arrays()
    on_device, blocks = streamed._on_device, list[int]()  # the rows of each block, in the order they went to the device

    def counted(block: dict[str, np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        blocks.append(len(block["y"]))
        return on_device(block)

    monkeypatch.setattr(streamed, "_on_device", counted)
    assert streamed._ahead is not None, "the first epoch is asked for as the worker starts, before the model is built"
    epochs: dict[int, list[tuple[np.ndarray, np.ndarray]]] = {}
    for epoch in (1, 2):
        steps, batches = streamed.train_batches(epoch)
        epochs[epoch], read_ahead_at, blocks_in = [], [], []
        for bx, by in batches:
            epochs[epoch].append((bx.numpy().reshape(len(bx), -1), by.numpy()))
            read_ahead_at.append(streamed._ahead is not None)
            blocks_in.append(len(blocks))
        assert len(epochs[epoch]) == steps == len(y) // 64 and all(len(by) == 64 for _, by in epochs[epoch])
        seen = {row.tobytes() for bx, _ in epochs[epoch] for row in bx}
        assert seen <= {row.tobytes() for row in x.reshape(len(x), -1)} and len(seen) == steps * 64  # no row twice
        assert len(blocks) > 2 and sum(blocks) == len(y), "the epoch came in several blocks of Ray Data's"
        # Epoch 2 was asked for as soon as epoch 1's last block was in, READ_AHEAD_BLOCKS blocks before the last
        # trained; after the last epoch, nothing is.
        last_blocks_train = [count > len(blocks) - READ_AHEAD_BLOCKS for count in blocks_in]
        assert read_ahead_at == (last_blocks_train if epoch == 1 else [False] * steps)
        assert any(last_blocks_train) and not all(last_blocks_train)
        assert (streamed._ahead is not None) == (epoch == 1)
        blocks.clear()
    first, second = (np.concatenate([by for _, by in epochs[e]]) for e in (1, 2))
    assert not np.array_equal(first, second), "each epoch is shuffled anew"
    assert not np.array_equal(first[:1000], np.sort(first[:1000])), "rows within a block are shuffled"
    val = list(streamed.eval_batches("train"))
    assert sum(len(by) for _, by in val) == len(y) and val[0][0].shape[1:] == spec.input_shape
