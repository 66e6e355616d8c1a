"""Credentials never leave: what is shown or logged has secrets replaced.

    redact("postgresql://user:pw@db/mlflow")    # 'postgresql://***@db/mlflow'
    redact_tree(result)                         # values of secret-looking keys and URI credentials, at any depth
    safe_config(cfg)                            # the resolved config, fit for MLflow params and artifacts

Used by everything that prints or records a config, a path or a result: tracking (params, tags,
artifacts), the console summaries, error messages, `pipeline submit`'s printed entrypoint and the command
line recorded with each run (`invocation`).
"""

from __future__ import annotations

import re
import shlex
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import yaml

from pipeline.config import ExperimentConfig

__all__ = ["REDACTED", "invocation", "is_secret_key", "printable", "redact", "redact_tree", "safe_config"]

# Config keys whose values never reach MLflow or the console (tokens in a user model's kwargs, say).
_SECRET_KEY = re.compile(r"(?i)(password|passwd|token|secret|credential|api_?key|access_?key)")
REDACTED = "***"


def redact(uri: str) -> str:
    """A URI fit to print: a password or token in its user-info part is replaced."""
    parts = urlsplit(uri)
    if parts.password is None and "@" not in parts.netloc:
        return uri
    host = parts.netloc.rsplit("@", 1)[-1]
    return urlunsplit(parts._replace(netloc=f"{REDACTED}@{host}"))


def is_secret_key(key: str) -> bool:
    """Whether a (dotted) key names a secret: password, token, secret, credential, API or access key."""
    return bool(_SECRET_KEY.search(key))


def safe_config(cfg: ExperimentConfig) -> dict[str, Any]:
    """The resolved config as plain data, with secret-looking keys and URI credentials replaced."""
    return redact_tree(cfg.model_dump(mode="json"))


def redact_tree(tree: Any) -> Any:
    """Plain data (a config, a result) fit to show or log: values of secret-looking keys replaced, and
    credentials in every URI, at any depth."""
    if isinstance(tree, dict):
        return {
            key: REDACTED if is_secret_key(str(key)) and not isinstance(value, dict) else redact_tree(value) for key, value in tree.items()
        }
    if isinstance(tree, (list, tuple)):
        return [redact_tree(value) for value in tree]
    return redact(tree) if isinstance(tree, str) and "://" in tree else tree


def printable(entrypoint: str) -> str:
    """The entrypoint fit for a terminal: credentials in URIs and values of secret-looking keys hidden."""
    words = []
    for word in shlex.split(entrypoint):
        key, sep, value = word.partition("=")
        if sep and is_secret_key(key):
            word = f"{key}={REDACTED}"
        elif sep and isinstance(mapping := _yaml_or_none(value), dict):  # model.kwargs={api_token: ...}
            word = f"{key}={yaml.safe_dump(redact_tree(mapping), default_flow_style=True, width=10**6).strip()}"
        elif "://" in word:
            word = f"{key}={redact(value)}" if sep and "://" in value else redact(word)
        words.append(word)
    return shlex.join(words)


def _yaml_or_none(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return None


def invocation() -> str:
    """This process's command line, fit to record: `pipeline train conf/x.yaml optim.lr=0.01`, secrets hidden."""
    program = [Path(sys.argv[0]).name]
    if program == ["__main__.py"]:  # python -m pipeline
        program = ["python", "-m", Path(sys.argv[0]).parent.name]
    return printable(shlex.join([*program, *sys.argv[1:]]))
