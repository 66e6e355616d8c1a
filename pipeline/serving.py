"""A trained model ready to use: preprocessing and network in one nn.Module, its outputs as a table.

    export_model(checkpoint_dir, folder)      # what the registry stores: weights, configs, preprocessing
    predictor = load_predictor(folder)        # an nn.Module in eval mode; raw inputs in, outputs out
    table = predictor.predict_table(images)   # uint8 images shaped like the dataset, or a feature table

Nothing here imports MLflow or Ray: the registry (registry.py), the MLflow pyfunc wrapper
(mlflow_model.py) and `pipeline predict` all build on these functions. Weights are loaded with
`weights_only=True`: an exported model holds tensors and JSON, never code to run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn

from pipeline.checkpoints import load_state
from pipeline.config import ExperimentConfig
from pipeline.data.store import DatasetSpec
from pipeline.data.transforms import Normalize
from pipeline.errors import BadInput
from pipeline.models import model_for

__all__ = ["InputError", "Predictor", "build_predictor", "export_model", "load_predictor"]

WEIGHTS_FILE = "weights.pt"
CONFIG_FILE = "model_config.json"
PREPROCESSING_FILE = "preprocessing.json"
EVAL_BATCH = 1024
FLOAT32_MAX = float(np.finfo(np.float32).max)  # the network computes in float32: a larger value would become inf


class InputError(BadInput):
    """Inputs a model cannot take; the message names the expected shape or columns."""

    def __init__(self, message: str, row: int | None = None) -> None:
        super().__init__(message)
        self.row = row  # the first row at fault, where it is one row: batch scoring names it by the row's other columns


def export_model(checkpoint_dir: Path, folder: Path) -> dict[str, Any]:
    """Write the model part of a training checkpoint (no optimizer state) and describe its inputs."""
    state = load_state(checkpoint_dir)
    cfg = ExperimentConfig.model_validate(state["experiment"])
    spec = DatasetSpec.from_json(state["dataset"])
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(state["model"], folder / WEIGHTS_FILE)
    model_config = {"experiment": state["experiment"], "dataset": state["dataset"], "epoch": state["epoch"]}
    (folder / CONFIG_FILE).write_text(json.dumps(model_config, indent=2))
    preprocessing = {
        "input_shape": list(spec.input_shape),
        "input_dtype": "uint8" if spec.is_image else "float32",
        "scale": "x / 255" if spec.is_image else "none",
        "normalize": cfg.data.normalize,
        "mean": list(spec.mean),
        "std": list(spec.std),
        "features": list(spec.feature_names) if not spec.is_image else [],
        "classes": list(spec.classes),
        "output": _output_kind(cfg.loss),
    }
    (folder / PREPROCESSING_FILE).write_text(json.dumps(preprocessing, indent=2))
    return preprocessing


def _output_kind(loss: str) -> str:
    return {"cross_entropy": "logits", "bce_with_logits": "logit"}.get(loss, "value")


class Predictor(nn.Module):
    """Raw inputs (uint8 images or features) -> the network's outputs, preprocessing included."""

    def __init__(self, net: nn.Module, cfg: ExperimentConfig, spec: DatasetSpec) -> None:
        super().__init__()
        self.preprocess = Normalize(spec, cfg.data.normalize)
        self.net = net
        self.input_shape = tuple(spec.input_shape)
        self.classes = tuple(spec.classes)
        self.feature_names = spec.feature_names if not spec.is_image else ()
        self.image_size = cfg.data.image_size  # (height, width) training resized its images to; None: not resized
        self.output = _output_kind(cfg.loss)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(self.preprocess(x))

    def as_batch(self, x: np.ndarray | pd.DataFrame) -> np.ndarray:
        """Inputs as an array of shape (N, *input_shape), or an InputError naming what is accepted."""
        if isinstance(x, pd.DataFrame):
            return self._table_to_array(x)
        try:
            x = np.asarray(x)
        except ValueError as err:  # nested lists of uneven lengths: no one array to check
            raise InputError(f"inputs that are not one array ({err}); this model takes {self.describe_input()}") from None
        return self._images(x) if not self.feature_names else self._features(x)

    def image_layouts(self) -> list[tuple[tuple[int, ...], str]]:
        """The shapes an image batch may come in (without N: one image), in the order they are tried."""
        c, h, w = self.input_shape
        layouts: list[tuple[tuple[int, ...], str]] = [((c, h, w), "NCHW"), ((h, w, c), "NHWC")]  # PyTorch's layout; NumPy's and PIL's
        return [*layouts, ((h, w), "NHW")] if c == 1 else layouts  # one channel: also without a channel axis

    def _images(self, x: np.ndarray) -> np.ndarray:
        if x.dtype != np.uint8:  # a float 0-255 or 0-1, a 16-bit image: no silent guess at the scale
            raise InputError(
                f"images of dtype {x.dtype}: this model takes {self.describe_input()}; convert 0-255 pixels with "
                f".astype(np.uint8) (0-1 floats: (x * 255).round().astype(np.uint8))"
            )
        for shape, layout in self.image_layouts():
            batch = x[None] if x.shape == shape else x if x.shape[1:] == shape else None
            if batch is None:
                continue
            if layout == "NHWC":
                return batch.transpose(0, 3, 1, 2)
            return batch[:, None] if layout == "NHW" else batch
        raise InputError(f"images of shape {x.shape}: this model takes {self.describe_input()}")

    def _features(self, x: np.ndarray) -> np.ndarray:
        batch = x[None] if x.shape == self.input_shape else x
        if batch.ndim != 2 or batch.shape[1:] != self.input_shape:
            raise InputError(f"inputs of shape {x.shape}: this model takes {self.describe_input()}")
        if not _real_numbers(batch.dtype):
            raise InputError(f"inputs of dtype {batch.dtype}: this model takes {self.describe_input()}")
        return _finite(batch)

    def describe_input(self) -> str:
        if self.feature_names:
            return (
                f"(N, {self.input_shape[0]}) finite numbers, or one row of {self.input_shape[0]}: columns {', '.join(self.feature_names)}"
            )
        channels, height, width = self.input_shape
        kind = {1: "grayscale", 3: "RGB"}.get(channels, f"{channels}-channel")
        shapes = " or ".join(f"(N, {', '.join(map(str, shape))})" for shape, _ in self.image_layouts())
        return f"uint8 images (0-255) of shape {shapes}, or one image without N: {kind} {width}x{height}"

    def _table_to_array(self, table: pd.DataFrame) -> np.ndarray:
        if not self.feature_names:
            raise InputError(f"a table of columns {list(table.columns)}: this model takes {self.describe_input()}")
        columns = list(table.columns)
        missing = [c for c in self.feature_names if c not in columns]
        if missing:
            raise InputError(f"the table lacks columns {missing}; this model takes {self.describe_input()}")
        repeated = [c for c in self.feature_names if columns.count(c) > 1]
        if repeated:  # which of the two is the feature? No guess: one of them would be fed as a third feature
            raise InputError(
                f"the table has more than one column named {repeated}; keep one of each. This model takes {self.describe_input()}"
            )
        features = table[list(self.feature_names)].infer_objects()  # object columns that hold numbers become numbers
        # A header-only CSV reads as empty text columns: nothing in them is wrong.
        not_numbers = {c: str(dtype) for c, dtype in features.dtypes.items() if len(features) and not _real_numbers(dtype)}
        if not_numbers:
            raise InputError(f"the table's feature columns {list(not_numbers)} are not numbers (dtypes {list(not_numbers.values())}); "
                             f"this model takes {self.describe_input()}")  # fmt: skip
        return _finite(features.to_numpy(dtype=np.float64, na_value=np.nan))  # float64: no overflow before the range check

    @torch.no_grad()
    def predict_table(self, x: np.ndarray | pd.DataFrame) -> pd.DataFrame:
        """Class index, label and probability per input (classifiers), or the predicted value."""
        # Arrays from images and Parquet can be read-only views; torch wants writable memory (copied only then).
        batch = torch.from_numpy(np.require(self.as_batch(x), requirements=("C", "W")))
        device = next(self.parameters()).device
        outputs = torch.cat([self(part.to(device)).float().cpu() for part in batch.split(EVAL_BATCH)])
        overflowed = ~torch.isfinite(outputs).flatten(1).all(dim=1)
        if overflowed.any():  # inputs far outside the training data's range: no answer rather than a NaN one
            row = int(overflowed.float().argmax())
            raise InputError(f"row {row}: the model's output is not finite for this input ({int(overflowed.sum())} rows); "
                             "inputs this far from the training data have no answer", row)  # fmt: skip
        return outputs_table(outputs, self.output, self.classes)


