"""Ray-distributed PyTorch training pipeline.

from pipeline import load_model
model = load_model("mnist_mlp@champion")   # nn.Module in eval mode: raw uint8 images in, logits out
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.serving import Predictor

__all__ = ["load_model"]


def load_model(ref: str, *, tracking_uri: str | None = None, device: str = "cpu") -> Predictor:
    """A registered model by NAME@ALIAS (or NAME/VERSION), from MLFLOW_TRACKING_URI or the local store."""
    from pipeline.registry import load_model as load_registered

    return load_registered(ref, tracking_uri=tracking_uri, device=device)
