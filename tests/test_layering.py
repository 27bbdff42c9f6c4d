"""The package's layers: the core never needs the study, no module imports another's private
names, and the import graph has no cycle.

The core is every module outside ``nngraft.study``: the packages ``spec``, ``arch``, ``compile``,
``donors``, ``backends``, ``util``, the public surface at the root (grafter, result, errors, …) and
the core's CLI verbs. The study (datasets, finetuning, sweeps, the demo, model conversion) builds on
it and may import it freely; ``nngraft.cli`` sits on top of both.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import nngraft

PACKAGE = Path(nngraft.__file__).parent
ROOT = PACKAGE.parent


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}
CORE = sorted(m for m in MODULES if not (m == "nngraft.study" or m.startswith("nngraft.study."))
              and m != "nngraft.cli.__main__")  # (running that one runs the command line)


def _resolve(importer: str, node: ast.ImportFrom) -> str:
    """The absolute module a ``from ... import`` names (relative levels resolved)."""
    if not node.level:
        return node.module or ""
    package = importer if MODULES[importer].name == "__init__.py" else importer.rpartition(".")[0]
    for _ in range(node.level - 1):
        package = package.rpartition(".")[0]
    return f"{package}.{node.module}" if node.module else package


def imports_of(name: str) -> list[tuple[str, str | None, int]]:
    """(module imported, name imported from it or None, line) for every import in ``name``'s
    source, at any depth (imports inside functions count: they run too)."""
    found = []
    for node in ast.walk(ast.parse(MODULES[name].read_text())):
        if isinstance(node, ast.Import):
            found += [(alias.name, None, node.lineno) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = _resolve(name, node)
            for alias in node.names:
                sub = f"{base}.{alias.name}"
                found.append((sub, None, node.lineno) if sub in MODULES else (base, alias.name, node.lineno))
    return found


def import_graph() -> dict[str, set[str]]:
    """nngraft module → the nngraft modules it imports (a parent package imported only because a
    submodule is, e.g. ``nngraft.backends`` for ``nngraft.backends.local``, is not an edge)."""
    return {name: {m for m, _, _ in imports_of(name) if m in MODULES and m != name} for name in MODULES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first == last), or None."""
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)):
            return cycle
    return None


def test_the_checks_see_a_cycle_and_a_private_import():
    """The helpers below would catch what they are meant to (checked on a made-up graph)."""
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None
    # the real graph has the edges we know are there (the helpers read this tree at all)
    graph = import_graph()
    assert "nngraft.compile.plan" in graph["nngraft.grafter"]
    assert "nngraft.backends.local" in graph["nngraft.grafter"]
    assert "nngraft.backends.functional" in graph["nngraft.backends.payload"]
    assert ("nngraft.spec", "GraftSpec") in {(m, n) for m, n, _ in imports_of("nngraft.grafter")}


def test_no_import_cycle():
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " → ".join(cycle or [])


def test_no_module_imports_another_modules_private_names():
    bad = [f"{name}:{line} imports {what} from {module}"
           for name in MODULES for module, what, line in imports_of(name)
           if module in MODULES and module != name and what and what.startswith("_") and not what.startswith("__")]
    assert bad == []


def test_every_import_of_nngraft_names_a_module_that_exists():
    """Function-level imports run late: a moved module must not leave one behind."""
    bad = [f"{name}:{line} imports {module}" for name in MODULES for module, _, line in imports_of(name)
           if module.split(".")[0] == "nngraft" and module not in MODULES]
    assert bad == []


def test_the_core_does_not_import_the_study():
    bad = [f"{name}:{line} imports {module}" for name in CORE for module, _, line in imports_of(name)
           if module == "nngraft.study" or module.startswith("nngraft.study.")]
    assert bad == []


def test_the_library_does_not_use_the_test_helpers():
    """``nngraft.testing`` (tiny random models) is for the test suite, examples, the study's
    ``--tiny`` runs and the command line; the library below them never imports it."""
    bad = [f"{name}:{line}" for name in CORE if not name.startswith("nngraft.cli")
           for module, _, line in imports_of(name) if module == "nngraft.testing"]
    assert bad == []


def test_the_root_holds_the_public_surface_only():
    """Everything else lives in a package that names its step of the pipeline."""
    root = {m for m in MODULES if m.count(".") == 1 and not (PACKAGE / m.split(".")[1]).is_dir()}
    assert root == {"nngraft.errors", "nngraft.grafter", "nngraft.result", "nngraft.testing",
                    "nngraft.deprecated"}


