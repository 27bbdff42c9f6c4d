#!/usr/bin/env python
"""Relation span (R): R, FE+R, R+LT, FE+R+LT next to FE, LT, FE+LT. The relation word ("stars")
becomes a span by writing it as a {relation} field with a fixed value; the prompts are exactly
sentence_1 and sentence_2.

    python recipes/relation_span.py --tiny
    python recipes/relation_span.py --model P --donor F --facts data/fmra.jsonl
"""

import sys

from _common import execute, parser

TEMPLATES = [
    {"name": "sentence_1_r", "template": "{first_actor} {relation} in a movie alongside",
     "values": {"relation": "stars"}},
    {"name": "sentence_2_r", "template": "Q: Who {relation} in a movie with {first_actor}? A: An actor named",
     "values": {"relation": "stars"}},
]


def main(argv=None) -> int:
    args = parser(__doc__).parse_args(argv)
    return execute(args, "relation_span", grid="relation", templates=TEMPLATES)


if __name__ == "__main__":
    sys.exit(main())
