"""Figures from a results file: the paper's bar charts and layer-group heatmaps (PNG and SVG).

- **Bar charts** (one per model × template, plus "all templates" when there are several): mean
  target probability, top-1 accuracy and top-k accuracy (k is in the axis label; the paper's
  figures said "Top-5" but used k = 100), each with its 95 % confidence interval over facts as
  error bars. Bars follow the paper's order: baselines (P, F), single spans (FE, LT, M, R), their
  unions (FE+LT, …), complements ((FE+LT)ᶜ, FEᶜ, LTᶜ, …), then the component buckets at LT.
  Labels, colour groups, charts and order come from what each spec grafts (its components, layers
  and positions, :mod:`nngraft.study.labels`), not from its name: a user's own specs are drawn
  exactly like the built-in ones, and layer groups sort by depth.
- **Heatmaps** (per model × template × position × layer split): component × layer group →
  recovery of mean target probability (0 = P, 1 = F), the number written in each cell. Specs
  qualify when they have one rule whose layers are a named quarter, eighth or half. When recovery
  is undefined (no baselines, or F ≈ P), the heatmap shows mean probability instead and says so.

Every figure's numbers are also written to ``aggregates.csv`` beside the plots.

Example:
    >>> display_name("fe_lt_complement"), display_name("lt_o_ffn"), display_name("fe+lm_head")
    ('(FE+LT)$^c$', 'LT: o+ffn', 'FE +head')
"""

from __future__ import annotations

import csv
import math
import re
from pathlib import Path
from typing import Any, Mapping, Sequence

from ..util.io import atomic_save_figure
from .grids import EIGHTHS, QUARTERS
from .labels import SpecFacets, manifest_facets, manifest_spans
from .metrics import Aggregate, aggregate
from .spec_names import CHARTS, category, chart_of, display_name, layer_facets, order_key  # noqa: F401
from .results import LOCK_FILE, OWNER_FILE, load_manifest, load_results, output_folder, results_path

_COLORS = {"baseline": "#7f7f7f", "single": "#1f77b4", "union": "#2ca02c", "complement": "#ff7f0e",
           "bucket": "#9467bd", "other": "#17becf", "layers": "#8c564b", "selective": "#bcbd22",
           "lm_head": "#e377c2"}
_COLORS["found"] = "#d62728"
_LEGEND = {"baseline": "baselines (P, F)", "single": "one position", "union": "positions together",
           "complement": "complements", "bucket": "some components, all layers", "other": "other specs",
           "layers": "one layer group", "selective": "several rules (e.g. selective layers)",
           "lm_head": "F's LM head alone", "found": "found by nngraft localize"}
_FRACTION_GROUPS = {"quarter": QUARTERS, "eighth": EIGHTHS, "half": ["first_half", "second_half"]}


