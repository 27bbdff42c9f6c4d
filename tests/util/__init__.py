"""Tests of nngraft.util."""
