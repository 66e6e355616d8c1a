"""The Kubernetes manifests in k8s/ and the Dockerfile: no cluster, a second or two.

Both overlays are built by a small resolver here that implements the kustomize features k8s/ uses and
no others (resources, namespace, images, JSON 6902 patches; anything else in a kustomization.yaml fails
the build), and, where a `kustomize` or `kubectl` binary is installed, the resolver's output is checked
against `kustomize build` / `kubectl kustomize`. The checks then read the built manifests: images,
the RayJob's entrypoint and conf, Service ports, security contexts, Secrets, GPU settings, token auth,
network policies.

    .venv/bin/pytest tests/test_k8s.py -q
"""

from __future__ import annotations

import copy
import re
import shlex
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from pipeline.config import load_config
from tests.helpers import REPO

K8S = REPO / "k8s"
OVERLAYS = ("cpu-dev", "gpu")
# The Secrets the README tells the user to create, and the one KubeRay generates for token auth
# (named after the RayCluster, key auth_token).
USER_SECRETS = {"mlflow-postgres", "mlflow-minio", "mlflow-auth"}
RAY_TOKEN_SECRET = "pipeline"
MAIN_ENTRYPOINT = "python -m pipeline run /app/conf/fashion_mnist_cnn.yaml storage_path=/mnt/shared/runs data.root=/mnt/shared/data"
WORKLOAD_KINDS = ("Deployment", "StatefulSet", "Job", "DaemonSet")


# ----------------------------------------------------------------------------------------------------------
# The resolver: kustomize's resources, namespace, images and JSON 6902 patches.


def load_documents(path: Path) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc is not None]


def build(directory: Path) -> list[dict[str, Any]]:
    """What `kustomize build directory` gives, for the features k8s/ uses."""
    kustomization = yaml.safe_load((directory / "kustomization.yaml").read_text())
    unsupported = set(kustomization) - {"apiVersion", "kind", "namespace", "resources", "images", "patches"}
    if unsupported:
        raise ValueError(f"{directory}/kustomization.yaml: {sorted(unsupported)}: not implemented by this "
                         "test's resolver; implement them here, or keep k8s/ to resources, namespace, images "
                         "and patches")  # fmt: skip
    docs: list[dict[str, Any]] = []
    for resource in kustomization.get("resources", []):
        path = directory / resource
        docs += build(path) if path.is_dir() else copy.deepcopy(load_documents(path))
    for patch in kustomization.get("patches", []):
        if "target" not in patch or len(set(patch) & {"path", "patch"}) != 1 or len(patch) != 2:
            raise ValueError(f"{directory}: patch {patch}: only JSON 6902 patches (target, path or patch) resolve here")
        targets = [doc for doc in docs if _matches(doc, patch["target"])]
        if len(targets) != 1:
            raise ValueError(f"{directory}: patch {patch} matches {len(targets)} resources, not 1")
        text = patch["patch"] if "patch" in patch else (directory / patch["path"]).read_text()
        operations = yaml.safe_load(text)
        if not isinstance(operations, list):
            raise TypeError(f"{directory}: patch {patch}: a JSON 6902 patch is a list of operations")
        for operation in operations:
            _apply(targets[0], operation)
    for image in kustomization.get("images", []):
        for container in _all_containers_anywhere(docs):
            container["image"] = _retarget(container["image"], image)
    if "namespace" in kustomization:
        for doc in docs:
            doc["metadata"]["namespace"] = kustomization["namespace"]
    return docs


def _matches(doc: dict[str, Any], target: dict[str, str]) -> bool:
    group, _, version = doc["apiVersion"].rpartition("/")
    wanted = {"group": group, "version": version, "kind": doc["kind"], "name": doc["metadata"]["name"]}
    unknown = set(target) - set(wanted)
    if unknown:
        raise ValueError(f"patch target {target}: {sorted(unknown)} not resolved here")
    return all(wanted[key] == value for key, value in target.items())


