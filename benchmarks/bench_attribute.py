"""Benchmark — graft attribution vs exhaustive localization, side by side in one process.

For one model pair and its facts, in one process and one after the other (load average recorded
before each arm, so both arms see the machine alike):

1. ``localize(screen="exhaustive")`` — the coarse-to-fine search of docs/localize.md;
2. ``localize(screen="attribution")`` — units ranked by first-order attribution, verified by exact
   grafts, then pruned; and with ``--steps K`` the same with scores integrated along P → F;
3. the scores against the exact single-unit effects: every unit grafted alone (one row per unit
   and prompt), on the linearized recovery of the target probability (the search's own metric):
   Spearman rank correlation of first-order and integrated scores with those effects.

It prints and records the wall time of each arm and their ratio, the found sets' size and exact
recovery, and writes ``benchmarks/results/attribute/CASE.json``; the table of every case recorded
goes into docs/benchmarks.md ("Graft attribution vs exhaustive localize").

    python -m benchmarks.bench_attribute --case tiny --tiny llama --n 4 --no-docs
    python -m benchmarks.bench_attribute --case inventors --model smollm2 --donor runs/sft/inventors \\
        --facts runs/sft/inventors/facts.jsonl --template tests.txt --answer-field device
    python -m benchmarks.bench_attribute --case demo-seed0 --demo-run nngraft-demo --n 5
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # before torch: OpenMP threads must not spin on a shared box

import argparse
import json
import time
from pathlib import Path
from typing import Any, Sequence

from .common import ROOT, replace_docs_section

RESULTS = ROOT / "benchmarks" / "results" / "attribute"
HEADING = "## Graft attribution vs exhaustive localize"
BEGIN = "<!-- attribution:begin -->"
END = "<!-- attribution:end -->"


def _load() -> float:
    return round(os.getloadavg()[0], 2)


def _arm(grafter: Any, examples: Sequence[Any], **options: Any) -> dict[str, Any]:
    from rich.console import Console

    from nngraft.study.localize import localize

    load = _load()
    start, cpu_start = time.perf_counter(), time.process_time()
    result = localize(grafter, examples, console=Console(stderr=True, quiet=True), show_progress=False, **options)
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
    return {"seconds": round(seconds, 2), "cpu_seconds": round(cpu_seconds, 2), "load": load, "n_units": len(result.units),
            "recovery": round(result.recovery.mean, 4), "forward_passes": result.forward_passes,
            "rows": result.rows, "universe_units": result.universe_units,
            "units": [list(u) for u in result.units],
            "attribution_seconds": result.data.get("screen", {}).get("attribution_seconds")}


def recovery_of(grafter: Any, examples: Sequence[Any], metric: str, targets: str) -> Any:
    """The search's own objective as a differentiable metric: the recovery of the per-fact mean of
    the target's probability (or log-probability), targets the answers' first tokens or F's top-1."""
    import torch

    from nngraft.attribution import recovery_metric, target_logprob, target_prob
    from nngraft.result import target_token_id
    from nngraft.spec import All, GraftRule, GraftSpec

    prompts, spans = [e.prompt for e in examples], [e.spans for e in examples]
    f_spec = GraftSpec(name="f", rules=[GraftRule(components=["everything"], positions=[All()])])
    runs = grafter.run_grid([GraftSpec(name="p"), f_spec], prompts, spans)
    if targets == "donor_top1":
        ids = runs["f"].logits.argmax(-1).tolist()
    else:
        ids = [target_token_id(grafter.tokenizer, e.prompt, e.answer) for e in examples]
    facts = [e.fact_id for e in examples]
    weights = [1.0 / (len(set(facts)) * facts.count(f)) for f in facts]
    inner = (target_prob if metric == "prob" else target_logprob)(ids, weights)
    with torch.no_grad():
        p_value, f_value = float(inner(runs["p"].logits)), float(inner(runs["f"].logits))
    return recovery_metric(ids, p_value, f_value, weights, base=metric)


ARMS = ("exhaustive", "pruned", "not-pruned", "integrated")


