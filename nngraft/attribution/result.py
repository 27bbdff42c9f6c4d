"""The result of a graft attribution: :class:`Attribution` (every unit's score, saved as
``attribution.json``) and :func:`spearman`, the rank agreement of scores with exact effects."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np

from ..errors import ArgumentError
from .units import Unit, unit_label



@dataclass
class Attribution:
    """Scores of every unit. ``scores[i]`` is the first-order effect on the metric of grafting
    ``units[i]`` alone into P; ``integrated[i]`` (with ``steps > 1``) its integrated score along
    P → F; ``heads[unit]`` / ``neurons[unit]`` the split of ``scores`` over heads / neurons (their
    sum plus a bias term, if the module has one, is the unit's score)."""

    units: list[Unit]
    scores: np.ndarray
    groups: list[str]
    spans: list[str]
    n_layers: int
    metric: str
    metric_p: float
    steps: int = 1
    integrated: np.ndarray | None = None
    metric_end: float | None = None
    heads: dict[Unit, np.ndarray] = field(default_factory=dict)
    neurons: dict[Unit, np.ndarray] = field(default_factory=dict)
    exact: np.ndarray | None = None
    seconds: float = 0.0
    n_prompts: int = 0

    def score(self, unit: Unit, *, integrated: bool = False) -> float:
        values = self.integrated if integrated else self.scores
        if values is None:
            raise ArgumentError("no integrated scores: run attribute(..., steps=K) with K > 1")
        return float(values[self.units.index(tuple(unit))])

    def ranked(self, *, integrated: bool = False, absolute: bool = False) -> list[Unit]:
        """Units from the highest score down (``absolute``: by magnitude)."""
        values = self.integrated if integrated and self.integrated is not None else self.scores
        key = np.abs(values) if absolute else values
        order = sorted(range(len(self.units)), key=lambda i: (-key[i], i))
        return [self.units[i] for i in order]

    def components(self) -> list[str]:
        return list(dict.fromkeys(c for _, c, _ in self.units))

    def grid(self, component: str, which: str = "scores") -> np.ndarray:
        """(layers, groups) array of a block component's scores (``which``: ``scores``,
        ``integrated`` or ``exact``); NaN where no unit was scored."""
        values = getattr(self, which)
        if values is None:
            raise ArgumentError(f"no {which} values in this attribution")
        out = np.full((self.n_layers, len(self.groups)), np.nan)
        for (g, c, layer), v in zip(self.units, values):
            if c == component and layer is not None:
                out[layer, self.groups.index(g)] = v
        return out

    def table(self, k: int = 15) -> list[dict[str, Any]]:
        """The ``k`` units with the highest score: label and every value known."""
        rows = []
        for unit in self.ranked()[:k]:
            i = self.units.index(unit)
            row: dict[str, Any] = {"unit": unit_label(unit), "score": float(self.scores[i])}
            if self.integrated is not None:
                row["integrated"] = float(self.integrated[i])
            if self.exact is not None:
                row["exact"] = float(self.exact[i])
            rows.append(row)
        return rows

    def __repr__(self) -> str:
        top = unit_label(self.ranked()[0]) if self.units else "none"
        return (f"Attribution({self.metric}, {len(self.units)} units, {self.n_prompts} prompts, steps={self.steps}, "
                f"top unit {top})")

    def _repr_html_(self) -> str:
        """In Jupyter: the 15 highest-scoring units (:meth:`table`), with the metric on P."""
        from ..util.html import html_table

        rows = self.table()
        headers = list(rows[0]) if rows else ["unit", "score"]
        caption = (f"Attribution of {self.metric} ({self.metric} on P = {self.metric_p:.4g}): {len(self.units)} units, "
                   f"{self.n_prompts} prompts" + (f", {self.steps} steps" if self.steps > 1 else "")
                   + f", {self.seconds:.1f} s; the {len(rows)} highest")
        return html_table(headers, [list(r.values()) for r in rows], caption=caption)

    def spearman(self, which: str = "scores") -> float:
        """Rank correlation of ``scores`` (or ``integrated``) with the exact single-unit effects."""
        if self.exact is None:
            raise ArgumentError("no exact effects: call att.exact = exact_effects(...) first")
        return spearman(getattr(self, which), self.exact)

    def to_dict(self) -> dict[str, Any]:
        def arr(a: np.ndarray | None) -> list[float] | None:
            return None if a is None else [float(x) for x in a]

        return {
            "format": "nngraft.attribution", "format_version": 1,
            "metric": self.metric, "metric_p": self.metric_p, "metric_end": self.metric_end,
            "steps": self.steps, "groups": self.groups, "spans": self.spans, "n_layers": self.n_layers,
            "n_prompts": self.n_prompts,
            "units": [list(u) for u in self.units], "scores": arr(self.scores),
            "integrated": arr(self.integrated), "exact": arr(self.exact),
            "heads": {unit_label(u): arr(v) for u, v in self.heads.items()},
            "neurons": {unit_label(u): arr(v) for u, v in self.neurons.items()},
            "timing": {"seconds": round(self.seconds, 3)},
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> "Attribution":
        def arr(a: Any) -> np.ndarray | None:
            return None if a is None else np.asarray(a, dtype=float)

        units = [(g, c, layer) for g, c, layer in data["units"]]
        return cls(units=units, scores=arr(data["scores"]), groups=list(data["groups"]), spans=list(data["spans"]),
                   n_layers=int(data["n_layers"]), metric=data["metric"], metric_p=data["metric_p"],
                   steps=int(data["steps"]), integrated=arr(data.get("integrated")),
                   metric_end=data.get("metric_end"), exact=arr(data.get("exact")),
                   seconds=float(data.get("timing", {}).get("seconds", 0.0)), n_prompts=int(data.get("n_prompts", 0)))


def spearman(a: Sequence[float], b: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN if either side is constant."""
    def ranks(x: np.ndarray) -> np.ndarray:
        order = np.argsort(x, kind="mergesort")
        r = np.empty(len(x))
        r[order] = np.arange(len(x), dtype=float)
        for value in np.unique(x):  # average ranks of ties
            tie = x == value
            if tie.sum() > 1:
                r[tie] = r[tie].mean()
        return r

    a, b = np.asarray(a, dtype=float), np.asarray(b, dtype=float)
    ra, rb = ranks(a), ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return math.nan
    return float(np.corrcoef(ra, rb)[0, 1])
