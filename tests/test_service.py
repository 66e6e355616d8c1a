"""Online serving: `pipeline serve` (Ray Serve) and `mlflow models serve` answering over HTTP on 127.0.0.1.

The request contract (payloads.py) is checked in-process against small untrained models (fast tier). The
servers are real: `pipeline serve` started as a user types it, with its own local Ray, on a model registered
on a real `mlflow server`; one server answers the image, array, bad-request and health checks, then follows
the alias while a request loop runs, then stops on Ctrl-C (in that order: the tests share it).
"""

from __future__ import annotations

import base64
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest

from pipeline.config import load_config
from pipeline.serving import InputError, Predictor
from tests.helpers import CONF_DIR, free_port, mlflow_client, run_cli, start_cli, stop_group, tiny, wait_for_http

MODEL = "served_api_mlp"


def png_base64(image: np.ndarray) -> str:
    """A (1, H, W) uint8 image as a base64 PNG file, what a client sends."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image[0]).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def post(url: str, body: Any, timeout: float = 30) -> tuple[int, dict[str, Any]]:
    """(status, JSON answer) of a POST, errors included."""
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as err:
        return err.code, json.loads(err.read() or b"{}")


def rows(table: pd.DataFrame) -> list[dict[str, Any]]:
    return [{k: v.item() if isinstance(v, np.generic) else v for k, v in row.items()} for row in table.to_dict("records")]


# ---------------------------------------------------------------------------------------------------
# The request contract, in-process (no Ray, no MLflow)


@pytest.fixture(scope="module")
def mnist_predictor(data_root: Path) -> Predictor:
    return _untrained("mnist_mlp.yaml", [f"data.root={data_root}", "data.download=false"])


@pytest.fixture(scope="module")
def circles_predictor(tmp_path_factory: pytest.TempPathFactory) -> Predictor:
    return _untrained("circles_classifier.yaml", [f"data.root={tmp_path_factory.mktemp('circles')}", "data.num_samples=200"])


def _untrained(conf: str, overrides: list[str]) -> Predictor:
    import torch

    from pipeline.data.store import materialize
    from pipeline.models import model_for
    from pipeline.serving import build_predictor

    cfg = load_config(CONF_DIR / conf, overrides)
    spec = materialize(cfg.data, cfg.seed)
    torch.manual_seed(0)
    return build_predictor(cfg, spec, model_for(cfg, spec).state_dict())


def test_instances_and_png_images_are_the_model_s_uint8_batch(mnist_predictor: Predictor) -> None:
    from pipeline.payloads import parse_payload

    images = np.random.default_rng(0).integers(0, 256, size=(3, 1, 28, 28), dtype=np.uint8)
    from_instances = parse_payload({"instances": images[:, 0].tolist()}).to_batch(mnist_predictor)  # JSON ints, (N, H, W)
    from_pngs = parse_payload({"images": [png_base64(i) for i in images]}).to_batch(mnist_predictor)
    from_data_url = parse_payload({"images": [f"data:image/png;base64,{png_base64(images[0])}"]}).to_batch(mnist_predictor)
    wrapped = png_base64(images[1])
    from_wrapped = parse_payload({"images": ["\n".join(wrapped[i : i + 76] for i in range(0, len(wrapped), 76))]})
    assert np.array_equal(from_wrapped.to_batch(mnist_predictor), images[1:2])
    assert from_instances.dtype == from_pngs.dtype == np.uint8
    assert np.array_equal(from_instances, images) and np.array_equal(from_pngs, images) and np.array_equal(from_data_url, images[:1])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ([1, 2], "JSON list, not an object"),
        ({"instances": [[0]], "images": []}, "exactly one of instances, images, records"),
        ({"inputs": [[0]]}, "exactly one of instances, images, records"),
        ({"instances": []}, "a list of at least one input"),
        ({"images": ["not base64!"]}, "images[0]: not base64"),
        ({"images": [png_base64(np.zeros((1, 28, 28), np.uint8)), "aGVsbG8="]}, "images[1]: not an image that can be read"),
        ({"images": [png_base64(np.zeros((1, 20, 28), np.uint8))]}, "images[0]: 28x20 pixels; this model takes uint8 images"),
        ({"instances": [[[0.5] * 28] * 28]}, "instances of floating-point numbers: this model takes pixels as integers 0-255"),
        ({"instances": [[[300] * 28] * 28]}, "pixel values from 300 to 300"),
        ({"instances": [[0] * 28] * 28}, "28 items read as 1 inputs; each item of instances is one input"),
        ({"instances": [[1, 2, 3]]}, "images of shape (1, 3): this model takes uint8 images (0-255) of shape (N, 1, 28, 28)"),
        ({"records": [{"x": 1}]}, "a table of columns ['x']: this model takes uint8 images"),
        ({"records": [[1, 2]]}, "records[0]: an object {column: value}"),
    ],
)
def test_a_bad_request_is_an_input_error_naming_what_the_model_takes(mnist_predictor: Predictor, body: Any, message: str) -> None:
    from pipeline.payloads import parse_payload

    with pytest.raises(InputError) as refused:
        parse_payload(body).to_batch(mnist_predictor)
    assert message in str(refused.value)


def test_a_table_model_takes_records_and_instances_and_refuses_images(circles_predictor: Predictor) -> None:
    from pipeline.payloads import parse_payload

    features = list(circles_predictor.feature_names)
    points = np.array([[0.1, 0.2], [1.5, -1.0]], np.float32)
    expected = circles_predictor.predict_table(points)
    for body in ({"records": [dict(zip(features, map(float, p), strict=True)) for p in points]}, {"instances": points.tolist()},
                 {"instances": [dict(zip(features, map(float, p), strict=True)) for p in points]}):  # fmt: skip
        assert circles_predictor.predict_table(parse_payload(body).to_batch(circles_predictor)).equals(expected), body
    with pytest.raises(InputError, match=rf"the table lacks columns \['{features[1]}'\]"):
        parse_payload({"records": [{features[0]: 1.0}]}).to_batch(circles_predictor)
    with pytest.raises(InputError, match="images: this model takes a table"):
        parse_payload({"images": [png_base64(np.zeros((1, 2, 2), np.uint8))]}).to_batch(circles_predictor)


def test_a_batch_of_requests_runs_once_and_each_gets_its_own_rows_or_its_own_error(mnist_predictor: Predictor) -> None:
    from pipeline.payloads import answer_batch, parse_payload

    images = np.random.default_rng(1).integers(0, 256, size=(5, 1, 28, 28), dtype=np.uint8)
    payloads = [parse_payload({"instances": images[:2].tolist()}), parse_payload({"instances": [[1, 2, 3]]}),
                parse_payload({"images": [png_base64(i) for i in images[2:]]})]  # fmt: skip
    answers = answer_batch(mnist_predictor, payloads)
    # Equal to float32 rounding, not bit for bit: one batch of 5 and batches of 2 and 3 may sum in another order.
    pd.testing.assert_frame_equal(
        pd.DataFrame(answers[0]), mnist_predictor.predict_table(images[:2]), check_exact=False, rtol=1e-5, check_dtype=False
    )
    assert isinstance(answers[1], InputError) and "(N, 1, 28, 28)" in str(answers[1])
    pd.testing.assert_frame_equal(
        pd.DataFrame(answers[2]), mnist_predictor.predict_table(images[2:]), check_exact=False, rtol=1e-5, check_dtype=False
    )


def test_serve_args_are_checked_and_become_serve_s_deployment_options() -> None:
    from pipeline.service import ServeArgsError, build_app, parse_args

    with pytest.raises(ServeArgsError, match="give one or the other"):
        parse_args({"model": "m@champion", "replicas": 2, "max_replicas": 3})
    with pytest.raises(ServeArgsError, match="unknown key"):
        parse_args({"model": "m@champion", "replica": 2})
    with pytest.raises(ServeArgsError, match="write NAME@ALIAS"):
        parse_args({"model": "m"})
    autoscaled = parse_args({"model": "m@champion", "min_replicas": 1, "max_replicas": 4, "tracking_uri": "http://mlflow:5000"})
    options = autoscaled.deployment_options()
    assert options["autoscaling_config"] == {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 32}
    assert options["ray_actor_options"]["runtime_env"]["env_vars"]["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
    assert parse_args({"model": "m/3", "replicas": 2}).deployment_options()["num_replicas"] == 2
    assert type(build_app({"model": "m@champion"})).__name__ == "Application"  # what a Serve config's import_path gets


def test_serve_refuses_an_unknown_model_and_a_taken_port_before_ray_starts() -> None:
    started = time.monotonic()
    done = run_cli("serve", "no_such_model@champion", "--port", str(free_port()), timeout=120)
    assert done.returncode == 2 and "no registered model 'no_such_model'" in done.stderr, done.stderr
    assert "Traceback" not in done.stderr and "Started a local Ray" not in done.stderr
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        done = run_cli("serve", "no_such_model@champion", "--port", str(taken.getsockname()[1]), timeout=120)
    assert done.returncode == 2 and "is in use by another program" in done.stderr, done.stderr
    assert time.monotonic() - started < 90  # two `pipeline` processes (~4 s each idle), neither starting Ray (~15 s)


# ---------------------------------------------------------------------------------------------------
# Real servers


@pytest.fixture(scope="module")
def registered(mlflow_server: str, data_root: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Two versions of one MNIST MLP trained in-process and registered on the server; champion on the first."""
    from pipeline.train import run_training

    storage = tmp_path_factory.mktemp("served")
    versions = []
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("MLFLOW_TRACKING_URI", mlflow_server)
        for name, hidden, seed in ((f"{MODEL}_a", "[32]", 0), (f"{MODEL}_b", "[16]", 1)):
            overrides = tiny(data_root, storage, f"name={name}", f"tracking.register_as={MODEL}", f"seed={seed}",
                             "scaling.num_workers=0", f"model.hidden={hidden}")  # fmt: skip
            registration = run_training(load_config(CONF_DIR / "mnist_mlp.yaml", overrides)).registration
            assert registration is not None
            versions.append(registration["version"])
    client = mlflow_client(mlflow_server)
    client.set_registered_model_alias(MODEL, "champion", str(versions[0]))
    images = np.random.default_rng(2).integers(0, 256, size=(4, 1, 28, 28), dtype=np.uint8)
    return {"versions": [str(v) for v in versions], "images": images, "uri": mlflow_server}


