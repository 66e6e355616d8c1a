"""Ray Tune end to end on a real local Ray: ASHA stops poor trials, grids are covered, a killed search
resumes, every search space in conf/ parses, bad spaces are refused before any trial, `pipeline run`
retrains the best. Trials are linear regressions of a few hundred samples, one after another."""

from __future__ import annotations

import itertools
import os
import time
from pathlib import Path
from typing import Any

import pytest
from mlflow import MlflowClient

from pipeline.config import load_config
from pipeline.errors import BadInput
from pipeline.space import parse_space
from pipeline.tune import run_pipeline, run_search
from tests.helpers import CONF_DIR, last_json, metric_steps, run_cli, run_dir, runs_of, start_cli, tiny, wait_for_files, wait_for_run_dir

SEARCHABLE = [conf for conf in sorted(CONF_DIR.glob("*.yaml")) if load_config(conf).tune.space]


def _linear_search(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return [f"name={name}", f"storage_path={tmp_path}", f"data.root={tmp_path}", "data.num_samples=300",
            "scaling.num_workers=1", "tune.max_concurrent_trials=1", *extra]  # fmt: skip


def _as_written(domain: Any) -> dict[str, list]:
    """A Ray Tune search domain as a conf writes it, e.g. {"loguniform": [0.0001, 0.01]}."""
    from ray.tune.search.sample import Categorical, Integer

    if isinstance(domain, dict):  # tune.grid_search
        return {"grid": domain["grid_search"]}
    if isinstance(domain, Categorical):
        return {"choice": domain.categories}
    kind = "randint" if isinstance(domain, Integer) else str(domain.get_sampler()).lower()  # LogUniform or Uniform
    return {kind: [domain.lower, domain.upper]}


def test_every_search_space_in_conf_parses() -> None:
    assert {c.stem for c in SEARCHABLE} >= {"fashion_mnist_cnn", "mnist_mlp", "circles_classifier"}
    for conf in SEARCHABLE:
        cfg = load_config(conf)
        dimensions = parse_space(cfg)
        assert [d.key for d in dimensions] == list(cfg.tune.space)
        assert {d.key: _as_written(d.to_ray()) for d in dimensions} == cfg.tune.space, "Ray Tune gets the space the conf wrote"


BAD_SEARCHES = [
    ("tune.space={optim.lrr: {uniform: [0.1, 0.2]}}", "tune.space.optim.lrr: invalid config"),
    ("tune.space={optim: {uniform: [0.1, 0.2]}}", "tune.space.optim"),
    ("tune.space={optim.lr: {uniform: [0.2, 0.1]}}", "low 0.2 must be below high 0.1"),
    ("tune.space={optim.lr: {loguniform: [0, 0.1]}}", "bounds must be > 0 for a log scale"),
    ("tune.space={optim.lr: {choice: []}}", "non-empty list"),
    ("tune.space={optim.name: {choice: [adam, lion]}}", "tune.space.optim.name"),
    ("tune.metric=val_f1", "tune.metric: trials are selected by validation metrics only; use one of val_loss, val_mse"),
    ("tune.metric=test_mse", "tune.metric: trials are selected by validation metrics only"),
    ("data.val_fraction=0", "data.val_fraction: linear has no test split, so it must hold out validation rows"),
    ("tune.space={optim.lr: {beta: [1, 2]}}", "write one of loguniform"),
]


@pytest.mark.parametrize(("override", "expected"), BAD_SEARCHES)
def test_a_bad_search_is_refused_before_any_trial(override: str, expected: str, tmp_path: Path) -> None:
    # BadInput: what the command line turns into exit 2 without a traceback (the test below, once). A valid
    # space, which the override may replace: each refusal comes from its own check, as on the command line.
    valid = [f"storage_path={tmp_path}", f"data.root={tmp_path}", "tune.space={optim.lr: {uniform: [0.01, 0.1]}}"]
    with pytest.raises(BadInput) as refused:
        run_search(load_config(CONF_DIR / "linear_regression.yaml", [*valid, override]))
    assert expected in str(refused.value)
    assert not (tmp_path / "linear_regression-tune").exists(), "no trial started"


def test_pipeline_tune_refuses_a_bad_search_with_exit_2_in_seconds(tmp_path: Path) -> None:
    # Once, not per refusal above: each `pipeline tune` costs ~8 s on 2 cores to start.
    override, expected = BAD_SEARCHES[0]
    done = run_cli("tune", "conf/linear_regression.yaml", f"storage_path={tmp_path}", f"data.root={tmp_path}", override, timeout=120)
    assert done.returncode == 2, done.stderr
    assert expected in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "linear_regression-tune").exists(), "no trial started"


