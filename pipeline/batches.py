"""Where a worker's batches come from: the in-memory fast path, or Ray Data shards (streaming).

    data = Streamed(cfg, spec, session) if streaming else InMemory(cfg, spec, session)
    steps, batches = data.train_batches(epoch)   # this rank's part of each global batch
    for x, y in data.eval_batches("val"): ...     # this rank's shard, in large batches

Both yield (raw inputs, targets) on the session's device: uint8 images stay uint8 until the loop
normalizes them there.
"""

from __future__ import annotations

import collections
import itertools
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.checkpoints import Session
from pipeline.config import ExperimentConfig
from pipeline.data.store import DatasetSpec, SplitRows, batch_indices, has_validation, load_split_rows, shard_indices, train_rows

__all__ = ["Batches", "InMemory", "Pair", "Streamed", "split_names", "target_for"]

EVAL_BATCH = 1024  # evaluation has no gradients to keep: larger batches, fewer steps
READ_AHEAD_BLOCKS = 3  # streamed blocks taken ahead of the one training (row groups, 8 MiB each: data/store.py)


@dataclass
class Batches:
    """One split on the device: the arrays of the file it lives in (inputs as stored, so uint8 images
    stay uint8; targets shaped for the loss) and which of their rows are this split's."""

    x: torch.Tensor
    y: torch.Tensor
    rows: torch.Tensor | None  # None: every row

    def __len__(self) -> int:
        return len(self.y) if self.rows is None else len(self.rows)

    def at(self, positions: torch.Tensor) -> torch.Tensor:
        """Positions within the split -> rows of x and y."""
        return positions if self.rows is None else self.rows[positions]


Pair = tuple[torch.Tensor, torch.Tensor]  # one batch on the device: raw inputs, targets shaped for the loss


class InMemory:
    """The fast path: each split on the device as one tensor, batches sliced by index (data.batch_indices)."""

    def __init__(self, cfg: ExperimentConfig, spec: DatasetSpec, session: Session) -> None:
        self.cfg, self.session = cfg, session
        self.splits = _to_device(load_split_rows(spec, cfg.data, cfg.seed, test=False), cfg.loss, session.device)

    def train_batches(self, epoch: int) -> tuple[int, Iterator[Pair]]:
        """This rank's part of each global batch of the epoch, and how many there are."""
        data, session = self.splits["train"], self.session
        batches = list(
            batch_indices(len(data), self.cfg.data.batch_size, session.rank, session.world_size, epoch=epoch, seed=self.cfg.seed)
        )
        # The epoch's order goes to the device in one copy: one blocking host-to-device copy per step
        # would stall a GPU between steps.
        indices = data.at(torch.from_numpy(np.stack(batches)).to(session.device))
        return len(indices), ((data.x[idx], data.y[idx]) for idx in indices)

    def eval_batches(self, split: str) -> Iterator[Pair]:
        """This rank's shard of a split (every world_size-th sample), in large batches."""
        data, session = self.splits[split], self.session
        mine = data.at(torch.from_numpy(shard_indices(len(data), session.rank, session.world_size)).to(session.device))
        return ((data.x[idx], data.y[idx]) for idx in mine.split(max(self.cfg.data.batch_size, EVAL_BATCH)))