def _safe(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", text).strip("-") or "x"


def _save(fig: Any, stem: Path, formats: Sequence[str]) -> list[Path]:
    paths = []
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        paths.append(atomic_save_figure(fig, path, dpi=150, bbox_inches="tight"))
    return paths


def _errors(aggs: Sequence[Aggregate], metric: str) -> tuple[list[float], list[list[float]]]:
    means, low, high = [], [], []
    for a in aggs:
        est = a.metrics[metric]
        means.append(est.mean)
        low.append(0.0 if math.isnan(est.low) else max(0.0, est.mean - est.low))
        high.append(0.0 if math.isnan(est.high) else max(0.0, est.high - est.mean))
    return means, [low, high]


def _recovery_errors(aggs: Sequence[Aggregate]) -> tuple[list[float], list[list[float]]]:
    means, low, high = [], [], []
    for a in aggs:
        r = a.recovery
        mean = math.nan if r is None else r.mean
        means.append(mean)
        low.append(0.0 if r is None or math.isnan(r.low) or math.isnan(mean) else max(0.0, mean - r.low))
        high.append(0.0 if r is None or math.isnan(r.high) or math.isnan(mean) else max(0.0, r.high - mean))
    return means, [low, high]


def bar_chart(aggs: Sequence[Aggregate], *, title: str, k: int, stem: Path,
              formats: Sequence[str] = ("png", "svg"), categories: Mapping[str, str] | None = None,
              metrics: Sequence[str] = (), facets: Mapping[str, SpecFacets] | None = None) -> list[Path]:
    """Mean probability, top-1 and top-k accuracy bars (with CI error bars) for one group of specs,
    a panel for each of ``metrics`` (registered metric names, :mod:`.metric_registry`), and their
    recovery (G − P) / (F − P) when the P and F baselines are there; a legend names the bar
    colours (``categories``: a spec's colour group, overriding :func:`category`; ``facets``: what
    each spec grafts, for its label and colour; by name when absent)."""
    from .metric_registry import get_metric

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [a.keys["spec"] for a in aggs]
    facets = facets or {}
    labels = [n if categories and n in categories or n not in facets else _tex(facets[n].label)
              for n in names]  # a spec drawn in a colour of its own (found by localize) keeps its name
    labels = [display_name(n) if n not in facets else label for n, label in zip(names, labels)]
    own = [facets[n].category if n in facets else category(n) for n in names]
    cats = [categories.get(n, c) if categories else c for n, c in zip(names, own)]
    colors = [_COLORS[c] for c in cats]
    panels = [("prob", get_metric("prob").mean_label)]
    if "top_1" in aggs[0].metrics:
        panels.append(("top_1", get_metric("top_1").mean_label))
    if f"top_{k}" in aggs[0].metrics and k != 1:
        panels.append((f"top_{k}", f"{get_metric(f'top_{k}').mean_label}\n(target in the {k} most likely)"))
    panels += [(m, get_metric(m).mean_label) for m in metrics if m in aggs[0].metrics and m not in dict(panels)]
    if any(a.recovery is not None and not math.isnan(a.recovery.mean) for a in aggs):
        panels.append(("recovery", "recovery (G − P) / (F − P)\nof mean target prob."))
    width = max(6.0, 0.55 * len(names) + 1.5)
    fig, axes = plt.subplots(len(panels), 1, figsize=(width, 2.6 * len(panels) + 1.2), sharex=True)
    axes = list(axes) if len(panels) > 1 else [axes]
    x = list(range(len(names)))
    n_facts = max(a.n_facts for a in aggs)
    for ax, (metric, label) in zip(axes, panels):
        means, err = _recovery_errors(aggs) if metric == "recovery" else _errors(aggs, metric)
        ax.bar(x, [0.0 if math.isnan(m) else m for m in means], color=colors, yerr=err, capsize=3,
               error_kw={"elinewidth": 1})
        ax.set_ylabel(label, fontsize=9)
        if metric == "recovery":
            finite = [m - lo for m, lo in zip(means, err[0]) if not math.isnan(m)] + [0.0]
            tops = [m + up for m, up in zip(means, err[1]) if not math.isnan(m)] + [1.0]
            ax.set_ylim(min(-0.1, min(finite) - 0.1), max(tops) + 0.15)
            ax.axhline(0.0, color="black", linewidth=0.6)
            ax.axhline(1.0, color="#7f7f7f", linewidth=0.8, linestyle="--")
        elif get_metric(metric).unit_interval:
            ax.set_ylim(0, 1.12)
        ax.grid(axis="y", alpha=0.3)
        for xi, m, up in zip(x, means, err[1]):
            if math.isnan(m):
                if metric == "recovery":
                    ax.text(xi, 0.02, "n/a", ha="center", va="bottom", fontsize=7, color="#7f7f7f")
                continue
            bounded = metric != "recovery" and get_metric(metric).unit_interval
            top = min(m + up, 1.0) if bounded else m + up  # above its error bar, never on it
            ax.text(xi, max(top, 0.0) + 0.015, f"{m:.2f}", ha="center", va="bottom", fontsize=7)
    axes[-1].set_xticks(x)
    axes[-1].set_xticklabels(labels, rotation=45, ha="right", fontsize=9)
    axes[0].set_title(f"{title}\n(n = {n_facts} facts; error bars: 95% CI over facts)", fontsize=10)
    from matplotlib.patches import Patch

    present = list(dict.fromkeys(cats))
    axes[0].legend(handles=[Patch(color=_COLORS[c], label=_LEGEND[c]) for c in present], fontsize=7,
                   loc="upper left", bbox_to_anchor=(1.005, 1.0), borderaxespad=0.0, frameon=False)
    fig.tight_layout()
    paths = _save(fig, stem, formats)
    plt.close(fig)
    return paths


def _tex(label: str) -> str:
    """A label for matplotlib: the complement sign as mathtext (the fonts lack ᶜ)."""
    return label.replace("ᶜ", "$^c$")


def heatmap(cells: Mapping[tuple[str, str], float], *, rows: Sequence[str], cols: Sequence[str], title: str,
            value_label: str, stem: Path, formats: Sequence[str] = ("png", "svg")) -> list[Path]:
    """A rows × cols heatmap with the value written in each cell (blank cells: not run)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    data = np.full((len(rows), len(cols)), np.nan)
    for (r, c), v in cells.items():
        data[rows.index(r), cols.index(c)] = v
    finite = data[np.isfinite(data)]
    vmin = min(0.0, float(finite.min())) if finite.size else 0.0
    vmax = max(1.0, float(finite.max())) if finite.size else 1.0
    fig, ax = plt.subplots(figsize=(1.0 * len(cols) + 2.5, 0.55 * len(rows) + 1.6))
    image = ax.imshow(np.ma.masked_invalid(data), cmap="viridis", vmin=vmin, vmax=vmax, aspect="auto")
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels([c.replace("_", " ") for c in cols], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(len(rows)))
    ax.set_yticklabels(rows, fontsize=9)
    for i in range(len(rows)):
        for j in range(len(cols)):
            v = data[i, j]
            if np.isfinite(v):
                shade = (v - vmin) / (vmax - vmin or 1)
                ax.text(j, i, f"{v:.2f}", ha="center", va="center", fontsize=8,
                        color="black" if shade > 0.6 else "white")
    fig.colorbar(image, ax=ax, label=value_label)
    ax.set_title(title, fontsize=10)
    fig.tight_layout()
    paths = _save(fig, stem, formats)
    plt.close(fig)
    return paths


def _write_csv(aggs: Sequence[Aggregate], path: Path) -> Path:
    rows = [a.to_dict() for a in aggs]
    columns: list[str] = []
    for r in rows:
        columns += [c for c in r if c not in columns]
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".csv.tmp")
    with open(tmp, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    tmp.replace(path)
    return path


def check_rows(rows: Sequence[dict[str, Any]], path: Path) -> None:
    """Raise :class:`~.results.ResultsError` naming the first row that lacks a column the plots
    need, or whose metric is not a number (a results file from elsewhere, or edited by hand)."""
    from .metrics import metric_columns
    from .results import ResultsError

    metrics = metric_columns(rows)
    for number, row in enumerate(rows, 1):
        missing = [k for k in ("model", "spec", "template", "fact_id", "prob") if k not in row]
        if missing:
            raise ResultsError(f"{path}: row {number} has no {', '.join(missing)}; is it an nngraft results file? "
                               "(nngraft run/sweep write one)")
        for column in metrics:
            value = row.get(column)
            if value is not None and (isinstance(value, str) or not isinstance(value, (int, float))):
                raise ResultsError(f"{path}: row {number}: {column} should be a number, got {value!r}; the file "
                                   "was edited or is not an nngraft results file")


FOUND = "found"
"""In ``plot_results(specs=...)``: every spec that ``nngraft localize`` found (its description says so)."""


def chosen_specs(names: Sequence[str], available: Sequence[str], manifest_specs: Mapping[str, Any]) -> list[str]:
    """The spec names to plot, in the order given; ``"found"`` stands for the specs ``nngraft
    localize`` found (run with ``nngraft run --spec OUT/spec.json``). Unknown names are an error
    that lists the results' specs.

    Example:
        >>> chosen_specs(["f", "found", "p"], ["p", "f", "localized"],
        ...              {"localized": {"description": "found by nngraft localize: 3 units"}})
        ['f', 'localized', 'p']
    """
    from .results import ResultsError

    out: list[str] = []
    for name in names:
        if name == FOUND and name not in available:
            found = [n for n in available if str((manifest_specs.get(n) or {}).get("description", ""))
                     .startswith("found by nngraft localize")]
            if not found:
                raise ResultsError(f"--specs names 'found', but no spec in these results was found by nngraft "
                                   f"localize; run it with: nngraft run --spec LOCALIZE_OUT/spec.json … "
                                   f"(the results have {', '.join(available)})")
            out += [n for n in found if n not in out]
        elif name not in available:
            raise ResultsError(f"--specs names {name!r}, which is not in these results; they have "
                               f"{', '.join(available)}" + (" (and 'found' for localize's spec)"))
        elif name not in out:
            out.append(name)
    return out


def plot_results(results: str | Path, out_dir: str | Path | None = None, *, k: int = 100,
                 formats: Sequence[str] = ("png", "svg"), method: str = "bootstrap",
                 specs: Sequence[str] | None = None, metrics: Sequence[str] = ()) -> list[Path]:
    """Render every bar chart and heatmap for a results file (or directory) into ``out_dir``
    (default: ``plots/`` beside the results). Returns the written paths (figures + CSV).

    ``metrics``: a bar-chart panel for each of these registered metrics (e.g. ``logit_diff``),
    besides probability, top-1, top-k and recovery; each must be a column of the results.

    ``k`` picks the top-k accuracy panel (a ``top_k`` column must be in the results; the largest
    stored k is used when it is not). ``specs``: draw one bar chart per model × template with just
    these specs, in this order (``bars_chosen_…``; see :func:`chosen_specs`), instead of the
    standard charts and heatmaps."""
    path = results_path(results)
    rows = load_results(path)
    if not rows:
        from .results import ResultsError

        raise ResultsError(f"{path} has no rows to plot")
    check_rows(rows, path)
    panels = [_stored_metric(m, rows, path) for m in metrics]
    manifest = load_manifest(path)
    spec_json = {name: info.get("spec", {}) for name, info in manifest.get("specs", {}).items()}
    roles = {name: info.get("role") for name, info in manifest.get("specs", {}).items()}
    p_name = next((n for n, r in roles.items() if r == "p"), "p")
    f_name = next((n for n, r in roles.items() if r == "f"), "f")
    stored = sorted(int(c[4:]) for c in rows[0] if c.startswith("top_") and c[4:].isdigit())
    if stored and k not in stored:
        k = stored[-1]
    out = Path(out_dir) if out_dir is not None else path.parent / "plots"
    with output_folder(out, "plot", flag="-o", ours=_plots_of_before) as out:
        return _render(rows, spec_json, specs, p_name, f_name, k, out, formats, method, panels,
                       manifest_facets(manifest), manifest_spans(manifest))


_FIGURE_SUFFIXES = (".png", ".svg", ".pdf", ".csv")


def _component_rank(label: str) -> tuple[int, str]:
    order = ["all", "attn", "o", "ffn", "attn+o", "o+ffn", "attn+ffn", "attn+o+ffn", "ffn_up", "ffn_down"]
    return (order.index(label) if label in order else len(order), label)


def _plots_of_before(folder: Path) -> bool:
    """A folder ``plot`` wrote before folders were marked: aggregates.csv and figures only."""
    names = [e for e in folder.iterdir() if e.name not in (LOCK_FILE, OWNER_FILE)]
    return (folder / "aggregates.csv").is_file() and all(e.is_file() and e.suffix in _FIGURE_SUFFIXES for e in names)


def _stored_metric(name: str, rows: Sequence[dict[str, Any]], path: Path) -> str:
    """``name`` as the registered metric's column, which the results must hold."""
    from .metric_registry import get_metric
    from .results import ResultsError

    column = get_metric(name).name
    if column not in rows[0]:
        from .metrics import metric_columns

        raise ResultsError(f"--metric {name}: {path} has no {column!r} column; its metrics are "
                           f"{', '.join(metric_columns(rows))} (run with --metric {name} to store it)")
    return column


def _render(rows: list[dict[str, Any]], spec_json: dict[str, Any], specs: Sequence[str] | None, p_name: str,
            f_name: str, k: int, out: Path, formats: Sequence[str], method: str,
            metrics: Sequence[str] = (), facets: Mapping[str, SpecFacets] | None = None,
            spans: Mapping[str, str] | None = None) -> list[Path]:
    facets = facets or {}
    written: list[Path] = []

    templates = list(dict.fromkeys(r["template"] for r in rows))
    per_template = aggregate(rows, by=("model", "template", "spec"), method=method,
                             p_spec=p_name, f_spec=f_name)
    overall = (aggregate([dict(r, template="all templates") for r in rows], by=("model", "template", "spec"),
                         method=method, p_spec=p_name, f_spec=f_name) if len(templates) > 1 else [])
    all_aggs = per_template + overall
    written.append(_write_csv(all_aggs, out / "aggregates.csv"))

    first_seen: dict[str, int] = {}
    for r in rows:
        first_seen.setdefault(r["spec"].split("+")[0], len(first_seen))
    groups: dict[tuple[str, str], list[Aggregate]] = {}
    for a in all_aggs:
        groups.setdefault((a.keys["model"], a.keys["template"]), []).append(a)
    if specs is not None:
        available = list(dict.fromkeys(r["spec"] for r in rows))
        order = chosen_specs(specs, available, spec_json)
        found = {n for n in order if str(spec_json.get(n, {}).get("description", "")).startswith("found by")}
        for (model, template), aggs in groups.items():
            by_name = {a.keys["spec"]: a for a in aggs}
            members = [by_name[n] for n in order if n in by_name]
            if members:
                written += bar_chart(members, title=f"{model} — {template}", k=k, metrics=metrics,
                                     stem=out / f"bars_chosen_{_safe(model)}_{_safe(template)}", formats=formats,
                                     categories={n: "found" for n in found}, facets=facets)
        return written
    for (model, template), aggs in groups.items():
        def chart(a: Aggregate) -> str:
            return chart_of(a.keys["spec"], facets.get(a.keys["spec"]))

        def order(a: Aggregate) -> tuple:
            name = a.keys["spec"]
            if name in facets:
                return (0, facets[name].order, first_seen.get(name.split("+")[0], 0))
            return (1, order_key(name, first_seen), ())

        bars = [a for a in aggs if (facets[a.keys["spec"]].category != "layers" if a.keys["spec"] in facets
                                    else layer_facets(spec_json.get(a.keys["spec"], {})) is None)]
        bars.sort(key=order)
        base = [a for a in bars if chart(a) == "baseline"]
        label = {a.keys["spec"]: facets[a.keys["spec"]].label if a.keys["spec"] in facets
                 else display_name(a.keys["spec"]) for a in bars}
        for name in CHARTS:
            members = [a for a in bars if chart(a) == name]
            if name == "components" and members:  # LT itself, for reference
                members = [a for a in bars if label[a.keys["spec"]] in ("LT", "lt")] + members
            if name == "lm_head" and members:  # each spec also without the head
                without = {label[a.keys["spec"]].rsplit(" +head", 1)[0] for a in members}
                members = sorted([a for a in bars if label[a.keys["spec"]] in without and a not in members
                                  and chart(a) != "baseline"] + members, key=order)
            if not members:
                continue
            written += bar_chart(base + members, title=f"{model} — {template} — {name}", k=k, metrics=metrics,
                                 stem=out / f"bars_{name}_{_safe(model)}_{_safe(template)}", formats=formats,
                                 facets=facets)
        cells: dict[tuple[str, str, str], dict[tuple[str, str], Aggregate]] = {}
        for a in aggs:
            cell = layer_facets(spec_json.get(a.keys["spec"], {}), spans)
            if cell:
                cells.setdefault((cell["position"], cell["fraction"], ""), {})[(cell["component"], cell["layers"])] = a
        for (position, fraction, _), grid in cells.items():
            use_recovery = any(a.recovery is not None and not math.isnan(a.recovery.mean) for a in grid.values())
            values = {key: (a.recovery.mean if use_recovery and a.recovery is not None else a.metrics["prob"].mean)
                      for key, a in grid.items()}
            row_names = sorted(dict.fromkeys(c for c, _ in grid), key=_component_rank)
            col_names = [g for g in _FRACTION_GROUPS[fraction] if any(l == g for _, l in grid)]
            what = ("recovery of mean target prob. (0 = P, 1 = F)" if use_recovery
                    else "mean target probability (recovery undefined: no baselines or F ≈ P)")
            n_facts = max(a.n_facts for a in grid.values())
            written += heatmap(values, rows=row_names, cols=col_names,
                               title=f"{model} — {template}: F's weights at {position}, by layer "
                                     f"{fraction}\n{what}; n = {n_facts} facts",
                               value_label="recovery" if use_recovery else "mean target probability",
                               stem=out / f"heatmap_{_safe(model)}_{_safe(template)}_{_safe(position)}_{fraction}",
                               formats=formats)
    return written
