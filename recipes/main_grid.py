#!/usr/bin/env python
"""Main grid (the paper's headline bar charts; docs/paper.md#headline-numbers): P, F, FE, LT, FE+LT, (FE+LT)ᶜ, FEᶜ,
LTᶜ — F's block weights at all layers, at the first-actor tokens and/or the last token — on the
four movie test sentences.

    python recipes/main_grid.py --tiny                      # CPU smoke run, seconds
    python recipes/main_grid.py --model meta-llama/Llama-3.2-1B --donor runs/sft/llama-fmra \\
        --facts data/fmra.jsonl                              # the paper's setting, on a GPU
"""

import sys

from _common import execute, parser

TEMPLATES = ["sentence_1", "sentence_2", "sentence_3", "sentence_4"]


def main(argv=None) -> int:
    args = parser(__doc__).parse_args(argv)
    return execute(args, "main_grid", grid="main", templates=TEMPLATES)


if __name__ == "__main__":
    sys.exit(main())
