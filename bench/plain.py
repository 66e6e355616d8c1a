"""The plain PyTorch loop that the benchmarks hold the project's loop against.

What a PyTorch user writes: the model, the loss, zero_grad, backward, step (bf16 autocast if asked),
over batches cut by index from one normalized float tensor: the fastest feed a plain loop can have.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator

import torch
from torch import nn

from pipeline.config import ExperimentConfig
from pipeline.data.store import DatasetSpec
from pipeline.loop import LOSSES, make_optimizer
from pipeline.models import model_for

Batch = tuple[torch.Tensor, torch.Tensor]


CPU = torch.device("cpu")


def fresh_model(
    cfg: ExperimentConfig, spec: DatasetSpec, device: torch.device = CPU, layout: torch.memory_format = torch.contiguous_format
) -> tuple[nn.Module, torch.optim.Optimizer, nn.Module]:
    """The conf's model (seeded as the project seeds it), optimizer and loss, on `device` in `layout`."""
    torch.manual_seed(cfg.seed)
    model = model_for(cfg, spec).to(device).to(memory_format=layout)  # torch's stubs lack .to(device, memory_format=)
    return model, make_optimizer(cfg.optim, model.parameters()), LOSSES[cfg.loss]()


def train_steps(
    model: nn.Module, optimizer: torch.optim.Optimizer, loss_fn: nn.Module, batches: Iterator[Batch], steps: int, *, amp: bool = False,
    step: Callable[[], object] | None = None,
) -> float:  # fmt: skip
    """`steps` training steps; wall seconds until the device has finished them. `step`: what updates the
    parameters in place of `optimizer.step` (the same step compiled, say)."""
    update = step or optimizer.step
    model.train()
    device = next(model.parameters()).device
    started = time.perf_counter()
    for _, (x, y) in zip(range(steps), batches, strict=False):  # the first `steps` batches
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
            loss = loss_fn(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        update()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - started


def normalized(images: torch.Tensor, spec: DatasetSpec) -> torch.Tensor:
    """uint8 images (N, C, H, W) as one standardized float tensor, on their device."""
    mean, std = (torch.tensor(v, device=images.device).view(1, -1, 1, 1) for v in (spec.mean, spec.std))
    return (images.float() / 255.0 - mean) / std


def shuffled_batches(x: torch.Tensor, y: torch.Tensor, batch: int) -> Iterator[Batch]:
    """Batches by index, a new permutation each epoch, epoch after epoch."""
    while True:
        order = torch.randperm(len(y), device=y.device)
        for start in range(0, len(y) - batch + 1, batch):
            idx = order[start : start + batch]
            yield x[idx], y[idx]
