"""Memory: the peak resident memory (RSS) of one training worker on FashionMNIST-sized data.

    .venv/bin/python -m bench.memory            # about 2 minutes on 2 cores (2 runs of each)
    .venv/bin/python -m bench.memory --quick    # a tenth of the training steps: a smoke test

The data: the FashionMNIST stand-in of bench/common.py (60,000 + 10,000 28x28 uint8 images in the real
IDX layout, bench/.data/FashionMNIST), trained by conf/fashion_mnist_mlp.yaml (784-512-512-10 MLP,
batch 64, the conf's val_fraction) for 1 epoch. Its in-memory size is what the IDX files hold: one byte
per pixel and one per label, all splits (the pipeline keeps labels as int64: 0.5 MiB more, ignored).

Each measurement runs in a fresh interpreter, so that nothing earlier inflates its peak:
- in-process: `pipeline.loop.run_worker(cfg, spec, LocalSession(...))`, the loop that
  `scaling.num_workers=0` runs; the peak is the process's own VmHWM (not `ru_maxrss`, which Linux
  carries over execve: a child started by a big parent would report the parent's peak), the baseline
  the same right after `import torch` and the pipeline's imports (torch, numpy, pyarrow: no data yet),
  with marks as run_worker reads the Parquet files, splits them and makes tensors of them;
- Ray Train worker: `run_training(cfg, track=False)` with `scaling.num_workers=1` (and
  `scaling.runner=ray` where the config has that key: `auto` trains one local worker in-process) on a
  local Ray started by the child. A thread polls /proc every 0.2 s for the child's descendants whose
  process title names `ray::RayTrainWorker` and keeps each one's VmHWM (the kernel's peak RSS of that
  process: a short spike is not missed, only what happens in the worker's last 0.2 s could be);
- each runner also trains the same conf on a 640 + 100-sample stand-in: that peak is the worker's cost
  without data (runtime, model, optimizer), the baseline that the data-attributable part is taken from.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from bench.common import DATA_ROOT, bench_module, ensure_mnist_data, markdown_table, ratio_line, run_timed

CONF = "fashion_mnist_mlp"  # data.name fashion_mnist: <data.root>/FashionMNIST/raw, as ensure_mnist_data writes it
TINY_TRAIN, TINY_TEST = 640, 100
POLL_S = 0.2
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
MIB = 2**20


def conf_overrides(root: str, storage: str, *, workers: int, limit: int | None) -> list[str]:
    return [
        f"data.root={root}",
        "data.download=false",
        "data.batch_size=64",
        "train.epochs=1",
        f"scaling.num_workers={workers}",
        f"storage_path={storage}",
        "name=memory-bench",
        *([f"data.limit={limit}"] if limit else []),
        *(["scaling.runner=ray"] if workers and _has_runner_key() else []),  # auto would train 1 worker in-process
    ]


def _has_runner_key() -> bool:
    from pipeline.config import ScalingSection

    return "runner" in ScalingSection.model_fields


def data_bytes(spec: Any) -> int:
    """uint8 pixels + one byte per label, every split: the dataset's size as FashionMNIST ships it."""
    per_sample = 1
    for d in spec.input_shape:
        per_sample *= d
    return sum(spec.rows.values()) * (per_sample + 1)


# ---------------------------------------------------------------------------------------------------
# The children: each in a fresh interpreter, printing one JSON line


