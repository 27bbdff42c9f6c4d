"""The results tables ``nngraft run`` and ``nngraft sweep`` print (and ``--json``'s summary): per
model × template × spec, the mean and 95 % CI of every registered metric and recovery."""

from __future__ import annotations

import math
from typing import Any, Sequence


def summary_table(rows: Sequence[dict[str, Any]], *, k: int, title: str, p_spec: str = "p",
                  f_spec: str = "f", manifest: dict[str, Any] | None = None) -> Any:
    """Rich tables, one per model × template: per spec the number of facts, mean target
    probability with its 95 % bootstrap CI, top-1 and top-k accuracy, the mean of every other
    registered metric the rows hold (:mod:`.metric_registry`; log-probability left out) and
    recovery. With the results' ``manifest``, each spec is labelled by what it grafts
    (:mod:`nngraft.study.labels`), else by its name."""
    from rich.console import Group
    from rich.table import Table

    from .labels import manifest_facets
    from .metric_registry import stored_metrics
    from .metrics import aggregate
    from .spec_names import display_name

    facets = manifest_facets(manifest) if manifest else {}
    aggs = aggregate(rows, p_spec=p_spec, f_spec=f_spec)
    stored = sorted(int(c[4:]) for c in rows[0] if c.startswith("top_") and c[4:].isdigit()) if rows else []
    if stored and k not in stored:
        k = stored[-1]
    groups: dict[tuple[str, str], list[Any]] = {}
    for a in aggs:
        groups.setdefault((str(a.keys["model"]), str(a.keys["template"])), []).append(a)
    row_rec = row_recoveries(rows)
    answer = any("answer_logprob" in r for r in rows)
    shown = [m for m in (stored_metrics(rows[0]) if rows else [])
             if m.name not in ("prob", "logprob", "answer_logprob") and not m.name.startswith("top_")]
    tables = []
    for (model, template), members in sorted(groups.items(), key=lambda item: item[0]):
        table = Table(title=f"{title}: {model} — {template}", title_justify="left")
        table.add_column("spec", no_wrap=True)
        columns = (["facts", "mean prob [95% CI]", "top-1", f"top-{k}"] + [m.header for m in shown]
                   + ["recovery [95% CI]", "median row recovery"] + (["answer logprob"] if answer else []))
        for name in columns:
            table.add_column(name, justify="right", no_wrap=True)
        for a in members:
            m = a.metrics
            prob = m["prob"]
            prob_text = f"{prob.mean:.3f}" + (f" [{prob.low:.3f}, {prob.high:.3f}]" if prob.method != "none" else "")
            rec = "–"
            if a.recovery is not None:
                r = a.recovery
                rec = (f"{r.mean:.2f} [{r.low:.2f}, {r.high:.2f}]" if not math.isnan(r.mean) else "n/a (F ≈ P)")
            mean = lambda name, fmt: f"{m[name].mean:{fmt}}" if name in m else "–"  # noqa: E731
            name = a.keys["spec"]
            label = facets[name].label if name in facets else display_name(name).replace("$^c$", "ᶜ")
            spec = a.keys["spec"] if label == a.keys["spec"] else f"{a.keys['spec']} ({label})"
            median = row_rec.get((model, template, a.keys["spec"]))
            cells = ([spec, str(a.n_facts), prob_text, mean("top_1", ".2f"), mean(f"top_{k}", ".2f")]
                     + [mean(metric.name, metric.fmt) for metric in shown]
                     + [rec, "–" if median is None else f"{median:.2f}"])
            if answer:
                cells.append(mean("answer_logprob", ".2f"))
            table.add_row(*cells)
        tables.append(table)
    tables.append("[dim]means over facts; CI: percentile bootstrap over facts; recovery = (G − P) / (F − P) of "
                  "mean prob. (n/a when |F − P| < 0.05); median row recovery: the median over prompts of each "
                  "row's (G − P) / (F − P) against its own P and F rows (rows with |F − P| < 0.05 left out; "
                  "the results file's recovery column); rank is 0-based; top-k: fewer than k tokens more likely; "
                  "logit diff: target − P's top other token; KL in nats over the next token"
                  + ("; answer logprob: mean log P(whole answer | prompt)" if answer else "") + "[/dim]")
    return Group(*tables)


def row_recoveries(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str, str], float]:
    """Median of the rows' ``recovery`` column per (model, template, spec), over rows that have one."""
    import statistics

    values: dict[tuple[str, str, str], list[float]] = {}
    for r in rows:
        if r.get("recovery") is not None:
            values.setdefault((str(r["model"]), str(r["template"]), r["spec"]), []).append(r["recovery"])
    return {key: statistics.median(v) for key, v in values.items()}


def summary_json(rows: Sequence[dict[str, Any]], *, k: int) -> list[dict[str, Any]]:
    """What ``nngraft run --json`` prints: per model × template × spec, the mean and CI of every
    registered metric the rows hold (``top_k``: k = 1 and ``k`` only), recovery."""
    from .metrics import aggregate

    row_rec = row_recoveries(rows)
    out = []
    for a in aggregate(rows):
        item = {**{key: a.keys[key] for key in ("model", "template", "spec")}, "facts": a.n_facts}
        for name, est in a.metrics.items():
            if not name.startswith("top_") or name in ("top_1", f"top_{k}"):
                item[name] = {"mean": est.mean, "low": est.low, "high": est.high}
        item["recovery"] = (None if a.recovery is None or math.isnan(a.recovery.mean) else
                            {"mean": a.recovery.mean, "low": a.recovery.low, "high": a.recovery.high})
        item["median_row_recovery"] = row_rec.get((str(a.keys["model"]), str(a.keys["template"]), a.keys["spec"]))
        out.append(item)
    return out


def wide_console(console: Any, width: int = 130) -> Any:
    """The console itself on a terminal; else one at least ``width`` columns wide (tables stay
    readable in logs and pipes), as quiet as ``console``."""
    from rich.console import Console

    if console.is_terminal:
        return console
    return Console(width=max(console.width, width), file=console.file, force_terminal=False, quiet=console.quiet,
                   highlight=False)
