#!/usr/bin/env python
"""Component buckets at the last token (the paper's patch_configs_lt): which of F's components at
LT carry recall — attn (q, k, v only), o, ffn, their unions, ffn_up / ffn_down — at all layers,
next to P, F and LT (every block component).

    python recipes/components.py --tiny
    python recipes/components.py --model P --donor F --facts data/fmra.jsonl
"""

import sys

from _common import execute, parser

TEMPLATES = ["sentence_1", "sentence_2", "sentence_3", "sentence_4"]


def main(argv=None) -> int:
    args = parser(__doc__).parse_args(argv)
    return execute(args, "components", grid="components", templates=TEMPLATES)


if __name__ == "__main__":
    sys.exit(main())
