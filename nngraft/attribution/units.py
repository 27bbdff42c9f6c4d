"""Units of the graft space ``(position group, component, layer)`` and their position groups: a
named span, ``last`` (the last token), ``other`` (every other token).

Example:
    >>> unit_label(("last", "o", 3)), group_names(["actor"])
    ('last·o·L3', ['actor', 'last', 'other'])
"""

from __future__ import annotations

from typing import Any, Sequence

import torch

from ..compile.tokens import TokenizedPrompt
from ..errors import ArgumentError
from ..spec import GraftRule, GraftSpec, Last, Not, Span

LAST, OTHER = "last", "other"

Unit = tuple[str, str, "int | None"]
"""``(position group, component, layer)``; ``layer`` is ``None`` for global components."""



def group_names(span_names: Sequence[str]) -> list[str]:
    """The position groups: each span, ``last``, ``other``."""
    for reserved in (LAST, OTHER):
        if reserved in span_names:
            raise ArgumentError(f"a span may not be called {reserved!r}: that name is a position group")
    return list(dict.fromkeys(span_names)) + [LAST, OTHER]


def group_selector(group: str, span_names: Sequence[str]) -> Any:
    """The spec position selector of a group (``other`` is written with ``not``)."""
    if group == LAST:
        return Last()
    if group == OTHER:
        return Not(**{"not": [Span(span=s) for s in span_names] + [Last()]})
    return Span(span=group)


def unit_spec(unit: Unit, span_names: Sequence[str], name: str | None = None) -> GraftSpec:
    """The spec that grafts exactly ``unit``."""
    group, component, layer = unit
    rule = GraftRule(components=[component], layers="all" if layer is None else [layer],
                     positions=[group_selector(group, span_names)])
    return GraftSpec(name=name or unit_label(unit), rules=[rule])


def unit_label(unit: Unit) -> str:
    """``"first_actor·embed"``, ``"last·o·L3"``."""
    group, component, layer = unit
    return f"{group}·{component}" + ("" if layer is None else f"·L{layer}")


def group_masks(prompts: Sequence[TokenizedPrompt], span_names: Sequence[str], width: int,
                device: Any = None) -> dict[str, torch.Tensor]:
    """For each group, a (batch, width) bool mask of its cells in the left-padded batch."""
    masks = {g: torch.zeros(len(prompts), width, dtype=torch.bool) for g in group_names(span_names)}
    for row, p in enumerate(prompts):
        pad = width - len(p)
        named = set()
        for s in span_names:
            cols = [pad + i for i in p.spans.get(s, ())]
            masks[s][row, cols] = True
            named.update(cols)
        masks[LAST][row, width - 1] = True
        other = [c for c in range(pad, width - 1) if c not in named]
        masks[OTHER][row, other] = True
    return {g: m.to(device) for g, m in masks.items()}
