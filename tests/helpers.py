"""What tests share besides fixtures: the `pipeline` command, waiting for files and servers, free ports,
MLflow runs and metric histories, process groups. Fixtures are in conftest.py."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

if TYPE_CHECKING:  # mlflow takes seconds to import: only where a test asks for a client
    from mlflow import MlflowClient
    from mlflow.entities import Run

REPO = Path(__file__).resolve().parent.parent
CONF_DIR = REPO / "conf"
CLI = (sys.executable, "-m", "pipeline")
T = TypeVar("T")

# ---------------------------------------------------------------------------------------------------
# The command line


def run_cli(*args: str, cwd: Path | str = REPO, env: dict[str, str] | None = None, timeout: float = 300,
            console_script: bool = False) -> subprocess.CompletedProcess:  # fmt: skip
    """`python -m pipeline *args` (or the installed `pipeline` script) to its end, output captured as text."""
    program = [str(Path(sys.executable).parent / "pipeline")] if console_script else list(CLI)
    return subprocess.run([*program, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)


def start_cli(*args: str, cwd: Path | str = REPO, env: dict[str, str] | None = None,
              preexec_fn: Callable[[], None] | None = None, new_group: bool = False) -> subprocess.Popen:  # fmt: skip
    """`python -m pipeline *args` in the background, its stdout and stderr piped as text; `new_group`: in a
    process group of its own, which stop_group ends with everything it started."""
    return subprocess.Popen([*CLI, *args], cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            preexec_fn=preexec_fn, start_new_session=new_group)  # fmt: skip


def last_json(stdout: str) -> dict[str, Any]:
    """What `--output json` printed: the last line of stdout."""
    return json.loads(stdout.strip().splitlines()[-1])


def summary_of(done: subprocess.CompletedProcess) -> dict[str, Any]:
    """The `--output json` summary of a command that must have succeeded."""
    assert done.returncode == 0, done.stderr[-3000:]
    return last_json(done.stdout)


def tiny(data_root: Path, storage: Path, *extra: str) -> list[str]:
    """Overrides that shrink any experiment to seconds: local data, one epoch, small batches, no download."""
    return [
        f"data.root={data_root}",
        "data.download=false",
        f"storage_path={storage}",
        "train.epochs=1",
        "data.batch_size=16",
        *extra,
    ]


# ---------------------------------------------------------------------------------------------------
# Waiting for a background process's files


def wait_for(found: Callable[[], T], process: subprocess.Popen, timeout_s: float = 120) -> T:
    """Poll `found` until it gives something truthy, and return that; fail with the process's output if
    the process exits first or `timeout_s` passes."""
    deadline = time.monotonic() + timeout_s
    while not (result := found()):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()
        time.sleep(0.05)
    return result


def wait_for_files(folder: Path, pattern: str, process: subprocess.Popen, *, count: int = 1, timeout_s: float = 120) -> list[Path]:
    """The paths under `folder` that match `pattern`, sorted, once there are `count` of them (see wait_for)."""

    def found() -> list[Path]:
        paths = sorted(folder.glob(pattern))
        return paths if len(paths) >= count else []

    return wait_for(found, process, timeout_s)


def run_dir(storage: Path, name: str, *, search: bool = False) -> Path:
    """The folder of the one run (or search) of `name` under `storage`: <storage>/<name>[-tune]/<key>."""
    (folder,) = [record.parent for record in (storage / f"{name}{'-tune' if search else ''}").glob("*/run.json")]
    return folder


def wait_for_run_dir(storage: Path, name: str, process: subprocess.Popen, *, search: bool = False, timeout_s: float = 120) -> Path:
    """run_dir, once the `pipeline` process has made it."""
    wait_for_files(storage / f"{name}{'-tune' if search else ''}", "*/run.json", process, timeout_s=timeout_s)
    return run_dir(storage, name, search=search)


# ---------------------------------------------------------------------------------------------------
# Servers and process groups


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_http(url: str, process: subprocess.Popen, timeout_s: float = 90) -> None:
    """Until `url` answers; fail at once if the process that should serve it exits."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args!r} exited with {process.returncode}: {process.communicate()}")
        try:
            urllib.request.urlopen(url, timeout=2).close()
            return
        except OSError:
            time.sleep(0.3)
    raise TimeoutError(f"{url} did not answer within {timeout_s} s")


