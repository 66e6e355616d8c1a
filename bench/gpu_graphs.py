"""CUDA graphs on a GPU: `train.compile_mode=reduce-overhead` against the plain eager loop, and where a
step's time goes (torch.profiler) with bf16 autocast off and on.

    python -m bench.gpu_graphs                  # on an NVIDIA GPU: a few minutes, most of it compilation
    python -m bench.gpu_graphs --quick          # 2 % of the data: a smoke test (on a CPU: no graphs there)
    python -m bench.gpu_graphs --only profile   # only the profiles

Cases as in bench.gpu, each at its conf's batch size, bf16 autocast and channels_last, with no
augmentation and random weights. Contenders, each measured on its second epoch (the first compiles):

  plain eager                 bench.plain's loop: the yardstick of the goal (>= 1.5x)
  plain, reduce-overhead      the same model under torch.compile(mode="reduce-overhead")
  ..., optimizer step too     and its optimizer's step compiled alike, so that it is a graph too
  plain, whole step captured  the whole step as one CUDA graph (torch.cuda.graph), replayed per batch: the
                              ceiling for graphs (on a GPU only)
  pipeline eager              run_worker in this process, train.compile=false
  pipeline, reduce-overhead   run_worker, train.compile=true train.compile_mode=reduce-overhead
  ..., optimizer not fused    the same with optim.fused=false: torch's default (foreach) optimizer step,
                              what the pipeline ran before optim.fused (the plain loops run it too)

The pipeline's two hold out a validation split (10 %) and evaluate it after each epoch, as a run does:
their validation losses, from one seed, must agree to float rounding (the graphs compute the same model).

The profiles: ResNet-18 trained whole with bf16 autocast off and on, the plain loop and the pipeline's
train_epoch (eager), PROFILED_STEPS steps after WARMUP_STEPS: per step, the wall time, the GPU's kernel
time, the kernels launched, and the kernels that take the most GPU time. Needs no Ray and no MLflow.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from bench.common import markdown_table
from bench.gpu import CASES, Case, Measurement, bench_conf, device_and_data, measure_pipeline, measure_plain, plain_loop, timed_epoch
from bench.plain import fresh_model, train_steps
from pipeline.batches import InMemory
from pipeline.checkpoints import LocalSession
from pipeline.checks import check_training
from pipeline.config import ExperimentConfig
from pipeline.data.store import DatasetSpec
from pipeline.loop import memory_format, preprocessor, train_epoch

GRAPHS = ("train.compile=true", "train.compile_mode=reduce-overhead")
NOT_FUSED = "optim.fused=false"
VALIDATION = "data.val_fraction=0.1"
WARMUP_STEPS, PROFILED_STEPS = 20, 40
TOP_KERNELS, TOP_OPS = 6, 12


def measure_captured(cfg: ExperimentConfig, spec: DatasetSpec, device: torch.device, steps: int) -> Measurement:
    """The plain loop's whole step (forward, loss, backward, optimizer step) captured once as one CUDA graph
    and replayed for every batch once it is copied into the graph's inputs: PyTorch's whole-network capture
    recipe (torch.cuda.graph), the least host work a step can take, so the ceiling for graphs on this model.
    One warm-up epoch of `steps` after the capture, then `steps` timed ones, as measure_plain."""
    model, optimizer, loss_fn, batches = plain_loop(cfg, spec, device)
    for group in optimizer.param_groups:
        group["capturable"] = True  # the step counts live on the GPU, where the graph updates them
    x, y = (t.clone() for t in next(batches))  # the graph's inputs: each batch is copied into them

    def step() -> None:  # autocast's weight cache would keep casts from the capture: off, as capture requires
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=cfg.train.amp, cache_enabled=False):
            loss = loss_fn(model(x), y)
        loss.backward()
        optimizer.step()

    started = time.perf_counter()
    side = torch.cuda.Stream()  # warm-up steps (cuDNN's choices, the optimizer's state) on a side stream
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    optimizer.zero_grad(set_to_none=True)  # the captured backward then writes the gradients, not adds to them
    with torch.cuda.graph(graph):
        step()

    def replay(n: int) -> float:
        begun = time.perf_counter()
        for _, (batch_x, batch_y) in zip(range(n), batches, strict=False):
            x.copy_(batch_x)
            y.copy_(batch_y)
            graph.replay()
        torch.cuda.synchronize()
        return time.perf_counter() - begun

    replay(steps)  # the warm-up epoch: the first epoch's time counts the capture too
    return timed_epoch(lambda: replay(steps), cfg, device, steps, first_epoch_s=time.perf_counter() - started)


def graph_rows(case: Case, root: Path, device: torch.device, repeats: int) -> list[tuple[object, ...]]:
    """The contenders on one case, `repeats` times each in alternating order (a drift of the host's
    speed over the run hits all alike); medians, and the ratios to the plain eager loop's."""
    eager_cfg = bench_conf(case, root)
    run_cfg, graphs_cfg, foreach_cfg = (bench_conf(case, root, extra=(*extra, VALIDATION)) for extra in ((), GRAPHS, (*GRAPHS, NOT_FUSED)))
    spec, run_spec = check_training(eager_cfg), check_training(run_cfg)
    steps = spec.rows["train"] // eager_cfg.data.batch_size
    contenders: list[tuple[str, Callable[[], Measurement]]] = [
        ("plain eager", lambda: measure_plain(eager_cfg, spec, device, steps)),
        ("plain, reduce-overhead", lambda: measure_plain(eager_cfg, spec, device, steps, "reduce-overhead")),
        ("..., optimizer step too", lambda: measure_plain(eager_cfg, spec, device, steps, "reduce-overhead", compile_step=True)),
        *([("plain, whole step captured", lambda: measure_captured(eager_cfg, spec, device, steps))] if device.type == "cuda" else []),
        ("pipeline eager", lambda: measure_pipeline(run_cfg, run_spec, device)),
        ("pipeline, reduce-overhead", lambda: measure_pipeline(graphs_cfg, run_spec, device)),
        ("..., optimizer not fused", lambda: measure_pipeline(foreach_cfg, run_spec, device)),
    ]
    measured: dict[str, list[Measurement]] = {label: [] for label, _ in contenders}
    for repeat in range(repeats):
        for label, measure in contenders if repeat % 2 == 0 else contenders[::-1]:
            torch.compiler.reset()  # each compiled contender compiles its own graphs (inductor's disk cache stays)
            measured[label].append(m := measure())
            print(f"  {label:<26} {m.samples_per_sec:>10,.0f}/s  first epoch {m.first_epoch_s:.1f} s", flush=True)
    baseline = statistics.median(m.samples_per_sec for m in measured["plain eager"])
    rows: list[tuple[object, ...]] = []
    for label, ms in measured.items():
        rates = [m.samples_per_sec for m in ms]
        rows.append((label, eager_cfg.data.batch_size, f"{statistics.median(rates):,.0f}", f"{min(rates):,.0f}-{max(rates):,.0f}",
                     f"{statistics.median(rates) / baseline:.2f}x", f"{statistics.median(m.busy_percent for m in ms):.0f}",
                     f"{max(m.peak_mib for m in ms):,.0f}", f"{ms[0].first_epoch_s:.1f}", f"{ms[0].val_loss:.6f}"))  # fmt: skip
    return rows


