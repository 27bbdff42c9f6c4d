#!/usr/bin/env python
"""Selective layers (docs/paper.md#experiment-grid): FE in all layers + LT in the second half; the earlier variant
(FE in the first three quarters); and the FE component override (o + FFN at FE, no q/k/v).

    python recipes/selective_layers.py --tiny
    python recipes/selective_layers.py --model P --donor F --facts data/fmra.jsonl
"""

import sys

from _common import execute, parser

TEMPLATES = ["sentence_1", "sentence_2", "sentence_3", "sentence_4"]


def main(argv=None) -> int:
    args = parser(__doc__, tiny_layers=4).parse_args(argv)
    return execute(args, "selective_layers", grid="selective", templates=TEMPLATES)


if __name__ == "__main__":
    sys.exit(main())
