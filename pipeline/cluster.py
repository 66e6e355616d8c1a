"""Jobs on a Ray cluster: job specs (jobs/*.yaml), and submit / status / logs / stop through Ray's Jobs API.

A job spec names a `pipeline` command, a conf and overrides (or, for `predict`, a model, a data set and an
output folder: batch inference on the cluster's Ray Data); everything is checked here, before anything
reaches the cluster: the spec's keys, the conf and its overrides (the same `load_config` as a local run),
and the environment variables it refers to (`${VAR}` or `${VAR:-default}`, expanded from the submitter's
environment so that the submitted job is concrete and visible as such in the dashboard).

Ray's token authentication: the token comes from RAY_AUTH_TOKEN, the file in RAY_AUTH_TOKEN_PATH, or
`~/.ray/auth_token` (where `ray start` keeps it), as for Ray's own clients, and travels as a bearer token.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import shlex
import sys
import time
import uuid
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.config import load_config
from pipeline.errors import BadInput, describe_invalid

if TYPE_CHECKING:
    from ray.job_submission import JobSubmissionClient

CONNECT_TIMEOUT_S = 5.0
AGENT_WAIT_S = 60.0
# Never uploaded with the working directory: environments, data, runs and local stores are large and
# belong to this machine (Ray also skips what .gitignore and .rayignore list).
ALWAYS_EXCLUDED = [".venv", ".git", "data", "runs", "mlruns", "mlartifacts", "mlflow.db", "test-artifacts", "bench/results"]
_VARIABLE = re.compile(r"\$\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?::-(?P<default>[^}]*))?\}")


class JobError(BadInput):
    """Bad input for a job: a spec, an address, a token. Exit 2, nothing submitted."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


PREDICT_OPTIONS = ("--engine", "--actors", "--batch-size", "--verbose")


class Entrypoint(_Strict):
    command: Literal["train", "tune", "run", "predict"]
    conf: str | None = Field(None, description="train, tune, run: path inside the working directory, e.g. conf/fashion_mnist_cnn.yaml")
    overrides: list[str] = Field(default_factory=list, description="key.path=value, as on the command line")
    # predict: `pipeline predict MODEL INPUT --out OUT OPTIONS...`, paths as the cluster sees them
    model: str | None = Field(None, description="predict: NAME@ALIAS or NAME/VERSION")
    input: str | None = Field(None, description="predict: a data set on storage every node reads (shared folder, glob, s3://...)")
    out: str | None = Field(None, description="predict: a new folder where the job's driver writes (a shared mount)")
    options: list[str] = Field(default_factory=list, description=f"predict: {', '.join(PREDICT_OPTIONS)} and their values")

    @model_validator(mode="after")
    def _keys_of_the_command(self) -> Entrypoint:
        given = {key for key in ("conf", "overrides", "model", "input", "out", "options") if getattr(self, key)}
        needed, allowed = ({"model", "input", "out"}, {"model", "input", "out", "options"}) if self.command == "predict" else ({"conf"}, {"conf", "overrides"})  # fmt: skip
        if needed - given or given - allowed:
            raise ValueError(f"command {self.command} takes {', '.join(sorted(allowed))} ({', '.join(sorted(needed))} required); "
                             f"got {', '.join(sorted(given)) or 'none'}")  # fmt: skip
        unknown = [o for o in self.options if o.startswith("-") and o.split("=")[0] not in PREDICT_OPTIONS]
        if unknown:
            raise ValueError(f"options {unknown}: predict's options here are {', '.join(PREDICT_OPTIONS)}")
        return self


class RuntimeEnv(_Strict):
    working_dir: str = Field(".", description="uploaded to the cluster; relative to where `pipeline submit` runs")
    env_vars: dict[str, str] = Field(default_factory=dict)
    excludes: list[str] = Field(default_factory=list)
    pip: list[str] = Field(default_factory=list, description="extra packages for this job, installed on the cluster")


class Resources(_Strict):
    # The entrypoint is the Ray driver (the Tune search or the Train controller): it needs little.
    entrypoint_num_cpus: float = Field(0, ge=0)
    entrypoint_num_gpus: float = Field(0, ge=0)
    entrypoint_memory: int = Field(0, ge=0, description="bytes")