def _apply(doc: dict[str, Any], operation: dict[str, Any]) -> None:
    """One JSON 6902 operation (RFC 6902: add, replace, remove)."""
    op, path = operation["op"], operation["path"]
    keys = [key.replace("~1", "/").replace("~0", "~") for key in path.lstrip("/").split("/")]
    parent: Any = doc
    for key in keys[:-1]:
        parent = parent[int(key)] if isinstance(parent, list) else parent[key]
    last = keys[-1]
    if op not in ("add", "replace", "remove"):
        raise ValueError(f"JSON 6902 op {op!r} at {path}: only add, replace and remove are resolved here")
    if isinstance(parent, list):
        index = len(parent) if last == "-" else int(last)
        if op == "add":
            parent.insert(index, copy.deepcopy(operation["value"]))
        elif op == "replace":
            parent[index] = copy.deepcopy(operation["value"])
        else:
            del parent[index]
        return
    if op in ("replace", "remove") and last not in parent:
        raise ValueError(f"JSON 6902 {op} at {path}: no such key")
    if op == "remove":
        del parent[last]
    else:
        parent[last] = copy.deepcopy(operation["value"])


def _split_image(image: str) -> tuple[str, str | None, str | None]:
    name, _, digest = image.partition("@")
    slash = name.rfind("/")
    colon = name.rfind(":")
    if colon > slash:
        return name[:colon], name[colon + 1 :], digest or None
    return name, None, digest or None


def _retarget(image: str, rule: dict[str, str]) -> str:
    name, tag, digest = _split_image(image)
    if name != rule["name"]:
        return image
    name = rule.get("newName", name)
    tag = str(rule["newTag"]) if "newTag" in rule else tag
    digest = rule.get("digest", digest)
    return name + (f":{tag}" if tag else "") + (f"@{digest}" if digest else "")


def _all_containers_anywhere(node: Any) -> Iterator[dict[str, Any]]:
    """Every `containers` / `initContainers` item at any depth, as kustomize's image transformer finds them."""
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("containers", "initContainers") and isinstance(value, list):
                yield from (item for item in value if isinstance(item, dict) and "image" in item)
            else:
                yield from _all_containers_anywhere(value)
    elif isinstance(node, list):
        for item in node:
            yield from _all_containers_anywhere(item)


# ----------------------------------------------------------------------------------------------------------
# Views of the built manifests.


@pytest.fixture(scope="module", params=OVERLAYS)
def overlay(request: pytest.FixtureRequest) -> tuple[str, list[dict[str, Any]]]:
    return request.param, build(K8S / "overlays" / request.param)


@pytest.fixture(scope="module")
def built() -> dict[str, list[dict[str, Any]]]:
    return {name: build(K8S / "overlays" / name) for name in OVERLAYS}


def one(docs: list[dict[str, Any]], kind: str, name: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc["kind"] == kind and doc["metadata"]["name"] == name]
    assert len(found) == 1, f"expected one {kind} {name}, found {len(found)}"
    return found[0]


