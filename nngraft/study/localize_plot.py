"""The figure of a localization search (``localize.png``), drawn from ``localize.json`` data.

Left: the search, step by step — every candidate set tried (grey dots), the kept set's recovery
after each step (blue line) and its size in units (orange, right axis, log scale), with the
target as a dashed line. Right: the found set's recovery curve — its units grafted one more at a
time, most important first (blue; orange for the held-out facts when there are any).

Example:
    >>> import json, tempfile, pathlib
    >>> data = {"spec": {"name": "demo"}, "settings": {"target": 0.9, "metric": "prob"},
    ...         "recovery": {"mean": 0.95, "low": 0.9, "high": 1.0}, "n_units": 1, "universe_units": 40,
    ...         "forward_passes": 3, "grid_calls": 2, "heldout_recovery": None,
    ...         "steps": [{"index": 1, "stage": "baselines", "kind": "baselines", "n_units": 40,
    ...                    "recovery": 1.0, "candidates": [{"recovery": 0.0}, {"recovery": 1.0}]}],
    ...         "curve": [{"n_units": 0, "added": "P", "recovery": 0.0, "heldout_recovery": None},
    ...                   {"n_units": 1, "added": "last·o·L1", "recovery": 0.95, "heldout_recovery": None}]}
    >>> path = plot_localize(data, pathlib.Path(tempfile.mkdtemp()) / "localize.png")
    >>> path.stat().st_size > 10_000
    True
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Mapping

from ..util.io import atomic_save_figure
from .metric_registry import MetricError, get_metric


def _metric_label(name: str) -> str:
    """The search metric's name in axis labels (a metric this process does not know: its name)."""
    try:
        return get_metric(name).mean_label
    except MetricError:
        return name

_CLIP = (-0.6, 1.6)
_MAX_LABELLED = 30
"""Up to this many units, the curve's ticks name each added unit; beyond, they count units."""


def _num(value: Any) -> float:
    return math.nan if value is None else float(value)


_BAR_COLORS = {"P": "#7f7f7f", "F": "#7f7f7f", "found": "#d62728"}


def _comparison_panel(ax: Any, comparison: list[Mapping[str, Any]], settings: Mapping[str, Any],
                      target: float) -> None:
    """P, F, FE+LT and the found set as bars of recovery, each labelled with the metric's mean."""
    names = [c["name"] for c in comparison]
    recs = [_num(c["recovery"]) for c in comparison]
    colors = [_BAR_COLORS.get(n, "#2ca02c") for n in names]
    x = list(range(len(names)))
    ax.bar(x, [0.0 if math.isnan(r) else r for r in recs], color=colors)
    ax.axhline(target, color="#d62728", linestyle="--", linewidth=1)
    ax.axhline(0.0, color="black", linewidth=0.6)
    top = max([1.0] + [r for r in recs if not math.isnan(r)])
    low = min([0.0] + [r for r in recs if not math.isnan(r)])
    ax.set_ylim(low - 0.1, top + 0.25)
    metric = _metric_label(settings["metric"])
    for xi, c, r in zip(x, comparison, recs):
        label = f"{_num(c['value']):.3g}" + ("" if math.isnan(r) else f"\nrec {r:.2f}")
        ax.text(xi, max(r, 0.0) + 0.02 if not math.isnan(r) else 0.02, label, ha="center", va="bottom", fontsize=7)
    ax.set_xticks(x)
    ax.set_xticklabels([f"found\n({c['n_units']} units)" if c["name"] == "found" else c["name"]
                        for c in comparison], fontsize=8)
    ax.set_ylabel(f"recovery of {metric} (0 = P, 1 = F)", fontsize=9)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"found set beside the paper's FE+LT\n(bar labels: {metric})", fontsize=9)


