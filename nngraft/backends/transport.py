"""The NDIF transport: checks what a request would make the server do, sends it, and reads the
answer — for :class:`~nngraft.backends.ndif.NdifBackend`.

- **The serialization guard** (:func:`check_request`): nnsight pickles a trace's code and the
  objects it uses; the server resolves module *references* against the model it hosts and imports
  *by name* only the packages it has (:data:`SERVER_PACKAGES`). A request that refers to F's
  modules (which would silently become P's own on the server) or to code the server lacks is
  refused here, before anything is sent.
- **The transport** (:func:`transport_class`): nnsight's ``RemoteBackend`` with the guard, a size
  limit, and errors translated into nngraft's (:func:`translate_remote_error`).
- **A stand-in server** (:class:`InProcessServer`): the exact serialize → deserialize → execute
  round trip, in this process (``execution="local"``).

Example:
    >>> "nnsight" in SERVER_PACKAGES and "nngraft" not in SERVER_PACKAGES
    True
"""

from __future__ import annotations

import io
import sys
import types
from typing import Any, Callable, Mapping

import torch

from ..errors import (ForeignModuleError, ModelNotAvailableError, PayloadTooLargeError, RemoteAuthError,
                      RemoteConnectionError, RemoteExecutionError, RemoteGraftError, ServerEnvironmentError)
from . import preflight
from .base import Backend
from .payload import format_bytes

SERVER_PACKAGES = frozenset({
    "torch", "numpy", "transformers", "accelerate", "diffusers", "einops", "peft", "nnsight",
    # what those bring along
    "cloudpickle", "greenlet", "pydantic", "pydantic_core", "tokenizers", "safetensors",
    "huggingface_hub", "yaml", "zstandard", "httpx", "websocket", "tqdm", "typing_extensions",
})
"""Top-level packages an NDIF server has installed (nnsight 0.8.1 lists the first eight; the rest
are their dependencies). Anything else in a request must travel by value."""


# ---------------------------------------------------------------------------------------------
# Serialization guard: what the server would make of the request
# ---------------------------------------------------------------------------------------------


class _Count(io.RawIOBase):
    def __init__(self) -> None:
        self.n = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        self.n += len(b)
        return len(b)


def _root(name: str) -> str:
    return name.split(".")[0]


def _checking_pickler():
    from cloudpickle import cloudpickle as cp
    from nnsight.intervention.serialization import CustomCloudPickler

    class CheckingPickler(CustomCloudPickler):
        """nnsight's request pickler, plus checks of what the server will resolve or import."""

        def __init__(self, file: Any, known: Mapping[str, Any], protocol: int) -> None:
            super().__init__(file, protocol=protocol)
            self.known = known
            self.foreign: list[tuple[str, str]] = []  # (persistent id, type) not the recipient's

        def persistent_id(self, obj: Any) -> Any:
            pid = super().persistent_id(obj)
            if pid is not None:
                if self.known.get(pid) is not obj:
                    self.foreign.append((str(pid), type(obj).__name__))
                return pid
            if isinstance(obj, torch.nn.Module):
                raise ForeignModuleError(
                    f"the request would carry a whole {type(obj).__name__} module by value (with all "
                    "its weights); a donor must travel as the tensors of the grafted modules only "
                    "(DenseDonor, DeltaDonor or LoraDonor)."
                )
            return None

        def reducer_override(self, obj: Any) -> Any:
            is_class = isinstance(obj, type)
            if is_class or isinstance(obj, types.FunctionType):
                if cp._should_pickle_by_reference(obj):
                    found = cp._lookup_module_and_qualname(obj)
                    if found is not None:
                        self._server_has(found[0].__name__, f"{found[0].__name__}.{getattr(obj, '__qualname__', obj)}")
            elif isinstance(obj, types.ModuleType) and cp._should_pickle_by_reference(obj):
                self._server_has(obj.__name__, obj.__name__)
            return super().reducer_override(obj)

        @staticmethod
        def _server_has(module: str, what: str) -> None:
            root = _root(module)
            if root in SERVER_PACKAGES or root in sys.stdlib_module_names or root == "builtins":
                return
            raise ServerEnvironmentError(
                f"the request refers to {what}, which the server would have to import from "
                f"{root!r}; NDIF servers do not have {root!r} installed. Only plain data (tensors, "
                "dicts, lists, numbers, strings) may go into a remote trace, or register the module "
                "with nnsight.register(...) so its source travels with the request."
            )

    return CheckingPickler