BLOCKED_RUN = r"""
import importlib, sys

class BlockStudy:
    def find_spec(self, name, path=None, target=None):
        if name == "nngraft.study" or name.startswith("nngraft.study."):
            raise ModuleNotFoundError(f"blocked: {name}", name=name)
        return None

sys.meta_path.insert(0, BlockStudy())
for name in sys.argv[1:]:
    importlib.import_module(name)

from nngraft import GraftRule, GraftSpec, Grafter, Last
from nngraft.testing import tiny_pair

P, F, tok = tiny_pair("llama")
spec = GraftSpec(name="lt", rules=[GraftRule(components=["mlp"], positions=[Last()])])
local = Grafter(P, F, tok).run(spec, ["a b c", "d e"]).logits
remote = Grafter.remote(P, F, tok, execution="local", verbose=False).run(spec, ["a b c", "d e"]).logits
assert (local - remote).abs().max() < 1e-5, (local - remote).abs().max()
assert not any(m == "nngraft.study" or m.startswith("nngraft.study.") for m in sys.modules)
print("core ok", len(sys.argv) - 1)
"""


def test_the_core_imports_and_runs_with_the_study_blocked():
    """Every core module imports, and a local and a (local-server) remote graft run, in a fresh
    interpreter where importing ``nngraft.study`` fails."""
    done = subprocess.run([sys.executable, "-c", BLOCKED_RUN, *CORE], capture_output=True, text=True,
                          cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"core ok {len(CORE)}" in done.stdout


def test_the_blocker_blocks():
    """The subprocess above really refuses the study (so its passing means something)."""
    done = subprocess.run([sys.executable, "-c", BLOCKED_RUN, "nngraft.study.sweep"], capture_output=True,
                          text=True, cwd=ROOT, timeout=600)
    assert done.returncode != 0 and "blocked: nngraft.study" in done.stderr


def in_package(*packages: str) -> set[str]:
    """The modules of these packages (each package's ``__init__`` included)."""
    return {m for m in MODULES for p in packages if m == p or m.startswith(p + ".")}


LAYERS = [
    ("util/errors: errors, result, testing, old-path aliases, util, the CLI's registry and error boundary",
     {"nngraft.errors", "nngraft.result", "nngraft.testing", "nngraft.deprecated", "nngraft.cli.registry",
      "nngraft.cli.boundary"} | in_package("nngraft.util")),
    ("spec", in_package("nngraft.spec")),
    ("arch", in_package("nngraft.arch")),
    ("compile", in_package("nngraft.compile")),
    ("donors", in_package("nngraft.donors")),
    ("backends", in_package("nngraft.backends")),
    ("grafter, package, attribution", {"nngraft.grafter", "nngraft"} | in_package("nngraft.attribution")),
    ("the core's CLI verbs", {"nngraft.cli.core", "nngraft.cli.remote"}),
    ("study", in_package("nngraft.study")),
    ("cli", {"nngraft.cli", "nngraft.cli.__main__"}),
]


def test_the_tree_reads_spec_compile_donors_backends_grafter_study_cli():
    """Every module sits in one layer, and imports only from its own layer or those below:
    util/errors → spec → arch → compile → donors → backends → grafter → the core's CLI verbs →
    study → cli. Verb modules register with the registry at the bottom (nngraft.cli.registry);
    nngraft.cli, on top, imports them and dispatches."""
    rank: dict[str, int] = {}
    for i, (_, members) in enumerate(LAYERS):
        for m in members:
            rank.setdefault(m, i)
    assert set(rank) == set(MODULES), f"modules without a layer: {sorted(set(MODULES) - set(rank))}"
    upward = [f"{name} ({LAYERS[rank[name]][0]}) imports {module} ({LAYERS[rank[module]][0]})"
              for name in MODULES for module, _, _ in imports_of(name)
              if module in rank and rank[module] > rank[name]]
    assert upward == []


def test_the_cli_is_the_top_layer():
    """Nothing in the package imports nngraft.cli (the verbs register with nngraft.cli.registry), and
    nngraft.cli's --help lists the verbs of every layer."""
    importers = [name for name in MODULES for module, _, _ in imports_of(name)
                 if module == "nngraft.cli" and name != "nngraft.cli.__main__"]
    assert importers == []
    from nngraft.cli import build_parser

    verbs = set(build_parser()._subparsers._group_actions[0].choices)
    assert {"schema", "validate", "models", "payload", "run", "sweep", "data", "localize", "demo"} <= verbs


def test_no_test_module_imports_another_test_module():
    """Tests mirror the package; what several test modules share lives in tests/helpers/ (or a
    conftest.py), never in a test module another one imports."""
    tests = ROOT / "tests"
    bad = []
    for path in sorted(tests.rglob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [node.module or ""] + [f"{node.module or ''}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            else:
                continue
            if any(part.startswith("test_") for name in names for part in name.split(".")):
                bad.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    assert bad == []


MAX_MODULE_LINES = 500
"""No module of the package is longer than this: a longer one does several jobs and is split by
job (old import paths keep working: a re-export, or :mod:`nngraft.deprecated` for a moved name)."""


def long_modules(limit: int = MAX_MODULE_LINES) -> list[str]:
    """``"path: N lines"`` for every module under nngraft/ longer than ``limit`` lines."""
    lengths = {path: len(path.read_text(encoding="utf-8").splitlines()) for path in MODULES.values()}
    return [f"{path.relative_to(ROOT)}: {n} lines" for path, n in sorted(lengths.items()) if n > limit]


def test_no_module_is_longer_than_500_lines():
    too_long = long_modules()
    assert too_long == [], (f"modules over {MAX_MODULE_LINES} lines (split each by job): " + "; ".join(too_long))


def test_the_length_check_counts_lines():
    """The check above sees a long module (so its passing means something): at a limit below the
    longest module, that module is reported with its length."""
    longest = max(MODULES.values(), key=lambda p: len(p.read_text(encoding="utf-8").splitlines()))
    n = len(longest.read_text(encoding="utf-8").splitlines())
    reported = long_modules(n - 1)
    assert f"{longest.relative_to(ROOT)}: {n} lines" in reported
    assert all(line.endswith(f": {n} lines") for line in reported)  # (another module may be as long)
    assert long_modules(n) == []


CROSS_CUTTING_TESTS = {
    # suites about the whole package, not one module
    "tests/test_boundaries.py": "inputs that once gave a silent wrong result, through every package",
    "tests/test_docs.py": "the documentation: citations, links, commands run as written",
    "tests/test_docs_commands.py": "every command shown in README and docs/ is run, run elsewhere or exempted",
    "tests/test_doors.py": "one concept checked the same way through every door (CLI, Python, pydantic)",
    "tests/test_exactness.py": "one pass equals the per-token reference on every architecture (the design's proof)",
    "tests/test_exactness_property.py": "the same, for random specs, with the answer built by hand",
    "tests/test_layering.py": "the package's layers, import graph and module sizes; this list",
    "tests/test_nnsight_docs.py": "docs/nnsight.md runs as written",
    "tests/test_notebooks.py": "the notebooks in docs/ are committed executed and run in a Jupyter kernel",
    "tests/test_safety.py": "the whole package scanned: no unpickling, no evaluation, no leaked key",
    # scripts outside the package
    "tests/test_benchmarks_smoke.py": "the benchmarks/ scripts run and agree",
    "tests/test_gpu_check.py": "benchmarks/gpu_check.sh's dry run",
    "tests/test_gpu_memory.py": "benchmarks/gpu_memory.py's byte counts",
    "tests/test_logit_lens.py": "recipes/logit_lens.py",
    # one package's concern spread over its modules
    "tests/backends/test_devices.py": "device placement of everything the backends make, reuse or ship",
    "tests/backends/test_sandbox.py": "NDIF's sandboxed path: the request in a fresh process (functional, payload, transport)",
    "tests/cli/test_fuzz.py": "every command fed bad files ends in success or a clean user error",
    "tests/cli/test_help.py": "every option of every command has help text",
    "tests/cli/test_streams.py": "stdout / stderr and --quiet of every command",
    "tests/study/test_interrupt.py": "a killed sweep loses nothing (real subprocesses)",
    "tests/study/test_own_facts.py": "a researcher's own study end to end from the command line",
}
"""Test files not named after one module, each with the reason (tests/README.md states the rule)."""


def test_every_test_file_is_named_after_its_module_or_listed():
    """Tests mirror the package: ``tests/<package>/test_<module>.py`` tests ``nngraft/<package>/<module>.py``
    and ``tests/test_<module>.py`` a module at the root; a cross-cutting suite is listed above."""
    tests = ROOT / "tests"
    unnamed = []
    for path in sorted(tests.rglob("test_*.py")):
        rel = path.relative_to(ROOT)
        module = path.stem[len("test_"):]
        folder = path.parent.relative_to(tests)
        target = PACKAGE.joinpath(*folder.parts, f"{module}.py")
        if not target.is_file() and str(rel) not in CROSS_CUTTING_TESTS:
            unnamed.append(str(rel))
    assert unnamed == [], ("test files named after no module (move each to tests/<package>/test_<module>.py, or "
                           "list it in CROSS_CUTTING_TESTS with the reason): " + ", ".join(unnamed))
    stale = [name for name in CROSS_CUTTING_TESTS if not (ROOT / name).is_file()]
    assert stale == [], f"listed test files that do not exist: {stale}"
