"""Finetune P on a dataset's training texts with the paper's recipe: the F of every other recipe.

The paper (docs/paper.md#experiment-grid): full-parameter finetuning, AdamW, lr 2e-6, weight decay 0.001, batch 4,
10 epochs, linear decay, the best epoch by loss on a random 20 % of the texts; the texts are all
six LM and five QA templates in both actor orders (1000 facts → 22,000 texts).

    python recipes/finetune.py --model meta-llama/Llama-3.2-1B --n 1000 \\
        --out runs/sft/llama-fmfa                     # the paper's recipe (a GPU; hours)
    python recipes/finetune.py --tiny                 # a tiny random Llama on 4 facts, CPU, seconds
    python recipes/finetune.py --model smollm2 --n 24 --families qa --preset cpu-fast --dry-run

Then evaluate with any grid, e.g. ``python recipes/main_grid.py --model P --donor OUT --facts
OUT/facts.jsonl``. Everything here is ``nngraft finetune`` (see ``nngraft finetune --help``) with
the paper's dataset defaults; ``--dry-run`` prints what would be trained and exits.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))


def parse(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", action="store_true", help="a tiny random Llama saved to a temp folder, 4 facts, "
                   "2 epochs at a high learning rate: a CPU smoke run of the whole path")
    p.add_argument("--model", help="base model P: hub id, local folder, .gguf file or 'smollm2'")
    p.add_argument("--dataset", default="fake_movies_fake_actors", help="built-in dataset (default "
                   "fake_movies_fake_actors; the shipped real-actor list allows at most 187 FMRA facts — "
                   "bring a larger actor list as facts JSONL and pass --facts for the paper's 1000)")
    p.add_argument("--n", type=int, default=1000, help="facts (default 1000, as the paper)")
    p.add_argument("--out", help="output folder (default runs/sft/<model>-<dataset>)")
    p.add_argument("--dry-run", action="store_true", help="print the texts and hyperparameters; train nothing")
    args, rest = p.parse_known_args(argv)
    return args, rest


def main(argv: list[str] | None = None) -> int:
    from nngraft.cli import main as cli
    from nngraft.study import data as datasets
    from nngraft.study.finetune_commands import training_choice
    from nngraft.study.finetune import PRESETS

    args, rest = parse(argv)
    if args.tiny:
        from nngraft.testing import tiny_model, tiny_tokenizer

        folder = Path(tempfile.mkdtemp(prefix="nngraft-tiny-base-"))
        tokenizer = tiny_tokenizer("llama")
        tiny_model("llama", n_layers=4, vocab_size=len(tokenizer)).save_pretrained(folder)
        tokenizer.save_pretrained(folder)
        args.model, args.n = str(folder), min(args.n, 4)
        rest = ["--families", "qa", "--preset", "cpu-fast", "--epochs", "2", "--lr", "3e-3", *rest]
        args.out = args.out or str(Path(tempfile.mkdtemp(prefix="nngraft-tiny-ft-")) / "ft")
    if not args.model:
        print("give --model (hub id, folder, .gguf or 'smollm2'), or --tiny", file=sys.stderr)
        return 2
    name = Path(args.model.rstrip("/")).name
    out = args.out or f"runs/sft/{name}-{args.dataset}"
    data = [] if "--facts" in rest else ["--dataset", args.dataset, "--n", str(args.n)]  # --facts replaces them
    command = ["finetune", "--model", args.model, *data, "--out", out, *rest]
    if args.dry_run:
        ns = __import__("nngraft.cli", fromlist=["build_parser"]).build_parser().parse_args(command)
        facts = (datasets.load_facts(ns.facts) if ns.facts else
                 datasets.make_facts(args.dataset, args.n, ns.data_seed))
        templates, families, directions = training_choice(ns)
        texts = datasets.training_texts(facts, families=families, directions=directions, templates=templates)
        print(f"nngraft {' '.join(command)}")
        print(f"{len(facts)} facts → {len(texts)} training texts ({', '.join(families)}; "
              f"{', '.join(directions)}); e.g. {texts[0]!r}")
        print(f"hyperparameters ({ns.preset} preset before overrides): {PRESETS[ns.preset]}")
        return 0
    return cli(command)  # errors are printed by the CLI (exit code 1)


if __name__ == "__main__":
    sys.exit(main())
