"""Jobs on a real two-node Ray cluster on this machine: `pipeline submit`, `pipeline jobs`, job specs.

The cluster is two `ray start --block` processes on 127.0.0.1 (a head and a second node with its own
temp dir, as a second machine would have), with Ray's token authentication on, and the jobs log to a real
`mlflow server` on 127.0.0.1: the smoke job to one on PostgreSQL with artifacts in an S3 bucket, as k8s/
deploys it. Nothing is mocked: the job uploads this checkout as its working directory.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

from pipeline.cluster import load_job
from pipeline.registry import load_model
from tests.helpers import REPO, Stack, free_port, metric_steps, mlflow_client, run_cli, runs_of

JOBS_DIR = REPO / "jobs"
NODE_CPUS = 2


@dataclass
class Cluster:
    address: str  # the dashboard, where the Jobs API is
    token: str
    shared: Path  # storage both nodes see
    gcs: str  # host:port, what RAY_ADDRESS names for a driver that joins the cluster
    nodes: list[subprocess.Popen] = field(default_factory=list)  # `ray start --block` processes, the head first
    add_node: Callable[[], None] = lambda: None  # starts another second node and waits until it is alive

    def api(self, path: str) -> dict:
        request = urllib.request.Request(f"{self.address}{path}", headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(request, timeout=10) as reply:
            return json.load(reply)


def _fixed_port() -> int:
    """A free port below the ephemeral range (32768 and up, where every socket Ray opens gets a random
    port) and above Ray's worker ports (10002-19999): nothing started later can take it first."""
    import random

    while True:
        port = random.randrange(20000, 32000)
        with socket.socket() as sock:
            try:
                sock.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port


