"""The config: every conf in conf/ validates, overrides are typed, bad keys name their path."""

from __future__ import annotations

from pathlib import Path

import pytest

from pipeline import data, models, train
from pipeline.config import (
    DATASET_NAMES,
    LOSS_NAMES,
    MODEL_NAMES,
    ConfigError,
    ExperimentConfig,
    config_hash,
    load_config,
)
from tests.conftest import CONF_DIR

CONFS = sorted(CONF_DIR.glob("*.yaml"))


def test_the_catalogs_and_the_config_name_the_same_things() -> None:
    assert set(models.MODELS) == set(MODEL_NAMES)
    assert set(train.LOSSES) == set(LOSS_NAMES)
    assert set(data._MNIST_LIKE) | {"linear", "circles", "tabular", "cifar10", "image_folder"} == set(DATASET_NAMES)


@pytest.mark.parametrize("conf", CONFS, ids=lambda p: p.stem)
def test_every_conf_loads(conf: Path) -> None:
    cfg = load_config(conf)
    assert cfg.name == conf.stem, "a conf's name is its file name, so runs are easy to find"


def test_the_tutorial_experiments_are_all_there() -> None:
    names = {p.stem for p in CONFS}
    for words in (("linear",), ("fashion", "softmax"), ("mnist", "mlp"), ("fashion", "mlp"), ("mnist", "lenet"),
                  ("fashion", "cnn"), ("cifar", "resnet"), ("circles",)):
        assert any(all(w in name for w in words) for name in names), words


def test_overrides_are_parsed_as_yaml_and_typed() -> None:
    cfg = load_config(CONF_DIR / "mnist_mlp.yaml", ["optim.lr=1e-2", "train.epochs=3", "scaling.use_gpu=false",
                                                    "model.hidden=[32, 16]", "data.root=/tmp/x"])
    assert (cfg.optim.lr, cfg.train.epochs, cfg.scaling.use_gpu) == (0.01, 3, False)
    assert cfg.model.hidden == [32, 16] and cfg.data.root == "/tmp/x"


def test_the_issue_s_override_keys_all_exist() -> None:
    keys = ["train.epochs=2", "train.max_failures=1", "scaling.num_workers=2", "scaling.use_gpu=true",
            "data.name=mnist", "data.root=d", "data.download=false", "data.batch_size=8", "data.val_fraction=0.2",
            "model.name=mlp", "optim.name=sgd", "optim.lr=0.5", "loss=cross_entropy", "seed=3", "storage_path=s",
            "tracking.register_as=m"]
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
    with pytest.raises(ConfigError, match="key.path=value"):
        load_config(None, ["optim.lr"])


def test_tabular_needs_a_path_and_a_target() -> None:
    with pytest.raises(ConfigError, match="data.path"):
        load_config(None, ["data.name=tabular"])


def test_the_config_hash_follows_the_content() -> None:
    a, b = ExperimentConfig(), ExperimentConfig()
    assert config_hash(a) == config_hash(b)
    assert config_hash(a) != config_hash(load_config(None, ["optim.lr=0.5"]))
