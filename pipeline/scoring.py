"""Batch inference: a registered model over a data set of any size, written as a folder of Parquet files.

    pipeline predict circles_classifier@champion 'points/*.parquet' --out scored/
    pipeline predict mnist_mlp@champion photos/ --out scored/ --engine ray --actors 2

    scored = score_data_set("mnist_mlp@champion", find_data_set(["photos/"]), "scored", ScoringOptions())

Two engines read the same files in the same order and score each batch with the same function
(`score_batch`), so they write the same rows: `local` in this process, batch after batch; `ray` on Ray Data
(`read_parquet` / `read_binary_files` -> `map_batches` on a pool of actors that load the model once each),
locally or on the cluster of RAY_ADDRESS. Either way memory holds a few batches, never the data set, and
this process writes the parts: the output is small (the input's other columns and the predictions) and
one writer makes the progress bar and the all-or-nothing rename simple.

The model reference is resolved to one version before any work, and every actor loads that version:
an alias that moves during the job changes nothing. The version is in every part's metadata.
"""

from __future__ import annotations

import os
import re
import shutil
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import BadInput, RunFailed
from pipeline.predict import read_image
from pipeline.scoring_inputs import DataSet, check_data_set, read_bytes
from pipeline.serving import InputError, Predictor, outputs_table

if TYPE_CHECKING:
    import pyarrow as pa
    import pyarrow.parquet as pq

__all__ = ["ENGINE_AUTO_BYTES", "Scored", "Scorer", "ScoringOptions", "score_batch", "score_data_set"]

# --engine auto: below this many bytes of input the local engine wins, Ray's start (Ray itself, an actor
# per model copy, each importing torch and loading the model: ~15 s on 2 cores) being most of the time;
# above it a data set takes minutes and Ray's actors scale over cores, nodes and GPUs. See docs/BENCHMARKS.md.
ENGINE_AUTO_BYTES = 256 * 2**20
TABLE_BATCH, IMAGE_BATCH = 4096, 256  # rows per model call: a few MB of features or decoded 28x28..224x224 images
ROW_GROUP_ROWS = 65_536  # the writer gathers batches into row groups of about this many rows (readers like them large)
PART_ROWS = 1_000_000  # then starts a new part: files that a reader can take one at a time
# Ray Data reads files into blocks of up to 128 MiB, and an actor scores a block per task: 8 files of 250,000 rows
# (48 MB) were one block, scored by 1 of 2 actors and reported at the end. Blocks of 4 MiB (175,000 such rows, a
# second or two of scoring) keep every actor busy and the progress bar moving.
BLOCK_BYTES = 4 * 2**20
READ_CPUS = 0.25  # per read task: mostly waiting on files and decoding pages, several share a core
PREDICTION_COLUMNS = ("class_index", "label", "probability", "value")


@dataclass(frozen=True)
class ScoringOptions:
    engine: str = "auto"  # auto | local | ray
    actors: int | None = None  # the Ray engine's model copies (default: one per GPU, else one per 2 CPUs)
    batch_size: int | None = None  # rows per model call (default: TABLE_BATCH or IMAGE_BATCH)
    verbose: bool = False  # Ray Data's own logs


@dataclass(frozen=True)
class Plan:
    """How a data set is scored, decided once before any work."""

    engine: str
    why: str  # for the user: "auto: 1.2 GiB of input"
    batch_size: int
    actors: int = 0
    cpus: float = 1.0  # per actor
    gpus: int = 0  # per actor: 1 where the cluster has GPUs
    read_cpus: float = READ_CPUS  # per Ray Data read task


@dataclass(frozen=True)
class Scored:
    out: str
    rows: int
    parts: int
    model: str  # name/version, the version every row was scored by
    engine: str
    why: str
    actors: int
    seconds: float

    def line(self) -> str:
        how = f"ray, {self.actors} actor{'s' if self.actors != 1 else ''}" if self.engine == "ray" else "local"
        return (f"{self.out}: {self.rows:,} rows in {self.parts} Parquet file{'s' if self.parts != 1 else ''}, model {self.model}, "
                f"engine {how} ({self.why}), {self.seconds:.1f} s, {self.rows / max(self.seconds, 1e-9):,.0f} rows/s")  # fmt: skip


