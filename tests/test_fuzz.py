"""Property tests: whatever YAML or overrides a user writes, the config loader gives a valid config or a
ConfigError that names the problem; never a traceback from deeper down (KeyError, TypeError, ...)."""

from __future__ import annotations

import tempfile
from collections.abc import Sequence
from pathlib import Path

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pipeline.cluster import JobError, load_job
from pipeline.config import ConfigError, ExperimentConfig, flatten, load_config
from tests.helpers import CONF_DIR

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
KEYS = sorted(flatten(ExperimentConfig().model_dump(mode="json")))  # every key path of a config

scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=12)
values = st.recursive(
    scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3), max_leaves=8
)
# Key paths that exist, that nearly exist, and that do not: a.b, a., .b, a..b, deeper than any section.
key_paths = st.sampled_from(KEYS) | st.sampled_from(KEYS).map(lambda k: k + ".x") | st.text(alphabet="ab._=", max_size=8)


def _load(text: str, overrides: Sequence[str] = ()) -> None:
    """Load `text` as a conf file: a config, or a ConfigError with a message; anything else fails the test."""
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "conf.yaml"
        path.write_text(text)
        try:
            load_config(path, overrides)
        except ConfigError as err:
            assert str(err).strip(), "a ConfigError must say what is wrong"


@SETTINGS
@given(st.text(max_size=200))
def test_any_text_as_a_conf_file(text: str) -> None:
    _load(text)


@SETTINGS
@given(st.dictionaries(key_paths, values, max_size=4))
def test_a_real_conf_with_keys_set_to_anything(changes: dict[str, object]) -> None:
    conf = yaml.safe_load((CONF_DIR / "mnist_mlp.yaml").read_text())
    for key, value in changes.items():
        node = conf
        *parents, leaf = key.split(".")
        for part in parents:
            child = node.get(part) if isinstance(node, dict) else None
            node = child if isinstance(child, dict) else node.setdefault(part, {}) if isinstance(node, dict) else {}
        if isinstance(node, dict):
            node[leaf] = value
    _load(yaml.safe_dump(conf))


@SETTINGS
@given(st.lists(st.tuples(key_paths, st.text(max_size=12)).map("=".join) | st.text(max_size=16), max_size=4))
def test_any_overrides_on_a_real_conf(overrides: list[str]) -> None:
    _load((CONF_DIR / "mnist_mlp.yaml").read_text(), overrides)


@SETTINGS
@given(
    st.text(max_size=200)
    | st.dictionaries(st.sampled_from(["name", "entrypoint", "runtime_env", "resources", "x"]), values, max_size=4).map(yaml.safe_dump)
)
def test_any_job_spec(text: str) -> None:
    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "job.yaml"
        path.write_text(text)
        try:
            load_job(path, environ={})
        except (JobError, ConfigError) as err:
            assert str(err).strip()
