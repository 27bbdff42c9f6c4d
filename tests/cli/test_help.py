"""Command-line hygiene: every option of every command has help text, and help names real flags."""

from __future__ import annotations

import argparse
import re

import pytest

from nngraft.cli import build_parser
from tests.helpers import ROOT


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    found = {}

    def walk(prefix: str, p: argparse.ArgumentParser) -> None:
        found[prefix] = p
        for action in p._actions:
            if isinstance(action, argparse._SubParsersAction):
                for name, child in action.choices.items():
                    walk(f"{prefix} {name}", child)

    for name, p in sub.choices.items():
        walk(name, p)
    return found


COMMANDS = _commands()


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_every_option_has_help_text(name):
    missing = [a.option_strings[0] if a.option_strings else a.dest for a in COMMANDS[name]._actions
               if not isinstance(a, (argparse._HelpAction, argparse._SubParsersAction))
               and not (a.help and a.help.strip())]
    assert missing == [], f"nngraft {name}: options without help text: {missing}"


@pytest.mark.parametrize("name", sorted(COMMANDS))
def test_help_names_only_flags_the_command_has(name):
    """A flag written in a command's description, help texts or epilog exists (in that command,
    or — for examples of other commands — in the command named on the same line)."""
    p = COMMANDS[name]
    own = {s for a in p._actions for s in a.option_strings}
    texts = [p.description or "", p.epilog or ""] + [a.help or "" for a in p._actions]
    for text in texts:
        for line in text.splitlines():
            allowed = set(own)
            for other in re.findall(r"nngraft (\w+)", line):  # examples of other commands on the same line
                if other in COMMANDS:
                    allowed |= {s for a in COMMANDS[other]._actions for s in a.option_strings}
            for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", line):
                assert flag in allowed, f"nngraft {name} help mentions {flag}, which it does not have: {line!r}"


def test_help_imports_no_heavy_package():
    """`nngraft --help` stays fast because torch, transformers, nnsight, matplotlib and pydantic are
    imported only by the commands that use them (timed in benchmarks/cli_startup.py, not here)."""
    import subprocess
    import sys
    from pathlib import Path

    from benchmarks.cli_startup import HEAVY, PROBE

    root = ROOT
    probe = subprocess.run([sys.executable, "-c", PROBE], cwd=root, capture_output=True, text=True, check=True,
                           env={"PYTHONPATH": str(root), "PATH": ""})
    assert "usage: nngraft" in probe.stdout
    assert probe.stderr.strip().endswith("HEAVY="), f"--help imported: {probe.stderr.strip()} (of {HEAVY})"


def test_a_command_configures_only_its_own_options(monkeypatch, capsys):
    """``nngraft VERB`` builds the options of VERB alone (every verb still listed with its help):
    running one command reads no other verb's module. The full parser still configures them all."""
    from nngraft.cli import main
    from nngraft.cli.registry import COMMANDS

    build_parser()  # every verb registered
    configured = []

    def spy(name, configure):
        def wrapped(p):
            configured.append(name)
            configure(p)
        return wrapped

    for name, (fn, configure) in list(COMMANDS.items()):
        monkeypatch.setitem(COMMANDS, name, (fn, spy(name, configure)))
    assert main(["schema"]) == 0 and '"$defs"' in capsys.readouterr().out
    assert configured == ["schema"]
    assert main(["--debug", "validate", str(ROOT / "recipes" / "specs" / "fe_lt.json")]) == 0
    assert configured == ["schema", "validate"]
    with pytest.raises(SystemExit):
        main(["--help"])
    assert "  run " in capsys.readouterr().out and configured == ["schema", "validate"]
    with pytest.raises(SystemExit):
        main(["runn"])
    assert "invalid choice: 'runn'" in capsys.readouterr().err and configured == ["schema", "validate"]
    configured.clear()
    build_parser()
    assert configured == list(COMMANDS)