def score_data_set(
    ref: str, data: DataSet, out: str, options: ScoringOptions, on_event: Callable[[dict[str, Any]], None] | None = None
) -> Scored:
    """Score every row of `data` with the model `ref` names, into the folder `out`; all of it, or no `out` at all."""
    from pipeline.registry import load_model, resolve_version
    from pipeline.tracking import client, resolve_store

    emit = on_event or (lambda event: None)
    target = check_out_folder(out)
    uri = resolve_store(None).uri
    version = resolve_version(client(uri), ref)  # an unknown model or alias: RegistryError, exit 2
    model = f"{version.name}/{version.version}"
    predictor = load_model(model, tracking_uri=uri)
    rows = check_data_set(data, predictor)
    plan = plan_scoring(data, options)
    if plan.engine == "local":
        predictor = _on_gpu_if_any(predictor)
    emit({"event": "start", "rows": rows, "message": f"scoring {rows:,} rows of {data.source} with {model} ({ref})"})
    started = time.monotonic()
    metadata = {"pipeline.model": model, "pipeline.model_ref": ref, "pipeline.input": data.source}
    with PartWriter(target, metadata) as writer:
        batches = _local_batches(data, predictor, plan) if plan.engine == "local" else _ray_batches(data, model, uri, plan, options)
        for batch in batches:
            writer.write(batch)
            emit({"event": "rows", "rows": batch.num_rows})
        if writer.written != rows:  # files that changed since their footers were read: no OUT that looks complete
            raise RunFailed(f"{data.source}: {writer.written:,} rows scored where the files held {rows:,}; were they changed meanwhile?")
    return Scored(str(target), writer.rows, writer.parts, model, plan.engine, plan.why, plan.actors, time.monotonic() - started)


def check_out_folder(out: str) -> Path:
    """OUT must not exist (an earlier result is never replaced) and its parent must be a folder we can write."""
    if "://" in out:
        raise InputError(f"--out {out}: batch inference writes to a folder of this machine (a shared mount on a cluster), not a URI")
    target = Path(out).expanduser().absolute()
    if target.exists() or target.is_symlink():
        raise InputError(f"--out {out}: already exists; remove it or give another folder (an earlier result is never replaced)")
    if not target.parent.is_dir():
        raise InputError(f"--out {out}: the folder {target.parent} does not exist; create it first")
    if not os.access(target.parent, os.W_OK):
        raise InputError(f"--out {out}: cannot write to {target.parent}")
    return target


def plan_scoring(data: DataSet, options: ScoringOptions) -> Plan:
    """Which engine (auto: by the input's bytes), and on Ray how many actors of what resources."""
    from pipeline.runtime import ensure_ray

    batch_size = options.batch_size or (IMAGE_BATCH if data.kind == "images" else TABLE_BATCH)
    engine, why = options.engine, f"--engine {options.engine}"
    if engine == "auto":
        engine = "ray" if data.nbytes >= ENGINE_AUTO_BYTES else "local"
        why = f"auto: {data.nbytes / 2**20:,.1f} MiB of input, {'at least' if engine == 'ray' else 'under'} {ENGINE_AUTO_BYTES / 2**20:,.0f} MiB"
    if engine == "local":
        return Plan("local", why, batch_size)
    ensure_ray(options.verbose)
    return _actors(why, batch_size, options.actors)


