"""``nngraft attribute``: score every (position group × component × layer) unit of the graft space
by its attribution to a metric of F's facts, from one forward and one backward pass of P
(:mod:`nngraft.attribution`; docs/attribution.md).

Models and data are given as for ``nngraft run``. Writes ``attribution.json`` and
``attribution.png`` (layers × position groups per component); ``--exact`` also grafts every unit
alone and reports the rank correlation of the scores with those exact effects.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any, Sequence

from ..cli.registry import command, console, out, passive_omp_reexec

METRIC_CHOICES = ("logprob", "prob", "recovery", "logit_diff")


def study_metric(name: str, grafter: Any, examples: Sequence[Any], target_ids: Sequence[int]) -> Any:
    """One of :data:`METRIC_CHOICES` over ``examples`` (per-fact means, then the mean over facts):
    the target's log-probability or probability, the linearized recovery of the probability
    (``(m − m_P) / (m_F − m_P)``: P and F are run once for it), or the logit difference of the
    target and P's most likely other token."""
    import torch

    from ..attribution import logit_diff, recovery_metric, target_logprob, target_prob
    from ..result import top_other_token
    from ..spec import All, GraftRule, GraftSpec

    facts = [e.fact_id for e in examples]
    counts = {f: facts.count(f) for f in facts}
    weights = [1.0 / (len(counts) * counts[f]) for f in facts]
    if name not in METRIC_CHOICES:  # any metric of the study's registry (or module:function): its mean
        from .metric_registry import get_metric

        registered = get_metric(name)
        both = {"p": GraftSpec(name="p"), "f": GraftSpec(name="f", rules=[
            GraftRule(components=["everything"], positions=[All()])])}
        runs = grafter.run_grid(both, [e.prompt for e in examples], [e.spans for e in examples])
        return registered.scalar(target_ids, p_logits=runs["p"].logits, f_logits=runs["f"].logits)
    if name == "logprob":
        return target_logprob(target_ids, weights)
    if name == "prob":
        return target_prob(target_ids, weights)
    prompts, spans = [e.prompt for e in examples], [e.spans for e in examples]
    specs = {"p": GraftSpec(name="p"), "f": GraftSpec(name="f", rules=[
        GraftRule(components=["everything"], positions=[All()])])}
    runs = grafter.run_grid(specs if name == "recovery" else {"p": specs["p"]}, prompts, spans)
    if name == "logit_diff":
        ids = torch.as_tensor(list(target_ids))
        return logit_diff(ids, top_other_token(runs["p"].logits, ids.to(runs["p"].logits.device)).cpu())
    prob = target_prob(target_ids, weights)
    with torch.no_grad():
        p_value, f_value = float(prob(runs["p"].logits)), float(prob(runs["f"].logits))
    return recovery_metric(target_ids, p_value, f_value, weights)


def run_attribute(pair: dict[str, Any], data: dict[str, Any], *, output: str | Path, metric: str = "logprob",
                  targets: str = "answer", steps: int = 1, components: Sequence[str] | None = None,
                  heads: bool = False, neurons: bool = False, exact: bool = False, batch_size: int = 32,
                  plot: bool = True) -> tuple[Any, dict[str, Path]]:
    """Load models and data, score every unit, write ``attribution.json`` (and the figure) into
    ``output`` (a new folder, or one attribute wrote before). Returns
    (:class:`~nngraft.attribution.Attribution`, paths by kind)."""
    from .results import output_folder

    folder = Path(output)
    with output_folder(folder, "attribute", flag="-o", ours=lambda f: (f / "attribution.json").is_file()):
        return _run_attribute(pair, data, folder, metric=metric, targets=targets, steps=steps,
                              components=components, heads=heads, neurons=neurons, exact=exact,
                              batch_size=batch_size, plot=plot)


def _run_attribute(pair: dict[str, Any], data: dict[str, Any], folder: Path, *, metric: str, targets: str,
                   steps: int, components: Sequence[str] | None, heads: bool, neurons: bool, exact: bool,
                   batch_size: int, plot: bool) -> tuple[Any, dict[str, Path]]:
    from ..attribution import exact_effects
    from ..grafter import Grafter
    from ..util.io import atomic_write_text
    from ..result import target_token_id
    from ..spec import All, GraftRule, GraftSpec
    from .localize_commands import load_inputs

    loaded, examples, source = load_inputs(pair, data)
    grafter = Grafter(loaded.recipient, loaded.graft_donor or loaded.donor, loaded.tokenizer, batch_size=batch_size)
    prompts, spans = [e.prompt for e in examples], [e.spans for e in examples]
    if targets == "donor_top1":
        f_spec = GraftSpec(name="f", rules=[GraftRule(components=["everything"], positions=[All()])])
        target_ids = grafter.run(f_spec, prompts, spans).logits.argmax(-1).tolist()
    else:
        target_ids = [target_token_id(grafter.tokenizer, e.prompt, e.answer) for e in examples]
    chosen = study_metric(metric, grafter, examples, target_ids)
    att = grafter.attribute(chosen, prompts, spans, components=components, heads=heads, neurons=neurons,
                            steps=steps, batch_size=batch_size)
    if exact:
        att.exact = exact_effects(grafter, chosen, prompts, spans, att.units, batch_size=batch_size, progress=True)
    body = att.to_dict()
    body["targets"] = targets
    body["models"] = {"name": loaded.name, **loaded.identity}
    body["data"] = {"source": source, "n_examples": len(examples), "target_ids": [int(t) for t in target_ids]}
    if exact:
        body["spearman"] = {"scores": att.spearman("scores"),
                            "integrated": att.spearman("integrated") if att.integrated is not None else None}
    paths = {"result": atomic_write_text(folder / "attribution.json", json.dumps(body, indent=2) + "\n")}
    if plot:
        from .attribution_plot import plot_attribution

        paths["plot"] = plot_attribution(body, folder / "attribution.png")
    return att, paths


