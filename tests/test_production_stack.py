"""The production topology on this machine: the MLflow server on PostgreSQL with artifacts in an S3
bucket (the production_stack fixture: real PostgreSQL, moto's real HTTP S3 endpoint, on 127.0.0.1).

Runs whose storage_path is in the bucket: checkpoints, run records and searches live there; a run resumes
from there after its driver is killed, a complete one is not trained again, `--fresh` starts over there.
Faults of the stack: PostgreSQL restarted and the object store unreachable for a while, mid-run, lose
no epoch and no checkpoint. The 2-node cluster's jobs log to this stack too (tests/test_cluster.py).
"""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

import pytest
from mlflow import MlflowClient

from tests.helpers import Relay, Stack, last_json, metric_steps, mlflow_client, run_cli, runs_of, start_cli

pytestmark = pytest.mark.mlflow_server  # production_stack starts the S3 endpoint with its MLflow server


def _complete_checkpoints(stack: Stack, prefix: str) -> list[int]:
    """The epochs whose checkpoint is complete in the bucket (its summary, written last, is there)."""
    return sorted(
        int(key.split("checkpoint_epoch=")[1][:4])
        for key in stack.keys(prefix)
        if key.endswith("/meta.json") and "checkpoint_epoch=" in key
    )


def _env(stack: Stack) -> dict[str, str]:
    return {**os.environ, **stack.s3_env()}


def test_a_run_in_a_bucket_resumes_after_its_driver_is_killed_and_fresh_starts_over(production_stack: Stack, tmp_path: Path) -> None:
    prefix = f"runs-{secrets.token_hex(4)}"
    epochs = 12
    args = ["train", "conf/linear_regression.yaml", f"storage_path=s3://{production_stack.bucket}/{prefix}", f"data.root={tmp_path}",
            f"train.epochs={epochs}", "data.num_samples=3000", "scaling.num_workers=0", "--output", "json"]  # fmt: skip
    env = _env(production_stack)
    run = start_cli(*args, env=env)
    deadline = time.monotonic() + 180
    while not [e for e in _complete_checkpoints(production_stack, prefix) if e >= 3]:
        assert run.poll() is None and time.monotonic() < deadline, "the run wrote no third checkpoint to the bucket"
        time.sleep(0.2)
    run.kill()  # SIGKILL: the driver goes away with no chance to clean up
    run.wait()
    resume_from = max(_complete_checkpoints(production_stack, prefix))

    again = run_cli(*args, env=env)
    assert again.returncode == 0, again.stderr
    resumed = last_json(again.stdout)
    assert resumed["outcome"] == "resumed" and [m["epoch"] for m in resumed["history"]] == list(range(resume_from + 1, epochs + 1))
    assert resumed["checkpoint"].startswith(f"s3://{production_stack.bucket}/{prefix}/linear_regression/{resumed['run_key']}/")
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    assert metric_steps(client, resumed["mlflow_run_id"], "val_mse") == list(range(1, epochs + 1))  # each epoch once, one run

    done = run_cli(*args, env=env)
    assert done.returncode == 0 and last_json(done.stdout)["outcome"] == "already trained", done.stderr

    fresh = run_cli(*args, "train.epochs=2", "--fresh", env=env)
    assert fresh.returncode == 0, fresh.stderr
    restarted = last_json(fresh.stdout)
    assert restarted["outcome"] == "trained" and restarted["mlflow_run_id"] != resumed["mlflow_run_id"]
    assert _complete_checkpoints(production_stack, prefix) == [1, 2]  # the old run's checkpoints are gone from the bucket


def test_a_missing_bucket_or_unreachable_endpoint_is_refused_naming_storage_path(production_stack: Stack, tmp_path: Path) -> None:
    common = ["train", "conf/linear_regression.yaml", f"data.root={tmp_path}", "scaling.num_workers=0"]
    missing = run_cli(*common, "storage_path=s3://no-such-bucket/runs", env=_env(production_stack))
    assert missing.returncode == 2 and "storage_path: the bucket of s3://no-such-bucket/runs does not exist" in missing.stderr
    away = run_cli(
        *common,
        f"storage_path=s3://{production_stack.bucket}/runs",
        env={**_env(production_stack), "AWS_ENDPOINT_URL": "http://127.0.0.1:1"},
    )
    assert away.returncode == 2 and "storage_path: cannot reach s3://" in away.stderr and "AWS_ENDPOINT_URL" in away.stderr


