"""A registered model over HTTP: a Ray Serve application that follows the model's alias.

    pipeline serve mnist_mlp@champion --port 8000        # the command (cli.py -> deploy, watch_versions)
    app = build_app({"model": "mnist_mlp@champion"})      # the same application from a Serve config file:
    #   applications: [{name: pipeline, import_path: pipeline.service:build_app, args: {model: mnist_mlp@champion}}]

POST /predict takes {"instances": [...]}, {"images": [...]} or {"records": [...]} (payloads.py) and answers
{"model": NAME, "version": V, "predictions": [...]}; a bad request is a 400 naming the shapes the model takes.
GET /healthz answers the name and version a replica serves. Requests are batched on the replica (@serve.batch):
one forward pass for the batch, every request of it answered by the same version.

Each replica follows the alias itself: every `poll_s` seconds it asks the registry which version NAME@ALIAS
names and, when that changed, loads the new version in a thread while the current one keeps answering, then
swaps one reference. A batch holds the version it started with, so no request waits for a load or fails for a
swap. A registry that does not answer: the replica keeps serving its version and logs a warning. Nothing of this
needs a driver, so a KubeRay RayService (k8s/base/rayservice.yaml) follows the alias the same way. NAME/VERSION
is pinned: no polling.
"""

# No `from __future__ import annotations` here: FastAPI reads the endpoints' annotations (Request) at runtime,
# from the methods Serve's ingress rebinds, and a string annotation no longer resolves there (a 422 on every call).
import asyncio
import json
import logging
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator
from ray import serve

from pipeline.errors import BadInput, describe_invalid
from pipeline.payloads import Payload, answer_batch, parse_payload
from pipeline.registry import load_model, parse_ref, resolve_version
from pipeline.serving import InputError, Predictor
from pipeline.tracking import client, resolve_store

if TYPE_CHECKING:
    from ray.serve import Application

__all__ = [
    "Deployed",
    "ModelServer",
    "ModelServerDeployment",
    "ServeArgs",
    "ServeArgsError",
    "build_app",
    "deploy",
    "parse_args",
    "shutdown",
    "watch_versions",
]

APP_NAME = "pipeline"
log = logging.getLogger("ray.serve")  # Serve's logger in a replica: its log files, with the replica's name
# A registry that does not answer is said within seconds, not after MLflow's minutes of retries; the replica
# keeps serving meanwhile. (MLflow reads these when it first makes an HTTP request in the replica.)
MLFLOW_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2", "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1", "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
              "MLFLOW_LOGGING_LEVEL": "WARNING", "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false"}  # fmt: skip


class ServeArgsError(BadInput):
    """Serve arguments (command line or a Serve config file's `args`) that do not make an application."""


