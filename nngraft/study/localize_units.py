"""The units a localization search grafts, ``(position group, component, layer)``, their labels,
and the spec a set of units becomes; the search's metric and its error type."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import GraftError
from ..spec import (COMPONENT_GROUPS, GLOBAL_COMPONENTS, LAYER_COMPONENTS, All, GraftRule, GraftSpec, Last, Not,
                    Span)
from .metric_registry import Metric as RegisteredMetric
from .metric_registry import MetricError, get_metric


Metric = str
"""A per-example metric whose recovery the search targets (averaged per fact, then over facts): any
registered metric (:mod:`.metric_registry`) that needs no baselines: ``prob`` (default), ``logprob``,
``top1`` (= ``top_1``), ``rank``, or your own."""


def search_metric(name: str) -> RegisteredMetric:
    """The registered metric ``name`` (``top1`` = ``top_1``), if the search can use it."""
    try:
        metric = get_metric(name)
    except MetricError as error:
        raise LocalizeError(str(error)) from None
    if metric.fn is None or metric.baselines:
        raise LocalizeError(f"metric {name!r} cannot steer a search (it is not computed from the grafted model's "
                            "logits alone); use prob, logprob or top1")
    return metric


def metric_label(name: str) -> str:
    """How texts name the search's metric, e.g. 'mean target probability'."""
    return search_metric(name).mean_label


LAST, OTHER = "last", "other"


Unit = tuple[str, str, "int | None"]
"""``(position group, component, layer)``; ``layer`` is ``None`` for global components."""


FAMILIES: dict[str, tuple[str, ...]] = {
    "attn": COMPONENT_GROUPS["attn"],
    "mlp": COMPONENT_GROUPS["mlp"],
    "norms": ("ln_attn", "ln_mlp"),
}
"""Component families tried before single components (global components are their own family)."""


class LocalizeError(GraftError, ValueError):
    """The search cannot run or cannot reach its target (the message says why)."""


_ORDER = {c: i for i, c in enumerate(GLOBAL_COMPONENTS + LAYER_COMPONENTS)}



def prefix_sizes(n: int) -> list[int]:
    """1, 2, 3, 4, 6, 9, 13, … (about ×1.5 each) up to and including ``n``.

    Example:
        >>> prefix_sizes(20)
        [1, 2, 3, 4, 6, 9, 13, 19, 20]
    """
    sizes, k = [], 1
    while k < n:
        sizes.append(k)
        k = max(k + 1, int(k * 1.5))
    return sizes + [n]

def unit_sort_key(unit: Unit, groups: Sequence[str]) -> tuple[int, int, int]:
    group, component, layer = unit
    return (groups.index(group), -1 if layer is None else layer, _ORDER[component])


def rounded(value: float) -> str:
    """A recovery with 3 decimals, never "-0.000" (float noise around an exact 0)."""
    return f"{round(value, 3) + 0.0:.3f}"


def unit_label(unit: Unit) -> str:
    """``"first_actor·embed"``, ``"last·o·L3"``."""
    group, component, layer = unit
    return f"{group}·{component}" + ("" if layer is None else f"·L{layer}")


def _layers_label(layers: Sequence[int], n_layers: int) -> str:
    layers = sorted(layers)
    if len(layers) == n_layers:
        return "all layers"
    if layers == list(range(layers[0], layers[-1] + 1)):
        return f"L{layers[0]}" if len(layers) == 1 else f"L{layers[0]}–{layers[-1]}"
    return "L" + ",".join(map(str, layers))


def layer_runs(layers: Any) -> str:
    """``[0, 1, 2, 5]`` → ``"0–2, 5"``; other selections as they are."""
    if not isinstance(layers, list):
        return str(layers)
    runs: list[list[int]] = []
    for layer in sorted(layers):
        if runs and layer == runs[-1][-1] + 1:
            runs[-1].append(layer)
        else:
            runs.append([layer])
    return ", ".join(f"{r[0]}–{r[-1]}" if len(r) > 1 else str(r[0]) for r in runs)


