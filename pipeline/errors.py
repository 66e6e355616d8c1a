"""The two ways a command fails, one base class each; every error the package raises derives from one.

- `BadInput` (exit 2): the input is wrong (a config key, a data file, an argument, a model reference, a
  run this machine's Ray cannot hold). The message names the key path or file and what is allowed, and
  nothing has started: no MLflow run, no registry version, no output file.
- `RunFailed` (exit 1): the input was fine and the run failed (a worker's error, a diverged loss, a
  tracking server gone, resources a cluster never gave). The message is one line saying what failed.

The command line maps exactly these two (and Ctrl-C, SIGTERM) to exit codes (cli.py); anything else is
a bug and keeps its traceback.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ValidationError
from pydantic_core import ErrorDetails

__all__ = ["BadInput", "ConfigError", "RunFailed", "describe_invalid"]


class BadInput(ValueError):
    """Refused before any work: the message names the problem (key path, file, value) and the fix."""


class ConfigError(BadInput):
    """A config that cannot be used; the message names the key path and the fix."""


class RunFailed(RuntimeError):
    """A run that started and failed: the message is the cause on one line (the worker's own error)."""


def describe_invalid(err: ValidationError, source: str, root: type[BaseModel], what: str) -> str:
    """A validation error as one line per problem, each naming its key path and what is allowed."""
    lines = [f"{source}: invalid {what}"]
    for problem in err.errors():
        key = ".".join(str(part) for part in problem["loc"]) or "(top level)"
        lines.append(f"  {key}: {_explain(problem, root)}")
    return "\n".join(lines)


def _explain(problem: ErrorDetails, root: type[BaseModel]) -> str:
    kind = problem["type"]
    if kind == "extra_forbidden":
        return f"unknown key; the keys here are: {', '.join(_allowed_keys(problem['loc'], root))}"
    message = problem["msg"].removeprefix("Value error, ")
    if "input" not in problem or isinstance(problem["input"], dict):
        return message
    return f"{message} (got {problem['input']!r})"


def _allowed_keys(loc: tuple[Any, ...], root: type[BaseModel]) -> list[str]:
    model: type[BaseModel] = root
    for part in loc[:-1]:
        annotation = model.model_fields[str(part)].annotation
        if not (isinstance(annotation, type) and issubclass(annotation, BaseModel)):
            break
        model = annotation
    return sorted(model.model_fields)
