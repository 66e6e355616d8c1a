"""Where a run executes: the local Ray or the cluster, what the run needs of it, and how it is stopped.

    ensure_ray(verbose)                        # join RAY_ADDRESS, or start a local Ray of our own
    check_fits(cfg, needs)                     # a local Ray too small for the run: ConfigError (exit 2)
    with event_pump(emit) as queue:            # progress events from Ray workers to this process
        result = run_interruptibly(trainer.fit, watch=ResourceWatch(emit, wait_s))

`run_interruptibly` runs Ray's blocking call in a thread while the main thread waits: Ctrl-C and SIGTERM
then reach this process's own code at once (Ray Train and Tune install SIGINT handlers of their own
when called from the main thread, which end a run as "failed" or "stopped early"), and the wait can
show what the run is waiting for on a cluster.
"""

from __future__ import annotations

import contextlib
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, NoReturn, TypeVar

from pipeline.config import ConfigError
from pipeline.errors import RunFailed

__all__ = [
    "Needs",
    "ResourceWaitTimeout",
    "ResourceWatch",
    "Terminated",
    "check_fits",
    "ensure_ray",
    "event_pump",
    "exit_now",
    "install_signal_handlers",
    "on_cluster",
    "ray_call_left_running",
    "run_interruptibly",
]

T = TypeVar("T")
WAIT_NOTICE_AFTER_S = 5.0  # a placement group pending this long is waiting for resources, not starting
WATCH_INTERVAL_S = 1.0
RAY_CALL_THREAD = "pipeline-ray-call"


class Terminated(KeyboardInterrupt):
    """SIGTERM (Kubernetes, systemd, `timeout`): handled as Ctrl-C is, with its own exit code."""


class ResourceWaitTimeout(RunFailed):
    """The cluster did not give the run its resources within scaling.resource_wait_s."""


def install_signal_handlers() -> None:
    """SIGTERM raises Terminated in the main thread, as SIGINT raises KeyboardInterrupt: the run ends
    through the same cleanup (MLflow runs KILLED, Ray stopped). Ray installs its own SIGTERM handler
    when it starts (a signal dump from its C++ core), so ensure_ray calls this again afterwards."""

    def terminate(signum: int, frame: Any) -> None:
        raise Terminated(f"signal {signum}")

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, terminate)


def on_cluster() -> bool:
    return bool(os.environ.get("RAY_ADDRESS"))


def ensure_ray(verbose: bool = False, *, dashboard: bool = False) -> None:
    """Join the cluster in RAY_ADDRESS, or start a local Ray, unless this process is already connected.

    A local Ray starts without its dashboard (about a second less) unless `dashboard`: Ray Train's
    placement-group cleaner asks the dashboard's state API whether a trainer died, and a Tune trial
    stopped early takes its worker group's resources with it otherwise."""
    import ray

    if ray.is_initialized():
        return
    address = os.environ.get("RAY_ADDRESS")
    # SIGTERM's default would kill this process before it hands its MLflow runs back; Ray's handler,
    # set in ray.init, exits without that, so ours is set again right after.
    with contextlib.nullcontext() if address else _local_ray_in_its_own_process_group():
        ray.init(
            # "local": a Ray of our own, never one that happens to run on this machine (ray.init's default
            # joins the newest local cluster, which may lack what this run needs, such as the dashboard).
            address=address or "local",
            include_dashboard=None if address else dashboard,
            log_to_driver=verbose,
            configure_logging=verbose,
        )
    if signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL:
        install_signal_handlers()


@contextmanager
def _local_ray_in_its_own_process_group() -> Iterator[None]:
    """Start a local Ray's processes (GCS, raylet, and through the raylet its workers) outside this process's
    process group, so that a signal to the group (`kill -- -PGID`, GNU `timeout`) reaches this process alone
    and it ends them itself (exit_now). In the group, SIGTERM also ended the raylet, and Ray's core then ended
    this process with exit code 1 about 0.1 s later, at times before its cleanup had run (seen in CI). systemd
    signals every process of its unit's cgroup, Ray's too, as before; Ctrl-C is not changed (Ray's processes
    block SIGINT). Killed (SIGKILL), this process takes the GCS and raylet with it at once, by the kernel's
    parent-death signal Ray sets for them; the raylet's two agents end within about 100 s, when their own
    check finds the raylet gone, as when this process alone is killed. Ray has no option for this; on Windows
    it does the same (CREATE_NEW_PROCESS_GROUP) where the kernel ties children to their parent."""
    from ray._private import services, utils

    popen = getattr(services, "ConsolePopen", None)  # a private name: another Ray may lack it, and then runs as before
    if popen is None or not (sys.platform.startswith("linux") and utils.detect_fate_sharing_support()):
        yield  # without the parent-death signal, Ray's reaper finds its processes by this process group
        return

    class OwnGroupPopen(popen):  # type: ignore[misc,valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, process_group=0, **kwargs)

    services.ConsolePopen = OwnGroupPopen  # type: ignore[misc]
    try:
        yield
    finally:
        services.ConsolePopen = popen  # type: ignore[misc]


