"""A search that grows: more tune.num_samples on a complete search trains only the new trials, and its
result (trials, best, registration, the one MLflow parent run) covers them all; the same or fewer samples
report it. The batch plan is checked without Ray; one tiny search grows on a real local Ray."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pandas as pd
import pytest

from pipeline.config import ConfigError, ExperimentConfig, load_config
from pipeline.runs import begin_run, finish_run, plan_run, record_batches
from pipeline.search_batches import Batch, check_growth, plan_batches, warm_start
from pipeline.tune import SearchResult, Trial, run_search
from tests.helpers import (
    CONF_DIR,
    metric_steps,
    mlflow_client,
    run_cli,
    run_dir,
    runs_of,
    start_cli,
    summary_of,
    wait_for_files,
    wait_for_run_dir,
)


def _config(tmp_path: Path, samples: int, *extra: str) -> ExperimentConfig:
    """A linear regression search of `samples` samples: in-process trials of a few hundred rows, one at a time."""
    return load_config(CONF_DIR / "linear_regression.yaml", [
        "name=grown_search", f"storage_path={tmp_path}", f"data.root={tmp_path}", "data.num_samples=300", "scaling.num_workers=1",
        "tune.max_concurrent_trials=1", "train.epochs=2", "tune.scheduler=fifo", "tune.space={optim.lr: {loguniform: [0.01, 0.1]}}",
        f"tune.num_samples={samples}", *extra,
    ])  # fmt: skip


def _complete(tmp_path: Path, samples: int) -> str:
    """A search of `samples` samples recorded as complete (what run_search leaves), without training: its folder."""
    plan = plan_run(_config(tmp_path, samples), "data", fresh=False, search=True)
    begin_run(plan, _config(tmp_path, samples))
    plan_batches(_config(tmp_path, samples), plan)
    finish_run(plan, {"epochs": 2, "num_samples": samples})
    return plan.folder


def test_more_samples_add_a_batch_and_the_same_or_fewer_report_the_search(tmp_path: Path) -> None:
    folder = _complete(tmp_path, 2)
    grown = plan_run(_config(tmp_path, 3), "data", fresh=False, search=True)
    assert (grown.state, grown.folder, grown.grow) == ("resume", folder, (2, 3)), "the same search, not a new one"
    assert "growing the search from 2 to 3 samples (tune.num_samples)" in grown.describe()
    assert plan_batches(_config(tmp_path, 3), grown) == [Batch(folder, 2, done=True), Batch(f"{folder}/grow-2", 1, done=False)]
    assert plan_run(_config(tmp_path, 3), "data", fresh=False, search=True).record.batches == [2, 1], "recorded before it runs"
    for samples in (2, 1):
        again = plan_run(_config(tmp_path, samples), "data", fresh=False, search=True)
        assert again.state == "finished" and again.grow is None and "already searched" in again.describe()


def test_an_interrupted_search_finishes_its_batches_before_it_grows(tmp_path: Path) -> None:
    # Interrupted in its first batch (no result yet), then asked for more: that batch resumes with its own 2.
    plan = plan_run(_config(tmp_path, 2), "data", fresh=False, search=True)
    begin_run(plan, _config(tmp_path, 2))
    plan_batches(_config(tmp_path, 2), plan)
    resumed = plan_run(_config(tmp_path, 5), "data", fresh=False, search=True)
    assert resumed.state == "resume" and "resuming the search from where it stopped, then growing it from 2 to 5" in resumed.describe()
    folder = resumed.folder
    assert plan_batches(_config(tmp_path, 5), resumed) == [Batch(folder, 2, done=False), Batch(f"{folder}/grow-2", 3, done=False)]
    # Complete at 2, interrupted in its grown batch of 3, then asked for fewer: that batch still finishes, nothing is added.
    finish_run(resumed, {"epochs": 2, "num_samples": 2})
    fewer = plan_run(_config(tmp_path, 4), "data", fresh=False, search=True)
    assert fewer.state == "resume" and fewer.grow is None
    assert plan_batches(_config(tmp_path, 4), fewer) == [Batch(folder, 2, done=True), Batch(f"{folder}/grow-2", 3, done=False)]


def _pbt(tmp_path: Path, samples: int) -> ExperimentConfig:
    cfg = _config(tmp_path, samples)
    return cfg.model_copy(update={"tune": cfg.tune.model_copy(update={"scheduler": "pbt"})})


def test_a_pbt_search_does_not_grow(tmp_path: Path) -> None:
    plan = plan_run(_pbt(tmp_path, 2), "data", fresh=False, search=True)
    record_batches(plan, [2])
    finish_run(plan, {"epochs": 2, "num_samples": 2})
    with pytest.raises(ConfigError) as refused:
        check_growth(_pbt(tmp_path, 3), plan_run(_pbt(tmp_path, 3), "data", fresh=False, search=True))
    assert str(refused.value).startswith("tune.num_samples: 3 asks the PBT search grown_search")
    assert "set tune.num_samples=2 to resume or report it, or add --fresh" in str(refused.value)
    check_growth(_pbt(tmp_path, 2), plan_run(_pbt(tmp_path, 2), "data", fresh=False, search=True))  # not growing: reported


def test_optuna_is_told_the_earlier_trials_before_it_suggests() -> None:
    pytest.importorskip("optuna")
    from ray import tune
    from ray.tune.search.optuna import OptunaSearch

    known = [Trial("a", {"optim.lr": 0.02}, "finished", 2, 0.5), Trial("b", {"optim.lr": 0.05}, "finished", 2, 0.25),
             Trial("c", {"optim.lr": 0.03}, "failed", 0, None)]  # fmt: skip
    search = OptunaSearch(metric="val_mse", mode="min", **warm_start(known))
    search.set_search_properties("val_mse", "min", {"optim.lr": tune.loguniform(0.01, 0.1)})
    study = search._ot_study  # Optuna's own record of what it knows
    assert study is not None
    told = study.get_trials()
    assert sorted((t.params["optim.lr"], t.value) for t in told) == [(0.02, 0.5), (0.05, 0.25)]
    assert warm_start(known[2:]) == {}, "a failed trial alone tells Optuna nothing"


@pytest.mark.ray
def test_a_grown_search_trains_only_the_new_trial_and_reports_all_three(ray_local, tmp_path: Path) -> None:
    first = run_search(_config(tmp_path, 2))
    assert first.outcome == "searched" and len(first.trials) == 2
    folder = run_dir(tmp_path, "grown_search", search=True)
    files = {path: path.stat().st_mtime_ns for path in (folder / "trials").rglob("*") if path.is_file()}
    client = mlflow_client(os.environ["MLFLOW_TRACKING_URI"])
    steps = {c.data.tags["trial_id"]: metric_steps(client, c.info.run_id, "val_mse") for c in runs_of(client, "grown_search", parent=first.mlflow_run_id)}  # fmt: skip
    assert steps == {t.trial_id: [1, 2] for t in first.trials}

    grown = run_search(_config(tmp_path, 3))
    assert (grown.outcome, grown.key, grown.mlflow_run_id) == ("grown", first.key, first.mlflow_run_id)
    assert len(grown.trials) == 3 and {t.trial_id for t in first.trials} < {t.trial_id for t in grown.trials}
    assert all(t.status == "finished" for t in grown.trials)
    assert grown.best.best == min(t.best for t in grown.trials if t.best is not None), "the best of all three (val_mse: min)"
    assert {path: path.stat().st_mtime_ns for path in files} == files, "the first two trials' folders were not touched"
    assert (folder / "grow-2").is_dir()
    children = runs_of(client, "grown_search", parent=first.mlflow_run_id)
    assert len(children) == 3, "one new child run under the same parent"
    after = {c.data.tags["trial_id"]: metric_steps(client, c.info.run_id, "val_mse") for c in children}
    assert after == {**steps, **{t.trial_id: [1, 2] for t in grown.trials}}, "each epoch logged once: the old trials trained nothing"
    table = pd.read_csv(client.download_artifacts(first.mlflow_run_id, "trials.csv", str(tmp_path)))
    assert sorted(table["trial_id"]) == sorted(t.trial_id for t in grown.trials)
    assert grown.registration is not None
    version = client.get_model_version("grown_search", grown.registration["version"])
    assert version.run_id == next(c.info.run_id for c in children if c.data.tags["trial_id"] == grown.best.trial_id)
    versions = client.search_model_versions("name = 'grown_search'")
    assert len(versions) == (1 if grown.best.trial_id == first.best.trial_id else 2), "a checkpoint is registered once"

    for samples in (3, 2):  # the same or fewer samples: reported, nothing trained
        again = run_search(_config(tmp_path, samples))
        assert isinstance(again, SearchResult) and again.outcome == "already searched"
        assert sorted(t.trial_id for t in again.trials) == sorted(t.trial_id for t in grown.trials)
    assert len(runs_of(client, "grown_search", parent=first.mlflow_run_id)) == 3
    assert {path: path.stat().st_mtime_ns for path in files} == files


@pytest.mark.ray
def test_a_killed_search_asked_for_more_samples_finishes_its_trials_then_adds_the_new_ones(tmp_path: Path) -> None:
    # A grid of 2 points, 1 sample each, killed once its first trial is done; then 2 samples: the grid again.
    # 100,000 rows: a trial takes several seconds, so the second is still training when the search is killed
    # (with 2,000 rows, CI saw both finish within the 1.5 s before the kill, and nothing was left to resume).
    args = ["tune", "conf/linear_regression.yaml", "name=killed_grown", f"storage_path={tmp_path}", f"data.root={tmp_path}",
            "data.num_samples=100000", "scaling.num_workers=1", "tune.max_concurrent_trials=1", "train.epochs=3", "tune.scheduler=fifo",
            "tune.space={optim.lr: {grid: [0.05, 0.03]}}", "--output", "json"]  # fmt: skip
    search = start_cli(*args, "tune.num_samples=1")
    trials_dir = wait_for_run_dir(tmp_path, "killed_grown", search, search=True) / "trials"
    finished = wait_for_files(trials_dir, "*/*/checkpoint_epoch=0003/meta.json", search, timeout_s=240)
    time.sleep(1.5)  # let Tune record the finished trial in its experiment state
    search.kill()  # SIGKILL: the driver goes away without a word
    search.wait()
    before = {path: path.stat().st_mtime_ns for path in finished}

    again = run_cli(*args, "tune.num_samples=2", timeout=400)
    summary = summary_of(again)["search"]
    assert "resuming the search from where it stopped, then growing it from 1 to 2 samples" in again.stderr
    assert summary["outcome"] == "grown"
    assert sorted(t["params"]["optim.lr"] for t in summary["trials"]) == [0.03, 0.03, 0.05, 0.05], "each grid point once more"
    assert all(t["status"] == "finished" and t["epochs"] == 3 for t in summary["trials"])
    assert {path: path.stat().st_mtime_ns for path in finished} == before, "the finished trial was not trained again"
    client = mlflow_client(os.environ["MLFLOW_TRACKING_URI"])
    children = runs_of(client, "killed_grown", parent=summary["mlflow_run_id"])
    assert len(children) == 4 and all(metric_steps(client, c.info.run_id, "epoch") == [1, 2, 3] for c in children)
