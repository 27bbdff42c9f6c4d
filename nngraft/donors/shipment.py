"""What a donor ships to a server, and the layouts it reads weights in (shared by every
travelling donor: :mod:`nngraft.donors.delta` and :mod:`nngraft.donors.lora`).

A :class:`Shipment` is the tensors one module needs on the server (F's parameters to *replace*
P's, or deltas to *correct* P's output). Every 2-D weight is read as the linear map it applies
(out × in), whatever its module's storage layout (the table of module kinds,
:mod:`nngraft.arch.kinds`, says which).

Example:
    >>> import torch
    >>> layout_of(torch.nn.Linear(4, 3)), layout_of(torch.nn.Linear(4, 3), "bias")
    ('linear', 'vector')
    >>> Shipment("correct", {"weight": torch.zeros(3, 4)}).nbytes
    48
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Mapping

import torch

from ..arch.kinds import KINDS, kind_of
from ..errors import DonorMismatchError, RemoteDonorError
from .donor import ModelDonor, SafetensorsDonor, TensorDonor

Layout = Literal["linear", "conv1d", "embedding", "vector"]


@dataclass
class Shipment:
    """What one module needs on the server.

    ``mode``: ``replace`` (``tensors`` are F's parameters), ``correct`` (``tensors`` are deltas:
    ``weight``/``bias`` dense, or ``weight.A``/``weight.B`` factors), or ``skip`` (F equals P
    here: nothing to send, nothing to do). ``const`` carries numbers the formula needs
    (``lora_scale``)."""

    mode: Literal["replace", "correct", "skip"]
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    const: dict[str, Any] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors.values())


# ---------------------------------------------------------------------------------------------
# Layouts: every 2-D weight read as a linear map (out × in)
# ---------------------------------------------------------------------------------------------


def owner_of(module: torch.nn.Module, name: str) -> tuple[torch.nn.Module, str]:
    """(the submodule that holds parameter ``name``, its own name there): ``up_proj.weight`` of an
    MLP is ``weight`` of its ``up_proj``."""
    prefix, _, leaf = name.rpartition(".")
    return (module.get_submodule(prefix) if prefix else module), leaf


def layout_of(module: torch.nn.Module, name: str = "weight") -> Layout:
    """How a module stores parameter ``name``: as a linear map (``nn.Linear``: out×in), transposed
    (GPT-2 ``Conv1D``: in×out), an embedding table (vocab×dim), or a vector (norms, biases)."""
    module, name = owner_of(module, name)
    param = getattr(module, name)
    if param.ndim == 1:
        return "vector"
    kind = kind_of(module)
    if kind is not None and kind.name in ("linear", "conv1d", "embedding"):
        return kind.name
    raise RemoteDonorError(
        f"{type(module).__name__} stores a {param.ndim}-D parameter {name!r} that nngraft cannot "
        "read as a linear map"
    )


def to_map(weight: torch.Tensor, layout: Layout) -> torch.Tensor:
    """A weight in its module's storage layout → the linear map it applies (out × in)."""
    return KINDS[layout].as_linear_map(weight)


def from_map(matrix: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Inverse of :func:`to_map`."""
    return KINDS[layout].from_linear_map(matrix)


def detached_copy(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """A contiguous copy with its own storage (pickling a view would ship the whole base tensor)."""
    return tensor.detach().to(dtype=dtype or tensor.dtype, device="cpu", copy=True).contiguous()


def check_shape(name: str, tensor: torch.Tensor, like: torch.Tensor, what: str = "donor") -> None:
    if tuple(tensor.shape) != tuple(like.shape):
        raise DonorMismatchError(
            f"{what} tensor {name!r} has shape {tuple(tensor.shape)} but the recipient's has "
            f"{tuple(like.shape)}; are both models the same architecture and size?"
        )


def check_dtype(where: str, dtype: Any) -> None:
    from ..util import checks

    checks.float_dtype(where, "dtype", dtype)


def fingerprint(tensor: torch.Tensor) -> str:
    """sha256 (first 12 hex digits) of a tensor's shape and float32 values."""
    import hashlib

    values = tensor.detach().to("cpu", torch.float32).contiguous()
    digest = hashlib.sha256(str(tuple(values.shape)).encode())
    digest.update(values.reshape(-1).view(torch.uint8).numpy().data)
    return digest.hexdigest()[:12]


def dtype_bytes(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


class Tensors:
    """F's (or P's) tensors by full parameter name, from a model, a checkpoint or a dict."""

    def __init__(self, source: Any, role: str) -> None:
        refuse_envoy(source, role)
        if isinstance(source, torch.nn.Module):
            source = ModelDonor(source)
        elif isinstance(source, Mapping):
            source = TensorDonor(source, source=f"{role} tensors")
        elif isinstance(source, (str, Path)):
            source = SafetensorsDonor(source)
        if not hasattr(source, "_tensor"):
            raise RemoteDonorError(
                f"cannot read the {role} model's tensors from {type(source).__name__}: pass a loaded "
                "model, a safetensors file or folder, or a {name: tensor} dict"
            )
        self.source = source

    def check_against(self, recipient: torch.nn.Module) -> None:
        """The core donor's compatibility check (config and shapes), where it has one."""
        if hasattr(self.source, "check_against"):
            self.source.check_against(recipient)

    def get(self, name: str) -> torch.Tensor:
        # the core donors' tensor lookup (with the tied-embedding fallback for lm_head.weight)
        return getattr(self.source, "_tensor_or_tied", self.source._tensor)(name)


def refuse_envoy(source: Any, role: str) -> None:
    """An nnsight model/envoy is a *reference* to modules, which on NDIF means P's modules."""
    try:
        from nnsight.intervention.envoy import Envoy
    except ImportError:  # pragma: no cover - nnsight is a dependency
        return
    if isinstance(source, Envoy):
        raise RemoteDonorError(
            f"the {role} model was given as an nnsight model/envoy ({type(source).__name__}). On NDIF, "
            "an envoy is sent as a reference to module paths, which the server resolves to the "
            "hosted pretrained model's OWN modules: the graft would silently do nothing. Pass the "
            "underlying torch model (envoy._module), a checkpoint path, or a DenseDonor / DeltaDonor "
            "/ LoraDonor, so F's weights travel as tensors."
        )
