"""The set-up a backend runs on: P, its tokenizer and adapter, the donors — resolved once.

A :class:`~nngraft.grafter.Grafter` builds one :class:`Setup` (:meth:`Setup.build`) from what the
user gave — model objects or names, donors of any form — and hands it to its backend with every
pass; a backend (:mod:`nngraft.backends.base`) only executes compiled plans on it. Everything that
used to be done by each backend on its own lives here, once:

- **placement**: P loaded here (:class:`Here`: a model object or a name, loaded by
  :func:`~nngraft.donors.loading.load_model`) or run elsewhere (:class:`Elsewhere`: a model NDIF
  hosts, or a stand-in server; P is wrapped in nnsight's ``TransformersModel``);
- **donors**: each donor made into the form the placement needs — one that swaps its parameters
  into P's modules here (:func:`~nngraft.donors.donor.as_donor`), or one that travels as tensors
  (:func:`~nngraft.donors.delta.as_remote_donor`) — and checked against P once;
- **derived donors**: the parameter-level donors a rule's ``"weights"`` selection derives from a
  donor (:mod:`nngraft.donors.partial`), built on first use and kept (:meth:`Setup.donors_for`).

Example:
    >>> from nngraft.backends.setup import Here, Setup
    >>> from nngraft.testing import tiny_pair
    >>> P, F, tok = tiny_pair("llama")
    >>> setup = Setup.build(P, F, tok, placement=Here())
    >>> setup.model is P, sorted(setup.donors), setup.adapter.model_type
    (True, ['default'], 'llama')
"""

from __future__ import annotations

import inspect
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping

import torch

from ..arch import Adapter, adapter_for
from ..donors.donor import as_donor, pick_donor
from ..donors.partial import PartialDonor
from ..errors import ArgumentError, DonorMismatchError, RemoteGraftError
from ..util.checks import fail


@dataclass(frozen=True)
class Here:
    """P runs in this process; donors swap their parameters into P's modules."""

    ships_donors = False


@dataclass(frozen=True)
class Elsewhere:
    """P runs on a server (NDIF, or a stand-in); donors travel there as tensors.

    ``hosted``: P is a model the server hosts, named by its Hub id (nothing is loaded here but
    its shapes); otherwise P's weights are loaded here for a stand-in server. ``dtype``: the
    dtype donor tensors travel in (default: bfloat16 when hosted, else P's own)."""

    hosted: bool
    revision: str | None = None
    dtype: torch.dtype | None = None
    ships_donors = True


Placement = Here | Elsewhere


