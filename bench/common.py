"""What the benchmark scripts share: paths, the cached MNIST-sized data, timing, tables, the machine.

Stdlib only at import time, so that `bench.fixed_costs` can time `import torch` itself.
"""

from __future__ import annotations

import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pipeline.config import ExperimentConfig

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"
BENCH_DIR = REPO / "bench"
DATA_ROOT = BENCH_DIR / ".data"  # generated once, reused by later runs; delete it to regenerate
RESULTS_DIR = BENCH_DIR / "results"
PIPELINE_CLI = Path(sys.executable).with_name("pipeline")  # the console script of this virtualenv

# MNIST's real sizes: the benchmarks read as much data as the tutorials do.
MNIST_TRAIN, MNIST_TEST = 60_000, 10_000
MNIST_FOLDERS = ("MNIST", "FashionMNIST")  # torchvision's folder names under the data root
IDX_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")


def ensure_mnist_data(root: Path = DATA_ROOT) -> Path:
    """MNIST and FashionMNIST stand-ins (60,000 + 10,000 28x28 uint8) in the real IDX layout, written once."""
    from pipeline.standin import write_mnist_like

    for seed, folder in enumerate(MNIST_FOLDERS):
        raw = root / folder / "raw"
        if all((raw / name).is_file() for name in IDX_FILES):
            continue
        write_mnist_like(root, folder, n_train=MNIST_TRAIN, n_test=MNIST_TEST, seed=10 * seed)
    return root


def load_conf(name: str, overrides: Sequence[str] = ()) -> ExperimentConfig:
    """conf/<name>.yaml with `key=value` overrides, validated as the CLI does."""
    from pipeline.config import load_config

    return load_config(CONF_DIR / f"{name}.yaml", list(overrides))


def timed(fn: Callable[[], object]) -> float:
    """Wall seconds of one call."""
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def run_timed(cmd: Sequence[str], *, cwd: Path = REPO, env: dict[str, str] | None = None) -> tuple[float, str]:
    """Run a command to completion; return its wall seconds and stdout. A failure raises with its stderr."""
    started = time.perf_counter()
    proc = subprocess.run(list(cmd), cwd=cwd, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}:\n{proc.stderr[-3000:]}")
    return wall, proc.stdout


def bench_module(name: str, *args: str) -> list[str]:
    """The command that runs `bench.<name>` in a fresh interpreter of this virtualenv."""
    return [sys.executable, "-m", f"bench.{name}", *args]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


RATIO_MARK = "- ratio: "  # run_all gathers the lines that start so into its closing summary


def ratio_line(name: str, value: float, goal: str = "") -> str:
    """One ratio measured within one run, as every report writes it: `- ratio: name: 0.85x (goal: >= 0.8x)`."""
    return f"{RATIO_MARK}{name}: {value:.2f}x" + (f" (goal: {goal})" if goal else "")


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table, columns padded so that it also reads as plain text; numbers right-aligned."""
    cells = [[str(h) for h in headers], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    numeric = [all(_is_number(row[i]) for row in cells[1:]) for i in range(len(headers))]

    def line(row: Sequence[str]) -> str:
        padded = (c.rjust(w) if num else c.ljust(w) for c, w, num in zip(row, widths, numeric, strict=True))
        return "| " + " | ".join(padded) + " |"

    rule = "|" + "|".join(("-" * (w + 1) + ":") if num else ("-" * (w + 2)) for w, num in zip(widths, numeric, strict=True)) + "|"
    return "\n".join([line(cells[0]), rule, *(line(row) for row in cells[1:])])


def _is_number(text: str) -> bool:
    try:
        float(text.rstrip("x").replace(",", ""))
    except ValueError:
        return False
    return True


def machine_description() -> str:
    """CPU model, cores, RAM, OS, Python, torch and Ray versions, GPU if any: a header for the results."""
    import ray
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    lines = [
        f"CPU:    {_cpu_model()}",
        f"cores:  {os.cpu_count()} logical ({len(os.sched_getaffinity(0))} usable by this process)",
        f"RAM:    {_ram_gib():.1f} GiB",
        f"GPU:    {gpu}",
        f"OS:     {platform.platform()}",
        f"Python: {platform.python_version()}  torch {torch.__version__}  Ray {ray.__version__}",
        f"load:   {_load_average()} (1/5/15 min, at the start; other processes share this machine)",
    ]
    return "\n".join(lines)


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _ram_gib() -> float:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) / 2**20
    except OSError:
        pass
    return float("nan")


def _load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())