def _actors(why: str, batch_size: int, asked: int | None) -> Plan:
    """One actor per GPU where there are GPUs, else one per 2 CPUs. Each takes at most 1 CPU, and together at most
    half of the CPUs: the other half is Ray Data's read tasks', READ_CPUS each. Actors holding every CPU leave the
    reads unscheduled and the job waits forever (seen on 2 cores with 2 actors of 1 CPU each); reads of 1 CPU each
    ran one at a time, and reading 50,000 small PNGs took 24 s where 4 at once took 8. A cluster that shows no
    CPU yet (autoscaling from zero) gets 1 CPU per actor and grows to it."""
    import ray

    from pipeline.runtime import on_cluster

    have = ray.cluster_resources()
    cpus, gpus = have.get("CPU", 0.0), int(have.get("GPU", 0))
    actors = asked or max(1, gpus or int(cpus) // 2)
    if gpus and actors > gpus and not on_cluster():
        raise InputError(f"--actors {actors}: each actor takes a GPU and this machine has {gpus}; give --actors {gpus} or fewer")
    per_actor = min(1.0, cpus / 2 / actors) if cpus else 1.0
    return Plan("ray", why, batch_size, actors, per_actor, 1 if gpus else 0, READ_CPUS)


def _on_gpu_if_any(predictor: Predictor) -> Predictor:
    import torch

    return predictor.to("cuda") if torch.cuda.is_available() else predictor


# ---------------------------------------------------------------------------------------------------
# Scoring one batch: the same function in this process and in every actor


def score_batch(predictor: Predictor, batch: pa.Table, kind: str) -> pa.Table:
    """Input rows -> the same rows' other columns (an id, the image's path), then the predictions.

    Images come as Ray Data's binary files do: `bytes` and `path`, decoded as `pipeline predict` decodes a file."""
    import pyarrow as pa

    if kind == "images":
        carried = batch.select(["path"])
        paths, blobs = batch.column("path").to_pylist(), batch.column("bytes").to_pylist()
        inputs: Any = np.concatenate([read_image(p, predictor, b) for p, b in zip(paths, blobs, strict=True)]) if paths else None
    else:
        carried = _renamed(batch.drop_columns(list(predictor.feature_names)))
        inputs = batch.select(list(predictor.feature_names)).to_pandas()
    try:
        predictions = predictor.predict_table(inputs) if batch.num_rows else _no_predictions(predictor)
    except InputError as err:
        raise InputError(_locate(err, carried)) from None
    table = pa.Table.from_pandas(predictions, preserve_index=False).replace_schema_metadata(None)
    for name in table.column_names:
        carried = carried.append_column(name, table.column(name))
    return carried


def _renamed(carried: pa.Table) -> pa.Table:
    """An input column named like a prediction (a labelled set's `label`) is kept as input_<name>, beside it."""
    return carried.rename_columns([f"input_{n}" if n in PREDICTION_COLUMNS else n for n in carried.column_names])


def _no_predictions(predictor: Predictor) -> Any:
    import torch

    width = len(predictor.classes) if predictor.output == "logits" else 1
    return outputs_table(torch.zeros((0, width)), predictor.output, predictor.classes)


def _locate(err: InputError, carried: pa.Table) -> str:
    """The error, the row at fault named by its other columns (an id, a path): a row number within a batch means
    nothing to the user. Without other columns, the number stays."""
    if err.row is None or not carried.num_columns:
        return str(err)
    values = ", ".join(f"{name}={carried.column(name)[err.row].as_py()!r}" for name in carried.column_names[:4])
    return re.sub(r"^row \d+", f"the row with {values}", str(err))


class Scorer:
    """A Ray Data actor: the model loaded once, in `__init__`, then batch after batch."""

    def __init__(self, model: str, tracking_uri: str, kind: str, gpus: int) -> None:
        from pipeline.registry import load_model

        self.predictor = load_model(model, tracking_uri=tracking_uri, device="cuda" if gpus else "cpu")
        self.kind = kind

    def __call__(self, batch: pa.Table) -> pa.Table:
        return score_batch(self.predictor, batch, self.kind)


# ---------------------------------------------------------------------------------------------------
# The engines: each yields scored batches in the data set's order


def _local_batches(data: DataSet, predictor: Predictor, plan: Plan) -> Iterator[pa.Table]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    if data.kind == "images":
        for start in range(0, len(data.paths), plan.batch_size):
            paths = list(data.paths[start : start + plan.batch_size])
            yield score_batch(predictor, pa.table({"bytes": [read_bytes(data, p) for p in paths], "path": paths}), "images")
        return
    for path in data.paths:
        with data.filesystem.open_input_file(path) as handle:
            for batch in _parquet_batches(pq.ParquetFile(handle), path, plan.batch_size):
                yield score_batch(predictor, pa.Table.from_batches([batch]), "table")


def _parquet_batches(parquet: pq.ParquetFile, path: str, batch_size: int) -> Iterator[pa.RecordBatch]:
    """A file's batches; a damaged page (which a footer cannot show) is an InputError naming the file."""
    import pyarrow as pa

    batches = parquet.iter_batches(batch_size=batch_size)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (OSError, pa.ArrowException) as err:
            raise InputError(
                f"{path}: damaged, it cannot be read to its end ({type(err).__name__}: {' '.join(str(err).split())})"
            ) from None
        yield batch


def _ray_batches(data: DataSet, model: str, uri: str, plan: Plan, options: ScoringOptions) -> Iterator[pa.Table]:
    import ray.data

    paths, filesystem = list(data.paths), data.filesystem
    if data.kind == "images":  # our decoder, not read_images: it converts modes and 16-bit images otherwise (images.py)
        source = ray.data.read_binary_files(paths, filesystem=filesystem, include_paths=True, num_cpus=plan.read_cpus)
    else:  # partitioning=None: the files' own columns only, as the local engine reads them (no hive columns from paths)
        source = ray.data.read_parquet(paths, filesystem=filesystem, partitioning=None, num_cpus=plan.read_cpus)
    source.context.target_max_block_size = BLOCK_BYTES  # this data set's own context, copied at its creation
    scored = source.map_batches(
        Scorer,
        fn_constructor_kwargs={"model": model, "tracking_uri": uri, "kind": data.kind, "gpus": plan.gpus},
        compute=ray.data.ActorPoolStrategy(size=plan.actors),
        batch_size=plan.batch_size,
        batch_format="pyarrow",
        num_cpus=plan.cpus,
        num_gpus=plan.gpus or None,
    )
    _configure(scored.context, options.verbose)
    try:
        yield from scored.iter_batches(batch_size=None, batch_format="pyarrow")
    except ray.exceptions.RayError as err:  # an actor's or a read task's error, with its remote traceback
        raise _unwrapped(err) from None


def _configure(context: Any, verbose: bool) -> None:
    """This data set's own DataContext (a copy: other Ray Data users in the process keep theirs)."""
    import logging

    context.execution_options.preserve_order = True  # the local engine's order: the same output from both
    context.enable_progress_bars = False  # ours shows rows/s; Ray Data's would draw beside it
    context.print_on_execution_start = verbose
    context.raise_original_map_exception = True  # our InputError, not UserCodeException: exit 2, the file named
    if not verbose:  # the error is said once, by us; Ray Data would log it with its stack first
        logging.getLogger("ray.data").setLevel(logging.CRITICAL)
        # "fewer input blocks than actors": a small data set's few blocks; nothing for the user to do
        warnings.filterwarnings("ignore", category=UserWarning, module=r"ray\.data\.")


def _unwrapped(err: Exception) -> Exception:
    """Ray's error as the local engine would raise it: a BadInput raised in an actor keeps its kind (exit 2), a file
    that Ray Data could not read after its retries is an InputError naming it (exit 2), anything else RunFailed (1)."""
    cause = getattr(err, "cause", None) or err
    # Ray Data appends what it retried and how to retry more, a paragraph each: the cause is what comes before.
    text, *notes = re.split(r"\n(?=Failed to (?:apply UDF transform|read fragment) )", str(cause))
    if isinstance(cause, BadInput):
        return type(cause)(text)
    message = " ".join(text.split())
    unreadable = re.match(r"Failed to read fragment (\S+) after", notes[0] if notes else "")
    if unreadable:
        return InputError(f"{unreadable.group(1)}: damaged, it cannot be read to its end ({type(cause).__name__}: {message})")
    return RunFailed(f"{type(cause).__name__}: {message}")


# ---------------------------------------------------------------------------------------------------
# The output: parts in a hidden sibling folder, renamed to OUT only when every row is written


class PartWriter:
    """part-00000.parquet, part-00001.parquet, ... in `.OUT.incomplete-<id>`; renamed to OUT on success, removed on
    any failure (an error, Ctrl-C, SIGTERM): OUT never exists half-written. Only SIGKILL leaves the hidden folder."""

    def __init__(self, out: Path, metadata: dict[str, str]) -> None:
        self.out, self.metadata = out, metadata
        self.folder = out.with_name(f".{out.name}.incomplete-{uuid.uuid4().hex[:8]}")
        self.rows = self.parts = 0
        self.pending: list[pa.Table] = []
        self.writer: pq.ParquetWriter | None = None
        self.part_rows = 0

    def __enter__(self) -> PartWriter:
        self.folder.mkdir()
        return self

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        try:
            if kind is None:
                self._flush()
                self._close()
                if self.out.exists():
                    raise InputError(f"--out {self.out}: appeared while scoring; the result is not put over it")
                self.folder.rename(self.out)
        finally:
            if self.writer is not None:
                self.writer.close()
            shutil.rmtree(self.folder, ignore_errors=True)  # gone already where it was renamed

    @property
    def written(self) -> int:
        return self.rows + sum(t.num_rows for t in self.pending)

    def write(self, table: pa.Table) -> None:
        if not table.num_rows:
            return
        if self.pending and not table.schema.equals(self.pending[0].schema, check_metadata=False):
            self._flush()  # another file's column types (int32 ids where the others had int64): a part of its own
        self.pending.append(table)
        if sum(t.num_rows for t in self.pending) >= ROW_GROUP_ROWS:
            self._flush()

    def _flush(self) -> None:
        import pyarrow as pa

        if not self.pending:
            return
        tables, self.pending = self.pending, []
        schema = tables[0].schema.with_metadata(self.metadata)  # ours only: the input's pandas metadata no longer fits
        if self.writer is not None and not self.writer.schema.equals(schema, check_metadata=False):
            self._close()
        table = pa.concat_tables(tables).replace_schema_metadata(self.metadata)
        if self.writer is None:
            self._open(schema)
        assert self.writer is not None
        self.writer.write_table(table, row_group_size=len(table))
        self.rows += len(table)
        self.part_rows += len(table)
        if self.part_rows >= PART_ROWS:
            self._close()

    def _open(self, schema: pa.Schema) -> None:
        import pyarrow.parquet as pq

        self.writer = pq.ParquetWriter(self.folder / f"part-{self.parts:05d}.parquet", schema)
        self.parts += 1
        self.part_rows = 0

    def _close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