def _real_numbers(dtype: Any) -> bool:
    """Integers or floats, NumPy's or pandas' nullable ones; not bool, complex, text or objects (as training's tables)."""
    return pd.api.types.is_integer_dtype(dtype) or pd.api.types.is_float_dtype(dtype)


def _finite(features: np.ndarray) -> np.ndarray:
    """Features as float32, or an InputError naming the first row float32 cannot hold as finite numbers."""
    bad = ~np.isfinite(features).all(axis=1)
    if np.issubdtype(features.dtype, np.floating) and features.dtype.itemsize > 4:  # float64 and wider: may exceed float32
        bad |= (np.abs(features) > FLOAT32_MAX).any(axis=1)
    if bad.any():
        raise InputError(f"row {int(np.argmax(bad))} holds a NaN, an infinite value or one beyond float32's range "
                         f"(+-{FLOAT32_MAX:.4g}) ({int(bad.sum())} rows do): the model gives no answer for those", int(np.argmax(bad)))  # fmt: skip
    return features.astype(np.float32, copy=False)


def outputs_table(outputs: torch.Tensor, kind: str, classes: tuple[str, ...]) -> pd.DataFrame:
    if kind == "value":
        return pd.DataFrame({"value": outputs.view(len(outputs), -1)[:, 0].numpy()})
    if kind == "logit":  # one logit: the probability of class 1
        p1 = torch.sigmoid(outputs.view(-1))
        index = (p1 > 0.5).long()
        probability = torch.where(index == 1, p1, 1 - p1)
    else:
        probability, index = torch.softmax(outputs, dim=1).max(dim=1)
    return pd.DataFrame(
        {
            "class_index": index.numpy(),
            "label": [classes[i] if i < len(classes) else str(i) for i in index.tolist()],
            "probability": probability.numpy(),
        }
    )


def load_predictor(folder: Path, device: str | torch.device = "cpu") -> Predictor:
    """Rebuild an exported model: network from its config, weights (tensors only), preprocessing."""
    folder = Path(folder)
    model_config = json.loads((folder / CONFIG_FILE).read_text())
    cfg = ExperimentConfig.model_validate(model_config["experiment"])
    spec = DatasetSpec.from_json(model_config["dataset"])
    weights = torch.load(folder / WEIGHTS_FILE, map_location="cpu", weights_only=True)
    return build_predictor(cfg, spec, weights).to(device)


def build_predictor(cfg: ExperimentConfig, spec: DatasetSpec, weights: dict[str, torch.Tensor]) -> Predictor:
    """The trained network with its preprocessing, in eval mode."""
    # The weights are given: never fetch ImageNet weights (model.pretrained) only to overwrite them.
    net = model_for(cfg.model_copy(update={"model": cfg.model.model_copy(update={"pretrained": False})}), spec)
    net.load_state_dict(weights)
    return Predictor(net, cfg, spec).eval()
