"""Training throughput: the project's loop against the PyTorch tutorial's own loop, same data, same process.

    .venv/bin/python -m bench.throughput            # the full run: a few minutes on 2 cores
    .venv/bin/python -m bench.throughput --quick    # a tenth of the samples: a smoke test
    .venv/bin/python -m bench.throughput --no-ray   # only the in-process contenders
    .venv/bin/python -m bench.throughput --repeats 1 --ratios-only   # as bench.run_all runs it

Run from the repository root. The data are MNIST-sized stand-ins (60,000 + 10,000 28x28 uint8 images
in the real IDX layout, pipeline/standin.py's writer), generated once into bench/.data and reused; the
pipeline's Parquet copy lands under bench/.data/parquet. Two models, each trained by:

  tutorial        torchvision's MNIST/FashionMNIST dataset (PIL + ToTensor + Normalize per sample) and
                  DataLoader(batch_size=64, shuffle=True, drop_last=True), the plain tutorial loop
  preloaded       the whole training set as one normalized float tensor; shuffled index batches
  pipeline        pipeline.loop.run_worker with a LocalSession: the project's loop in this process
  ... compiled    the same with train.compile=true (torch.compile of the model), 2 epochs: the 2nd is
                  timed, so the compilation itself (the 1st epoch's first steps) is not
  Ray ...         pipeline.train.run_training with scaling.num_workers=1 (1 or 2 CPUs per worker) and
                  num_workers=2 (global throughput), from the in-memory tensor (the fast path) and,
                  "streamed", from Ray Data shards of the same Parquet files (data.loader=stream)

Same model (pipeline.models.build_model from the conf), optimizer (pipeline.train.make_optimizer),
loss, batch 64 per worker, normalization stats and torch threads everywhere. The CNN runs without its
conf's augmentation (flip, rotation), in NCHW layout and with batch 64 instead of 100, so every contender does the
same work. Each contender is warmed up before its timed samples: a few steps for the in-process ones,
a first epoch for the Ray ones, which then train 3 more, the median of whose samples_per_sec is their figure
(it never includes startup or evaluation).
The in-process contenders run --repeats times, round-robin, before Ray starts (median and range
shown); the Ray ones once each, after. The pipeline rows are the loop's own samples_per_sec metric:
training steps only, not the Parquet read or the evaluation that run_worker also does.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from bench.common import DATA_ROOT, ensure_mnist_data, load_conf, markdown_table, ratio_line
from bench.plain import Batch, fresh_model, normalized, shuffled_batches, train_steps
from pipeline.checkpoints import LocalSession
from pipeline.checks import check_training
from pipeline.config import ExperimentConfig
from pipeline.data.store import DatasetSpec
from pipeline.loop import run_worker
from pipeline.train import run_training

if TYPE_CHECKING:
    from torchvision.datasets import MNIST

BATCH = 64
THREADS = 2


@dataclass(frozen=True)
class Case:
    """One model to benchmark: its conf, the overrides that make the comparison fair, its data."""

    label: str
    conf: str
    overrides: tuple[str, ...]
    torchvision_dataset: str
    samples: int  # timed training samples per contender (rounded down to whole batches)


@dataclass(frozen=True)
class Result:
    contender: str
    samples: int
    rates: tuple[float, ...]  # samples/s, one per measurement
    how: str

    @property
    def median(self) -> float:
        return statistics.median(self.rates)


def cases(mlp_samples: int, cnn_samples: int) -> list[Case]:
    no_augment = ("data.augment.hflip=false", "data.augment.rotation_degrees=0", "data.augment.crop_min_scale=1.0")
    # The plain loops here run NCHW: the conf's channels_last would compare layouts, not loops (bench.gpu does that).
    nchw = ("train.channels_last=false",)
    return [
        Case("MNIST MLP (conf/mnist_mlp.yaml)", "mnist_mlp", (), "MNIST", mlp_samples),
        Case(
            "2-conv CNN (conf/fashion_mnist_cnn.yaml, no augmentation)", "fashion_mnist_cnn", no_augment + nchw, "FashionMNIST", cnn_samples
        ),
    ]


def pipeline_conf(
    case: Case, samples: int, *, workers: int, cpus: int = 1, epochs: int = 1, storage: str = "runs", loader: str = "memory",
    compiled: bool = False,
) -> ExperimentConfig:  # fmt: skip
    """The case's conf on the bench data: one split of exactly `samples` training rows, batch 64."""
    return load_conf(case.conf, [
        *case.overrides,
        f"data.root={DATA_ROOT}",
        "data.download=false",
        f"data.batch_size={BATCH}",
        "data.val_fraction=0",  # all 60,000 rows train; the test split evaluates
        f"data.limit={samples}",
        f"train.epochs={epochs}",
        f"scaling.num_workers={workers}",
        f"scaling.runner={'ray' if workers else 'in_process'}",  # one worker would train in-process by default
        f"scaling.cpus_per_worker={cpus}",
        f"storage_path={storage}",
        f"data.loader={loader}",
        f"train.compile={str(compiled).lower()}",
    ])  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# The tutorial's loop, fed two ways


