"""What batch scoring reads: a data set found from what the user typed, and checked against the model before any work.

    data = find_data_set(["points/"])      # None for plain files (predict.py's path); else a DataSet
    rows = check_data_set(data, predictor)  # schema and first image only; InputError (exit 2) naming the file

A data set is a folder (searched at any depth), a glob (`data/*.parquet`, `photos/**/*.png`) or an
object-store URI (`s3://bucket/prefix/`, a glob too) of Parquet files or of image files (.png, .jpg,
.jpeg), never both. Paths are listed through pyarrow's filesystems, so a local folder and a bucket are
read by the same code, on the driver and on Ray Data alike. Names starting with "." or "_" are skipped, as
pyarrow and Spark skip them (`_SUCCESS`, `.crc` files, our own unfinished outputs).
"""

from __future__ import annotations

import fnmatch
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from pipeline.predict import IMAGE_SUFFIXES, read_image
from pipeline.serving import InputError

if TYPE_CHECKING:
    import pyarrow as pa

    from pipeline.serving import Predictor

__all__ = ["DataSet", "check_data_set", "find_data_set", "is_data_set"]

WILDCARDS = "*?["
FOOTER_THREADS = 8  # footers are small reads, each a round trip on an object store: read several at once


@dataclass(frozen=True)
class DataSet:
    """The files of one data set, sorted: what both engines read, in this order."""

    source: str  # as the user wrote it, for messages
    kind: Literal["table", "images"]
    filesystem: Any  # pyarrow.fs.FileSystem: local, S3, GCS, ...
    paths: tuple[str, ...]  # as that filesystem names them (absolute local paths; bucket/key)
    nbytes: int  # the files' sizes on storage: what --engine auto decides by


def is_data_set(text: str) -> bool:
    """A URI, a glob, or a folder; anything else is a file (predict.py's inputs)."""
    return "://" in text or any(c in text for c in WILDCARDS) or Path(text).is_dir()


def find_data_set(inputs: list[str]) -> DataSet | None:
    """The one data set among `inputs`, or None if they are all files (scored as today, in this process)."""
    sets = [text for text in inputs if is_data_set(text)]
    if not sets:
        return None
    if len(inputs) > 1:
        raise InputError(f"{sets[0]}: a data set (a folder, a glob or a URI) is scored alone; give one per command, "
                         f"or name files only")  # fmt: skip
    return _list(sets[0])


def _list(source: str) -> DataSet:
    filesystem, path = _filesystem(source)
    files = _matching(filesystem, path, source) if any(c in path for c in WILDCARDS) else _folder(filesystem, path, source)
    tables = {p: size for p, size in files.items() if p.lower().endswith(".parquet")}
    images = {p: size for p, size in files.items() if p.lower().endswith(IMAGE_SUFFIXES)}
    if tables and images:
        raise InputError(
            f"{source}: holds both Parquet files ({len(tables)}) and images ({len(images)}); give a folder or glob of one kind"
        )
    if not tables and not images:
        seen = ", ".join(sorted(Path(p).name for p in files)[:5]) or "nothing"
        raise InputError(f"{source}: no Parquet files and no images (.png, .jpg, .jpeg) there (found: {seen})")
    chosen = tables or images
    return DataSet(source, "table" if tables else "images", filesystem, tuple(sorted(chosen)), sum(chosen.values()))


def _filesystem(source: str) -> tuple[Any, str]:
    """pyarrow's filesystem for `source` and the path on it; local paths made absolute (pyarrow wants them so)."""
    from pyarrow import fs

    if "://" not in source:
        return fs.LocalFileSystem(), str(Path(source).expanduser().absolute())
    try:
        return fs.FileSystem.from_uri(source)
    except (ValueError, OSError) as err:  # an unknown scheme, a bucket without credentials or region
        raise InputError(f"{source}: not a location pyarrow can read ({err})") from None


def _folder(filesystem: Any, path: str, source: str) -> dict[str, int]:
    from pyarrow import fs

    info = filesystem.get_file_info(path)
    if info.type == fs.FileType.NotFound:
        raise InputError(f"{source}: no such folder")
    if info.type == fs.FileType.File:
        return {path: info.size}
    return _files_under(filesystem, path, source)


