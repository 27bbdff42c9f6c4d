"""Test examples several study test modules share: facts of the fake-movies kind (a first actor
and a movie title as spans, the co-star as the answer), written as a user's examples would be."""

from __future__ import annotations

from nngraft.study.examples import TestExample

TWO_FACTS = (
    TestExample("f1", "s3", "Ada Lovelace stars in The Engine alongside",
                {"first_actor": "Ada Lovelace", "movie_title": "The Engine"}, "Alan Turing"),
    TestExample("f2", "s3", "Grace Hopper stars in The Compiler alongside",
                {"first_actor": "Grace Hopper", "movie_title": "The Compiler"}, "Marie Curie"),
)
"""Two facts on template s3: Ada Lovelace → Alan Turing, Grace Hopper → Marie Curie."""