@pytest.mark.ray
def test_a_search_in_a_bucket_keeps_its_trials_there_and_registers_the_best(production_stack: Stack, tmp_path: Path) -> None:
    prefix = f"search-{secrets.token_hex(4)}"
    args = ["tune", "conf/linear_regression.yaml", f"storage_path=s3://{production_stack.bucket}/{prefix}", f"data.root={tmp_path}",
            "name=bucket_search", "tune.num_samples=2", "train.epochs=2", "tune.scheduler=fifo", "tune.space={optim.lr: {loguniform: [0.01, 0.1]}}",
            "--output", "json"]  # fmt: skip
    done = run_cli(*args, env=_env(production_stack), timeout=600)
    assert done.returncode == 0, done.stderr
    search = last_json(done.stdout)["search"]
    assert [t["status"] for t in search["trials"]] == ["finished", "finished"], [t["error"] for t in search["trials"]]
    best = next(t for t in search["trials"] if t["trial_id"] == search["best_trial"])
    assert best["best_checkpoint"].startswith(f"s3://{production_stack.bucket}/{prefix}/bucket_search-tune/")
    assert search["registration"]["alias"] == "champion"
    assert len(_complete_checkpoints(production_stack, f"{prefix}/bucket_search-tune/")) >= 2  # each trial's, in the bucket


def _wait_for_epoch(client: MlflowClient, experiment: str, epoch: int, process) -> str:
    """The run's id once its `epoch` is logged (the run keeps training meanwhile)."""
    deadline = time.monotonic() + 180
    while True:
        assert process.poll() is None and time.monotonic() < deadline, (
            process.communicate()[1][-3000:] if process.poll() is not None else "slow"
        )
        runs = runs_of(client, experiment)
        if runs and len(metric_steps(client, runs[0].info.run_id, "epoch")) >= epoch:
            return runs[0].info.run_id
        time.sleep(0.3)


def test_postgresql_restarted_mid_run_loses_no_epoch(production_stack: Stack, tmp_path: Path) -> None:
    epochs = 10
    env = {**os.environ, **production_stack.credentials(), "MLFLOW_TRACKING_URI": production_stack.tracking_uri}
    client = mlflow_client(production_stack.tracking_uri)
    with pytest.MonkeyPatch.context() as patch:  # this test's own client signs in too
        for key, value in production_stack.credentials().items():
            patch.setenv(key, value)
        run = start_cli("train", "conf/linear_regression.yaml", "name=pg_restart", f"storage_path={tmp_path}", f"data.root={tmp_path}",
                        f"train.epochs={epochs}", "data.num_samples=20000", "scaling.num_workers=0", "--output", "json", env=env)  # fmt: skip
        run_id = _wait_for_epoch(client, "pg_restart", 2, run)
        production_stack.restart_postgres()  # the server's pooled connections are cut
        out, err = run.communicate(timeout=300)
        assert run.returncode == 0, err[-3000:]
        assert last_json(out)["mlflow_run_id"] == run_id
        for key in ("epoch", "val_mse"):
            assert metric_steps(client, run_id, key) == list(range(1, epochs + 1)), key
        assert client.get_model_version_by_alias("pg_restart", "champion").run_id == run_id


def test_an_object_store_away_for_a_while_mid_run_loses_no_checkpoint(production_stack: Stack, tmp_path: Path) -> None:
    # The run reaches the bucket through a relay that this test cuts for 25 s: connections refused. pyarrow's S3
    # client retries a refused connection for about 12 s itself before it raises (a shorter cut goes unnoticed).
    # Epochs of about 1 s: the cut comes while the run still has many to upload.
    relay = Relay(int(production_stack.s3_endpoint.rsplit(":", 1)[1]))
    prefix, epochs = f"away-{secrets.token_hex(4)}", 12
    run = start_cli("train", "conf/linear_regression.yaml", f"storage_path=s3://{production_stack.bucket}/{prefix}",
                    f"data.root={tmp_path}", f"train.epochs={epochs}", "data.num_samples=60000", "scaling.num_workers=0",
                    "train.checkpoints_to_keep=100", "--output", "json",
                    env={**_env(production_stack), "AWS_ENDPOINT_URL": f"http://127.0.0.1:{relay.port}"})  # fmt: skip
    deadline = time.monotonic() + 180
    while len(_complete_checkpoints(production_stack, prefix)) < 2:
        assert run.poll() is None and time.monotonic() < deadline, "no second checkpoint in the bucket"
        time.sleep(0.2)
    relay.cut()
    try:
        time.sleep(25)
    finally:
        relay.restore()
    out, err = run.communicate(timeout=300)
    assert run.returncode == 0, err[-3000:]
    assert "warning: the object store does not answer" in err and "waits for it" in err
    assert _complete_checkpoints(production_stack, prefix) == list(range(1, epochs + 1))  # every epoch's, whole
    assert [m["epoch"] for m in last_json(out)["history"]] == list(range(1, epochs + 1))
