"""The :class:`Backend` contract: where a compiled :class:`~nngraft.compile.plan.GraftPlan` runs.

A :class:`~nngraft.grafter.Grafter` tokenizes, compiles specs into plans and schedules rows into
passes, and builds once the :class:`~nngraft.backends.setup.Setup` every pass runs on (P, its
tokenizer and adapter, the donors resolved once). Its backend does the one thing that differs
between running here and on NDIF: **execute** one forward pass of P with a plan applied, on a
left-padded batch, optionally on and into a KV cache — as nnsight's own backends are called with
the trace they execute. A backend loads nothing: it says where P runs (:meth:`Backend.placement`)
and executes (:meth:`Backend.__call__`).

Example:
    >>> from nngraft import Grafter
    >>> from nngraft.backends.local import LocalBackend
    >>> from nngraft.testing import tiny_pair
    >>> P, F, tok = tiny_pair("llama")
    >>> g = Grafter(P, F, tok, backend=LocalBackend())
    >>> g.backend.supports_cache, g.setup.model is P
    (True, True)
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from .. import deprecated
from ..compile.plan import GraftPlan
from ..compile.tokens import PaddedBatch, TokenizedPrompt
from .setup import Here, Placement, Setup

if TYPE_CHECKING:
    from ..compile.trace import CompiledGraft


class Backend(ABC):
    """Executes compiled plans on a :class:`~nngraft.backends.setup.Setup`: :meth:`__call__` is the
    whole contract (:meth:`placement` and :meth:`prepare` have defaults).

    Class attributes:
        supports_cache: whether a call takes and returns a KV cache (prefix sharing and
            generation need one).
        default_batch_size: rows per pass when the Grafter is not told otherwise.
    """

    supports_cache: ClassVar[bool] = False
    default_batch_size: ClassVar[int] = 32

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        # a backend written on the contract before 0.2 (attach / forward) works for one release
        deprecated.adapt_old_backend(cls)

    def placement(self, recipient: Any) -> Placement:
        """Where P runs for this backend (called once, before anything is loaded; a remote backend
        checks here that it can reach the server). Default: :class:`~nngraft.backends.setup.Here`."""
        return Here()

    def prepare(self, setup: Setup) -> None:
        """Called once with the set-up the Grafter built (default: nothing)."""

    @abstractmethod
    def __call__(self, setup: Setup, plan: GraftPlan, batch: PaddedBatch, *, keep_all: bool = False,
                 cache: Any = None, use_cache: bool = False) -> tuple[torch.Tensor, Any]:
        """One forward pass of ``setup``'s P with ``plan`` applied to ``batch``. Returns
        ``(logits, cache)``: logits for every column with ``keep_all``, else at least the last
        column; the KV cache when ``use_cache`` or ``cache`` is given (only if
        :attr:`supports_cache`), else ``None``."""

    def describe(self) -> str:
        """A short name for logs and reprs."""
        return type(self).__name__

    # -- inside nnsight traces (nngraft.compile.trace); optional for a backend -----------------

    def compile_graft(self, setup: Setup, plan: GraftPlan, batch: PaddedBatch, prompts: list[TokenizedPrompt],
                      spec_names: list[str]) -> "CompiledGraft":
        """``plan`` on ``batch`` as a :class:`~nngraft.compile.trace.CompiledGraft` this backend can run."""
        raise NotImplementedError(f"{self.describe()} does not support nnsight traces")

    def open_trace(self, setup: Setup, compiled: "CompiledGraft", **kwargs: Any) -> Any:
        """An nnsight trace of P on ``compiled.inputs`` whose first intervention block applies
        ``compiled``; ``kwargs`` go to the model's forward."""
        raise NotImplementedError(f"{self.describe()} does not support nnsight traces")
