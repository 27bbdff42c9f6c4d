"""Parameter-level grafts: a donor that keeps only part of F's weight change.

For a rule with ``"weights": {...}`` (a :class:`~nngraft.spec.WeightSelection`), the grafted
module runs with ``W_P + ΔW_partial`` where ``ΔW = W_F − W_P`` and ``ΔW_partial`` keeps

- ``top_percent``: the largest entries of ``|ΔW|`` (exactly ``ceil(p% · n)`` of them), ranked per
  tensor or across the rule's tensors of one layer;
- ``rank``: the best rank-``r`` approximation of each weight matrix's ΔW (SVD); 1-D parameters
  keep their whole ΔW;
- ``rows`` / ``columns`` / ``heads`` / ``neurons``: those slices, in ``nn.Linear`` orientation
  (GPT-2's ``Conv1D`` stores weights transposed; handled here).

Since every grafted module is linear in its weights where it matters (a linear layer's output is
``x·W_Pᵀ + x·ΔW_partialᵀ``), this is exact in one pass, like every other graft.

Example:
    >>> import torch
    >>> delta = torch.tensor([[0.1, -3.0], [2.0, 0.5]])
    >>> top_entries(delta, 50).tolist()
    [[0.0, -3.0], [2.0, 0.0]]
"""

from __future__ import annotations

import math

import torch

from ..arch import Adapter, get_module, stores_weight_in_out
from .donor import Donor
from ..errors import SpecError
from ..compile.plan import DerivedDonor


def top_entries(delta: torch.Tensor, percent: float) -> torch.Tensor:
    """``delta`` with all but its ``ceil(percent% · numel)`` largest-magnitude entries zeroed."""
    k = max(1, math.ceil(delta.numel() * percent / 100))
    flat = delta.reshape(-1)
    keep = torch.zeros_like(flat)
    index = flat.abs().topk(k).indices
    keep[index] = flat[index]
    return keep.view_as(delta)


def low_rank(delta: torch.Tensor, rank: int) -> tuple[torch.Tensor, float]:
    """Best rank-``rank`` approximation of a matrix (SVD) and its relative Frobenius error."""
    if delta.ndim != 2:
        return delta, 0.0
    u, s, vh = torch.linalg.svd(delta.double(), full_matrices=False)
    approx = (u[:, :rank] * s[:rank]) @ vh[:rank]
    norm = float(delta.double().norm())
    error = float((delta.double() - approx).norm()) / norm if norm else 0.0
    return approx.to(delta.dtype), error