def _start_node(command: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    # --block keeps the node's processes under this one; its own session lets teardown stop them all.
    with log.open("w") as out:
        return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def _stop_nodes(nodes: list[subprocess.Popen], root: Path) -> None:
    """Kill the nodes' process groups, then anything else that runs from their temp dirs.

    SIGKILL, not SIGTERM: on SIGTERM each node drains for up to 30 s, and the cluster is thrown away."""
    for node in nodes:
        if node.poll() is None:
            os.killpg(node.pid, signal.SIGKILL)
        node.wait()
    subprocess.run(["pkill", "-KILL", "-f", str(root)], check=False)


def _wait_for_nodes(cluster: Cluster, nodes: list[subprocess.Popen], timeout_s: float = 90) -> None:
    """Until the dashboard answers (with the token) and counts every node started as alive."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if any(node.poll() is not None for node in nodes):
            logs = "\n".join(f"--- {log.name}:\n{log.read_text()[-3000:]}" for log in sorted(cluster.shared.parent.glob("*.log")))
            raise RuntimeError(f"a Ray node exited: {[node.returncode for node in nodes]}\n{logs}")
        try:
            found = cluster.api("/api/v0/nodes?limit=100")["data"]["result"]["result"]
        except OSError:  # not up yet
            found = []
        if sum(n["state"] == "ALIVE" for n in found) == len(nodes):
            return
        time.sleep(0.5)
    raise TimeoutError(f"{len(nodes)} Ray nodes were not alive within {timeout_s} s")


@pytest.fixture(scope="module")
def cluster(production_stack: Stack) -> Iterator[Cluster]:
    """A head and a second node, each with 2 logical CPUs, token authentication on (about 20 s).

    Its processes hold the production stack's MLflow credentials and the S3 endpoint and keys, as k8s/
    gives them to the Ray pods from Secrets (never in a job's runtime_env, which the dashboard shows)."""
    # Short paths: Ray's Unix sockets live under the temp dir, and socket paths are limited to ~100 bytes.
    root = Path(tempfile.mkdtemp(prefix="rc", dir="/tmp"))
    token = secrets.token_hex(16)
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, **production_stack.credentials(), **production_stack.s3_env(),
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    gcs_port, dashboard_port = _fixed_port(), _fixed_port()
    ray = shutil.which("ray", path=env["PATH"])
    assert ray is not None, "the ray command is installed with the package"

    def common() -> list[str]:  # its own agent port per node: the default, 52365, is one per machine
        return ["--block", "--node-ip-address=127.0.0.1", f"--num-cpus={NODE_CPUS}", "--disable-usage-stats",
                f"--dashboard-agent-listen-port={_fixed_port()}"]  # fmt: skip

    head = _start_node(
        [ray, "start", "--head", f"--port={gcs_port}", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dashboard_port}", f"--ray-client-server-port={_fixed_port()}", f"--temp-dir={root / 'h'}", *common()],
        env, root / "head.log",
    )  # fmt: skip
    cluster = Cluster(f"http://127.0.0.1:{dashboard_port}", token, root / "shared", f"127.0.0.1:{gcs_port}", [head])

    def add_node() -> None:
        # Each second node has its own temp dir, as on a second machine: sharing one, the nodes would
        # unpack a job's working directory over each other.
        index = len(cluster.nodes)
        cluster.nodes.append(_start_node(
            [ray, "start", f"--address=127.0.0.1:{gcs_port}", f"--temp-dir={root / f'w{index}'}", *common()],
            env, root / f"worker{index}.log",
        ))  # fmt: skip
        _wait_for_nodes(cluster, [node for node in cluster.nodes if node.poll() is None])

    cluster.add_node = add_node
    try:
        _wait_for_nodes(cluster, cluster.nodes)
        add_node()
        yield cluster
    finally:
        _stop_nodes(cluster.nodes, root)
        shutil.rmtree(root, ignore_errors=True)


def _job_env(cluster: Cluster, mlflow_url: str, **extra: str) -> dict[str, str]:
    env = {**os.environ, "RAY_AUTH_TOKEN": cluster.token, "MLFLOW_TRACKING_URI": mlflow_url,
           "PIPELINE_STORAGE": str(cluster.shared / "runs"), "PIPELINE_DATA": str(cluster.shared / "data"), **extra}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    return env


def _last_json(text: str) -> dict:
    """The job's own `--output json` line, among the job's log lines that `--follow` streams to stdout."""
    return json.loads(next(line for line in reversed(text.splitlines()) if line.startswith("{")))


@pytest.mark.cluster
@pytest.mark.workers
@pytest.mark.mlflow_server
def test_smoke_job_trains_across_both_nodes_and_registers_on_the_production_stack(
    cluster: Cluster, production_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The tracking stack k8s/ deploys: the MLflow server on PostgreSQL with authentication, the model's
    # artifacts in an S3 bucket. The job signs in with the nodes' credentials; this test with the same.
    mlflow_server = production_stack.tracking_uri
    for key, value in production_stack.credentials().items():
        monkeypatch.setenv(key, value)
    submitted = run_cli(
        "submit", str(JOBS_DIR / "linear_regression_smoke.yaml"), "name=cluster_smoke",
        "scaling.placement_strategy=STRICT_SPREAD",  # one worker per node, or the job waits
        "tracking.system_metrics_interval_s=0.2",  # samples within the job's seconds of training
        "--address", cluster.address, "--follow",
        env=_job_env(cluster, mlflow_server, PIPELINE_STORAGE=f"s3://{production_stack.bucket}/cluster-runs"),  # checkpoints in S3
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stdout[-3000:] + submitted.stderr[-3000:]
    job_id = submitted.stdout.splitlines()[0]
    assert job_id.startswith("linear_regression_smoke-")
    assert f"job {job_id}: SUCCEEDED" in submitted.stderr

    # The job's own result line, streamed back by --follow: a version registered on the server.
    summary = _last_json(submitted.stdout)
    client = mlflow_client(mlflow_server)
    champion = client.get_model_version_by_alias("cluster_smoke", "champion")
    assert champion.version == summary["registration"]["version"]
    assert champion.run_id == summary["mlflow_run_id"]
    # Rank 0 logged every epoch from wherever it ran, through the runtime env's MLFLOW_TRACKING_URI.
    assert metric_steps(client, summary["mlflow_run_id"], "val_mse") == [1, 2]
    assert client.get_run(summary["mlflow_run_id"]).info.status == "FINISHED"
    # The machine's figures, once: both Ray nodes here share one address, so Ray Train counts one node with
    # local ranks 0 and 1, and local rank 0 monitors it. (Machines of their own: system/node_N/..., below.)
    logged = client.get_run(summary["mlflow_run_id"]).data.metrics
    assert "system/cpu_utilization_percentage" in logged and not [key for key in logged if key.startswith("system/node_")]

    # Checkpoints are in the bucket, where the job's storage_path put them, written by the workers of both nodes.
    folder = f"cluster-runs/cluster_smoke/{summary['run_key']}/"
    assert sorted({key[len(folder) :].split("/")[0] for key in production_stack.keys(folder) if "checkpoint_epoch=" in key}) == [
        "checkpoint_epoch=0001", "checkpoint_epoch=0002"]  # fmt: skip
    assert summary["checkpoint"].startswith(f"s3://{production_stack.bucket}/{folder}")

    # The registered model loads back through the server, its weights read from the bucket: y = 2 x0 - 3.4 x1 + 4.2.
    predicted = load_model("cluster_smoke@champion", tracking_uri=mlflow_server).predict_table(np.array([[1.0, 1.0]], dtype=np.float32))
    assert predicted["value"][0] == pytest.approx(2.0 - 3.4 + 4.2, abs=0.3)
    assert [key for key in production_stack.keys("artifacts/") if key.endswith("/weights.pt")]  # the model's files are in S3

    # Two DDP workers, one on each node.
    ray_job_id = cluster.api(f"/api/jobs/{job_id}")["job_id"]
    workers = cluster.api(
        "/api/v0/actors?limit=1000&detail=true&filter_keys=class_name&filter_predicates=%3D&filter_values=RayTrainWorker"
    )["data"]["result"]["result"]  # fmt: skip
    nodes = [w["node_id"] for w in workers if w["job_id"] == ray_job_id]
    assert len(nodes) == 2 and len(set(nodes)) == 2


@pytest.mark.cluster
@pytest.mark.workers  # the job it stops is the smoke job's 2-worker training
@pytest.mark.mlflow_server
def test_jobs_status_logs_and_stop(cluster: Cluster, mlflow_server: str) -> None:
    env = _job_env(cluster, mlflow_server)
    address = ["--address", cluster.address]
    submitted = run_cli("submit", str(JOBS_DIR / "linear_regression_smoke.yaml"), "name=cluster_stop",
                        "train.epochs=100000", *address, env=env)  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr[-3000:]
    job_id = submitted.stdout.strip()
    status = run_cli("jobs", "status", job_id, *address, env=env)
    assert status.returncode == 0 and status.stdout.split(":")[0].strip() in ("PENDING", "RUNNING"), status.stdout

    stopped = run_cli("jobs", "stop", job_id, *address, env=env)
    assert stopped.returncode == 0 and "stopping" in stopped.stdout
    # --follow ends with the job, and says it did not succeed.
    followed = run_cli("jobs", "logs", job_id, "--follow", *address, env=env)
    assert followed.returncode == 1
    assert f"job {job_id}: STOPPED" in followed.stderr
    logs = run_cli("jobs", "logs", job_id, *address, env=env)
    assert "Running entrypoint" in logs.stdout


@pytest.mark.cluster
@pytest.mark.mlflow_server
def test_a_job_that_fails_on_the_cluster_exits_1(cluster: Cluster, mlflow_server: str) -> None:
    # Valid here, wrong there: the data root is not writable on the cluster.
    env = _job_env(cluster, mlflow_server, PIPELINE_DATA="/proc/no-such-folder")
    followed = run_cli("submit", str(JOBS_DIR / "linear_regression_smoke.yaml"), "name=cluster_fail",
                       "--address", cluster.address, "--follow", env=env)  # fmt: skip
    assert followed.returncode == 1
    assert ": FAILED" in followed.stderr


@pytest.mark.cluster
@pytest.mark.mlflow_server  # the cluster's nodes sign in to the production stack (its fixture starts it)
def test_a_missing_or_wrong_token_is_refused_with_the_fix(cluster: Cluster, tmp_path: Path) -> None:
    env = {**os.environ, "HOME": str(tmp_path)}  # no ~/.ray/auth_token either
    for name in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        env.pop(name, None)
    missing = run_cli("jobs", "status", "any", "--address", cluster.address, env=env)
    assert missing.returncode == 2
    assert "token authentication" in missing.stderr and "needs a token" in missing.stderr and "RAY_AUTH_TOKEN" in missing.stderr
    wrong = run_cli("jobs", "status", "any", "--address", cluster.address, env={**env, "RAY_AUTH_TOKEN": "0" * 32})
    assert wrong.returncode == 2 and "refused the token" in wrong.stderr
    unknown = run_cli("jobs", "status", "no-such-job", "--address", cluster.address, env={**env, "RAY_AUTH_TOKEN": cluster.token})
    assert unknown.returncode == 2 and "no such job" in unknown.stderr


# --- without a cluster: everything that is refused before submission -------------------------------


def test_an_unreachable_address_fails_in_seconds() -> None:
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    # A closed port, and a port that accepts connections but never answers, like a host behind a
    # firewall that drops packets: that one ends by the check's timeout (Ray's client has none).
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        for address in (f"http://127.0.0.1:{free_port()}", f"http://127.0.0.1:{silent.getsockname()[1]}"):
            result = run_cli("submit", str(JOBS_DIR / "linear_regression_smoke.yaml"), "--address", address, env=env, timeout=60)
            assert result.returncode == 2, result.stderr
            assert f"--address {address}: no Ray dashboard answered" in result.stderr
    no_address = run_cli("jobs", "status", "x", env={k: v for k, v in env.items() if k != "RAY_API_SERVER_ADDRESS"})
    assert no_address.returncode == 2 and "--address http://HOST:8265" in no_address.stderr


def test_every_job_spec_is_valid_and_runs_a_pipeline_command() -> None:
    specs = sorted(JOBS_DIR.glob("*.yaml"))
    assert any("smoke" in spec.name for spec in specs)
    for spec in specs:
        job = load_job(spec, environ={})  # the defaults of ${VAR:-default} alone make a valid job
        assert job.entrypoint.startswith("python -m pipeline "), spec
        assert job.runtime_env["env_vars"]["MLFLOW_TRACKING_URI"].startswith("http"), spec
        assert ".venv" in job.runtime_env["excludes"]


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"entrypoint": {"command": "train", "conf": "conf/nope.yaml"}}, "entrypoint.conf: conf/nope.yaml is not a file"),
        ({"entrypoint": {"command": "train", "conf": "conf/linear_regression.yaml", "overrides": ["optim.lrr=0.1"]}},
         "optim.lrr: unknown key"),
        ({"entrypoint": {"command": "fit", "conf": "conf/linear_regression.yaml"}}, "entrypoint.command"),
        ({"resources": {"num_cpus": 1}}, "resources.num_cpus: unknown key; the keys here are: entrypoint_memory"),
        ({"runtime_env": {"env_vars": {"MLFLOW_TRACKING_URI": "${NO_SUCH_VARIABLE_SET}"}}},
         "runtime_env.env_vars.MLFLOW_TRACKING_URI: ${NO_SUCH_VARIABLE_SET} is not set"),
        ({"runtime_env": {"env_vars": {}}}, "runtime_env.env_vars.MLFLOW_TRACKING_URI is missing"),
        ({"entrypoint": {"command": "predict", "conf": "conf/linear_regression.yaml"}},
         "entrypoint: command predict takes input, model, options, out (input, model, out required); got conf"),
        ({"entrypoint": {"command": "predict", "model": "m@champion", "input": "d/", "out": "o", "options": ["--workers", "2"]}},
         "entrypoint: options ['--workers']: predict's options here are --engine, --actors, --batch-size"),
        ({"entrypoint": {"command": "predict", "model": "just_a_name", "input": "d/", "out": "o"}}, "entrypoint.model: 'just_a_name': write NAME@ALIAS"),
    ],
)  # fmt: skip
def test_a_bad_job_spec_is_refused_before_submission(tmp_path: Path, edit: dict, message: str) -> None:
    import yaml

    spec = yaml.safe_load((JOBS_DIR / "linear_regression_smoke.yaml").read_text())
    spec.update(edit)
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(spec))
    # An address nobody answers at: the spec must be refused before the address is even tried.
    result = run_cli("submit", str(path), "--address", f"http://127.0.0.1:{free_port()}",
                     env={k: v for k, v in os.environ.items() if k != "NO_SUCH_VARIABLE_SET"})  # fmt: skip
    assert result.returncode == 2
    assert message in result.stderr, result.stderr
    assert "no Ray dashboard answered" not in result.stderr


