"""Reaching an MLflow server, authentication included, before a run depends on it.

    urllib.request.urlopen(server_request(uri, "/health"))   # credentials attached, never printed
    check_access(uri, where)                                # ConfigError naming the server and the fix

A server with MLflow's basic-auth app (`mlflow server --app-name basic-auth`) takes a user and password
from MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD, which MLflow's client reads itself (or from
the URI, http://user:password@host). Its /health answers without them, so a wrong password would only
show at the run's first write, after the data was prepared: an authenticated read finds it at once.
"""

from __future__ import annotations

import base64
import os
import urllib.error
import urllib.request
from urllib.parse import unquote, urlsplit, urlunsplit

from pipeline.config import ConfigError

__all__ = ["check_access", "server_request"]

TIMEOUT_S = 5.0
CREDENTIALS = "MLFLOW_TRACKING_USERNAME and MLFLOW_TRACKING_PASSWORD"


def server_request(uri: str, path: str) -> urllib.request.Request:
    """GET <server><path>, with Basic auth from the URI's user:password or else from the environment."""
    parts = urlsplit(uri.rstrip("/"))
    plain = urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[-1]))  # urllib takes no credentials in the host
    request = urllib.request.Request(f"{plain}{path}")
    if parts.username is not None:
        user, password = unquote(parts.username), unquote(parts.password or "")
    else:
        user, password = os.environ.get("MLFLOW_TRACKING_USERNAME", ""), os.environ.get("MLFLOW_TRACKING_PASSWORD", "")
    if user:
        request.add_header("Authorization", "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode())
    return request


def check_access(uri: str, where: str) -> None:
    """An authenticated read of the server: refused credentials are a ConfigError that says which to set."""
    try:
        urllib.request.urlopen(server_request(uri, "/api/2.0/mlflow/experiments/search?max_results=1"), timeout=TIMEOUT_S).close()
    except urllib.error.HTTPError as err:
        if err.code == 401:
            given = "were refused" if "MLFLOW_TRACKING_USERNAME" in os.environ or "@" in uri else "are needed (none were given)"
            raise ConfigError(f"tracking: the MLflow server at {where} has authentication on, and its credentials {given} "
                              f"(HTTP 401); set {CREDENTIALS} to a user of that server") from None  # fmt: skip
        # Anything else answered: a server is there, and the run's own requests will say more.
    except (urllib.error.URLError, OSError):
        pass  # answered /health a moment ago; a lost connection now is for the run's retries
