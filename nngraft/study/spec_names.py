"""How figures and tables name and group specs: the paper's labels (P, F, FE+LT, (FE+LT)ᶜ, LT: attn,
…), colour categories, the bar chart a spec goes in, the paper's bar order, heatmap facets.

Example:
    >>> display_name("fe_lt_complement"), display_name("lt_o_ffn"), display_name("fe+lm_head")
    ('(FE+LT)$^c$', 'LT: o+ffn', 'FE +head')
"""

from __future__ import annotations

from typing import Any, Mapping

from .grids import BUCKETS
from .labels import SpecFacets

_POS = {"fe": "FE", "lt": "LT", "m": "M", "r": "R"}
_ORDER = ["p", "f", "fe", "lt", "m", "r", "fe_lt", "m_lt", "fe_m", "fe_m_lt", "fe_r", "r_lt", "fe_r_lt",
          "fe_lt_complement", "not_fe", "not_lt", "not_fe_m", "not_fe_m_lt",
          "fe_lt_selective", "fe_lt_selective_v1", "fe_o_ffn_lt_selective", "lm_head_only",
          *[f"lt_{b}" for b in BUCKETS]]


def display_name(name: str) -> str:
    """The paper's label for a spec name (P, F, FE, LT, FE+LT, (FE+LT)ᶜ, FEᶜ, LT: attn, …);
    unknown names are returned unchanged."""
    if name.endswith("+lm_head"):
        return display_name(name[: -len("+lm_head")]) + " +head"
    if name.endswith("+lm_head_all"):
        return display_name(name[: -len("+lm_head_all")]) + " +head(all)"
    if name in ("p", "f"):
        return name.upper()
    if name == "fe_lt_complement":
        return "(FE+LT)$^c$"
    if name.startswith("not_"):
        parts = name[4:].split("_")
        if all(p in _POS for p in parts):
            inner = "+".join(_POS[p] for p in parts)
            return (f"({inner})" if len(parts) > 1 else inner) + "$^c$"
    parts = name.split("_")
    if all(p in _POS for p in parts):
        return "+".join(_POS[p] for p in parts)
    if name.startswith("lt_") and name[3:] in BUCKETS:
        return "LT: " + name[3:].replace("_", "+").replace("ffn+up", "ffn_up").replace("ffn+down", "ffn_down")
    return name


def category(name: str) -> str:
    """Bar colour group: baseline, single, union, complement, bucket or other."""
    base = name.split("+lm_head")[0]
    if base in ("p", "f"):
        return "baseline"
    if base == "fe_lt_complement" or base.startswith("not_"):
        return "complement"
    parts = base.split("_")
    if all(p in _POS for p in parts):
        return "single" if len(parts) == 1 else "union"
    if base.startswith("lt_") and base[3:] in BUCKETS:
        return "bucket"
    return "other"


CHARTS: dict[str, tuple[str, ...]] = {
    "positions": ("single", "union", "complement"),
    "components": ("bucket",),
    "lm_head": ("lm_head",),
    "other": ("other",),
}
"""Bar charts drawn per model × template: each shows P, F and the specs of its categories
(``lm_head`` = any spec with F's LM head added; ``components`` also shows LT for reference)."""


def chart_of(name: str, facets: SpecFacets | None = None) -> str:
    """The bar chart a spec goes in: ``baseline`` (every chart), ``positions``, ``components``,
    ``lm_head`` or ``other``; by content when its ``facets`` are known, else by name."""
    if facets is not None:
        if facets.category == "baseline":
            return "baseline"
        if facets.head or facets.category == "lm_head":
            return "lm_head"
        if facets.category in ("single", "union", "complement"):
            return "positions"
        return "components" if facets.category == "bucket" else "other"
    if "+lm_head" in name or name == "lm_head_only":
        return "lm_head"
    cat = category(name)
    return next(chart for chart, cats in CHARTS.items() if cat in cats) if cat != "baseline" else "baseline"


def order_key(name: str, first_seen: Mapping[str, int]) -> tuple[int, int, int]:
    """Where a spec's bar goes: the paper's order of known names, then first seen; a spec with
    F's LM head added right after its base."""
    base, _, suffix = name.partition("+")
    rank = _ORDER.index(base) if base in _ORDER else len(_ORDER)
    return (rank, first_seen.get(base, 0), 1 if suffix else 0)


def layer_facets(spec: Mapping[str, Any], spans: Mapping[str, str] | None = None) -> dict[str, str] | None:
    """``{"component", "layers", "fraction", "position"}`` for a spec that grafts one set of
    components at one set of positions over a named quarter / eighth / half of the layers (a
    heatmap cell), else ``None``. ``component`` is the paper's name (``attn`` = q, k, v; ``all``
    = every block component); ``spans``: span name → label (FE, M, R)."""
    from .labels import describe

    facets = describe(spec, spans)
    if facets.category != "layers":
        return None
    position = facets.positions
    if facets.head:
        position += f" (+F's LM head at {'LT' if facets.head == 'last' else 'all'})"
    return {"component": facets.components or "all", "layers": facets.layers, "fraction": str(facets.fraction),
            "position": position}
