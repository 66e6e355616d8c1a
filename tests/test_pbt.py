"""Population Based Training that exploits: the worse trial takes the better one's weights at the perturbation
epoch and trains on from them, in its own Tune actor and on a worker group (a Ray Train run per chunk).

Two linear-regression trials, one with a learning rate that learns nothing in 2 epochs (1e-5) and one that
learns (0.05): at epoch 2 PBT makes the first copy the second (quantile_fraction 0.5 of 2 trials is one each)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from mlflow import MlflowClient

from pipeline.checkpoints import load_state
from pipeline.checks import check_training
from pipeline.config import load_config
from pipeline.errors import BadInput
from pipeline.pbt import check_pbt, trial_checkpoints, weights_checksum
from pipeline.trial import trial_folder
from pipeline.tune import SearchResult, run_search
from tests.helpers import CONF_DIR, metric_steps, runs_of

SLOW, FAST = 1e-5, 0.05


def _pbt_search(tmp_path: Path, name: str, *extra: str) -> list[str]:
    return [f"name={name}", f"storage_path={tmp_path}", f"data.root={tmp_path}", "data.num_samples=300", "scaling.num_workers=1",
            "train.epochs=4", "train.checkpoints_to_keep=4", "tune.scheduler=pbt", "tune.perturbation_interval=2",
            "tune.quantile_fraction=0.5", "tune.num_samples=1", f"tune.space={{optim.lr: {{grid: [{FAST}, {SLOW}]}}}}",
            "tune.hyperparam_mutations={optim.lr: {loguniform: [1.0e-3, 0.1]}}", *extra]  # fmt: skip


def _assert_the_slow_trial_exploited_the_fast_one(result: SearchResult, tmp_path: Path) -> None:
    cfg = load_config(CONF_DIR / "linear_regression.yaml", _pbt_search(tmp_path, result.name))
    slow = next(t for t in result.trials if t.exploits)
    fast = next(t for t in result.trials if t is not slow)
    assert fast.exploits == [], "the better trial copies nobody"
    [exploit] = slow.exploits
    assert (exploit["epoch"], exploit["copied_trial"]) == (2, fast.trial_id)
    assert exploit["copied_params"]["optim.lr"] == FAST and exploit["params"]["optim.lr"] != SLOW
    assert 1e-3 <= slow.params["optim.lr"] <= 0.1, "explored within the mutation's range"

    # The weights it went on from are the fast trial's at epoch 2, not its own.
    data_hash = check_training(cfg).data_hash
    own = trial_checkpoints(trial_folder(cfg, {"optim.lr": SLOW}, slow.trial_id, _search_folder(tmp_path, result), data_hash))
    copied = trial_checkpoints(trial_folder(cfg, {"optim.lr": FAST}, fast.trial_id, _search_folder(tmp_path, result), data_hash))
    assert exploit["weights_sha256"] == weights_checksum(load_state(Path(copied[2][0]))["model"])
    assert exploit["weights_sha256"] != weights_checksum(load_state(Path(own[2][0]))["model"])
    # ... and it shows: the slow trial's validation error falls by far more in epoch 3 than its lr could manage alone.
    curve = dict(slow.history)
    # epoch 4, the last, is no perturbation: the trials end there (one that did would restart to report it again)
    assert sorted(curve) == [1, 2, 3, 4], "one curve, every epoch once, across the exploit"
    assert curve[3] < curve[2] / 10
    assert [m["epoch"] for m in load_state(Path(own[3][0]))["history"]] == [1, 2, 3]
    assert load_state(Path(own[3][0]))["history"][1]["val_mse"] == curve[2], "its history is its own, not the copied trial's"
    # From the same weights at epoch 2, its own perturbed lr (not the copied optimizer's 0.05) trains epoch 3.
    assert curve[3] != dict(fast.history)[3]
    assert load_state(Path(own[3][0]))["optimizer"]["param_groups"][0]["lr"] == slow.params["optim.lr"]

    client = MlflowClient(os.environ["MLFLOW_TRACKING_URI"])
    children = {c.data.tags["trial_id"]: c for c in runs_of(client, result.name, parent=result.mlflow_run_id)}
    assert set(children) == {slow.trial_id, fast.trial_id}, "one child run per trial, across exploits"
    run = children[slow.trial_id]
    assert metric_steps(client, run.info.run_id, "val_mse") == [1, 2, 3, 4]
    assert run.data.tags["pbt.exploits"] == "1" and f"copied trial {fast.trial_id}" in run.data.tags["pbt.exploit.1"]
    assert "exploits.csv" in {a.path for a in client.list_artifacts(run.info.run_id)}
    assert "plots/trial_curves.png" in {a.path for a in client.list_artifacts(result.mlflow_run_id, "plots")}


def _search_folder(tmp_path: Path, result: SearchResult) -> str:
    return str(tmp_path / f"{result.name}-tune" / result.key)


@pytest.mark.ray
def test_pbt_in_process_trials_exploit_the_better_trials_weights(ray_local, tmp_path: Path) -> None:
    overrides = _pbt_search(tmp_path, "pbt_in_process", "tune.trial_runner=in_process")
    result = run_search(load_config(CONF_DIR / "linear_regression.yaml", overrides))
    _assert_the_slow_trial_exploited_the_fast_one(result, tmp_path)
    assert result.registration is not None


@pytest.mark.ray
@pytest.mark.workers
def test_pbt_worker_group_trials_train_in_chunks_and_exploit(ray_local, tmp_path: Path) -> None:
    overrides = _pbt_search(tmp_path, "pbt_workers", "tune.trial_runner=workers")
    result = run_search(load_config(CONF_DIR / "linear_regression.yaml", overrides), register=False)
    _assert_the_slow_trial_exploited_the_fast_one(result, tmp_path)
    chunks = sorted(p.name for p in (tmp_path / "pbt_workers-tune").glob("*/trials/*/*/chunk_epoch=*"))
    assert chunks == ["chunk_epoch=0001", "chunk_epoch=0001", "chunk_epoch=0003", "chunk_epoch=0003"], "a Train run per chunk"


BAD_PBT = [
    ("tune.search=optuna", "tune.search: PBT chooses new values itself"),
    ("tune.perturbation_interval=4", "tune.perturbation_interval: 4 is not below train.epochs (4)"),
    ("tune.hyperparam_mutations={optim.lr: {grid: [0.1, 0.2]}}", "tune.hyperparam_mutations.optim.lr: a grid cannot be mutated"),
    ("tune.hyperparam_mutations={optim.lrr: {uniform: [0.1, 0.2]}}", "tune.hyperparam_mutations.optim.lrr"),
    ("tune.space={optim.lr: {grid: [0.1]}}", "tune.num_samples: PBT needs a population of at least 2 trials"),
]


@pytest.mark.parametrize(("override", "expected"), BAD_PBT)
def test_a_pbt_search_it_cannot_run_is_refused_before_any_trial(override: str, expected: str, tmp_path: Path) -> None:
    cfg = load_config(CONF_DIR / "linear_regression.yaml", [*_pbt_search(tmp_path, "bad_pbt"), override])
    with pytest.raises(BadInput) as refused:
        run_search(cfg)
    assert expected in str(refused.value)
    assert not (tmp_path / "bad_pbt-tune").exists(), "no trial started"


@pytest.mark.ray
def test_a_population_larger_than_the_cluster_holds_at_once_is_refused(ray_local, tmp_path: Path) -> None:
    # 2 trials, one at a time: synchronous PBT would restart the running trial over and over.
    cfg = load_config(CONF_DIR / "linear_regression.yaml", [*_pbt_search(tmp_path, "pbt_too_large"), "tune.max_concurrent_trials=1"])
    with pytest.raises(BadInput, match=r"tune\.num_samples: PBT trains its whole population at once, and 2 trials do not fit"):
        run_search(cfg)
    assert not (tmp_path / "pbt_too_large-tune").exists(), "no trial started"


def test_retraining_a_pbt_schedule_is_refused(tmp_path: Path) -> None:
    cfg = load_config(CONF_DIR / "linear_regression.yaml", _pbt_search(tmp_path, "pbt_retrain"))
    with pytest.raises(BadInput, match=r"tune\.retrain_best: a PBT trial's model comes from a schedule"):
        check_pbt(cfg, retrain=True)
