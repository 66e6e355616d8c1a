"""Where the per-worker loop meets its runner: rank, device, restore and report.

The worker loop in loop.py talks to a `Session` only, so one loop serves two runners:
- `RaySession`: inside a Ray Train worker; reports go through `ray.train.report` (a barrier on every
  rank), checkpoints are persisted and pruned by Ray, and DDP wraps the model.
- `LocalSession`: in this process, without Ray (`scaling.num_workers=0`, benchmarks); it keeps the
  same checkpoint layout itself: `<storage_path>/<name>/checkpoint_epoch=NNNN/{state.pt,meta.json}`.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import sys
import tempfile
import time
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from torch import nn

from pipeline.data.store import file_sha256
from pipeline.errors import BadInput
from pipeline.runs import filesystem_of

__all__ = [
    "CheckpointError",
    "LocalSession",
    "RaySession",
    "Session",
    "checkpoint_dir_name",
    "load_state",
    "local_checkpoint",
    "read_meta",
    "run_checkpoints",
    "save_state",
]

STATE_FILE = "state.pt"
META_FILE = "meta.json"
UPLOAD_PATIENCE_S = 300.0  # how long an in-process run waits for an object store that does not answer


class CheckpointError(BadInput):
    """A checkpoint that is incomplete or whose state file does not match its recorded checksum."""


def checkpoint_dir_name(epoch: int) -> str:
    return f"checkpoint_epoch={epoch:04d}"


def save_state(directory: Path, state: dict[str, Any]) -> None:
    """Weights, optimizer, epoch, metrics and the configs that rebuild the model, plus a readable summary.

    The summary is written last and carries the state file's SHA-256: it marks the checkpoint complete,
    and a truncated or altered state file is caught when the checkpoint is loaded. It also carries every
    epoch's metrics so far, so that a run's whole history is read without loading any weights."""
    torch.save(state, directory / STATE_FILE)
    summary = {key: state[key] for key in ("epoch", "metrics", "history")}
    summary["sha256"] = file_sha256(directory / STATE_FILE)
    (directory / META_FILE).write_text(json.dumps(summary))


def read_meta(directory: Path) -> dict[str, Any] | None:
    """A checkpoint's summary, or None if it is missing or damaged (the checkpoint then counts as incomplete)."""
    try:
        meta = json.loads((directory / META_FILE).read_text())
    except (OSError, ValueError):
        return None
    return meta if isinstance(meta, dict) and isinstance(meta.get("metrics"), dict) and "epoch" in meta else None


def run_checkpoints(folder: str) -> dict[int, tuple[str, dict[str, Any]]]:
    """A run folder's complete checkpoints, on this disk or in an object store: epoch -> (path, summary)."""
    import pyarrow.fs

    filesystem, path = filesystem_of(folder)
    if filesystem.get_file_info(path).type != pyarrow.fs.FileType.Directory:
        return {}
    scheme = folder.partition("://")[0] + "://" if "://" in folder else ""
    found = {}
    for entry in filesystem.get_file_info(pyarrow.fs.FileSelector(path)):
        if entry.type != pyarrow.fs.FileType.Directory or not entry.base_name.startswith("checkpoint_epoch="):
            continue
        try:
            with filesystem.open_input_stream(f"{entry.path}/{META_FILE}") as stream:
                meta = json.loads(stream.read())
        except (OSError, ValueError):
            continue  # incomplete or damaged: not a checkpoint to rank
        if isinstance(meta, dict) and "epoch" in meta:
            found[int(meta["epoch"])] = (f"{scheme}{entry.path}", meta)
    return found


@contextmanager
def local_checkpoint(checkpoint: str) -> Iterator[Path]:
    """A checkpoint folder on this disk: as it is, or copied from an object store first."""
    if "://" not in checkpoint:
        yield Path(checkpoint)
        return
    import pyarrow.fs

    with tempfile.TemporaryDirectory() as tmp:
        filesystem, path = filesystem_of(checkpoint)
        pyarrow.fs.copy_files(path, tmp, source_filesystem=filesystem)
        yield Path(tmp)


