"""Downstream use: a registered model on files, arrays or tables, with no training code.

    pipeline predict mnist_mlp@champion digit.png another.png
    pipeline predict circles_classifier@champion points.csv --out predictions.parquet

Inputs: PNG/JPEG images (one sample each), a .npy array (one sample or a batch), a CSV or Parquet
table (feature columns by name). The answer is one row per sample: the input it came from, then
class index, label and probability (classifiers) or the predicted value (regression).
"""

from __future__ import annotations

from pathlib import Path
from tokenize import TokenError

import numpy as np
import pandas as pd

from pipeline.serving import InputError, Predictor

__all__ = ["check_out", "predict_files", "read_image", "read_inputs", "write_table"]

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
TABLE_SUFFIXES = (".csv", ".parquet")
# How pandas and pyarrow report a damaged or foreign file: parser errors and ArrowInvalid (ValueError), ArrowIOError,
# and from damaged Parquet metadata KeyError ('pandas_type'), TypeError (an unknown dtype), ArrowNotImplementedError.
UNREADABLE_TABLE = (ValueError, OSError, LookupError, TypeError, NotImplementedError)


def predict_files(predictor: Predictor, paths: list[str]) -> pd.DataFrame:
    """One row per sample of every input file, in order."""
    frames = []
    for path in map(Path, paths):
        names, batch = read_inputs(path, predictor)
        table = predictor.predict_table(batch)
        table.insert(0, "input", names)
        frames.append(table)
    return pd.concat(frames, ignore_index=True)


def read_inputs(path: Path, predictor: Predictor) -> tuple[list[str], np.ndarray | pd.DataFrame]:
    """A file's samples, checked against what the model takes, and a name for each."""
    if not path.is_file():
        raise InputError(f"{path}: no such file")
    suffix = path.suffix.lower()
    if suffix in IMAGE_SUFFIXES:
        return [str(path)], read_image(path, predictor)
    if suffix == ".npy":
        batch = _checked(path, predictor, _read_array(path))
        return [f"{path}[{i}]" for i in range(len(batch))], batch
    if suffix in TABLE_SUFFIXES:
        table = _read_table(path)
        _checked(path, predictor, table)
        return [f"{path}:{row}" for row in range(len(table))], table
    raise InputError(f"{path}: unsupported input; give {', '.join((*IMAGE_SUFFIXES, '.npy', *TABLE_SUFFIXES))} files")


def _read_array(path: Path) -> np.ndarray:
    """A .npy file's array, or an InputError naming the file (empty, truncated, pickled objects, not NumPy's format)."""
    try:  # no pickle: an array file runs no code. Mapped first: a damaged header's huge shape is refused, not allocated
        return np.array(np.load(path, mmap_mode="r", allow_pickle=False))
    except (ValueError, OSError, EOFError, SyntaxError, TokenError) as err:  # the last two: NumPy parsing a damaged header
        raise InputError(f"{path}: not a NumPy array file that can be read ({type(err).__name__}: {err}); write it with np.save") from None


def _read_table(path: Path) -> pd.DataFrame:
    """A CSV or Parquet file as a table, or an InputError naming the file (empty, malformed, not Parquet)."""
    try:
        return pd.read_csv(path) if path.suffix.lower() == ".csv" else pd.read_parquet(path)
    except UNREADABLE_TABLE as err:
        raise InputError(f"{path}: not a table that can be read ({err}); give a CSV with a header row, or a Parquet file") from None


def read_image(path: Path | str, predictor: Predictor, data: bytes | None = None) -> np.ndarray:
    """An image file (or its bytes, `data`) as training read its images (images.py): the model's channels, resized
    only if training resized; (1, C, H, W), or an InputError naming the file and the shapes the model takes."""
    from pipeline.images import ImageError, decode_pixels, read_pixels

    channels, height, width = predictor.input_shape
    size = (height, width) if predictor.image_size else None
    try:
        pixels = read_pixels(Path(path), channels, size) if data is None else decode_pixels(data, channels, size, name=str(path))
    except ImageError as err:
        raise InputError(str(err)) from None
    return _checked(path, predictor, pixels)


def _checked(path: Path | str, predictor: Predictor, inputs: np.ndarray | pd.DataFrame) -> np.ndarray:
    try:
        return predictor.as_batch(inputs)
    except InputError as err:
        raise InputError(f"{path}: {err}") from None


def check_out(out: str | None) -> None:
    """Refuse an output name we cannot write before any work is done."""
    if out is not None and not out.lower().endswith(TABLE_SUFFIXES):
        raise InputError(f"--out {out}: give a .csv or .parquet file name, or leave it out for stdout")


def write_table(table: pd.DataFrame, out: str | None) -> None:
    """To --out as CSV or Parquet (by its suffix), or as aligned text on stdout."""
    if out is None:
        print(table.to_string(index=False))
    elif out.lower().endswith(".parquet"):
        table.to_parquet(out, index=False)
    else:
        table.to_csv(out, index=False)
