"""Tests of nngraft.spec."""
