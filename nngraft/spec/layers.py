"""Layer selections of a spec: ``"all"``, named groups (quarters, eighths, halves), ``"first:k"`` /
``"last:k"``, lists of indices, ranges; and :func:`resolve_layers`, which turns one into the
layer indices of a model of a given depth.

Example:
    >>> resolve_layers("fourth_quarter", 12), resolve_layers("last:2", 12)
    ([9, 10, 11], [10, 11])
"""

from __future__ import annotations

import re
from typing import Literal, Union

from pydantic import ConfigDict

from ..errors import LayerRangeError
from .positions import Documented

LayerGroups = Literal["even", "paper"]
"""How named layer groups split the layers: ``even`` (nngraft's, part i of k is
``[⌊i·n/k⌋, ⌊(i+1)·n/k⌋)``) or ``paper`` (the paper's code: q = ⌊n/4⌋, the fourth quarter takes
the remainder, and its eighths as that code computed them)."""

_FRACTIONS = {"half": 2, "quarter": 4, "eighth": 8}
_ORDINALS = ["first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth"]
_GROUP_RE = re.compile(r"^(first|second|third|fourth|fifth|sixth|seventh|eighth)_(half|quarter|eighth)$")
_FIRST_LAST_RE = re.compile(r"^(first|last):(\d+)$")


class LayerRange(Documented):
    """Layers ``start ≤ i < stop`` (Python slice semantics, negatives count from the end).

    ``{"start": 4, "stop": -2}`` on a 12-layer model is layers 4 … 9.

    Example:
        >>> from nngraft import GraftRule, LayerRange, Last, resolve_layers
        >>> rule = GraftRule(components=["mlp"], layers={"start": 4, "stop": -2}, positions=[Last()])
        >>> rule.layers == LayerRange(start=4, stop=-2), resolve_layers(rule.layers, 12)
        (True, [4, 5, 6, 7, 8, 9])
    """

    model_config = ConfigDict(extra="forbid")
    start: int = 0
    stop: int | None = None


LayerSelection = Union[str, list[int], LayerRange]
"""``"all"``, a named group (``first_quarter`` … ``fourth_quarter``, ``first_eighth`` …
``eighth_eighth``, ``first_half``/``second_half``), ``"first:k"``/``"last:k"``, an explicit list
of indices (negative allowed), or a :class:`LayerRange`."""


def check_layer_string(value: str) -> str:
    if value == "all" or _FIRST_LAST_RE.match(value):
        return value
    match = _GROUP_RE.match(value)
    if match and _ORDINALS.index(match[1]) < _FRACTIONS[match[2]]:
        return value
    raise ValueError(
        f"unknown layer group {value!r}; use 'all', 'first:K', 'last:K', a quarter such as "
        "'fourth_quarter', an eighth such as 'eighth_eighth', 'first_half'/'second_half', "
        "a list of indices, or {'start': A, 'stop': B}"
    )


def paper_layer_group(group: str, n_layers: int) -> list[int]:
    """A named layer group as the paper's code computed it (``get_layers_dict`` in its
    ``run_experiment.py``): q = ⌊n/4⌋; quarters ``[0, q)``, ``[q, 2q)``, ``[2q, 3q)``, ``[3q, n)``
    (the fourth takes the remainder); halves as two quarters each (``[0, 2q)``, ``[2q, n)``); its
    eighths with its formulas as written (the third is ``[2q, ⌊3q/2⌋)``, empty; the seventh and
    eighth were not exposed and are an error here).

    Example:
        >>> paper_layer_group("second_quarter", 30), paper_layer_group("fourth_quarter", 30)[0]
        ([7, 8, 9, 10, 11, 12, 13], 21)
        >>> paper_layer_group("third_eighth", 30)
        []
    """
    q = n_layers // 4
    table = {
        "first_quarter": (0, q), "second_quarter": (q, 2 * q), "third_quarter": (2 * q, 3 * q),
        "fourth_quarter": (3 * q, n_layers), "first_half": (0, 2 * q), "second_half": (2 * q, n_layers),
        "first_eighth": (0, q // 2), "second_eighth": (q // 2, q), "third_eighth": (2 * q, 3 * q // 2),
        "fourth_eighth": (3 * q // 2, 2 * q), "fifth_eighth": (2 * q, 5 * q // 2),
        "sixth_eighth": (5 * q // 2, 3 * q),
    }
    if group not in table:
        raise LayerRangeError(f"layer group {group!r} does not exist with layer_groups 'paper' (the paper's code "
                              "exposed no seventh or eighth eighth); use layer_groups 'even'")
    start, stop = table[group]
    return list(range(start, stop))


def resolve_layers(selection: LayerSelection, n_layers: int, groups: LayerGroups = "even") -> list[int]:
    """Turn a layer selection into sorted layer indices for a model with ``n_layers`` blocks.

    Named fractions split the layers as evenly as possible, earlier parts never larger than later
    ones: part ``i`` of ``k`` is ``[floor(i·n/k), floor((i+1)·n/k))``. So quarters nest exactly
    in eighths and every layer is in exactly one part. (The paper's code instead put the whole
    remainder in the fourth quarter and had broken eighths; for depths divisible by 4 the
    quarters agree.) ``groups="paper"`` splits named groups the paper's way instead
    (:func:`paper_layer_group`).

    Example:
        >>> resolve_layers("fourth_quarter", 30)
        [22, 23, 24, 25, 26, 27, 28, 29]
        >>> resolve_layers("fourth_quarter", 30, "paper")
        [21, 22, 23, 24, 25, 26, 27, 28, 29]
        >>> resolve_layers([0, -1], 12)
        [0, 11]
    """
    if isinstance(selection, LayerRange):
        layers = list(range(n_layers))[selection.start : selection.stop]
        what = f"range start={selection.start} stop={selection.stop}"
    elif isinstance(selection, list):
        layers = []
        for index in selection:
            if not -n_layers <= index < n_layers:
                raise LayerRangeError(
                    f"layer {index} is out of range for a model with {n_layers} layers "
                    f"(valid: 0 … {n_layers - 1}, or -{n_layers} … -1)"
                )
            layers.append(index % n_layers)
        what = f"list {selection}"
    elif selection == "all":
        layers, what = list(range(n_layers)), "'all'"
    elif match := _FIRST_LAST_RE.match(selection):
        k = int(match[2])
        if k == 0 or k > n_layers:
            raise LayerRangeError(
                f"layer group {selection!r} needs 1 … {n_layers} layers; the model has {n_layers}"
            )
        layers = list(range(k)) if match[1] == "first" else list(range(n_layers - k, n_layers))
        what = repr(selection)
    else:
        match = _GROUP_RE.match(selection)
        if not match:
            check_layer_string(selection)  # raises the helpful message
        parts = _FRACTIONS[match[2]]
        i = _ORDINALS.index(match[1])
        if groups == "paper":
            layers = paper_layer_group(selection, n_layers)
        else:
            layers = list(range(i * n_layers // parts, (i + 1) * n_layers // parts))
        what = repr(selection) + (" (the paper's layer groups)" if groups == "paper" else "")
    if not layers:
        raise LayerRangeError(f"layer selection {what} selects no layer of a {n_layers}-layer model")
    return sorted(set(layers))
