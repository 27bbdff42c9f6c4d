"""Shared test machinery (no test module imports another): the per-token reference, stand-in
servers, recipe loading, virtual devices, and the fixtures several test modules use."""

from pathlib import Path

HELPERS = Path(__file__).resolve().parent
"""This folder (scripts the tests start as subprocesses live here)."""
ROOT = HELPERS.parents[1]
"""The repository root (docs/, recipes/, benchmarks/)."""