def exit_now(code: int) -> NoReturn:
    """End this process's own processes (a local Ray's raylet, GCS and workers) and exit at once, with `code`.

    Not ray.shutdown(), for two reasons. It waits on Ray's processes (~8 s measured, where a run stopped by
    Ctrl-C or SIGTERM must end at once). And while Ray calls go on in other threads (Train's or Tune's fit left
    on an error or Ctrl-C, Tune's own threads), the next one after a shutdown makes Ray's core end the process
    with exit code 1, and an interpreter exit around it can crash (SIGSEGV; both seen in CI). On a cluster, the
    driver's exit ends its job: Ray removes its actors and placement groups. What must outlive the process
    (MLflow's run status, checkpoints) is written before."""
    import psutil

    children = psutil.Process().children(recursive=True)
    for child in children:
        with contextlib.suppress(psutil.Error):
            child.terminate()  # each goes down on its own SIGTERM handling, as `ray stop` asks them to
    _kill_later([child.pid for child in children])
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def _kill_later(pids: list[int], grace_s: int = 3) -> None:
    """As `ray stop` does, kill what has not ended on SIGTERM after a grace period: Ray's runtime-env agent is an
    aiohttp server that waits up to 60 s on a request in flight (seen in CI). The wait runs in a separate `sh`,
    because this process must exit at once (see exit_now)."""
    if pids:
        command = f"sleep {grace_s}; kill -9 {' '.join(map(str, pids))} 2>/dev/null"
        subprocess.Popen(["sh", "-c", command], stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


@dataclass(frozen=True)
class Needs:
    """What a run (or one trial) takes of the cluster at once."""

    cpus: float
    gpus: int
    what: str  # for messages: "2 workers x 1 CPU + 1 CPU for Ray Data's readers"


def check_fits(needs: Needs, fix: str) -> None:
    """On a local Ray, a run that can never be placed would wait forever: refuse it (exit 2), naming what
    it needs and what this machine has. A cluster (RAY_ADDRESS) may grow: it is watched instead."""
    import ray

    if on_cluster():
        return
    have = ray.cluster_resources()
    cpus, gpus = have.get("CPU", 0), have.get("GPU", 0)
    if needs.cpus > cpus or needs.gpus > gpus:
        raise ConfigError(
            f"scaling: the run needs {needs.cpus:g} CPUs and {needs.gpus} GPUs ({needs.what}); this machine's Ray has "
            f"{cpus:g} CPUs and {gpus:g} GPUs: {fix}"
        )


class ResourceWatch:
    """Called every second while a run waits on Ray: a placement group of this run that stays pending is a
    wait for resources. It is said in the progress display (what is asked, what the cluster has free), and
    after `wait_s` (None: as long as it takes, as an autoscaling cluster needs) it ends the run."""

    def __init__(self, emit: Callable[[dict[str, Any]], None], wait_s: float | None) -> None:
        from ray.util import placement_group_table

        self.emit, self.wait_s = emit, wait_s
        self.known = set(placement_group_table())  # other runs' groups on a shared cluster
        self.pending_since: float | None = None
        self.said = ""
        self.nodes = _alive_nodes()  # to name a node lost during the run, should the run then wait

    def __call__(self) -> None:
        from ray.util import placement_group_table

        pending = [g for pid, g in placement_group_table().items() if pid not in self.known and g["state"] == "PENDING"]
        if not pending:
            self.pending_since = None
            return
        now = time.monotonic()
        self.pending_since = self.pending_since or now
        waited = now - self.pending_since
        if waited < WAIT_NOTICE_AFTER_S:
            return
        message = _waiting_message(pending, waited) + self._lost_nodes()
        if self.wait_s is not None and waited > self.wait_s:
            raise ResourceWaitTimeout(f"{message}; gave up after scaling.resource_wait_s={self.wait_s:g}")
        if message.split(";")[1:] != self.said.split(";")[1:] or int(waited) % 30 == 0:
            self.emit({"event": "waiting", "message": message})
            self.said = message

    def _lost_nodes(self) -> str:
        """'; since node ... was lost' for each node alive when the run started and gone now."""
        lost = sorted(self.nodes.keys() - _alive_nodes().keys())
        return "".join(f"; since node {node[:8]} ({self.nodes[node]}) was lost" for node in lost)


def _alive_nodes() -> dict[str, str]:
    """Ray's live nodes: id -> address."""
    import ray

    return {node["NodeID"]: node["NodeManagerAddress"] for node in ray.nodes() if node["Alive"]}


def _waiting_message(pending: list[dict[str, Any]], waited: float) -> str:
    import ray

    asked: dict[str, float] = {}
    for group in pending:
        for bundle in group["bundles"].values():
            for resource, amount in bundle.items():
                asked[resource] = asked.get(resource, 0) + amount
    free, total = ray.available_resources(), ray.cluster_resources()
    wanted = ", ".join(f"{amount:g} {name}" for name, amount in sorted(asked.items()) if name in ("CPU", "GPU"))
    # STRICT_SPREAD wants each worker on a node of its own: free CPUs on one node do not place it.
    strict = sorted({group["strategy"] for group in pending if group.get("strategy", "").startswith("STRICT")})
    placed = f" placed {' and '.join(strict)}" if strict else ""
    has = ", ".join(f"{free.get(name, 0):g} of {total.get(name, 0):g} {name} free" for name in ("CPU", "GPU"))
    return f"waiting {waited:.0f} s for resources: the run asks for {wanted}{placed}; the cluster has {has}"


def run_interruptibly(work: Callable[[], T], watch: Callable[[], None] | None = None) -> T:
    """`work()` in a thread while this thread waits, calling `watch` every second; its result or its error.

    Ctrl-C (KeyboardInterrupt) and SIGTERM (Terminated) are raised here, in the main thread, within a
    second; the thread is a daemon, and what it drives (Ray) is stopped by the caller's cleanup."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["value"] = work()
        except BaseException as err:
            outcome["error"] = err

    thread = threading.Thread(target=target, name=RAY_CALL_THREAD, daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(WATCH_INTERVAL_S)
        if watch and thread.is_alive():
            watch()
    if "error" in outcome:
        raise outcome["error"]
    return outcome["value"]


def ray_call_left_running() -> bool:
    """Whether run_interruptibly's thread still drives Ray (Train's or Tune's fit), the main thread having left it
    on an error (a resource wait given up) or on Ctrl-C: Ray cannot then be shut down safely (see exit_now)."""
    return any(thread.name == RAY_CALL_THREAD and thread.is_alive() for thread in threading.enumerate())


@contextmanager
def sent_in_background(put: Callable[[dict[str, Any]], None] | None) -> Iterator[Callable[[dict[str, Any]], None] | None]:
    """`put` (the event pump's queue's) called by a thread of its own, in order: the training loop hands an event
    over and goes on. A Ray queue's put waits for the queue actor's answer, which took ~20 ms on a busy 2-core
    machine: 4 % of a streamed MLP's epoch waited on progress ticks (docs/BENCHMARKS.md). Every event has been
    put when the block ends; a put that failed is raised there."""
    if put is None:
        yield None
        return
    events: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()
    failed: list[BaseException] = []

    def send() -> None:
        while (event := events.get()) is not None:
            if not failed:
                try:
                    put(event)
                except BaseException as err:  # raised in the loop's thread, at the block's end
                    failed.append(err)

    thread = threading.Thread(target=send, name="pipeline-progress", daemon=True)
    thread.start()
    try:
        yield events.put
    finally:
        events.put(None)
        thread.join()
    if failed:
        raise failed[0]


@contextmanager
def event_pump(emit: Callable[[dict[str, Any]], None]) -> Iterator[Any]:
    """A Ray queue that rank 0 writes progress to, drained by a driver thread while the run goes on."""
    import ray
    from ray.util.queue import Empty, Queue
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    # On this node, with the driver: placed anywhere, a lost node could take the queue (and the run) with it.
    here = NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)
    queue = Queue(actor_options={"num_cpus": 0, "scheduling_strategy": here})
    stop = threading.Event()

    def drain(block: bool) -> None:
        while True:
            try:
                emit(queue.get(block=block, timeout=0.2))
            except Empty:
                return

    def pump() -> None:
        while not stop.is_set():
            try:
                drain(block=True)
            except Exception:
                return

    thread = threading.Thread(target=pump, daemon=True)
    thread.start()
    try:
        yield queue
    except KeyboardInterrupt:  # Ctrl-C or SIGTERM: Ray goes down with this process, nothing more to read
        stop.set()
        raise
    finally:
        if not stop.is_set():
            stop.set()
            thread.join()
            drain(block=False)  # whatever arrived after the thread's last look
            queue.shutdown()