@dataclass(frozen=True)
class Block:
    """A product of units the search keeps or drops as a whole: one position group × some
    components × some layers (global components ignore ``layers``)."""

    group: str
    components: tuple[str, ...]
    layers: tuple[int, ...]
    name: str  # the components' name: a family ("mlp"), a component ("up"), or "every component"

    def units(self) -> frozenset[Unit]:
        out: set[Unit] = set()
        for c in self.components:
            if c in GLOBAL_COMPONENTS:
                out.add((self.group, c, None))
            else:
                out.update((self.group, c, layer) for layer in self.layers)
        return frozenset(out)

    def label(self, n_layers: int) -> str:
        has_layers = any(c not in GLOBAL_COMPONENTS for c in self.components)
        where = f"·{_layers_label(self.layers, n_layers)}" if has_layers and self.layers else ""
        return f"{self.group}·{self.name}{where}"


def group_selectors(spans: Sequence[str]) -> dict[str, Any]:
    """The position selector of every group: each span, ``last``, and ``other`` (every token that
    is in no span and is not the last one — written with ``not``, so it means the same whatever
    else a spec grafts)."""
    out: dict[str, Any] = {name: Span(span=name) for name in spans}
    out[LAST] = Last()
    out[OTHER] = Not(**{"not": [Span(span=name) for name in spans] + [Last()]})
    return out


def units_to_spec(units: Sequence[Unit] | frozenset[Unit], spans: Sequence[str], *, n_layers: int,
                  name: str = "localized", description: str | None = None,
                  groups: dict[str, tuple[str, ...]] | None = None) -> GraftSpec:
    """The graft spec that grafts exactly ``units`` (compact: one rule per distinct
    (components, layers), positions merged). ``groups``: component groups to write by name when
    all their members are present (e.g. ``{"mlp": ("gate", "up", "down")}`` for this model)."""
    selectors = group_selectors(spans)
    order = list(spans) + [LAST, OTHER]
    unknown = {u[0] for u in units} - set(order)
    if unknown:
        raise LocalizeError(f"unknown position group(s) {sorted(unknown)}; groups are {order}")
    layers_of: dict[tuple[str, str], list[int]] = {}
    for group, component, layer in sorted(set(units), key=lambda u: unit_sort_key(u, order)):
        layers_of.setdefault((group, component), [])
        if layer is not None:
            layers_of[(group, component)].append(layer)
    comps_of: dict[tuple[str, tuple[int, ...]], list[str]] = {}
    for (group, component), layers in layers_of.items():
        comps_of.setdefault((group, tuple(layers)), []).append(component)
    where_of: dict[tuple[tuple[str, ...], tuple[int, ...]], list[str]] = {}
    for (group, layers), comps in comps_of.items():
        comps = sorted(comps, key=_ORDER.__getitem__)
        where_of.setdefault((tuple(comps), layers), []).append(group)
    rules = []
    for (comps, layers), where in sorted(where_of.items(), key=lambda kv: (
            min(order.index(g) for g in kv[1]), kv[0][1][:1] or (-1,), _ORDER[kv[0][0][0]])):
        names = list(comps)
        for group_name, members in (groups or {}).items():
            if len(members) > 1 and set(members) <= set(names):  # the group, where its first member was
                at = names.index(next(c for c in names if c in members))
                names = [c for c in names[:at] if c not in members] + [group_name] + [
                    c for c in names[at:] if c not in members]
        layer_sel: Any = "all" if not layers or len(layers) == n_layers else list(layers)
        # the groups partition the tokens: all of them together are every token
        positions = ([All()] if set(where) == set(order)
                     else [selectors[g] for g in sorted(where, key=order.index)])
        rules.append(GraftRule(components=names, layers=layer_sel, positions=positions))
    return GraftSpec(name=name, description=description, rules=rules)
