"""Grafts inside nnsight traces: read any activation under a graft, add your own interventions.

Two ways in, both ordinary nnsight:

1. :meth:`Grafter.trace <nngraft.grafter.Grafter.trace>` opens a trace of P with the graft
   already in it. Read and edit modules through ``g.model_envoy`` (P's nnsight envoy) as in any
   trace::

       lm = g.model_envoy
       with g.trace(spec, prompts, spans=spans):
           h = lm.model.layers[1].output.save()           # hidden states under the graft
           lm.model.layers[1].mlp.output[:, -1] *= 0       # your own intervention
           logits = lm.lm_head.output.save()

2. :func:`graft` applies a compiled graft inside a trace you opened yourself on your own nnsight
   wrapper of P (``NNsight``, ``TransformersModel`` / ``LanguageModel``), so grafting composes
   with activation patching, steering and sessions::

       compiled = g.compile(spec, prompts, spans=spans)
       with model.trace(**compiled.inputs):
           nngraft.graft(model, compiled)                  # first, before touching any module
           ...

**The order rule.** The graft runs as its own intervention block, placed *before* yours: at every
module, the graft writes its output first, so whatever you read or write there is the grafted
value, and your edits of a module's output reach everything downstream (grafted modules
included: a graft reads its module's input when the model gets there). nnsight requires each block
to touch modules in forward order; the graft's block and yours are separate, so only your own
reads need to be in order. An in-place edit of a grafted module's input (``m.input[:, -1] *= 0``)
reaches the graft, which computes the module's output from its input after your block saw it, as
the NDIF backend does. One exception: *assigning* a new input (``m.input = x``) is not seen by the
graft (only the cells it does not cover get the module's output on ``x``); edit the input in
place, or the output of the module before it. One graft per trace, of the model it was compiled
for: a second graft, or a graft in another model's trace, raises :class:`~nngraft.errors.TraceError`.

Inputs are left-padded as in :meth:`Grafter.run`, with explicit position ids (padding never shifts
positions); ``compiled.inputs`` carries them. Every module, not just the last token, is grafted
per the spec, so every activation equals what the paper's per-token weight swap computes.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Mapping

import torch

from ..errors import TraceError
from .plan import GraftPlan
from .tokens import TokenizedPrompt


@dataclass
class CompiledGraft:
    """A graft compiled for one batch of prompts: what :func:`graft` applies inside a trace.

    ``inputs``: the model inputs the plan's cells refer to (pass them to your trace:
    ``model.trace(**compiled.inputs)``); ``plan``: per module, the (row, column) cells grafted;
    ``donors``: the donors by name (local), or ``program``: the same graft as plain tensors, for
    a remote trace. ``applier(root, compiled)`` applies it inside the current intervention block
    (set by the backend that compiled it).

    Example (:func:`graft` shows one applied in a trace):
        >>> from nngraft import Grafter, GraftRule, GraftSpec, Last
        >>> from nngraft.testing import tiny_pair
        >>> spec = GraftSpec(rules=[GraftRule(components=["mlp"], positions=[Last()])])
        >>> compiled = Grafter(*tiny_pair("llama")).compile(spec, ["Ada Lovelace stars in", "Ada"])
        >>> sorted(compiled.inputs), tuple(compiled.input_ids.shape), compiled.plan.modules[0].cols.tolist()
        (['attention_mask', 'input_ids', 'position_ids'], (2, 7), [6, 6])
    """

    plan: GraftPlan
    inputs: dict[str, torch.Tensor]
    prompts: list[TokenizedPrompt]
    model_type: str
    n_layers: int
    donors: Mapping[str, Any] | None = None
    program: dict | None = None
    spec_names: list[str] = field(default_factory=list)
    applier: Callable[[Any, "CompiledGraft"], None] | None = None
    recipient: Callable[[], Any] | None = None  # a weak reference to the recipient P it was compiled for

    @property
    def input_ids(self) -> torch.Tensor:
        return self.inputs["input_ids"]

    def apply(self, root: Any) -> None:
        """Inside an open trace of ``root``: apply every module graft, in forward order, in the
        current intervention block (:func:`graft` gives it a block of its own, ahead of yours)."""
        if self.applier is None:
            raise TraceError("this graft was compiled for a remote run and applies only in its own "
                             "Grafter's trace (g.trace); compile it with a local Grafter to use nngraft.graft")
        self.applier(root, self)


def graft(model: Any, compiled: CompiledGraft) -> None:
    """Apply ``compiled`` inside a trace you opened on your own nnsight wrapper of P.

    Call it first in the trace body, before reading or writing any module. The graft runs as its
    own intervention block ahead of yours (see the order rule in :mod:`nngraft.compile.trace`).

    Example:
        >>> import nnsight, nngraft
        >>> from nngraft import Grafter, GraftSpec, GraftRule, Last
        >>> from nngraft.testing import tiny_pair
        >>> P, F, tok = tiny_pair("llama")
        >>> g = Grafter(P, F, tok)
        >>> spec = GraftSpec(rules=[GraftRule(components=["mlp"], positions=[Last()])])
        >>> compiled = g.compile(spec, ["Ada Lovelace stars in"])
        >>> model = nnsight.NNsight(P)
        >>> with model.trace(**compiled.inputs):
        ...     nngraft.graft(model, compiled)
        ...     logits = model.lm_head.output.save()
        >>> torch.allclose(logits[0, -1], g.run(spec, ["Ada Lovelace stars in"]).logits[0], atol=1e-5)
        True
    """
    from nnsight.intervention.interleaver import Mediator

    _check_model(model, compiled)
    try:
        current = Mediator.current("nngraft.graft")
    except ValueError:
        raise TraceError("nngraft.graft(model, compiled) must be called inside an open trace of the model "
                         "(with model.trace(**compiled.inputs): ...)") from None
    if current.pending is not None:
        raise TraceError("nngraft.graft must be called first in the trace, before reading or modifying any "
                         "module (the graft's block runs ahead of yours)")
    if any(_is_graft_block(m) for m in current.interleaver.mediators):
        raise TraceError("nngraft.graft: this trace already has a graft (g.trace(...) opens one, and so does "
                         "an earlier nngraft.graft); two grafts in one trace would each replace the other's "
                         "modules. Put every rule in one spec (or one list of specs) and graft it once")
    if compiled.applier is None:
        compiled.apply(model)  # raises: a remote graft
    code = compile("compiled.apply(root)", GRAFT_BLOCK, "exec")
    block = Mediator(code, {}, {"root": model, "compiled": compiled})
    interleaver = current.interleaver
    block.start(interleaver)  # runs up to its first module, like every block of the trace
    interleaver.mediators.insert(0, block)
    interleaver.reindex()


def _is_graft_block(mediator: Any) -> bool:
    """Whether an intervention block of the trace is a graft: one :func:`graft` added, or the edit
    a Grafter's trace opens with (code in nngraft's own files)."""
    import os

    filename = getattr(getattr(mediator, "code", None), "co_filename", "") or ""
    package = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return filename == GRAFT_BLOCK or os.path.abspath(filename).startswith(package + os.sep)


GRAFT_BLOCK = "<nngraft.graft>"


def _check_model(model: Any, compiled: CompiledGraft) -> None:
    module = getattr(model, "_module", None)
    config = getattr(module, "config", None)
    if module is None:
        raise TraceError(f"nngraft.graft needs an nnsight envoy of P (NNsight / TransformersModel), "
                        f"not {type(model).__name__}")
    model_type = getattr(config, "model_type", None)
    layers = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    if model_type != compiled.model_type or (layers is not None and layers != compiled.n_layers):
        raise TraceError(
            f"nngraft.graft: the graft was compiled for a {compiled.model_type!r} model with "
            f"{compiled.n_layers} layers, but the traced model is {model_type!r} with {layers} layers"
        )
    recipient = compiled.recipient() if compiled.recipient is not None else None
    if recipient is not None and module is not recipient:
        _check_same_weights(module, recipient)


def _check_same_weights(module: torch.nn.Module, recipient: torch.nn.Module) -> None:
    """Refuse to graft into a model other than the one the graft was compiled for, unless it holds
    the same weights (P loaded twice): a graft in another model's trace would change that model's
    numbers with no word."""
    mine = dict(recipient.named_parameters())
    theirs = dict(module.named_parameters())
    differs = next((name for name, p in mine.items() if name not in theirs or theirs[name].shape != p.shape
                    or not torch.equal(theirs[name].detach().to(p.device), p.detach())), None)
    if differs is None and set(theirs) <= set(mine):
        return
    raise TraceError(
        f"nngraft.graft: the graft was compiled for another model than the one traced (its parameter "
        f"{differs or next(iter(set(theirs) - set(mine)))!r} differs from the Grafter's recipient P): grafting "
        "it here would change this model's numbers. Trace P itself (g.model_envoy, or nnsight.NNsight(g.model))")
