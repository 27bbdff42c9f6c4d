"""Tests of nngraft.backends."""