def check_request(tracer: Any, known: Mapping[str, Any]) -> int:
    """Pickle ``tracer``'s request exactly as ``RequestModel.serialize`` does, but with checks;
    return its uncompressed size in bytes. Raises :class:`ForeignModuleError` or
    :class:`ServerEnvironmentError` for what would break (silently or not) on the server."""
    from nnsight.intervention.serialization import DEFAULT_PROTOCOL, reduce_block

    variables = dict(tracer.info.frame.f_locals)
    interventions = reduce_block(tracer.node, tracer.info.frame.f_globals, variables)
    for name, value in {**interventions[1], **interventions[2]}.items():
        if isinstance(getattr(value, "backend", None), Backend):  # a Grafter
            raise ServerEnvironmentError(
                f"the trace refers to the Grafter {name!r}, which cannot travel to the server (nngraft is "
                f"not installed there); refer to P's modules through an envoy variable set before the "
                f"with block: lm = {name}.model_envoy, then lm.model.layers[0].output inside it"
            )
    sink = _Count()
    pickler = _checking_pickler()(sink, known, protocol=DEFAULT_PROTOCOL)
    pickler.dump((tracer, interventions))
    if pickler.foreign:
        modules = [pid[len("Module:"):] for pid, _ in pickler.foreign if pid.startswith("Module:")]
        others = sorted({f"{kind} ({pid})" for pid, kind in pickler.foreign if not pid.startswith("Module:")})
        shown = ", ".join(repr(m) for m in modules[-3:])
        raise ForeignModuleError(
            f"the request references {len(modules)} module(s) of a model other than the recipient"
            + (f" (e.g. {shown})" if modules else "") + (f"; also {', '.join(others)}" if others else "")
            + ". NDIF resolves such references by path to the hosted model, so it would run the "
            "recipient's OWN modules there: the graft would silently do nothing. Send the finetuned "
            "weights as tensors instead (DenseDonor, DeltaDonor or LoraDonor; see docs/remote.md)."
        )
    return sink.n


# ---------------------------------------------------------------------------------------------
# Transport
# ---------------------------------------------------------------------------------------------

Server = Callable[[str, bytes], bytes]
"""``server(metadata_json, blob) -> result_bytes``: anything that runs a serialized request."""


def transport_class():
    from nnsight.intervention.backends.remote import RemoteBackend, RemoteError

    class NngraftBackend(RemoteBackend):
        """nnsight's RemoteBackend (one request's transport) with nngraft's request checks, size limit and error messages;
        ``server`` replaces the network (HTTP + websocket) with a callable."""

        def __init__(self, model_key: str, *, known: Mapping[str, Any], limit_bytes: int | None,
                     server: Server | None = None, check: bool = True, **kwargs: Any) -> None:
            super().__init__(model_key, **kwargs)
            self.known = known
            self.check = check  # False only in the test that shows what the check prevents
            self.limit_bytes = limit_bytes
            self.server = server
            self.raw_bytes: int | None = None
            self.sent_bytes: int | None = None
            self.estimate_s: float | None = None  # the request's predicted duration (set by NdifBackend)

        def _serialize(self, tracer: Any) -> bytes:
            from nnsight.ndif import pull_env

            # nnsight prepares its environment first (pull_env registers the local, non-installed
            # modules to travel by value), then serializes: check after that, so the check sees
            # what nnsight will send, not what it would have sent before.
            pull_env()
            size = check_request(tracer, self.known) if self.check else 0
            if self.limit_bytes is not None and size > self.limit_bytes:
                raise PayloadTooLargeError(
                    f"the serialized request is {format_bytes(size)}, over the limit of "
                    f"{format_bytes(self.limit_bytes)} (raise max_payload_mb= if you are sure)"
                )
            blob = super()._serialize(tracer)
            raw = len(_decompressed(blob)) if self.compress else len(blob)
            if self.check and raw != size:
                raise RemoteGraftError(
                    f"nnsight serialized a request of {raw} bytes, but the one nngraft checked was "
                    f"{size} bytes: the check did not see what is sent; nothing was sent"
                )
            self.raw_bytes, self.sent_bytes = size, len(blob)
            return blob

        def request(self, request: Any, tracer: Any) -> Any:
            if self.server is not None:
                blob = self._serialize(tracer)
                return self.finalize(self.server(request.metadata(), blob))
            import websocket

            try:
                return super().request(request, tracer)
            except RemoteError as error:
                raise translate_remote_error(error, self.host, self.sent_bytes, self.raw_bytes,
                                             self.estimate_s) from None
            except websocket.WebSocketBadStatusException as error:
                if error.status_code in (401, 403):
                    raise RemoteAuthError(
                        f"NDIF ({self.host}) refused the connection (HTTP {error.status_code}). Check "
                        "NDIF_API_KEY (get a key at https://login.ndif.us)."
                    ) from None
                raise RemoteConnectionError(f"NDIF ({self.host}) refused the connection: {error}") from None
            except (OSError, websocket.WebSocketException) as error:
                raise RemoteConnectionError(f"could not reach NDIF at {self.host}: {error}") from None

    return NngraftBackend


def _decompressed(blob: bytes) -> bytes:
    import zstandard

    return zstandard.ZstdDecompressor().decompress(blob)


