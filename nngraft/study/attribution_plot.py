"""The figure of a graft attribution (``attribution.png``), drawn from ``attribution.json`` data.

One row per block component (``q``, ``o``, ``up``, …): heatmaps of the scores over layers (rows)
× position groups (columns). Beside the first-order scores: the integrated scores and the exact
single-unit effects when the file has them, all on **one** colour scale (symmetric around 0), so
a cell that is red in one map and white in the other is where the estimate and the graft
disagree. Global components (embeddings, LM head) are listed in the title line of their values.

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
    or PDF by the suffix). ``components``: the block components to show (default: every one)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    kinds = [(k, label) for k, label in _KINDS if data.get(k) is not None]
    comps = list(components) if components else list(dict.fromkeys(
        c for _, c, layer in data["units"] if layer is not None))
    if not comps:
        raise ValueError("no block component in this attribution to draw (only global ones)")
    grids = {(c, k): _grid(data, c, k) for c in comps for k, _ in kinds}
    finite = [np.abs(g[np.isfinite(g)]).max() for g in grids.values() if np.isfinite(g).any()]
    vmax = max(finite) if finite and max(finite) > 0 else 1.0
    n_layers, groups = int(data["n_layers"]), list(data["groups"])
    fig_w = 1.2 + 0.55 * len(groups) * len(kinds) + 0.8
    fig_h = 0.9 + len(comps) * max(1.0, 0.09 * n_layers + 0.5)
    fig, axes = plt.subplots(len(comps), len(kinds), figsize=(fig_w, fig_h), squeeze=False)
    image = None
    for r, c in enumerate(comps):
        for k, (which, label) in enumerate(kinds):
            ax = axes[r][k]
            image = ax.imshow(grids[(c, which)], cmap="RdBu_r", vmin=-vmax, vmax=vmax, aspect="auto",
                              origin="lower", interpolation="nearest")
            ax.set_xticks(range(len(groups)))
            ax.set_xticklabels(groups if r == len(comps) - 1 else [], fontsize=7, rotation=30)
            step = max(1, math.ceil(n_layers / 6))
            ax.set_yticks(range(0, n_layers, step))
            ax.tick_params(labelsize=7)
            if k == 0:
                ax.set_ylabel(f"{c}\nlayer", fontsize=8)
            if r == 0:
                ax.set_title(label, fontsize=9)
    globals_ = [(g, c, v) for (g, c, layer), v in zip(data["units"], data["scores"]) if layer is None]
    top = sorted(globals_, key=lambda x: -abs(x[2]))[:4]
    note = "; ".join(f"{g}·{c} {v:+.3g}" for g, c, v in top)
    fig.suptitle(f"attribution to {data['metric']} ({data.get('n_prompts', '?')} prompts), one colour scale"
                 + (f"\nglobal: {note}" if note else ""), fontsize=9)
    fig.colorbar(image, ax=axes, shrink=0.6, label="effect on the metric")
    try:
        return atomic_save_figure(fig, Path(path))
    finally:
        plt.close(fig)