def _terminal() -> None:
    """Before exec: SIGINT at its default, as a command typed in a terminal has it (a background job of a shell
    script inherits it ignored, and Python would never raise KeyboardInterrupt)."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.fixture(scope="module")
def server(registered: dict[str, Any]) -> Iterator[dict[str, Any]]:
    """`pipeline serve MODEL@champion --poll-s 1` on a free port: its URL and process."""
    port = free_port()
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"]}
    process = start_cli("serve", f"{MODEL}@champion", "--port", str(port), "--poll-s", "1", env=env, new_group=True, preexec_fn=_terminal)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/healthz", process, timeout_s=180)
        yield {"url": f"http://127.0.0.1:{port}", "process": process, **registered}
    finally:
        stop_group(process)


def _expected(version: str, images: np.ndarray, uri: str) -> list[dict[str, Any]]:
    from pipeline.registry import load_model

    return rows(load_model(f"{MODEL}/{version}", tracking_uri=uri).predict_table(images))


@pytest.mark.ray
@pytest.mark.mlflow_server
def test_the_server_answers_a_png_and_an_array_as_load_model_does(server: dict[str, Any]) -> None:
    images, first = server["images"], server["versions"][0]
    expected = _expected(first, images, server["uri"])
    status, answer = post(f"{server['url']}/predict", {"images": [png_base64(images[0])]})
    assert status == 200, answer
    # One image is a batch of one: compared with load_model on the same batch (a batch of 4 may round otherwise)
    assert answer == {"model": MODEL, "version": int(first), "predictions": _expected(first, images[:1], server["uri"])}
    status, answer = post(f"{server['url']}/predict", {"instances": images[:, 0].tolist()})  # (N, H, W) JSON integers
    assert status == 200 and answer["predictions"] == expected, answer
    with urllib.request.urlopen(f"{server['url']}/healthz", timeout=10) as health:
        assert json.loads(health.read()) == {"model": MODEL, "reference": f"{MODEL}@champion", "version": int(first),
                                             "follows": True, "problem": None}  # fmt: skip


@pytest.mark.ray
@pytest.mark.mlflow_server
def test_a_bad_request_is_a_400_naming_the_shapes_and_the_server_goes_on(server: dict[str, Any]) -> None:
    status, answer = post(f"{server['url']}/predict", {"instances": [[1, 2, 3]]})
    assert status == 400 and "(N, 1, 28, 28) or (N, 28, 28, 1) or (N, 28, 28)" in answer["error"], answer
    status, answer = post(f"{server['url']}/predict", b"not json")
    assert status == 400 and "not JSON" in answer["error"]
    status, answer = post(f"{server['url']}/predict", {"images": ["aGVsbG8="]})
    assert status == 400 and "images[0]: not an image that can be read" in answer["error"]
    assert post(f"{server['url']}/predict", {"instances": server["images"][:1, 0].tolist()})[0] == 200


@pytest.mark.ray
@pytest.mark.mlflow_server
def test_when_the_champion_moves_the_server_follows_and_no_request_fails(server: dict[str, Any]) -> None:
    old, new = server["versions"]
    images = server["images"]
    answers: list[tuple[float, float, int, Any]] = []  # (sent, answered, status, version)
    stop = threading.Event()

    def client_loop(i: int) -> None:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                status, answer = post(f"{server['url']}/predict", {"instances": images[i % 4 : i % 4 + 1, 0].tolist()})
            except OSError as err:  # a refused or dropped connection is a failed request too
                status, answer = 0, {"error": repr(err)}
            answers.append((sent, time.monotonic(), status, answer.get("version", answer)))

    clients = [threading.Thread(target=client_loop, args=(i,)) for i in range(4)]
    for thread in clients:
        thread.start()
    try:
        time.sleep(2)
        moved = time.monotonic()
        mlflow_client(server["uri"]).set_registered_model_alias(MODEL, "champion", new)
        deadline = moved + 60
        while not any(v == int(new) for *_, v in answers) and time.monotonic() < deadline:
            time.sleep(0.2)
        time.sleep(2)  # answers after the swap, too
    finally:
        stop.set()
        for thread in clients:
            thread.join(timeout=60)
    failed = [a for a in answers if a[2] != 200]
    assert not failed, failed[:5]
    assert {v for *_, v in answers} == {int(old), int(new)}
    first_new = min(answered for _, answered, _, v in answers if v == int(new))
    # One replica: once a request was answered by the new version, every request sent after it is too.
    assert {v for sent, *_, v in answers if sent > first_new} == {int(new)}
    assert any(v == int(old) and sent > moved for sent, *_, v in answers), "the old version answered while the new one loaded"
    assert len(answers) > 20
    status, answer = post(f"{server['url']}/predict", {"instances": images[:, 0].tolist()})
    assert status == 200 and answer["version"] == int(new)
    assert answer["predictions"] == _expected(new, images, server["uri"])


@pytest.mark.ray
@pytest.mark.mlflow_server
def test_ctrl_c_stops_the_server_and_its_ray(server: dict[str, Any]) -> None:
    import psutil

    process = server["process"]
    os.killpg(process.pid, signal.SIGINT)  # Ctrl-C in a terminal: the foreground process group
    out, err = process.communicate(timeout=60)
    assert process.returncode == 130, err[-3000:]
    assert "Traceback" not in err and "interrupted" in err
    assert f"serving {MODEL}@champion (version " in out and "/predict -H 'Content-Type: application/json'" in out
    if "version " + server["versions"][1] + " answers now" not in out:
        pytest.fail(f"the swap (test above) was not reported: {out}")
    deadline = time.monotonic() + 20
    while (left := [p for p in psutil.process_iter() if _in_group(p, process.pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left, f"Ray processes outlived the server: {[p.name() for p in left]}"


def _in_group(process: Any, group: int) -> bool:
    import psutil

    try:
        return os.getpgid(process.pid) == group and process.status() != psutil.STATUS_ZOMBIE
    except (OSError, psutil.Error):
        return False


@pytest.mark.mlflow_server
def test_mlflow_models_serve_answers_invocations_as_load_model_does(registered: dict[str, Any]) -> None:
    from pipeline.registry import resolve_version

    port = free_port()
    venv_bin = str(Path(sys.executable).parent)  # MLflow runs `uvicorn` from PATH
    env = {**os.environ, "MLFLOW_TRACKING_URI": registered["uri"], "PATH": f"{venv_bin}{os.pathsep}{os.environ['PATH']}"}
    command = [sys.executable, "-m", "mlflow", "models", "serve", "-m", f"models:/{MODEL}@champion", "--env-manager", "local",
               "-h", "127.0.0.1", "-p", str(port)]  # fmt: skip
    version = str(resolve_version(mlflow_client(registered["uri"]), f"{MODEL}@champion").version)
    server = subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        wait_for_http(f"http://127.0.0.1:{port}/ping", server, timeout_s=120)
        images = registered["images"]
        status, answer = post(f"http://127.0.0.1:{port}/invocations", {"instances": images[:, 0].tolist()})
        assert status == 200, answer
        assert answer == {"predictions": _expected(version, images, registered["uri"])}
    finally:
        stop_group(server)


# ---------------------------------------------------------------------------------------------------
# A replica's following, in this process (no Ray: the deployment's class is a plain class)


def test_a_replica_follows_the_alias_and_keeps_serving_while_the_registry_is_away(
    data_root: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import asyncio

    from pipeline.payloads import answer_batch, parse_payload
    from pipeline.service import ModelServer, parse_args
    from pipeline.train import run_training

    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # the server that is away: refused at once
    name, versions = "followed_mlp", []
    for seed in (0, 1):
        overrides = tiny(
            data_root, tmp_path, f"name={name}_{seed}", f"tracking.register_as={name}", f"seed={seed}", "scaling.num_workers=0"
        )
        registration = run_training(load_config(CONF_DIR / "mnist_mlp.yaml", overrides)).registration
        assert registration is not None
        versions.append(str(registration["version"]))
    uri = os.environ["MLFLOW_TRACKING_URI"]
    registry = mlflow_client(uri)
    registry.set_registered_model_alias(name, "champion", versions[0])
    images = np.random.default_rng(3).integers(0, 256, size=(2, 1, 28, 28), dtype=np.uint8)
    payload = parse_payload({"instances": images[:, 0].tolist()})

    def answer(replica: Any) -> tuple[str, Any]:  # what its batch method runs (serve.batch itself needs a replica)
        return replica.served.version, answer_batch(replica.served.predictor, [payload])[0]

    async def replica_story() -> list[Any]:  # in an event loop, as Serve constructs a replica
        replica = ModelServer(parse_args({"model": f"{name}@champion", "poll_s": 3600, "tracking_uri": uri}))
        seen: list[Any] = [answer(replica)]
        registry.set_registered_model_alias(name, "champion", versions[1])
        reachable = replica.args
        replica.args = reachable.model_copy(update={"tracking_uri": f"http://127.0.0.1:{free_port()}"})  # the registry goes away
        replica._refresh()
        seen += [answer(replica), replica.problem]
        replica.args = reachable  # it answers again: the alias moved meanwhile
        replica._refresh()
        seen += [answer(replica), replica.problem]
        replica.__del__()
        return seen

    (v1, rows1), (v_away, _), problem, (v2, rows2), problem_after = asyncio.run(replica_story())
    assert v1 == v_away == versions[0], "while the registry is away, the version it had answers"
    assert "127.0.0.1" in problem, f"the problem is kept, for /healthz: {problem}"
    assert v2 == versions[1] and problem_after == ""
    assert rows1 == _expected_in(name, versions[0], images, uri) and rows2 == _expected_in(name, versions[1], images, uri)


def _expected_in(name: str, version: str, images: np.ndarray, uri: str) -> list[dict[str, Any]]:
    from pipeline.registry import load_model

    return rows(load_model(f"{name}/{version}", tracking_uri=uri).predict_table(images))
