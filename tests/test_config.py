"""The config: every conf in conf/ validates, overrides are typed, bad keys name their path."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import loop, models
from pipeline.config import (
    DATASET_NAMES,
    LOSS_NAMES,
    MODEL_NAMES,
    ConfigError,
    ExperimentConfig,
    config_hash,
    load_config,
)
from pipeline.data import sources
from tests.helpers import CONF_DIR

CONFS = sorted(CONF_DIR.glob("*.yaml"))


def test_the_catalogs_and_the_config_name_the_same_things() -> None:
    assert set(models.MODELS) == set(MODEL_NAMES)
    assert set(loop.LOSSES) == set(LOSS_NAMES)
    assert set(sources.SOURCES) == set(DATASET_NAMES)


@pytest.mark.parametrize("conf", CONFS, ids=lambda p: p.stem)
def test_every_conf_loads(conf: Path) -> None:
    cfg = load_config(conf)
    assert cfg.name == conf.stem, "a conf's name is its file name, so runs are easy to find"


def test_the_tutorial_experiments_are_all_there() -> None:
    names = {p.stem for p in CONFS}
    for words in (
        ("linear",),
        ("fashion", "softmax"),
        ("mnist", "mlp"),
        ("fashion", "mlp"),
        ("mnist", "lenet"),
        ("fashion", "cnn"),
        ("cifar", "resnet"),
        ("circles",),
    ):
        assert any(all(w in name for w in words) for name in names), words


def test_overrides_are_parsed_as_yaml_and_typed() -> None:
    cfg = load_config(
        CONF_DIR / "mnist_mlp.yaml",
        ["optim.lr=1e-2", "train.epochs=3", "scaling.use_gpu=false", "model.hidden=[32, 16]", "data.root=/tmp/x"],
    )
    assert (cfg.optim.lr, cfg.train.epochs, cfg.scaling.use_gpu) == (0.01, 3, False)
    assert cfg.model.hidden == [32, 16] and cfg.data.root == "/tmp/x"


def test_the_issue_s_override_keys_all_exist() -> None:
    keys = [
        "train.epochs=2",
        "train.max_failures=1",
        "scaling.num_workers=2",
        "scaling.use_gpu=true",
        "data.name=mnist",
        "data.root=d",
        "data.download=false",
        "data.batch_size=8",
        "data.val_fraction=0.2",
        "model.name=mlp",
        "optim.name=sgd",
        "optim.lr=0.5",
        "loss=cross_entropy",
        "seed=3",
        "storage_path=s",
        "tracking.register_as=m",
    ]
    cfg = load_config(None, keys)
    assert cfg.tracking.register_as == "m" and cfg.data.val_fraction == 0.2


@pytest.mark.parametrize(
    ("override", "key", "hint"),
    [
        ("optim.lr=0", "optim.lr", "greater than 0"),
        ("optim.lr=-1", "optim.lr", "greater than 0"),
        ("train.epochs=0", "train.epochs", "greater than or equal to 1"),
        ("scaling.num_workers=-1", "scaling.num_workers", "greater than or equal to 0"),
        ("model.name=transformer", "model.name", "resnet18"),
        ("data.name=imagenet", "data.name", "'fashion_mnist'"),
        ("optim.name=lion", "optim.name", "'adamw'"),
        ("loss=hinge", "loss", "'bce_with_logits'"),
        ("optim.lrate=1", "optim.lrate", "lr, momentum, name, weight_decay"),
        ("trian.epochs=1", "trian", "train"),
        ("data.batch_size=many", "data.batch_size", "valid integer"),
        ("data.val_fraction=1.5", "data.val_fraction", "less than 1"),
        ("train.compile_mode=fast", "train.compile_mode", "'reduce-overhead'"),
        ("train.compile_mode=reduce-overhead", "train", "applies only with train.compile=true"),
    ],
)
def test_bad_values_name_the_key_path_and_what_is_allowed(override: str, key: str, hint: str) -> None:
    with pytest.raises(ConfigError) as err:
        load_config(CONF_DIR / "mnist_mlp.yaml", [override])
    assert f"  {key}: " in str(err.value) and hint in str(err.value)


def test_malformed_yaml_names_the_file_and_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: x\noptim:\n  lr: [0.1\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: line \d+ is not valid YAML"):
        load_config(bad)


def test_an_override_without_equals_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"key\.path=value"):
        load_config(None, ["optim.lr"])


def test_tabular_needs_a_path_and_a_target() -> None:
    with pytest.raises(ConfigError, match=r"data\.path"):
        load_config(None, ["data.name=tabular"])


def test_the_config_hash_follows_the_content() -> None:
    a, b = ExperimentConfig(), ExperimentConfig()
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(load_config(None, ["optim.lr=0.5"]))


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "name: x\ndata:\n  root: a\noptim:\n  lr: 0.1\ndata:\n  batch_size: 8\n",
            "line 6: duplicate key data (first at line 2); merge the two sections",
        ),
        (
            "name: x\noptim:\n  lr: 0.1\n  momentum: 0.5\n  lr: 0.2\n",
            "line 5: duplicate key optim.lr (first at line 3); keep one of the two",
        ),
        (
            "tune:\n  space:\n    optim.lr: {uniform: [0.1, 0.2]}\n    optim.lr: {choice: [0.1]}\n",
            "line 4: duplicate key tune.space.optim.lr (first at line 3); keep one of the two",
        ),
    ],
    ids=["section", "nested-key", "space-key"],
)
def test_a_key_given_twice_in_a_conf_is_refused_with_both_lines(tmp_path: Path, text: str, expected: str) -> None:
    conf = tmp_path / "twice.yaml"
    conf.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_config(conf)
    assert str(err.value) == f"{conf}: {expected}"


def test_a_merge_key_overriding_its_anchor_is_not_a_duplicate(tmp_path: Path) -> None:
    # `<<: *anchor` then the same key is YAML's override, and PyYAML flattens merged mappings in place.
    conf = tmp_path / "merge.yaml"
    conf.write_text(
        "model:\n  name: my_nets:Net\n  kwargs:\n    base: &base {a: 1, b: 2}\n    derived: &derived\n      <<: *base\n"
        "      a: 3\n    again:\n      <<: *derived\n"
    )
    assert load_config(conf).model.kwargs["derived"] == {"a": 3, "b": 2}


@pytest.mark.parametrize(
    ("override", "expected"),
    [("tracking.experiment=run #2", "run #2"), ("tracking.experiment=#2", "#2"), ("tracking.experiment=a#b", "a#b")],
)
def test_a_hash_in_an_override_is_text_not_a_comment(override: str, expected: str) -> None:
    assert load_config(None, [override]).tracking.experiment == expected


def test_a_quoted_hash_inside_a_yaml_override_still_parses_as_yaml() -> None:
    own = load_config(None, ["model.name=my_nets:Net", "model.kwargs={note: 'x #y', n: 2}"])
    assert own.model.kwargs == {"note": "x #y", "n": 2}


def test_a_hash_in_a_run_name_is_refused_not_cut(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"  name: .*'run #2'"):
        load_config(None, ["name=run #2"])


def test_paths_expand_home_and_environment_variables(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", "/home/someone")
    monkeypatch.setenv("DATA_DIR", "/mnt/data")
    monkeypatch.setenv("MLFLOW_HOST", "mlflow.internal")
    cfg = load_config(
        None,
        [
            "storage_path=~/runs",
            "data.root=$DATA_DIR/cache",
            "data.name=tabular",
            "data.path=${DATA_DIR}/t.csv",
            "data.target=y",
            "tracking.uri=sqlite:///~/m.db",
        ],
    )
    assert (cfg.storage_path, cfg.data.root, cfg.data.path) == ("/home/someone/runs", "/mnt/data/cache", "/mnt/data/t.csv")
    assert cfg.tracking.uri == "sqlite:////home/someone/m.db"
    assert load_config(None, ["tracking.uri=file:~/mlruns"]).tracking.uri == "file:/home/someone/mlruns"
    assert load_config(None, ["tracking.uri=http://$MLFLOW_HOST:5000"]).tracking.uri == "http://mlflow.internal:5000"
    assert load_config(None, ["storage_path=runs"]).storage_path == "runs", "relative paths are resolved elsewhere"


@pytest.mark.parametrize("key", ["storage_path", "data.root", "tracking.uri"])
def test_an_unset_variable_in_a_path_names_the_key_and_the_variable(key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOPE", raising=False)
    with pytest.raises(ConfigError, match=rf"  {key}: \$NOPE is not set in the environment"):
        load_config(None, [f"{key}=${{NOPE}}/x"])


@pytest.mark.parametrize("name", ["team/model", "model:v1", "", " lead", ".hidden", "m" * 201])
def test_a_registered_model_name_mlflow_refuses_is_a_config_error(name: str) -> None:
    with pytest.raises(ConfigError, match=r"  tracking\.register_as: "):
        load_config(None, [f"tracking.register_as='{name}'"])


def test_a_registered_model_name_may_hold_spaces_dots_and_dashes() -> None:
    assert load_config(None, ["tracking.register_as=Fashion CNN v1.2-b_x"]).tracking.register_as == "Fashion CNN v1.2-b_x"


@pytest.mark.parametrize("value", [".inf", "-.inf", ".nan"])
def test_an_infinite_or_nan_learning_rate_is_refused(value: str) -> None:
    with pytest.raises(ConfigError, match=r"  optim\.lr: "):
        load_config(CONF_DIR / "mnist_mlp.yaml", [f"optim.lr={value}"])
