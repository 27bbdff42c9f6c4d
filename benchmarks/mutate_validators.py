"""Mutation testing of the validators: does the suite notice when a check is weakened?

Each mutant is one planted change to a validator (a comparison flipped, a check dropped) in
nngraft/util/checks.py, nngraft/spec/schema.py or nngraft/cli/boundary.py. For each, this script
copies the working tree to a temporary folder, applies the change there (the tree itself is never
touched), runs the tests that guard that validator, and reports the mutant *killed* (a test
failed) or *survived* (every test passed: a weakened check nobody would notice). Not part of the
test suite (minutes of CPU); ``tests/test_benchmarks_smoke.py`` checks the mutant list still
applies to the code.

    python -m benchmarks.mutate_validators                 # every mutant
    python -m benchmarks.mutate_validators --only checks   # mutants whose id starts so
    python -m benchmarks.mutate_validators --list          # the mutants, nothing run

Results of the last full run are in docs/reliability.md ("Mutation testing of the validators").
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

CHECKS_TESTS = ("tests/util/test_checks.py", "tests/test_doors.py")
SCHEMA_TESTS = ("tests/spec/test_schema.py", "tests/test_errors.py")
BOUNDARY_TESTS = ("tests/cli/test_boundary.py", "tests/test_errors.py")


@dataclass(frozen=True)
class Mutant:
    id: str
    path: str       # file, relative to the repository root
    old: str        # text that occurs exactly once in it
    new: str        # what the mutant puts there
    tests: tuple[str, ...]


MUTANTS = [
    # nngraft/util/checks.py
    Mutant("checks.positive_int.off_by_one", "nngraft/util/checks.py",
           "if not is_int(value) or value < minimum:", "if not is_int(value) or value <= minimum:", CHECKS_TESTS),
    Mutant("checks.positive_int.no_minimum", "nngraft/util/checks.py",
           "if not is_int(value) or value < minimum:", "if not is_int(value):", CHECKS_TESTS),
    Mutant("checks.is_int.accepts_bool", "nngraft/util/checks.py",
           "return isinstance(value, numbers.Integral) and not isinstance(value, bool)",
           "return isinstance(value, numbers.Integral)", CHECKS_TESTS),
    Mutant("checks.number.off_by_one", "nngraft/util/checks.py",
           "or not math.isfinite(value) or value < minimum:", "or not math.isfinite(value) or value <= minimum:",
           CHECKS_TESTS),
    Mutant("checks.number.accepts_nan_inf", "nngraft/util/checks.py",
           "or not math.isfinite(value) or value < minimum:", "or value < minimum:", CHECKS_TESTS),
    Mutant("checks.positive_number.accepts_zero", "nngraft/util/checks.py",
           "or not math.isfinite(value) or value <= 0:", "or not math.isfinite(value) or value < 0:", CHECKS_TESTS),
    Mutant("checks.text.accepts_blanks", "nngraft/util/checks.py",
           "if not isinstance(value, str) or not value or value != value.strip() or (",
           "if not isinstance(value, str) or not value or (", CHECKS_TESTS),
    Mutant("checks.text.accepts_any_url", "nngraft/util/checks.py",
           'url and not value.startswith(("http://", "https://"))):', "False):", CHECKS_TESTS),
    Mutant("checks.float_dtype.accepts_int_dtypes", "nngraft/util/checks.py",
           "isinstance(value, torch.dtype) and value.is_floating_point", "isinstance(value, torch.dtype)",
           CHECKS_TESTS),
    Mutant("checks.int_arg.off_by_one", "nngraft/util/checks.py",
           "    if value < minimum:\n        raise argparse.ArgumentTypeError(f\"should be an integer >= {minimum}, got "
           "{value}{why.format(-value)}\")",
           "    if value < minimum - 1:\n        raise argparse.ArgumentTypeError(f\"should be an integer >= {minimum}, "
           "got {value}{why.format(-value)}\")", CHECKS_TESTS),
    Mutant("checks.positive_number_arg.accepts_zero", "nngraft/util/checks.py",
           "if not (value > 0 and math.isfinite(value)):", "if not (value >= 0 and math.isfinite(value)):",
           CHECKS_TESTS),
    Mutant("checks.non_negative_number_arg.accepts_inf", "nngraft/util/checks.py",
           "if not (value >= 0 and math.isfinite(value)):", "if not (value >= 0):", CHECKS_TESTS),
    Mutant("checks.flag.accepts_anything", "nngraft/util/checks.py",
           "    if not isinstance(value, bool):\n        raise fail(where, name, \"True or False\", value)",
           "    if False:\n        raise fail(where, name, \"True or False\", value)", CHECKS_TESTS),
    Mutant("checks.prompts.accepts_empty", "nngraft/util/checks.py",
           "        if not item:\n            raise fail(where, f\"prompts[{i}]\", \"a non-empty string\", item)",
           "        if False:\n            raise fail(where, f\"prompts[{i}]\", \"a non-empty string\", item)",
           CHECKS_TESTS),
    Mutant("checks.spans.fewer_than_prompts", "nngraft/util/checks.py",
           "if len(value) != n_prompts:", "if len(value) > n_prompts:", CHECKS_TESTS),
    Mutant("checks.spans.accepts_empty_text", "nngraft/util/checks.py",
           "                if not text:\n", "                if False:\n", CHECKS_TESTS),
    Mutant("checks.environment.accepts_zero", "nngraft/util/checks.py",
           'if not (value > 0 and value != float("inf")):', 'if not (value >= 0 and value != float("inf")):',
           CHECKS_TESTS),
    # nngraft/spec/schema.py
    Mutant("schema.weights.two_selections", "nngraft/spec/schema.py",
           "if len(chosen) != 1:", "if len(chosen) > 1:", SCHEMA_TESTS),
    Mutant("schema.weights.per_layer_anywhere", "nngraft/spec/schema.py",
           'if self.per == "layer" and chosen != ["top_percent"]:', "if False:", SCHEMA_TESTS),
    Mutant("schema.layers.empty_list", "nngraft/spec/schema.py",
           "if isinstance(value, list) and not value:", "if False:", SCHEMA_TESTS),
    Mutant("schema.everything.layer_subset", "nngraft/spec/schema.py",
           'if "everything" in self.components and self.layers != "all":', "if False:", SCHEMA_TESTS),
    Mutant("schema.version.newer_accepted", "nngraft/spec/schema.py",
           "if int(value) > int(SCHEMA_VERSION):", "if int(value) > int(SCHEMA_VERSION) + 1:", SCHEMA_TESTS),
    Mutant("schema.version.not_a_number", "nngraft/spec/schema.py",
           "        if not value.isdigit():\n", "        if False:\n", SCHEMA_TESTS),
    Mutant("schema.version.layer_groups_stays_v1", "nngraft/spec/schema.py",
           "if version.isdigit() and int(version) < 2:", "if False:", SCHEMA_TESTS),
    # nngraft/cli/boundary.py
    Mutant("boundary.graft_error_is_a_bug", "nngraft/cli/boundary.py",
           "    if isinstance(error, GraftError):\n        return str(error)\n", "", BOUNDARY_TESTS),
    Mutant("boundary.no_space_unnamed", "nngraft/cli/boundary.py",
           "if error.errno in _NO_SPACE:", "if False:", BOUNDARY_TESTS),
    Mutant("boundary.denied_unnamed", "nngraft/cli/boundary.py",
           "if error.errno in _DENIED:", "if False:", BOUNDARY_TESTS),
    Mutant("boundary.missing_unnamed", "nngraft/cli/boundary.py",
           "if error.errno in _MISSING:", "if False:", BOUNDARY_TESTS),
    Mutant("boundary.unicode_is_a_bug", "nngraft/cli/boundary.py",
           "if isinstance(error, UnicodeError):", "if False:", BOUNDARY_TESTS),
    Mutant("boundary.memory_is_a_bug", "nngraft/cli/boundary.py",
           'if isinstance(error, MemoryError) or type(error).__name__ == "OutOfMemoryError":', "if False:",
           BOUNDARY_TESTS),
]


def check_applicable(mutants: list[Mutant] = MUTANTS) -> list[str]:
    """The mutants whose text no longer occurs exactly once (the code moved on): fix them."""
    bad = []
    for m in mutants:
        count = (ROOT / m.path).read_text().count(m.old)
        if count != 1:
            bad.append(f"{m.id}: {m.path} holds its text {count} times")
        bad += [f"{m.id}: no test file {t}" for t in m.tests if not (ROOT / t).is_file()]
    return bad


def _copy_tree(target: Path) -> None:
    ignore = shutil.ignore_patterns(".git", ".venv", ".ci-venv", "__pycache__", ".pytest_cache", "*.egg-info",
                                    "wheels", "results", "*.png", "*.ipynb")
    for name in ("nngraft", "tests", "recipes", "docs", "benchmarks"):
        shutil.copytree(ROOT / name, target / name, ignore=ignore)
    for name in ("conftest.py", "pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, target / name)


def run_mutant(m: Mutant, tree: Path) -> tuple[str, float, str]:
    """("killed" | "survived", seconds, the last line pytest printed)."""
    path = tree / m.path
    original = path.read_text()
    path.write_text(original.replace(m.old, m.new, 1))
    env = {**os.environ, "PYTHONPATH": str(tree), "NNGRAFT_TEST_THREADS": "1"}
    start = time.perf_counter()
    try:
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider",
                               "-m", "not slow", *m.tests], cwd=tree, env=env, capture_output=True, text=True)
    finally:
        path.write_text(original)
    last = (done.stdout.strip().splitlines() or ["(no output)"])[-1]
    return ("survived" if done.returncode == 0 else "killed"), time.perf_counter() - start, last


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--only", default="", help="run the mutants whose id starts with this")
    p.add_argument("--list", action="store_true", help="list the mutants; run nothing")
    args = p.parse_args(argv)
    chosen = [m for m in MUTANTS if m.id.startswith(args.only)]
    bad = check_applicable(chosen)
    if bad:
        print("mutants that no longer apply:\n" + "\n".join(bad), file=sys.stderr)
        return 2
    if args.list:
        for m in chosen:
            print(f"{m.id}: {m.path}: {m.old.strip()!r} -> {m.new.strip()!r}")
        return 0
    survived = []
    with tempfile.TemporaryDirectory(prefix="nngraft-mutants-") as tmp:
        tree = Path(tmp)
        _copy_tree(tree)
        for i, m in enumerate(chosen, 1):
            verdict, seconds, last = run_mutant(m, tree)
            print(f"[{i}/{len(chosen)}] {verdict:8} {m.id} ({seconds:.0f} s: {last})", flush=True)
            if verdict == "survived":
                survived.append(m.id)
    print(f"{len(chosen) - len(survived)} of {len(chosen)} mutants killed; survived: {', '.join(survived) or 'none'}")
    return 1 if survived else 0


if __name__ == "__main__":
    raise SystemExit(main())