def load_state(directory: Path) -> dict[str, Any]:
    """A checkpoint's state, verified against the checksum in its summary; CheckpointError names what is wrong."""
    directory = Path(directory)
    state_file, meta_file = directory / STATE_FILE, directory / META_FILE
    if not state_file.is_file() or not meta_file.is_file():
        raise CheckpointError(f"checkpoint {directory}: incomplete, {STATE_FILE} or {META_FILE} is missing")
    meta = read_meta(directory)
    if meta is None:
        raise CheckpointError(f"checkpoint {directory}: {META_FILE} is damaged (not the summary JSON it should be)")
    expected = meta.get("sha256")  # absent in checkpoints from before checksums
    if expected and file_sha256(state_file) != expected:
        raise CheckpointError(f"checkpoint {directory}: {STATE_FILE} does not match its checksum (truncated or altered)")
    try:
        # weights_only: a checkpoint holds tensors and plain containers, never code to run.
        return torch.load(state_file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(f"checkpoint {directory}: {STATE_FILE} cannot be read: {type(err).__name__}: {err}") from None


def restore_newest(candidates: list[Path], skipped: list[str]) -> dict[str, Any] | None:
    """The state of the newest checkpoint that loads (candidates oldest first); why others did not, in `skipped`."""
    for directory in reversed(candidates):
        try:
            return load_state(directory)
        except CheckpointError as err:
            skipped.append(f"{err}; resuming from the checkpoint before it")
    return None


class Session(Protocol):
    rank: int
    world_size: int
    device: torch.device

    def wrap(self, model: nn.Module) -> nn.Module: ...

    def restore(self) -> dict[str, Any] | None: ...

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None: ...

    @property
    def skipped(self) -> list[str]:
        """Why `restore` passed over damaged checkpoints, for the loop to tell the user."""
        ...


class RaySession:
    """A Ray Train worker: every rank calls `report` once per epoch; rank 0 passes the checkpoint."""

    def __init__(self, start_from: str | None = None) -> None:
        import ray.train
        import ray.train.torch

        self.start_from = start_from  # where a run without checkpoints of its own starts (build_trainer)
        context = ray.train.get_context()
        self.skipped: list[str] = []
        self.rank = context.get_world_rank()
        self.world_size = context.get_world_size()
        self.device = ray.train.torch.get_device()

    def wrap(self, model: nn.Module) -> nn.Module:
        import ray.train.torch

        return ray.train.torch.prepare_model(model)  # DDP when world_size > 1

    def restore(self) -> dict[str, Any] | None:
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None and self.start_from:
            checkpoint = ray.train.Checkpoint(self.start_from)
        if checkpoint is None:
            return None
        # Ray hands out the latest checkpoint only; the older ones beside it are the fallback.
        for candidate in [checkpoint, *_older_siblings(checkpoint)]:
            with candidate.as_directory() as directory:
                try:
                    return load_state(Path(directory))
                except CheckpointError as err:
                    self.skipped.append(f"{err} ({candidate.path}); resuming from the checkpoint before it")
        return None

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        import ray.train

        if state is None:
            ray.train.report(metrics)
            return
        with tempfile.TemporaryDirectory() as tmp:
            save_state(Path(tmp), state)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=checkpoint_dir_name(state["epoch"]))


def _older_siblings(checkpoint: Any) -> list[Any]:
    """The checkpoints next to `checkpoint` in its run folder with a lower epoch, newest first."""
    import pyarrow.fs
    import ray.train

    parent, _, name = checkpoint.path.rstrip("/").rpartition("/")
    entries = checkpoint.filesystem.get_file_info(pyarrow.fs.FileSelector(parent))
    older = sorted((e.path for e in entries if e.base_name.startswith("checkpoint_epoch=") and e.base_name < name), reverse=True)
    return [ray.train.Checkpoint(path, filesystem=checkpoint.filesystem) for path in older]