# MLflow 3's server starts a job runner (huey consumers for its GenAI jobs) beside uvicorn unless told not to: the
# tests run no such jobs, and on 2 cores those processes only slow every server's start and the tests beside it.
NO_JOB_RUNNER = {"MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}


def start_mlflow_server(root: Path, port: int, *extra: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:port, its store and artifacts in `root` (the same root: the same runs);
    `extra`: more of its options (`--app-name basic-auth`)."""
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1",
        "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"), *extra,
    ]  # fmt: skip
    server = subprocess.Popen(command, cwd=root, env={**(env or os.environ), **NO_JOB_RUNNER}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", server)
    except BaseException:
        stop_group(server)
        raise
    return server


@dataclass
class Stack:
    """The production tracking stack on 127.0.0.1: `mlflow server` on PostgreSQL with MLflow's basic-auth
    app, artifacts in an S3 bucket."""

    tracking_uri: str
    backend_uri: str  # postgresql://mlflow:PASSWORD@127.0.0.1:PORT/mlflow
    s3_endpoint: str
    bucket: str
    admin_password: str  # of the server's user `admin`
    postgres_root: Path  # the PostgreSQL cluster's folder
    servers: dict[str, subprocess.Popen]  # postgres, s3, mlflow

    def restart_postgres(self) -> None:
        """PostgreSQL stopped (fast shutdown: the server's connections are cut) and started again on its data."""
        server = self.servers["postgres"]
        os.killpg(server.pid, signal.SIGINT)
        server.wait(timeout=60)
        self.servers["postgres"] = run_postgres(self.postgres_root, int(urlsplit(self.backend_uri).port or 5432))

    def keys(self, prefix: str) -> list[str]:
        """The bucket's object keys that start with `prefix`."""
        import boto3

        s3 = boto3.client("s3", endpoint_url=self.s3_endpoint, region_name="us-east-1", aws_access_key_id="test-key",
                          aws_secret_access_key="test-secret")  # fmt: skip
        pages = s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix)
        return [item["Key"] for page in pages for item in page.get("Contents", [])]

    def credentials(self) -> dict[str, str]:
        """What MLflow's client (and `pipeline`) reads to sign in."""
        return {"MLFLOW_TRACKING_USERNAME": "admin", "MLFLOW_TRACKING_PASSWORD": self.admin_password}

    def s3_env(self) -> dict[str, str]:
        """What boto3, pyarrow and MLflow read to reach the bucket (the standard AWS variables)."""
        return {"AWS_ENDPOINT_URL": self.s3_endpoint, "MLFLOW_S3_ENDPOINT_URL": self.s3_endpoint, "AWS_ACCESS_KEY_ID": "test-key",
                "AWS_SECRET_ACCESS_KEY": "test-secret", "AWS_DEFAULT_REGION": "us-east-1"}  # fmt: skip


POSTGRES_BIN = max(Path("/usr/lib/postgresql").glob("*/bin"), default=Path("/usr/lib/postgresql/missing/bin"))  # Debian keeps it off PATH
AS_POSTGRES = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []  # PostgreSQL refuses to run as root


def start_postgres(root: Path, port: int, password: str) -> subprocess.Popen:
    """Debian's PostgreSQL on 127.0.0.1:port, a cluster of its own in `root` with the database `mlflow`
    (user `mlflow`, password authentication)."""
    assert POSTGRES_BIN.is_dir(), "PostgreSQL is installed (.ci/run installs Debian's postgresql)"
    (root / "password").write_text(password)
    if AS_POSTGRES:
        subprocess.run(["chown", "-R", "postgres", str(root)], check=True)
    subprocess.run([*AS_POSTGRES, str(POSTGRES_BIN / "initdb"), "-D", str(root / "data"), "-U", "mlflow", "--auth=scram-sha-256",
                    f"--pwfile={root / 'password'}"], check=True, capture_output=True)  # fmt: skip
    server = run_postgres(root, port)
    env = {**os.environ, "PGPASSWORD": password}
    subprocess.run([str(POSTGRES_BIN / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "mlflow", "mlflow"], env=env, check=True)
    return server


def run_postgres(root: Path, port: int) -> subprocess.Popen:
    """The PostgreSQL server of the cluster in `root`, once it accepts connections (also: again, after a stop)."""
    server = subprocess.Popen(
        [*AS_POSTGRES, str(POSTGRES_BIN / "postgres"), "-D", str(root / "data"), "-p", str(port), "-k", str(root),
         "-c", "listen_addresses=127.0.0.1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True,
    )  # fmt: skip
    deadline = time.monotonic() + 60
    while subprocess.run([str(POSTGRES_BIN / "pg_isready"), "-h", "127.0.0.1", "-p", str(port)], capture_output=True).returncode != 0:
        if server.poll() is not None or time.monotonic() > deadline:
            stop_group(server)
            raise RuntimeError(f"PostgreSQL did not start on port {port}")
        time.sleep(0.3)
    return server


def start_s3(port: int, bucket: str) -> subprocess.Popen:
    """An S3-compatible HTTP endpoint on 127.0.0.1:port (moto's server; MinIO has no package here) with one bucket."""
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    try:
        wait_for_http(f"http://127.0.0.1:{port}/moto-api/", server)
        request = urllib.request.Request(f"http://127.0.0.1:{port}/{bucket}", method="PUT")  # no credentials are checked
        urllib.request.urlopen(request, timeout=10).close()
    except BaseException:
        stop_group(server)
        raise
    return server


def start_mlflow_on_stack(root: Path, port: int, stack: Stack) -> subprocess.Popen:
    """`mlflow server` as k8s/base/mlflow.yaml runs it: PostgreSQL backend store (the auth app's users in
    the same database), artifacts in the S3 bucket served through it (--serve-artifacts: clients need no S3
    credentials), MLflow's basic-auth app with the admin's password from the environment."""
    (root / "auth.ini").write_text(f"[mlflow]\ndefault_permission = READ\ndatabase_uri = {stack.backend_uri}\nadmin_username = admin\n")
    env = {**os.environ, **stack.s3_env(), "MLFLOW_AUTH_CONFIG_PATH": str(root / "auth.ini"),
           "MLFLOW_AUTH_ADMIN_PASSWORD": stack.admin_password, "MLFLOW_FLASK_SERVER_SECRET_KEY": stack.admin_password[::-1],
           **NO_JOB_RUNNER}  # fmt: skip
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port), "--workers", "1", "--app-name", "basic-auth",
        "--backend-store-uri", stack.backend_uri, "--artifacts-destination", f"s3://{stack.bucket}/artifacts", "--serve-artifacts",
    ]  # fmt: skip
    with (root / "mlflow.log").open("w") as log:
        server = subprocess.Popen(command, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/health", server, timeout_s=120)  # creates the tables first
    except Exception as err:
        stop_group(server)
        raise RuntimeError(f"mlflow server on the stack did not start: {(root / 'mlflow.log').read_text()[-3000:]}") from err
    return server


class Relay:
    """A TCP relay 127.0.0.1:port -> 127.0.0.1:target that a test cuts (connections refused, open ones
    closed) and restores: a server that goes away for a while, without losing its state."""

    def __init__(self, target: int) -> None:
        self.target, self.port = target, free_port()
        self.listener: socket.socket | None = None
        self.open: list[socket.socket] = []
        self.restore()

    def restore(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", self.port))
        threading.Thread(target=self._accept, args=(self.listener,), daemon=True).start()

    def cut(self) -> None:
        # shutdown before close: on Linux, closing a socket that another thread is blocked on (accept, recv)
        # leaves that call running, so the relay would still take one new connection and keep the open ones
        assert self.listener is not None
        for sock in (self.listener, *self.open):
            with contextlib.suppress(OSError):  # already closed by its pump
                sock.shutdown(socket.SHUT_RDWR)
            sock.close()
        self.open.clear()

    def _accept(self, listener: socket.socket) -> None:
        while True:
            try:
                client = listener.accept()[0]
            except OSError:  # cut
                return
            upstream = socket.create_connection(("127.0.0.1", self.target))
            self.open += [client, upstream]
            for source, sink in ((client, upstream), (upstream, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    @staticmethod
    def _pump(source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                end.close()


def stop_group(process: subprocess.Popen) -> None:
    """Stop a process started with start_new_session=True and its children (mlflow server runs uvicorn)."""
    if process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
    process.wait(timeout=30)


# ---------------------------------------------------------------------------------------------------
# MLflow


def mlflow_client(uri: str) -> MlflowClient:
    """A client of `uri` for runs and the registry alike: a test before may have left MLFLOW_REGISTRY_URI
    pointing elsewhere (mlflow.set_registry_uri sets it for the whole process)."""
    from mlflow import MlflowClient

    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def runs_of(client: MlflowClient, experiment: str, *, parent: str | None = None) -> list[Run]:
    """The runs of `experiment` (none if it does not exist); with `parent`, only that run's children."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return []
    return client.search_runs([found.experiment_id], filter_string=f"tags.mlflow.parentRunId = '{parent}'" if parent else "")


def metric_steps(client: MlflowClient, run_id: str, key: str) -> list[int]:
    """The steps at which `key` was logged in the run, sorted: every epoch once reads [1, 2, ..., n]."""
    return sorted(int(m.step) for m in client.get_metric_history(run_id, key))
