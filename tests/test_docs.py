"""The documentation stands alone: it cites no file users do not have, and its links resolve."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from tests.helpers import ROOT

TEXT_FILES = sorted(
    [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *(ROOT / "recipes").rglob("*.py"),
     *(ROOT / "nngraft").rglob("*.py"), *(ROOT / "benchmarks").glob("*.md")]
)
# What users do not have: the internal paper summary and its section signs, the shared workspace.
FORBIDDEN = re.compile(r"spec\.md|§|/work/|\.\./shared|seed-abstract")


@pytest.mark.parametrize("path", TEXT_FILES, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_reference_to_files_users_do_not_have(path):
    hits = [f"{i}: {line.strip()}" for i, line in enumerate(path.read_text().splitlines(), 1)
            if FORBIDDEN.search(line)]
    assert hits == [], f"{path.relative_to(ROOT)} cites files users do not have:\n" + "\n".join(hits)


def _anchors(markdown: str) -> set[str]:
    """GitHub's heading slugs: lower case, punctuation dropped, spaces to hyphens."""
    slugs = set()
    for heading in re.findall(r"^#+\s+(.*)$", markdown, flags=re.M):
        slug = re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")
        slugs.add(slug)
    return slugs


MARKDOWN = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


@pytest.mark.parametrize("path", MARKDOWN, ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(path):
    text = path.read_text()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+:", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(f"{target}: no such file")
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {linked.name}")
    assert broken == [], f"{path.relative_to(ROOT)}:\n" + "\n".join(broken)


def test_paper_page_cites_the_paper_and_its_code():
    text = (ROOT / "docs" / "paper.md").read_text()
    assert "Dynamic Weight Grafting: Localizing" in text and "ICLR 2026" in text
    assert "https://github.com/toddnief/dyamic-weight-grafting" in text


def _python_blocks(markdown: str) -> list[str]:
    return re.findall(r"```python\n(.*?)```", markdown, flags=re.S)


def test_readme_python_runs_as_written(tmp_path, capsys, monkeypatch):
    """The README's Python blocks, run as they are: the first from the repository root (it loads
    recipes/specs/), the second where `nngraft run … -o runs/try` has written its results."""
    from nngraft.cli import main

    first, second = _python_blocks((ROOT / "README.md").read_text())
    monkeypatch.chdir(ROOT)
    exec(compile(first, "README.md (first Python block)", "exec"), {})
    printed = capsys.readouterr()
    assert printed.out.startswith("GraftResult(logits=(2, ") and "specs=['fe_lt']" in printed.out
    assert "'fe_lt': [" in printed.out and "'lt': [" in printed.out
    assert printed.err.startswith("grafting: 4/4 rows (100%), elapsed ")  # run_grid(progress=True), off a terminal
    monkeypatch.chdir(tmp_path)
    assert main(["run", "--tiny", "llama", "--spec", str(ROOT / "recipes/specs/fe_lt.json"), "--dataset",
                 "fake_movies_fake_actors", "--n", "3", "--template", "sentence_1", "-o", "runs/try", "-q"]) == 0
    capsys.readouterr()
    scope: dict = {}
    exec(compile(second, "README.md (second Python block)", "exec"), scope)
    df = scope["df"]
    assert len(df) == 3 * 3 and {"prob", "recovery", "p_prob", "f_prob", "rank"} <= set(df.columns)
    assert "fe_lt" in capsys.readouterr().out


# Public names that cannot carry a docstring of their own, with where their use is shown instead
# (a ``>>>`` line naming them in that module's docstring) and why.
NO_DOCSTRING = {
    "ADAPTERS": ("nngraft.arch.adapters", "a dict (the adapter table): an instance, whose docstring is dict's"),
    "SCHEMA_VERSION": ("nngraft.spec.schema", "a str constant: an instance, whose docstring is str's"),
    "PositionSelector": ("nngraft.spec.positions", "a type alias (the union of Span, Last, Index, Other, All, "
                         "Not): its docstring is typing's"),
}


def names_without_example(namespace, names) -> list[str]:
    """The names whose object's *own* docstring has no ``>>>`` example. (``inspect.getdoc`` would
    also accept a docstring inherited from a base class, e.g. every error's from GraftError.)"""
    import inspect

    missing = []
    for name in names:
        obj = getattr(namespace, name)
        own = obj.__doc__ if (inspect.isclass(obj) or inspect.isroutine(obj)) else None
        if ">>>" not in (inspect.cleandoc(own) if own else ""):
            missing.append(name)
    return missing


def test_every_public_name_has_an_example_in_its_docstring():
    """The brief: the public API documented with one short example each (the examples run as
    doctests: pyproject's --doctest-modules)."""
    import nngraft

    missing = names_without_example(nngraft, [n for n in nngraft.__all__ if n not in NO_DOCSTRING])
    assert missing == [], f"public names without a >>> example in their own docstring: {missing}"


def test_the_names_without_a_docstring_are_shown_where_they_live():
    import importlib

    import nngraft

    for name, (module, _why) in NO_DOCSTRING.items():
        assert name in nngraft.__all__
        assert names_without_example(nngraft, [name]) == [name], f"{name} can carry an example itself"
        doc = importlib.import_module(module).__doc__ or ""
        shown = [line for line in doc.splitlines() if line.strip().startswith(">>>") and name in line]
        assert shown, f"{module}'s docstring shows no >>> line using {name}"


def test_the_example_check_sees_a_missing_or_inherited_example():
    """The check above fails where it should: no docstring, one without ``>>>``, one inherited."""
    from types import SimpleNamespace

    documented = type("Documented", (), {"__doc__": "A class.\n\nExample:\n    " + ">" * 3 + " 1 + 1\n    2\n"})
    namespace = SimpleNamespace(
        Documented=documented,
        Inherits=type("Inherits", (documented,), {}),
        Plain=type("Plain", (), {"__doc__": "A class with no example."}),
        f=lambda: None,
        CONSTANT="2",
    )
    assert names_without_example(namespace, ["Documented", "Inherits", "Plain", "f", "CONSTANT"]) == \
        ["Inherits", "Plain", "f", "CONSTANT"]
