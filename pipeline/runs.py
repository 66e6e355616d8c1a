"""Run identity: which run a command means, where it lives, and whether it starts, resumes or is done.

    plan = plan_run(cfg, spec.data_hash, fresh=False)   # key, folder, state: new | resume | finished (reads only)
    begin_run(plan)                                     # after every check: --fresh deletes, a new run is recorded
    ... train ...
    finish_run(plan, summary)                           # the run's record says it is complete

A run is its `name` plus a hash (`run_key`) of the config keys that define its result and of the data's
content hash. The keys in RESUMABLE_KEYS may change between invocations of one run (how long it trains,
where and on what it runs, where data, checkpoints and tracking live); a change to any other key is a
new run, in its own folder `<storage_path>/<name>/<key>/` with its own MLflow run. A search is keyed
the same way, its `tune.*` keys included (but for those in SEARCH_RESUMABLE_KEYS). Its `tune.num_samples`
is to a search what `train.epochs` is to a run: more of them grow the complete search (search_batches.py).

Each run folder holds `run.json`: the key, the identity it hashes, and, once the run is complete
(trained, tested, tracked, registered where asked), its result. The same command then trains nothing.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from pipeline.config import ConfigError, ExperimentConfig, flatten

__all__ = [
    "RESUMABLE_KEYS",
    "SEARCH_RESUMABLE_KEYS",
    "RunPlan",
    "begin_run",
    "delete_run",
    "filesystem_of",
    "finish_run",
    "held",
    "identity",
    "plan_run",
    "record_batches",
    "run_folder",
    "run_key",
    "storage_uri",
]

# Keys that may change between invocations of one run: none changes what the model learns from which
# data (a changed data set shows in the data hash, which is part of the key).
RESUMABLE_KEYS = (
    "train.epochs",  # more epochs continue the run from its latest checkpoint
    "train.max_failures",
    "train.checkpoints_to_keep",
    "train.channels_last",  # a memory layout: the same computation
    "train.compile",  # torch.compile fuses the same computation (to float rounding; checkpoints hold plain weights)
    "train.compile_mode",  # and CUDA graphs replay it
    "optim.fused",  # one kernel for the same update
    "scaling",  # how many workers, where, on which devices
    "storage_path",
    "data.root",
    "data.download",
    "data.loader",  # in memory or streamed: the same rows
    "data.stream_above_mb",
    "tracking",
    "tune",  # a training run's result does not depend on the search around it
)
# A search's own result depends on its space, sampler and scheduler: only these tune keys may change.
# train.epochs is each trial's budget (ASHA's max_t): a search with more epochs is another search.
SEARCH_RESUMABLE_KEYS = (
    *(k for k in RESUMABLE_KEYS if k not in ("tune", "train.epochs")),
    "tune.max_concurrent_trials",
    "tune.trial_runner",
    "tune.num_samples",  # more samples add trials to the search, its trials so far kept (search_batches.py)
)
RECORD_FILE = "run.json"
KEY_LENGTH = 12


def filesystem_of(location: str) -> tuple[Any, str]:
    """A folder or file on this disk (a relative path too) or in an object store (s3://...): pyarrow's
    filesystem for it, and its path there."""
    import pyarrow.fs

    return pyarrow.fs.FileSystem.from_uri(location if "://" in location else str(Path(location).absolute()))


def storage_uri(cfg: ExperimentConfig) -> str:
    """An absolute path (Ray workers run elsewhere) or an object-store / shared URI as given."""
    return cfg.storage_path if "://" in cfg.storage_path else str(Path(cfg.storage_path).expanduser().resolve())


def identity(cfg: ExperimentConfig, data_hash: str, *, search: bool = False) -> dict[str, Any]:
    """The flat config keys that define the result (all but the resumable ones and the name), and the data."""
    resumable = SEARCH_RESUMABLE_KEYS if search else RESUMABLE_KEYS
    flat = flatten(cfg.model_dump(mode="json"))
    kept = {k: v for k, v in flat.items() if k != "name" and not any(k == r or k.startswith(f"{r}.") for r in resumable)}
    return {**kept, "data_hash": data_hash}


def run_key(cfg: ExperimentConfig, data_hash: str, *, search: bool = False) -> str:
    canonical = json.dumps(identity(cfg, data_hash, search=search), sort_keys=True)
    return hashlib.sha256(canonical.encode()).hexdigest()[:KEY_LENGTH]


@dataclass
class RunRecord:
    """What `run.json` holds: the identity and, once complete, the run's result."""

    key: str
    identity: dict[str, Any]
    created: float
    result: dict[str, Any] | None = None
    # A search's batches: the tune.num_samples of each of its Tune experiments, in order, each recorded
    # before it starts (search_batches.py): an interrupted batch resumes with its own count.
    batches: list[int] = field(default_factory=list)

    @property
    def epochs_done(self) -> int:
        return int((self.result or {}).get("epochs", 0))

    @property
    def samples_done(self) -> int:
        """A search's samples once it was last complete (0 before it ever was)."""
        return int((self.result or {}).get("num_samples", 0))


@dataclass
class RunPlan:
    """One invocation's run: its key and folder, and whether it is new, resumed or already complete."""

    name: str
    key: str
    folder: str  # <storage_path>/<name>/<key>, a local path or an object-store URI
    state: Literal["new", "resume", "finished"]
    record: RunRecord
    search: bool = False
    fresh: bool = False  # begin_run deletes the folder first
    changed: list[str] = field(default_factory=list)  # "key: before -> now" against the latest other run
    previous_key: str | None = None  # that run's key
    grow: tuple[int, int] | None = None  # a search asked for more samples: (those it has, those asked)

    def describe(self) -> str:
        """One line for the console: which run this is, and why."""
        what, done = ("search", "searched") if self.search else ("run", "trained")
        if self.state == "finished":
            return f"{self.name} ({self.key}) is already {done}: nothing new to do; add --fresh to start it over"
        if self.state == "resume" and self.grow:
            first = "growing the search" if self.record.result else "resuming the search from where it stopped, then growing it"
            return (f"{self.name} ({self.key}): {first} from {self.grow[0]} to {self.grow[1]} samples (tune.num_samples); "
                    "only the new trials train, those before are kept")  # fmt: skip
        if self.state == "resume":
            return f"{self.name} ({self.key}): resuming the {what} from where it stopped"
        if self.fresh:
            return f"{self.name} ({self.key}): started over (--fresh)"
        if self.previous_key:
            return f"{self.name} ({self.key}): a new {what}; it differs from {what} {self.previous_key} in {', '.join(self.changed)}"
        return f"{self.name} ({self.key}): a new {what}"


def name_folder(cfg: ExperimentConfig, *, search: bool = False) -> str:
    """Where every run of this name lives (searches apart, in `<name>-tune`)."""
    return f"{storage_uri(cfg)}/{cfg.name}{'-tune' if search else ''}"


def run_folder(cfg: ExperimentConfig, data_hash: str, *, search: bool = False) -> str:
    return f"{name_folder(cfg, search=search)}/{run_key(cfg, data_hash, search=search)}"


def plan_run(cfg: ExperimentConfig, data_hash: str, *, fresh: bool, search: bool = False) -> RunPlan:
    """Which run `cfg` is, and what this invocation does with it (`fresh`: start it over). Reads only.

    A run is complete when its record holds a result of at least train.epochs epochs; fewer: it resumes.
    A search, also of at least tune.num_samples samples; fewer: it grows (search_batches.py)."""
    key = run_key(cfg, data_hash, search=search)
    folder = f"{name_folder(cfg, search=search)}/{key}"
    record = None if fresh else _read_record(folder)
    if record is None:
        record = RunRecord(key, identity(cfg, data_hash, search=search), time.time())
        changed, previous = _changes_from_latest(name_folder(cfg, search=search), record)
        return RunPlan(cfg.name, key, folder, "new", record, search, fresh, changed, previous)
    done = record.result is not None and record.epochs_done >= cfg.train.epochs
    if not search:
        return RunPlan(cfg.name, key, folder, "finished" if done else "resume", record)
    planned = sum(record.batches)  # the samples of the Tune experiments it has started
    grow = (planned, cfg.tune.num_samples) if 0 < planned < cfg.tune.num_samples else None
    done = done and record.samples_done >= cfg.tune.num_samples
    return RunPlan(cfg.name, key, folder, "finished" if done else "resume", record, search, grow=grow)


def begin_run(plan: RunPlan, cfg: ExperimentConfig) -> None:
    """Once every check has passed: with --fresh, the run's old folder goes; a new run's record is written."""
    if plan.fresh:
        delete_run(cfg, plan.folder, search=plan.search)
    if plan.state == "new":
        _write_record(plan.folder, plan.record)


@contextmanager
def held(plan: RunPlan) -> Iterator[None]:
    """One command at a time per run: a second `pipeline train` of the same run while the first trains would
    log every epoch twice and register twice. It is refused (ConfigError), naming the process that holds it.

    A lock file beside the run's folder (so that --fresh does not delete it), released when the process
    ends however it ends. Object stores have no such lock: there, one command per run is the user's part."""
    import fcntl

    if "://" in plan.folder:
        yield
        return
    lock_path = Path(plan.folder).parent / f".{plan.key}.lock"
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with lock_path.open("a+") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            lock.seek(0)
            raise ConfigError(
                f"{plan.name} ({plan.key}) is being run right now by another process (pid {lock.read().strip() or '?'}); "
                "wait for it to end, then run the command again (it will resume or report the run)"
            ) from None
        lock.truncate(0)
        lock.write(str(os.getpid()))
        lock.flush()
        yield


def record_batches(plan: RunPlan, batches: list[int]) -> None:
    """A search's batches (search_batches.py), written before the new one starts."""
    plan.record.batches = batches
    _write_record(plan.folder, plan.record)


def finish_run(plan: RunPlan, result: dict[str, Any]) -> None:
    """Record the run as complete; `result` must hold `epochs`, the last epoch trained (a search's, also `num_samples`)."""
    plan.record.result = result
    _write_record(plan.folder, plan.record)


def delete_run(cfg: ExperimentConfig, folder: str, *, search: bool = False) -> None:
    """--fresh: remove one run's folder, never anything outside `<storage_path>/<name>/`."""
    import pyarrow.fs

    parent = f"{name_folder(cfg, search=search)}/"
    segment = folder.removeprefix(parent)
    if not folder.startswith(parent) or not segment or "/" in segment or segment in (".", ".."):
        raise ConfigError(f"refusing to delete {folder}: it is not one run's folder under {parent}")
    filesystem, path = filesystem_of(folder)
    if filesystem.get_file_info(path).type != pyarrow.fs.FileType.NotFound:
        filesystem.delete_dir(path)


def _changes_from_latest(folder: str, record: RunRecord) -> tuple[list[str], str | None]:
    """The keys in which `record` differs from the newest other run in `folder` (the runs of one name)."""
    others = [r for r in _records(folder) if r.key != record.key]
    if not others:
        return [], None
    latest = max(others, key=lambda r: r.created)
    keys = sorted(set(latest.identity) | set(record.identity))
    changed = [
        f"{k}: {latest.identity.get(k)!r} -> {record.identity.get(k)!r}" for k in keys if latest.identity.get(k) != record.identity.get(k)
    ]
    return changed, latest.key


def _records(name_folder: str) -> list[RunRecord]:
    import pyarrow.fs

    filesystem, path = filesystem_of(name_folder)
    if filesystem.get_file_info(path).type != pyarrow.fs.FileType.Directory:
        return []
    found = []
    for entry in filesystem.get_file_info(pyarrow.fs.FileSelector(path)):
        if entry.type == pyarrow.fs.FileType.Directory:
            record = _read(filesystem, f"{entry.path}/{RECORD_FILE}")
            if record is not None:
                found.append(record)
    return found


def _read_record(folder: str) -> RunRecord | None:

    filesystem, path = filesystem_of(folder)
    return _read(filesystem, f"{path}/{RECORD_FILE}")


def _read(filesystem: Any, path: str) -> RunRecord | None:
    """A run record, or None where there is none (a damaged one counts as none: it is rewritten)."""
    import pyarrow.fs

    if filesystem.get_file_info(path).type != pyarrow.fs.FileType.File:
        return None
    with filesystem.open_input_stream(path) as stream:
        try:
            return RunRecord(**json.loads(stream.read()))
        except (ValueError, TypeError):
            return None


def _write_record(folder: str, record: RunRecord) -> None:
    """Whole or not at all: a local file is replaced atomically; an object-store put is atomic itself."""

    fields = {k: v for k, v in asdict(record).items() if k != "batches" or v}  # a training run's record as before
    text = json.dumps(fields, indent=2, default=str).encode()
    if "://" not in folder:
        Path(folder).mkdir(parents=True, exist_ok=True)
        tmp = Path(folder) / f".{RECORD_FILE}.tmp"
        tmp.write_bytes(text)
        tmp.replace(Path(folder) / RECORD_FILE)
        return
    filesystem, path = filesystem_of(folder)
    filesystem.create_dir(path, recursive=True)
    with filesystem.open_output_stream(f"{path}/{RECORD_FILE}") as stream:
        stream.write(text)
