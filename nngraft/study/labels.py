"""What a spec grafts, in the paper's words: labels, colour groups and order from a spec's content
(components, layers, positions), never from its name, so a user's own specs are labelled, grouped
and sorted exactly like the built-in ones.

- **Positions**: a span is labelled by its role (FE, M, R: :func:`nngraft.study.grids.span_labels`
  for the run's span names) or by its own name; the last token is LT; ``{"not": [...]}`` is a
  complement (``(FE+LT)ᶜ``).
- **Components**, by the paper's convention: **attn** = q, k, v (with their norms where a model has
  them), **o** = the attention output projection, **ffn** = the whole MLP (``mlp``, or gate + up +
  down), ``ffn_up`` / ``ffn_down`` / ``ffn_gate`` a single MLP matrix; every block component is no
  suffix at all. A custom ``lt_attn`` grafting q, k, v, o is therefore ``LT: attn+o``, never the
  paper's ``LT: attn``.
- **Layers**: named groups by their ordinal (``2nd quarter``), sorted by depth, not alphabetically.
- F's LM head added at the last token is `` +head`` (``+head(all)`` at every position).

Example:
    >>> describe({"rules": [{"components": ["q", "k", "v", "o"], "positions": [{"last": True}]}]}).label
    'LT: attn+o'
    >>> describe({"rules": [{"components": ["all"], "positions": [{"not": [{"span": "drug"}, {"last": True}]}]}]},
    ...          {"drug": "FE"}).label
    '(FE+LT)ᶜ'
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

from ..spec import COMPONENT_GROUPS, LAYER_COMPONENTS

POSITION_ORDER: list[tuple[str, ...]] = [
    ("FE",), ("LT",), ("M",), ("R",), ("FE", "LT"), ("M", "LT"), ("FE", "M"), ("FE", "M", "LT"),
    ("FE", "R"), ("R", "LT"), ("FE", "R", "LT"),
]
"""The paper's order of position sets (its figures' bar order)."""
COMPLEMENT_ORDER: list[tuple[str, ...]] = [("FE", "LT"), ("FE",), ("LT",), ("FE", "M"), ("FE", "M", "LT")]
"""The paper's order of complements: (FE+LT)ᶜ, FEᶜ, LTᶜ, (FE+M)ᶜ, (FE+M+LT)ᶜ."""
_POSITION_RANK = {"FE": 0, "M": 1, "R": 2, "LT": 9}
CATEGORY_ORDER = ["baseline", "single", "union", "complement", "bucket", "layers", "selective", "lm_head", "other"]
"""Bar order by colour group: baselines, one position, unions, complements, component buckets,
layer groups, several rules (the selective-layer specs), the LM head alone, everything else."""
_COMPONENT_ORDER = ["all", "attn", "o", "ffn", "ffn_gate", "ffn_up", "ffn_down", "ln_attn", "ln_mlp",
                    "q", "k", "v", "q_norm", "k_norm", "embed", "pos_embed", "ln_final", "lm_head"]
_FRACTIONS = {"half": 2, "quarter": 4, "eighth": 8}
_BUCKET_ORDER = ["attn", "o", "ffn", "attn+o", "o+ffn", "attn+ffn", "attn+o+ffn", "ffn_up", "ffn_down",
                 "o+ffn_up", "o+ffn_down"]
_ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth"]
_SHORT = ["1st", "2nd", "3rd", "4th", "5th", "6th", "7th", "8th"]


@dataclass(frozen=True)
class SpecFacets:
    """What a spec grafts, summarized: ``label`` (the paper's notation), ``category`` (the colour
    group, see :data:`CATEGORY_ORDER`), ``positions``, ``components`` (a label, ``""`` = every block
    component), ``layers`` (the layer selection when it is one named group, e.g. ``second_quarter``),
    ``fraction`` (``quarter``, ``eighth``, ``half`` or ``None``), ``head`` (F's LM head added:
    ``""``, ``"last"`` or ``"all"``) and ``order`` (a sort key: category, positions, components,
    depth, head)."""

    label: str
    category: str
    positions: str = ""
    components: str = ""
    layers: str = "all"
    fraction: str | None = None
    head: str = ""
    order: tuple = ()


