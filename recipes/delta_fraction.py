#!/usr/bin/env python
"""How much of F's weight change is needed? Recovery vs the fraction of ΔW kept (top-k % by
magnitude) and vs its rank (SVD truncation), grafting every block component at the first-actor
tokens and the last token (FE+LT). Beyond the paper: parameter-level grafts (docs/specs.md).

    python recipes/delta_fraction.py --tiny
    python recipes/delta_fraction.py --model P --donor F --facts data/fmra.jsonl

Writes the usual results.jsonl + manifest, and delta_fraction.png/.svg: two panels, recovery of
mean target probability (with 95% bootstrap intervals over facts) against % kept and against rank.
"""

import sys
from pathlib import Path

from _common import build_config, parser

from nngraft.util.io import atomic_save_figure

PERCENTS = [1, 2, 5, 10, 25, 50, 100]
RANKS = [1, 2, 4, 8, 16, 32]
TEMPLATES = ["sentence_3"]


def specs():
    from nngraft import GraftRule, GraftSpec, Last, Span, WeightSelection

    where = [Span(span="first_actor"), Last()]
    out = [GraftSpec(name=f"fe_lt_top{p}", description=f"FE+LT, largest {p}% of |ΔW| per tensor",
                     rules=[GraftRule(components=["all"], positions=where,
                                      weights=None if p == 100 else WeightSelection(top_percent=p))])
           for p in PERCENTS]
    out += [GraftSpec(name=f"fe_lt_rank{r}", description=f"FE+LT, rank-{r} ΔW",
                      rules=[GraftRule(components=["all"], positions=where, weights=WeightSelection(rank=r))])
            for r in RANKS]
    return out


def plot(results: Path, out: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nngraft.study.metrics import aggregate
    from nngraft.study.results import load_results

    aggs = {a.keys["spec"]: a for a in aggregate(load_results(results), by=("spec",), metrics=["prob"])}
    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharey=True)
    for ax, prefix, xs, label in ((axes[0], "fe_lt_top", PERCENTS, "% of |ΔW| entries kept (per tensor)"),
                                  (axes[1], "fe_lt_rank", RANKS, "rank of ΔW kept (SVD)")):
        points = [(x, aggs[f"{prefix}{x}"].recovery) for x in xs if f"{prefix}{x}" in aggs]
        xs_, est = [x for x, _ in points], [e for _, e in points]
        mean = [e.mean for e in est]
        err = [[max(e.mean - e.low, 0) for e in est], [max(e.high - e.mean, 0) for e in est]]
        ax.errorbar(xs_, mean, yerr=err, marker="o", capsize=3)
        notes = {e.note for e in est if e.note and e.mean != e.mean}  # nan: recovery undefined
        if notes:
            ax.text(0.5, 0.5, "recovery undefined:\n" + "\n".join(sorted(notes)), transform=ax.transAxes,
                    ha="center", va="center", fontsize=9, color="firebrick", wrap=True)
        ax.set_xscale("log")
        ax.set_xticks(xs_, [str(x) for x in xs_])
        ax.axhline(1.0, color="grey", lw=0.8, ls="--")
        ax.axhline(0.0, color="grey", lw=0.8)
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("recovery of mean target prob\n(grafted − P) / (F − P)")
    fig.suptitle("FE+LT graft with part of F's weight change")
    fig.tight_layout()
    paths = []
    for ext in ("png", "svg"):
        paths.append(atomic_save_figure(fig, out / f"delta_fraction.{ext}", dpi=130))
    plt.close(fig)
    return paths


def main(argv=None) -> int:
    from rich.console import Console

    from nngraft.errors import GraftError
    from nngraft.study.sweep import run_sweep

    args = parser(__doc__).parse_args(argv)
    console = Console(stderr=True)
    try:
        probe = build_config(args, "delta_fraction", grid="main", templates=TEMPLATES)  # for the output folder
        spec_dir = probe.output_dir() / "specs"
        files = [str(s.save(spec_dir / f"{s.name}.json")) for s in specs()]
        config = build_config(args, "delta_fraction", grid=None, templates=TEMPLATES, specs=files)
        if args.dry_run:
            console.print(f"{len(config.specs)} specs in {spec_dir}")
            return 0
        outcome = run_sweep(config, show_progress=not args.no_progress, console=console)
        if not args.no_plot:
            paths = plot(outcome.results, config.output_dir())
            console.print(f"plot: {paths[0]}")
        console.print(f"results: {outcome.results}")
        return 0
    except GraftError as error:
        console.print(f"[red]error:[/red] {error}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
