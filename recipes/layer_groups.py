#!/usr/bin/env python
"""Layer groups at the last token: F's all / attn / o / ffn weights in each quarter and each eighth
of the layers (correct eighths, which the paper's code got wrong), drawn as component × layer
group heatmaps of recovery. --tiny uses an 8-layer tiny pair (eighths need 8 layers).

    python recipes/layer_groups.py --tiny
    python recipes/layer_groups.py --model P --donor F --facts data/fmra.jsonl
"""

import sys

from _common import execute, parser

TEMPLATES = ["sentence_1", "sentence_2", "sentence_3", "sentence_4"]


def main(argv=None) -> int:
    args = parser(__doc__, tiny_layers=8).parse_args(argv)
    return execute(args, "layer_groups", grid="layers", templates=TEMPLATES)


if __name__ == "__main__":
    sys.exit(main())
