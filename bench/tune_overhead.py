"""Ray Tune: what one trial costs on each trial runner, and what ASHA saves over running every trial to the end.

    .venv/bin/python -m bench.tune_overhead            # about 5 minutes on 2 cores
    .venv/bin/python -m bench.tune_overhead --quick    # 2 trials per runner, 2-epoch ASHA: a smoke test
    .venv/bin/python -m bench.tune_overhead --trials 8 --worker-trials 4

Every search is one `pipeline.tune.run_search(cfg, fresh=True, register=False)` on
conf/linear_regression.yaml (synthetic data, no download), in a fresh interpreter that starts its own
local Ray (timed apart, not in the search) and keeps its storage, data and MLflow SQLite store in a
temporary folder. Trials run one at a time, in grid order (tune.max_concurrent_trials=1):

- per-trial overhead: N trivial trials (train.epochs=1, data.num_samples=200, a grid of N learning
  rates, FIFO) trained by tune.trial_runner=in_process (run_worker in the trial's own actor) and by
  tune.trial_runner=workers (a Ray Train worker group of scaling.num_workers=1 per trial). "per trial"
  is the whole run_search / N, so it shares out the search's fixed costs (MLflow parent run, Tune's
  start, the search plots); "between trial starts" is the median gap between successive trials'
  `trial_start` events, the steady-state cost of one more trial;
- ASHA vs FIFO: 4 trials, optim.lr in [0.05, 0.02, 0.00001, 0.00002] (the last two learn next to
  nothing), train.epochs=8, in_process; ASHA (grace_period 1, reduction_factor 2) against FIFO, which
  runs every trial to the end. "epochs trained" sums every trial's epochs; the best val_mse of the two
  should agree;
- PBT vs ASHA vs random search on about the same budget of epochs: optim.lr drawn from loguniform
  [1e-5, 1e-2] (most draws too small to converge in 8 epochs), 2 trials at a time, in_process: random
  search (FIFO) and PBT (perturbation_interval 2, quantile 0.5, optim.lr mutated within the same range)
  with 2 trials (PBT trains its whole population at once: 2 on 2 cores), ASHA with 6 (its early stops
  leave it a budget of the same order: 13 to 28 epochs against 16, shown in the table). Sampling is
  not seeded: each run draws its own values, so one run's best values are one draw, not an average.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from typing import Any

from bench.common import CONF_DIR, bench_module, markdown_table, median, ratio_line, run_timed

CONF = CONF_DIR / "linear_regression.yaml"
ASHA_LRS = ("0.05", "0.02", "0.00001", "0.00002")  # fixed-point: PyYAML reads 1e-05 as text
RUNNERS = ("in_process", "workers")
POPULATION_SPACE = "{optim.lr: {loguniform: [1.0e-5, 1.0e-2]}}"
SCHEDULERS = ("asha", "fifo")


# ---------------------------------------------------------------------------------------------------
# One search, in a fresh interpreter


def child_search(overrides: Sequence[str], storage: str) -> dict[str, Any]:
    """Runs in a fresh interpreter: time the imports, Ray's start and one run_search; describe its trials."""
    marks = {"start": time.perf_counter()}
    os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{storage}/mlflow.db"  # nothing lands in the repository
    import ray

    from pipeline.config import load_config
    from pipeline.tune import run_search

    marks["imports"] = time.perf_counter()
    cfg = load_config(CONF, [*overrides, f"storage_path={storage}", f"data.root={storage}", "name=tune-bench"])
    ray.init(include_dashboard=False, log_to_driver=False, configure_logging=False)
    marks["ray_start"] = time.perf_counter()
    starts: list[float] = []

    def on_event(event: dict[str, Any]) -> None:
        if event["event"] == "trial_start":
            starts.append(time.perf_counter())

    result = run_search(cfg, fresh=True, register=False, on_event=on_event)
    marks["search"] = time.perf_counter()
    statuses = [t.status for t in result.trials]
    found = {
        **_phases(marks),
        "ray_cpus": ray.cluster_resources().get("CPU", 0.0),
        "ray_version": ray.__version__,
        "trials": len(result.trials),
        **{status: statuses.count(status) for status in ("finished", "stopped early", "failed")},
        "epochs": sum(t.epochs for t in result.trials),
        "gap": median([b - a for a, b in itertools.pairwise(starts)]) if len(starts) > 1 else None,
        "best": result.best.best,
        "best_lr": result.best.params.get("optim.lr"),
        "errors": [f"{t.trial_id}: {t.error}" for t in result.trials if t.error],
    }
    ray.shutdown()
    return found


