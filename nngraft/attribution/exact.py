"""Exact single-unit effects, to check attribution scores against: each unit grafted alone."""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch

from ..spec import GraftSpec
from .metrics import Metric
from .units import Unit, unit_spec



def exact_effects(grafter: Any, metric: Metric, prompts: Sequence[str] | str,
                  spans: Sequence[Mapping[str, Any]] | None, units: Sequence[Unit], *,
                  batch_size: int | None = None, progress: Any = None) -> np.ndarray:
    """``m(P with unit u grafted) − m(P)`` for every unit, by exact grafts (one ``run_grid`` row
    per unit and prompt)."""
    tokenized = grafter.tokenize(prompts, spans, where="exact_effects")
    span_names = [n for n in dict.fromkeys(n for p in tokenized for n in p.spans)
                  if all(n in p.spans for p in tokenized)]
    specs = {"__p__": GraftSpec(name="__p__")}
    for k, u in enumerate(units):
        specs[f"u{k}"] = unit_spec(tuple(u), span_names, name=f"u{k}")
    runs = grafter.run_grid(specs, [p.text for p in tokenized], spans, batch_size=batch_size, progress=progress)
    with torch.no_grad():
        base = float(metric(runs["__p__"].logits.double()))
        return np.array([float(metric(runs[f"u{k}"].logits.double())) - base for k in range(len(units))])
