"""The local backend: run a :class:`~nngraft.plan.GraftPlan` in one nnsight trace of the recipient.

:class:`LocalBackend` loads P and the donors in this process and runs each forward pass as a
plain call (empty plan) or one nnsight trace in which :func:`apply_plan` — the one place where a
graft is applied to P's modules — replaces module outputs at the grafted cells.

For each grafted module, in forward order::

    x   = module.input                      # what P's module receives (the grafted run's own state)
    y   = module(x[rows, cols]) with F's parameters swapped in
    out = module.output.clone(); out[rows, cols(, features)] = y
    module.output = out

Only the grafted positions are sent through the donor (gather → donor → scatter), so a graft at
the last token costs one token's worth of work per module.

Why one pass is exact: every weighted operation in a transformer acts on each position separately,
and the only cross-position operation, attention's mixing, has no weights. So the output of a
module at position ``t`` depends only on its input at ``t`` and on the weights active at ``t``;
keys and values written at ``t`` are read unchanged by later positions — exactly what processing
token by token with F's weights swapped in (and a KV cache) produces. Attention grafts replace the
q/k/v/o *projections*, so P's KV cache is never touched by the donor.
"""

from __future__ import annotations

import inspect
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Mapping

import torch

from ..arch import Adapter, adapter_for, stores_weight_in_out
from ..checks import fail
from ..donor import Donor, as_donor, pick_donor
from ..errors import ArgumentError, DonorMismatchError
from ..partial import derived_donors
from ..plan import GraftPlan, ModuleGraft
from ..tokens import PaddedBatch
from .base import Backend


def load_pretrained(name_or_path: str, dtype: Any = None, device: Any = None) -> torch.nn.Module:
    """A causal LM from a local folder or Hub id, in eval mode (``dtype``: default ``"auto"``)."""
    from transformers import AutoModelForCausalLM

    from ..inputs import loading_model

    with loading_model("a model", name_or_path):
        model = AutoModelForCausalLM.from_pretrained(name_or_path, dtype=dtype or "auto")
    return model.to(device).eval() if device else model.eval()


class LocalBackend(Backend):
    """P, the donors and every forward pass in this process (the default backend).

    An empty plan is a plain call of P; otherwise one nnsight trace applies the plan
    (:func:`apply_plan`). Keeps a KV cache when asked (prefix sharing, generation). Traces are
    serialized with a lock, so one Grafter may be used from several threads. P's weights are never
    modified: donor parameters are swapped in only for the duration of each donor call.
    """

    supports_cache = True

    def attach(self, recipient: Any, donor: Any, tokenizer: Any, *, adapter: Adapter | None = None,
               donors: Mapping[str, Any] | None = None, dtype: Any = None, device: Any = None) -> None:
        import nnsight

        if isinstance(recipient, str):
            if tokenizer is None:
                from transformers import AutoTokenizer

                from ..inputs import loading_model

                with loading_model("the recipient's tokenizer", recipient):
                    tokenizer = AutoTokenizer.from_pretrained(recipient)
            recipient = load_pretrained(recipient, dtype, device)
        if tokenizer is None:
            raise ArgumentError("Grafter: tokenizer: Input should be the recipient's tokenizer (Grafter(P, F, "
                                "tokenizer)), got None")
        if not callable(tokenizer):
            raise fail("Grafter", "tokenizer", "a tokenizer (callable on text, e.g. AutoTokenizer)", tokenizer)
        meta = next((n for n, p in recipient.named_parameters() if p.is_meta), None)
        if meta is not None:
            raise DonorMismatchError(f"the recipient's parameter {meta!r} is on the meta device (no weights "
                                     "loaded); load P with its weights")
        self.model, self.tokenizer = recipient, tokenizer
        self.adapter = adapter or adapter_for(recipient)
        self.donors: dict[str, Donor] = {}
        for name, value in {"default": donor, **dict(donors or {})}.items():
            if isinstance(value, str) and not Path(value).exists():
                value = load_pretrained(value, dtype, device)  # a hub id; a local folder is read lazily
            self.donors[name] = as_donor(value)
            if hasattr(self.donors[name], "check_against"):  # a model, a DeltaDonor's P, a LoRA's modules
                self.donors[name].check_against(recipient)
        self.derived: dict[str, Any] = {}  # parameter-level donors derived from these, by name
        self.nn = nnsight.NNsight(recipient)
        self.lock = threading.Lock()
        params = inspect.signature(recipient.forward).parameters
        self.keeps_last = "logits_to_keep" in params
        self.cache_keyword = "cache" if "cache" in params else "past_key_values"

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def forward(self, plan: GraftPlan, batch: PaddedBatch, *, keep_all: bool = False,
                cache: Any = None, use_cache: bool = False) -> tuple[torch.Tensor, Any]:
        """One forward pass of P with ``plan`` applied. Returns (logits, KV cache or None)."""
        kwargs: dict[str, Any] = dict(batch.model_inputs(), use_cache=use_cache or cache is not None)
        if cache is not None:
            kwargs[self.cache_keyword] = cache
        if self.keeps_last and not keep_all:
            kwargs["logits_to_keep"] = 1
            plan = plan.lm_head_on_last_column(self.adapter.lm_head)
        with torch.no_grad(), self.lock:
            if plan.is_empty:
                out = self.model(**kwargs)
            else:
                donors = derived_donors(plan, self.donors, self.model, self.adapter, self.derived)
                with self.nn.trace(**kwargs):
                    apply_plan(self.nn, plan, donors)
                    out = self.nn.output.save()
        if not kwargs["use_cache"]:
            return out.logits, None
        cache = out["cache"] if "cache" in out else out.get("past_key_values")  # transformers 5 renamed it
        return out.logits, cache


