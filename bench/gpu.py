"""GPU throughput: the project's loop against a plain PyTorch loop on the same GPU, in the same process.

    python -m bench.gpu                    # on a machine with an NVIDIA GPU; a few minutes
    python -m bench.gpu --ray              # also run_training on a Ray Train GPU worker against in-process
    python -m bench.gpu --quick            # a smoke test with a fraction of the data (runs on a CPU too)

Run from the repository root. Needs torch, torchvision, pyarrow and pydantic; Ray only for --ray,
MLflow never (nothing is tracked). The data are stand-ins in the real formats, generated once into
bench/.data: CIFAR-10 (50,000 + 10,000 3x32x32 uint8, python pickles) and FashionMNIST (60,000 +
10,000 28x28, IDX). Cases:

  ResNet-18, frozen backbone   conf/cifar10_resnet18.yaml as it is (fine-tuning: only the head learns)
  ResNet-18, whole network     the same with model.freeze_backbone=false: every layer's backward runs
  2-conv CNN                   conf/fashion_mnist_cnn.yaml

Each with bf16 autocast (train.amp) and channels_last (train.channels_last) off and on, its conf's
batch size, no augmentation (the plain loop has none) and random weights (no download). Contenders:

  plain      the training set normalized once into one float tensor on the GPU; shuffled index
             batches; model(x), loss, zero_grad, backward, step: the loop a PyTorch user writes
  pipeline   pipeline.loop.run_worker with a LocalSession on the GPU, as `pipeline train` runs one
             worker in-process: uint8 data on the GPU, normalized per batch; its samples_per_sec
             metric of the second epoch (training steps only; the first epoch is the warm-up)

The plain loop runs the same number of steps after the same warm-up. GPU busy is NVML's utilization
(the share of time a kernel ran), sampled every 50 ms over the timed epoch; for the pipeline that
window also holds the epoch's evaluation. --ray adds, per case (amp and channels_last as its conf
has them): `run_training` with scaling.runner=in_process against a Ray Train worker with one GPU,
second-epoch samples/s and the whole call's wall time.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import DATA_ROOT, load_conf, markdown_table
from bench.plain import Batch, fresh_model, normalized, shuffled_batches, train_steps
from pipeline.checkpoints import LocalSession
from pipeline.checks import check_training
from pipeline.config import ExperimentConfig
from pipeline.data.store import DatasetSpec
from pipeline.loop import memory_format, run_worker

NO_AUGMENT = ("data.augment.hflip=false", "data.augment.rotation_degrees=0", "data.augment.crop_min_scale=1.0")
CIFAR_TRAIN, CIFAR_TEST = 50_000, 10_000
FASHION_TRAIN, FASHION_TEST = 60_000, 10_000


@dataclass(frozen=True)
class Case:
    label: str
    conf: str
    overrides: tuple[str, ...]


CASES = (
    Case("ResNet-18, frozen backbone (CIFAR-10 shape)", "cifar10_resnet18", ("model.pretrained=false",)),
    Case("ResNet-18, whole network (CIFAR-10 shape)", "cifar10_resnet18", ("model.pretrained=false", "model.freeze_backbone=false")),
    Case("2-conv CNN (FashionMNIST shape)", "fashion_mnist_cnn", ()),
)
VARIANTS = ((False, False), (True, False), (False, True), (True, True))  # (amp, channels_last)


def ensure_data(scale: float) -> Path:
    """CIFAR-10 and FashionMNIST stand-ins at `scale` x their real sizes, written once per size."""
    from pipeline.standin import write_cifar10, write_mnist_like

    root = DATA_ROOT / f"gpu-x{scale}"
    if not (root / "complete").exists():
        write_cifar10(root, per_batch=int(CIFAR_TRAIN * scale) // 5, n_test=int(CIFAR_TEST * scale))
        write_mnist_like(root, "FashionMNIST", n_train=int(FASHION_TRAIN * scale), n_test=int(FASHION_TEST * scale), seed=10)
        (root / "complete").touch()
    return root


def bench_conf(case: Case, root: Path, layout: tuple[bool, bool] | None = None, *, extra: tuple[str, ...] = ()) -> ExperimentConfig:
    """The case's conf on the bench data for 2 epochs; `layout` (amp, channels_last) overrides the conf's."""
    chosen = [f"train.amp={str(layout[0]).lower()}", f"train.channels_last={str(layout[1]).lower()}"] if layout else []
    return load_conf(case.conf, [
        *case.overrides, *NO_AUGMENT, *chosen,
        f"data.root={root}", "data.download=false", "data.val_fraction=0",  # every row trains; test evaluates
        "train.epochs=2", "scaling.num_workers=1", *extra,
    ])  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# GPU utilization


class BusySampler:
    """NVML's GPU utilization, sampled in a thread between start() and stop()."""

    def __init__(self, interval_s: float = 0.05) -> None:
        self.interval_s = interval_s
        self.samples: list[int] = []  # percent busy, one per sample
        self._running = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if not torch.cuda.is_available() or self._thread:
            return
        self._running.set()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._running.clear()
        if self._thread:
            self._thread.join()

    def _sample(self) -> None:
        while self._running.is_set():
            self.samples.append(torch.cuda.utilization())
            time.sleep(self.interval_s)

    @property
    def mean(self) -> float:
        return statistics.mean(self.samples) if self.samples else float("nan")


