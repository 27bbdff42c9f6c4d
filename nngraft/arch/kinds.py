"""The one table of module kinds: how each kind of graftable module applies its weights.

Everything nngraft does with F's weights depends on the kind of module they sit in, and only on
that: how to apply them here (:mod:`nngraft.backends.local`), how to ship them to a server
(:mod:`nngraft.donors.delta`, :mod:`nngraft.backends.payload`), which axis holds the output
features when a rule or a fused projection takes part of them (:mod:`nngraft.donors.partial`,
:mod:`nngraft.backends.local`), and how many matmul FLOPs a token costs. Those facts live in
:data:`KINDS`, one row per kind; :func:`kind_of` says which row a module is (decided by its class,
cached per class). Where the q, k and v projections are fused into one module, the adapter says
so (:meth:`nngraft.arch.Adapter.fused_with`), not the kind.

=========== ============ ==================== ========== ============================================
kind        weight       output features at   projection forms on the server (functional.py)
=========== ============ ==================== ========== ============================================
linear      (out, in)    weight 0, bias 0     yes        ``linear``
conv1d      (in, out)    weight 1, bias 0     yes        ``conv1d`` (GPT-2's ``Conv1D``)
embedding   (vocab, dim) —                    no         ``embedding`` (plain, or Gemma's scaled)
norm        (dim,)       —                    no         ``layer_norm``, ``rms_llama``, ``rms_olmo2``,
                                                         ``rms_gemma``
=========== ============ ==================== ========== ============================================

Example:
    >>> import torch
    >>> kind_of(torch.nn.Linear(4, 3)).name, kind_of(torch.nn.Linear(4, 3)).matmul_flops(torch.nn.Linear(4, 3))
    ('linear', 24)
    >>> kind_of(torch.nn.LayerNorm(4)).name, kind_of(torch.nn.GELU()) is None
    ('norm', True)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

import torch

from ..errors import UnsupportedArchitectureError

KindName = Literal["linear", "conv1d", "embedding", "norm"]


@dataclass(frozen=True)
class ModuleKind:
    """One row of the table (see the module docstring).

    Attributes:
        name: the kind.
        transposed: the 2-D weight is stored (in, out), transposed from ``nn.Linear``'s (out, in).
        feature_axes: for each parameter, the axis that indexes output features (``None``: the
            output features of this kind cannot be taken apart, e.g. for a fused slice).
        projection: ``y = x·W (+ b)``: computed directly with one matmul.
        functional: the names of its forms in :mod:`nngraft.backends.functional` (the wire
            format of a remote program).
    """

    name: KindName
    transposed: bool
    feature_axes: dict[str, int] | None
    projection: bool
    functional: tuple[str, ...]

    def matmul_flops(self, module: torch.nn.Module, tokens: int = 1) -> int:
        """Matmul FLOPs of ``module`` on ``tokens`` positions (2 per multiply-add; a lookup or a
        norm does no matmul)."""
        if not self.projection:
            return 0
        return 2 * int(module.weight.numel()) * tokens

    def out_features(self, module: torch.nn.Module) -> int | None:
        """The width of the output of a projection (``None`` for other kinds)."""
        if not self.projection:
            return None
        return int(module.weight.shape[self.feature_axes["weight"]])

    def as_linear_map(self, weight: torch.Tensor) -> torch.Tensor:
        """A 2-D weight as stored → the linear map it applies, (out × in) (``embedding``: the
        map one-hot(vocab) → dim)."""
        return weight if self.name == "linear" else weight.t()

    def from_linear_map(self, matrix: torch.Tensor) -> torch.Tensor:
        """The inverse of :meth:`as_linear_map`."""
        return matrix if self.name == "linear" else matrix.t()


LINEAR = ModuleKind("linear", transposed=False, feature_axes={"weight": 0, "bias": 0}, projection=True,
                    functional=("linear",))
CONV1D = ModuleKind("conv1d", transposed=True, feature_axes={"weight": 1, "bias": 0}, projection=True,
                    functional=("conv1d",))
EMBEDDING = ModuleKind("embedding", transposed=False, feature_axes=None, projection=False,
                       functional=("embedding",))
NORM = ModuleKind("norm", transposed=False, feature_axes=None, projection=False,
                  functional=("layer_norm", "rms_llama", "rms_olmo2", "rms_gemma"))

KINDS: dict[str, ModuleKind] = {k.name: k for k in (LINEAR, CONV1D, EMBEDDING, NORM)}
"""Every kind by name."""

FUNCTIONAL_FORMS = tuple(form for kind in KINDS.values() for form in kind.functional)
"""Every form :mod:`nngraft.backends.functional` implements (its ``KINDS``)."""

_BY_CLASS: dict[type, ModuleKind | None] = {}
_DIRECT: dict[type, ModuleKind | None] = {}


def _classify(cls: type) -> ModuleKind | None:
    if issubclass(cls, torch.nn.Linear):
        return LINEAR
    # GPT-2's Conv1D (transformers.pytorch_utils) and its subclasses, without importing transformers
    if any(c.__name__ == "Conv1D" and c.__module__.startswith("transformers") for c in cls.__mro__):
        return CONV1D
    if issubclass(cls, torch.nn.Embedding):
        return EMBEDDING
    if issubclass(cls, torch.nn.LayerNorm) or "norm" in cls.__name__.lower():
        return NORM
    return None


def kind_of(module: torch.nn.Module) -> ModuleKind | None:
    """The kind of ``module`` (by its class; ``None``: not a kind nngraft knows, e.g. a whole
    MLP, which runs as itself). GPT-2's ``Conv1D`` is known by its class name, so this never
    imports ``transformers``."""
    cls = type(module)
    try:
        return _BY_CLASS[cls]
    except KeyError:
        kind = _BY_CLASS[cls] = _classify(cls)
        return kind


def direct(module: torch.nn.Module) -> ModuleKind | None:
    """The kind of a projection whose output is exactly its formula, so it can be computed
    directly with one matmul (``nn.Linear`` with its own forward, GPT-2's ``Conv1D``); else ``None``
    (the module runs as itself)."""
    cls = type(module)
    try:
        return _DIRECT[cls]  # called for every grafted module of every pass: one lookup
    except KeyError:
        kind = kind_of(module)
        if kind is LINEAR and cls.forward is not torch.nn.Linear.forward:
            kind = None
        _DIRECT[cls] = kind if kind is not None and kind.projection else None
        return _DIRECT[cls]


def stores_weight_in_out(module: torch.nn.Module) -> bool:
    """Whether ``module`` keeps its 2-D weight as (in, out) — GPT-2's ``Conv1D``, computing
    ``x @ W + b`` — rather than ``nn.Linear``'s (out, in).

    Example:
        >>> from transformers.pytorch_utils import Conv1D
        >>> stores_weight_in_out(Conv1D(6, 4)), stores_weight_in_out(torch.nn.Linear(4, 6))
        (True, False)
    """
    kind = kind_of(module)
    return kind is not None and kind.transposed


def feature_axes(module: torch.nn.Module) -> dict[str, int]:
    """Per parameter, the axis of ``module``'s output features, for grafting part of them (a fused
    q/k/v slice); refused for a kind whose output features cannot be taken apart."""
    kind = kind_of(module)
    if kind is None or kind.feature_axes is None:
        raise UnsupportedArchitectureError(
            f"cannot graft output features of a {type(module).__name__} module (the adapter's "
            "fused_qkv site): feature grafts are defined for Linear and Conv1D projections only"
        )
    return kind.feature_axes


def describe() -> list[dict[str, Any]]:
    """The table as rows of plain values (for docs and checks)."""
    return [{"kind": k.name, "transposed": k.transposed, "feature_axes": k.feature_axes,
             "projection": k.projection, "functional": list(k.functional)} for k in KINDS.values()]