class Streamed:
    """The streaming path: this worker's Ray Data shard of each split, read while the epoch runs.

    Ray Train splits each dataset equally across the workers, so every rank gets as many rows, hence
    as many whole batches, as DDP needs. The shard arrives as the blocks Ray Data read, one row group of the
    store's file each (data/store.py's ROW_GROUP_BYTES; numpy arrays, prefetched by Ray Data's threads while
    the step runs). Each block goes to the device in one copy and is cut into batches by a seeded
    permutation, as the in-memory path cuts its tensor; the rows a block leaves over wait for those of the
    next, so only the shard's last part batch is dropped. Blocks as they come, not re-batched by Ray Data
    to a fixed size: that copied every row once more in Ray Data's threads, beside the step (1.04x the MLP's
    streamed samples/s without it, alternated rounds); Ray's own per-row local shuffle and collation cost more
    than the MLP's whole step (docs/BENCHMARKS.md)."""

    def __init__(self, cfg: ExperimentConfig, spec: DatasetSpec, session: Session, shards: dict[str, Any] | None = None) -> None:
        """`shards`: each split's Ray Data iterator; by default this Ray Train worker's shards."""
        self.cfg, self.spec, self.session = cfg, spec, session
        if shards is None:
            import ray.train

            shards = {name: ray.train.get_dataset_shard(name) for name in split_names(cfg, spec)}
        self.splits = shards
        # The next epoch's training blocks, asked for before it begins. The first epoch's are asked for now: its
        # first block came 2.3 s after it was asked for on 2 cores (Ray Data's executor and read tasks starting),
        # while the worker's setup before it, most of it the optimizer's construction importing torch._dynamo,
        # takes about 3 s (docs/BENCHMARKS.md).
        self._ahead: ReadAhead | None = ReadAhead(shards["train"])

    def train_batches(self, epoch: int) -> tuple[int, Iterator[Pair]]:
        size = self.cfg.data.batch_size
        steps = train_rows(self.spec, self.cfg.data) // self.session.world_size // size  # for the progress display
        generator = torch.Generator().manual_seed(self.cfg.seed + epoch)
        return steps, self._shuffled(self._train_blocks(epoch), size, generator)

    def eval_batches(self, split: str) -> Iterator[Pair]:
        rows = max(self.cfg.data.batch_size, EVAL_BATCH)
        chunks = self.splits[split].iter_batches(batch_size=rows, batch_format="numpy", prefetch_batches=2)
        return (self._on_device(chunk) for chunk in chunks)

    def _train_blocks(self, epoch: int) -> Iterator[Pair]:
        """The epoch's blocks. Ray Data starts reading an epoch only when it is asked for it, and its first block
        came 0.4 to 0.9 s later on 2 cores. So the blocks are taken from Ray Data READ_AHEAD_BLOCKS ahead of the one
        that trains, and as soon as the epoch's last block is in, the next epoch is asked for in a thread, while this
        one's last blocks train and the evaluation and the checkpoint run. (One block ahead, the MNIST MLP's epochs
        began with up to 0.33 s of waiting for their first two blocks, a block training in 0.3 s; three ahead, 5 ms at
        most: docs/BENCHMARKS.md.)"""
        ahead, self._ahead = self._ahead or ReadAhead(self.splits["train"]), None
        blocks = ahead.blocks()
        window = collections.deque(itertools.islice(blocks, READ_AHEAD_BLOCKS))
        for following in blocks:
            window.append(following)
            yield self._on_device(window.popleft())
        if epoch < self.cfg.train.epochs:
            self._ahead = ReadAhead(self.splits["train"])
        while window:
            yield self._on_device(window.popleft())

    def _on_device(self, chunk: dict[str, np.ndarray]) -> Pair:
        x = _tensor(chunk["x"]).to(self.session.device).view(-1, *self.spec.input_shape)
        return x, target_for(_tensor(chunk["y"]), self.cfg.loss).to(self.session.device)

    def _shuffled(self, blocks: Iterator[Pair], size: int, generator: torch.Generator) -> Iterator[Pair]:
        """Each block's rows in batches of `size`, in a seeded random order; the rows left over (fewer than a
        batch) are kept, and batched once later blocks have left over a batch's worth with them."""
        spare: list[Pair] = []
        for x, y in blocks:
            order = torch.randperm(len(y), generator=generator).to(x.device)
            whole = len(y) // size * size
            for idx in order[:whole].view(-1, size):
                yield x[idx], y[idx]
            spare.append((x[order[whole:]], y[order[whole:]]))
            if sum(len(spare_y) for _, spare_y in spare) >= size:  # fewer than two batches: each part has fewer than one
                spare_x, spare_y = torch.cat([part for part, _ in spare]), torch.cat([part for _, part in spare])
                yield spare_x[:size], spare_y[:size]
                spare = [(spare_x[size:], spare_y[size:])]


class ReadAhead:
    """One epoch of a Ray Data shard, block by block, its first block asked for at once, in a daemon thread (a
    run that ends before the epoch leaves it behind instead of waiting for it)."""

    def __init__(self, shard: Any) -> None:
        whole_blocks = {"batch_size": None, "batch_format": "numpy", "prefetch_batches": 2}
        self._blocks: Iterator[dict[str, np.ndarray]] = iter(shard.iter_batches(**whole_blocks))
        self._first: list[dict[str, np.ndarray]] = []  # the first block, once fetched (none: an empty shard)
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._fetch_first, name="pipeline-read-ahead", daemon=True)
        self._thread.start()

    def _fetch_first(self) -> None:
        try:
            self._first.extend(itertools.islice(self._blocks, 1))
        except BaseException as err:  # handed to the epoch that reads it, in the loop's thread
            self._error = err

    def blocks(self) -> Iterator[dict[str, np.ndarray]]:
        self._thread.join()
        if self._error:
            raise self._error
        yield from self._first
        yield from self._blocks


def split_names(cfg: ExperimentConfig, spec: DatasetSpec) -> list[str]:
    """The splits a training uses: train, and val unless data.val_fraction holds out no rows (never test)."""
    return ["train", "val"] if has_validation(spec, cfg.data) else ["train"]


def _to_device(splits: dict[str, SplitRows], loss: str, device: torch.device) -> dict[str, Batches]:
    """Each file's arrays go to the device once: train and val share the training file's."""
    tensors: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
    batches = {}
    for name, split in splits.items():
        if id(split.x) not in tensors:
            tensors[id(split.x)] = _tensor(split.x).to(device), target_for(_tensor(split.y), loss).to(device)
        rows = None if split.rows is None else torch.from_numpy(split.rows).to(device)
        batches[name] = Batches(*tensors[id(split.x)], rows)
    return batches


def _tensor(array: np.ndarray) -> torch.Tensor:
    """Arrays read straight from Arrow are read-only views; torch wants writable memory (copied only then)."""
    return torch.from_numpy(np.require(array, requirements=("C", "W")))


def target_for(y: torch.Tensor, loss: str) -> torch.Tensor:
    return y.long() if loss == "cross_entropy" else y.float().view(-1, 1)