def time_plain_loop(cfg: ExperimentConfig, spec: DatasetSpec, batches: Iterator[Batch], steps: int, warmup: int) -> float:
    """Samples/s of the plain loop over `steps` batches, after `warmup` batches from the same stream."""
    model, optimizer, loss_fn = fresh_model(cfg, spec)
    train_steps(model, optimizer, loss_fn, batches, warmup)
    return steps * BATCH / train_steps(model, optimizer, loss_fn, batches, steps)


def torchvision_dataset(case: Case, spec: DatasetSpec) -> MNIST:  # MNIST or FashionMNIST (a subclass): .data, .targets
    from torchvision import datasets, transforms

    transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize(spec.mean, spec.std)])
    return getattr(datasets, case.torchvision_dataset)(str(DATA_ROOT), train=True, download=False, transform=transform)


def tutorial_batches(dataset: torch.utils.data.Dataset) -> Iterator[Batch]:
    """DataLoader as in the tutorials (per-sample transforms in this process), epoch after epoch."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=True, drop_last=True)
    while True:
        yield from loader


def preloaded_batches(images: torch.Tensor, labels: torch.Tensor, spec: DatasetSpec) -> Iterator[Batch]:
    """The whole training set normalized once into one float tensor; each epoch a new permutation."""
    return shuffled_batches(normalized(images.unsqueeze(1), spec), labels.long(), BATCH)


# ---------------------------------------------------------------------------------------------------
# The project's loop


def _ignore(event: dict) -> None:
    """run_training always passes an event sink; progress ticks cost one loss.item() every 0.5 s."""


def pipeline_in_process(cfg: ExperimentConfig, spec: DatasetSpec) -> float:
    """run_worker in this process, as `scaling.num_workers=0` runs it; its own samples_per_sec metric."""
    with tempfile.TemporaryDirectory() as run_dir:
        session = LocalSession(Path(run_dir), keep=1, metric=cfg.metric, mode=cfg.metric_mode, device=torch.device("cpu"))
        run_worker(cfg, spec, session, _ignore)
    assert session.last_metrics is not None
    return float(session.last_metrics["samples_per_sec"])


def pipeline_on_ray(cfg: ExperimentConfig) -> float:
    """run_training on Ray Train; the median of its epochs' samples_per_sec (global, across workers) after the
    first. One epoch's figure moved by up to 0.25x between epochs of one streamed run on 2 cores."""
    with tempfile.TemporaryDirectory() as storage:
        result = run_training(cfg.model_copy(update={"storage_path": storage}), fresh=True, track=False)
    return statistics.median(float(epoch["samples_per_sec"]) for epoch in result.history[1:])