GRAPH_HEADERS = ["contender", "batch", "samples/s (epoch 2, median)", "range", "/ plain eager", "GPU busy %", "peak MiB",
                 "first epoch s (the first repeat)", "val_loss"]  # fmt: skip


# ---------------------------------------------------------------------------------------------------
# Profiles


@dataclass(frozen=True)
class StepProfile:
    unprofiled_ms: float  # wall time per step without the profiler, which slows the host's side
    wall_ms: float
    kernel_ms: float  # the GPU's kernel time per step (memcpy and memset included)
    kernels: float  # device activities launched per step
    top: list[tuple[str, float, float]]  # the kernels with the most GPU time: name, ms per step, calls per step
    host: list[tuple[str, float, float]]  # the operators with the most host time of their own, alike


def profiled(run_steps: Callable[[int], object], steps: int, device: torch.device) -> StepProfile:
    """`run_steps(steps)` under torch.profiler (CPU and CUDA), after WARMUP_STEPS unprofiled ones. On a CPU
    (a smoke test) there are no kernels to count."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    on_cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if on_cuda else (lambda: None)
    run_steps(WARMUP_STEPS)
    sync()
    started = time.perf_counter()
    run_steps(steps)
    sync()
    unprofiled = time.perf_counter() - started
    with profile(activities=[ProfilerActivity.CPU, *([ProfilerActivity.CUDA] if on_cuda else [])]) as prof:
        started = time.perf_counter()
        run_steps(steps)
        sync()
        wall = time.perf_counter() - started
    events = prof.key_averages()
    on_host = {e.key for e in events if e.device_type == DeviceType.CPU}
    # A record_function range (the optimizer's step) also shows on the GPU's timeline: not a kernel.
    on_gpu = [e for e in events if e.device_type == DeviceType.CUDA and e.key not in on_host]
    by_time = sorted(on_gpu, key=lambda e: e.self_device_time_total, reverse=True)[:TOP_KERNELS]
    by_host_time = sorted((e for e in events if e.device_type == DeviceType.CPU), key=lambda e: e.self_cpu_time_total, reverse=True)
    return StepProfile(
        unprofiled_ms=unprofiled * 1e3 / steps,
        wall_ms=wall * 1e3 / steps,
        kernel_ms=sum(e.self_device_time_total for e in on_gpu) / 1e3 / steps,
        kernels=sum(e.count for e in on_gpu) / steps,
        top=[(e.key[:70], e.self_device_time_total / 1e3 / steps, e.count / steps) for e in by_time],
        host=[(e.key[:70], e.self_cpu_time_total / 1e3 / steps, e.count / steps) for e in by_host_time[:TOP_OPS]],
    )


def profile_plain(cfg: ExperimentConfig, spec: DatasetSpec, device: torch.device) -> StepProfile:
    model, optimizer, loss_fn, batches = plain_loop(cfg, spec, device)
    amp = cfg.train.amp and device.type == "cuda"
    return profiled(lambda n: train_steps(model, optimizer, loss_fn, batches, n, amp=amp), PROFILED_STEPS, device)


def profile_pipeline(cfg: ExperimentConfig, spec: DatasetSpec, device: torch.device) -> StepProfile:
    """The pipeline's own train_epoch over its in-memory batches, as run_worker sets them up (eager)."""
    with tempfile.TemporaryDirectory() as run_dir:
        session = LocalSession(Path(run_dir), keep=1, metric=cfg.metric, mode=cfg.metric_mode, device=device)
        model, optimizer, loss_fn = fresh_model(cfg, spec, device, memory_format(cfg, spec))  # as run_worker makes them
        prep = preprocessor(cfg, spec, device)
        data = InMemory(cfg, spec, session)
        batches = itertools.chain.from_iterable(data.train_batches(epoch)[1] for epoch in itertools.count(1))

        def run_steps(n: int) -> object:
            return train_epoch(model, n, itertools.islice(batches, n), loss_fn, optimizer, prep, cfg, session, 1, None)

        return profiled(run_steps, PROFILED_STEPS, device)