@contextmanager
def swapped_parameters(module: torch.nn.Module, params: dict[str, torch.Tensor]) -> Iterator[None]:
    """Temporarily run ``module`` with ``params`` in place of its own (restored on exit, always)."""
    try:
        from torch.nn.utils.stateless import _reparametrize_module
    except ImportError:  # pragma: no cover - very old or very new torch
        _reparametrize_module = None
    if _reparametrize_module is not None:
        with _reparametrize_module(module, params):
            yield
        return
    saved = {}  # pragma: no cover - fallback path
    try:  # pragma: no cover
        for name, value in params.items():
            owner_path, _, leaf = name.rpartition(".")
            owner = module.get_submodule(owner_path) if owner_path else module
            saved[name] = (owner, leaf, owner._parameters[leaf])
            owner._parameters[leaf] = torch.nn.Parameter(value, requires_grad=False)
        yield
    finally:  # pragma: no cover
        for owner, leaf, value in saved.values():
            owner._parameters[leaf] = value


def envoy_at(root: Any, path: str) -> Any:
    """The nnsight envoy at a dotted module path (``model.layers.3.mlp``)."""
    node = root
    for part in path.split("."):
        node = node[int(part)] if part.isdigit() else getattr(node, part)
    return node


def apply_plan(root: Any, plan: GraftPlan, donors: Donor | Mapping[str, Donor]) -> None:
    """Inside an open trace of ``root``: apply every module graft of ``plan``, in order.

    ``donors`` is one donor, or donors by name (``{"default": F, "hybrid": H}``) for plans whose
    rules name them."""
    if not isinstance(donors, Mapping):
        donors = {"default": donors}
    for path, grafts in plan.by_path():
        envoy = envoy_at(root, path)
        module = envoy._module
        axis = grafts[0].token_axis
        x = envoy.input
        out = envoy.output
        if axis != 1:
            x, view = x.movedim(axis, 1), out.movedim(axis, 1)
        else:
            view = out
        # The module's output is a fresh tensor that nothing has read yet: write into it in place.
        for name, mine in _by_donor(grafts):
            params = pick_donor(donors, name).params(path, module)
            if len(mine) == 1:
                rows, cols = mine[0].rows, mine[0].cols
            else:  # fused q/k/v at different positions: one donor call on the union
                cells = torch.unique(torch.stack([torch.cat([g.rows for g in mine]),
                                                  torch.cat([g.cols for g in mine])]), dim=1)
                rows, cols = cells[0], cells[1]
            y = donor_forward(envoy, module, params, x[rows, cols])
            for graft in mine:
                part = y if len(mine) == 1 else y[_positions_in(rows, cols, graft.rows, graft.cols, plan.seq_len)]
                if graft.features is None:
                    view[graft.rows, graft.cols] = part
                else:
                    block = view[graft.rows, graft.cols]
                    block[..., graft.features] = part[..., graft.features]
                    view[graft.rows, graft.cols] = block


def donor_forward(envoy: Any, module: torch.nn.Module, params: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """P's ``module`` applied to ``x`` with the donor's ``params``.

    Linear layers (``nn.Linear``, GPT-2's ``Conv1D``) are computed directly; any other module is
    run as itself with the parameters swapped in (called through its envoy, which nnsight allows
    inside a trace without disturbing the forward pass being traced)."""
    kind = type(module)
    if kind is torch.nn.Linear:
        return torch.nn.functional.linear(x, params["weight"], params.get("bias"))
    if stores_weight_in_out(module) and set(params) == {"weight", "bias"}:  # GPT-2: x @ W + b
        return torch.addmm(params["bias"], x.reshape(-1, x.shape[-1]), params["weight"]).view(*x.shape[:-1], -1)
    with swapped_parameters(module, params):
        return envoy(x)


def _by_donor(grafts: list[ModuleGraft]) -> list[tuple[str, list[ModuleGraft]]]:
    groups: dict[str, list[ModuleGraft]] = {}
    for graft in grafts:
        groups.setdefault(graft.donor, []).append(graft)
    return list(groups.items())


def _positions_in(rows, cols, sub_rows, sub_cols, width) -> torch.Tensor:
    """Indices of the cells (sub_rows, sub_cols) inside the sorted cells (rows, cols)."""
    keys = rows * width + cols
    return torch.searchsorted(keys, sub_rows * width + sub_cols)
