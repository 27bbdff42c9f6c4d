#!/usr/bin/env python
"""The hybrid experiment (docs/paper.md#experiment-grid): is recall at the last token task-specific attention plus
entity-specific late FFN/O extraction?

The facts are split into halves A and B (seeded). The task model T is P finetuned on A, the
relation model R is P finetuned on B. The hybrid H is T with R's o, up and down projections in the
second half of the layers (the gate stays T's unless --include-gate). Recipient P; at the
first-actor tokens T's weights (nothing / all / attn / ffn / o+ffn), at the last token H's
q, k, v, o and MLP; evaluated on split B (the facts R knows and T does not). See
docs/reproduce.md, "Hybrid experiment", for the reading of the paper and its ambiguities.

    python recipes/hybrid.py --tiny
    python recipes/hybrid.py --facts data/fmra.jsonl --write-splits data/       # before finetuning
    python recipes/hybrid.py --model P --task runs/sft/T-A --relation runs/sft/R-B --facts data/fmra.jsonl
"""

from __future__ import annotations

import sys
from pathlib import Path

from _common import parser

TEMPLATES = ["sentence_1", "sentence_2", "sentence_3", "sentence_4"]


def _parser():
    p = parser(__doc__, tiny_layers=4)
    h = p.add_argument_group("hybrid")
    h.add_argument("--task", help="task model T: P finetuned on split A (path or hub id)")
    h.add_argument("--relation", help="relation model R: P finetuned on split B (path or hub id)")
    h.add_argument("--split-seed", type=int, default=0, help="seed of the A/B split of --facts (default 0); "
                   "must be the one the models were finetuned with")
    h.add_argument("--eval-split", choices=["B", "A", "both"], default="B",
                   help="which facts to test on (default B, the relation model's; A is a control)")
    h.add_argument("--hybrid-layers", default="second_half",
                   help="layers whose o/up/down come from R (default second_half = n//2 … n-1)")
    h.add_argument("--include-gate", action="store_true",
                   help="also take R's MLP gate projection (the paper kept T's)")
    h.add_argument("--write-splits", metavar="DIR",
                   help="write FACTS_A.jsonl / FACTS_B.jsonl (+ manifests) to DIR for finetuning, then exit")
    return p


def _facts(args):
    """(facts, file stem, source dataset name, source dataset seed) — the last two are copied into
    the split files' manifests so `nngraft data texts` picks the dataset's training templates."""
    from nngraft.study.data import load_facts, make_facts, read_manifest

    if args.facts:
        manifest = read_manifest(args.facts) or {}
        return (load_facts(args.facts), Path(args.facts).name.removesuffix(".jsonl"), manifest.get("dataset"),
                manifest.get("seed"))
    return make_facts(args.dataset, args.n, args.seed), f"{args.dataset}-n{args.n}-seed{args.seed}", args.dataset, args.seed


def _tiny_models(args, root: Path) -> tuple[str, str, str]:
    """Deterministic tiny P, T (perturbed copy, seed 1), R (perturbed copy, seed 2), saved once."""
    from nngraft.testing import perturbed_copy, tiny_pair

    folder = root / f"tiny-{args.tiny}-{args.tiny_layers}L"
    paths = tuple(str(folder / n) for n in ("pre", "task", "relation"))
    if not all((Path(p) / "config.json").is_file() for p in paths):
        P, T, tok = tiny_pair(args.tiny, n_layers=args.tiny_layers)
        for model, path in zip((P, T, perturbed_copy(P, seed=2)), paths):
            model.save_pretrained(path)
            tok.save_pretrained(path)
    return paths