@dataclass
class Setup:
    """What every pass of one Grafter runs on. Build it with :meth:`build`.

    Attributes:
        placement: :class:`Here` or :class:`Elsewhere`.
        model: P (``torch.nn.Module``; on the meta device for a hosted model).
        envoy: P's nnsight wrapper (what users read and edit inside ``Grafter.trace``).
        tokenizer, adapter: P's.
        donors: the run's donors by name (``"default"`` is the main one), resolved once.
        dtype: the dtype donor tensors travel in (placement elsewhere), else P's.
        keeps_last: P's forward takes ``logits_to_keep`` (only the last column's logits).
        cache_keyword: the name P's forward gives the KV cache.
    """

    placement: Placement
    model: torch.nn.Module
    envoy: Any
    tokenizer: Any
    adapter: Adapter
    donors: dict[str, Any]
    dtype: torch.dtype
    keeps_last: bool
    cache_keyword: str
    derived: dict[str, Any] = field(default_factory=dict)
    lock: Any = field(default_factory=threading.Lock)
    """Serializes passes on P (one Grafter may be used from several threads)."""

    @property
    def device(self) -> torch.device:
        """Where input tensors are built (a server moves them itself)."""
        if isinstance(self.placement, Elsewhere):
            return torch.device("cpu")
        return next(self.model.parameters()).device

    @classmethod
    def build(cls, recipient: Any, donor: Any, tokenizer: Any, *, placement: Placement,
              adapter: Adapter | None = None, donors: Mapping[str, Any] | None = None, dtype: Any = None,
              device: Any = None) -> "Setup":
        """Load or wrap P, its tokenizer and the donors for ``placement`` (once per Grafter)."""
        given = {"default": donor, **dict(donors or {})}
        if isinstance(placement, Elsewhere):
            from ..donors.delta import as_remote_donor

            resolved = {name: as_remote_donor(value) for name, value in given.items()}
            hub = hub_donor(resolved)
            if hub is not None and placement.hosted:
                _check_hub_donor_for_ndif(hub)
            envoy, model, tokenizer = _wrap_elsewhere(recipient, tokenizer, placement, hub)
            own = next(model.parameters()).dtype
            dtype = placement.dtype or dtype or (torch.bfloat16 if placement.hosted else own)
        else:
            envoy, model, tokenizer = _load_here(recipient, tokenizer, dtype, device)
            resolved = {name: _local_donor(value, dtype, device) for name, value in given.items()}
            dtype = next(model.parameters()).dtype
        for value in resolved.values():
            if isinstance(placement, Elsewhere) and isinstance(recipient, str):
                _check_lora_base(value, recipient)
            if hasattr(value, "check_against"):  # a model, a DeltaDonor's P, a LoRA's modules
                value.check_against(model)
        params = inspect.signature(model.forward).parameters
        return cls(placement=placement, model=model, envoy=envoy, tokenizer=tokenizer,
                   adapter=adapter or adapter_for(model), donors=resolved, dtype=dtype,
                   keeps_last="logits_to_keep" in params,
                   cache_keyword="cache" if "cache" in params else "past_key_values")

    def donors_for(self, plan: Any) -> dict[str, Any]:
        """The run's donors plus a partial donor (:class:`~nngraft.donors.partial.PartialDonor`,
        or its travelling form) for each derived donor ``plan`` uses, built once and kept."""
        if not getattr(plan, "derived", None):
            return self.donors
        out = dict(self.donors)
        for name, derived in plan.derived.items():
            if name not in self.derived:
                base = pick_donor(self.donors, derived.base)
                kind = PartialDonor
                if self.placement.ships_donors:
                    from .payload import RemotePartialDonor as kind  # noqa: N813 - the class to build
                self.derived[name] = kind(base, derived, self.model, self.adapter)
            out[name] = self.derived[name]
        return out


def _load_here(recipient: Any, tokenizer: Any, dtype: Any, device: Any) -> tuple[Any, torch.nn.Module, Any]:
    import nnsight

    if isinstance(recipient, (str, Path)):  # any model name (nngraft.donors.loading)
        from ..donors.loading import load_model

        recipient, own_tokenizer = load_model(recipient, dtype=dtype, device=device)
        tokenizer = tokenizer if tokenizer is not None else own_tokenizer
    if tokenizer is None:
        raise ArgumentError("Grafter: tokenizer: Input should be the recipient's tokenizer (Grafter(P, F, "
                            "tokenizer)), got None")
    if not callable(tokenizer):
        raise fail("Grafter", "tokenizer", "a tokenizer (callable on text, e.g. AutoTokenizer)", tokenizer)
    meta = next((n for n, p in recipient.named_parameters() if p.is_meta), None)
    if meta is not None:
        raise DonorMismatchError(f"the recipient's parameter {meta!r} is on the meta device (no weights "
                                 "loaded); load P with its weights")
    return nnsight.NNsight(recipient), recipient, tokenizer


def _local_donor(value: Any, dtype: Any, device: Any) -> Any:
    if isinstance(value, (str, Path)):  # a folder is read lazily; an adapter folder is a LoraDonor
        from ..donors.loading import donor_from_name

        value = donor_from_name(value, dtype=dtype, device=device)
    return as_donor(value)


def hub_donor(donors: Mapping[str, Any]) -> Any:
    """The run's Hub LoRA donor (:class:`~nngraft.donors.delta.HubLoraDonor`), or None. It must be
    the run's only donor: the server attaches its adapter to the whole model."""
    from ..donors.delta import HubLoraDonor
    from ..errors import RemoteUnsupportedError

    hub = [d for d in donors.values() if isinstance(d, HubLoraDonor)]
    if hub and len(donors) > 1:
        raise RemoteUnsupportedError("a Hub LoRA donor must be the only donor of a run (NDIF attaches its "
                                     "adapter to the whole model); graft other donors in another run")
    return hub[0] if hub else None