def translate_remote_error(error: Exception, host: str, sent_bytes: int | None = None,
               raw_bytes: int | None = None, estimate_s: float | None = None) -> RemoteGraftError:
    """nnsight's RemoteError → a GraftError that says what to do (never echoing the API key).

    ``sent_bytes``/``raw_bytes``: the request's size as sent (compressed) and before
    compression, when known; quoted when the server says the request is too large (HTTP 413).
    ``estimate_s``: the predicted duration, quoted when NDIF stopped the request at its timeout.
    """
    cause = error.__cause__
    status = getattr(getattr(cause, "response", None), "status_code", None)
    said = str(error).rstrip(". ")
    if status in (401, 403):
        return RemoteAuthError(
            f"NDIF ({host}) refused the request (HTTP {status}): {said}. Check NDIF_API_KEY "
            "(get a key at https://login.ndif.us) and that your key may use this model."
        )
    if status == 413:
        size = ""
        if sent_bytes is not None:
            size = f" The request was {format_bytes(sent_bytes)} as sent"
            if raw_bytes:
                size += f" ({format_bytes(raw_bytes)} before compression)"
            size += "."
        return PayloadTooLargeError(
            f"NDIF ({host}) refused the request as too large for the server (HTTP 413): {said}."
            f"{size} Send less per request: a smaller batch_size=, a DeltaDonor or LoraDonor of "
            "lower rank instead of dense tensors, or fewer grafted modules or layers per spec "
            "(lower max_payload_mb= to catch this before sending; see docs/remote.md)."
        )
    if status == 400:
        versions = preflight.version_error_from_server(said)
        if versions is not None:
            return versions
    if status is not None:
        return RemoteGraftError(f"NDIF ({host}) refused the request (HTTP {status}): {error}")
    timed_out = preflight.timeout_error_from_server(str(error), estimate_s)
    if timed_out is not None:
        return timed_out
    return RemoteExecutionError(f"the request failed on NDIF ({host}):\n{error}")


class InProcessServer:
    """Runs requests the way an NDIF model actor does — ``RequestModel.deserialize`` against the
    model's persistent objects, ``tracer.execute``, collect the ``save()``-marked values,
    ``torch.save`` them — in this process, on a worker thread, against a local copy of P.

    It catches everything serialization can break (unpicklable or unimportable objects, code
    that does not survive source shipping) and gives real numbers on a small model, but it runs
    in the client's own process, so it cannot prove that nothing depends on local state; the
    test suite also runs requests in a fresh subprocess that has only P (tests/helpers/remote_worker.py).
    """

    def __init__(self, wrapper: Any) -> None:
        self.wrapper = wrapper

    def __call__(self, metadata: str, blob: bytes) -> bytes:
        from concurrent.futures import ThreadPoolExecutor

        with ThreadPoolExecutor(1) as pool:
            return pool.submit(self._execute, metadata, blob).result()

    def _execute(self, metadata: str, blob: bytes) -> bytes:
        import linecache

        from nnsight.schema.request import RequestModel
        from nnsight.tracing.globals import BLOCKS, SOURCES
        from nnsight.tracing.tracer import _saves, dec, inc

        request = RequestModel.model_validate_json(metadata)
        snapshots = (dict(linecache.cache), dict(SOURCES), dict(BLOCKS))
        try:
            self.wrapper._remoteable_set_env(request.env)
            tracer = RequestModel.deserialize(blob, self.wrapper._remoteable_persistent_objects(),
                                              compress=request.compress)
            inc()
            try:
                with torch.no_grad():
                    tracer.execute(tracer.info.code)
                saves = _saves()
                saved = {k: v for k, v in tracer.info.frame.f_locals.items() if id(v) in saves}
            finally:
                dec()
        except Exception as error:
            raise RemoteExecutionError(f"the request failed in the in-process server: "
                                       f"{type(error).__name__}: {error}") from error
        finally:
            for target, saved_state in zip((linecache.cache, SOURCES, BLOCKS), snapshots):
                target.clear()
                target.update(saved_state)
        buffer = io.BytesIO()
        torch.save({k: v.detach().cpu() if isinstance(v, torch.Tensor) else v for k, v in saved.items()},
                   buffer)
        data = buffer.getvalue()
        if request.compress:
            import zstandard

            data = zstandard.ZstdCompressor(level=3).compress(data)
        return data


def check_model_available(repo_id: str, host: str | None = None, *, get: Callable[[str], Any] | None = None) -> None:
    """Raise :class:`ModelNotAvailableError` unless NDIF reports ``repo_id`` RUNNING.

    ``get(url) -> json`` performs the HTTP GET (default: ``httpx``)."""
    from nnsight.schema.config import CONFIG

    host = host or CONFIG.API.HOST
    try:
        status = (get or preflight.get_json)(f"{host}/status")
    except Exception as error:  # noqa: BLE001 - any transport failure means "unreachable"
        raise RemoteConnectionError(f"could not read NDIF's model list at {host}/status: {error}") from None
    deployments = (status or {}).get("deployments", {}) or {}
    running = sorted({str(d.get("repo_id", name)) for name, d in deployments.items()
                      if d.get("application_state") == "RUNNING"})
    if repo_id.lower() in {r.lower() for r in running}:
        return
    listed = ", ".join(running[:20]) + (" …" if len(running) > 20 else "") if running else "none"
    raise ModelNotAvailableError(
        f"{repo_id!r} is not running on NDIF ({host}). Running now: {listed}. Remote grafting needs P "
        "to be hosted there (check https://nnsight.net/status or nnsight.status()); for a model NDIF "
        "does not host, run locally with Grafter(P, F, tokenizer)."
    )
