"""Pre-flight checks for NDIF: every refusal we know NDIF (or the Hub) can give, caught before sending.

What NDIF's server does, and what is checked here first (server code read: ``ndif-team/ndif``,
``src/ndif/services/api/config.py`` at ``b8950c97`` and ``dependencies.py`` at ``3f4135e5``, where the
minimum client versions default to the server's own; ``versioning.py`` at ``03d5ea5b``, where a
deployment sets them with ``NDIF_MIN_NNSIGHT_VERSION`` / ``NDIF_MIN_PYTHON_VERSION``;
``deployments/modeling/base.py`` for the execution timeout):

- **Versions.** nnsight sends ``nnsight-version`` and ``python-version`` headers with every request;
  NDIF answers HTTP 400 when either is older than its minimum (Python compared as major.minor).
  :func:`check_client_versions` reads the server's versions from NDIF's ``/env`` (what
  ``nnsight.compare()`` reads) and refuses a client older than them, naming both, and says so
  when the server runs an nnsight outside the range this nngraft supports.
- **Gated models.** Meta's and Google's repositories are gated on the Hub; the recipient's config
  and tokenizer are downloaded on *this* machine. :func:`gated_error` turns the Hub's refusal
  into one message naming the token (``HF_TOKEN``) and the page to accept the licence on.
- **Renamed repositories.** An adapter's ``base_model_name_or_path`` may name a repository by its
  old name; :func:`same_base` knows the renames in :data:`BASE_MODEL_ALIASES`.
- **Execution timeout.** NDIF stops a request after its execution timeout ("Your job exceeded the
  execution timeout of Ns"). :func:`estimate_seconds` predicts a request's duration from its
  round trips and bytes, and the backend warns before sending one predicted to take too long.

Example:
    >>> same_base("meta-llama/Meta-Llama-3.1-8B", "meta-llama/Llama-3.1-8B")
    True
    >>> same_base("meta-llama/Meta-Llama-3.1-8B", "meta-llama/Llama-3.1-8B-Instruct")
    False
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass
from typing import Any, Callable

from ..errors import ClientVersionError, RemoteTimeoutError
from ..util.hub import BASE_MODEL_ALIASES, canonical_name, gated_error, is_gated, same_base  # noqa: F401
# (part of the pre-flight, kept in util so that the donors' own checks use them too)

# ---------------------------------------------------------------------------------------------
# Versions
# ---------------------------------------------------------------------------------------------


def _version(text: str) -> Any:
    from packaging.version import InvalidVersion, Version

    try:
        return Version(text)
    except InvalidVersion:
        return None


def _major_minor(python_version: str) -> str:
    return ".".join(python_version.split()[0].split(".")[:2]) if python_version else ""


def nnsight_requirement() -> str:
    """The nnsight versions this nngraft supports (its install requirement, e.g. ``>=0.8,<0.9``)."""
    from importlib.metadata import PackageNotFoundError, requires

    try:
        for line in requires("nngraft") or ():
            match = re.match(r"nnsight\s*([^;]*)", line)
            if match:
                return match[1].strip().strip("()")
    except PackageNotFoundError:  # pragma: no cover - running from a bare source tree
        pass
    return ">=0.8,<0.9"


def client_versions() -> tuple[str, str]:
    """(nnsight, Python) as nnsight reports them to NDIF (its ``nnsight-version`` and
    ``python-version`` headers)."""
    from nnsight.intervention.backends.remote import _NNSIGHT_VERSION

    return _NNSIGHT_VERSION, sys.version


def check_client_versions(server_env: dict, *, client: tuple[str, str] | None = None) -> None:
    """Refuse (:class:`ClientVersionError`) a client NDIF would answer with HTTP 400: nnsight or
    Python older than the server's (``server_env``: what NDIF's ``/env`` returns, ``python_version``
    and ``packages``). NDIF's minimums default to the server's own versions; a deployment may set
    lower ones, which this check cannot see (then NDIF's own 400 is translated the same way)."""
    from packaging.specifiers import SpecifierSet

    client_nnsight, client_python = client or client_versions()
    server_nnsight = str((server_env.get("packages") or {}).get("nnsight", ""))
    server_python = _major_minor(str(server_env.get("python_version", "")))
    mine_python = _major_minor(client_python)
    pin = nnsight_requirement()
    problems = []
    if _version(server_nnsight) is not None:
        ahead = _version(server_nnsight) not in SpecifierSet(pin, prereleases=True)
        if not client_nnsight:
            problems.append("this machine's nnsight reports no version (installed from a source tree?); NDIF "
                            "refuses such a client: pip install the nnsight release")
        elif _version(client_nnsight) is not None and _version(client_nnsight) < _version(server_nnsight):
            fix = (f"this nngraft supports nnsight{pin}, so no nnsight it accepts matches the server: "
                   "upgrade nngraft to a release that supports nnsight " + server_nnsight
                   if ahead else f"pip install 'nnsight=={server_nnsight}'")
            problems.append(f"nnsight {client_nnsight} here, {server_nnsight} on NDIF ({fix})")
    if _version(server_python) is not None and _version(mine_python) is not None \
            and _version(mine_python) < _version(server_python):
        problems.append(f"Python {mine_python} here, {server_python} on NDIF (run nngraft in a Python "
                        f"{server_python} environment)")
    if problems:
        raise ClientVersionError(
            "NDIF refuses clients older than the server (HTTP 400): " + "; ".join(problems)
            + ". Nothing was sent. `nnsight.compare()` lists every package that differs."
        )


def get_json(url: str) -> Any:
    """GET ``url`` from NDIF and parse its JSON (raises on an HTTP error or no connection)."""
    import httpx

    response = httpx.get(url, timeout=httpx.Timeout(5.0, read=30.0))
    response.raise_for_status()
    return response.json()


def fetch_server_env(host: str, get: Callable[[str], Any] | None = None) -> dict | None:
    """NDIF's ``/env`` (the server's Python version and packages), or None if it cannot be read
    (an older server without ``/env``): the version check is then left to NDIF itself."""
    try:
        env = (get or get_json)(f"{host}/env")
    except Exception:  # noqa: BLE001 - /env is optional: NDIF's own check still applies
        return None
    return env if isinstance(env, dict) else None


def version_error_from_server(detail: str) -> ClientVersionError | None:
    """NDIF's HTTP 400 about versions (``Client nnsight version X is below the minimum ...``) as a
    :class:`ClientVersionError`, or None for another 400."""
    if not re.search(r"(nnsight|python) version", detail, re.IGNORECASE):
        return None
    detail = detail.removeprefix("Failed to send request: ")  # nnsight's prefix to the server's sentence
    mine_nnsight, mine_python = client_versions()
    return ClientVersionError(
        f"NDIF refused this client's versions (HTTP 400): {detail.rstrip('. ')}. This machine runs nnsight "
        f"{mine_nnsight or '(no version)'} and Python {_major_minor(mine_python)}; nngraft supports "
        f"nnsight{nnsight_requirement()}. `nnsight.compare()` shows the server's versions."
    )


# ---------------------------------------------------------------------------------------------
# Execution time
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TimeModel:
    """Assumptions that turn a request's traffic into seconds. NDIF publishes none of these; the
    defaults are ours, stated in docs/remote.md, and every one can be changed.

    ``round_trip_s``: one sandbox socket round trip (a greenlet switch, a message each way);
    ``socket_bytes_per_s``: activation bytes through the sandbox socket (both directions);
    ``upload_bytes_per_s``: this machine's upload to NDIF; ``forward_s``: the forward pass itself
    (GPU work, per request)."""

    round_trip_s: float = 2e-3
    socket_bytes_per_s: float = 1e9
    upload_bytes_per_s: float = 10e6
    forward_s: float = 5.0


DEFAULT_EXECUTION_TIMEOUT_S = 600.0
"""The execution timeout nngraft warns against (``NNGRAFT_NDIF_TIMEOUT_S`` overrides it). NDIF's is a
per-deployment setting it does not publish; a request over it fails with "Your job exceeded the
execution timeout of Ns"."""


def estimate_seconds(round_trips: int, sandbox_bytes: int, request_bytes: int, *, sandboxed: bool = True,
                     model: TimeModel = TimeModel()) -> float:
    """A request's predicted duration: upload, the forward pass, and (on the sandboxed path) its
    socket round trips and activation bytes."""
    seconds = request_bytes / model.upload_bytes_per_s + model.forward_s
    if sandboxed:
        seconds += round_trips * model.round_trip_s + sandbox_bytes / model.socket_bytes_per_s
    return seconds


def timeout_from_environment() -> float:
    """``NNGRAFT_NDIF_TIMEOUT_S`` as seconds > 0 (default :data:`DEFAULT_EXECUTION_TIMEOUT_S`)."""
    from ..util.checks import positive_from_environment

    return positive_from_environment("NdifBackend", "NNGRAFT_NDIF_TIMEOUT_S", DEFAULT_EXECUTION_TIMEOUT_S,
                                     "seconds", "execution_timeout_s")


def timeout_warning(estimate: float, timeout: float, round_trips: int, sandbox_bytes: int,
                    request_bytes: int) -> str | None:
    """The warning to print before sending a request predicted to run past ``timeout``, or None."""
    if estimate <= timeout:
        return None
    from .payload import format_bytes

    return (f"this request is predicted to take about {estimate:.0f} s ({round_trips} sandbox round trips, "
            f"{format_bytes(sandbox_bytes)} of activations through NDIF's sandbox socket, "
            f"{format_bytes(request_bytes)} to upload), over NDIF's execution timeout (assumed "
            f"{timeout:.0f} s; execution_timeout_s= or NNGRAFT_NDIF_TIMEOUT_S to change). NDIF would stop "
            "it with 'Your job exceeded the execution timeout'. Send fewer rows per request (batch_size=), "
            "graft fewer modules per spec, or use a LoRA donor from the Hub (peft=, r numbers per token).")


def timeout_error_from_server(message: str, estimate: float | None) -> RemoteTimeoutError | None:
    """NDIF's timeout message as a :class:`RemoteTimeoutError`, else None: "Your job exceeded the
    execution timeout of Ns." (current server) or "Job took longer than timeout: N seconds" (older)."""
    match = re.search(r"(?:exceeded the execution timeout of|took longer than timeout:)\s*([\d.]+)\s*s", message)
    if not match:
        return None
    said = f"; nngraft predicted about {estimate:.0f} s" if estimate is not None else ""
    return RemoteTimeoutError(
        f"NDIF stopped the request at its execution timeout of {match[1]} s{said}. Send fewer rows per "
        "request (batch_size=), graft fewer modules per spec, or use a Hub LoRA donor; set "
        f"execution_timeout_s={match[1]} so nngraft warns before sending such a request."
    )