def _files_under(filesystem: Any, base: str, source: str) -> dict[str, int]:
    """Every file below `base`, at any depth, except hidden and underscore names: path -> size."""
    from pyarrow import fs

    try:
        found = filesystem.get_file_info(fs.FileSelector(base, recursive=True, allow_not_found=True))
    except OSError as err:  # no permission, no network, a bucket that does not exist
        raise InputError(f"{source}: cannot list it ({err})") from None
    prefix = base.rstrip("/") + "/"
    return {
        info.path: info.size
        for info in found
        if info.type == fs.FileType.File and not any(part.startswith((".", "_")) for part in info.path.removeprefix(prefix).split("/"))
    }


def _matching(filesystem: Any, pattern: str, source: str) -> dict[str, int]:
    """The files a glob matches: `*`, `?` and `[...]` within one path component, `**` across any number."""
    parts = pattern.split("/")
    fixed = next(i for i, part in enumerate(parts) if any(c in part for c in WILDCARDS))
    base = "/".join(parts[:fixed]) or "/"
    files = {path: size for path, size in _files_under(filesystem, base, source).items() if _glob_match(path.split("/"), parts)}
    if not files:
        raise InputError(f"{source}: matches no file")
    return files


def _glob_match(path: list[str], pattern: list[str]) -> bool:
    if not pattern:
        return not path
    if pattern[0] == "**":
        return any(_glob_match(path[i:], pattern[1:]) for i in range(len(path) + 1))
    return bool(path) and fnmatch.fnmatchcase(path[0], pattern[0]) and _glob_match(path[1:], pattern[1:])


# ---------------------------------------------------------------------------------------------------
# Checks before any work: the model fits the data set's kind, every file's columns, the first image


def check_data_set(data: DataSet, predictor: Predictor) -> int:
    """The data set's row count, once it is known to fit the model; an InputError naming the file otherwise."""
    if data.kind == "images":
        if predictor.feature_names:
            raise InputError(f"{data.source}: images, and this model takes a table: {predictor.describe_input()}; give Parquet files")
        read_image(data.paths[0], predictor, read_bytes(data, data.paths[0]))  # its size and channels, as every file will be read
        return len(data.paths)
    if not predictor.feature_names:
        raise InputError(f"{data.source}: Parquet files, and this model takes images: {predictor.describe_input()}; give an image folder")
    with ThreadPoolExecutor(FOOTER_THREADS) as pool:
        rows = list(pool.map(lambda path: _check_footer(data, path, predictor), data.paths))
    if not sum(rows):
        raise InputError(f"{data.source}: {len(rows)} Parquet file(s) and no rows in them")
    return sum(rows)


def _check_footer(data: DataSet, path: str, predictor: Predictor) -> int:
    """One Parquet file's row count, from its footer, once its feature columns are there and are numbers."""
    import pyarrow.parquet as pq

    try:
        with data.filesystem.open_input_file(path) as handle:
            metadata = pq.read_metadata(handle)
            schema = metadata.schema.to_arrow_schema()
    except (OSError, ValueError) as err:  # ArrowInvalid is a ValueError: not Parquet, a damaged footer
        raise InputError(f"{path}: not a Parquet file that can be read ({err})") from None
    features = predictor.feature_names
    missing = [name for name in features if schema.get_field_index(name) == -1]
    if missing:
        raise InputError(
            f"{path}: lacks the feature columns {missing} (it has {schema.names}); this model takes {predictor.describe_input()}"
        )
    repeated = [name for name in features if schema.names.count(name) > 1]
    if repeated:
        raise InputError(f"{path}: more than one column named {repeated}; keep one of each")
    wrong = {name: str(schema.field(name).type) for name in features if not _numbers(schema.field(name).type)}
    if wrong:
        raise InputError(f"{path}: the feature columns {list(wrong)} are not numbers (types {list(wrong.values())}); "
                         f"this model takes {predictor.describe_input()}")  # fmt: skip
    return int(metadata.num_rows)


def _numbers(kind: pa.DataType) -> bool:
    """Integers or floats, as training's tables and Predictor take them (not booleans, text or decimals)."""
    import pyarrow as pa

    return bool(pa.types.is_integer(kind) or pa.types.is_floating(kind))


def read_bytes(data: DataSet, path: str) -> bytes:
    """A file's bytes from the data set's filesystem; an InputError naming it if it went away or cannot be read."""
    try:
        with data.filesystem.open_input_file(path) as handle:
            return bytes(handle.read())
    except OSError as err:
        raise InputError(f"{path}: cannot be read ({err})") from None