def _phases(marks: dict[str, float]) -> dict[str, float]:
    names = list(marks)
    return {name: marks[name] - marks[prev] for prev, name in itertools.pairwise(names)}


def measure(label: str, overrides: Sequence[str]) -> dict[str, Any]:
    """One search in a fresh interpreter; its numbers and the wall time of the whole process."""
    wall, out = run_timed(bench_module("tune_overhead", "--child", *overrides))
    found = {**json.loads(out.strip().splitlines()[-1]), "process": wall}
    if found["failed"]:
        raise RuntimeError(
            f"{label}: {found['failed']} of {found['trials']} trials failed ({'; '.join(found['errors'])}); the timing means nothing"
        )
    print(f"  {label}: {found['trials']} trials, run_search {found['search']:.1f} s, process {wall:.1f} s", flush=True)
    return found


def search_overrides(lrs: Sequence[str], *, epochs: int, scheduler: str, runner: str, samples: int | None = None) -> list[str]:
    """A grid over optim.lr, one sample per point, one trial at a time."""
    return [
        f"tune.space={{optim.lr: {{grid: [{', '.join(lrs)}]}}}}",
        "tune.num_samples=1",
        f"tune.scheduler={scheduler}",
        "tune.grace_period=1",
        "tune.reduction_factor=2",
        "tune.max_concurrent_trials=1",
        f"tune.trial_runner={runner}",
        f"train.epochs={epochs}",
        "scaling.num_workers=1",
        *([f"data.num_samples={samples}"] if samples else []),
    ]


def trivial_lrs(n: int) -> list[str]:
    """n distinct learning rates that all train the linear model sensibly."""
    return [f"{0.05 / (i + 1):.6f}" for i in range(n)]


# ---------------------------------------------------------------------------------------------------
# The report


def overhead_table(trials: dict[str, int]) -> tuple[str, list[dict[str, Any]]]:
    found = {
        runner: measure(f"trial_runner={runner}", search_overrides(trivial_lrs(n), epochs=1, scheduler="fifo", runner=runner, samples=200))
        for runner, n in trials.items()
    }  # fmt: skip
    base = found["in_process"]
    rows = []
    for runner, r in found.items():
        per_trial = r["search"] / r["trials"]
        gap = f"{r['gap']:.2f}" if r["gap"] is not None else "-"
        ratio = f"{per_trial / (base['search'] / base['trials']):.2f}x"
        rows.append((f"tune.trial_runner={runner}", r["trials"], f"{r['ray_start']:.2f}", f"{r['search']:.2f}",
                     f"{per_trial:.2f}", ratio, gap, f"{r['process']:.2f}"))  # fmt: skip
    headers = [
        "trial runner",
        "trials",
        "Ray start s",
        "run_search s",
        "per trial s",
        "vs in_process",
        "between trial starts s",
        "whole process s",
    ]
    workers = found["workers"]
    ratio = ratio_line(
        "Tune, per-trial time, trial_runner=workers / in_process",
        (workers["search"] / workers["trials"]) / (base["search"] / base["trials"]),
    )
    return markdown_table(headers, rows) + "\n\n" + ratio, list(found.values())


def asha_table(epochs: int) -> tuple[str, list[dict[str, Any]]]:
    found = {
        scheduler: measure(f"scheduler={scheduler}", search_overrides(ASHA_LRS, epochs=epochs, scheduler=scheduler, runner="in_process"))
        for scheduler in SCHEDULERS
    }  # fmt: skip
    fifo = found["fifo"]
    rows = [
        (f"tune.scheduler={scheduler}", r["finished"], r["stopped early"], f"{r['epochs']} of {r['trials'] * epochs}",
         f"{r['search']:.2f}", f"{r['search'] / fifo['search']:.2f}x", f"{r['best']:.4g}", r["best_lr"])
        for scheduler, r in found.items()
    ]  # fmt: skip
    headers = ["scheduler", "finished", "stopped early", "epochs trained", "run_search s", "vs fifo", "best val_mse", "best optim.lr"]
    ratio = ratio_line("Tune, run_search time, ASHA / FIFO", found["asha"]["search"] / fifo["search"])
    return markdown_table(headers, rows) + "\n\n" + ratio, list(found.values())