def profile_report(root: Path, device: torch.device) -> list[str]:
    """ResNet-18 trained whole, bf16 autocast off and on: the plain loop's step against the pipeline's."""
    case = next(c for c in CASES if "whole" in c.label)
    lines = [f"### Where a step goes: {case.label}, {PROFILED_STEPS} profiled steps after {WARMUP_STEPS}", ""]
    summary: list[tuple[object, ...]] = []
    loops = (("plain", profile_plain), ("pipeline", profile_pipeline))
    for amp in (False, True):
        cfg = bench_conf(case, root, (amp, True))
        spec = check_training(cfg)
        for label, profile in loops if not amp else loops[::-1]:  # either loop first once: the host's drift shows
            p = profile(cfg, spec, device)
            print(f"  amp={amp!s:<5} {label:<8} {p.wall_ms:.2f} ms/step, kernels {p.kernel_ms:.2f} ms, {p.kernels:.0f} launched",
                  flush=True)  # fmt: skip
            summary.append(("on" if amp else "off", label, f"{p.unprofiled_ms:.2f}", f"{p.wall_ms:.2f}", f"{p.kernel_ms:.2f}",
                            f"{p.kernels:.0f}", f"{p.kernel_ms / p.wall_ms:.0%}"))  # fmt: skip
            for what, ranked in (
                ("the kernels with the most GPU time", p.top),
                ("the operators with the most host time of their own", p.host),
            ):
                lines += [f"bf16 {'on' if amp else 'off'}, {label}: {what}", "",
                          markdown_table(["name", "ms per step", "calls per step"],
                                         [(name, f"{ms:.3f}", f"{calls:.1f}") for name, ms, calls in ranked]), ""]  # fmt: skip
    headers = ["bf16 amp", "loop", "wall ms/step, no profiler", "wall ms/step, profiled", "GPU kernel ms/step", "kernels/step",
               "GPU busy (kernel / wall)"]  # fmt: skip
    return [*lines[:2], markdown_table(headers, summary), "", *lines[2:]]


# ---------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="2%% of the data: a smoke test")
    parser.add_argument("--only", choices=("graphs", "profile"), help="one of the two parts")
    parser.add_argument("--repeats", type=int, default=2, help="measurements per graph contender (median shown)")
    parser.add_argument("--cases", default="cnn,whole,frozen", help="the graph cases, by a word of their labels, in this order")
    parser.add_argument("--out", type=Path, help="also write the report (Markdown) here, after every part")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    device, root, name = device_and_data(args.quick)
    report = [f"## CUDA graphs and step profiles ({name}; torch {torch.__version__})", ""]

    def save() -> None:  # after every part: a run cut short keeps what it measured
        if args.out:
            args.out.write_text("\n".join(report))

    if args.only != "profile":
        for word in args.cases.split(","):
            case = next(c for c in CASES if word.strip().lower() in c.label.lower())
            print(f"{case.label}:", flush=True)
            report += [
                f"### {case.label}",
                "",
                markdown_table(GRAPH_HEADERS, graph_rows(case, root, device, 1 if args.quick else args.repeats)),
                "",
            ]
            save()
    if args.only != "graphs":
        report += profile_report(root, device)
        save()
    text = "\n".join(report)
    print("\n" + text)
    return text


if __name__ == "__main__":
    main()