class LocalSession:
    """One process, no Ray: checkpoints written atomically and pruned to the best `keep` plus the latest.

    `metric` ranks them (the best is the run's model); None (no validation): the newest are kept.
    A run folder in an object store (storage_path=s3://...) is mirrored: checkpoints are written in a
    local folder as above, then uploaded (the summary last, which marks them complete there too) and
    pruned there alike; a resumed run downloads them first."""

    rank = 0
    world_size = 1

    def __init__(self, run_dir: Path | str, *, keep: int, metric: str | None, mode: Literal["min", "max"], device: torch.device):
        self.remote = str(run_dir) if "://" in str(run_dir) else None
        self.run_dir = Path(tempfile.mkdtemp(prefix="pipeline-checkpoints-")) if self.remote else Path(run_dir)
        if self.remote:
            weakref.finalize(self, shutil.rmtree, self.run_dir, True)  # the local copies go with the session
        self.keep, self.metric, self.mode = keep, metric, mode
        self.device = device
        self.last_metrics: dict[str, Any] | None = None
        self.skipped: list[str] = []

    def wrap(self, model: nn.Module) -> nn.Module:
        return model

    def checkpoints(self) -> list[Path]:
        """Complete checkpoints, oldest first (a half-written one is still a dot-folder; a damaged summary,
        as after a full disk, is passed over here and named by `restore`)."""
        return sorted(p for p in self.run_dir.glob("checkpoint_epoch=*") if (p / META_FILE).is_file())

    def best_checkpoint(self) -> Path | None:
        ranked = sorted(self.checkpoints(), key=self._score, reverse=self._descending)
        return ranked[0] if ranked else None

    def best_location(self) -> str | None:
        """Where the run's model is kept: the best checkpoint's folder, in the object store if mirrored."""
        best = self.best_checkpoint()
        return None if best is None else f"{self.remote}/{best.name}" if self.remote else str(best)

    def restore(self) -> dict[str, Any] | None:
        if self.remote:
            self._download()
        return restore_newest(self.checkpoints(), self.skipped)

    def report(self, metrics: dict[str, Any], state: dict[str, Any] | None) -> None:
        self.last_metrics = metrics
        if state is None:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(dir=self.run_dir, prefix=".tmp-"))
        save_state(tmp, state)
        final = self.run_dir / checkpoint_dir_name(state["epoch"])
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)
        self._prune()
        if self.remote:
            self._upload(final)

    @property
    def _descending(self) -> bool:
        return self.metric is None or self.mode == "max"  # by recency: the newest first

    def _score(self, checkpoint: Path) -> float:
        meta = read_meta(checkpoint)
        if meta is None:  # damaged: ranked last, so pruned first
            return -math.inf if self._descending else math.inf
        return float(meta["epoch"] if self.metric is None else meta["metrics"].get(self.metric, math.nan))

    def _prune(self) -> None:
        found = self.checkpoints()
        latest = found[-1]
        ranked = sorted(found, key=self._score, reverse=self._descending)
        for checkpoint in ranked[self.keep :]:
            if checkpoint != latest:  # the latest always stays: it is where a resumed run starts
                shutil.rmtree(checkpoint)

    def _download(self) -> None:
        import pyarrow.fs

        assert self.remote is not None
        for path, _ in run_checkpoints(self.remote).values():
            filesystem, source = filesystem_of(path)
            local = self.run_dir / source.rsplit("/", 1)[-1]
            local.mkdir()
            pyarrow.fs.copy_files(source, str(local), source_filesystem=filesystem)

    def _upload(self, checkpoint: Path) -> None:
        """The new checkpoint into the object store; an object store away for a while is waited for (with a
        warning), up to UPLOAD_PATIENCE_S, rather than ending the run."""
        deadline, delay = time.monotonic() + UPLOAD_PATIENCE_S, 1.0
        while True:
            try:
                return self._put(checkpoint)
            except OSError as err:
                if time.monotonic() + delay > deadline:
                    raise
                if delay == 1.0:
                    print(f"warning: the object store does not answer ({str(err).splitlines()[0][:200]}); "
                          f"the checkpoint of {checkpoint.name} waits for it", file=sys.stderr, flush=True)  # fmt: skip
                time.sleep(delay)
                delay = min(delay * 2, 30.0)

    def _put(self, checkpoint: Path) -> None:
        """The checkpoint's files, summary last (what marks it complete there); those pruned here, pruned there."""
        import pyarrow.fs

        assert self.remote is not None
        filesystem, folder = filesystem_of(self.remote)
        target = f"{folder}/{checkpoint.name}"
        filesystem.create_dir(target)
        for name in (STATE_FILE, META_FILE):
            with filesystem.open_output_stream(f"{target}/{name}") as out:
                out.write((checkpoint / name).read_bytes())
        kept = {path.name for path in self.checkpoints()}
        for entry in filesystem.get_file_info(pyarrow.fs.FileSelector(folder)):
            if entry.base_name.startswith("checkpoint_epoch=") and entry.base_name not in kept:
                filesystem.delete_dir(entry.path)
