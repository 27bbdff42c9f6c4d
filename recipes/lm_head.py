#!/usr/bin/env python
"""LM head: the main grid with and without F's LM head at the last token (the working version of
the paper's patch_lm_head="last_token", a no-op in its code), plus F's LM head alone.

    python recipes/lm_head.py --tiny
    python recipes/lm_head.py --model P --donor F --facts data/fmra.jsonl
"""

import sys

from _common import execute, parser

TEMPLATES = ["sentence_1", "sentence_2", "sentence_3", "sentence_4"]


def main(argv=None) -> int:
    args = parser(__doc__).parse_args(argv)
    return execute(args, "lm_head", grid="lm_head", templates=TEMPLATES)


if __name__ == "__main__":
    sys.exit(main())