def _status_kib(key: str, pid: int | str = "self") -> int:
    """VmHWM (peak RSS of this process image) or VmRSS, in KiB, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{key}:"):
            return int(line.split()[1])
    return 0


def child_in_process(root: str, limit: int | None) -> dict[str, Any]:
    with tempfile.TemporaryDirectory() as storage:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{storage}/mlflow.db"  # nothing lands in the repository
        import torch

        import pipeline.batches
        import pipeline.data.store
        import pipeline.loop
        from pipeline.checkpoints import LocalSession
        from pipeline.config import load_config

        # VmHWM, not ru_maxrss: Linux carries ru_maxrss over execve, and Python starts children with
        # vfork, so a child's ru_maxrss starts at its parent's peak (1.3 GiB after the parent's prepare).
        marks: list[tuple[str, int, int]] = []  # (stage, RSS now, peak so far), KiB

        def mark(stage: str) -> None:
            marks.append((stage, _status_kib("VmRSS"), _status_kib("VmHWM")))

        mark("after `import torch` + pipeline imports")
        _mark_calls(pipeline.data.store, "_read_parquet_split", _read_stage, mark)
        _mark_calls(pipeline.batches, "load_split_rows", lambda args: "`load_split_rows` returned (train/val rows, test)", mark)
        _mark_calls(pipeline.loop, "model_for", lambda args: "splits as tensors (`_to_device`), before the model", mark, before=True)
        cfg = load_config(f"conf/{CONF}.yaml", conf_overrides(root, storage, workers=0, limit=limit))
        spec = pipeline.data.store.materialize(cfg.data, cfg.seed)  # the parent wrote the Parquet copy: this reads the manifest
        session = LocalSession(Path(storage) / cfg.name, keep=1, metric=cfg.metric, mode=cfg.metric_mode,
                               device=torch.device("cpu"))  # fmt: skip
        started = time.perf_counter()
        pipeline.loop.run_worker(cfg, spec, session, None)
        wall = time.perf_counter() - started
        mark("after the epoch (training, evaluation, checkpoint)")
        ru_maxrss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux; inflated, see above
    return {"peak_kib": marks[-1][2], "baseline_kib": marks[0][2], "stages": marks, "ru_maxrss_kib": ru_maxrss_kib,
            "data_bytes": data_bytes(spec), "wall_s": wall, "metrics": session.last_metrics}  # fmt: skip


def _read_stage(args: tuple[Any, ...]) -> str:
    # load_split_rows reads train.parquet, carves train/val as row indices, then reads test.parquet
    split = args[1] if len(args) > 1 else "?"
    return f"read {split}.parquet (`_read_parquet_split`)"


def _mark_calls(module: Any, name: str, stage: Any, mark: Any, *, before: bool = False) -> None:
    """Record RSS at every call of module.name (after it returns, or before it runs), as that module calls it."""
    fn = getattr(module, name)  # a name that moved is an AttributeError here, not a stage silently missing

    def wrapped(*args: Any, **kwargs: Any) -> Any:
        if before:
            mark(stage(args))
        out = fn(*args, **kwargs)
        if not before:
            mark(stage(args))
        return out

    setattr(module, name, wrapped)


class WorkerSampler:
    """Polls /proc for this process's Ray Train workers; keeps each one's peak RSS (VmHWM), sampled RSS, and
    sampled RSS split into private memory (RssAnon) and the object store's shared pages it touched (RssShmem):
    a worker reading blocks from Ray's object store maps them without a copy, and each page it has read
    counts in its RSS until the store hands that memory out again."""

    def __init__(self) -> None:
        self.seen: dict[int, dict[str, Any]] = {}  # pid -> {"titles", "hwm_kib", "rss_kib", "anon_kib", "shmem_kib"}
        self.cpu: dict[int, tuple[str, float]] = {}  # every descendant: pid -> (its kind, CPU seconds at the last poll)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> WorkerSampler:  # not typing.Self: Python 3.11+, and the project supports 3.10
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.poll()
            self._stop.wait(POLL_S)

    def poll(self) -> None:
        for pid in _descendants(os.getpid()):
            try:
                title = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
                status = Path(f"/proc/{pid}/status").read_text()
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            except OSError:  # gone since the listing
                continue
            kind = _kind(title.split()[0] if title else "", self.cpu.get(pid, ("",))[0])
            self.cpu[pid] = (kind, (int(stat[11]) + int(stat[12])) / CLOCK_TICKS)  # utime + stime
            if not title.startswith("ray::"):
                continue
            fields = {k: v for k, _, v in (line.partition(":") for line in status.splitlines())}
            entry = self.seen.setdefault(pid, {"titles": set(), "hwm_kib": 0, "rss_kib": 0, "anon_kib": 0, "shmem_kib": 0})
            entry["titles"].add(title.split()[0])
            for key, field in (("hwm_kib", "VmHWM"), ("rss_kib", "VmRSS"), ("anon_kib", "RssAnon"), ("shmem_kib", "RssShmem")):
                entry[key] = max(entry[key], int(fields.get(field, "0 kB").split()[0]))

    def cpu_by_kind(self) -> dict[str, float]:
        """CPU seconds so far of this process's descendants, summed by kind (see _kind)."""
        totals: dict[str, float] = {}
        for kind, seconds in self.cpu.values():
            totals[kind] = totals.get(kind, 0.0) + seconds
        return totals

    def train_workers(self, exclude: set[int] | frozenset[int] = frozenset()) -> dict[int, dict[str, Any]]:
        return {pid: e for pid, e in self.seen.items() if pid not in exclude and any("RayTrainWorker" in t for t in e["titles"])}


