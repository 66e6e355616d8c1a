"""The search space of `tune.space`: parsed and checked before any trial, then handed to Ray Tune.

    tune:
      space:
        optim.lr: {loguniform: [1.0e-4, 1.0e-1]}
        data.batch_size: {choice: [32, 64, 128]}
        model.dropout: {uniform: [0.0, 0.5]}
        seed: {randint: [0, 10]}                 # high exclusive
        optim.name: {grid: [sgd, adam]}          # every value, each with num_samples draws

Every key must be a config key and every value one the config accepts (checked with the config's own
validation); a range on an integer key must use randint or choice.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

from pipeline.config import ConfigError, ExperimentConfig, with_values

__all__ = ["Dimension", "parse_dimensions", "parse_space"]

_NUMERIC = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+$")


@dataclass(frozen=True)
class Dimension:
    key: str  # a config key path, e.g. optim.lr
    kind: str  # loguniform, uniform, randint, choice, grid
    args: tuple[Any, ...]

    def candidates(self) -> tuple[Any, ...]:
        """Values to validate the key with: the bounds, or every listed value."""
        if self.kind == "randint":
            return (self.args[0], self.args[1] - 1)
        return self.args

    def to_ray(self) -> Any:
        from ray import tune

        if self.kind in ("choice", "grid"):
            values = list(self.args)
            return tune.grid_search(values) if self.kind == "grid" else tune.choice(values)
        return {"loguniform": tune.loguniform, "uniform": tune.uniform, "randint": tune.randint}[self.kind](*self.args)


def parse_space(cfg: ExperimentConfig) -> list[Dimension]:
    """`tune.space` checked before any trial: real config keys, sane bounds, values the config accepts."""
    if not cfg.tune.space:
        raise ConfigError("tune.space: empty; add e.g. `tune: {space: {optim.lr: {loguniform: [1.0e-4, 1.0e-1]}}}` to the conf")
    return parse_dimensions(cfg, cfg.tune.space, "tune.space")


def parse_dimensions(cfg: ExperimentConfig, space: dict[str, dict[str, Any]], section: str) -> list[Dimension]:
    """A mapping in tune.space's syntax (`section`: where it is written, for the messages), checked."""
    dimensions = []
    for key, spec in space.items():
        kind, args = next(iter(spec.items()))
        dimension = Dimension(key, kind, _arguments(f"{section}.{key}.{kind}", kind, args))
        for value in dimension.candidates():
            with_values(cfg, {key: value}, source=f"{section}.{key}")  # unknown key or bad value: ConfigError
        if kind in ("uniform", "loguniform"):
            _check_fractions(cfg, dimension, f"{section}.{key}.{kind}")
        dimensions.append(dimension)
    return dimensions


def _check_fractions(cfg: ExperimentConfig, dimension: Dimension, where: str) -> None:
    """An integer key accepts the bounds 16.0 and 64.0, then refuses every trial's 37.4: try a fraction inside."""
    low, high = dimension.args
    middle = (low + high) / 2
    # A whole middle ([2, 4]) moves by a quarter of the range, at most 0.5: still inside, no longer whole.
    inside = middle if middle != int(middle) else middle + min(0.5, (high - low) / 4)
    try:
        with_values(cfg, {dimension.key: inside})
    except ConfigError:
        whole = f"randint: [{math.ceil(low)}, {math.floor(high) + 1}]"  # randint's high is exclusive
        raise ConfigError(f"{where}: {dimension.key} takes whole numbers; use {whole} or choice: [...]") from None


def _arguments(where: str, kind: str, args: Any) -> tuple[Any, ...]:
    if kind in ("choice", "grid"):
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: give a non-empty list of values, e.g. [32, 64]")
        return tuple(_number_if_numeric(value) for value in args)
    if not isinstance(args, list) or len(args) != 2:
        raise ConfigError(f"{where}: give [low, high], e.g. [1.0e-4, 1.0e-1]")
    low, high = (_number(where, value) for value in args)
    if low >= high:
        raise ConfigError(f"{where}: low {low} must be below high {high}")
    if kind == "loguniform" and low <= 0:
        raise ConfigError(f"{where}: bounds must be > 0 for a log scale (got low={low})")
    if kind == "randint":
        if low != int(low) or high != int(high):
            raise ConfigError(f"{where}: integer bounds, please (got [{low}, {high}])")
        return int(low), int(high)
    return low, high


def _number_if_numeric(value: Any) -> Any:
    """YAML reads 1e-4 (no dot) as text; a listed value that is a number in disguise becomes one."""
    if isinstance(value, str) and _NUMERIC.match(value.strip()):
        return float(value)
    return value


def _number(where: str, value: Any) -> float:
    try:
        return float(value)  # YAML reads 1e-4 (no dot) as text
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {value!r} is not a number") from None