class PartialDonor:
    """The donor ``base`` restricted to part of its weight change. See the module docstring.

    Built by :class:`~nngraft.Grafter` from a plan's :class:`~nngraft.compile.plan.DerivedDonor`;
    ``recipient`` is P (for ``W_P``), ``config`` its config (head sizes)."""

    def __init__(self, base: Donor, derived: DerivedDonor, recipient: torch.nn.Module, adapter: Adapter) -> None:
        from ..spec import GLOBAL_COMPONENTS, WeightSelection

        self.base = base
        self.derived = derived
        self.selection = WeightSelection.model_validate(derived.selection)
        self.recipient = recipient
        self.adapter = adapter
        self.errors: dict[str, float] = {}  # rank truncation: relative error per tensor
        self._cache: dict[str, dict[str, torch.Tensor]] = {}
        # module path -> (component, layer) for every module the rule's components live in
        self._where: dict[str, tuple[str, int | None]] = {}
        n = adapter.n_layers(recipient.config)
        for component in derived.components:
            for layer in ([None] if component in GLOBAL_COMPONENTS else range(n)):
                for site in adapter.sites(component, layer, recipient.config):
                    self._where.setdefault(site.path, (component, layer))

    def params(self, path: str, module: torch.nn.Module) -> dict[str, torch.Tensor]:
        if path not in self._cache:
            if self.selection.kind == "top_percent" and self.selection.per == "layer":
                self._cache.update(self._per_layer(path))
            else:
                self._cache[path] = {name: self._partial(path, name, p, d)
                                     for name, (p, d) in self._deltas(path, module).items()}
        return self._cache[path]

    # -- pieces ---------------------------------------------------------------------------------

    def _deltas(self, path: str, module: torch.nn.Module) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        donor = self.base.params(path, module)
        return {name: (p.detach(), donor[name] - p.detach()) for name, p in module.named_parameters()}

    def _partial(self, path: str, name: str, p: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
        sel = self.selection
        if sel.kind == "top_percent":
            return p + top_entries(delta, sel.top_percent)
        if sel.kind == "rank":
            approx, error = low_rank(delta, sel.rank)
            self.errors[f"{path}.{name}"] = error
            return p + approx
        return p + delta * self._slice_mask(path, name, delta)

    def _per_layer(self, path: str) -> dict[str, dict[str, torch.Tensor]]:
        layer = self._where[path][1]
        paths = [q for q, (_, at) in self._where.items() if at == layer]
        deltas = {q: self._deltas(q, get_module(self.recipient, q)) for q in paths}
        flat = torch.cat([d.reshape(-1) for group in deltas.values() for _, d in group.values()])
        k = max(1, math.ceil(flat.numel() * self.selection.top_percent / 100))
        keep = torch.zeros(flat.numel(), dtype=torch.bool, device=flat.device)
        keep[flat.abs().topk(k).indices] = True
        out, offset = {}, 0
        for q, group in deltas.items():
            out[q] = {}
            for name, (p, d) in group.items():
                mask = keep[offset:offset + d.numel()].view_as(d)
                out[q][name] = p + d * mask
                offset += d.numel()
        return out

    def _slice_mask(self, path: str, name: str, delta: torch.Tensor) -> torch.Tensor:
        """A 0/1 mask selecting rows / columns / heads / neurons of one parameter."""
        sel, component = self.selection, self._where[path][0]
        module = get_module(self.recipient, path)
        transposed = stores_weight_in_out(module)
        kind, index = sel.kind, getattr(sel, sel.kind)
        if kind in ("heads", "neurons"):
            kind, index = self._heads_or_neurons(path, component, kind, index)
        mask = torch.zeros_like(delta)
        if delta.ndim == 1:  # biases and norm weights follow the output features
            if kind == "rows":
                mask[_checked(index, delta.shape[0], path, name)] = 1
            return mask
        out_dim, in_dim = (1, 0) if transposed else (0, 1)
        dim = out_dim if kind == "rows" else in_dim
        index = _checked(index, delta.shape[dim], path, name)
        mask.index_fill_(dim, torch.tensor(index, device=mask.device), 1)
        return mask

    def _heads_or_neurons(self, path: str, component: str, kind: str, index: list[int]) -> tuple[str, list[int]]:
        if kind == "neurons":
            if component not in ("gate", "up", "down"):
                raise SpecError(f"weights.neurons selects MLP neurons; {component!r} ({path}) is not an MLP projection")
            return ("columns" if component == "down" else "rows"), index
        if component not in ("q", "k", "v", "o"):
            raise SpecError(f"weights.heads selects attention heads; {component!r} ({path}) is not q, k, v or o")
        if self.adapter.fused_with(component):
            raise SpecError(f"weights.heads is not supported on fused QKV projections ({path}); use rows")
        head_dim = self.adapter.head_dim(self.recipient.config)
        features = [h * head_dim + i for h in index for i in range(head_dim)]
        return ("columns" if component == "o" else "rows"), features


def _checked(index: list[int], size: int, path: str, name: str) -> list[int]:
    bad = [i for i in index if not -size <= i < size]
    if bad:
        raise SpecError(f"weights selection {bad} is out of range for {path}.{name} (size {size})")
    return [i % size for i in index]