def _kind(title: str, before: str) -> str:
    """A Ray Train worker (also before it took the name: it starts as an idle worker), or the rest of Ray: raylet,
    GCS, Train's controller, idle workers, and with data.loader=stream Ray Data's coordinators, actors and readers.
    Their share is told apart by difference: the same run streamed against in memory."""
    return "train worker" if title.startswith("ray::RayTrainWorker") or before == "train worker" else "rest of Ray"


def _descendants(root: int) -> list[int]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])  # the command name may hold spaces and parentheses
        children.setdefault(ppid, []).append(int(entry))
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def train_sampled(sampler: WorkerSampler, cfg: Any, done: set[int]) -> tuple[dict[int, dict[str, Any]], float, Any]:
    """One `run_training` on the local Ray: the Ray Train workers it started (added to `done`), its wall seconds, its result."""
    from pipeline.train import run_training

    started = time.perf_counter()
    result = run_training(cfg, fresh=True, track=False)
    wall = time.perf_counter() - started
    time.sleep(2 * POLL_S)  # one more poll after the worker's last report
    sampler.poll()
    workers = sampler.train_workers(exclude=done)
    done |= set(workers)
    return workers, wall, result


def child_ray(tiny_root: str, full_root: str, limit: int | None, repeat: int) -> dict[str, Any]:
    """The tiny run first (a baseline worker), then the FashionMNIST-sized one `repeat` times, on one local Ray."""
    with tempfile.TemporaryDirectory() as storage:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{storage}/mlflow.db"
        from pipeline.config import load_config
        from pipeline.runtime import ensure_ray

        found: dict[str, Any] = {"tiny": [], "full": []}
        with WorkerSampler() as sampler:
            ensure_ray()
            done: set[int] = set()
            for label, root, rows in (("tiny", tiny_root, None), *[("full", full_root, limit)] * repeat):
                cfg = load_config(f"conf/{CONF}.yaml", conf_overrides(root, storage, workers=1, limit=rows))
                workers, wall, result = train_sampled(sampler, cfg, done)
                found[label].append(
                    {
                        "workers": {str(pid): {**e, "titles": sorted(e["titles"])} for pid, e in workers.items()},
                        "wall_s": wall,
                        "metrics": result.metrics,
                    }
                )
        import ray

        ray.shutdown()
    return found


# ---------------------------------------------------------------------------------------------------
# The parent: data, children, table


def measure_child(*args: str) -> dict[str, Any]:
    _, out = run_timed(bench_module("memory", "--child", *args))
    return json.loads(out.strip().splitlines()[-1])


def write_tiny_data(root: Path) -> None:
    from pipeline.standin import write_mnist_like

    write_mnist_like(root, "FashionMNIST", n_train=TINY_TRAIN, n_test=TINY_TEST, seed=0)


def prepare_parquet(root: Path) -> Any:
    """Write the Parquet copy here, so that no child's peak includes the IDX -> Parquet conversion."""
    from bench.common import load_conf
    from pipeline.checks import check_training

    return check_training(load_conf(CONF, conf_overrides(str(root), "runs", workers=0, limit=None)))


