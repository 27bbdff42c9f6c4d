"""Remote grafting on NDIF: the pretrained model P runs on the server, the donor travels as data.

On NDIF only P is hosted; F is yours. A module of F referenced inside a remote trace is sent as a
*reference by module path*, which the server resolves to P's OWN module — the graft silently does
nothing. So here the donor travels as tensors (dense F tensors, a weight delta, or LoRA factors;
see :mod:`nngraft.donors.delta`) for exactly the modules a spec grafts, and F's output is computed
functionally inside the trace from P's input and output (:mod:`nngraft.backends.functional`)::

    g = Grafter.remote("meta-llama/Meta-Llama-3.1-8B", donor=LoraDonor("path/to/adapter"))
    out = g.run(spec, prompts, spans=...)        # one NDIF request per batch; same GraftResult

Why functional and not parameter swapping (what local runs do): swapping tensors into P's module
needs the server's *real* module, but NDIF may run user code in a sandbox process that holds only
a weightless stand-in of the model (activations cross a socket, module weights never do); a
swap there would change nothing on the GPU — the same silent no-op. Reading a module's input and
output and writing a new output is the one thing every NDIF execution mode supports.

Before anything is sent, a pre-flight check compiles the spec against the model's config
(components, layers), checks every donor tensor's shape against P's, verifies that the
functional form of every grafted module class reproduces the module's own forward bit for bit,
estimates the payload from shapes (refusing above ``max_payload_mb``), and then inspects the
serialized request for references the server would resolve to P (the trap above) and for objects
the server cannot load (nngraft itself is not installed there).

Modules: :mod:`nngraft.donors.delta` (donors as data), :mod:`nngraft.backends.payload` (plans → programs, module
kinds, payload sizes), :mod:`nngraft.backends.functional` (the code that runs on the server),
:mod:`nngraft.backends.transport` (request checks, transport, the stand-in server), and this one
(:class:`NdifBackend`).

``execution=`` chooses where the request runs: ``"ndif"`` (default), ``"local"`` (this process,
on a local copy of P, through the exact serialize → deserialize → execute round trip a server
does — check a study on a small model first), or any callable ``server(metadata_json, blob) ->
result_bytes``.
"""

from __future__ import annotations

import os
import threading
from typing import Any, Mapping, Sequence

import torch

from ..arch import get_module
from ..donors.delta import DeltaDonor
from ..errors import (  # noqa: F401 - re-exported: remote errors live in nngraft.errors
    ClientVersionError,
    ForeignModuleError,
    GatedModelError,
    ModelNotAvailableError,
    PayloadTooLargeError,
    RemoteAuthError,
    RemoteConnectionError,
    RemoteDonorError,
    RemoteDonorMismatch,
    RemoteExecutionError,
    RemoteGraftError,
    RemoteTimeoutError,
    RemoteUnsupportedError,
    ServerEnvironmentError,
    UnsupportedModuleError,
)
from .functional import run_program
from .hub_lora import build_hub_program
from . import preflight
from .payload import (  # noqa: F401 - re-exported for users of nngraft.backends.ndif
    PayloadItem,
    PayloadReport,
    RemotePartialDonor,
    ShapeDonor,
    donor_name_of,
    dtype_name,
    build_program,
    estimate_payload,
    format_bytes,
    leaf_plan,
    module_kind,
    spec_modules,
)
from ..donors.donor import pick_donor
from ..compile.plan import GraftPlan
from ..spec import SpecLike, as_spec
from .base import Backend
from .transport import (SERVER_PACKAGES, InProcessServer, Server, check_model_available,  # noqa: F401 - re-exported
                        check_request, transport_class, translate_remote_error)
from .setup import Elsewhere, Setup, hub_donor
from ..util.hub import hub_id
from ..compile.trace import CompiledGraft
from .traffic import Traffic, dataflow, program_traffic

DEFAULT_MAX_PAYLOAD_MB = 256.0
"""Default refusal threshold for one request (``NNGRAFT_MAX_PAYLOAD_MB`` overrides it). NDIF does
not publish a request size limit; large requests are slow to upload and to deserialize."""