@pytest.mark.ray
def test_asha_stops_poor_trials_tracks_one_parent_four_children_and_registers_once(ray_local, tmp_path: Path) -> None:
    overrides = _linear_search(tmp_path, "asha_search", "train.epochs=4", "tune.scheduler=asha", "tune.num_samples=1",
                               "tune.space={optim.lr: {grid: [0.05, 0.03, 0.00001, 0.00002]}}")  # fmt: skip
    result = run_search(load_config(CONF_DIR / "linear_regression.yaml", overrides))

    statuses = {t.params["optim.lr"]: t.status for t in result.trials}
    assert statuses[0.05] == "finished"
    assert "stopped early" in statuses.values()
    assert all(t.epochs < 4 for t in result.trials if t.status == "stopped early")
    assert result.best.params["optim.lr"] in (0.05, 0.03)

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    runs = runs_of(client, "asha_search")
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == result.mlflow_run_id]
    assert [p.info.run_id for p in parents] == [result.mlflow_run_id]
    assert len(children) == 4 and {c.data.tags["trial_id"] for c in children} == {t.trial_id for t in result.trials}
    assert all(c.info.status == "FINISHED" and "hp.optim.lr" in c.data.tags for c in children)
    # Descriptions: the search run's is the command line that made it; a trial's names its search run.
    assert parents[0].data.tags["mlflow.note.content"].startswith("Made by `")
    for child in children:
        assert child.data.tags["mlflow.note.content"].startswith(
            f"Trial {child.data.tags['trial_id']} of search run {result.mlflow_run_id}"
        )
    for child in children:  # every epoch the trial ran, once
        trial = next(t for t in result.trials if t.trial_id == child.data.tags["trial_id"])
        assert metric_steps(client, child.info.run_id, "val_mse") == list(range(1, trial.epochs + 1))
    parent_files = {a.path for a in client.list_artifacts(result.mlflow_run_id)}
    assert {"trials.csv", "best_config.yaml"} <= parent_files
    assert {a.path for a in client.list_artifacts(result.mlflow_run_id, "plots")} >= {"plots/search_optim.lr.png", "plots/trial_curves.png"}
    versions = client.search_model_versions("name = 'asha_search'")
    assert len(versions) == 1 and versions[0].run_id == next(
        c.info.run_id for c in children if c.data.tags["trial_id"] == result.best.trial_id
    )


@pytest.mark.ray
def test_a_grid_search_covers_its_grid(ray_local, tmp_path: Path) -> None:
    overrides = _linear_search(tmp_path, "grid_search", "train.epochs=1", "tune.scheduler=fifo", "tune.num_samples=1",
                               "tune.space={optim.lr: {grid: [0.01, 0.05]}, data.batch_size: {grid: [16, 32]}}")  # fmt: skip
    result = run_search(load_config(CONF_DIR / "linear_regression.yaml", overrides), register=False)
    covered = sorted((t.params["optim.lr"], t.params["data.batch_size"]) for t in result.trials)
    assert covered == sorted(itertools.product([0.01, 0.05], [16, 32]))
    assert all(t.status == "finished" for t in result.trials)
    assert "RAY_AIR_NEW_OUTPUT" not in os.environ, "the console choice for Tune does not outlive the search"


@pytest.mark.ray
def test_a_killed_search_resumes_without_running_finished_trials_again(tmp_path: Path) -> None:
    args = ["tune", "conf/linear_regression.yaml", *_linear_search(tmp_path, "resumed_search", "train.epochs=3",
            "tune.scheduler=fifo", "tune.num_samples=1", "data.num_samples=2000",
            "tune.space={optim.lr: {grid: [0.05, 0.04, 0.03, 0.02]}}"), "--output", "json"]  # fmt: skip
    search = start_cli(*args)
    trials_dir = wait_for_run_dir(tmp_path, "resumed_search", search, search=True) / "trials"
    finished = wait_for_files(trials_dir, "*/*/checkpoint_epoch=0003/meta.json", search, count=2, timeout_s=240)
    time.sleep(1.5)  # let Tune record the finished trials in its experiment state
    search.kill()  # SIGKILL: the driver goes away without a word
    search.wait()
    before = {path: path.stat().st_mtime_ns for path in finished}

    again = run_cli(*args, timeout=400)
    assert again.returncode == 0, again.stderr
    summary = last_json(again.stdout)["search"]
    assert sorted(t["params"]["optim.lr"] for t in summary["trials"]) == [0.02, 0.03, 0.04, 0.05]
    assert all(t["status"] == "finished" and t["epochs"] == 3 for t in summary["trials"])
    assert {path: path.stat().st_mtime_ns for path in finished} == before, "finished trials were not trained again"
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    children = runs_of(client, "resumed_search", parent=summary["mlflow_run_id"])
    assert len(children) == 4
    for child in children:
        assert metric_steps(client, child.info.run_id, "epoch") == [1, 2, 3]


