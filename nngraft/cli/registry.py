"""The command line's registry and its two consoles, below every module that defines a verb.

A verb module (:mod:`nngraft.cli.core`, :mod:`nngraft.cli.remote`, the study's
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
import functools
import os
import sys
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


def command(name: str, configure: Configure, *, runs_models: bool = False) -> Callable[[Handler], Handler]:
    """Register ``fn`` as subcommand ``name`` (``configure`` adds its arguments).

    ``runs_models``: the command runs models on its ``--device`` (a command without one, such as
    ``sweep``, whose config chooses, counts as ``auto``). When that is ``auto`` or ``cpu``, the
    handler first restarts the process with :func:`passive_omp_reexec`, before anything else.
    """

    def wrap(fn: Handler) -> Handler:
        handler = fn
        if runs_models:

            @functools.wraps(fn)
            def handler(args: argparse.Namespace) -> int:
                if getattr(args, "device", "auto") in ("auto", "cpu"):
                    passive_omp_reexec(name)
                return fn(args)

        COMMANDS[name] = (handler, configure)
        return handler

    return wrap


def alert(message: str) -> None:
    """Print ``message`` on stderr even under ``--quiet`` (errors, usage errors, how to resume)."""
    quiet, console.quiet = console.quiet, False
    try:
        console.print(message, highlight=False)
    finally:
        console.quiet = quiet


def passive_omp_reexec(command_name: str) -> None:
    """Restart this ``nngraft COMMAND`` process with ``OMP_WAIT_POLICY=PASSIVE`` unless the variable
    is already set (any value, e.g. ``ACTIVE``, opts out). Called first by the commands that run
    models on the CPU (``run``, ``sweep``, ``localize``, ``finetune``, ``demo``, ``reproduce``: the
    ones registered with ``command(..., runs_models=True)``; ``attribute`` calls it itself, after
    checking its arguments).

    PyTorch's OpenMP threads spin while they wait for each other. When other processes compete for
    the cores, every operator then waits for descheduled spinning threads: on a shared 2-core box a
    SmolLM2 forward took 5–19 s instead of 0.3 s, a training step 18 s instead of 1.5 s, and
    ``nngraft localize`` on five facts 318 s instead of 64 s (the same steps and result). The
    variable is read when torch loads, so it cannot be set from inside this process. Only done when
    the process was started as ``nngraft [--debug] COMMAND …`` (not when called from Python).
    """
    if os.environ.get("OMP_WAIT_POLICY") is not None:
        return
    if sys.argv[1:2] != [command_name] and sys.argv[1:3] != ["--debug", command_name]:
        return
    env = dict(os.environ, OMP_WAIT_POLICY="PASSIVE")
    code = "import sys; from nngraft.cli import main; sys.exit(main())"
    os.execve(sys.executable, [sys.executable, "-c", code, *sys.argv[1:]], env)
