"""The demo's grid of specs and its report tables: the paper's position grid plus FE+M+LT, then at
the last token attention (q, k, v, o) vs MLP over all layers, per layer quarter and in the final
layers, each alone and on top of F at the first actor (:func:`demo_specs`), and the rich tables
and extra heatmap ``nngraft demo`` prints and draws from their results (:func:`summarize`).

Example:
    >>> [s.name for s in demo_specs()][:5]
    ['p', 'f', 'fe', 'lt', 'fe_lt']
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence


# The grid. Positions: the paper's main grid plus FE+M+LT (the movie title too). Then, at the last
# token, attention (q, k, v, o) vs MLP over all layers, per layer quarter, and the final layers' MLPs,
# each alone ("lt_…") and on top of F at the first actor's tokens ("fe+lt_…").
POSITION_ROWS = ["p", "f", "fe", "lt", "fe_lt", "fe_m_lt", "fe_lt_complement", "not_fe", "not_lt"]


PARTS = {"attn_o": ["q", "k", "v", "o"], "ffn": ["mlp"]}


PART_LABELS = {"attn_o": "attention (q, k, v, o)", "ffn": "MLP", "attn_o_ffn": "attention + MLP"}


BOTH_PARTS = ("attn_o_ffn", ["q", "k", "v", "o", "mlp"])
"""Attention and MLP together (no layer norms), over all layers only."""


QUARTERS = ["first_quarter", "second_quarter", "third_quarter", "fourth_quarter"]


LAYER_CHOICES = {"all": "all layers", **{q: q.replace("_", " ") for q in QUARTERS},
                 "last1": "final layer", "last4": "final 4 layers"}


_LAYER_VALUE = {"last1": "last:1", "last4": "last:4"}


WITH_FE = "fe+"


READING = {
    "p": "P: no graft (the pretrained model)",
    "f": "F: all of F's weights, everywhere (= F)",
    "fe": "enrichment: F's blocks at the first actor",
    "lt": "recall: F's blocks at the last token",
    "fe_lt": "both: F at the first actor + last token",
    "fe_m_lt": "F at first actor + movie title + last token",
    "fe_lt_complement": "F everywhere but first actor + last token",
    "not_fe": "F everywhere but the first actor",
    "not_lt": "F everywhere but the last token",
}


def lt_part_name(part: str, layers: str, with_fe: bool = False) -> str:
    """Spec name of "F's ``part`` in ``layers`` at the last token" (plus F at FE when ``with_fe``).

    Example:
        >>> lt_part_name("ffn", "all"), lt_part_name("attn_o", "fourth_quarter", with_fe=True)
        ('lt_ffn', 'fe+lt_attn_o_fourth_quarter')
    """
    name = f"lt_{part}" if layers == "all" else f"lt_{part}_{layers}"
    return WITH_FE + name if with_fe else name


def demo_specs() -> list[Any]:
    """The demo's grid (see :data:`POSITION_ROWS`, :data:`PARTS`, :data:`LAYER_CHOICES`). Position
    specs come from :func:`nngraft.study.grids.paper_specs`; an LT part spec with a paper name
    (``lt_ffn``, ``lt_ffn_first_quarter`` …) is the paper's."""
    from ..spec import GraftRule, GraftSpec, Last, Span
    from .grids import paper_specs

    paper = paper_specs()
    specs = [paper[name] for name in POSITION_ROWS]
    fe_rule = paper["fe"].rules[0]
    assert fe_rule.positions == [Span(span="first_actor")]
    choices = [(part, components, layers) for part, components in PARTS.items() for layers in LAYER_CHOICES]
    choices.append((*BOTH_PARTS, "all"))
    for with_fe in (False, True):
        for part, components, layers in choices:
            name = lt_part_name(part, layers, with_fe)
            if name in paper:  # e.g. lt_ffn, lt_ffn_first_quarter: use the paper's spec
                specs.append(paper[name])
                continue
            rule = GraftRule(components=components, layers=_LAYER_VALUE.get(layers, layers), positions=[Last()])
            what = f"F's {PART_LABELS[part]} in the {LAYER_CHOICES[layers]} at the last token"
            if with_fe:
                specs.append(GraftSpec(name=name, rules=[fe_rule, rule],
                                       description=f"F's block weights at the first actor (all layers); {what}"))
            else:
                specs.append(GraftSpec(name=name, rules=[rule], description=what))
    return specs