def measure(grafter: Any, examples: Sequence[Any], *, steps: int, target: float, exact: bool = True,
            metric: str = "prob", targets: str = "answer", arms: Sequence[str] = ARMS) -> dict[str, Any]:
    """Every arm on ``grafter`` and ``examples`` (see the module docstring)."""
    from nngraft.attribution import exact_effects, spearman

    record: dict[str, Any] = {"arms": {}, "target": target, "metric": metric, "targets": targets}
    options = {"target": target, "metric": metric, "targets": targets}
    record["arms"]["exhaustive"] = _arm(grafter, examples, **options)
    if "pruned" in arms:
        record["arms"]["attribution"] = _arm(grafter, examples, screen="attribution", **options)
    if "not-pruned" in arms:
        record["arms"]["attribution, not pruned"] = _arm(grafter, examples, screen="attribution",
                                                         screen_prune=False, **options)
    if steps > 1 and "integrated" in arms:
        record["arms"][f"integrated ({steps}), not pruned"] = _arm(grafter, examples, screen="attribution",
                                                                  screen_steps=steps, screen_prune=False, **options)
    if exact:
        prompts, spans = [e.prompt for e in examples], [e.spans for e in examples]
        metric_fn = recovery_of(grafter, examples, metric, targets)
        load = _load()
        start = time.perf_counter()
        att = grafter.attribute(metric_fn, prompts, spans, steps=max(steps, 1))
        att_seconds = time.perf_counter() - start
        load_exact = _load()
        start = time.perf_counter()
        effects = exact_effects(grafter, metric_fn, prompts, spans, att.units)
        exact_seconds = time.perf_counter() - start
        record["ranking"] = {
            "units": len(att.units), "spearman_first_order": round(spearman(att.scores, effects), 4),
            "spearman_integrated": round(spearman(att.integrated, effects), 4) if att.integrated is not None else None,
            "attribute_seconds": round(att_seconds, 2), "attribute_load": load, "exact_seconds": round(exact_seconds, 2),
            "exact_load": load_exact, "sum_exact": round(float(effects.sum()), 4),
            "sum_first_order": round(float(att.scores.sum()), 4),
            "sum_integrated": round(float(att.integrated.sum()), 4) if att.integrated is not None else None,
            "top10_exact": [att.units[i] for i in effects.argsort()[::-1][:10]],
            "top10_first_order": att.ranked()[:10],
        }
        att.exact = effects
        record["attribution"] = att.to_dict()  # every unit's scores and exact effect (for the figure)
    ex = record["arms"]["exhaustive"]
    for name, arm in record["arms"].items():
        arm["time_ratio"] = round(ex["seconds"] / arm["seconds"], 2)
        if "cpu_seconds" in arm and "cpu_seconds" in ex:  # CPU time: far less sensitive to other jobs' load
            arm["cpu_ratio"] = round(ex["cpu_seconds"] / arm["cpu_seconds"], 2)
        arm["recovery_diff"] = round(arm["recovery"] - ex["recovery"], 4)
    return record


