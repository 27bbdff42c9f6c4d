"""The :class:`Backend` interface: where a compiled :class:`~nngraft.compile.plan.GraftPlan` runs.

A :class:`~nngraft.grafter.Grafter` tokenizes, compiles specs into plans and schedules rows into
passes; its backend does the one thing that differs between running here and on NDIF: one
forward pass of P with a plan applied, on a left-padded batch, optionally on and into a KV cache.

A backend is attached to one Grafter (:meth:`Backend.attach`), which hands it the recipient, the
donors and the tokenizer as the user gave them; the backend loads or wraps them as it needs and
exposes the loaded ``model``, ``tokenizer``, ``adapter`` and ``donors``.

Example:
    >>> from nngraft import Grafter
    >>> from nngraft.backends.local import LocalBackend
    >>> from nngraft.testing import tiny_pair
    >>> P, F, tok = tiny_pair("llama")
    >>> g = Grafter(P, F, tok, backend=LocalBackend())
    >>> g.backend.supports_cache, g.backend.model is P
    (True, True)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar, Mapping

import torch

from ..arch import Adapter
from ..compile.plan import GraftPlan
from ..compile.tokens import PaddedBatch, TokenizedPrompt

if TYPE_CHECKING:
    from ..compile.trace import CompiledGraft


class Backend(ABC):
    """Runs a compiled plan on P: :meth:`forward` is the whole contract.

    Class attributes:
        supports_cache: whether :meth:`forward` takes and returns a KV cache (prefix sharing
            and generation need one).
        default_batch_size: rows per pass when the Grafter is not told otherwise.
    """

    supports_cache: ClassVar[bool] = False
    default_batch_size: ClassVar[int] = 32

    model: torch.nn.Module
    tokenizer: Any
    adapter: Adapter
    donors: dict[str, Any]

    @abstractmethod
    def attach(self, recipient: Any, donor: Any, tokenizer: Any, *, adapter: Adapter | None,
               donors: Mapping[str, Any] | None, dtype: Any, device: Any) -> None:
        """Load or wrap the recipient, tokenizer and donors for this backend (called once, by
        the Grafter's constructor) and set ``model``, ``tokenizer``, ``adapter`` and ``donors``."""

    @abstractmethod
    def forward(self, plan: GraftPlan, batch: PaddedBatch, *, keep_all: bool = False, cache: Any = None,
                use_cache: bool = False) -> tuple[torch.Tensor, Any]:
        """One forward pass of P with ``plan`` applied to ``batch``. Returns ``(logits, cache)``:
        logits for every column with ``keep_all``, else at least the last column; the KV cache
        when ``use_cache`` or ``cache`` is given (only if :attr:`supports_cache`), else ``None``."""

    @property
    def device(self) -> torch.device:
        """Where input tensors are built (the server moves them for a remote backend)."""
        return torch.device("cpu")

    def describe(self) -> str:
        """A short name for logs and reprs."""
        return type(self).__name__

    # -- inside nnsight traces (nngraft.compile.trace); optional for a backend ----------------------------

    @property
    def envoy(self) -> Any:
        """P's nnsight envoy (what users read and edit inside :meth:`open_trace`)."""
        raise NotImplementedError(f"{self.describe()} does not support nnsight traces")

    def compile_graft(self, plan: GraftPlan, batch: PaddedBatch, prompts: list[TokenizedPrompt],
                      spec_names: list[str]) -> "CompiledGraft":
        """``plan`` on ``batch`` as a :class:`~nngraft.compile.trace.CompiledGraft` this backend can run."""
        raise NotImplementedError(f"{self.describe()} does not support nnsight traces")

    def open_trace(self, compiled: "CompiledGraft", **kwargs: Any) -> Any:
        """An nnsight trace of P on ``compiled.inputs`` whose first intervention block applies
        ``compiled``; ``kwargs`` go to the model's forward."""
        raise NotImplementedError(f"{self.describe()} does not support nnsight traces")