def component_label(components: Sequence[str]) -> str:
    """The paper's name of a component set (``""`` for every block component).

    Example:
        >>> component_label(["q", "k", "v"]), component_label(["mlp"]), component_label(["attn"])
        ('attn', 'ffn', 'attn+o')
        >>> component_label(["embed", "ln_attn", "attn", "ln_mlp", "mlp_in"])
        'all−down+embed'
    """
    names: set[str] = set()
    for c in components:
        names |= set(COMPONENT_GROUPS.get(c, (c,)))
    if set(LAYER_COMPONENTS) <= names:
        rest = sorted(names - set(LAYER_COMPONENTS), key=_COMPONENT_ORDER.index)
        return "+".join(["all", *rest]) if rest else ""
    missing = [c for c in LAYER_COMPONENTS if c not in names and c not in ("q_norm", "k_norm")]
    if len(missing) == 1 and {"q", "k", "v"} <= names:  # every block component but one
        rest = sorted(names - set(LAYER_COMPONENTS), key=_COMPONENT_ORDER.index)
        return f"all−{missing[0]}" + "".join(f"+{c}" for c in rest)
    parts = []
    if {"q", "k", "v"} <= names:
        parts.append("attn")
        names -= {"q", "k", "v", "q_norm", "k_norm"}
    if "o" in names:
        parts.append("o")
        names.discard("o")
    if {"gate", "up", "down"} <= names or ("mlp" in components and {"up", "down"} <= names):
        parts.append("ffn")
        names -= {"gate", "up", "down"}
    for single in ("gate", "up", "down"):
        if single in names:
            parts.append(f"ffn_{single}")
            names.discard(single)
    parts += sorted(names, key=lambda c: _COMPONENT_ORDER.index(c) if c in _COMPONENT_ORDER else 99)
    return "+".join(parts)


def _layer_text(layers: Any) -> tuple[str, str | None, float]:
    """(label, fraction, depth key) of a layer selection."""
    if layers in (None, "all"):
        return "", None, 0.0
    if isinstance(layers, str):
        match = re.fullmatch(r"(\w+?)_(half|quarter|eighth)", layers)
        if match and match[1] in _ORDINALS:
            i, n = _ORDINALS.index(match[1]), _FRACTIONS[match[2]]
            return f"{_SHORT[i]} {match[2]}", match[2], i / n
        match = re.fullmatch(r"(first|last):(\d+)", layers)
        if match:
            return f"{match[1]} {match[2]} layers", None, 0.0 if match[1] == "first" else 1.0
        return layers, None, 0.5
    if isinstance(layers, dict):
        start, stop = layers.get("start"), layers.get("stop")
        key = start / 1000 if isinstance(start, int) and start >= 0 else 1.0
        return f"layers {'' if start is None else start}:{'' if stop is None else stop}", None, key
    indices = list(layers)
    key = min((i for i in indices if i >= 0), default=1000) / 1000 if indices else 0.0
    return "layers " + ",".join(map(str, indices)), None, key


def position_labels(positions: Sequence[Mapping[str, Any]], spans: Mapping[str, str]) -> list[str]:
    """Each selector's label (FE, LT, M, R, a span's own name, all, idx…, other, (…)ᶜ)."""
    out = []
    for p in positions:
        if "span" in p:
            out.append(spans.get(p["span"], p["span"]))
        elif "last" in p:
            out.append("LT")
        elif "all" in p:
            out.append("all")
        elif "not" in p:
            inner = position_labels(p["not"], spans)
            out.append((f"({'+'.join(inner)})" if len(inner) > 1 else inner[0]) + "ᶜ")
        elif "index" in p:
            out.append("idx " + ",".join(map(str, p["index"])))
        else:
            out.append("other")
    return out


def _positions_key(labels: Sequence[str], order: Sequence[tuple[str, ...]] = POSITION_ORDER) -> tuple:
    ordered = tuple(sorted(labels, key=lambda x: (_POSITION_RANK.get(x, 5), x)))
    rank = order.index(ordered) if ordered in order else len(order)
    return (rank, len(ordered), ordered)


def _is_f(rules: Sequence[Mapping[str, Any]]) -> bool:
    return (len(rules) == 1 and list(rules[0].get("components", [])) == ["everything"]
            and rules[0].get("positions") == [{"all": True}] and rules[0].get("layers", "all") == "all"
            and rules[0].get("donor") in (None, "default") and rules[0].get("weights") is None)


