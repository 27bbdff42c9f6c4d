"""Tests of nngraft.arch."""
