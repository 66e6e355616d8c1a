"""Batch inference: rows/s of `pipeline predict` on a data set by the local engine and by Ray Data with 1 and 2
actors, and the peak memory of the whole process tree at 1x and 10x the input (it must not grow with the input).

    .venv/bin/python -m bench.inference            # about 12 minutes on 2 cores (and the inputs, once)
    .venv/bin/python -m bench.inference --quick    # a tenth of the rows: a smoke test

Run from the repository root. The inputs are written once under bench/.data/inference and reused:
  table   Parquet files of 250,000 rows (a string id, x0, x1 as float64): 4 files (1x, 1,000,000 rows, 23 MB),
          40 (10x) and 120 (30x), scored by the circles classifier (conf/circles_classifier.yaml: a 2-16-16-1 MLP);
  images  28x28 grayscale PNGs of random pixels (about 900 bytes each) in folders of 1,000: 5,000 (1x, 20 MB on
          disk) and 50,000 (10x), scored by the MNIST MLP (conf/mnist_mlp.yaml: 784-256-128-10);
  tiny    1,000 rows and 100 images: what a run costs without data (imports, Ray, actors, the model).
Both models are trained for seconds on stand-in data in this process and registered in a SQLite store in a
temporary folder (the tracking store of every run here).

Each run is `pipeline predict MODEL INPUT --out OUT --engine E [--actors N]` in a fresh process, which starts
its own local Ray when asked, as a user's command does. Measured:
  wall      the whole command: interpreter, imports, model load, Ray's start, scoring, writing;
  rows/s    what the command reports: rows over the time from the plan (Ray already started) to the last part
            written, which includes the actors' start and model load;
  peak PSS  the highest sum, polled every 0.2 s, of the proportional set size of the command and every process
            it started (Ray's GCS, raylet, workers): a shared page (the object store's) counts once in all;
  driver    the command's own peak USS (private memory, polled: what it holds, without the object store's shared
            pages that it maps as it reads Ray's blocks, which RSS counts in full) and peak RSS (VmHWM), and its
            CPU seconds (user + sys) over the wall time: the driver reads Ray's output and writes the parts, and
            a share near 100 % of a core would make it the limit.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import subprocess
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from bench.common import DATA_ROOT, PIPELINE_CLI, REPO, load_conf, markdown_table

INPUTS = DATA_ROOT / "inference"
FILE_ROWS = 250_000
TABLE_FILES, IMAGES = 4, 5_000  # 1x; the 10x inputs hold ten times as many
POLL_S = 0.2
MIB = 2**20
CONTENDERS = (("local", ["--engine", "local"]), ("Ray Data, 1 actor", ["--engine", "ray", "--actors", "1"]),
              ("Ray Data, 2 actors", ["--engine", "ray", "--actors", "2"]))  # fmt: skip


@dataclass(frozen=True)
class Run:
    kind: str
    size: str  # tiny, 1x or 10x
    contender: str
    rows: int
    wall_s: float
    rate: float  # rows/s, as the command reports it
    peak_pss_mib: float
    driver_uss_mib: float
    driver_peak_mib: float
    driver_cpu_s: float


# ---------------------------------------------------------------------------------------------------
# Inputs and models, written once


def table_input(files: int, rows: int = FILE_ROWS) -> Path:
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    folder = INPUTS / f"table-{files}x{rows}"
    if len(list(folder.glob("*.parquet"))) == files:
        return folder
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(files):
        ids = pa.array([f"row{n:09d}" for n in range(i * rows, (i + 1) * rows)])
        table = pa.table({"id": ids, "x0": rng.uniform(-1.5, 1.5, rows), "x1": rng.uniform(-1.5, 1.5, rows)})
        pq.write_table(table, folder / f"part-{i:03d}.parquet")
    return folder


def image_input(count: int) -> Path:
    import numpy as np
    from PIL import Image

    folder = INPUTS / f"images-{count}"
    if folder.is_dir() and sum(1 for _ in folder.rglob("*.png")) == count:
        return folder
    rng = np.random.default_rng(1)
    for i in range(count):
        path = folder / f"{i // 1000:03d}" / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (28, 28), dtype=np.uint8)).save(path)
    return folder


def register_models(store: Path) -> dict[str, str]:
    """The two models, trained in this process for seconds and registered in `store`; kind -> NAME@ALIAS."""
    from pipeline.standin import write_mnist_like
    from pipeline.train import run_training

    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{store / 'mlflow.db'}"
    write_mnist_like(store / "data", "MNIST", seed=3)
    common = [f"storage_path={store / 'runs'}", f"data.root={store / 'data'}", "scaling.num_workers=0", "train.epochs=1"]
    run_training(load_conf("circles_classifier", [*common, "name=bench_circles", "data.num_samples=500"]))
    run_training(load_conf("mnist_mlp", [*common, "name=bench_mnist", "data.download=false"]))
    return {"table": "bench_circles@champion", "images": "bench_mnist@champion"}


# ---------------------------------------------------------------------------------------------------
# One run: the command, its process tree polled


def measure(kind: str, size: str, model: str, data: Path, contender: str, options: list[str], scratch: Path) -> Run:
    import psutil

    out = scratch / "out"
    shutil.rmtree(out, ignore_errors=True)
    started = time.perf_counter()
    command = subprocess.Popen([str(PIPELINE_CLI), "predict", model, str(data), "--out", str(out), *options], cwd=REPO,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    peaks = {"pss": 0, "uss": 0, "hwm": 0, "cpu": 0.0}
    poller = threading.Thread(target=_poll, args=(psutil.Process(command.pid), command, peaks), daemon=True)
    poller.start()
    stdout, stderr = command.communicate()
    wall = time.perf_counter() - started
    poller.join()
    if command.returncode != 0:
        raise RuntimeError(f"{contender} on {data} exited {command.returncode}:\n{stderr[-3000:]}")
    found = re.search(r": ([\d,]+) rows in .*, ([\d,]+) rows/s", stdout)
    assert found, stdout
    rows, rate = (int(group.replace(",", "")) for group in found.groups())
    shutil.rmtree(out, ignore_errors=True)
    run = Run(kind, size, contender, rows, wall, rate, peaks["pss"] / MIB, peaks["uss"] / MIB, peaks["hwm"] / 1024, peaks["cpu"])
    print(f"  {kind} {size} {contender:<20} {rows:>10,} rows {wall:6.1f} s {rate:>9,} rows/s  peak PSS {run.peak_pss_mib:7.1f} MiB  "
          f"driver USS {run.driver_uss_mib:6.1f} RSS {run.driver_peak_mib:6.1f} MiB, {run.driver_cpu_s:5.1f} CPU s", flush=True)  # fmt: skip
    return run


def _poll(root: object, command: subprocess.Popen, peaks: dict) -> None:
    """Until the command ends: the sum of PSS over its process tree, its own VmHWM and CPU seconds."""
    import psutil

    assert isinstance(root, psutil.Process)
    while command.poll() is None:
        total = 0
        try:
            processes = [root, *root.children(recursive=True)]
            peaks["hwm"] = max(peaks["hwm"], _status_kib(root.pid, "VmHWM"))
            times = root.cpu_times()
            peaks["cpu"] = times.user + times.system
        except psutil.Error:
            break
        for process in processes:
            try:
                memory = process.memory_full_info()
            except psutil.Error:  # a worker that ended between the listing and the reading
                continue
            total += memory.pss
            if process is root:
                peaks["uss"] = max(peaks["uss"], memory.uss)
        peaks["pss"] = max(peaks["pss"], total)
        time.sleep(POLL_S)


def _status_kib(pid: int, key: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(f"{key}:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


# ---------------------------------------------------------------------------------------------------
# The report


def report(runs: list[Run]) -> str:
    rows = [(r.kind, r.size, r.contender, f"{r.rows:,}", f"{r.wall_s:.1f}", f"{r.rate:,}", f"{r.peak_pss_mib:,.0f}",
             f"{r.driver_uss_mib:,.0f}", f"{r.driver_peak_mib:,.0f}", f"{100 * r.driver_cpu_s / r.wall_s:.0f} %") for r in runs]  # fmt: skip
    headers = ["input", "size", "engine", "rows", "wall s", "rows/s (reported)", "peak PSS, all processes (MiB)",
               "driver peak USS (MiB)", "driver peak RSS (MiB)", "driver CPU / wall"]  # fmt: skip
    return "\n".join(["## Batch inference (`pipeline predict MODEL DATA_SET --out OUT`)", "", markdown_table(headers, rows), ""])


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the rows: a smoke test")
    parser.add_argument("--kinds", nargs="+", default=["table", "images"], choices=["table", "images"])
    args = parser.parse_args(argv)
    scale = 10 if args.quick else 1
    inputs = {  # "tiny": what a run costs without data (imports, Ray, actors, the model), the baseline of the others
        "table": {
            "tiny": table_input(1, 1_000),
            "1x": table_input(max(1, TABLE_FILES // scale)),
            "10x": table_input(TABLE_FILES * 10 // scale),
            "30x": table_input(TABLE_FILES * 30 // scale),
        },
        "images": {"tiny": image_input(100), "1x": image_input(IMAGES // scale), "10x": image_input(IMAGES * 10 // scale)},
    }
    runs: list[Run] = []
    with tempfile.TemporaryDirectory() as tmp:
        models = register_models(Path(tmp))
        for kind in args.kinds:
            for size, data in inputs[kind].items():
                for contender, options in CONTENDERS:
                    runs.append(measure(kind, size, models[kind], data, contender, options, Path(tmp)))
    text = report(runs)
    print("\n" + text)
    return text


if __name__ == "__main__":
    main()