class ServeArgs(BaseModel):
    """What build_app takes: the `args` of a Serve config file, or what `pipeline serve` parsed."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="NAME@ALIAS (followed) or NAME/VERSION (pinned)")
    tracking_uri: str | None = Field(None, description="default: MLFLOW_TRACKING_URI, else the local store, resolved here")
    poll_s: float = Field(10.0, gt=0, description="how often a replica asks the registry where the alias points")
    max_batch_size: int = Field(32, ge=1, le=4096)
    batch_wait_ms: float = Field(5.0, ge=0, le=10_000, description="how long a batch waits to fill once a request came")
    replicas: int | None = Field(None, ge=1, description="a fixed number of replicas; or min/max_replicas: autoscaling")
    min_replicas: int | None = Field(None, ge=0)
    max_replicas: int | None = Field(None, ge=1)
    num_cpus: float = Field(1.0, gt=0, description="per replica; also its torch threads (Ray sets OMP_NUM_THREADS)")

    @model_validator(mode="after")
    def _one_scaling(self) -> "ServeArgs":
        parse_ref(self.model)  # a RegistryError (BadInput) naming the two forms
        autoscaled = self.min_replicas is not None or self.max_replicas is not None
        if self.replicas is not None and autoscaled:
            raise ValueError("replicas is a fixed count; min_replicas/max_replicas autoscale: give one or the other")
        if autoscaled and (self.min_replicas or 0) > (self.max_replicas or max(self.min_replicas or 1, 1)):
            raise ValueError(f"min_replicas {self.min_replicas} is more than max_replicas {self.max_replicas}")
        return self

    @property
    def most_replicas(self) -> int:
        if self.min_replicas is not None or self.max_replicas is not None:
            return self.max_replicas or max(self.min_replicas or 1, 1)
        return self.replicas or 1

    def deployment_options(self) -> dict[str, Any]:
        """Serve's options for the deployment: replicas, queue depth, the replicas' CPUs and environment."""
        env = {**MLFLOW_ENV, "MLFLOW_TRACKING_URI": self.tracking_uri or ""}
        # A replica takes at most this many requests at once (Serve's default is 5): enough to fill two batches.
        options: dict[str, Any] = {"max_ongoing_requests": 2 * self.max_batch_size,
                                   "ray_actor_options": {"num_cpus": self.num_cpus, "runtime_env": {"env_vars": env}}}  # fmt: skip
        if self.min_replicas is not None or self.max_replicas is not None:
            low = self.min_replicas if self.min_replicas is not None else 1
            # A full batch in flight per replica is what one replica is for; more waiting than that: scale up.
            options["autoscaling_config"] = {"min_replicas": low, "max_replicas": self.most_replicas,
                                             "target_ongoing_requests": self.max_batch_size}  # fmt: skip
        else:
            options["num_replicas"] = self.replicas or 1
        return options


def parse_args(args: dict[str, Any] | ServeArgs) -> ServeArgs:
    """Validated arguments, the tracking URI resolved here (absolute: replicas run in other folders)."""
    if isinstance(args, dict):
        try:
            args = ServeArgs.model_validate(args)
        except ValidationError as err:
            raise ServeArgsError(describe_invalid(err, "serve", ServeArgs, "arguments")) from None
    if args.tracking_uri is None:
        args = args.model_copy(update={"tracking_uri": resolve_store(None).uri})
    return args


def build_app(args: dict[str, Any] | ServeArgs) -> "Application":
    """The Serve application for `args` (ServeArgs' fields): what `pipeline serve` runs and Serve config files name."""
    checked = parse_args(args)
    return ModelServerDeployment.options(**checked.deployment_options()).bind(checked)


@dataclass(frozen=True)
class Served:
    """One version of the model, loaded: swapped as a whole, so a batch never mixes two versions."""

    version: str
    predictor: Predictor


api = FastAPI(title="pipeline model server", description=__doc__.split("\n\n")[0])


class ModelServer:
    """One replica: the model version it serves, the batch it runs, the alias it follows."""

    def __init__(self, args: ServeArgs) -> None:
        self.args = args
        self.name, self.alias = parse_ref(args.model)
        self.pinned = self.alias.isdigit()
        self.served: Served | None = None
        self.problem = ""  # why the registry was not followed at the last look ("": it was)
        batching: Any = self._predict_batch  # serve.batch's wrapper; its type (a plain callable) omits these setters
        batching.set_max_batch_size(args.max_batch_size)
        batching.set_batch_wait_timeout_s(args.batch_wait_ms / 1000)
        # A replica that cannot load its model at start still starts: it answers 503 and loads the model when the
        # registry has it (a RayService applied before the first training registered anything), instead of
        # failing its start until Serve gives up on the deployment.
        self._refresh()
        self._follower = asyncio.get_running_loop().create_task(self._follow())

    async def _follow(self) -> None:
        while not (self.pinned and self.served):
            await asyncio.sleep(self.args.poll_s)
            await asyncio.to_thread(self._refresh)

    def _refresh(self) -> None:
        """Load the version the reference names now if it is not the one served; never raise (see below)."""
        uri = self.args.tracking_uri or resolve_store(None).uri
        try:
            version = str(resolve_version(client(uri), self.args.model).version)
            if self.served is None or version != self.served.version:
                before = self.served.version if self.served else None
                predictor = load_model(f"{self.name}/{version}", tracking_uri=uri)
                self.served = Served(version, predictor)  # one assignment: the next batch reads the new version
                log.info(f"{self.args.model}: serving version {version}" + (f" (was {before})" if before else ""))
            if self.problem:
                log.info(f"{self.args.model}: the registry answers again")
                self.problem = ""
        # Anything the registry or a download throws (a server away, an alias removed, a damaged version) must not
        # end a replica that serves requests: it keeps its version and says why it could not follow.
        except Exception as err:
            problem = f"{type(err).__name__}: {err}".splitlines()[0][:500]
            if problem != self.problem:
                still = f"still serving version {self.served.version}" if self.served else "no version to serve yet"
                log.warning(
                    f"{self.args.model}: cannot follow the registry ({problem}); {still}; trying again every {self.args.poll_s:g} s"
                )
            self.problem = problem

    def __del__(self) -> None:
        follower = getattr(self, "_follower", None)
        if follower is not None:
            follower.cancel()

    @api.get("/healthz")
    def healthz(self) -> JSONResponse:
        """The model and version this replica serves; 503 while it has none."""
        served = self.served
        body = {"model": self.name, "reference": self.args.model, "version": int(served.version) if served else None,
                "follows": not self.pinned, "problem": self.problem or None}  # fmt: skip
        return JSONResponse(body, status_code=200 if served else 503)

    @api.post("/predict")
    async def predict(self, request: Request) -> JSONResponse:
        """{"instances" | "images" | "records": [...]} -> {"model", "version", "predictions": [one object per input]}."""
        try:
            body = await request.json()
        except ValueError as err:  # not JSON, or not UTF-8
            return _refused(f"the request body is not JSON ({err}); send Content-Type: application/json")
        try:
            payload = parse_payload(body)
        except InputError as err:
            return _refused(str(err))
        if self.served is None:
            return JSONResponse({"error": f"{self.args.model}: no version loaded yet ({self.problem})"}, status_code=503)
        version, answer = await self._predict_batch(payload)
        if isinstance(answer, InputError):
            return _refused(str(answer))
        return JSONResponse({"model": self.name, "version": int(version), "predictions": answer})

    @serve.batch(max_batch_size=32, batch_wait_timeout_s=0.005)  # both set again from the args in __init__
    async def _predict_batch(self, payloads: list[Payload]) -> list[tuple[str, Any]]:
        served = self.served  # read once: the whole batch is answered by this version, even if a swap comes now
        if served is None:
            raise RuntimeError("no model loaded")  # predict checks first, and a loaded model is never unloaded
        # In a thread: the event loop keeps taking requests (and the next batch fills) while the model runs.
        answers = await asyncio.to_thread(answer_batch, served.predictor, payloads)
        return [(served.version, answer) for answer in answers]


def _refused(message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=400)


# Made a deployment here, below everything its endpoints use: Serve's ingress pickles the FastAPI app, and the
# endpoints' globals with it, when it wraps the class; a name defined after that is missing in the replicas.
ModelServerDeployment = serve.deployment(name="ModelServer")(serve.ingress(api)(ModelServer))


# ---------------------------------------------------------------------------------------------------
# The driver: `pipeline serve`


@dataclass(frozen=True)
class Deployed:
    url: str
    version: str  # the version the reference named when the application started
    on_cluster: bool


def deploy(args: ServeArgs, *, host: str | None, port: int, verbose: bool = False) -> Deployed:
    """Check the model, then start Serve on the local Ray (or the cluster in RAY_ADDRESS) and run the application.

    Everything that can be refused is refused before Ray starts: arguments, an unreachable tracking store, an
    unknown model or alias (exit 2). The application is up (its replicas loaded the model) when this returns."""
    from pipeline.errors import RunFailed
    from pipeline.runtime import Needs, check_fits, ensure_ray, on_cluster
    from pipeline.tracking import check_store

    store = resolve_store(args.tracking_uri)
    check_store(store)  # a server that does not answer: said in 5 s
    version = str(resolve_version(client(store.uri), args.model).version)
    args = args.model_copy(update={"tracking_uri": store.uri})
    cluster = on_cluster()
    host = host or ("0.0.0.0" if cluster else "127.0.0.1")  # on a cluster the proxies must be reachable from other pods
    if not verbose:  # Serve's own INFO lines on this side ("Started Serve", "Connecting to existing Serve app")
        logging.getLogger("ray.serve").setLevel(logging.WARNING)
    ensure_ray(verbose)
    check_fits(Needs(args.most_replicas * args.num_cpus, 0, f"{args.most_replicas} replicas x {args.num_cpus:g} CPU"),
               "ask for fewer replicas (--replicas, --max-replicas)")  # fmt: skip
    serve.start(http_options={"host": host, "port": port}, logging_config=None if verbose else {"enable_access_log": False})
    try:
        serve.run(build_app(args), name=APP_NAME, route_prefix="/", blocking=False)
    except RuntimeError as err:  # a replica that failed to start, as Serve reports it after its retries
        raise RunFailed(f"the Serve application did not start: {str(err).strip().splitlines()[-1]}") from None
    shown = "127.0.0.1" if host == "0.0.0.0" else host
    return Deployed(f"http://{shown}:{port}", version, cluster)


def shutdown() -> None:
    """Delete the application: its replicas finish the requests they hold. The caller then stops the local Ray,
    Serve's controller and proxy with it (serve.shutdown() would also kill the controller while its own
    graceful-shutdown call is pending, which Ray reports as a failed task in the terminal)."""
    serve.delete(APP_NAME)


def watch_versions(deployed: Deployed, say: Callable[[str], None], every_s: float) -> None:
    """Until interrupted: ask /healthz every `every_s` seconds and say when another version answers."""
    seen = deployed.version
    while True:
        time.sleep(every_s)
        version = _served_version(deployed.url)
        if version is not None and version != seen:
            say(f"version {version} answers now (was {seen})")
            seen = version


def _served_version(url: str) -> str | None:
    try:
        with urllib.request.urlopen(f"{url}/healthz", timeout=5) as answer:
            version = json.loads(answer.read()).get("version")
    except (OSError, ValueError):  # busy, restarting, or not loaded (503): nothing to say yet
        return None
    return None if version is None else str(version)