# ---------------------------------------------------------------------------------------------------
# The benchmark

Contender = tuple[str, str, Callable[[], float]]  # name, how it feeds the loop, one measurement (samples/s)


def in_process_contenders(case: Case, warmup: int) -> tuple[int, list[Contender]]:
    """The four contenders that run in this process, each measurement warmed up; and the timed samples."""
    steps = case.samples // BATCH
    cfg = pipeline_conf(case, steps * BATCH, workers=0)
    compiled = pipeline_conf(case, steps * BATCH, workers=0, epochs=2, compiled=True)
    spec = check_training(cfg)  # writes the Parquet copy the first time
    dataset = torchvision_dataset(case, spec)
    pipeline_in_process(pipeline_conf(case, warmup * BATCH, workers=0), spec)  # one-time costs: first read, first steps
    return steps * BATCH, [
        ("tutorial", "torchvision dataset + DataLoader(shuffle=True), num_workers=0",
         lambda: time_plain_loop(cfg, spec, tutorial_batches(dataset), steps, warmup)),
        ("preloaded tensor", "one normalized float tensor, shuffled index batches",
         lambda: time_plain_loop(cfg, spec, preloaded_batches(dataset.data, dataset.targets, spec), steps, warmup)),
        ("pipeline in-process", "run_worker + LocalSession (scaling.num_workers=0)",
         lambda: pipeline_in_process(cfg, spec)),
        ("pipeline in-process, compiled", "the same, train.compile=true; the 2nd epoch (the 1st compiles)",
         lambda: pipeline_in_process(compiled, spec)),
    ]  # fmt: skip


RAY_EPOCHS = 4  # the first is the warm-up
RATIO_CONTENDERS = ("Ray 1 worker", "Ray 1 worker, streamed")  # --ratios-only: what the streamed / in-memory ratio needs


def ray_contenders(case: Case, ratios_only: bool = False) -> list[tuple[int, Contender]]:
    """The Ray contenders (each a whole run_training; its first epoch is the warm-up), with their samples.

    Ray gives a worker as many torch threads as it holds CPUs (OMP_NUM_THREADS), 1 by default.
    """
    one = case.samples // BATCH * BATCH
    two = case.samples // (2 * BATCH) * 2 * BATCH  # whole global batches of 2 x 64
    cores = os.cpu_count() or 1
    found: list[tuple[int, Contender]] = []
    for label, workers, cpus, samples, loader in (
        ("Ray 1 worker", 1, 1, one, "memory"),
        ("Ray 1 worker, 2 CPUs", 1, 2, one, "memory"),
        ("Ray 2 workers", 2, 1, two, "memory"),
        ("Ray 1 worker, streamed", 1, 1, one, "stream"),
        ("Ray 2 workers, streamed", 2, 1, two, "stream"),
    ):
        if ratios_only and label not in RATIO_CONTENDERS:
            continue
        if loader == "stream" and workers * cpus >= cores:
            print(f"  (skipped {label}: Ray Data's read tasks need a CPU beside the workers; this machine has {cores})")
            continue
        cfg = pipeline_conf(case, samples, workers=workers, cpus=cpus, epochs=RAY_EPOCHS, loader=loader)
        feed = "Ray Data shards (data.loader=stream)" if loader == "stream" else "in-memory tensor"
        how = f"run_training, median of epochs 2-{RAY_EPOCHS}, global batch {BATCH * workers}; {cpus} CPU (torch thread) per worker; {feed}"
        found.append((samples, (f"pipeline {label}", how, functools.partial(pipeline_on_ray, cfg))))
    return found


