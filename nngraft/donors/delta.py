"""Donors that can travel as data: dense F tensors, weight deltas (optionally low-rank), LoRA.

A remote run (NDIF) hosts only the pretrained model P, so the finetuned model F must be sent as
tensors — and only for the modules a spec grafts. Three donors, each usable locally too (they
implement the ordinary :class:`~nngraft.donors.donor.Donor` protocol, so a study can be checked on a
small model with :class:`~nngraft.grafter.Grafter` before it is sent):

- :class:`DenseDonor` — F's own parameters (``replace``: the module's formula with θ_F).
- :class:`DeltaDonor` — ``ΔW = W_F − W_P``, dense or truncated to rank ``r`` by SVD, with the
  reconstruction error of every tensor recorded (:meth:`DeltaDonor.report`); sent as a
  *correction* added to P's own output, so megabytes travel instead of gigabytes.
- :class:`~nngraft.donors.lora.LoraDonor` — a PEFT LoRA adapter folder read natively (``A``,
  ``B``, ``alpha/r`` or rsLoRA's ``alpha/√r``); also a correction, exactly PEFT's
  ``y + scale · B(A(x))`` (in :mod:`nngraft.donors.lora`; importable from here too).

For shipping, every donor answers :meth:`shipment` — the tensors one module needs, in the dtype
asked for — and :meth:`estimate_bytes`, the size of that shipment computed from shapes only
(nothing is materialised, no SVD is run).

Example:
    >>> from nngraft.testing import tiny_pair
    >>> P, F, tok = tiny_pair("llama")
    >>> d = DeltaDonor(F, P, rank=2)
    >>> s = d.shipment("model.layers.0.mlp.up_proj", P.model.layers[0].mlp.up_proj)
    >>> s.mode, sorted(s.tensors), tuple(s.tensors["weight.A"].shape)
    ('correct', ['weight.A', 'weight.B'], (2, 32))
    >>> 0 < d.report()[0]["rel_error"] < 1
    True
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import DonorMismatchError, RemoteDonorError
from .donor import ModelDonor, SafetensorsDonor, TensorDonor
from .lora import HubLoraDonor, LoraDonor  # noqa: F401 - also importable from here, as before
from .shipment import (Layout, Shipment, Tensors, check_dtype, check_shape,  # noqa: F401 - re-exported
                       detached_copy, dtype_bytes, fingerprint, from_map, layout_of, owner_of, refuse_envoy,
                       to_map)


# ---------------------------------------------------------------------------------------------
# Dense
# ---------------------------------------------------------------------------------------------


class DenseDonor:
    """F's own tensors, for exactly the modules grafted.

    Args:
        finetuned: F as a loaded model, a safetensors file/folder, or a ``{name: tensor}`` dict.
        dtype: dtype the tensors travel in (default: the remote run's ``dtype``).

    Locally it behaves like the matching core donor (:class:`~nngraft.donors.donor.ModelDonor` etc.).

    Example (``execution="local"``: NDIF's request round trip, run in this process):
        >>> import torch
        >>> from nngraft import DenseDonor, Grafter, GraftRule, GraftSpec, Last
        >>> from nngraft.testing import tiny_pair
        >>> P, F, tok = tiny_pair("llama")
        >>> spec = GraftSpec(rules=[GraftRule(components=["mlp"], positions=[Last()])])
        >>> remote = Grafter.remote(P, DenseDonor(F), tok, execution="local", verbose=False)
        >>> torch.equal(remote.run(spec, ["Ada Lovelace stars in"]).logits,
        ...             Grafter(P, F, tok).run(spec, ["Ada Lovelace stars in"]).logits)
        True
    """

    kind = "dense"

    def __init__(self, finetuned: Any, *, dtype: torch.dtype | None = None) -> None:
        check_dtype("DenseDonor", dtype)
        self._f = Tensors(finetuned, "finetuned")
        self.dtype = dtype

    @property
    def finetuned_model(self) -> torch.nn.Module | None:
        """F as a loaded model when it was given as one (the identity guard compares with it)."""
        return getattr(self._f.source, "model", None)

    def params(self, path: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """F's parameters for the recipient's ``module`` (the local Donor protocol)."""
        return self._f.source.params(path, module)

    def check_against(self, recipient: torch.nn.Module) -> None:
        """Refuse an F that is not a finetuned copy of ``recipient`` (the core donors' check)."""
        self._f.check_against(recipient)

    def shipment(self, path: str, module: torch.nn.Module, dtype: torch.dtype | None = None) -> Shipment:
        tensors = {}
        for name, like in module.named_parameters():
            full = f"{path}.{name}"
            value = self._f.get(full)
            check_shape(full, value, like)
            tensors[name] = detached_copy(value, self.dtype or dtype)
        return Shipment("replace", tensors)

    def estimate_bytes(self, path: str, module: torch.nn.Module, dtype: torch.dtype) -> int:
        return sum(p.numel() for p in module.parameters()) * dtype_bytes(self.dtype or dtype)

    def describe(self) -> str:
        return "dense F tensors"

    def deltas(self, path: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        raise RemoteDonorError(
            "a rule with 'weights' (a parameter-level graft) needs the weight change ΔW = W_F − W_P, "
            "which dense F tensors alone do not give remotely (P's weights stay on the server); use "
            "DeltaDonor(F, P) or a LoraDonor"
        )


# ---------------------------------------------------------------------------------------------
# Delta
# ---------------------------------------------------------------------------------------------


class DeltaDonor:
    """``ΔW = W_F − W_P`` per tensor, dense or truncated to ``rank`` by SVD.

    Args:
        finetuned, pretrained: F and P (loaded models, safetensors paths or dicts). Only the
            tensors of grafted modules are read.
        deltas: precomputed ``{name: ΔW}`` instead of ``finetuned``/``pretrained``.
        rank: keep the top ``rank`` singular directions of every 2-D delta (``None``: exact
            dense delta). A rank that would not make the tensor smaller is sent dense.
        dtype: dtype the deltas travel in (default: the remote run's ``dtype``).

    Every tensor's error is recorded the first time it is prepared: ``rel_error`` =
    ‖ΔW − ΔŴ‖/‖ΔW‖ of what is actually sent (rank truncation *and* dtype rounding), and
    ``rel_to_weight`` = ‖ΔW − ΔŴ‖/‖W_F‖ (how far the grafted weight is from F's). See
    :meth:`report`. Locally, F's parameters are taken as ``W_P + ΔŴ`` of the recipient module, so
    a rank-``r`` study gives the same numbers locally and remotely. What is sent is cached in
    float32 (the dense ΔW, or its two factors) per grafted tensor, for the donor's lifetime.

    Example (a rank-2 ΔW of each MLP weight travels instead of the weight):
        >>> from nngraft import DeltaDonor, Grafter, GraftRule, GraftSpec, Last
        >>> from nngraft.testing import tiny_pair
        >>> P, F, tok = tiny_pair("llama")
        >>> donor = DeltaDonor(F, P, rank=2)
        >>> spec = GraftSpec(rules=[GraftRule(components=["mlp"], positions=[Last()])])
        >>> _ = Grafter.remote(P, donor, tok, execution="local", verbose=False).run(spec, ["Ada Lovelace stars in"])
        >>> {key: donor.report()[0][key] for key in ("name", "rank", "bytes", "dense_bytes")}
        {'name': 'model.layers.0.mlp.gate_proj.weight', 'rank': 2, 'bytes': 768, 'dense_bytes': 8192}
    """

    kind = "delta"

    def __init__(self, finetuned: Any = None, pretrained: Any = None, *,
                 deltas: Mapping[str, torch.Tensor] | None = None, rank: int | None = None,
                 dtype: torch.dtype | None = None) -> None:
        if deltas is None and (finetuned is None or pretrained is None):
            raise RemoteDonorError("DeltaDonor needs finetuned= and pretrained= (or deltas=)")
        from ..util import checks

        rank = checks.positive_int("DeltaDonor", "rank", rank, optional=True)
        check_dtype("DeltaDonor", dtype)
        self._f = Tensors(finetuned, "finetuned") if finetuned is not None else None
        self._p = Tensors(pretrained, "pretrained") if pretrained is not None else None
        self._given = dict(deltas) if deltas is not None else None
        self.rank = rank
        self.dtype = dtype
        self._factors: dict[str, tuple[torch.Tensor, ...]] = {}  # name -> (ΔW,) or (B, A)
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._report: dict[str, dict[str, Any]] = {}
        self._local: dict[str, dict[str, torch.Tensor]] = {}
        self.pretrained_fingerprints: dict[str, str] = {}
        """Per tensor checked so far: a sha256 (12 hex) of the pretrained model's tensor the delta
        was made from; a recipient whose tensor differs is refused."""

    @property
    def finetuned_model(self) -> torch.nn.Module | None:
        """F as a loaded model when it was given as one and travels whole (no ``rank``: the
        identity guard's "everything" must then reproduce F)."""
        if self.rank is not None or self._f is None:
            return None
        return getattr(self._f.source, "model", None)

    # -- which P ----------------------------------------------------------------------------

    def check_against(self, recipient: torch.nn.Module) -> None:
        """Refuse a recipient other than the pretrained model ``P`` this delta was made from (every
        parameter is compared; ``W_P + ΔW`` is F only on that P). Skipped for ``deltas=`` (no P
        given) and for a recipient without weights (a remote model's skeleton). F is checked as
        every donor is (config and shapes)."""
        if self._f is not None:
            self._f.check_against(recipient)
        if self._p is None:
            return
        for name, param in recipient.named_parameters():
            if param.is_meta:
                return
            self._check_pretrained(name, param)

    def _check_pretrained(self, name: str, recipient: torch.Tensor) -> None:
        if self._p is None or recipient.is_meta or name in self.pretrained_fingerprints:
            return
        try:
            mine = self._p.get(name).detach()
        except DonorMismatchError:
            raise DonorMismatchError(
                f"the pretrained model this DeltaDonor was made from has no tensor {name!r}, which the "
                "recipient has; pass the run's recipient P as pretrained="
            ) from None
        same = tuple(mine.shape) == tuple(recipient.shape) and torch.equal(
            mine.to(device=recipient.device, dtype=recipient.dtype), recipient.detach())
        if not same:
            raise DonorMismatchError(
                f"this DeltaDonor was made from another pretrained model than the recipient: tensor {name!r} "
                f"differs (pretrained fingerprint {fingerprint(mine)}, recipient's {fingerprint(recipient)}). "
                "ΔW = W_F − W_P gives F only when added to that same P: pass the run's recipient as pretrained="
            )
        self.pretrained_fingerprints[name] = fingerprint(mine)

    # -- computing ------------------------------------------------------------------------

    def delta(self, name: str) -> torch.Tensor:
        """The exact dense ``ΔW`` of parameter ``name`` (float32)."""
        if self._given is not None:
            if name not in self._given:
                raise DonorMismatchError(f"the delta donor has no tensor {name!r}, which this graft needs")
            return self._given[name].detach().float().cpu()
        f, p = self._f.get(name).detach().float().cpu(), self._p.get(name).detach().float().cpu()
        if f.shape != p.shape:
            raise DonorMismatchError(
                f"{name!r}: finetuned shape {tuple(f.shape)} but pretrained shape {tuple(p.shape)}"
            )
        return f - p

    def _uses_factors(self, shape: tuple[int, ...]) -> bool:
        if self.rank is None or len(shape) != 2:
            return False
        out, inp = shape
        return self.rank * (out + inp) < out * inp

    def _prepare(self, name: str, layout: Layout) -> tuple[torch.Tensor, ...]:
        found = self._factors.get(name)
        if found is not None:
            return found
        dw = self.delta(name)
        self._shapes[name] = tuple(dw.shape)
        if self._uses_factors(tuple(dw.shape)):
            matrix = to_map(dw, layout)
            u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
            r = min(self.rank, s.numel())
            found = ((u[:, :r] * s[:r]).contiguous(), vh[:r].contiguous())
        else:
            found = (dw,)
        self._factors[name] = found
        return found

    def _record(self, name: str, layout: Layout, found: tuple[torch.Tensor, ...],
                dtype: torch.dtype) -> None:
        dw = self.delta(name)
        if len(found) == 2:
            b, a = (t.to(dtype).float() for t in found)
            approx = from_map(b @ a, layout)
            kept: Any = a.shape[0]
        else:
            approx = found[0].to(dtype).float()
            kept = "dense"
        norm = float(dw.norm())
        err = float((dw - approx).norm())
        weight_norm = float(self._f.get(name).detach().float().norm()) if self._f is not None else None
        self._report[name] = {
            "name": name, "shape": tuple(dw.shape), "rank": kept, "dtype": str(dtype).removeprefix("torch."),
            "rel_error": err / norm if norm > 0 else 0.0,
            "rel_to_weight": (err / weight_norm) if weight_norm else None,
            "bytes": sum(t.numel() for t in found) * dtype_bytes(dtype),
            "dense_bytes": dw.numel() * dtype_bytes(dtype),
        }

    # -- the Donor protocol (local) ---------------------------------------------------------

    def params(self, path: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """``W_P + ΔŴ`` for the recipient's ``module`` (ΔŴ: what :meth:`shipment` sends, in
        float32 — the local run does not round to the shipping dtype)."""
        found = self._local.get(path)
        if found is None:
            found = {}
            for name, p in module.named_parameters():
                full = f"{path}.{name}"
                self._check_pretrained(full, p)
                layout = layout_of(module, name)
                factors = self._prepare(full, layout)
                check_shape(full, torch.empty(self._shapes[full], device="meta"), p, "delta")
                approx = factors[0] if len(factors) == 1 else from_map(factors[0] @ factors[1], layout)
                found[name] = p.detach() + approx.to(device=p.device, dtype=p.dtype)
            self._local[path] = found
        return found

    # -- shipping ---------------------------------------------------------------------------

    def shipment(self, path: str, module: torch.nn.Module, dtype: torch.dtype | None = None) -> Shipment:
        dtype = self.dtype or dtype or torch.float32
        tensors: dict[str, torch.Tensor] = {}
        for name, like in module.named_parameters():
            full = f"{path}.{name}"
            layout = layout_of(module, name)
            found = self._prepare(full, layout)
            check_shape(full, torch.empty(self._shapes[full], device="meta"), like, "delta")
            if full not in self._report or self._report[full]["dtype"] != str(dtype).removeprefix("torch."):
                self._record(full, layout, found, dtype)
            if len(found) == 1 and not torch.any(found[0]):
                continue  # F equals P for this tensor
            if len(found) == 2:
                tensors[f"{name}.B"], tensors[f"{name}.A"] = detached_copy(found[0], dtype), detached_copy(found[1], dtype)
            else:
                tensors[name] = detached_copy(found[0], dtype)
        return Shipment("correct", tensors) if tensors else Shipment("skip")

    def estimate_bytes(self, path: str, module: torch.nn.Module, dtype: torch.dtype) -> int:
        total = 0
        for p in module.parameters():
            shape = tuple(p.shape)
            total += self.rank * sum(shape) if self._uses_factors(shape) else p.numel()
        return total * dtype_bytes(self.dtype or dtype)

    def deltas(self, path: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        """The exact dense ``ΔW`` of each of ``module``'s parameters (for parameter-level grafts,
        which select part of it), float32, in the module's storage layout."""
        out = {}
        for name, like in module.named_parameters():
            self._check_pretrained(f"{path}.{name}", like)
            value = self.delta(f"{path}.{name}")
            check_shape(f"{path}.{name}", value, like, "delta")
            out[name] = value
        return out

    def report(self) -> list[dict[str, Any]]:
        """One row per tensor sent so far: name, shape, rank kept (or ``dense``), dtype,
        ``rel_error``, ``rel_to_weight``, ``bytes`` sent and ``dense_bytes`` it replaces."""
        return list(self._report.values())

    def describe(self) -> str:
        return "dense ΔW = W_F − W_P" if self.rank is None else f"ΔW = W_F − W_P truncated to rank {self.rank}"


RemoteDonor = DenseDonor | DeltaDonor | LoraDonor
"""The donors that can travel to a remote server."""


def as_remote_donor(donor: Any) -> RemoteDonor:
    """A donor that can be sent: one of ours as is; a model, checkpoint or dict as a DenseDonor.

    Refuses nnsight models/envoys (the silent no-op trap) and donors that only know how to swap
    parameters into a local module."""
    if isinstance(donor, (DenseDonor, DeltaDonor, LoraDonor)):
        return donor
    refuse_envoy(donor, "finetuned")
    if isinstance(donor, (torch.nn.Module, Mapping, str, Path, ModelDonor, TensorDonor, SafetensorsDonor)):
        return DenseDonor(donor)
    raise RemoteDonorError(
        f"{type(donor).__name__} cannot be sent to a remote server: it can only swap parameters into "
        "a local module. Use DenseDonor(F), DeltaDonor(F, P, rank=...) or LoraDonor(adapter_dir)."
    )
