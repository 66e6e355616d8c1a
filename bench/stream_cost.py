"""What streaming's gap is made of: in-memory training on one Ray worker, alone and beside a streamed epoch's read.

    .venv/bin/python -m bench.stream_cost              # 3 rounds: about 4 minutes on 2 cores
    .venv/bin/python -m bench.stream_cost --rounds 1   # about 2 minutes

On 2 cores the streamed MNIST MLP has trained at 0.76x to 1.00x the in-memory path, while a streamed worker
that trains from blocks it already holds trains as fast as in memory (docs/BENCHMARKS.md): the gap is what runs
beside the training while an epoch is read. This separates its two parts: the reading of the bytes (Parquet
decoding, the reader's copies) and Ray Data's own work around it (its executor, tasks and their scheduling).

bench.throughput's MNIST MLP case (59,968 rows, batch 64, 1 Ray worker of 1 CPU, 6 epochs, the median
samples/s of epochs 2-6) trains from the in-memory tensor three ways, round-robin:

  alone       nothing beside it
  Ray Data    the driver reads the training split through the Ray Data dataset that a streamed run's workers
              read (data/store.py's streaming_datasets), one epoch every PACE_S seconds, as a streamed run reads
  pyarrow     a subprocess reads the same row groups with the same batch function (data/store.py's
              group_reader), without Ray, at the same pace

Then each reader alone in this process (Ray Data's tasks and actors in theirs), 10 epochs back to back: its wall
time and the machine's CPU seconds per epoch (every process, from /proc/stat, less what the idle Ray takes).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from bench.common import ensure_mnist_data, markdown_table, median, ratio_line
from bench.throughput import BATCH, cases, pipeline_conf, pipeline_on_ray
from pipeline.checks import check_training
from pipeline.config import ExperimentConfig
from pipeline.data.store import DatasetSpec, group_reader, streaming_datasets

PACE_S = 1.8  # one epoch's read every so often: about a streamed MLP epoch on 2 cores
EPOCHS = 6
READ_EPOCHS = 10
WAYS = ("alone", "Ray Data", "pyarrow")


def read_with_pyarrow(path: str, pace: float, epochs: int = 0) -> None:
    """The training split's row groups in a new order each epoch, through the batch function that the streaming
    dataset maps, an epoch every `pace` seconds, `epochs` times (0: until killed)."""
    read = group_reader(path, np.array([], dtype=np.int64), keep=False)
    groups = pq.ParquetFile(path).metadata.num_row_groups
    epoch = 0
    while not epochs or epoch < epochs:
        started = time.perf_counter()
        for group in np.random.default_rng(epoch).permutation(groups):
            read({"id": np.array([group])})
        epoch += 1
        time.sleep(max(0.0, pace - (time.perf_counter() - started)))


def busy_cpu_s() -> float:
    """CPU seconds every process of the machine has used so far (user, system and the rest, not idle or I/O wait)."""
    ticks = [int(field) for field in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return (sum(ticks) - ticks[3] - ticks[4]) / 100


def read_with_ray_data(dataset: Any, pace: float, epochs: int = 0, stop: threading.Event | None = None) -> None:
    """The training split's epochs through its Ray Data dataset, an epoch every `pace` seconds, `epochs` times
    (0: until `stop` is set)."""
    epoch = 0
    while (not epochs or epoch < epochs) and not (stop and stop.is_set()):
        started = time.perf_counter()
        for _ in dataset.iter_batches(batch_size=None, batch_format="numpy"):
            pass
        epoch += 1
        (stop.wait if stop else time.sleep)(max(0.0, pace - (time.perf_counter() - started)))


def pyarrow_reader(spec: DatasetSpec, pace: float) -> subprocess.Popen[bytes]:
    """read_with_pyarrow in a process of its own, as Ray Data's read tasks are, until killed."""
    run = "import sys; from bench.stream_cost import read_with_pyarrow; read_with_pyarrow(sys.argv[1], float(sys.argv[2]))"
    return subprocess.Popen([sys.executable, "-c", run, f"{spec.directory}/train.parquet", str(pace)])


