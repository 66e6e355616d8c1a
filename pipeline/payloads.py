"""The HTTP contract of a served model: a JSON request body in, the model's inputs out; predictions back as JSON.

    payload = parse_payload({"images": [png_base64]})   # model-independent checks: one known key, a list, base64
    batch = payload.to_batch(predictor)                 # the model's (N, ...) array, or an InputError naming the shapes
    rows = prediction_rows(predictor.predict_table(batch))   # [{"class_index": 3, "label": "3", "probability": 0.9}, ...]
    answers = answer_batch(predictor, [payload, ...])  # several requests, one forward pass: rows or an InputError each

Three request shapes, each a list with one item per input:
    {"instances": [...]}   nested lists, one input each (MLflow's and TF Serving's convention); a list of objects is records
    {"images": [...]}      base64 PNG/JPEG files (a data: URL too), read as `pipeline predict` reads image files
    {"records": [...]}     table rows {"column": value}, the feature columns by name

JSON has no uint8: an image model's `instances` are integers 0-255, taken as uint8 pixels (integer_pixels); floats
are refused, as the Predictor refuses them (is 1.0 white, or nearly black?). Nothing here imports Ray: the
Serve application (service.py) and the MLflow pyfunc (mlflow_model.py) both use it.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from pipeline.serving import InputError, Predictor

__all__ = ["KINDS", "Payload", "answer_batch", "integer_pixels", "parse_payload", "prediction_rows"]

KINDS = ("instances", "images", "records")
MAX_ITEMS = 10_000  # per request: a bound on what one request makes a replica hold (several MB of images)
EXAMPLE = '{"instances": [[...], ...]}, {"images": ["<base64 PNG>", ...]} or {"records": [{"column": value, ...}, ...]}'


@dataclass(frozen=True)
class Payload:
    """A request's inputs, checked for what does not depend on the model: which kind, how many, decodable."""

    kind: str  # one of KINDS
    items: list[Any]  # nested lists (instances), image file bytes (images) or dicts (records)

    def to_batch(self, predictor: Predictor) -> np.ndarray:
        """The inputs as `predictor` takes them, (N, *input_shape) with N = len(items); else an InputError."""
        if self.kind == "images":
            batch = _images(self.items, predictor)
        elif self.kind == "records":
            batch = predictor.as_batch(pd.DataFrame.from_records(self.items))
        else:
            batch = predictor.as_batch(_instances(self.items, predictor))
        if len(batch) != len(self.items):  # one image or one row without the outer list: no guess at which was meant
            raise InputError(
                f"{self.kind}: {len(self.items)} items read as {len(batch)} inputs; each item of {self.kind} is one input "
                f"(wrap a single one in a list). This model takes {predictor.describe_input()}"
            )
        return batch


def parse_payload(body: Any) -> Payload:
    """A decoded JSON body as a Payload, or an InputError saying which shapes are accepted."""
    if not isinstance(body, dict):
        raise InputError(f"the request body is JSON {type(body).__name__}, not an object; send {EXAMPLE}")
    kinds = [key for key in KINDS if key in body]
    if len(kinds) != 1 or len(body) != 1:
        raise InputError(f"the request has the keys {sorted(body)}; send exactly one of {', '.join(KINDS)}: {EXAMPLE}")
    kind, items = kinds[0], body[kinds[0]]
    if not isinstance(items, list) or not items:
        raise InputError(f"{kind}: a list of at least one input, not {type(items).__name__} {_short(items)}; send {EXAMPLE}")
    if len(items) > MAX_ITEMS:
        raise InputError(f"{kind}: {len(items)} inputs in one request; send at most {MAX_ITEMS} per request")
    if kind == "instances" and all(isinstance(item, dict) for item in items):
        kind = "records"  # MLflow's convention: a list of objects is a table's rows
    if kind == "records":
        _check_records(items)
    if kind == "images":
        items = [_decode_base64(item, f"images[{i}]") for i, item in enumerate(items)]
    return Payload(kind, items)


def _check_records(items: list[Any]) -> None:
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise InputError(f"records[{i}]: an object {{column: value}}, not {type(item).__name__} {_short(item)}")