def _single_worker(run: dict[str, Any], label: str) -> int | None:
    workers = run["workers"]
    if len(workers) != 1:
        print(f"  warning: {len(workers)} Ray Train worker processes seen in the {label} run: {workers}", flush=True)
    return max((w["hwm_kib"] for w in workers.values()), default=None)


def _mib(kib: int | None) -> str:
    return "n/a" if kib is None else f"{kib / 1024:.1f}"


def _span(values: list[int | None]) -> str:
    found = [v for v in values if v is not None]
    return f"{_mib(min(found))}-{_mib(max(found))}" if found else "n/a"


def report(quick: bool, repeat: int) -> str:
    ensure_mnist_data()
    spec = prepare_parquet(DATA_ROOT)
    size = data_bytes(spec)
    limit = str(6_400 if quick else 0)
    load = " ".join(f"{v:.2f}" for v in os.getloadavg())
    with tempfile.TemporaryDirectory() as tiny:
        write_tiny_data(Path(tiny))
        prepare_parquet(Path(tiny))
        fulls = []
        for i in range(repeat):
            print(f"  in-process, FashionMNIST-sized, run {i + 1} of {repeat} ...", flush=True)
            fulls.append(measure_child("in_process", str(DATA_ROOT), limit))
            print(f"    peak {_mib(fulls[-1]['peak_kib'])} MiB", flush=True)
        print(f"  in-process, {TINY_TRAIN} + {TINY_TEST} samples ...", flush=True)
        small = measure_child("in_process", tiny, "0")
        print(f"    peak {_mib(small['peak_kib'])} MiB", flush=True)
        print(f"  Ray Train worker, {TINY_TRAIN} + {TINY_TEST} samples, then FashionMNIST-sized x {repeat} ...", flush=True)
        ray_runs = measure_child("ray", tiny, str(DATA_ROOT), limit, str(repeat))
    full = max(fulls, key=lambda run: run["peak_kib"])  # the worst run: what a memory limit must allow for
    ray_tiny = _single_worker(ray_runs["tiny"][0], "tiny")
    ray_fulls = [_single_worker(run, "full") for run in ray_runs["full"]]
    ray_full = max((kib for kib in ray_fulls if kib is not None), default=None)
    print(f"    worker peaks {_mib(ray_tiny)} / {', '.join(_mib(kib) for kib in ray_fulls)} MiB", flush=True)
    spread = (
        f"Highest of {repeat} runs each; the peaks ranged {_span([r['peak_kib'] for r in fulls])} MiB in-process and "
        f"{_span(ray_fulls)} MiB in the Ray worker (how much of the Parquet read's scratch memory Arrow's allocator "
        "has handed back before training allocates varies from run to run)."
        if repeat > 1
        else "One run each."
    )
    if ray_full is None or ray_tiny is None:
        spread += " No `ray::RayTrainWorker` process was seen among this run's processes: the Ray row is empty."

    def row(name: str, peak_kib: int | None, base_kib: int | None, base_is: str) -> tuple[object, ...]:
        if peak_kib is None or base_kib is None:
            return (name, "n/a", "n/a", "n/a", "n/a", "n/a", "n/a", base_is)
        cells = [peak_kib, base_kib, peak_kib - base_kib]
        return (name, *(x for kib in cells for x in (f"{kib / 1024:.1f}", f"{kib * 1024 / size:.2f}x")), base_is)

    rows = [
        row("in-process `run_worker`", full["peak_kib"], full["baseline_kib"], "this process after `import torch` + pipeline imports"),
        row("in-process `run_worker`", full["peak_kib"], small["peak_kib"], f"the same loop on {TINY_TRAIN} + {TINY_TEST} samples"),
        row("Ray Train worker (num_workers=1)", ray_full, ray_tiny, f"the same worker on {TINY_TRAIN} + {TINY_TEST} samples"),
    ]  # fmt: skip
    headers = ["worker", "peak MiB", "x data", "baseline MiB", "x data", "peak - baseline MiB", "x data", "baseline"]
    stage_rows, previous = [], None
    for stage, rss, hwm in full["stages"]:
        grew = f"{(hwm - (previous or hwm)) / 1024:+.1f}"
        stage_rows.append((stage, f"{rss / 1024:.1f}", f"{hwm / 1024:.1f}", grew, f"{hwm * 1024 / size:.2f}x"))
        previous = hwm
    steps = f"data.limit={limit} (fewer training steps; every split is still read in full)" if int(limit) else "every training row"
    return "\n".join([
        "## Memory: peak RSS per worker (FashionMNIST-sized data)", "",
        (f"conf/{CONF}.yaml, 1 epoch, batch 64, {steps}, on the stand-in data: {sum(spec.rows.values()):,} samples "
        f"of {'x'.join(map(str, spec.input_shape))} uint8 ({', '.join(f'{k} {v:,}' for k, v in spec.rows.items())}): "
        f"**{size / MIB:.1f} MiB in memory** (pixels + uint8 labels); \"x data\" is a multiple of that. Each runner "
        "in a fresh interpreter. Peak = the process's VmHWM (the kernel's high-water mark of its RSS): the in-process "
        f"loop's own, the Ray Train worker's read from /proc every {POLL_S} s while it runs (a high-water mark, so "
        f"only the worker's last {POLL_S} s could go unseen). "
        f"{spread} Load average at the start: {load} on {os.cpu_count()} cores."), "",
        markdown_table(headers, rows), "",
        verdict(size, full, small, ray_tiny, ray_full), "",

        ("Where the in-process peak comes from (the FashionMNIST-sized run with the highest peak, marks taken as `run_worker` calls "
         "the data functions):"), "",
        markdown_table(["stage", "RSS MiB", "peak so far MiB", "peak grew MiB", "peak x data"], stage_rows),
    ])  # fmt: skip


