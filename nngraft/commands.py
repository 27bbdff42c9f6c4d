"""The command line's registry and its two consoles, below every module that defines a verb.

A verb module (:mod:`nngraft.core_commands`, :mod:`nngraft.remote_commands`, the study's
``*_commands`` modules, the demo) registers each subcommand here with :func:`command` and prints
with :data:`console` (logs, progress, errors: stderr) and :data:`out` (results: stdout).
:mod:`nngraft.cli`, the top of the tree, imports the verb modules and dispatches.

Example:
    >>> import argparse
    >>> @command("hello", lambda p: p.add_argument("--name", default="you"))
    ... def _cmd_hello(args: argparse.Namespace) -> int:
    ...     '''Say hello.'''
    ...     return 0
    >>> COMMANDS["hello"][0] is _cmd_hello
    True
    >>> del COMMANDS["hello"]
"""

from __future__ import annotations

import argparse
from typing import Callable

from rich.console import Console

# No automatic highlighting: it colours numbers and quotes in user text, and its regexes take
# minutes on a message that quotes a very long value from a bad file.
console = Console(stderr=True, soft_wrap=True, highlight=False)
out = Console(soft_wrap=True, highlight=False)

Handler = Callable[[argparse.Namespace], int]
Configure = Callable[[argparse.ArgumentParser], None]

COMMANDS: dict[str, tuple[Handler, Configure]] = {}
"""Subcommand name → (handler, the function that adds its arguments), in registration order."""


def command(name: str, configure: Configure) -> Callable[[Handler], Handler]:
    """Register ``fn`` as subcommand ``name`` (``configure`` adds its arguments)."""

    def wrap(fn: Handler) -> Handler:
        COMMANDS[name] = (fn, configure)
        return fn

    return wrap


def alert(message: str) -> None:
    """Print ``message`` on stderr even under ``--quiet`` (errors, usage errors, how to resume)."""
    quiet, console.quiet = console.quiet, False
    try:
        console.print(message, highlight=False)
    finally:
        console.quiet = quiet
