#!/usr/bin/env python
"""Movie-title span (M): M, M+LT, FE+M, FE+M+LT, (FE+M)ᶜ, (FE+M+LT)ᶜ next to FE, LT, FE+LT, on the
one sentence whose prompt holds the title (the paper used sentence_3 only).

    python recipes/movie_span.py --tiny
    python recipes/movie_span.py --model P --donor F --facts data/fmra.jsonl
"""

import sys

from _common import execute, parser


def main(argv=None) -> int:
    args = parser(__doc__).parse_args(argv)
    return execute(args, "movie_span", grid="movie", templates=["sentence_3"])


if __name__ == "__main__":
    sys.exit(main())