def verdict(size: int, full: dict[str, Any], small: dict[str, Any], ray_tiny: int | None, ray_full: int | None) -> str:
    """One sentence on the target: the whole worker's peak and the data's own share, each against 2x the data."""
    target = 2 * size / 1024  # KiB
    peaks = [full["peak_kib"], *([ray_full] if ray_full is not None else [])]
    shares = {"in-process": full["peak_kib"] - small["peak_kib"]}
    if ray_full is not None and ray_tiny is not None:
        shares["Ray worker"] = ray_full - ray_tiny
    met = max(peaks) <= target
    share_text = " and ".join(f"{kib * 1024 / size:.1f}x {name}" for name, kib in shares.items())
    share_met = max(shares.values()) <= target
    return (
        f"Target: peak RSS per worker <= 2x the data ({2 * size / MIB:.1f} MiB): **{'met' if met else 'not met'}**; "
        f"the worker peaks at {max(peaks) * 1024 / size:.1f}x, {full['baseline_kib'] / 1024:.0f} MiB of it imports "
        f"before any data is read. The data's own share (peak minus the same run on {TINY_TRAIN} + {TINY_TEST} "
        f"samples) is {share_text}: {'within' if share_met else 'over'} the 2x target on its own.\n\n"
        + ratio_line("memory, the data's share of a worker's peak RSS / the data's size", max(shares.values()) * 1024 / size, "<= 2x")
    )


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a tenth of the training steps, one run each: a smoke test")
    parser.add_argument(
        "--repeat", type=int, default=2, help="runs of each FashionMNIST-sized measurement; the table shows the highest peak"
    )
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, *rest = args.child
        if kind == "in_process":
            found = child_in_process(rest[0], int(rest[1]) or None)
        else:
            found = child_ray(rest[0], rest[1], int(rest[2]) or None, int(rest[3]))
        print(json.dumps(found))
        sys.stdout.flush()
        return ""
    text = report(args.quick, 1 if args.quick else args.repeat)
    print("\n" + text)
    return text


if __name__ == "__main__":
    main()