def _decode_base64(item: Any, where: str) -> bytes:
    """A base64 string (or a data: URL, as browsers write them) as the file's bytes."""
    if not isinstance(item, str):
        raise InputError(f"{where}: a base64 string of a PNG or JPEG file, not {type(item).__name__} {_short(item)}")
    text = item.split(",", 1)[1] if item.startswith("data:") else item  # data:image/png;base64,<data>
    try:  # without line breaks: `base64` (GNU) wraps its output at 76 columns unless told -w0
        return base64.b64decode("".join(text.split()), validate=True)
    except (binascii.Error, ValueError):
        raise InputError(f"{where}: not base64 ({_short(item)}); send the image file's bytes base64-encoded") from None


def _images(files: list[bytes], predictor: Predictor) -> np.ndarray:
    """Image files as `pipeline predict` reads them: the model's channels, resized only if training resized."""
    from pipeline.images import ImageError, decode_pixels

    if predictor.feature_names:
        raise InputError(f"images: this model takes a table, {predictor.describe_input()}; send records or instances")
    channels, height, width = predictor.input_shape
    size = (height, width) if predictor.image_size else None
    try:
        pixels = [decode_pixels(data, channels, size, name=f"images[{i}]") for i, data in enumerate(files)]
    except ImageError as err:
        raise InputError(str(err)) from None
    shapes = {p.shape for p in pixels}
    if shapes != {predictor.input_shape}:
        wrong = next(i for i, p in enumerate(pixels) if p.shape != predictor.input_shape)
        raise InputError(f"images[{wrong}]: {pixels[wrong].shape[2]}x{pixels[wrong].shape[1]} pixels; this model takes "
                         f"{predictor.describe_input()}: resize the image to {width}x{height}")  # fmt: skip
    return predictor.as_batch(np.stack(pixels))


def _instances(items: list[Any], predictor: Predictor) -> np.ndarray:
    try:
        array = np.asarray(items)
    except ValueError as err:  # uneven nesting: no one array
        raise InputError(f"instances that are not one array ({err}); this model takes {predictor.describe_input()}") from None
    if predictor.feature_names:
        return array
    if array.dtype.kind == "f":  # the Predictor's advice (.astype(np.uint8)) is NumPy's; a JSON client sends integers
        raise InputError(f"instances of floating-point numbers: this model takes pixels as integers 0-255 (JSON has no "
                         f"uint8), {predictor.describe_input()}; scale 0-1 values to 0-255 and round them")  # fmt: skip
    return integer_pixels(array, predictor)


def integer_pixels(array: np.ndarray, predictor: Predictor) -> np.ndarray:
    """An image model's pixels from JSON: integers within 0-255 as uint8. JSON (and MLflow's server, which parses
    `instances` into int64 arrays) has no uint8; other dtypes are left for the Predictor to refuse, naming them."""
    if predictor.feature_names or array.dtype.kind not in "iu" or array.dtype == np.uint8:
        return array
    if array.size and (array.min() < 0 or array.max() > 255):
        raise InputError(f"pixel values from {array.min()} to {array.max()}: this model takes {predictor.describe_input()}")
    return array.astype(np.uint8)


def answer_batch(predictor: Predictor, payloads: list[Payload]) -> list[list[dict[str, Any]] | InputError]:
    """Each request's prediction rows, or the InputError that refuses it; the model runs once for all that fit.

    One request's bad input refuses that request only: the others of the batch are answered."""
    answers: list[Any] = []
    for payload in payloads:
        try:
            answers.append(payload.to_batch(predictor))
        except InputError as err:
            answers.append(err)
    arrays = [a for a in answers if isinstance(a, np.ndarray)]
    if not arrays:
        return answers
    try:
        rows = prediction_rows(predictor.predict_table(np.concatenate(arrays)))
    except InputError:  # an output that is not finite (an input far off the training data): find whose, answer the rest
        return [_answer_one(predictor, a) for a in answers]
    start = 0
    for i, answer in enumerate(answers):
        if isinstance(answer, np.ndarray):
            answers[i], start = rows[start : start + len(answer)], start + len(answer)
    return answers


def _answer_one(predictor: Predictor, answer: np.ndarray | InputError) -> list[dict[str, Any]] | InputError:
    if isinstance(answer, InputError):
        return answer
    try:
        return prediction_rows(predictor.predict_table(answer))
    except InputError as err:
        return err


def prediction_rows(table: pd.DataFrame) -> list[dict[str, Any]]:
    """predict_table's rows as JSON-ready dicts (Python ints, floats and strings)."""
    return [
        {key: value.item() if isinstance(value, np.generic) else value for key, value in row.items()} for row in table.to_dict("records")
    ]


def _short(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else f"{text[: limit - 3]}..."