def describe(spec: Mapping[str, Any], spans: Mapping[str, str] | None = None, *, name: str = "") -> SpecFacets:
    """What ``spec`` (its JSON, as in a results manifest) grafts; ``spans``: span name → label
    (default: the paper's movie fields, ``first_actor`` → FE, ``movie_title`` → M, ``relation`` → R).
    ``name``: the spec's name, used as its label only when its content has no paper notation
    (named donors, partial weights, several rules with different components)."""
    from .grids import span_labels

    spans = span_labels() if spans is None else spans
    rules = list(spec.get("rules") or [])
    if not rules:
        return SpecFacets("P", "baseline", order=(0, 0))
    if _is_f(rules):
        return SpecFacets("F", "baseline", order=(0, 1))
    head_rules = [r for r in rules if list(r.get("components", [])) == ["lm_head"] and not r.get("weights")
                  and r.get("donor") in (None, "default")]
    body = [r for r in rules if r not in head_rules]
    head = ""
    if len(head_rules) == 1:
        where = position_labels(head_rules[0].get("positions", []), spans)
        head = "last" if where == ["LT"] else "all" if where == ["all"] else ""
    if len(head_rules) > 1 or (head_rules and not head):
        body, head = rules, ""
    suffix = {"": "", "last": " +head", "all": " +head(all)"}[head]
    fallback = name or "custom"
    if not body:
        return SpecFacets("LM head" + (" at LT" if head == "last" else " everywhere"), "lm_head", head=head,
                          order=(CATEGORY_ORDER.index("lm_head"),))
    if any(r.get("donor") not in (None, "default") or r.get("weights") for r in body):
        return SpecFacets(fallback + suffix, "other", head=head, order=(CATEGORY_ORDER.index("other"),))
    # rules that differ only in their positions are one rule over the union of the positions
    groups: dict[tuple, list[Mapping[str, Any]]] = {}
    for r in body:
        key = (tuple(r.get("components", [])), repr(r.get("layers", "all")))
        groups.setdefault(key, []).extend(r.get("positions", []))
    if len(groups) == 1:
        (components, _), positions = next(iter(groups.items()))
        layers = body[0].get("layers", "all")
        labels = position_labels(positions, spans)
        pos = "+".join(sorted(labels, key=lambda x: (_POSITION_RANK.get(x, 5), x)))
        comp = component_label(components)
        layer_label, fraction, depth = _layer_text(layers)
        complement = len(labels) == 1 and labels[0].endswith("ᶜ")
        if layer_label:
            category = "layers" if fraction else "other"
        elif comp and not comp.startswith("all"):
            category = "bucket"
        elif complement:
            category = "complement"
        else:
            category = "single" if len(labels) == 1 else "union"
        if layer_label and spec.get("layer_groups", "even") != "even":
            layer_label += f" ({spec['layer_groups']})"
        label = pos + (f": {comp}" if comp else "") + (f", {layer_label}" if layer_label else "") + suffix
        comp_rank = _BUCKET_ORDER.index(comp) + 1 if comp in _BUCKET_ORDER else 0 if not comp else 99
        if complement and "not" in positions[0]:
            where = _positions_key(position_labels(positions[0]["not"], spans), COMPLEMENT_ORDER)
        else:
            where = _positions_key(labels)
        order = (CATEGORY_ORDER.index(category), where, comp_rank, comp,
                 _FRACTIONS.get(fraction or "", 0), depth, head)
        if spec.get("layer_groups", "even") != "even":
            pos_key = f"{pos} ({spec['layer_groups']} layer groups)"
        else:
            pos_key = pos
        return SpecFacets(label, category, positions=pos_key, components=comp,
                          layers=layers if isinstance(layers, str) else layer_label, fraction=fraction, head=head,
                          order=order)
    parts, keys = [], []
    for (components, layers_key), positions in groups.items():
        layers = next(r.get("layers", "all") for r in body
                      if (tuple(r.get("components", [])), repr(r.get("layers", "all"))) == (components, layers_key))
        comp, (layer_label, fraction, depth) = component_label(components), _layer_text(layers)
        labels = position_labels(positions, spans)
        text = "+".join(labels) + (f": {comp}" if comp else "")
        if layer_label and spec.get("layer_groups", "even") != "even":
            layer_label += f", {spec['layer_groups']}"
        parts.append(text + (f" ({layer_label})" if layer_label else ""))
        keys.append((_positions_key(labels), comp, _FRACTIONS.get(fraction or "", 0), depth))
    return SpecFacets(" & ".join(parts) + suffix, "selective", head=head, components="several",
                      order=(CATEGORY_ORDER.index("selective"), tuple(keys), head))


def manifest_spans(manifest: Mapping[str, Any]) -> dict[str, str]:
    """Span name → label (FE, M, R) for a results manifest's run (its ``sweep.spans``: which field
    is FE, M and R; the paper's movie fields when it names none)."""
    from ..errors import GraftError
    from .grids import span_labels, span_roles

    roles = (manifest.get("sweep") or {}).get("spans") or {}
    try:
        return span_labels(span_roles(roles.get("entity"), roles.get("title"), roles.get("relation")))
    except (GraftError, AttributeError):  # a hand-edited manifest: the paper's field names
        return span_labels()


def manifest_facets(manifest: Mapping[str, Any]) -> dict[str, SpecFacets]:
    """:func:`describe` of every spec a results manifest records, with the run's span names
    (:func:`manifest_spans`)."""
    spans = manifest_spans(manifest)
    return {name: describe(info.get("spec") or {}, spans, name=name)
            for name, info in (manifest.get("specs") or {}).items() if isinstance(info, Mapping) and "spec" in info}