def test_the_batch_inference_job_runs_pipeline_predict_on_ray_data_with_the_spec_s_paths() -> None:
    job = load_job(JOBS_DIR / "batch_inference.yaml", environ={"PIPELINE_INPUT": "s3://data/points/", "PIPELINE_OUT": "/mnt/shared/out-2"})
    assert job.entrypoint == "python -m pipeline predict fashion_mnist_cnn@champion s3://data/points/ --out /mnt/shared/out-2 --engine ray"
    assert job.resources == {"entrypoint_num_cpus": 1}  # the driver writes the parts; the actors ask for their own


def test_the_printed_entrypoint_hides_credentials_and_secret_values() -> None:
    from pipeline.redaction import printable

    shown = printable("python -m pipeline train conf/x.yaml tracking.uri=http://alice:pw1@host:5000 "
                      "model.kwargs.api_token=tok2 storage_path=s3://key:sec3@bucket/runs optim.lr=0.1")  # fmt: skip
    assert not any(secret in shown for secret in ("pw1", "tok2", "sec3"))
    assert "optim.lr=0.1" in shown and "host:5000" in shown and "model.kwargs.api_token=***" in shown
    nested = printable("python -m pipeline train conf/x.yaml 'model.kwargs={api_token: tok4, hidden: 8}'")
    assert "tok4" not in nested and "api_token: " in nested and "***" in nested and "hidden: 8" in nested