def measure(contenders: list[tuple[int, Contender]], repeats: int) -> list[Result]:
    """Every contender `repeats` times, round-robin, so that a noisy neighbour hits them all alike."""
    rates: list[list[float]] = [[] for _ in contenders]
    for _ in range(repeats):
        for (_, (name, _, run)), found in zip(contenders, rates, strict=True):
            found.append(run())
            print(f"  {name:<30} {found[-1]:>9,.0f} samples/s", flush=True)
    return [Result(name, samples, tuple(found), how) for (samples, (name, how, _)), found in zip(contenders, rates, strict=True)]


def results_table(results: list[Result]) -> str:
    by_name = {r.contender: r.median for r in results}
    tutorial, preloaded = by_name["tutorial"], by_name["preloaded tensor"]
    rows = [
        (r.contender, f"{r.samples:,}", len(r.rates), f"{r.median:,.0f}", f"{min(r.rates):,.0f}-{max(r.rates):,.0f}",
         f"{r.median / tutorial:.2f}x", f"{r.median / preloaded:.2f}x", r.how)
        for r in results
    ]  # fmt: skip
    headers = ["contender", "timed samples", "runs", "samples/s (median)", "min-max", "vs tutorial", "vs preloaded", "how"]
    return markdown_table(headers, rows)


def ratio_lines(label: str, results: list[Result]) -> list[str]:
    """The ratios the issues ask for, each within this run: in-process vs preloaded, streamed vs in memory,
    compiled vs eager."""
    by_name = {r.contender: r.median for r in results}
    pairs = [
        ("pipeline in-process", "preloaded tensor", ">= 1.0x"),
        ("pipeline Ray 1 worker, streamed", "pipeline Ray 1 worker", ">= 0.8x"),
        ("pipeline Ray 2 workers, streamed", "pipeline Ray 2 workers", ">= 0.8x"),
        ("pipeline in-process, compiled", "pipeline in-process", ""),
    ]
    model = label.split(" (")[0]
    return [ratio_line(f"{model}, {a} / {b}", by_name[a] / by_name[b], goal) for a, b, goal in pairs if a in by_name and b in by_name] + [
        ""
    ]


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mlp-samples", type=int, default=60_000, help="timed samples per contender, MLP (1 epoch)")
    parser.add_argument("--cnn-samples", type=int, default=12_800, help="timed samples per contender, CNN")
    parser.add_argument("--warmup-steps", type=int, default=20, help="untimed batches before each in-process measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per in-process contender (median shown)")
    parser.add_argument("--ray", action=argparse.BooleanOptionalAction, default=True, help="also time the Ray contenders")
    parser.add_argument("--quick", action="store_true", help="a tenth of the samples, one repeat: a smoke test")
    parser.add_argument("--ratios-only", action="store_true", help="of the Ray contenders, only the two that the streamed ratio compares")
    args = parser.parse_args(argv)
    if args.quick:
        args.mlp_samples, args.cnn_samples, args.warmup_steps, args.repeats = args.mlp_samples // 10, args.cnn_samples // 10, 5, 1
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    torch.set_num_threads(THREADS)
    ensure_mnist_data()
    results: dict[Case, list[Result]] = {}
    for case in cases(args.mlp_samples, args.cnn_samples):  # all in-process work first, before Ray starts
        print(f"{case.label}:", flush=True)
        samples, contenders = in_process_contenders(case, args.warmup_steps)
        results[case] = measure([(samples, c) for c in contenders], args.repeats)
    if args.ray:
        from pipeline.runtime import ensure_ray

        ensure_ray()  # as the CLI starts it: all of this machine's CPUs
        for case in results:
            print(f"{case.label}, on Ray:", flush=True)
            results[case] += measure(ray_contenders(case, args.ratios_only), repeats=1)
    report = [f"## Training throughput (batch {BATCH} per worker; torch.set_num_threads({THREADS}) in the driver)", ""]
    for case, found in results.items():
        report += [f"### {case.label}", "", results_table(found), "", *ratio_lines(case.label, found)]
    text = "\n".join(report)
    print("\n" + text)
    return text


if __name__ == "__main__":
    main()
