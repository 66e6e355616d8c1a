"""Online serving: `pipeline serve` (Ray Serve) under a bounded request loop on 127.0.0.1, and a champion swap.

    .venv/bin/python -m bench.serving              # about 2 minutes on 2 cores
    .venv/bin/python -m bench.serving --quick      # 3 s per level: a smoke test
    .venv/bin/python -m bench.serving --seconds 20 --clients 1 8 32 64

Two versions of the MNIST MLP (conf/mnist_mlp.yaml as it is, one epoch on the MNIST-sized stand-ins in
bench/.data) are trained in this process and registered in a SQLite store in a temporary folder; champion on
the first. Then `pipeline serve mnist_mlp_bench@champion --poll-s 1` starts as a user types it (its own local
Ray, one replica of 1 CPU, batches of up to 32 requests, 5 ms batch wait) and, for each level of concurrency,
that many clients (asyncio + aiohttp, keep-alive connections) send requests back to back for --seconds after
a 1 s warm-up: one 28x28 image per request as JSON `instances` (integers 0-255). Reported: requests/s,
latency p50/p99 (request sent to answer read), errors (any answer but 200, and failed connections).

The swap: --swap-clients clients send requests for --swap-seconds; after a third of it the champion alias
moves to the second version. Counted: errors, answers of each version, and the time from the alias move to
the first answer of the new version (at most --poll-s, 1 s, plus the load). The clients share the machine's
cores with the server: on 2 cores the client loop costs the server part of its throughput.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.common import DATA_ROOT, ensure_mnist_data, load_conf, machine_description, markdown_table

MODEL = "mnist_mlp_bench"
POLL_S = 1.0


@dataclass
class Sample:
    sent: float
    latency_s: float
    status: int  # 0: no answer (connection refused or dropped)
    version: int | None


def register_two_versions(folder: Path) -> list[str]:
    """Two MLPs of conf/mnist_mlp.yaml (seeds 0 and 1, one epoch), registered as MODEL; champion on the first."""
    from pipeline.tracking import client
    from pipeline.train import run_training

    versions = []
    for seed in (0, 1):
        cfg = load_conf("mnist_mlp", [f"name={MODEL}_{seed}", f"tracking.register_as={MODEL}", f"seed={seed}", "train.epochs=1",
                                      f"data.root={ensure_mnist_data()}", "data.download=false", f"storage_path={folder / 'runs'}",
                                      "scaling.num_workers=0"])  # fmt: skip
        registration = run_training(cfg).registration
        assert registration is not None, "the run registered no model"
        versions.append(str(registration["version"]))
    client(os.environ["MLFLOW_TRACKING_URI"]).set_registered_model_alias(MODEL, "champion", versions[0])
    return versions


def start_server(port: int) -> subprocess.Popen:
    command = [sys.executable, "-m", "pipeline", "serve", f"{MODEL}@champion", "--port", str(port), "--poll-s", str(POLL_S)]
    server = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"pipeline serve exited {server.returncode}: {server.communicate()}")
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2).close()
            return server
        except OSError:
            time.sleep(0.3)
    os.killpg(server.pid, signal.SIGTERM)
    raise TimeoutError("pipeline serve did not answer within 180 s")


async def request_loop(url: str, body: bytes, clients: int, seconds: float, warmup_s: float = 1.0) -> list[Sample]:
    """`clients` clients, each sending its next request when its last one is answered, for warm-up + seconds."""
    import aiohttp

    samples: list[Sample] = []
    start = time.perf_counter()
    end = start + warmup_s + seconds

    async def one_client(session: aiohttp.ClientSession) -> None:
        while (sent := time.perf_counter()) < end:
            try:
                async with session.post(url, data=body, headers={"Content-Type": "application/json"}) as answer:
                    payload = await answer.json(content_type=None)
                    status = answer.status
            except (aiohttp.ClientError, asyncio.TimeoutError, ValueError):
                status, payload = 0, {}
            if sent >= start + warmup_s:
                samples.append(Sample(sent, time.perf_counter() - sent, status, payload.get("version")))

    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(one_client(session) for _ in range(clients)))
    return samples


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))]


def load_levels(url: str, body: bytes, levels: Sequence[int], seconds: float) -> list[list[object]]:
    rows: list[list[object]] = []
    for clients in levels:
        samples = asyncio.run(request_loop(url, body, clients, seconds))
        latencies = [s.latency_s * 1000 for s in samples if s.status == 200]
        errors = sum(s.status != 200 for s in samples)
        rows.append([clients, len(samples), f"{len(samples) / seconds:,.0f}", f"{statistics.median(latencies):.1f}",
                     f"{percentile(latencies, 99):.1f}", errors])  # fmt: skip
        print(f"  {clients} clients: {rows[-1]}", flush=True)
    return rows


def swap(url: str, body: bytes, versions: list[str], clients: int, seconds: float) -> list[object]:
    """The request loop with the champion alias moved to versions[1] after a third of it."""
    from pipeline.tracking import client

    async def loop_and_move() -> tuple[list[Sample], float]:
        loop = asyncio.create_task(request_loop(url, body, clients, seconds, warmup_s=0))
        await asyncio.sleep(seconds / 3)
        moved = time.perf_counter()
        await asyncio.to_thread(client(os.environ["MLFLOW_TRACKING_URI"]).set_registered_model_alias, MODEL, "champion", versions[1])
        return await loop, moved

    samples, moved = asyncio.run(loop_and_move())
    old, new = int(versions[0]), int(versions[1])
    first_new = min((s.sent + s.latency_s for s in samples if s.version == new), default=float("nan"))
    late_old = sum(s.version == old and s.sent > first_new for s in samples)  # one replica: none
    return [clients, len(samples), sum(s.status != 200 for s in samples), sum(s.version == old for s in samples),
            sum(s.version == new for s in samples), late_old, f"{first_new - moved:.2f}"]  # fmt: skip


def main(argv: Sequence[str]) -> str:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seconds", type=float, default=15.0, help="measured seconds per level (after 1 s of warm-up)")
    parser.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    parser.add_argument("--swap-clients", type=int, default=8)
    parser.add_argument("--swap-seconds", type=float, default=15.0)
    parser.add_argument("--quick", action="store_true", help="3 s per level, 6 s of swap")
    parser.add_argument("--port", type=int, default=0, help="default: a free port")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.swap_seconds = 3.0, 6.0
    with tempfile.TemporaryDirectory(prefix="bench-serving-") as tmp:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{tmp}/mlflow.db"  # nothing lands in the repository
        os.environ.setdefault("MLFLOW_LOGGING_LEVEL", "WARNING")
        ensure_mnist_data(DATA_ROOT)
        started = time.perf_counter()
        versions = register_two_versions(Path(tmp))
        print(f"two versions registered in {time.perf_counter() - started:.0f} s", flush=True)
        port = args.port or _free_port()
        started = time.perf_counter()
        server = start_server(port)
        startup_s = time.perf_counter() - started
        try:
            url = f"http://127.0.0.1:{port}/predict"
            body = json.dumps({"instances": [_digit().tolist()]}).encode()
            levels = load_levels(url, body, args.clients, args.seconds)
            swapped = swap(url, body, versions, args.swap_clients, args.swap_seconds)
        finally:
            os.killpg(server.pid, signal.SIGINT)  # Ctrl-C, as a user stops it
            server.communicate(timeout=60)
    return report(levels, swapped, startup_s, args)


def _digit() -> Any:
    import numpy as np

    return np.random.default_rng(0).integers(0, 256, size=(28, 28), dtype=np.uint8)


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def report(levels: list[list[object]], swapped: list[object], startup_s: float, args: argparse.Namespace) -> str:
    load = markdown_table(["clients", "requests", "requests/s", "p50 ms", "p99 ms", "errors"], levels)
    swap_table = markdown_table(["clients", "requests", "errors", "answered by old", "answered by new",
                                 "old after first new", "alias move to first new answer, s"], [swapped])  # fmt: skip
    text = (
        f"## Serving: `pipeline serve` on 127.0.0.1 ({args.seconds:g} s per level; startup {startup_s:.1f} s)\n\n"
        f"One replica (1 CPU), max_batch_size 32, batch wait 5 ms; one 28x28 image per request (JSON instances).\n\n"
        f"{load}\n\n### Champion swap under load ({args.swap_seconds:g} s, alias moved after a third, --poll-s {POLL_S:g})\n\n"
        f"{swap_table}\n"
    )
    print("\n" + text)
    return text


if __name__ == "__main__":
    print(f"```\n{machine_description()}\n```", flush=True)
    main(sys.argv[1:])