@contextmanager
def reading_beside(way: str, spec: DatasetSpec, cfg: ExperimentConfig) -> Iterator[None]:
    """While the block runs, an epoch is read every PACE_S seconds the given way ("alone": nothing is)."""
    stop, thread, process = threading.Event(), None, None
    if way == "Ray Data":
        dataset = streaming_datasets(spec, cfg.data, cfg.seed)["train"]
        thread = threading.Thread(target=read_with_ray_data, args=(dataset, PACE_S, 0, stop), daemon=True)
        thread.start()
    elif way == "pyarrow":
        process = pyarrow_reader(spec, PACE_S)
    try:
        yield
    finally:
        stop.set()
        if thread:
            thread.join()
        if process:
            process.kill()
            process.wait()


def read_cost(read_epochs: Callable[[], None], idle_cpu_per_s: float) -> tuple[float, float]:
    """Wall seconds and the machine's CPU seconds per epoch of READ_EPOCHS epochs read back to back."""
    cpu, started = busy_cpu_s(), time.perf_counter()
    read_epochs()
    wall = time.perf_counter() - started
    return wall / READ_EPOCHS, (busy_cpu_s() - cpu - idle_cpu_per_s * wall) / READ_EPOCHS


def readers_alone(spec: DatasetSpec, cfg: ExperimentConfig) -> dict[str, tuple[float, float]]:
    cpu, started = busy_cpu_s(), time.perf_counter()
    time.sleep(5)
    idle = (busy_cpu_s() - cpu) / (time.perf_counter() - started)  # the idle Ray's own polling
    dataset = streaming_datasets(spec, cfg.data, cfg.seed)["train"]
    read_with_ray_data(dataset, 0.0, 1)  # the first execution starts Ray's task workers
    return {
        "Ray Data": read_cost(lambda: read_with_ray_data(dataset, 0.0, READ_EPOCHS), idle),
        "pyarrow": read_cost(lambda: read_with_pyarrow(f"{spec.directory}/train.parquet", 0.0, READ_EPOCHS), idle),
    }


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3, help="round-robin rounds of the three ways (median shown)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    ensure_mnist_data()
    case = cases(60_000, 0)[0]
    cfg = pipeline_conf(case, case.samples // BATCH * BATCH, workers=1, epochs=EPOCHS)
    spec = check_training(cfg)  # writes the Parquet copy the first time
    from pipeline.runtime import ensure_ray

    ensure_ray()
    rates: dict[str, list[float]] = {way: [] for way in WAYS}
    for _ in range(args.rounds):
        for way in WAYS:
            with reading_beside(way, spec, cfg):
                rates[way].append(pipeline_on_ray(cfg))
            print(f"  {way:<10} {rates[way][-1]:>9,.0f} samples/s", flush=True)
    costs = readers_alone(spec, cfg)
    alone = median(rates["alone"])
    rows = [[way, f"{median(found):,.0f}", ", ".join(f"{rate:,.0f}" for rate in found), f"{median(found) / alone:.2f}x",
             f"{costs[way][0]:.3f}" if way in costs else "", f"{costs[way][1]:.3f}" if way in costs else ""]
            for way, found in rates.items()]  # fmt: skip
    text = "\n".join([
        f"## What streaming's gap is made of ({case.label}, in memory on 1 Ray worker of 1 CPU, an epoch read every {PACE_S} s beside it)",
        "",
        markdown_table(["read beside", "samples/s (median)", "each round", "/ alone", "read alone: wall s/epoch", "CPU s/epoch"], rows),
        "",
        ratio_line("stream cost, in-memory MLP with Ray Data reading beside / alone", median(rates["Ray Data"]) / alone),
        ratio_line("stream cost, in-memory MLP with pyarrow reading beside / alone", median(rates["pyarrow"]) / alone),
        ratio_line("stream cost, CPU per epoch read, Ray Data / pyarrow", costs["Ray Data"][1] / costs["pyarrow"][1]),
    ])  # fmt: skip
    print("\n" + text)
    return text


if __name__ == "__main__":
    main()