def summarize(rows: Sequence[dict[str, Any]], model: str, template: str, n_facts: int
              ) -> tuple[list[dict[str, Any]], list[Any]]:
    """The aggregate per spec (as dicts, for the manifest) and the rich tables the demo prints:
    positions (the paper's grid), then what at the last token, over all layers and per quarter."""
    from rich.table import Table

    from .metrics import aggregate
    from .spec_names import display_name

    aggs = {a.keys["spec"]: a for a in aggregate(rows, by=("model", "template", "spec"))}
    table_rows = [a.to_dict() for a in aggs.values()]

    def recovery(spec: str, interval: bool = True) -> str:
        r = aggs[spec].recovery
        if r is None or math.isnan(r.mean):
            return "n/a" if r is None or not interval else "n/a (F ≈ P)"
        ci = interval and r.method != "none" and not math.isnan(r.low)
        return f"{r.mean:+.2f}" + (f" [{r.low:+.2f}, {r.high:+.2f}]" if ci else "")

    def top1(spec: str) -> str:
        return f"{aggs[spec].metrics['top_1'].mean:.2f}"

    positions = Table(title=f"{model} on {template} ({n_facts} facts): graft F's weights at some token "
                            "positions, run P", title_justify="left")
    for name in ("row", "what is grafted", "mean p(target) [95% CI]", "top-1", "top-100", "recovery [95% CI]"):
        positions.add_column(name, justify="left" if name in ("row", "what is grafted") else "right", no_wrap=True)
    for spec in [name for name in POSITION_ROWS if name in aggs]:
        a = aggs[spec]
        prob = a.metrics["prob"]
        interval = f" [{prob.low:.3f}, {prob.high:.3f}]" if prob.method != "none" else ""
        positions.add_row(display_name(spec).replace("$^c$", "ᶜ"), READING[spec], f"{prob.mean:.3f}{interval}",
                          top1(spec), f"{a.metrics['top_100'].mean:.2f}", recovery(spec))
        if spec in ("f", "fe_m_lt" if "fe_m_lt" in aggs else "fe_lt"):
            positions.add_section()

    parts = Table(title="recall: which of F's weights at the last token? — recovery (top-1); "
                        "'with FE' adds F's blocks at the first actor", title_justify="left")
    parts.add_column("F's weights at the last token", no_wrap=True)
    parts.add_column("alone", justify="right", no_wrap=True)
    parts.add_column("with FE", justify="right", no_wrap=True)
    choices = ["all", "last1", "last4"]
    for part in PARTS:
        for layers in choices:
            alone, with_fe = lt_part_name(part, layers), lt_part_name(part, layers, True)
            parts.add_row(f"{PART_LABELS[part]}, {LAYER_CHOICES[layers]}",
                          f"{recovery(alone, False)} ({top1(alone)})", f"{recovery(with_fe, False)} ({top1(with_fe)})")
    both = BOTH_PARTS[0]
    parts.add_row(f"{PART_LABELS[both]}, all layers", f"{recovery(lt_part_name(both, 'all'), False)} "
                  f"({top1(lt_part_name(both, 'all'))})", f"{recovery(lt_part_name(both, 'all', True), False)} "
                  f"({top1(lt_part_name(both, 'all', True))})")
    parts.add_row("[dim]all block weights (LT, FE+LT)[/dim]", f"{recovery('lt', False)} ({top1('lt')})",
                  f"{recovery('fe_lt', False)} ({top1('fe_lt')})")

    quarters = Table(title="recall by layer quarter: F's weights at the last token in one quarter of the "
                           "layers — recovery (top-1)", title_justify="left")
    quarters.add_column("F's weights at the last token", no_wrap=True)
    for q in QUARTERS:
        quarters.add_column(LAYER_CHOICES[q], justify="right", no_wrap=True)
    for with_fe in (False, True):
        for part in PARTS:
            label = PART_LABELS[part] + (" with FE" if with_fe else "")
            quarters.add_row(label, *[f"{recovery(lt_part_name(part, q, with_fe), False)} "
                                      f"({top1(lt_part_name(part, q, with_fe))})" for q in QUARTERS])
    note = ("[dim]means over facts; CI: percentile bootstrap over facts; recovery = (G − P) / (F − P) of mean "
            "target probability: 0 = no better than P, 1 = as good as F; top-k: share of facts whose target "
            "is among the k most likely next tokens[/dim]")
    return table_rows, [positions, parts, quarters, note]


def with_fe_heatmap(table_rows: Sequence[dict[str, Any]], model: str, template: str, n_facts: int,
                    out_dir: Path) -> list[Path]:
    """Heatmap of recovery for "F at the first actor + F's part in one quarter at the last token"
    (the study's plots draw the LT-alone heatmap; this one has two rules per spec)."""
    from .plot import heatmap

    by_spec = {row["spec"]: row for row in table_rows}
    cells = {}
    for part in PARTS:
        for q in QUARTERS:
            row = by_spec.get(lt_part_name(part, q, True))
            if row is not None and row.get("recovery") is not None and not math.isnan(row["recovery"]):
                cells[(PART_LABELS[part], q)] = row["recovery"]
    if not cells:
        return []
    return heatmap(cells, rows=[PART_LABELS[p] for p in PARTS], cols=QUARTERS,
                   title=f"{model} — {template}: F's blocks at FE (all layers) + F's weights at LT in one "
                         f"quarter\nrecovery of mean target prob. (0 = P, 1 = F); n = {n_facts} facts",
                   value_label="recovery", stem=out_dir / f"heatmap_{model}_{template}_FE+LT_quarter",
                   formats=("png",))
