"""Tests of nngraft.compile."""