# ---------------------------------------------------------------------------------------------------
# The contenders


@dataclass(frozen=True)
class Measurement:
    samples_per_sec: float
    busy_percent: float
    peak_mib: float
    first_epoch_s: float  # the warm-up epoch's wall time: torch.compile's compilation shows here
    val_loss: float = float("nan")  # the pipeline's, where its conf holds out a validation split


def measure_plain(
    cfg: ExperimentConfig, spec: DatasetSpec, device: torch.device, steps: int, compile_mode: str | None = None,
    *, compile_step: bool = False,
) -> Measurement:  # fmt: skip
    """The plain loop: one warm-up epoch of `steps`, then `steps` timed ones; `compile_mode`: the model
    under torch.compile(mode=compile_mode), as a PyTorch user would compile it; `compile_step`: the
    optimizer's step compiled alike (PyTorch's compiled-optimizer recipe), so that under reduce-overhead
    it is replayed as a CUDA graph too."""
    model, optimizer, loss_fn, batches = plain_loop(cfg, spec, device)
    if compile_mode:
        model = torch.compile(model, mode=compile_mode)  # type: ignore[assignment]
    step = compiled_step(optimizer, compile_mode or "default") if compile_step else None
    amp = cfg.train.amp and device.type == "cuda"
    first_epoch_s = train_steps(model, optimizer, loss_fn, batches, steps, amp=amp, step=step)  # warm-up
    return timed_epoch(
        lambda: train_steps(model, optimizer, loss_fn, batches, steps, amp=amp, step=step), cfg, device, steps, first_epoch_s
    )


def timed_epoch(run: Callable[[], float], cfg: ExperimentConfig, device: torch.device, steps: int, first_epoch_s: float) -> Measurement:
    """`run()`, `steps` steps returning their wall seconds, measured: samples/s, the GPU's busy share while it
    ran, and its peak memory counted from its start."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    busy = BusySampler()
    busy.start()
    elapsed = run()
    busy.stop()
    return Measurement(steps * cfg.data.batch_size / elapsed, busy.mean, peak_mib(device), first_epoch_s)


def compiled_step(optimizer: torch.optim.Optimizer, mode: str) -> Callable[[], None]:
    """`optimizer.step` under torch.compile(mode=mode). Its learning rate stays a float: dynamo guards on
    it, which would recompile at a change, and the plain loop never changes it."""

    @torch.compile(mode=mode)
    def step() -> None:
        optimizer.step()

    return step


def plain_loop(
    cfg: ExperimentConfig, spec: DatasetSpec, device: torch.device
) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.nn.Module, Iterator[Batch]]:
    """The plain loop's model, optimizer, loss and batches: the training set normalized once on the device."""
    x, y = training_set(cfg, spec, device)
    layout = memory_format(cfg, spec)
    model, optimizer, loss_fn = fresh_model(cfg, spec, device, layout)
    return model, optimizer, loss_fn, shuffled_batches(normalized(x, spec).contiguous(memory_format=layout), y, cfg.data.batch_size)


