"""Tests of nngraft.donors."""