def _check_hub_donor_for_ndif(donor: Any) -> None:
    """What NDIF can load: a Hub id (not a folder here), at the commit its main branch points to."""
    from ..errors import RemoteDonorError

    if Path(donor.adapter_id).is_dir():
        raise RemoteDonorError(
            f"{donor.adapter_id!r} is a folder on this machine; NDIF loads adapters from the Hugging Face "
            "Hub by id and cannot see it. Push it (hf upload ORG/NAME FOLDER) and pass that id, or pass "
            "LoraDonor(folder), whose factors then travel with each request")
    if donor.revision is not None:
        wanted, main = donor.commit(), donor.commit("main")
        if wanted != main:
            raise RemoteDonorError(
                f"the adapter {donor.adapter_id!r} at revision {donor.revision!r} is commit {wanted[:12]}, but "
                f"NDIF loads its main branch (commit {main[:12]}): nnsight 0.8 sends no revision with peft=. "
                "Merge that revision into main, or pass the downloaded folder as LoraDonor(folder)")


def _wrap_elsewhere(recipient: Any, tokenizer: Any, placement: Elsewhere,
                    hub: Any = None) -> tuple[Any, torch.nn.Module, Any]:
    """P wrapped in nnsight's ``TransformersModel``; with a Hub LoRA donor ``hub``, with its adapter
    attached as nnsight attaches ``peft=`` (a hosted P: its architecture only; a local P: a copy of
    it, with the adapter's weights, so the caller's model is never changed)."""
    from nnsight.intervention.envoy import Envoy
    from nnsight.modeling.transformers import TransformersModel

    from ..errors import RemoteDonorError
    from ..util.hub import gated_error, is_gated

    if placement.hosted and not isinstance(recipient, str):
        raise RemoteGraftError(
            "a remote run on NDIF needs the recipient as the Hub id NDIF hosts (e.g. "
            "'meta-llama/Meta-Llama-3.1-8B'), not a local model object; to check a study on a "
            "local model, pass execution='local'"
        )
    if isinstance(recipient, str):
        load = {} if placement.hosted else dict(dispatch=True)
        if hub is not None:
            load["peft"] = hub.adapter_id  # as nnsight's TransformersModel(repo, peft=...)
        try:
            if tokenizer is None:
                from transformers import AutoTokenizer

                tokenizer = AutoTokenizer.from_pretrained(recipient, revision=placement.revision)
            wrapper = TransformersModel(recipient, revision=placement.revision, task="text-generation",
                                        tokenizer=tokenizer, **load)
        except Exception as error:
            if is_gated(error):
                raise gated_error(recipient) from None
            raise
    elif isinstance(recipient, TransformersModel):
        if hub is not None and recipient.peft != hub.adapter_id:
            raise RemoteDonorError(f"a Hub LoRA donor needs the recipient's nnsight model built with "
                                   f"peft={hub.adapter_id!r}; pass P itself (a model or its Hub id)")
        wrapper = recipient
    else:
        module = recipient._module if isinstance(recipient, Envoy) else recipient
        if tokenizer is None:
            raise ValueError("pass the recipient's tokenizer (Grafter.remote(P, donor, tokenizer))")
        if hub is not None:  # the adapter is attached in place: to a copy, never to the caller's P
            import copy

            module = copy.deepcopy(module)
        meta = dict(device="meta") if any(p.is_meta for p in module.parameters()) else {}
        wrapper = TransformersModel(module, tokenizer=tokenizer, task="text-generation", **meta)
        if hub is not None:
            wrapper.load_adapter(hub.adapter_id)
    return wrapper, wrapper._module, tokenizer if tokenizer is not None else wrapper.tokenizer


def _check_lora_base(donor: Any, repo_id: str) -> None:
    """Refuse an adapter trained on another Hub model (a LoRA only means something on its base);
    a renamed repository's old name is the same model (:data:`nngraft.util.hub.BASE_MODEL_ALIASES`,
    or the Hub's own redirect when it can be asked)."""
    import os

    from ..donors.delta import LoraDonor
    from ..errors import RemoteDonorMismatch
    from ..util.hub import hub_id, same_base

    if not isinstance(donor, LoraDonor):
        return
    base = donor.base_model
    if base and "/" in base and not os.path.exists(base) and not same_base(base, repo_id):
        if same_base(hub_id(base), hub_id(repo_id)):
            donor.verified_bases.add(repo_id)  # the Hub says so: check_against's name check agrees
            return
    donor.check_base(None, repo_id, error=RemoteDonorMismatch)