def training_set(cfg: ExperimentConfig, spec: DatasetSpec, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """The Parquet copy's training rows (uint8 images) and labels, on the device."""
    from pipeline.data.store import load_split_rows

    train = load_split_rows(spec, cfg.data, cfg.seed)["train"]
    return torch.from_numpy(train.x.copy()).to(device), torch.from_numpy(train.y.copy()).long().to(device)


def measure_pipeline(cfg: ExperimentConfig, spec: DatasetSpec, device: torch.device) -> Measurement:
    """run_worker for 2 epochs; GPU busy sampled from the first epoch's report to the second's."""
    busy = BusySampler()
    started, first_epoch_s = time.perf_counter(), float("nan")

    def on_event(event: dict) -> None:  # progress ticks cost one loss.item() every 0.5 s, as in `pipeline train`
        nonlocal first_epoch_s
        if event.get("event") == "epoch":
            (busy.start if event["metrics"]["epoch"] == 1 else busy.stop)()
            if event["metrics"]["epoch"] == 1:
                first_epoch_s = time.perf_counter() - started  # with the model's setup and the data's copy
                if device.type == "cuda":
                    torch.cuda.reset_peak_memory_stats()

    with tempfile.TemporaryDirectory() as run_dir:
        session = LocalSession(Path(run_dir), keep=1, metric=cfg.metric, mode=cfg.metric_mode, device=device)
        run_worker(cfg, spec, session, on_event)
    busy.stop()
    assert session.last_metrics is not None
    metrics = session.last_metrics
    return Measurement(float(metrics["samples_per_sec"]), busy.mean, peak_mib(device), first_epoch_s, metrics.get("val_loss", float("nan")))


def peak_mib(device: torch.device) -> float:
    return torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")


# ---------------------------------------------------------------------------------------------------
# The tables


def loop_rows(case: Case, root: Path, device: torch.device, repeats: int) -> list[tuple[object, ...]]:
    """One row per (amp, channels_last): both contenders, `repeats` times, medians."""
    rows: list[tuple[object, ...]] = []
    for amp, channels_last in VARIANTS:
        cfg = bench_conf(case, root, (amp, channels_last))
        spec = check_training(cfg)  # writes the Parquet copy the first time
        steps = spec.rows["train"] // cfg.data.batch_size
        plain, pipe = [], []
        for repeat in range(repeats):
            plain_first = repeat % 2 == 0  # alternating: a drift over the run (clocks, a neighbour) hits both alike
            if plain_first:
                plain.append(measure_plain(cfg, spec, device, steps))
            pipe.append(measure_pipeline(cfg, spec, device))
            if not plain_first:
                plain.append(measure_plain(cfg, spec, device, steps))
            print(f"  amp={amp!s:<5} channels_last={channels_last!s:<5} plain {plain[-1].samples_per_sec:>9,.0f}/s "
                  f"pipeline {pipe[-1].samples_per_sec:>9,.0f}/s", flush=True)  # fmt: skip
        p, q = (statistics.median(m.samples_per_sec for m in ms) for ms in (plain, pipe))
        rows.append((
            "on" if amp else "off", "on" if channels_last else "off", cfg.data.batch_size, f"{p:,.0f}", f"{q:,.0f}", f"{q / p:.2f}x",
            f"{statistics.median(m.busy_percent for m in plain):.0f}", f"{statistics.median(m.busy_percent for m in pipe):.0f}",
            f"{max(m.peak_mib for m in plain):,.0f}", f"{max(m.peak_mib for m in pipe):,.0f}",
        ))  # fmt: skip
    return rows


LOOP_HEADERS = ["bf16 amp", "channels_last", "batch", "plain samples/s", "pipeline samples/s", "pipeline / plain",
                "plain GPU busy %", "pipeline GPU busy %", "plain peak MiB", "pipeline peak MiB"]  # fmt: skip


def ray_rows(case: Case, root: Path) -> list[tuple[object, ...]]:
    """run_training in-process against on a Ray Train worker with one GPU: samples/s of epoch 2, wall time."""
    from pipeline.runtime import ensure_ray
    from pipeline.train import run_training

    ensure_ray()
    rows: list[tuple[object, ...]] = []
    for runner in ("in_process", "ray"):
        with tempfile.TemporaryDirectory() as storage:
            cfg = bench_conf(case, root, extra=(f"scaling.runner={runner}", f"storage_path={storage}"))
            started = time.perf_counter()
            result = run_training(cfg, fresh=True, track=False)
            wall = time.perf_counter() - started
        rate = float(result.metrics["samples_per_sec"])
        print(f"  {runner:<10} {rate:>9,.0f} samples/s, {wall:.1f} s", flush=True)
        rows.append((runner, f"{rate:,.0f}", f"{wall:.1f}"))
    return rows


def device_and_data(quick: bool) -> tuple[torch.device, Path, str]:
    """The GPU (else the CPU: a smoke test), the bench data at full size (2 % if `quick`), and the device's name."""
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    name = torch.cuda.get_device_name(0) if device.type == "cuda" else "no GPU: CPU"
    return device, ensure_data(0.02 if quick else 1.0), name


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="measurements per contender and variant (median shown)")
    parser.add_argument("--ray", action="store_true", help="also compare a Ray Train GPU worker with in-process training")
    parser.add_argument("--only-ray", action="store_true", help="only the Ray comparison")
    parser.add_argument("--quick", action="store_true", help="2%% of the data, one repeat: a smoke test")
    parser.add_argument("--batch", type=int, help="one batch size for every case instead of each conf's")
    parser.add_argument("--cases", default="", help="only the cases whose label contains one of these, comma-separated")
    parser.add_argument("--out", type=Path, help="also write the report (Markdown) here")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    device, root, name = device_and_data(args.quick)
    report = [f"## GPU throughput ({name}; torch {torch.__version__})", ""]
    wanted = [c for c in CASES if not args.cases or any(w.strip().lower() in c.label.lower() for w in args.cases.split(","))]
    batch = (f"data.batch_size={args.batch}",) if args.batch else ()
    for case in (Case(c.label, c.conf, c.overrides + batch) for c in wanted):
        print(f"{case.label}:", flush=True)
        if not args.only_ray:
            rows = loop_rows(case, root, device, 1 if args.quick else args.repeats)
            report += [f"### {case.label}", "", markdown_table(LOOP_HEADERS, rows), ""]
        if args.ray or args.only_ray:
            report += [f"### {case.label}: Ray Train GPU worker against in-process (amp and channels_last as in its conf)", "",
                       markdown_table(["runner", "samples/s (epoch 2)", "wall s (whole run_training)"], ray_rows(case, root)), ""]  # fmt: skip
        if args.out:
            args.out.write_text("\n".join(report))  # after every case: a run cut short keeps what it measured
    text = "\n".join(report)
    print("\n" + text)
    return text


if __name__ == "__main__":
    main()
