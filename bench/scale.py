"""How cost grows with the data: epoch time and peak RSS of one Ray Train worker at 1x, 4x and 16x.

    .venv/bin/python -m bench.scale                 # 1x, 4x and 16x: about 5 minutes on 2 cores
    .venv/bin/python -m bench.scale --factors 1 4   # as bench.run_all runs it
    .venv/bin/python -m bench.scale --quick         # 1x and 2x: a smoke test

The data: FashionMNIST-sized stand-ins (60,000 x factor training images, 28x28 uint8, and 10,000 test
images, in the real IDX layout) under bench/.data/scale-<factor>x, made once, their Parquet copy made by
this process before any measurement. Each factor is trained by conf/fashion_mnist_mlp.yaml for 1 epoch
(batch 64, 1 worker of 1 CPU, `scaling.runner=ray`) twice: from the in-memory tensor
(`data.loader=memory`) and streamed from Ray Data shards (`data.loader=stream`; Ray Data's read tasks
take the second CPU). All runs of a factor share one local Ray, started by a fresh interpreter; a thread
keeps each Ray Train worker's VmHWM (bench/memory.py's sampler), and its sampled private memory (RssAnon) and
object-store pages (RssShmem). Epoch time is the loop's own training time (rows / samples_per_sec: every step,
including the waits for data), not the evaluation. The CPU seconds are over the whole run_training (worker
start, epoch, evaluation): the Ray Train worker's, and the rest of Ray's processes'; the streamed run's extra
in the latter is Ray Data's own cost (its split coordinators, stats and autoscaling actors, read tasks).

Linear growth means seconds per 1,000 rows stay level as the data grows; flat streaming memory means
its peak stays at its 1x value while the in-memory peak grows with the data.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from bench.common import DATA_ROOT, bench_module, markdown_table, ratio_line, run_timed
from bench.memory import WorkerSampler, train_sampled

CONF = "fashion_mnist_mlp"
TRAIN_ROWS, TEST_ROWS = 60_000, 10_000
LOADERS = ("memory", "stream")
MIB = 2**20


def data_root(factor: int) -> Path:
    return DATA_ROOT / f"scale-{factor}x"


def overrides(root: Path, storage: str, loader: str) -> list[str]:
    return [f"data.root={root}", "data.download=false", "data.batch_size=64", "train.epochs=1", "scaling.num_workers=1",
            "scaling.runner=ray", f"data.loader={loader}", f"storage_path={storage}", "name=scale-bench"]  # fmt: skip


def prepare(factor: int) -> Any:
    """The stand-in's IDX files and their Parquet copy, made once, before anything is measured."""
    from bench.common import load_conf
    from pipeline.checks import check_training
    from pipeline.standin import write_mnist_like

    root = data_root(factor)
    if not (root / "FashionMNIST" / "raw").is_dir():
        write_mnist_like(root, "FashionMNIST", n_train=TRAIN_ROWS * factor, n_test=TEST_ROWS, seed=factor)
    return check_training(load_conf(CONF, overrides(root, "runs", "memory")))


def child(factor: int) -> dict[str, Any]:
    """In a fresh interpreter: one epoch from memory, then streamed, on one local Ray; each worker's peak."""
    with tempfile.TemporaryDirectory() as storage:
        from pipeline.config import load_config
        from pipeline.runtime import ensure_ray

        found: dict[str, Any] = {}
        with WorkerSampler() as sampler:
            ensure_ray()
            done: set[int] = set()
            for loader in LOADERS:
                cfg = load_config(f"conf/{CONF}.yaml", overrides(data_root(factor), storage, loader))
                sampler.poll()
                cpu_before = sampler.cpu_by_kind()
                workers, wall, result = train_sampled(sampler, cfg, done)
                cpu = {kind: s - cpu_before.get(kind, 0.0) for kind, s in sampler.cpu_by_kind().items()}
                found[loader] = {"cpu_s": cpu, "peak_kib": max(e["hwm_kib"] for e in workers.values()), "wall_s": wall,
                                 "private_kib": max(e["anon_kib"] for e in workers.values()),
                                 "shared_kib": max(e["shmem_kib"] for e in workers.values()),
                                 "samples_per_sec": result.metrics["samples_per_sec"]}  # fmt: skip
    return found


