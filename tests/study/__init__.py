"""Tests of nngraft.study."""