class JobSpec(_Strict):
    name: str = Field(pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    description: str = ""
    entrypoint: Entrypoint
    runtime_env: RuntimeEnv = Field(default_factory=RuntimeEnv)
    resources: Resources = Field(default_factory=Resources)


class PreparedJob(BaseModel):
    """A job spec made concrete: what goes to `JobSubmissionClient.submit_job`."""

    name: str
    entrypoint: str
    runtime_env: dict[str, Any]
    resources: dict[str, Any]


def load_job(path: str | Path, overrides: Sequence[str] = (), environ: dict[str, str] | None = None) -> PreparedJob:
    """Read, expand and check a job spec; `overrides` are appended to its entrypoint's."""
    path = Path(path)
    spec = _read_spec(path)
    environ = dict(os.environ) if environ is None else environ
    spec.runtime_env.env_vars = {key: _expand(value, f"{path}: runtime_env.env_vars.{key}", environ)
                                 for key, value in spec.runtime_env.env_vars.items()}  # fmt: skip
    working_dir = Path(spec.runtime_env.working_dir).resolve()
    if not working_dir.is_dir():
        raise JobError(
            f"{path}: runtime_env.working_dir: {working_dir} is not a folder; paths are relative to where `pipeline submit` runs"
        )
    if spec.entrypoint.command == "predict":
        command = _predict_command(spec.entrypoint, path, overrides, environ)
    else:
        command = _experiment_command(spec.entrypoint, path, working_dir, overrides, environ)
    if "MLFLOW_TRACKING_URI" not in spec.runtime_env.env_vars:
        raise JobError(f"{path}: runtime_env.env_vars.MLFLOW_TRACKING_URI is missing: on a cluster every worker must log to "
                       "the same MLflow server, e.g. MLFLOW_TRACKING_URI: ${MLFLOW_TRACKING_URI:-http://mlflow:5000}")  # fmt: skip
    runtime_env: dict[str, Any] = {
        "working_dir": str(working_dir),
        "env_vars": spec.runtime_env.env_vars,
        "excludes": [*ALWAYS_EXCLUDED, *spec.runtime_env.excludes],
    }
    if spec.runtime_env.pip:
        runtime_env["pip"] = spec.runtime_env.pip
    resources = {key: value for key, value in spec.resources.model_dump().items() if value}
    return PreparedJob(name=spec.name, entrypoint=shlex.join(command), runtime_env=runtime_env, resources=resources)


def _experiment_command(
    entrypoint: Entrypoint, path: Path, working_dir: Path, overrides: Sequence[str], environ: dict[str, str]
) -> list[str]:
    """train, tune or run: the conf and its overrides, checked as a local run would check them."""
    assert entrypoint.conf is not None  # the spec's validator requires it
    overrides = [_expand(o, f"{path}: entrypoint.overrides", environ) for o in [*entrypoint.overrides, *overrides]]
    conf = working_dir / entrypoint.conf
    if not conf.is_file():
        raise JobError(f"{path}: entrypoint.conf: {entrypoint.conf} is not a file in the working directory {working_dir}")
    load_config(conf, overrides)  # the cluster would refuse the same config: refuse it here, before submitting
    return ["python", "-m", "pipeline", entrypoint.command, entrypoint.conf, *overrides, "--output", "json"]


def _predict_command(entrypoint: Entrypoint, path: Path, overrides: Sequence[str], environ: dict[str, str]) -> list[str]:
    """Batch inference: the model, the data set and the output folder name what the cluster sees; they are
    checked there, before any work (`pipeline predict` refuses an unknown model, a missing column, an OUT that exists)."""
    if overrides:
        raise JobError(f"{path}: a predict job takes no key.path=value overrides (got {list(overrides)}); edit its entrypoint")
    where = f"{path}: entrypoint"
    model, data, out = (_expand(str(getattr(entrypoint, key)), f"{where}.{key}", environ) for key in ("model", "input", "out"))
    if "@" not in model and "/" not in model:
        raise JobError(f"{where}.model: {model!r}: write NAME@ALIAS (e.g. fashion_mnist_cnn@champion) or NAME/VERSION")
    options = [_expand(o, f"{where}.options", environ) for o in entrypoint.options]
    return ["python", "-m", "pipeline", "predict", model, data, "--out", out, *options]


def _read_spec(path: Path) -> JobSpec:
    if not path.is_file():
        raise JobError(f"{path}: no such job spec; the job specs are in jobs/*.yaml")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise JobError(f"{path}: not valid YAML: {getattr(err, 'problem', err)}") from None
    if not isinstance(raw, dict):
        raise JobError(f"{path}: a job spec is a mapping with name, entrypoint, runtime_env and resources")
    try:
        return JobSpec.model_validate(raw)
    except ValidationError as err:
        raise JobError(describe_invalid(err, str(path), JobSpec, "job spec")) from None


def _expand(text: str, where: str, environ: dict[str, str]) -> str:
    def value(match: re.Match[str]) -> str:
        name, default = match.group("name"), match.group("default")
        if name in environ:
            return environ[name]
        if default is not None:
            return default
        raise JobError(f"{where}: ${{{name}}} is not set; export {name}, or write ${{{name}:-default}}")

    return _VARIABLE.sub(value, text)


# --- talking to the cluster ------------------------------------------------------------------------


def auth_headers(environ: dict[str, str] | None = None) -> dict[str, str]:
    """The bearer token for a cluster with token authentication, from where Ray's own clients find it."""
    environ = dict(os.environ) if environ is None else environ
    token = environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = Path(environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        if path.is_file():
            token = path.read_text().strip()
        elif "RAY_AUTH_TOKEN_PATH" in environ:
            raise JobError(f"RAY_AUTH_TOKEN_PATH: {path} does not exist")
    return {"Authorization": f"Bearer {token}"} if token else {}


def connect(address: str | None, quiet: bool = True) -> JobSubmissionClient:
    """A Jobs API client for the dashboard at `address`, after a check that answers in seconds.

    `quiet`: Ray's INFO and WARNING lines about packaging the working directory are hidden."""
    import requests
    from ray.job_submission import JobSubmissionClient

    if quiet:  # after `import ray`, which sets these levels itself
        for name in ("ray", "ray.dashboard.modules.dashboard_sdk", "ray.dashboard.modules.job.sdk"):
            logging.getLogger(name).setLevel(logging.ERROR)

    address = (address or os.environ.get("RAY_API_SERVER_ADDRESS", "")).rstrip("/")
    if not address:
        raise JobError("no cluster address: give --address http://HOST:8265 (the Ray dashboard) or set RAY_API_SERVER_ADDRESS")
    if not address.startswith(("http://", "https://")):
        raise JobError(f"--address {address}: write the dashboard's URL, e.g. http://127.0.0.1:8265")
    headers = auth_headers()
    try:  # the client itself waits without a timeout on an address that drops packets
        reply = requests.get(f"{address}/api/version", headers=headers, timeout=CONNECT_TIMEOUT_S)
    except requests.RequestException as err:
        raise JobError(f"--address {address}: no Ray dashboard answered within {CONNECT_TIMEOUT_S:.0f} s "
                       f"({type(err).__name__}); is the cluster up, and is 8265 port-forwarded?") from None  # fmt: skip
    if reply.status_code in (401, 403):
        problem = "needs a token" if reply.status_code == 401 else "refused the token"
        raise JobError(f"--address {address}: the cluster has Ray token authentication on and {problem}: set RAY_AUTH_TOKEN "
                       "(on the head: `ray get-auth-token`; on KubeRay: the cluster's auth Secret)")  # fmt: skip
    if reply.status_code != 200:
        raise JobError(f"--address {address}: answered HTTP {reply.status_code} at /api/version; is it a Ray dashboard?")
    return JobSubmissionClient(address, headers=headers)


def submit(client: JobSubmissionClient, job: PreparedJob, agent_wait_s: float = AGENT_WAIT_S) -> str:
    """Submit; the id names the spec, so that `ray job list` and the dashboard say which job it is.

    A cluster that has just started answers "No available agent" until its head's agent is up: that
    one answer is retried for `agent_wait_s`."""
    submission_id = f"{job.name}-{uuid.uuid4().hex[:8]}"
    deadline = time.monotonic() + agent_wait_s
    while True:
        try:
            return client.submit_job(entrypoint=job.entrypoint, submission_id=submission_id, runtime_env=job.runtime_env,
                                     metadata={"job_spec": job.name}, **job.resources)  # fmt: skip
        except RuntimeError as err:
            if "No available agent" not in str(err) or time.monotonic() > deadline:
                raise
            time.sleep(1)


def follow_logs(client: JobSubmissionClient, job_id: str) -> None:
    """Stream the job's log to stdout until the job ends."""

    async def tail() -> None:
        async for lines in client.tail_job_logs(job_id):
            sys.stdout.write(lines)
            sys.stdout.flush()

    asyncio.run(tail())


def job_outcome(client: JobSubmissionClient, job_id: str) -> tuple[str, str]:
    """(status, message) of a job; raises JobError for an id the cluster does not know."""
    try:
        info = client.get_job_info(job_id)
    except RuntimeError as err:
        if "404" in str(err) or "does not exist" in str(err):
            raise JobError(f"job {job_id}: the cluster knows no such job; `ray job list` lists them") from None
        raise
    return str(info.status.value if hasattr(info.status, "value") else info.status), info.message or ""