@pytest.mark.ray
def test_pipeline_run_retrains_the_best_on_train_and_val_and_registers_only_that(ray_local, data_root: Path, tmp_path: Path) -> None:
    overrides = tiny(data_root, tmp_path, "name=run_mlp", "model.hidden=[16]", "tune.retrain_best=true", "tune.scheduler=fifo",
                     "tune.num_samples=1", "tune.space={optim.lr: {grid: [0.01, 0.0001]}}", "tune.max_concurrent_trials=1")  # fmt: skip
    outcome = run_pipeline(load_config(CONF_DIR / "mnist_mlp.yaml", overrides))
    retrained = outcome["retrained"]
    assert retrained["run_name"] == "run_mlp-best"
    assert "test_accuracy" in retrained["checkpoint_metrics"] and "val_accuracy" not in retrained["checkpoint_metrics"]
    assert retrained["checkpoint"].endswith("checkpoint_epoch=0001"), "without validation, the model is the last epoch's"
    assert retrained["registration"]["metric"] == "test_accuracy" and retrained["registration"]["split"] == "test"
    assert retrained["registration"]["alias"] == "champion"
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    assert len(client.search_model_versions("name = 'run_mlp'")) == 1  # the search itself registered nothing
    run = client.get_run(retrained["mlflow_run_id"])
    assert run.data.tags["mlflow.parentRunId"] == outcome["search"]["mlflow_run_id"]
    assert run.data.params["data.val_fraction"] == "0.0"
    assert run.data.params["optim.lr"] == str(outcome["search"]["best_params"]["optim.lr"])


@pytest.mark.ray
@pytest.mark.workers
def test_trials_on_worker_groups_free_their_workers_when_asha_stops_them(ray_local, tmp_path: Path) -> None:
    # One trial at a time on worker groups: trial 2 is stopped early, and trial 3 still gets its workers.
    overrides = _linear_search(tmp_path, "worker_search", "train.epochs=2", "tune.trial_runner=workers", "tune.num_samples=1",
                               "tune.space={optim.lr: {grid: [0.05, 1e-5, 2e-5]}}")  # fmt: skip
    result = run_search(load_config(CONF_DIR / "linear_regression.yaml", overrides), register=False)
    statuses = {t.params["optim.lr"]: t.status for t in result.trials}
    assert statuses == {0.05: "finished", 1e-5: "stopped early", 2e-5: "stopped early"}
    checkpoints = list((run_dir(tmp_path, "worker_search", search=True) / "trials").glob("worker_search-*/*/checkpoint_epoch=0001"))
    assert len(checkpoints) == 3, "each trial's Ray Train run wrote its own checkpoints"


@pytest.mark.ray
@pytest.mark.workers
def test_the_readme_main_job_runs_on_two_cores_and_a_second_time_trains_nothing(data_root: Path, tmp_path: Path) -> None:
    # As the README has it, shrunk: 2 DDP workers per trial, on this machine's own local Ray (2 CPUs in CI).
    args = ["run", "conf/fashion_mnist_cnn.yaml", *tiny(data_root, tmp_path, "name=main_job", "train.epochs=2", "tune.num_samples=1",
            "tune.space={optim.lr: {loguniform: [1.0e-3, 1.0e-2]}}"), "--output", "json"]  # fmt: skip
    first = run_cli(*args, timeout=900)
    assert first.returncode == 0, first.stderr[-3000:]
    outcome = last_json(first.stdout)
    assert outcome["search"]["outcome"] == "searched" and len(outcome["search"]["trials"]) == 1
    assert all(t["status"] == "finished" for t in outcome["search"]["trials"])
    assert outcome["retrained"]["outcome"] == "trained" and outcome["retrained"]["registration"]["alias"] == "champion"
    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    parent = client.get_run(outcome["search"]["mlflow_run_id"])
    assert parent.data.tags["trial_runner"] == "workers"

    second = run_cli(*args)
    assert second.returncode == 0, second.stderr[-3000:]
    again = last_json(second.stdout)
    assert again["search"]["outcome"] == "already searched" and again["retrained"]["outcome"] == "already trained"
    assert again["retrained"]["registration"] == outcome["retrained"]["registration"]
    assert len(client.search_model_versions("name = 'main_job'")) == 1


@pytest.mark.parametrize(
    ("space", "suggestion"),
    [
        ("{data.batch_size: {uniform: [16, 64]}}", "use randint: [16, 65] or choice: [...]"),
        ("{data.batch_size: {loguniform: [16, 64]}}", "use randint: [16, 65] or choice: [...]"),
        ("{train.epochs: {uniform: [2, 4]}}", "use randint: [2, 5] or choice: [...]"),  # the middle, 3, is whole
    ],
)
def test_a_continuous_space_on_an_integer_key_is_refused(space: str, suggestion: str) -> None:
    from pipeline.config import ConfigError

    cfg = load_config(CONF_DIR / "linear_regression.yaml", [f"tune.space={space}"])
    key, kind = next((k, next(iter(v))) for k, v in cfg.tune.space.items())
    with pytest.raises(ConfigError) as err:
        parse_space(cfg)
    assert str(err.value) == f"tune.space.{key}.{kind}: {key} takes whole numbers; {suggestion}"


def test_a_continuous_space_on_a_float_key_whose_middle_is_whole_parses() -> None:
    cfg = load_config(CONF_DIR / "linear_regression.yaml", ["tune.space={optim.lr: {uniform: [0.5, 1.5]}}"])
    assert [(d.kind, d.args) for d in parse_space(cfg)] == [("uniform", (0.5, 1.5))]
