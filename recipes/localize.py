#!/usr/bin/env python
"""Automatic localization (issue 8): instead of a hand-picked grid, search (position group ×
component × layer) for a small set of F's weights that recovers 90 % of F's target probability
on the facts, then write the spec, every search step, the recovery curve and a plot.

    python recipes/localize.py --tiny                       # CPU smoke run (F's own top-1 as target)
    python recipes/localize.py --model meta-llama/Llama-3.2-1B --donor runs/sft/llama-fmra \\
        --facts data/fmra.jsonl --holdout 0.2               # the paper's setting, on a GPU

Position groups are the template's spans (sentence_3: first_actor, movie_title), the last token
and every other token. See docs/localize.md.
"""

import sys
from pathlib import Path

from _common import parser

TEMPLATES = ["sentence_3"]


def main(argv=None) -> int:
    from rich.console import Console

    from nngraft.errors import GraftError
    from nngraft.study.localize_commands import add_search_args, run_localize, search_options

    p = parser(__doc__)
    add_search_args(p)
    args = p.parse_args(argv)
    console = Console(stderr=True, soft_wrap=True)
    if args.tiny:  # random tiny models know no facts: localize F's own next token, on log-probs
        args.targets = args.targets or "donor_top1"
        args.metric = args.metric or "logprob"
    try:
        if args.tiny and (args.model or args.donor):
            raise GraftError("give --tiny, or --model and --donor, not both")
        if args.tiny:
            name = args.name or f"tiny-{args.tiny}"
            pair = {"name": name, "tiny": args.tiny, "tiny_layers": args.tiny_layers}
        elif args.model and args.donor:
            name = args.name or Path(args.donor.rstrip("/")).name
            pair = {"name": name, "recipient": args.model, "donor": args.donor}
        else:
            raise GraftError("give --model and --donor (paths or hub ids), or --tiny for a CPU smoke run")
        pair.update(dtype=args.dtype, device=args.device)
        data = ({"facts": str(Path(args.facts).resolve())} if args.facts
                else {"dataset": args.dataset, "n": args.n, "seed": args.seed})
        data["templates"] = list(args.template or TEMPLATES)
        if args.limit:
            data["limit"] = args.limit
        output = Path(args.output or f"runs/localize-{name}")
        options = search_options(args)
        if args.dry_run:
            from nngraft.study.localize_commands import load_examples

            examples, _ = load_examples(data)
            spans = options["spans"] or [s for s in examples[0].spans if all(s in e.spans for e in examples)]
            groups = len(spans) + 2
            console.print(f"models: {pair}\nsearch: {options}\n{len(examples)} examples; position groups "
                          f"{spans} + last + other; the first step tries {2 ** groups - 2} subsets: "
                          f"{(2 ** groups - 2) * len(examples)} rows → {output}")
            return 0
        result, paths = run_localize(pair, data, output=output, plot=not args.no_plot,
                                     show_progress=not args.no_progress, console=console,
                                     batch_size=args.batch_size, **options)
        for kind, path in paths.items():
            print(f"{kind}: {path}")
        return 0
    except GraftError as error:
        console.print(f"[red]error:[/red] {error}")
        return 1


if __name__ == "__main__":
    sys.exit(main())