def _attribute_args(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = """examples:
  nngraft attribute --model smollm2 --donor runs/sft --facts facts.jsonl --template sentence_3 -o runs/att
  nngraft attribute --tiny llama --dataset fake_movies_fake_actors --n 4 --template sentence_1 \\
                    --targets donor_top1 --steps 4 --exact -o runs/att-tiny
Writes OUTPUT/attribution.json (every unit's score) and OUTPUT/attribution.png. See docs/attribution.md."""
    from .run_commands import add_model_data_args

    add_model_data_args(p)
    a = p.add_argument_group("attribution")
    a.add_argument("--metric", default="logprob", metavar="NAME",
                   help="what the scores are effects on: logprob, the answer's first-token log-prob (default); "
                        "prob, its probability; recovery, the linearized recovery of the probability; "
                        "logit_diff, the answer against P's most likely other token (these four: per-fact "
                        "means); or any metric of the study's registry, or module:function (the mean over "
                        "prompts)")
    a.add_argument("--targets", choices=["answer", "donor_top1"], default="answer",
                   help="first token of each answer (default), or F's own greedy next token")
    a.add_argument("--steps", type=int, default=1, metavar="K",
                   help="1: first-order scores (default); K > 1: also scores integrated along P → F")
    a.add_argument("--components", metavar="NAME,NAME,...",
                   help="components or groups to score (default: every component)")
    a.add_argument("--heads", action="store_true", help="also per attention head (q, k, v, o)")
    a.add_argument("--neurons", action="store_true", help="also per MLP neuron (gate, up, down)")
    a.add_argument("--exact", action="store_true",
                   help="also graft every unit alone (one row per unit and prompt) and report the rank "
                        "correlation of the scores with those exact effects")
    a.add_argument("--top", type=int, default=15, help="units shown in the table (default 15)")
    p.add_argument("-o", "--output", help="output folder (default runs/attribute-<model>)")
    p.add_argument("--batch-size", type=int, default=32, help="prompts per pass (default 32)")
    p.add_argument("--no-plot", action="store_true", help="skip attribution.png")


@command("attribute", _attribute_args)
def cmd_attribute(args: argparse.Namespace) -> int:
    """Score every unit of the graft space by attribution (one forward + one backward pass of P)."""
    from ..errors import ArgumentError
    from .run_commands import pair_and_data

    if args.steps < 1:
        raise ArgumentError(f"--steps must be ≥ 1; got {args.steps}")
    if args.top < 1:
        raise ArgumentError(f"--top must be ≥ 1; got {args.top}")
    if args.metric not in METRIC_CHOICES:  # checked before any model is loaded
        from .metric_registry import MetricError, get_metric

        try:
            get_metric(args.metric)
        except MetricError as error:
            raise ArgumentError(f"--metric: {error}") from None
    if args.device in ("auto", "cpu"):
        passive_omp_reexec("attribute")
    pair, data = pair_and_data(args)
    output = Path(args.output or f"runs/attribute-{pair['name']}")
    components = [c.strip() for c in args.components.split(",") if c.strip()] if args.components else None
    att, paths = run_attribute(pair, data, output=output, metric=args.metric, targets=args.targets,
                               steps=args.steps, components=components, heads=args.heads, neurons=args.neurons,
                               exact=args.exact, batch_size=args.batch_size, plot=not args.no_plot)
    from rich.table import Table

    table = Table(title=f"top {args.top} of {len(att.units)} units by attribution to {att.metric} "
                        f"(P: {att.metric_p:.4g}; {att.seconds:.1f} s)")
    rows = att.table(args.top)
    for key in rows[0]:
        table.add_column(key, justify="left" if key == "unit" else "right")
    for row in rows:
        table.add_row(*[v if isinstance(v, str) else f"{v:+.4g}" for v in row.values()])
    out.print(table)
    if att.exact is not None:
        line = f"Spearman rank correlation with the exact single-unit effects: first order {att.spearman():.3f}"
        if att.integrated is not None:
            line += f", integrated {att.spearman('integrated'):.3f}"
        out.print(line, highlight=False)
    for kind, path in paths.items():
        out.print(f"{kind}: {path}", highlight=False)
    return 0
