"""Graft attribution: every unit of the graft space scored from one forward and one backward pass.

A *unit* is ``(position group, component, layer)``: a position group is a named span, ``last``
(the last token) or ``other`` (every other token); ``layer`` is ``None`` for global components
(``embed``, ``lm_head``, …). Grafting unit ``u`` replaces the output of the component's module ``c``
at the group's tokens ``t`` by F's: it changes that output by ``d = F_c(x_t) − P_c(x_t)``. To first
order, the change of a scalar metric ``m`` of the next-token logits is therefore::

    score(u) = Σ_{t in u} ⟨ ∂m/∂out_{c,t} , F_c(x_t) − P_c(x_t) ⟩

which one forward pass of P (computing each candidate module's F output on the very input P's
module receives) and one backward pass of ``m`` give for every unit at once — attribution patching
for weights, resolved per token. :func:`attribute` computes it (``Grafter.attribute`` is the same
with the grafter bound); per attention head (q, k, v: the head's output features; o: the head's
input features) and per MLP neuron (gate, up: output features; down: input features) with
``heads=True`` / ``neurons=True`` (the same slices as a spec's ``"weights": {"heads": …}``).

**Integrated** (``steps=k > 1``): the same scores averaged over ``k`` points ``α`` (midpoints of
``[0, 1]``) of the straight path from P to F, every candidate unit grafted at once with weights
``P + α(F − P)`` (every grafted module is affine in its weights, so that module outputs
``P_c(x) + α d(x)``). Like integrated gradients, the scores then add up to ``m(all candidate units
grafted) − m(P)`` (up to the discretisation), and interactions between units (FE needs LT) are
seen; the first-order scores estimate each unit grafted *alone* into P.

:func:`exact_effects` grafts each unit alone (one ``run_grid`` row per unit and prompt) and
returns the exact ``m(P + unit) − m(P)``, to compare (docs/attribution.md).

Only for the local backend (gradients through P in this process).

Example:
    >>> from nngraft import Grafter
    >>> from nngraft.testing import tiny_pair
    >>> g = Grafter(*tiny_pair("llama"))
    >>> att = g.attribute(target_logprob([5]), ["Ada Lovelace stars in"], [{"actor": "Ada Lovelace"}])
    >>> att.groups, len(att.units) == len(att.scores)
    (['actor', 'last', 'other'], True)

The package: :mod:`~nngraft.attribution.metrics` (metrics), :mod:`~nngraft.attribution.units`
(units and position groups), :mod:`~nngraft.attribution.result` (:class:`Attribution`),
:mod:`~nngraft.attribution.gradient` (:func:`attribute`), :mod:`~nngraft.attribution.exact`
(:func:`exact_effects`).
"""

from __future__ import annotations

from .exact import exact_effects
from .gradient import HEAD_COMPONENTS, NEURON_COMPONENTS, attribute
from .metrics import Metric, NamedMetric, logit_diff, recovery_metric, target_logprob, target_prob
from .result import Attribution, spearman
from .units import LAST, OTHER, Unit, group_masks, group_names, group_selector, unit_label, unit_spec

__all__ = ["Attribution", "attribute", "exact_effects", "target_logprob", "target_prob", "logit_diff",
           "recovery_metric", "unit_spec", "unit_label", "group_names", "spearman", "NamedMetric", "Metric", "Unit",
           "LAST", "OTHER", "HEAD_COMPONENTS", "NEURON_COMPONENTS", "group_masks", "group_selector"]
