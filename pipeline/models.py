"""The model catalog: `model.name` -> an nn.Module from the PyTorch tutorials, or the user's own.

    model = build_model(cfg.model, input_shape=(1, 28, 28), num_outputs=10)

Each builder takes the model config, one sample's shape and the number of outputs, so that a model
config plus a dataset spec is all it takes to rebuild the network (a checkpoint stores both).
A user's module is named by import path, `model.name=my_pkg.nets:MyNet`, and built as
`MyNet(**model.kwargs)`.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from typing import TYPE_CHECKING

from torch import nn

from pipeline.config import ModelConfig

if TYPE_CHECKING:
    from pipeline.config import ExperimentConfig
    from pipeline.data.store import DatasetSpec

__all__ = ["MODELS", "build_model", "model_for", "num_outputs"]

Builder = Callable[[ModelConfig, tuple[int, ...], int], nn.Module]


def linear_regression(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    return nn.Linear(math.prod(input_shape), num_outputs)


def softmax_regression(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    return nn.Sequential(nn.Flatten(), nn.Linear(math.prod(input_shape), num_outputs))


def mlp(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """Flatten, then Linear-ReLU-Dropout per hidden width (784-256-128-10 for the MNIST tutorial)."""
    layers: list[nn.Module] = [nn.Flatten()]
    width = math.prod(input_shape)
    for hidden in cfg.hidden:
        layers += [nn.Linear(width, hidden), nn.ReLU()]
        if cfg.dropout:
            layers.append(nn.Dropout(cfg.dropout))
        width = hidden
    layers.append(nn.Linear(width, num_outputs))
    return nn.Sequential(*layers)


def lenet(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """LeNet-5 as in Dive into Deep Learning: padding 2 so that 28x28 inputs keep the classic sizes."""
    channels, height, width = input_shape
    flat = 16 * ((height // 2 - 4) // 2) * ((width // 2 - 4) // 2)
    return nn.Sequential(
        nn.Conv2d(channels, 6, kernel_size=5, padding=2), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(6, 16, kernel_size=5), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(flat, 120), nn.ReLU(),
        nn.Linear(120, 84), nn.ReLU(),
        nn.Linear(84, num_outputs),
    )  # fmt: skip


def cnn(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """The 2-conv CNN of the classic tutorial: 16 and 32 channels, 5x5 kernels, padding 2, batch norm."""
    channels, height, width = input_shape

    def block(c_in: int, c_out: int) -> nn.Sequential:
        conv = nn.Conv2d(c_in, c_out, kernel_size=5, padding=2)
        return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2))

    return nn.Sequential(block(channels, 16), block(16, 32), nn.Flatten(), nn.Linear(32 * (height // 4) * (width // 4), num_outputs))


def resnet18(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """torchvision's ResNet-18 with a new head; `freeze_backbone` trains only the head (fine-tuning)."""
    from torchvision.models import ResNet18_Weights
    from torchvision.models import resnet18 as tv_resnet18

    try:
        model = tv_resnet18(weights=ResNet18_Weights.DEFAULT if cfg.pretrained else None)
    except OSError as err:  # no network: torch.hub could not fetch the weights into its cache
        raise ValueError(
            f"model.pretrained: cannot fetch ResNet-18's ImageNet weights ({err}); without network, put "
            f"{ResNet18_Weights.DEFAULT.url.rsplit('/', 1)[1]} in $TORCH_HOME/hub/checkpoints/ "
            f"(default ~/.cache/torch) or set model.pretrained=false"
        ) from None
    if input_shape[0] != 3:
        model.conv1 = nn.Conv2d(input_shape[0], 64, kernel_size=7, stride=2, padding=3, bias=False)
    if cfg.freeze_backbone:
        for param in model.parameters():
            param.requires_grad = False
    model.fc = nn.Linear(model.fc.in_features, num_outputs)  # new head: always trainable
    return model


def circle_classifier(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    """The small 2-D binary classifier: 2 -> hidden -> 1 logit (BCE with logits)."""
    return mlp(cfg, input_shape, num_outputs)


MODELS: dict[str, Builder] = {
    "linear_regression": linear_regression,
    "softmax_regression": softmax_regression,
    "mlp": mlp,
    "lenet": lenet,
    "cnn": cnn,
    "resnet18": resnet18,
    "circle_classifier": circle_classifier,
}


def num_outputs(cfg: ExperimentConfig, spec: DatasetSpec) -> int:
    """One logit per class for cross-entropy; a single output for BCE (one logit) and regression."""
    return spec.num_classes if cfg.loss == "cross_entropy" else 1


def model_for(cfg: ExperimentConfig, spec: DatasetSpec) -> nn.Module:
    """The experiment's network, shaped for its dataset."""
    return build_model(cfg.model, spec.input_shape, num_outputs(cfg, spec))


# Catalog models built of 2-D convolutions: they take images, (channels, height, width), only.
IMAGE_MODELS = ("lenet", "cnn", "resnet18")


def build_model(cfg: ModelConfig, input_shape: tuple[int, ...], num_outputs: int) -> nn.Module:
    if cfg.name in IMAGE_MODELS and len(input_shape) != 3:
        vector_models = ", ".join(name for name in MODELS if name not in IMAGE_MODELS)
        raise ValueError(
            f"model.name: {cfg.name} takes images of shape (channels, height, width); this data set's samples have "
            f"shape {tuple(input_shape)}: use a model for feature vectors ({vector_models})"
        )
    if cfg.name in MODELS:
        return MODELS[cfg.name](cfg, tuple(input_shape), num_outputs)
    return _build_user_model(cfg)


def _build_user_model(cfg: ModelConfig) -> nn.Module:
    module_name, _, class_name = cfg.name.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as err:
        raise ValueError(f"model.name: cannot import {module_name!r} ({err}); is it on PYTHONPATH?") from None
    factory = getattr(module, class_name, None)
    if factory is None:
        raise ValueError(f"model.name: {module_name} has no {class_name!r}")
    try:
        model = factory(**cfg.kwargs)
    except TypeError as err:
        raise ValueError(f"model.kwargs: {cfg.name}(**{cfg.kwargs}) failed: {err}") from None
    if not isinstance(model, nn.Module):
        raise ValueError(f"model.name: {cfg.name} returned {type(model).__name__}, not a torch.nn.Module")
    return model
