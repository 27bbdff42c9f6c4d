#!/usr/bin/env python
"""Real-movies retention: does the model finetuned on fake movies with real actors (FMRA) still
know real co-stars? P, F and the main grid on real movies (RMRA facts, prompt
"{movie_title} stars {first_actor} and"). F below P here means finetuning overwrote old knowledge.

    python recipes/real_movies.py --tiny
    python recipes/real_movies.py --model P --donor F_fmra --n 120   # all 120 shipped real movies
"""

import sys

from _common import execute, parser


def main(argv=None) -> int:
    args = parser(__doc__, dataset="real_movies_real_actors").parse_args(argv)
    return execute(args, "real_movies", grid="main", templates=["rmra"])


if __name__ == "__main__":
    sys.exit(main())
