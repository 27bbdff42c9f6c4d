"""The ``nngraft`` command line, the top of the package: it imports the verb modules and dispatches.

Each subcommand is registered with :func:`nngraft.cli.registry.command` by a verb module —
:mod:`nngraft.cli.core` (schema, validate, models), :mod:`nngraft.cli.remote`
(payload), the study's ``*_commands`` modules and the demo — which :func:`build_parser` imports.
Exit codes: 0 ok, 1 a check that failed (a baseline check, the identity guard), 2 a user error — bad usage, a bad file
or value, a model that cannot be loaded, a full disk, no permission — with one message and no
traceback (:mod:`nngraft.cli.boundary`; ``--debug`` shows it), 130 interrupted. Any other exception is
a bug and shows its traceback.
"""

from __future__ import annotations

import argparse
import shlex
import sys
from typing import Sequence

from .registry import COMMANDS, alert, console

VERB_MODULES = ("nngraft.cli.core", "nngraft.study.commands", "nngraft.study.demo", "nngraft.cli.remote")
"""The modules that register subcommands, in the order ``nngraft --help`` lists them."""


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The whole command line; with ``only``, the options of that one verb alone (``""``: of none;
    every verb is still listed, with its one-line help): what :func:`main` parses, so that a
    command reads no other verb's module."""
    _load_plugins()
    parser = argparse.ArgumentParser(
        prog="nngraft",
        description="Dynamic weight grafting: run a pretrained model with a finetuned model's weights "
        "at chosen components, layers and token positions.",
    )
    parser.add_argument("--debug", action="store_true",
                        help="show the full traceback of every error (user errors show one message)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (fn, configure) in COMMANDS.items():
        p = sub.add_parser(name, help=(fn.__doc__ or "").strip().splitlines()[0], description=fn.__doc__)
        p.set_defaults(func=fn)
        if only is not None and name != only:
            continue
        configure(p)
        if not any("--quiet" in a.option_strings for a in p._actions):
            p.add_argument("-q", "--quiet", action="store_true",
                           help="no logs or progress on stderr (results on stdout and errors still print)")
    return parser


def _load_plugins() -> None:
    """Import the modules that register the subcommands (:data:`VERB_MODULES`); a study that is
    not installed only leaves its verbs out."""
    import importlib

    for module in VERB_MODULES:
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module and not module.startswith(str(error.name)):
                raise


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``nngraft`` command line; returns the exit code (see the module docstring)."""
    from .boundary import user_error_message

    argv = list(sys.argv[1:] if argv is None else argv)
    _load_plugins()
    verb = next((a for a in argv if not a.startswith("-")), None)  # (--debug is the only option before it)
    args = build_parser(only=verb if verb in COMMANDS else "").parse_args(argv)  # "": no verb's options
    args.command_line = "nngraft " + shlex.join(argv)  # what to rerun (e.g. to resume after Ctrl-C)
    quiet = console.quiet
    console.quiet = bool(getattr(args, "quiet", False))
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        alert("[yellow]interrupted[/yellow]")
        return 130
    except Exception as error:  # noqa: BLE001 - the boundary: user errors get a message, bugs a traceback
        message = user_error_message(error)
        if message is None:
            raise
        if args.debug:
            console.print_exception()
        from rich.markup import escape

        alert(f"[red]error:[/red] {escape(message)}")
        from ..errors import IdentityCheckError

        return 1 if isinstance(error, IdentityCheckError) else 2
    finally:
        console.quiet = quiet


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