def scheduler_overrides(scheduler: str, trials: int, epochs: int) -> list[str]:
    """The same space and epochs for each scheduler; ASHA gets 3x the trials, about the same epochs in all."""
    return [f"tune.space={POPULATION_SPACE}", f"tune.scheduler={scheduler}", f"train.epochs={epochs}",
            f"tune.num_samples={trials * 3 if scheduler == 'asha' else trials}", "tune.max_concurrent_trials=2",
            "tune.trial_runner=in_process", "scaling.num_workers=1", "tune.perturbation_interval=2", "tune.quantile_fraction=0.5"]  # fmt: skip


def schedulers_table(trials: int, epochs: int) -> tuple[str, list[dict[str, Any]]]:
    found = {name: measure(f"scheduler={name}", scheduler_overrides(scheduler, trials, epochs))
             for name, scheduler in (("random search (FIFO)", "fifo"), ("ASHA", "asha"), ("PBT", "pbt"))}  # fmt: skip
    fifo = found["random search (FIFO)"]
    rows = [(name, r["trials"], r["epochs"], f"{r['search']:.2f}", f"{r['search'] / fifo['search']:.2f}x", f"{r['best']:.4g}",
             f"{r['best_lr']:.3g}") for name, r in found.items()]  # fmt: skip
    headers = ["search", "trials", "epochs trained", "run_search s", "vs random", "best val_mse", "best trial's optim.lr (last)"]
    return markdown_table(headers, rows), list(found.values())


def machine_line(runs: list[dict[str, Any]], load: tuple[float, ...]) -> str:
    usable = len(os.sched_getaffinity(0))
    cpus = sorted({f"{r['ray_cpus']:g}" for r in runs})
    return (f"Machine: {os.cpu_count()} logical cores ({usable} usable), a local Ray {runs[0]['ray_version']} of "
            f"{'/'.join(cpus)} CPUs started by each search's own interpreter; load {' '.join(f'{v:.2f}' for v in load)} "
            "(1/5/15 min) at the start.")  # fmt: skip


def report(in_process_trials: int, worker_trials: int, asha_epochs: int) -> str:
    load = os.getloadavg()
    print("per-trial overhead:", flush=True)
    overhead, runs = overhead_table({"in_process": in_process_trials, "workers": worker_trials})
    print("ASHA vs FIFO:", flush=True)
    asha, more = asha_table(asha_epochs)
    print("PBT vs ASHA vs random search:", flush=True)
    schedulers, _ = schedulers_table(2, asha_epochs)
    return "\n".join([
        "## Tune: per-trial overhead and ASHA", "",
        machine_line(runs + more, load), "",
        "### Per-trial overhead: 1-epoch linear regression (200 samples), FIFO, one trial at a time", "",
        ("run_search s: the whole call (prepare, MLflow parent run, Tune, every trial, the search's plots); "
         "per trial = run_search / trials; between trial starts: the median gap between successive trials' start events."), "",
        overhead, "",
        f"### ASHA vs FIFO: 4 trials, optim.lr in [{', '.join(ASHA_LRS)}], {asha_epochs} epochs, in_process, one trial at a time", "",
        "ASHA: grace_period 1, reduction_factor 2, time attribute epoch; FIFO runs every trial to the end.", "",
        asha, "",
        f"### PBT vs ASHA vs random search: optim.lr from loguniform [1e-5, 1e-2], {asha_epochs} epochs, 2 trials at a time", "",
        "Random search and PBT: 2 trials; ASHA: 6 (a budget of the same order; the table shows each one's epochs). PBT: perturbation_interval 2, quantile 0.5.", "",
        schedulers, "",
    ])  # fmt: skip


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=8, help="trials of the in_process search (per-trial overhead)")
    parser.add_argument("--worker-trials", type=int, default=4, help="trials of the workers search (per-trial overhead)")
    parser.add_argument("--asha-epochs", type=int, default=8, help="train.epochs of the ASHA and FIFO searches")
    parser.add_argument("--quick", action="store_true", help="2 trials per runner, 2-epoch ASHA/FIFO: a smoke test")
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.trials, args.worker_trials, args.asha_epochs = 2, 2, 2
    if min(args.trials, args.worker_trials, args.asha_epochs) < 1:
        parser.error("--trials, --worker-trials and --asha-epochs must be at least 1")
    return args


def main(argv: list[str] | None = None) -> str:
    args = parse_args(argv)
    if args.child:
        with tempfile.TemporaryDirectory() as storage:
            found = child_search(args.child, storage)
        print(json.dumps(found))
        sys.stdout.flush()
        return ""
    text = report(args.trials, args.worker_trials, args.asha_epochs)
    print("\n" + text)
    return text


if __name__ == "__main__":
    main()