def pod_templates(doc: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(where, pod template) for every pod a resource makes, KubeRay's included."""
    where = f"{doc['kind']} {doc['metadata']['name']}"
    if doc["kind"] in WORKLOAD_KINDS:
        return [(where, doc["spec"]["template"])]
    if doc["kind"] in ("RayCluster", "RayService"):
        cluster = doc["spec"]["rayClusterConfig"] if doc["kind"] == "RayService" else doc["spec"]
        head = [(f"{where} head", cluster["headGroupSpec"]["template"])]
        workers = [(f"{where} group {g['groupName']}", g["template"]) for g in cluster.get("workerGroupSpecs", [])]
        return head + workers
    if doc["kind"] == "RayJob" and "submitterPodTemplate" in doc["spec"]:
        return [(f"{where} submitter", doc["spec"]["submitterPodTemplate"])]
    return []


def containers(pod_spec: dict[str, Any]) -> list[dict[str, Any]]:
    return [*pod_spec.get("initContainers", []), *pod_spec["containers"]]


def all_pods(docs: list[dict[str, Any]]) -> Iterator[tuple[str, dict[str, Any]]]:
    for doc in docs:
        yield from pod_templates(doc)


def worker_groups(docs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return one(docs, "RayCluster", "pipeline")["spec"]["workerGroupSpecs"]


def ray_container(template: dict[str, Any]) -> dict[str, Any]:
    return template["spec"]["containers"][0]  # KubeRay's convention: the Ray container comes first


def labels_match(selector: dict[str, str], labels: dict[str, str]) -> bool:
    return all(labels.get(key) == value for key, value in selector.items())


def env_of(container: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {item["name"]: item for item in container.get("env", [])}


def pyproject_version() -> str:
    match = re.search(r'^version\s*=\s*"([^"]+)"', (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert match, "pyproject.toml has no version"
    return match.group(1)


def kustomizations() -> list[Path]:
    return sorted(K8S.rglob("kustomization.yaml"))


# ----------------------------------------------------------------------------------------------------------
# The files.


def test_every_yaml_file_parses_and_every_resource_is_a_kubernetes_object() -> None:
    files = sorted([*K8S.rglob("*.yaml"), *K8S.rglob("*.yml")])
    assert files, "no YAML under k8s/"
    resources, patches = set(), set()
    for kustomization in kustomizations():
        spec = yaml.safe_load(kustomization.read_text())
        resources |= {(kustomization.parent / r).resolve() for r in spec.get("resources", [])}
        patches |= {(kustomization.parent / p["path"]).resolve() for p in spec.get("patches", []) if "path" in p}
    for path in files:
        docs = load_documents(path)  # raises on invalid YAML
        if path.name == "kustomization.yaml":
            continue
        assert path.resolve() in resources | patches, f"{path}: in no kustomization.yaml's resources or patches"
        if path.resolve() in patches:
            assert len(docs) == 1 and isinstance(docs[0], list), f"{path}: a JSON 6902 patch is one list of operations"
            continue
        assert docs, f"{path}: empty"
        for doc in docs:
            assert isinstance(doc, dict) and doc.get("apiVersion") and doc.get("kind"), f"{path}: {doc!r:.80}"
            assert doc.get("metadata", {}).get("name"), f"{path}: a {doc['kind']} without metadata.name"


def test_kustomizations_name_files_that_exist() -> None:
    assert {p.parent.name for p in kustomizations()} >= {"base", *OVERLAYS}
    for kustomization in kustomizations():
        spec = yaml.safe_load(kustomization.read_text())
        for resource in spec.get("resources", []):
            path = kustomization.parent / resource
            assert path.is_file() or (path / "kustomization.yaml").is_file(), f"{kustomization}: {resource} missing"
        for patch in spec.get("patches", []):
            inline_or_file = "patch" in patch or (kustomization.parent / patch["path"]).is_file()
            assert inline_or_file, f"{kustomization}: {patch} missing"


def test_both_overlays_build_without_duplicates(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = overlay
    keys = [(doc["kind"], doc["metadata"]["name"]) for doc in docs]
    assert len(keys) == len(set(keys)), f"{name}: duplicate resources"
    assert {kind for kind, _ in keys} >= {"RayCluster", "RayJob", "RayService", "Deployment", "StatefulSet", "Service",
                                         "PersistentVolumeClaim", "Job", "NetworkPolicy"}  # fmt: skip
    assert {doc["metadata"].get("namespace") for doc in docs} == {"pipeline"}


def _kustomize_command() -> list[str] | None:
    if shutil.which("kustomize"):
        return ["kustomize", "build"]
    if shutil.which("kubectl"):
        return ["kubectl", "kustomize"]
    return None


@pytest.mark.parametrize("name", OVERLAYS)
def test_the_resolver_builds_what_kustomize_builds(name: str) -> None:
    command = _kustomize_command()
    if command is None:
        pytest.skip("neither kustomize nor kubectl is installed: the overlays were built by the test's resolver only")
    command = [*command, str(K8S / "overlays" / name)]
    result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr
    assert _by_key(load_documents_text(result.stdout)) == _by_key(build(K8S / "overlays" / name))


def _by_key(docs: list[Any]) -> dict[tuple[str, str], Any]:
    return {(d["kind"], d["metadata"]["name"]): d for d in docs}


def load_documents_text(text: str) -> list[Any]:
    return [doc for doc in yaml.safe_load_all(text) if doc is not None]


# ----------------------------------------------------------------------------------------------------------
# Images and the Dockerfile.


@pytest.mark.parametrize("directory", ["base", *(f"overlays/{name}" for name in OVERLAYS)])
def test_images_are_ours_or_pinned(directory: str) -> None:
    docs = build(K8S / directory)
    ours = f"pipeline:{pyproject_version()}"
    images = {container["image"] for _, template in all_pods(docs) for container in containers(template["spec"])}
    assert ours in images
    for image in images - {ours}:
        name, tag, digest = _split_image(image)
        assert not name.startswith("pipeline"), f"{image}: our image is {ours} (the version in pyproject.toml)"
        assert digest or (tag and tag != "latest"), f"{image}: pin third-party images to a release tag or digest"


def test_the_dockerfile_installs_the_package_as_uid_1000() -> None:
    dockerfile = (REPO / "Dockerfile").read_text()
    lines = [line.strip() for line in dockerfile.splitlines()]
    instructions = [line for line in lines if line and not line.startswith("#")]
    assert instructions[0] == "FROM python:3.11-slim"
    assert "WORKDIR /app" in instructions
    for source in ("pyproject.toml", "README.md", "pipeline/", "conf/", "jobs/"):
        assert any(i.startswith("COPY") and source in i.split() for i in instructions), f"Dockerfile copies no {source}"
    assert re.search(r'pip install --no-cache-dir "\.\[cluster\]"', dockerfile)
    assert re.search(r"useradd[^\n]*--uid 1000[^\n]* ray\b", dockerfile)
    assert [i for i in instructions if i.startswith("USER")][-1] in ("USER 1000", "USER 1000:1000", "USER ray")
    ray_version = re.search(r"^ARG RAY_VERSION=(\S+)", dockerfile, re.MULTILINE)
    raycluster = one(build(K8S / "base"), "RayCluster", "pipeline")
    assert ray_version and raycluster["spec"]["rayVersion"] == ray_version.group(1), (
        "spec.rayVersion must be the image's Ray version (Dockerfile ARG RAY_VERSION)"
    )
    ignored = set((REPO / ".dockerignore").read_text().split())
    assert ignored >= {".venv", "runs", "data", "mlruns", "mlartifacts", "mlflow.db", "test-artifacts", ".git",
                       "bench/results"}  # fmt: skip


def test_the_cluster_extra_has_the_mlflow_server_drivers() -> None:
    """The image's `.[cluster]` serves the MLflow server: PostgreSQL store and S3 artifacts."""
    extra = re.search(r"^cluster\s*=\s*\[(.*)\]$", (REPO / "pyproject.toml").read_text(), re.MULTILINE)
    assert extra, "pyproject.toml: no optional-dependencies extra `cluster` (the Dockerfile installs .[cluster])"
    assert '"psycopg[binary]"' in extra.group(1) and '"boto3"' in extra.group(1)  # psycopg 3: what SQLAlchemy 2.1 uses for postgresql://


# ----------------------------------------------------------------------------------------------------------
# Ray: the cluster and the job.


def test_ray_resources_are_ray_io_v1_with_autoscaling_and_token_auth(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = overlay
    for doc in docs:
        if doc["kind"] in ("RayCluster", "RayJob", "RayService"):
            assert doc["apiVersion"] == "ray.io/v1"
    spec = one(docs, "RayCluster", "pipeline")["spec"]
    assert spec["authOptions"]["mode"] == "token"
    assert spec["enableInTreeAutoscaling"] is True
    assert spec["autoscalerOptions"]["idleTimeoutSeconds"] > 0
    head = ray_container(spec["headGroupSpec"]["template"])
    assert {p["containerPort"] for p in head["ports"]} >= {8265, 6379, 10001, 8080}
    for group in spec["workerGroupSpecs"]:
        assert 0 <= group["minReplicas"] <= group["maxReplicas"]
        assert "replicas" not in group, "the autoscaler owns replicas; applying the manifest again must not reset it"
    job = one(docs, "RayJob", "pipeline-main")["spec"]
    assert job["clusterSelector"] == {"ray.io/cluster": "pipeline"}
    assert job["submissionMode"] == "K8sJobMode"
    assert not job.get("shutdownAfterJobFinishes"), "a selected cluster is shared: the job must not delete it"


def test_the_ray_job_runs_a_pipeline_command_on_a_conf_of_this_repo(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    name, docs = overlay
    entrypoint = one(docs, "RayJob", "pipeline-main")["spec"]["entrypoint"]
    if name == "cpu-dev":
        assert entrypoint == MAIN_ENTRYPOINT
    python, dash_m, module, command, conf, *overrides = shlex.split(entrypoint)
    assert (python, dash_m, module) == ("python", "-m", "pipeline")
    assert command in ("train", "tune", "run")
    assert conf.startswith("/app/conf/"), "the image has the confs in /app/conf"
    local_conf = REPO / conf.removeprefix("/app/")
    assert local_conf.is_file(), f"{conf}: no {local_conf.relative_to(REPO)} in this repository"
    cfg = load_config(local_conf, overrides)  # the overrides are valid keys and values
    assert cfg.storage_path.startswith("/mnt/shared/") and cfg.data.root.startswith("/mnt/shared/")


def test_the_ray_service_serves_pipeline_serve_s_application_on_our_image(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    """The RayService runs what `pipeline serve` runs (pipeline.service:build_app) with arguments it accepts, its
    replicas reach the in-cluster MLflow, and the namespace reaches Serve's port."""
    import importlib

    from pipeline.service import parse_args

    _, docs = overlay
    service = one(docs, "RayService", "pipeline-serve")["spec"]
    config = yaml.safe_load(service["serveConfigV2"])
    assert config["http_options"] == {"host": "0.0.0.0", "port": 8000}
    (app,) = config["applications"]
    module, _, name = app["import_path"].partition(":")
    assert (module, name) == ("pipeline.service", "build_app") and callable(getattr(importlib.import_module(module), name))
    args = parse_args(app["args"])  # ServeArgs: unknown keys, bad values and a bad model reference raise
    assert args.tracking_uri == "http://mlflow:5000" and args.model.endswith("@champion") and args.most_replicas >= 1
    cluster = service["rayClusterConfig"]
    assert cluster["rayVersion"] == one(docs, "RayCluster", "pipeline")["spec"]["rayVersion"]
    assert cluster["authOptions"]["mode"] == "token"
    assert cluster["headGroupSpec"]["rayStartParams"]["num-cpus"] == "0", "replicas go to workers"
    serve_cpus = min(int(ray_container(g["template"])["resources"]["limits"]["cpu"]) for g in cluster["workerGroupSpecs"])
    assert serve_cpus >= args.num_cpus, "a worker pod holds at least one replica"
    for where, template in pod_templates(one(docs, "RayService", "pipeline-serve")):
        container = ray_container(template)
        assert env_of(container)["MLFLOW_TRACKING_URI"]["value"] == args.tracking_uri, where
        assert 8000 in {p["containerPort"] for p in container["ports"]}, f"{where}: Serve's proxy port"
        labels = template["metadata"]["labels"]
        policies = [d["spec"] for d in docs if d["kind"] == "NetworkPolicy" and d["spec"]["podSelector"].get("matchLabels")
                    and labels_match(d["spec"]["podSelector"]["matchLabels"], labels)]  # fmt: skip
        ports = {p["port"] for spec in policies for rule in spec["ingress"] if rule["from"] == [{"podSelector": {}}] for p in rule["ports"]}
        assert 8000 in ports, f"{where}: the namespace's pods cannot reach Serve"
        assert any(rule["from"] == [{"podSelector": spec["podSelector"]}] and "ports" not in rule
                   for spec in policies for rule in spec["ingress"]), f"{where}: its Ray nodes cannot reach each other"  # fmt: skip


def test_the_shared_volume_is_read_write_many_and_on_every_ray_node(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = overlay
    assert one(docs, "PersistentVolumeClaim", "pipeline-shared")["spec"]["accessModes"] == ["ReadWriteMany"]
    for where, template in pod_templates(one(docs, "RayCluster", "pipeline")):
        claims = {v["name"]: v["persistentVolumeClaim"]["claimName"]
                  for v in template["spec"]["volumes"] if "persistentVolumeClaim" in v}  # fmt: skip
        mounts = {m["mountPath"]: m["name"] for m in ray_container(template)["volumeMounts"]}
        assert claims.get(mounts.get("/mnt/shared")) == "pipeline-shared", f"{where}: /mnt/shared is not the PVC"
        assert env_of(ray_container(template))["MLFLOW_TRACKING_URI"]["value"] == "http://mlflow:5000", where


def test_the_gpu_overlay_has_gpu_workers_and_cpu_dev_has_none(built: dict[str, list[dict[str, Any]]]) -> None:
    for group in worker_groups(built["gpu"]):
        pod = group["template"]["spec"]
        assert int(ray_container(group["template"])["resources"]["limits"]["nvidia.com/gpu"]) >= 1
        assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
        assert pod["nodeSelector"], "GPU workers need a GPU node selector"
        assert (group["minReplicas"], group["maxReplicas"]) == (0, 4)
    gpu_job = shlex.split(one(built["gpu"], "RayJob", "pipeline-main")["spec"]["entrypoint"])
    assert "scaling.use_gpu=true" in gpu_job, "from 0 GPU workers the job must ask for GPUs, or it trains on CPUs"
    for group in worker_groups(built["cpu-dev"]):
        assert "nvidia.com/gpu" not in yaml.safe_dump(group)
        assert not group["template"]["spec"].get("tolerations")
        assert (group["minReplicas"], group["maxReplicas"]) == (0, 2)
    assert "nvidia.com/gpu" not in yaml.safe_dump_all(built["cpu-dev"])


# ----------------------------------------------------------------------------------------------------------
# Services, MLflow, Secrets.


def test_every_service_target_port_is_a_container_port_of_its_pods(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = overlay
    for service in (doc for doc in docs if doc["kind"] == "Service"):
        name = service["metadata"]["name"]
        pods = [t for _, t in all_pods(docs) if labels_match(service["spec"]["selector"], t["metadata"]["labels"])]
        assert pods, f"Service {name} selects no pod"
        ports = {p for t in pods for c in t["spec"]["containers"] for port in c.get("ports", [])
                 for p in (port["containerPort"], port.get("name"))}  # fmt: skip
        for port in service["spec"]["ports"]:
            assert port.get("targetPort", port["port"]) in ports, f"Service {name}: {port} matches no containerPort"


def _mlflow_container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    return one(docs, "Deployment", "mlflow")["spec"]["template"]["spec"]["containers"][0]


def _options(command: list[str]) -> dict[str, str]:
    """`--key=value` and `--key value` alike."""
    options: dict[str, str] = {}
    for index, item in enumerate(command):
        if item.startswith("--"):
            key, eq, value = item.partition("=")
            if not eq and index + 1 < len(command) and not command[index + 1].startswith("--"):
                value = command[index + 1]
            options[key] = value
    return options


def test_the_mlflow_server_is_reachable_by_its_service_names_and_port_forward(
    overlay: tuple[str, list[dict[str, Any]]],
) -> None:
    _, docs = overlay
    container = _mlflow_container(docs)
    command = [*container.get("command", []), *container.get("args", [])]
    assert command[:2] == ["mlflow", "server"]
    options = _options(command)
    hosts = set(options["--allowed-hosts"].split(","))
    in_cluster = {"mlflow", "mlflow:5000", "mlflow.pipeline.svc.cluster.local:5000"}
    assert hosts >= in_cluster | {"localhost:5000", "127.0.0.1:5000"}  # the last two: kubectl port-forward
    assert options["--port"] == "5000" and options["--host"] == "0.0.0.0"
    assert options["--backend-store-uri"] == "postgresql://$(POSTGRES_USER):$(POSTGRES_PASSWORD)@postgres:5432/mlflow"
    assert options["--artifacts-destination"] == "s3://mlflow" and "--serve-artifacts" in options
    env = env_of(container)
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == "http://minio:9000"
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "POSTGRES_USER", "POSTGRES_PASSWORD", "MLFLOW_AUTH_ADMIN_PASSWORD",
                 "MLFLOW_FLASK_SERVER_SECRET_KEY"):  # fmt: skip
        assert "secretKeyRef" in env[name]["valueFrom"], f"mlflow: {name} must come from a Secret"
    for probe in ("readinessProbe", "livenessProbe"):
        assert container[probe]["httpGet"]["path"] == "/health"


def _secret_names(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            if key in ("secretKeyRef", "secretRef") and isinstance(value, dict):
                yield value["name"]
            elif key == "secret" and isinstance(value, dict) and "secretName" in value:
                yield value["secretName"]
            else:
                yield from _secret_names(value)
    elif isinstance(node, list):
        for item in node:
            yield from _secret_names(item)


def test_secrets_are_referenced_never_written(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = overlay
    assert not [doc for doc in docs if doc["kind"] == "Secret"], "Secrets stay out of git (k8s/README.md creates them)"
    assert set(_secret_names(docs)) <= USER_SECRETS | {RAY_TOKEN_SECRET}
    assert set(_secret_names(docs)) >= USER_SECRETS
    sensitive = re.compile(r"PASSWORD|SECRET|TOKEN|ACCESS_KEY|ROOT_USER", re.IGNORECASE)
    for where, template in all_pods(docs):
        for container in containers(template["spec"]):
            for name, item in env_of(container).items():
                assert not (sensitive.search(name) and "value" in item), f"{where}: {name} is written in the manifest"
    text = "\n".join(path.read_text() for path in K8S.rglob("*.yaml"))
    assert not re.search(r"://[^/\s:@$]+:[^@\s$]+@", text), "a URI with a literal password"
    assert not re.search(r"(?im)^\s*(stringData|password)\s*:", text)


def test_every_pod_that_reaches_mlflow_signs_in_from_the_secret(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = overlay
    clients = [
        (where, env_of(c)) for where, template in all_pods(docs) for c in containers(template["spec"]) if "MLFLOW_TRACKING_URI" in env_of(c)
    ]
    assert len(clients) >= 4  # Ray head and workers, the RayService's head and workers
    for where, env in clients:
        for name, key in (("MLFLOW_TRACKING_USERNAME", "username"), ("MLFLOW_TRACKING_PASSWORD", "password")):
            assert env[name]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-auth", "key": key}, f"{where}: {name}"


def test_the_readme_creates_the_secret_keys_the_manifests_use(built: dict[str, list[dict[str, Any]]]) -> None:
    readme = (K8S / "README.md").read_text().replace("\\\n", " ")
    created: dict[str, set[str]] = {}
    for match in re.finditer(r"create secret generic (\S+)([^\n]*)", readme):
        created[match.group(1)] = set(re.findall(r"--from-literal=([\w.-]+)=", match.group(2)))
    used: dict[str, set[str]] = {}
    for docs in built.values():
        for _, template in all_pods(docs):
            for container in containers(template["spec"]):
                for item in container.get("env", []):
                    ref = item.get("valueFrom", {}).get("secretKeyRef")
                    if ref and ref["name"] in USER_SECRETS:
                        used.setdefault(ref["name"], set()).add(ref["key"])
    assert created == used
    assert f"secret {RAY_TOKEN_SECRET} -o jsonpath='{{.data.auth_token}}'" in readme
    for name in OVERLAYS:
        assert f"k8s/overlays/{name}" in readme


# ----------------------------------------------------------------------------------------------------------
# Security.


def test_every_pod_runs_non_root_unprivileged_with_limits(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = overlay
    pods = list(all_pods(docs))
    assert len(pods) >= 7  # head, workers, submitter, mlflow, postgres, minio, bucket job
    for where, template in pods:
        pod = template["spec"].get("securityContext", {})
        assert pod.get("runAsNonRoot") is True and isinstance(pod.get("runAsUser"), int), where
        assert pod.get("seccompProfile") == {"type": "RuntimeDefault"}, where
        assert not template["spec"].get("hostNetwork") and not template["spec"].get("hostPID"), where
        for container in containers(template["spec"]):
            context = container.get("securityContext", {})
            label = f"{where} / {container['name']}"
            assert context.get("privileged") is not True, label
            assert context.get("allowPrivilegeEscalation") is False, label
            assert "ALL" in context.get("capabilities", {}).get("drop", []), label
            assert context.get("runAsNonRoot", pod["runAsNonRoot"]) is True, label
            for bound in ("requests", "limits"):
                assert {"cpu", "memory"} <= set(container.get("resources", {}).get(bound, {})), f"{label}: {bound}"
    autoscaler = one(docs, "RayCluster", "pipeline")["spec"]["autoscalerOptions"]
    assert autoscaler["securityContext"]["allowPrivilegeEscalation"] is False
    assert autoscaler["securityContext"]["runAsNonRoot"] is True
    assert {"cpu", "memory"} <= set(autoscaler["resources"]["limits"])


def test_network_policies_let_in_only_this_namespace(overlay: tuple[str, list[dict[str, Any]]]) -> None:
    _, docs = overlay
    policies = {doc["metadata"]["name"]: doc["spec"] for doc in docs if doc["kind"] == "NetworkPolicy"}

    def selecting(labels: dict[str, str]) -> list[dict[str, Any]]:
        return [spec for spec in policies.values() if spec["podSelector"].get("matchLabels")
                and labels_match(spec["podSelector"]["matchLabels"], labels)]  # fmt: skip

    assert any(spec["podSelector"] == {} and "ingress" not in spec for spec in policies.values()), "no default deny"
    head = selecting({"ray.io/cluster": "pipeline", "ray.io/node-type": "head"})
    head_ports = {p["port"] for spec in head for rule in spec.get("ingress", []) for p in rule.get("ports", [])}
    assert head_ports >= {8265, 6379, 10001}
    ray_pods = {"podSelector": {"matchLabels": {"ray.io/cluster": "pipeline"}}}
    assert any(rule["from"] == [ray_pods] and "ports" not in rule  # Ray pods among themselves, every port
               for spec in selecting({"ray.io/cluster": "pipeline"}) for rule in spec["ingress"])  # fmt: skip
    assert selecting({"app.kubernetes.io/name": "mlflow"})
    for spec in selecting({"app.kubernetes.io/name": "postgres"}):
        assert [peer for rule in spec["ingress"] for peer in rule["from"]] == [
            {"podSelector": {"matchLabels": {"app.kubernetes.io/name": "mlflow"}}}
        ]
    for name, spec in policies.items():
        for rule in spec.get("ingress", []):
            for peer in rule["from"]:
                assert "ipBlock" not in peer, f"NetworkPolicy {name}: no ipBlock"
                if "namespaceSelector" in peer:  # only the KubeRay operator, only to the Jobs API
                    assert peer["podSelector"] == {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}
                    assert [p["port"] for p in rule["ports"]] == [8265]
