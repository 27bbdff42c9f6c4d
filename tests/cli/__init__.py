"""Tests of nngraft.cli."""