# ---------------------------------------------------------------------------------------------
# The trace (its source travels with every request: keep it minimal)
# ---------------------------------------------------------------------------------------------


def _remote_trace(wrapper: Any, inputs: dict, program: dict, backend: Any) -> Any:
    with wrapper.trace(**inputs, backend=backend):
        logits = run_program(wrapper, program, inputs["input_ids"])
    return logits


# ---------------------------------------------------------------------------------------------
# The backend
# ---------------------------------------------------------------------------------------------


def _registered() -> None:
    import nnsight

    from . import functional

    nnsight.register(functional)


def _payload_limit_from_environment() -> float:
    """``NNGRAFT_MAX_PAYLOAD_MB`` as a number > 0 (default :data:`DEFAULT_MAX_PAYLOAD_MB`)."""
    from ..util.checks import positive_from_environment

    return positive_from_environment("NdifBackend", "NNGRAFT_MAX_PAYLOAD_MB", DEFAULT_MAX_PAYLOAD_MB,
                                     "megabytes", "max_payload_mb")


class NdifBackend(Backend):
    """Forward passes on NDIF (or a stand-in server): P runs there, the donor travels as tensors.

    Use it through ``Grafter.remote(P, donor, tokenizer, **options)``, or
    ``Grafter(P, donor, tokenizer, backend=NdifBackend(**options))``.

    The Grafter's recipient: a Hub id NDIF hosts; or, for ``execution="local"`` / a custom
    server, a loaded ``transformers`` model or an nnsight ``TransformersModel``. Its donor:
    :class:`~nngraft.donors.delta.DenseDonor`, :class:`~nngraft.donors.delta.DeltaDonor`,
    :class:`~nngraft.donors.delta.LoraDonor`; a loaded F, checkpoint path or tensor dict is sent as a
    DenseDonor. nnsight models/envoys of F are refused (the silent no-op trap).

    Args:
        execution: ``"ndif"`` (default), ``"local"``, or a ``server(metadata, blob) -> bytes``.
        dtype: dtype donor tensors travel in (default ``bfloat16`` on NDIF, whose models run in
            bfloat16; the local model's dtype otherwise). A donor's own ``dtype=`` wins.
        max_payload_mb: refuse requests above this (default 256, or ``NNGRAFT_MAX_PAYLOAD_MB``).
        api_key: NDIF API key (default: ``NDIF_API_KEY``, then nnsight's saved key). Never logged.
        host: NDIF host (default: nnsight's, ``NDIF_HOST``).
        revision: the Hub revision of a recipient given by id.
        check_model: check that NDIF runs the model before the first request.
        verbose: print one line per request (modules, bytes) and, for rank-truncated deltas, the
            worst reconstruction error.

    Each forward pass is one request carrying the donor tensors of the modules its plan grafts.
    No KV cache is kept between requests: no prefix sharing, no generation.
    ``requests`` lists every request sent (sizes, module count); ``last_report`` is the payload
    report of the latest one; :meth:`estimate` gives a request's donor bytes from shapes only.
    """

    supports_cache = False
    default_batch_size = 64

    def __init__(self, *, execution: str | Server = "ndif", dtype: torch.dtype | None = None,
                 max_payload_mb: float | None = None, api_key: str | None = None, host: str | None = None,
                 revision: str | None = None, check_model: bool = True, check_versions: bool = True,
                 execution_timeout_s: float | None = None, time_model: preflight.TimeModel | None = None,
                 verbose: bool = True) -> None:
        from ..util import checks

        where = "NdifBackend"
        if execution not in ("ndif", "local") and not callable(execution):
            raise checks.fail(where, "execution", "'ndif', 'local' or a callable server(metadata, blob) -> bytes",
                              execution)
        checks.float_dtype(where, "dtype", dtype)
        checks.positive_number(where, "max_payload_mb", max_payload_mb, optional=True)
        if api_key is not None and (not isinstance(api_key, str) or not api_key.strip()):
            from ..errors import ArgumentError

            # the value is not shown: it may be most of a real key
            raise ArgumentError(f"{where}: api_key: Input should be a non-empty string or None, got a "
                                f"{type(api_key).__name__} of {len(api_key) if isinstance(api_key, str) else 'no'} "
                                "characters (not shown: keys are never echoed)")
        checks.text(where, "host", host, optional=True, url=True)
        checks.text(where, "revision", revision, optional=True)
        checks.flag(where, "check_model", check_model)
        checks.flag(where, "check_versions", check_versions)
        checks.positive_number(where, "execution_timeout_s", execution_timeout_s, optional=True)
        checks.flag(where, "verbose", verbose)
        self.execution = execution
        self.host = host
        self.revision = revision
        self.check_model = check_model
        self.check_versions = check_versions
        self.execution_timeout_s = (execution_timeout_s if execution_timeout_s is not None
                                    else preflight.timeout_from_environment())
        self.time_model = time_model or preflight.TimeModel()
        self.verbose = verbose
        self._requested_dtype = dtype
        self._given_api_key = api_key
        self._api_key: str | None = None
        limit = max_payload_mb if max_payload_mb is not None else _payload_limit_from_environment()
        self.limit_bytes = int(limit * 1e6)
        self.last_report: PayloadReport | None = None
        self.last_traffic: Traffic | None = None  # activation accesses of the last request (sandbox cost)
        self.requests: list[dict[str, Any]] = []  # one entry per request sent: sizes and module count
        self.setup: Setup | None = None  # the set-up of the Grafter this backend runs for (see prepare)
        self._lock = threading.Lock()

    def placement(self, recipient: Any) -> Elsewhere:
        """P runs on NDIF (hosted: refused unless given as the Hub id NDIF hosts; the API key and
        that NDIF runs the model are checked here, before anything loads) or on a stand-in
        server (``execution="local"`` or a callable)."""
        hosted = self.execution == "ndif"
        if hosted:
            if not isinstance(recipient, str):
                raise RemoteGraftError(
                    "a remote run on NDIF needs the recipient as the Hub id NDIF hosts (e.g. "
                    "'meta-llama/Meta-Llama-3.1-8B'), not a local model object; to check a study on a "
                    "local model, pass execution='local'"
                )
            self._api_key = self._find_api_key(self._given_api_key)
            if self.check_model:
                check_model_available(hub_id(recipient), self.host)
            if self.check_versions:
                from nnsight.schema.config import CONFIG

                server_env = preflight.fetch_server_env(self.host or CONFIG.API.HOST)
                if server_env is not None:
                    preflight.check_client_versions(server_env)
        _registered()
        return Elsewhere(hosted=hosted, revision=self.revision, dtype=self._requested_dtype)

    def prepare(self, setup: Setup) -> None:
        """Keeps the set-up for :meth:`estimate` without one."""
        self.setup = setup

    @staticmethod
    def _find_api_key(api_key: str | None) -> str:
        from nnsight.schema.config import CONFIG

        key = api_key or os.environ.get("NDIF_API_KEY") or CONFIG.API.APIKEY
        if not key:
            raise RemoteAuthError(
                "no NDIF API key: set the NDIF_API_KEY environment variable (or run `nnsight login`, "
                "or pass api_key=...). Get a key at https://login.ndif.us."
            )
        return key

    def describe(self) -> str:  # never shows the API key
        return f"NdifBackend(execution={self.execution if isinstance(self.execution, str) else 'custom'!r})"

    __repr__ = describe

    # -- pre-flight -----------------------------------------------------------------------

    def estimate(self, specs: SpecLike | Sequence[SpecLike], setup: Setup | None = None) -> PayloadReport:
        """Donor bytes one request for ``specs`` carries, from shapes only (nothing is computed or
        sent). Validates the specs against the model's config on the way. ``setup``: the
        Grafter's (default: the one this backend was last prepared with)."""
        setup = setup or self.setup
        items = [specs] if isinstance(specs, (str, Mapping)) or not isinstance(specs, Sequence) else specs
        return estimate_payload([as_spec(s) for s in items], setup.model, setup.donors, setup.dtype,
                                adapter=setup.adapter, limit_bytes=self.limit_bytes)

    def program(self, setup: Setup, plan: GraftPlan, *, keep_last: bool = True) -> tuple[dict, PayloadReport]:
        """The program one request runs for ``plan``, after the pre-flight checks (``keep_last``:
        the request asks for the last position's logits only)."""
        hub = hub_donor(setup.donors)
        if hub is not None:
            program, report = build_hub_program(plan, setup.model, setup.adapter, keep_last=keep_last,
                                                describe=hub.describe())
            report.limit_bytes = self.limit_bytes
            report.check()
            return program, report
        donors = setup.donors_for(plan)
        rough = PayloadReport(donor=", ".join(d.describe() for d in setup.donors.values()),
                              dtype=dtype_name(setup.dtype), limit_bytes=self.limit_bytes)
        for path, grafts in leaf_plan(plan, setup.adapter, setup.model.config).by_path():
            module = get_module(setup.model, path)
            for name in dict.fromkeys(donor_name_of(g) for g in grafts):
                size = pick_donor(donors, name).estimate_bytes(path, module, setup.dtype)
                rough.items.append(PayloadItem(path, "send", "", size))
        rough.check()  # refuse before materialising anything (SVDs, reads)
        program, report = build_program(plan, setup.model, setup.adapter, donors, setup.dtype, keep_last=keep_last)
        report.limit_bytes = self.limit_bytes
        report.check()
        return program, report

    # -- running --------------------------------------------------------------------------

    def transport(self, setup: Setup) -> Any:
        """nnsight's request backend for one request: to NDIF, or to the stand-in server."""
        wrapper = setup.envoy
        known = wrapper._remoteable_persistent_objects()
        cls = transport_class()
        if self.execution == "ndif":
            return cls(wrapper.to_model_key(), known=known, limit_bytes=self.limit_bytes,
                       host=self.host, api_key=self._api_key, env=wrapper._remoteable_get_env())
        server = InProcessServer(wrapper) if self.execution == "local" else self.execution
        return cls(f"local:{setup.model.config.model_type}", known=known, limit_bytes=self.limit_bytes,
                   server=server, host=self.host or "http://localhost", api_key="",
                   env=wrapper._remoteable_get_env())

    def __call__(self, setup: Setup, plan: GraftPlan, batch: Any, *, keep_all: bool = False, cache: Any = None,
                 use_cache: bool = False) -> tuple[torch.Tensor, Any]:
        """One request: P with ``plan`` applied on the server. Returns (logits, None)."""
        if cache is not None or use_cache:
            raise RemoteUnsupportedError(
                "remote runs do not keep a KV cache between requests, so generation is not "
                "supported remotely; score targets with run() / run_grid(), or generate locally"
            )
        inputs: dict[str, Any] = {k: v.cpu() for k, v in batch.model_inputs().items()}
        inputs["use_cache"] = False
        keep_last = setup.keeps_last and not keep_all
        if keep_last:
            inputs["logits_to_keep"] = 1
            plan = plan.lm_head_on_last_column(setup.adapter.lm_head)
        program, report = self.program(setup, plan, keep_last=keep_last)
        rows, tokens = inputs["input_ids"].shape
        try:
            traffic = program_traffic(program, dataflow(setup.model, keep_last=keep_last), rows, tokens,
                                      next(setup.model.parameters()).dtype)
        except Exception:  # noqa: BLE001 - a model a weightless forward cannot run: traffic unknown
            traffic = None
        self.last_report = report
        self.last_traffic = traffic
        transport = self.transport(setup)
        transport.estimate_s = self._warn_if_slow(traffic, report.total_bytes + REQUEST_OVERHEAD_BYTES)
        with self._lock:
            logits = _remote_trace(setup.envoy, inputs, program, transport)
        report.exact = True
        self.requests.append({"modules": len(program["ops"]), "donor_bytes": report.total_bytes,
                              "request_bytes": transport.raw_bytes, "sent_bytes": transport.sent_bytes,
                              "rows": rows, "tokens": tokens, "estimate_s": transport.estimate_s,
                              **({"activation_reads": traffic.reads, "activation_writes": traffic.assignments,
                                  "sandbox_round_trips": traffic.round_trips, "sandbox_bytes": traffic.bytes}
                                 if traffic is not None else {}),
                              })
        if self.verbose:
            self._say(setup, report, transport)
        return logits, None

    def estimate_seconds(self, traffic: Traffic | None, request_bytes: int) -> float | None:
        """A request's predicted duration on NDIF's sandboxed path (ordinary API keys), from its
        sandbox round trips and activation bytes and its upload (see :class:`preflight.TimeModel`)."""
        if traffic is None:
            return None
        return preflight.estimate_seconds(traffic.round_trips, traffic.bytes, request_bytes, model=self.time_model)

    def _warn_if_slow(self, traffic: Traffic | None, request_bytes: int) -> float | None:
        import warnings

        estimate = self.estimate_seconds(traffic, request_bytes)
        if estimate is not None and self.execution == "ndif":
            text = preflight.timeout_warning(estimate, self.execution_timeout_s, traffic.round_trips,
                                             traffic.bytes, request_bytes)
            if text is not None:
                warnings.warn(text, RemoteTimeoutWarning, stacklevel=4)
        return estimate

    def _say(self, setup: Setup, report: PayloadReport, transport: Any) -> None:
        from rich.console import Console

        where = "NDIF" if self.execution == "ndif" else ("local server" if self.execution == "local" else "server")
        line = f"[dim]nngraft → {where}: {report.summary()}; request {format_bytes(transport.sent_bytes or 0)}[/dim]"
        for name, donor in setup.donors.items():
            if isinstance(donor, DeltaDonor) and donor.rank is not None and donor.report():
                worst = max(donor.report(), key=lambda r: r["rel_error"])
                line += (f"\n[dim]  {name}: rank-{donor.rank} delta, worst relative reconstruction error "
                         f"{worst['rel_error']:.2e} ({worst['name']}); see donor.report()[/dim]")
        Console(stderr=True).print(line)

    # -- inside nnsight traces (nngraft.compile.trace) ----------------------------------------------

    def compile_graft(self, setup: Setup, plan: GraftPlan, batch: Any, prompts: list,
                      spec_names: list[str]) -> CompiledGraft:
        """The graft as a program (plain tensors) for a trace that runs on the server."""
        program, report = self.program(setup, plan)
        self.last_report = report
        inputs = {k: v.cpu() for k, v in batch.model_inputs().items()}
        return CompiledGraft(plan, inputs, prompts, setup.model.config.model_type,
                             setup.adapter.n_layers(setup.model.config), program=program, spec_names=spec_names)

    def open_trace(self, setup: Setup, compiled: CompiledGraft, **kwargs: Any) -> Any:
        """An nnsight trace of P that runs on NDIF (or the stand-in server) with the graft
        travelling in the request as an nnsight edit; the values you ``.save()`` come back.
        Refer to P's modules through a variable (``lm = g.model_envoy``), not through ``g``."""
        from .functional import grafted

        if compiled.program is None:
            raise RemoteGraftError("this graft was compiled by a local Grafter; compile it with the remote "
                                   "one (g.compile(...)) so the donor travels as tensors")
        kwargs.setdefault("use_cache", False)
        edited = grafted(setup.envoy, compiled.program, compiled.input_ids)
        return edited.trace(**compiled.inputs, backend=self.transport(setup), **kwargs)


class RemoteTimeoutWarning(UserWarning):
    """A request is predicted to run past NDIF's execution timeout (issued before it is sent)."""


REQUEST_OVERHEAD_BYTES = 70_000
"""What a request carries besides donor tensors: nnsight's model description, the code, the inputs
(measured on the test models; see docs/remote.md)."""


__all__ = [
    "ClientVersionError", "DEFAULT_MAX_PAYLOAD_MB", "ForeignModuleError", "GatedModelError", "InProcessServer",
    "ModelNotAvailableError", "NdifBackend", "PayloadItem", "PayloadReport", "PayloadTooLargeError",
    "RemoteAuthError", "RemoteConnectionError", "RemoteDonorError", "RemoteDonorMismatch", "RemoteExecutionError",
    "RemoteGraftError", "RemotePartialDonor", "RemoteTimeoutError", "RemoteTimeoutWarning", "RemoteUnsupportedError",
    "ServerEnvironmentError", "ShapeDonor", "UnsupportedModuleError", "build_program", "check_model_available",
    "check_request", "estimate_payload", "format_bytes", "leaf_plan", "module_kind", "spec_modules",
]
