"""The figure of a graft attribution (``attribution.png``), drawn from ``attribution.json`` data.

One column per block component (``q``, ``o``, ``up``, …): heatmaps of the scores over layers
(rows) × position groups (columns). Under the first-order scores: the exact single-unit effects
when the file has them, on **one** colour scale (symmetric around 0), so a cell that is red in one
map and white in the other is where the estimate and the graft disagree; then the integrated
scores, on their own scale. The largest global components (embeddings, LM head) are named in the
title.

Example:
    >>> import tempfile, pathlib
    >>> data = {"metric": "logprob", "groups": ["actor", "last", "other"], "n_layers": 2, "n_prompts": 1,
    ...         "units": [["last", "o", 0], ["last", "o", 1], ["actor", "embed", None]],
    ...         "scores": [0.1, -0.2, 0.05], "exact": [0.09, -0.25, 0.04], "integrated": None}
    >>> path = plot_attribution(data, pathlib.Path(tempfile.mkdtemp()) / "attribution.png")
    >>> path.stat().st_size > 5_000
    True
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from ..util.io import atomic_save_figure

_KINDS = (("scores", "first order"), ("integrated", "integrated"), ("exact", "exact graft"))


def _grid(data: Mapping[str, Any], component: str, which: str) -> np.ndarray:
    groups = list(data["groups"])
    out = np.full((int(data["n_layers"]), len(groups)), np.nan)
    for (g, c, layer), v in zip(data["units"], data[which]):
        if c == component and layer is not None and g in groups:
            out[int(layer), groups.index(g)] = np.nan if v is None else float(v)
    return out


def plot_attribution(data: Mapping[str, Any], path: str | Path, *,
                     components: Sequence[str] | None = None) -> Path:
    """Draw ``data`` (:meth:`nngraft.attribution.Attribution.to_dict`) into ``path`` (PNG; SVG
    or PDF by the suffix). ``components``: the block components to show (default: every one).

    One column per component; rows: first-order scores, the exact single-unit effects (both on
    one colour scale), the integrated scores (their own scale: they share out the whole change
    from P to the end of the path, not one unit's effect alone)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [(k, label) for k, label in _KINDS if data.get(k) is not None]
    kinds.sort(key=lambda kl: ["scores", "exact", "integrated"].index(kl[0]))
    comps = list(components) if components else list(dict.fromkeys(
        c for _, c, layer in data["units"] if layer is not None))
    if not comps:
        raise ValueError("no block component in this attribution to draw (only global ones)")
    grids = {(c, k): _grid(data, c, k) for c in comps for k, _ in kinds}

    def scale(which: Sequence[str]) -> float:
        found = [np.abs(g[np.isfinite(g)]).max() for (_, k), g in grids.items() if k in which and np.isfinite(g).any()]
        return max(found) if found and max(found) > 0 else 1.0

    vmax = {"scores": scale(("scores", "exact")), "exact": scale(("scores", "exact")),
            "integrated": scale(("integrated",))}
    n_layers, groups = int(data["n_layers"]), list(data["groups"])
    panel_w = 0.35 + 0.28 * len(groups)
    panel_h = min(3.2, 0.6 + 0.08 * n_layers)
    fig, axes = plt.subplots(len(kinds), len(comps), figsize=(1.2 + panel_w * len(comps), 1.2 + panel_h * len(kinds)),
                             squeeze=False)
    for r, (which, label) in enumerate(kinds):
        image = None
        for k, c in enumerate(comps):
            ax = axes[r][k]
            image = ax.imshow(grids[(c, which)], cmap="RdBu_r", vmin=-vmax[which], vmax=vmax[which], aspect="auto",
                              origin="lower", interpolation="nearest")
            ax.set_xticks(range(len(groups)))
            ax.set_xticklabels(groups if r == len(kinds) - 1 else [], fontsize=6, rotation=60)
            step = max(1, math.ceil(n_layers / 6))
            ax.set_yticks(range(0, n_layers, step))
            ax.tick_params(labelsize=6)
            if k == 0:
                ax.set_ylabel(f"{label}\nlayer", fontsize=8)
            else:
                ax.set_yticklabels([])
            if r == 0:
                ax.set_title(c, fontsize=9)
        if which != "exact":
            fig.colorbar(image, ax=list(axes[r]) + (list(axes[r + 1]) if which == "scores" and r + 1 < len(kinds)
                                                      and kinds[r + 1][0] == "exact" else []),
                         shrink=0.8, pad=0.01, label="effect" if which == "scores" else "share")
    globals_ = [(g, c, v) for (g, c, layer), v in zip(data["units"], data["scores"]) if layer is None]
    top = sorted(globals_, key=lambda x: -abs(x[2]))[:4]
    note = "; ".join(f"{g}·{c} {v:+.3g}" for g, c, v in top)
    fig.suptitle(f"attribution to {data['metric']} ({data.get('n_prompts', '?')} prompts): layers × position "
                 "groups; first order and exact on one colour scale" + (f"\nglobal (first order): {note}" if note else ""),
                 fontsize=9)
    try:
        return atomic_save_figure(fig, Path(path))
    finally:
        plt.close(fig)