def plot_localize(data: Mapping[str, Any], path: str | Path, *, dpi: int = 150) -> Path:
    """Draw the search and the recovery curve of a :meth:`LocalizeResult.to_dict` (or a loaded
    ``localize.json``) into ``path`` (PNG; written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    settings = data["settings"]
    target = float(settings["target"])
    steps = list(data["steps"])
    curve = list(data["curve"])
    labelled = len(curve) <= _MAX_LABELLED
    width = min(18.0, max(11.0, 0.4 * len(steps) + (0.3 * len(curve) if labelled else 5.0) + 5))
    comparison = list(data.get("comparison") or [])
    ratios = [min(max(len(steps), 4), 24), min(max(len(curve), 4), _MAX_LABELLED) if labelled else 16]
    if comparison:
        ratios.append(max(4, len(comparison) + 1))
        width += 3.0
    fig, axes = plt.subplots(1, len(ratios), figsize=(width, 5.2), gridspec_kw={"width_ratios": ratios})
    ax, bx = axes[0], axes[1]

    # -- left: the search ---------------------------------------------------------------------
    xs = [s["index"] for s in steps]
    for s in steps:
        ys = [min(max(_num(c["recovery"]), _CLIP[0]), _CLIP[1]) for c in s["candidates"]]
        ax.scatter([s["index"]] * len(ys), ys, s=12, color="#999999", alpha=0.6, zorder=2,
                   label="candidate sets tried" if s is steps[0] else None)
    ax.plot(xs, [_num(s["recovery"]) for s in steps], "o-", color="#1f77b4", zorder=3, label="kept set")
    ax.axhline(target, color="#d62728", linestyle="--", linewidth=1, label=f"target {target:g}")
    ax.set_ylim(_CLIP[0] - 0.05, _CLIP[1] + 0.05)
    ax.set_ylabel(f"recovery of {_metric_label(settings['metric'])}\n(0 = P, 1 = F)", fontsize=9)
    ax.set_xticks(xs)
    ax.set_xticklabels([f"{s['stage']}\n{s['kind']}" for s in steps], rotation=60, ha="right",
                       fontsize=7 if len(steps) <= 16 else 6)
    ax.grid(axis="y", alpha=0.3)
    ax.set_title(f"search: {data['forward_passes']} forward passes in {data['grid_calls']} batched steps\n"
                 f"(candidates outside [{_CLIP[0]}, {_CLIP[1]}] drawn at the edge)", fontsize=9)
    twin = ax.twinx()
    twin.step(xs, [max(int(s["n_units"]), 1) for s in steps], where="post", color="#ff7f0e", alpha=0.8,
              label="kept units (right axis)")
    twin.set_yscale("log")
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    twin.yaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
    twin.yaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    twin.yaxis.set_minor_formatter(NullFormatter())
    twin.set_ylabel("units in the kept set", fontsize=9, color="#ff7f0e")
    handles = ax.get_legend_handles_labels()
    extra = twin.get_legend_handles_labels()
    ax.legend(handles[0] + extra[0], handles[1] + extra[1], fontsize=7, loc="lower left")

    # -- right: the recovery curve ------------------------------------------------------------
    n = [int(c["n_units"]) for c in curve]
    ys = [_num(c["recovery"]) for c in curve]
    marker = 5 if labelled else 2
    bx.plot(n, ys, "o-", color="#1f77b4", markersize=marker, label="search facts")
    held = [_num(c.get("heldout_recovery")) for c in curve]
    if any(not math.isnan(h) for h in held):
        bx.plot(n, held, "s--", color="#ff7f0e", markersize=marker, label="held-out facts")
    bx.axhline(target, color="#d62728", linestyle="--", linewidth=1, label=f"target {target:g}")
    first = next((k for k, y in zip(n, ys) if y >= target), None)
    if first is not None and not labelled:
        bx.axvline(first, color="#2ca02c", linestyle=":", linewidth=1,
                   label=f"the first {first} units reach the target")
    if labelled:
        bx.set_xticks(n)
        bx.set_xticklabels(["P"] + [f"+{c['added']}" for c in curve[1:]], rotation=60, ha="right", fontsize=7)
    bx.set_xlabel("units grafted (most important first)", fontsize=9)
    bx.grid(axis="y", alpha=0.3)
    bx.legend(fontsize=7, loc="lower right")
    rec = data["recovery"]
    ci = "" if rec.get("low") is None else f" [{rec['low']:.2f}, {rec['high']:.2f}]"
    held_rec = data.get("heldout_recovery")
    held_text = "" if not held_rec or held_rec.get("mean") is None else f"; held out {held_rec['mean']:.2f}"
    bx.set_title(f"found set: {data['n_units']} of {data['universe_units']} units, recovery "
                 f"{rec['mean']:.2f}{ci}{held_text}", fontsize=9)
    if comparison:
        _comparison_panel(axes[2], comparison, settings, target)
    fig.suptitle(f"nngraft localize — {data['spec']['name']}", fontsize=11)
    fig.tight_layout()

    try:
        atomic_save_figure(fig, Path(path), dpi=dpi, bbox_inches="tight", format="png")
    finally:
        plt.close(fig)
    return path
