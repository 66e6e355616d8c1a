"""The config's YAML side: a conf file read (a key given twice is an error) and `key.path=value` overrides parsed.

raw = read_yaml(Path("conf/mnist_mlp.yaml"))   # a plain dict, validated by config.load_config
apply_override(raw, "optim.lr=0.01")
"""

from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError

__all__ = ["apply_override", "read_yaml"]


class _UniqueKeyLoader(yaml.SafeLoader):
    """yaml.safe_load's loader, except that a key given twice in one mapping is an error: PyYAML keeps
    the last, so a second `data:` section would silently drop the first."""

    def construct_document(self, node: yaml.Node) -> Any:
        # Checked on the composed tree, before construction: a `<<: *anchor` merge flattens the anchored
        # mapping in place, after which it repeats the keys it overrides, so a per-mapping check misfires.
        self._refuse_duplicates(node, (), set())
        return super().construct_document(node)

    def _refuse_duplicates(self, node: yaml.Node, path: tuple[str, ...], seen: set[int]) -> None:
        if id(node) in seen:  # an alias of a node already checked (anchors may even be recursive)
            return
        seen.add(id(node))
        pairs = node.value if isinstance(node, yaml.MappingNode) else []
        items = node.value if isinstance(node, yaml.SequenceNode) else []
        first: dict[Any, int] = {}
        for key_node, value_node in pairs:
            key_path = (*path, str(key_node.value))
            if isinstance(key_node, yaml.ScalarNode) and key_node.tag != "tag:yaml.org,2002:merge":
                key, line = self.construct_object(key_node), key_node.start_mark.line + 1
                if key in first:  # a section is a block mapping; `{uniform: [1, 2]}` is one value
                    section = isinstance(value_node, yaml.MappingNode) and not value_node.flow_style
                    fix = "merge the two sections" if section else "keep one of the two"
                    raise ConfigError(f"line {line}: duplicate key {'.'.join(key_path)} (first at line {first[key]}); {fix}")
                first[key] = line
            self._refuse_duplicates(value_node, key_path, seen)
        for index, item in enumerate(items):
            self._refuse_duplicates(item, (*path, str(index)), seen)


def read_yaml(path: Path) -> dict[str, Any]:
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file; the experiments are in conf/*.yaml")
    try:
        raw = yaml.load(path.read_text(), Loader=_UniqueKeyLoader)
    except ConfigError as err:  # a duplicate key; the loader does not know the file
        raise ConfigError(f"{path}: {err}") from None
    except yaml.YAMLError as err:
        where = getattr(err, "problem_mark", None)
        line = f" line {where.line + 1}" if where else ""
        raise ConfigError(f"{path}:{line} is not valid YAML: {getattr(err, 'problem', err)}") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(f"{path}: the top level must be a mapping of keys, got {type(raw).__name__}")
    return raw


def apply_override(raw: dict[str, Any], override: str) -> None:
    key, sep, text = override.partition("=")
    if not sep or not key or any(not part for part in key.split(".")):
        raise ConfigError(f"override {override!r}: write it as key.path=value, e.g. optim.lr=0.01")
    value = _parse_value(text)
    node = raw
    parts = key.split(".")
    for depth, part in enumerate(parts[:-1]):
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {'.'.join(parts[: depth + 1])} is a value, not a section")
        node = child
    node[parts[-1]] = value


def _parse_value(text: str) -> Any:
    """An override's value, read as YAML, except that on a command line `#` is never a comment:
    `tracking.experiment=run #2` is 'run #2', where YAML would read 'run'."""
    try:
        tokens = list(yaml.scan(text))
        # The scanner skips comments only, so a `#` between two tokens starts one. ('x #y' is one token.)
        if any("#" in text[a.end_mark.index : b.start_mark.index] for a, b in itertools.pairwise(tokens)):
            return text
        return yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        return text  # not YAML: keep the string and let validation judge it