def main(argv=None) -> int:
    from rich.console import Console

    from nngraft.errors import GraftError
    from nngraft.study.data import save_facts
    from nngraft.study.hybrid import (DEFAULT_COMPONENTS, HYBRID, RELATION, WITH_GATE, prepare_hybrid,
                                      shared_entities, split_facts)
    from nngraft.study.sweep import SweepConfig, SweepConfigError, check_donors, check_spans, resolve_specs

    args = _parser().parse_args(argv)
    console = Console(stderr=True)
    components = WITH_GATE if args.include_gate else DEFAULT_COMPONENTS
    layers = args.hybrid_layers
    if layers.lstrip("-").isdigit() or "," in layers:
        layers = [int(x) for x in layers.split(",")]
    try:
        if args.donor:
            raise SweepConfigError("the hybrid recipe takes --task and --relation instead of --donor")
        if args.tiny and (args.model or args.task or args.relation):
            raise SweepConfigError("give --tiny, or --model, --task and --relation, not both")
        facts, stem, dataset, dataset_seed = _facts(args)
        split_a, split_b = split_facts(facts, args.split_seed)
        overlap = shared_entities(split_a, split_b)
        if overlap:
            console.print(f"[yellow]warning:[/yellow] {len(overlap)} actors occur in both splits (e.g. "
                          f"{overlap[:3]}); the task model then knows something about B's entities")
        if args.write_splits:
            for label, part in (("A", split_a), ("B", split_b)):
                path = Path(args.write_splits) / f"{stem}_{label}.jsonl"
                save_facts(part, path, dataset=dataset, seed=dataset_seed)
                console.print(f"split {label} (seed {args.split_seed}): {len(part)} facts → {path}")
            console.print("next: `nngraft data texts` on each split, finetune P on A (task model) and on B "
                          "(relation model), then run this recipe with --task/--relation")
            return 0
        if not args.tiny and not (args.model and args.task and args.relation):
            raise SweepConfigError("give --model, --task and --relation (paths or hub ids), or --tiny for a "
                                   "CPU smoke run")
        name = args.name or (f"tiny-{args.tiny}" if args.tiny else Path(args.task.rstrip("/")).name)
        out = Path(args.output or f"runs/hybrid-{name}")
        splits = ["B", "A"] if args.eval_split == "both" else [args.eval_split]

        def config_for(split: str, recipient: str, task: str, donors: dict[str, str]) -> SweepConfig:
            data = {"facts": str((out / f"facts_{split}.jsonl").resolve()), "templates": list(args.template or TEMPLATES)}
            if args.limit:
                data["limit"] = args.limit
            return SweepConfig.model_validate({
                "name": f"hybrid-{name}-{split}",
                "models": [{"name": name, "recipient": recipient, "donor": task, "donors": donors,
                            "dtype": args.dtype, "device": args.device}],
                "data": data, "grid": "hybrid", "batch_size": args.batch_size,
                "answer_logprob": args.answer_logprob, "output": str(out / f"eval_{split}"),
                "base_dir": str(Path.cwd())})

        if args.dry_run:
            from nngraft.study.data import make_test_examples

            for split in splits:
                config = config_for(split, "P", "T", {HYBRID: "H", RELATION: "R"})
                specs = resolve_specs(config)
                check_donors(specs, config.models)
                part = (split_b if split == "B" else split_a)[: args.limit]
                examples = [e for t in config.data.templates for e in make_test_examples(part, t)]
                check_spans(specs, examples)
                console.print(f"split {split}: {len(specs)} specs × {len(examples)} examples = "
                              f"{len(specs) * len(examples)} rows → {config.output_dir()}")
            what = "tiny random P, T, R" if args.tiny else f"P={args.model}, T={args.task}, R={args.relation}"
            console.print(f"models: {what}; hybrid = T with R's {'+'.join(components)} in layers {layers!r}; "
                          f"A/B split seed {args.split_seed}: {len(split_a)} / {len(split_b)} facts")
            return 0

        for label, part in (("A", split_a), ("B", split_b)):
            save_facts(part, out / f"facts_{label}.jsonl", dataset=dataset, seed=dataset_seed)
        if args.tiny:
            recipient, task, relation = _tiny_models(args, out / "models")
        else:
            recipient, task, relation = args.model, args.task, args.relation
        hybrid, record, _ = prepare_hybrid(task, relation, out / "models", layers=layers, components=components,
                                           dtype=args.dtype, console=console)
        code = 0
        for split in splits:
            config = config_for(split, recipient, task, {HYBRID: str(hybrid), RELATION: relation})
            code = max(code, _run(args, config, split, console))
        return code
    except GraftError as error:
        console.print(f"[red]error:[/red] {error}")
        return 1


def _run(args, config, split: str, console) -> int:
    from rich.console import Console

    from nngraft.study.results import load_results
    from nngraft.study.summary import wide_console, summary_table
    from nngraft.study.sweep import run_sweep

    outcome = run_sweep(config, show_progress=not args.no_progress, console=console)
    reference = "relation_model" if split == "B" else "f"
    console.print(f"split {split}: recovery is relative to P and "
                  f"{'R (relation_model), the model that learned these facts' if split == 'B' else 'F = T, the task model, which learned these facts'}")
    wide_console(Console()).print(summary_table(load_results(outcome.results), k=args.k, title=config.name,
                                         f_spec=reference))
    if not args.no_plot:
        from nngraft.study.plot import plot_results

        paths = plot_results(outcome.results, k=args.k)
        console.print(f"plots: {len(paths)} files in {paths[0].parent}")
    console.print(f"results: {outcome.results}")
    return 0 if all(r.get("ok", True) for r in outcome.baseline_check.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