def render(records: dict[str, dict[str, Any]]) -> str:
    lines = [BEGIN, "",
             "`python -m benchmarks.bench_attribute` (one process per case; the arms one after the other, "
             "the 1-minute load average before each in brackets). *exhaustive*: `nngraft localize`'s "
             "coarse-to-fine search; *attribution*: `--screen attribution` (units ranked by attribution, "
             "verified with exact grafts, pruned to a 1-minimal set); *not pruned*: `--no-prune` (the smallest "
             "verified prefix of the ranking); *integrated (K)*: `--screen-steps K`. Time ratio: exhaustive ÷ arm (goal ≥ 10); "
             "CPU ratio: the same with the process's CPU time (all its threads), which other jobs on a shared "
             "machine move far less than wall time (— where a case predates it); Δ recovery: "
             "arm − exhaustive (goal within 0.03 of it). Spearman: the scores against every unit grafted "
             "alone (recovery of the target probability).", "",
             "| case | arm | wall s [load] | time ratio | CPU s | CPU ratio | units found | recovery | Δ recovery | rows (passes) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for case, rec in records.items():
        for name, arm in rec["arms"].items():
            cpu = (f"{arm['cpu_seconds']:.1f} | {arm['cpu_ratio']:.2f}" if "cpu_ratio" in arm else "— | —")
            lines.append(f"| {case} | {name} | {arm['seconds']:.1f} [{arm['load']:.1f}] | {arm['time_ratio']:.2f} | {cpu} | "
                         f"{arm['n_units']} of {arm['universe_units']} | {arm['recovery']:.3f} | "
                         f"{arm['recovery_diff']:+.3f} | {arm['rows']} ({arm['forward_passes']}) |")
    lines += ["", "| case | units | Spearman, first order | Spearman, integrated | Σ exact | Σ first order | "
              "Σ integrated | attribute s [load] | every unit grafted alone s [load] |",
              "|---|---|---|---|---|---|---|---|---|"]
    for case, rec in records.items():
        r = rec.get("ranking")
        if not r:
            continue
        integ = "—" if r["spearman_integrated"] is None else f"{r['spearman_integrated']:.3f}"
        sint = "—" if r["sum_integrated"] is None else f"{r['sum_integrated']:.3f}"
        lines.append(f"| {case} | {r['units']} | {r['spearman_first_order']:.3f} | {integ} | {r['sum_exact']:.3f} | "
                     f"{r['sum_first_order']:.3f} | {sint} | {r['attribute_seconds']:.1f} [{r['attribute_load']:.1f}] | "
                     f"{r['exact_seconds']:.1f} [{r['exact_load']:.1f}] |")
    lines += ["", END]
    return "\n".join(lines)


def _grafter_and_examples(args: argparse.Namespace) -> tuple[Any, list[Any], dict[str, Any]]:
    from nngraft.grafter import Grafter
    from nngraft.study.localize_commands import load_inputs

    if args.demo_run:
        run = Path(args.demo_run)
        manifest = json.loads((run / "manifest.json").read_text())
        identity = next(iter(manifest["models"].values()))
        pair = {"name": run.name, "recipient": args.model or identity["recipient"]["source"],
                "donor": manifest["finetune"]["folder"]}
        data = {"facts": str(run / "facts.jsonl"), "templates": [args.template or manifest["dataset"]["template"]]}
    elif args.tiny:
        pair = {"name": f"tiny-{args.tiny}", "tiny": args.tiny}
        data = {"dataset": "fake_movies_fake_actors", "n": args.n or 4, "seed": 0,
                "templates": [args.template or "sentence_1"]}
    else:
        pair = {"name": Path(args.donor).name, "recipient": args.model, "donor": args.donor}
        data = {"facts": str(Path(args.facts).resolve()),
                "templates": [str(Path(args.template).resolve()) if Path(args.template).is_file() else args.template]}
    if args.answer_field:
        data["answer_field"] = args.answer_field
    if args.n and not args.tiny:
        data["limit"] = args.n
    loaded, examples, _ = load_inputs(pair, data)
    grafter = Grafter(loaded.recipient, loaded.graft_donor or loaded.donor, loaded.tokenizer,
                      batch_size=args.batch_size)
    return grafter, examples, {"pair": pair, "data": data}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--case", help="name of this case in the table")
    p.add_argument("--render-only", action="store_true", help="only re-render the table from --results")
    p.add_argument("--tiny", metavar="MODEL_TYPE")
    p.add_argument("--model")
    p.add_argument("--donor")
    p.add_argument("--facts")
    p.add_argument("--template")
    p.add_argument("--answer-field")
    p.add_argument("--demo-run", metavar="FOLDER", help="an `nngraft demo` output folder (its F and facts)")
    p.add_argument("--n", type=int, help="first N facts")
    p.add_argument("--steps", type=int, default=4, help="integrated arm's points (1: no integrated arm)")
    p.add_argument("--target", type=float, default=0.9)
    p.add_argument("--metric", choices=["prob", "logprob"], default="prob")
    p.add_argument("--targets", choices=["answer", "donor_top1"], default="answer")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--no-exact", action="store_true", help="skip the every-unit-alone ranking check")
    p.add_argument("--arms", default=",".join(ARMS),
                   help=f"arms besides exhaustive (always run), comma-separated (default {','.join(ARMS[1:])})")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    p.add_argument("--no-docs", action="store_true")
    p.add_argument("--plot", type=Path, metavar="PNG", help="also draw the scores beside the exact effects here")
    args = p.parse_args(argv)
    from nngraft.util.io import atomic_write_text

    if args.render_only:
        return _publish(args)
    if not args.case:
        p.error("--case is required (or --render-only)")
    grafter, examples, source = _grafter_and_examples(args)
    record = measure(grafter, examples, steps=args.steps, target=args.target, exact=not args.no_exact,
                     metric=args.metric, targets=args.targets, arms=args.arms.split(","))
    record.update(source, n_examples=len(examples), model_type=grafter.adapter.model_type,
                  n_layers=grafter.n_layers, threads=__import__("torch").get_num_threads())
    args.results.mkdir(parents=True, exist_ok=True)
    atomic_write_text(args.results / f"{args.case}.json", json.dumps(record, indent=1, default=list) + "\n")
    if args.plot and "attribution" in record:
        from nngraft.study.attribution_plot import plot_attribution

        plot_attribution(record["attribution"], args.plot)
    _publish(args)
    return record


def _publish(args: argparse.Namespace) -> dict[str, Any]:
    """Render the table of every case in ``args.results``, print it and (unless ``--no-docs``)
    put it into ``args.docs``."""
    records = {f.stem: json.loads(f.read_text()) for f in sorted(args.results.glob("*.json"))}
    text = render(records)
    print(text)
    if not args.no_docs:
        replace_docs_section(args.docs, text, BEGIN, END, HEADING)
    return records


if __name__ == "__main__":
    main()
