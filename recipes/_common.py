"""Shared command line of the recipe scripts: pick models (tiny CPU pair or the paper's models),
data, output; build a sweep config; run it; plot it.

Every recipe is ``python recipes/NAME.py --tiny`` (a tiny random pair from
``nngraft.testing.tiny_pair`` on a few generated facts, CPU, seconds) or
``python recipes/NAME.py --model P --donor F --facts FACTS.jsonl`` (paths or hub ids; F must have
been finetuned on FACTS). ``--dry-run`` prints the plan and exits.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))


def parser(description: str, *, dataset: str = "fake_movies_real_actors", tiny_layers: int = 2) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    who = p.add_argument_group("models")
    who.add_argument("--tiny", nargs="?", const="llama", metavar="MODEL_TYPE",
                     help="tiny random P/F pair of this model type (default llama) on CPU: a smoke run")
    who.add_argument("--tiny-layers", type=int, default=tiny_layers, help=argparse.SUPPRESS)
    who.add_argument("--model", help="recipient P: path or hub id (e.g. meta-llama/Llama-3.2-1B)")
    who.add_argument("--donor", help="donor F: path or hub id of P finetuned on --facts")
    who.add_argument("--name", help="model name in the results (default: the donor's folder name)")
    who.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    who.add_argument("--device", default="auto")
    data = p.add_argument_group("data")
    data.add_argument("--facts", help="JSONL facts to evaluate on (those F was finetuned on); default: "
                      "generate --dataset/--n/--seed, which reproduces `nngraft data make` with the same values")
    data.add_argument("--dataset", default=dataset, help=f"built-in dataset (default {dataset})")
    data.add_argument("--n", type=int, default=8, help="number of facts to generate (default 8)")
    data.add_argument("--seed", type=int, default=0, help="dataset seed (default 0)")
    data.add_argument("--template", action="append", help="test template name or {field} string (repeat; "
                      "default: the recipe's)")
    data.add_argument("--limit", type=int, help="use only the first N facts")
    p.add_argument("-o", "--output", help="results directory (default runs/<recipe>-<model>)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--answer-logprob", action="store_true", help="also score whole answers (teacher forcing)")
    p.add_argument("--k", type=int, default=100, help="top-k in the table and plots")
    p.add_argument("--no-plot", action="store_true", help="skip the figures")
    p.add_argument("--dry-run", action="store_true", help="print the sweep config and plan, run nothing")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(tiny_layers=tiny_layers)
    return p


def build_config(args: argparse.Namespace, recipe: str, *, grid: str | Sequence[str] | None, templates: Sequence[Any],
                 lm_head: Sequence[str] = ("never",), specs: Sequence[str] = ()) -> Any:
    from nngraft.study.sweep import SweepConfig, SweepConfigError

    if args.tiny and (args.model or args.donor):
        raise SweepConfigError("give --tiny, or --model and --donor, not both")
    if args.tiny:
        name = args.name or f"tiny-{args.tiny}"
        model = {"name": name, "tiny": args.tiny, "tiny_layers": args.tiny_layers}
    else:
        if not (args.model and args.donor):
            raise SweepConfigError("give --model and --donor (paths or hub ids), or --tiny for a CPU smoke run")
        name = args.name or Path(args.donor.rstrip("/")).name
        model = {"name": name, "recipient": args.model, "donor": args.donor}
    model.update(dtype=args.dtype, device=args.device)
    if args.facts:
        data: dict[str, Any] = {"facts": str(Path(args.facts).resolve())}
    else:
        data = {"dataset": args.dataset, "n": args.n, "seed": args.seed}
    data["templates"] = list(args.template or templates)
    if args.limit:
        data["limit"] = args.limit
    return SweepConfig.model_validate({
        "name": f"{recipe}-{name}", "models": [model], "data": data, "grid": grid, "specs": list(specs),
        "lm_head": list(lm_head),
        "batch_size": args.batch_size, "answer_logprob": args.answer_logprob, "output": args.output or f"runs/{recipe}-{name}",
        "base_dir": str(Path.cwd())})


def execute(args: argparse.Namespace, recipe: str, **sweep: Any) -> int:
    """Build the sweep (:func:`build_config` with ``sweep``), then run it (or with --dry-run describe
    it), print the summary tables and render the plots. Returns the exit code."""
    from rich.console import Console

    from nngraft.errors import GraftError
    from nngraft.study.results import load_results
    from nngraft.study.summary import wide_console, summary_table
    from nngraft.study.sweep import check_spans, load_data, resolve_specs, run_sweep

    console = Console(stderr=True)
    try:
        config = build_config(args, recipe, **sweep)
        specs = resolve_specs(config)
        examples, _ = load_data(config)
        check_spans(specs, examples)
        if args.dry_run:
            print(json.dumps(config.model_dump(mode="json"), indent=2))
            console.print(f"{len(specs)} specs × {len(examples)} examples = {len(specs) * len(examples)} rows "
                          f"→ {config.output_dir()}")
            return 0
        outcome = run_sweep(config, show_progress=not args.no_progress, console=console)
        wide_console(Console()).print(summary_table(load_results(outcome.results), k=args.k, title=config.name))
        if not args.no_plot:
            from nngraft.study.plot import plot_results

            paths = plot_results(outcome.results, k=args.k)
            console.print(f"plots: {len(paths)} files in {paths[0].parent}")
        console.print(f"results: {outcome.results}")
        return 0 if all(r.get("ok", True) for r in outcome.baseline_check.values()) else 1
    except GraftError as error:
        console.print(f"[red]error:[/red] {error}")
        return 1