@pytest.mark.cluster
@pytest.mark.mlflow_server  # the cluster's nodes sign in to the production stack (its fixture starts it)
def test_a_run_waiting_for_resources_says_what_it_waits_for_and_gives_up_after_resource_wait_s(cluster: Cluster, tmp_path: Path) -> None:
    # 6 workers of 1 CPU on a cluster of 2 x 2 CPUs: an autoscaling cluster would add a node; this one never will.
    env = {**os.environ, "RAY_ADDRESS": cluster.gcs, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": cluster.token}
    started = time.monotonic()
    done = run_cli("train", "conf/linear_regression.yaml", "name=too_big", f"storage_path={cluster.shared / 'runs'}",
                   f"data.root={tmp_path}", "scaling.num_workers=6", "scaling.resource_wait_s=12", env=env, timeout=240)  # fmt: skip
    assert done.returncode == 1, done.stderr[-3000:]
    assert "s for resources: the run asks for 6 CPU; the cluster has" in done.stderr and "of 4 CPU free" in done.stderr
    assert "error: training failed: " in done.stderr and "gave up after scaling.resource_wait_s=12" in done.stderr
    assert "Traceback" not in done.stderr
    assert time.monotonic() - started < 120


# ---------------------------------------------------------------------------------------------------
# A lost node. Each test kills the second node's Ray processes (SIGKILL) mid-run and starts a new second
# node when done, for the tests after it.


def _train_until_checkpoint(cluster: Cluster, stack: Stack, name: str, *overrides: str) -> str:
    """Submit a long smoke job on both nodes with its checkpoints in the bucket; its id, once it has two."""
    submitted = run_cli("submit", str(JOBS_DIR / "linear_regression_smoke.yaml"), f"name={name}", "data.num_samples=4000",
                        *overrides, "--address", cluster.address,
                        env=_job_env(cluster, stack.tracking_uri, PIPELINE_STORAGE=f"s3://{stack.bucket}/lost-node"))  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    job_id = submitted.stdout.splitlines()[0]
    deadline = time.monotonic() + 240
    while len([key for key in stack.keys(f"lost-node/{name}/") if key.endswith("/meta.json")]) < 2:
        assert time.monotonic() < deadline, f"{name}: no second checkpoint in the bucket within 240 s"
        time.sleep(0.5)
    return job_id


def _lose_second_node(cluster: Cluster) -> None:
    node = cluster.nodes[-1]  # the second node now: an earlier test may have lost one and added another
    os.killpg(node.pid, signal.SIGKILL)  # the node's raylet, its workers, its agents: as when a machine goes away
    node.wait()


@pytest.mark.cluster
@pytest.mark.workers
@pytest.mark.mlflow_server
def test_an_elastic_training_loses_a_node_and_finishes_on_the_other_from_its_last_checkpoint(
    cluster: Cluster, production_stack: Stack, monkeypatch: pytest.MonkeyPatch
) -> None:
    for key, value in production_stack.credentials().items():
        monkeypatch.setenv(key, value)
    epochs = 12
    try:
        # A worker takes a whole node (2 CPUs): 2 workers while both nodes live, 1 when one is left.
        job_id = _train_until_checkpoint(cluster, production_stack, "elastic", "scaling.num_workers=[1,2]", "scaling.cpus_per_worker=2",
                                         "train.max_failures=2", f"train.epochs={epochs}")  # fmt: skip
        _lose_second_node(cluster)
        followed = run_cli("jobs", "logs", job_id, "--follow", "--address", cluster.address,
                           env=_job_env(cluster, production_stack.tracking_uri), timeout=600)  # fmt: skip
    finally:
        cluster.add_node()
    assert followed.returncode == 0, followed.stdout[-3000:] + followed.stderr[-3000:]
    summary = _last_json(followed.stdout)
    assert summary["epochs"] == epochs and summary["registration"]["version"] == "1"

    client = mlflow_client(production_stack.tracking_uri)
    (run,) = runs_of(client, "elastic")  # one MLflow run, each epoch logged once
    assert run.info.run_id == summary["mlflow_run_id"] and run.info.status == "FINISHED"
    assert metric_steps(client, run.info.run_id, "val_mse") == list(range(1, epochs + 1))
    # The group's size each epoch, as the last checkpoint's history holds it: 2 workers until the node
    # was lost, then 1, the epochs before kept (a start from scratch would have 1 worker throughout).
    sizes = [int(m.value) for m in sorted(client.get_metric_history(run.info.run_id, "workers"), key=lambda m: m.step)]
    lost_at = sizes.index(1)
    assert sizes == [2] * lost_at + [1] * (epochs - lost_at) and lost_at >= 2
    assert len(client.search_model_versions("name = 'elastic'")) == 1


@pytest.mark.cluster
@pytest.mark.workers
@pytest.mark.mlflow_server
def test_a_fixed_group_that_no_longer_fits_after_a_lost_node_says_so_and_gives_up_after_resource_wait_s(
    cluster: Cluster, production_stack: Stack
) -> None:
    try:
        job_id = _train_until_checkpoint(cluster, production_stack, "fixed", "scaling.num_workers=2", "scaling.placement_strategy=STRICT_SPREAD",
                                         "train.max_failures=2", "train.epochs=40", "scaling.resource_wait_s=10")  # fmt: skip
        _lose_second_node(cluster)
        followed = run_cli("jobs", "logs", job_id, "--follow", "--address", cluster.address,
                           env=_job_env(cluster, production_stack.tracking_uri), timeout=600)  # fmt: skip
    finally:
        cluster.add_node()
    assert followed.returncode == 1, followed.stdout[-3000:]
    assert "for resources: the run asks for 2 CPU placed STRICT_SPREAD; the cluster has 2 of 2 CPU free" in followed.stdout
    assert re.search(r"since node \w{8} \(\S+\) was lost; gave up after scaling\.resource_wait_s=10", followed.stdout)