def measure(factor: int) -> dict[str, Any]:
    spec = prepare(factor)
    _, out = run_timed(bench_module("scale", "--child", str(factor)))
    return {"rows": spec.rows["train"], "mib": spec_mib(spec), **json.loads(out.strip().splitlines()[-1])}


def spec_mib(spec: Any) -> float:
    from pipeline.data.store import decoded_mb

    return decoded_mb(spec)


def report(results: dict[int, dict[str, Any]]) -> str:
    """One row per factor and loader, and the two verdicts: linear time, flat streaming memory."""
    rows, first = [], results[min(results)]
    for factor, found in results.items():
        train = found["rows"] * 0.9  # the conf's val_fraction holds out 10 % of the training file
        for loader in LOADERS:
            run = found[loader]
            epoch_s = train / run["samples_per_sec"]
            peak = run["peak_kib"] * 1024 / MIB
            private = run["private_kib"] * 1024 / MIB
            cpu = run["cpu_s"]
            rows.append((f"{factor}x", loader, f"{found['rows']:,}", f"{found['mib']:,.0f}", f"{epoch_s:.1f}",
                         f"{cpu.get('train worker', 0):.1f}", f"{cpu.get('rest of Ray', 0):.1f}",
                         f"{1000 * epoch_s / train:.3f}", f"{peak:,.0f}", f"{peak / (first[loader]['peak_kib'] * 1024 / MIB):.2f}x",
                         f"{private:,.0f}", f"{run['private_kib'] / first[loader]['private_kib']:.2f}x", f"{run['shared_kib'] * 1024 / MIB:,.0f}",
                         f"{run['wall_s']:.1f}"))  # fmt: skip
    headers = ["data", "loader", "training file rows", "decoded MiB", "epoch s", "run CPU s: train worker", "run CPU s: rest of Ray",
               "s per 1k rows", "worker peak RSS MiB", "peak vs 1x", "private MiB (RssAnon, sampled)", "private vs 1x", "object-store pages MiB (RssShmem, sampled)",
               "run_training wall s"]  # fmt: skip
    lines = [
        f"## Scale: conf/{CONF}.yaml, 1 epoch, 1 Ray Train worker, {', '.join(f'{f}x' for f in results)} FashionMNIST-sized data",
        "",
        markdown_table(headers, rows),
        "",
        *scale_ratios(results),
    ]
    return "\n".join(lines)


def scale_ratios(results: dict[int, dict[str, Any]]) -> list[str]:
    """At the largest factor against 1x: time per row (1.00x is linear growth) and each loader's peak (streaming's
    should stay at 1.00x); and streamed against in-memory samples/s."""
    small, big = min(results), max(results)
    first, last = results[small], results[big]
    lines = []
    for loader in LOADERS:
        per_row = first[loader]["samples_per_sec"] / last[loader]["samples_per_sec"]  # seconds per row is 1 / samples/s
        lines.append(ratio_line(f"scale, {loader}, seconds per row at {big}x / {small}x", per_row, "1.0x: linear"))
        peak_goal = "1.0x: flat" if loader == "stream" else ""
        lines.append(
            ratio_line(
                f"scale, {loader}, worker peak RSS at {big}x / {small}x", last[loader]["peak_kib"] / first[loader]["peak_kib"], peak_goal
            )
        )
        lines.append(
            ratio_line(
                f"scale, {loader}, worker private memory at {big}x / {small}x",
                last[loader]["private_kib"] / first[loader]["private_kib"],
                peak_goal,
            )
        )
    lines.append(
        ratio_line(
            f"scale, streamed / in-memory samples/s at {big}x",
            last["stream"]["samples_per_sec"] / last["memory"]["samples_per_sec"],
            ">= 0.8x",
        )
    )
    return lines


def main(argv: list[str] | None = None) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--factors", type=int, nargs="+", default=[1, 4, 16], help="data sizes, multiples of FashionMNIST's")
    parser.add_argument("--quick", action="store_true", help="1x and 2x only")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(child(args.child)))
        return ""
    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    results = {}
    for factor in [1, 2] if args.quick else args.factors:
        print(f"  {factor}x ...", flush=True)
        results[factor] = measure(factor)
    text = report(results)
    print("\n" + text)
    return text


if __name__ == "__main__":
    main(sys.argv[1:])
