"""The ``nngraft`` command line. Thin: parse, call the library, print with rich.

Each subcommand is a ``_cmd_*`` function registered in :func:`build_parser`. Exit codes: 0 ok,
1 a check that failed (a baseline check), 2 a user error — bad usage, a bad file or value, a
model that cannot be loaded, a full disk, no permission — with one message and no traceback
(:mod:`nngraft.boundary`; ``--debug`` shows it), 130 interrupted. Any other exception is a bug
and shows its traceback.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path
from typing import Callable, Sequence

from rich.console import Console

from .checks import positive_int_arg

# No automatic highlighting: it colours numbers and quotes in user text, and its regexes take
# minutes on a message that quotes a very long value from a bad file.
console = Console(stderr=True, soft_wrap=True, highlight=False)
out = Console(soft_wrap=True, highlight=False)


def alert(message: str) -> None:
    """Print ``message`` on stderr even under ``--quiet`` (errors, usage errors, how to resume)."""
    quiet, console.quiet = console.quiet, False
    try:
        console.print(message, highlight=False)
    finally:
        console.quiet = quiet


def _cmd_schema(args: argparse.Namespace) -> int:
    """Print the JSON Schema of graft specs."""
    from .spec import spec_json_schema

    text = json.dumps(spec_json_schema(), indent=2)
    if args.output:
        from .io import atomic_write_text, refuse_foreign_file

        title = spec_json_schema().get("title")
        refuse_foreign_file(args.output, lambda old: json.loads(old).get("title") == title, command="schema",
                            flag="-o")
        atomic_write_text(Path(args.output), text + "\n")
        console.print(f"wrote {args.output}")
    else:
        print(text)
    return 0


def _cmd_validate(args: argparse.Namespace) -> int:
    """Validate spec files; with --model-type, also check they fit that architecture."""
    from .errors import GraftError
    from .spec import GraftSpec

    failed = 0
    for path in args.specs:
        try:
            spec = GraftSpec.load(path)
            if args.model_type:
                from .arch import adapter_for_model_type
                from .plan import rule_targets

                rule_targets(spec, adapter_for_model_type(args.model_type), args.layers)
        except GraftError as error:
            failed += 1
            from rich.markup import escape

            alert(f"[red]✗[/red] {escape(str(path))}\n{escape(str(error))}")
            continue
        out.print(f"[green]✓[/green] {path}: {spec.name!r}, {len(spec.rules)} rule(s), "
                  f"schema v{spec.schema_version}")
    return 2 if failed else 0


def _cmd_models(args: argparse.Namespace) -> int:
    """List the models cached on this machine (conversions, finetunes, Hugging Face hub cache)."""
    from .loading import cache_dir, cached_models

    found = cached_models()
    if args.json:
        print(json.dumps([{"name": m.name, "kind": m.kind, "path": str(m.path), "size_bytes": m.size_bytes}
                          for m in found], indent=2))
        return 0
    if not found:
        console.print(f"no models cached yet (nngraft cache: {cache_dir()}; 'smollm2' is converted there on "
                      "first use)")
        return 0
    from rich.table import Table

    table = Table("name (give as --model/--donor)", "kind", "size", "path", title="cached models",
                  title_justify="left")
    for m in found:
        table.add_row(m.name, m.kind, f"{m.size_bytes / 2**20:,.0f} MiB", str(m.path))
    out.print(table)
    console.print(f"[dim]nngraft cache: {cache_dir()} ($NNGRAFT_CACHE); hub ids are used from the Hugging Face "
                  "cache without the network[/dim]")
    return 0


COMMANDS: dict[str, tuple[Callable[[argparse.Namespace], int], Callable[[argparse.ArgumentParser], None]]] = {}


def command(name: str, configure: Callable[[argparse.ArgumentParser], None]):
    """Register ``fn`` as subcommand ``name`` (``configure`` adds its arguments)."""

    def wrap(fn: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
        COMMANDS[name] = (fn, configure)
        return fn

    return wrap


def _schema_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", help="write to this file instead of stdout")


def _validate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("specs", nargs="+", help="spec JSON files")
    p.add_argument("--model-type", help="also check components exist for this HF model_type (e.g. gpt2)")
    p.add_argument("--layers", type=positive_int_arg, default=32, help="layer count to check layer groups against")


def _models_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--json", action="store_true", help="print a JSON list (name, kind, path, size_bytes)")


command("schema", _schema_args)(_cmd_schema)
command("validate", _validate_args)(_cmd_validate)
command("models", _models_args)(_cmd_models)


def build_parser() -> argparse.ArgumentParser:
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
        configure(p)
        if not any("--quiet" in a.option_strings for a in p._actions):
            p.add_argument("-q", "--quiet", action="store_true",
                           help="no logs or progress on stderr (results on stdout and errors still print)")
        p.set_defaults(func=fn)
    return parser


def _load_plugins() -> None:
    """Import the modules that register more subcommands (study, demo, remote…)."""
    import importlib

    for module in ("nngraft.study.commands", "nngraft.study.demo", "nngraft.remote_commands"):
        try:
            importlib.import_module(module)
        except ModuleNotFoundError as error:
            if error.name != module and not module.startswith(str(error.name)):
                raise


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``nngraft`` command line; returns the exit code (see the module docstring)."""
    from .boundary import user_error_message

    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(argv)
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
        return 2
    finally:
        console.quiet = quiet


if __name__ == "__main__":  # pragma: no cover
    # Run as `python -m nngraft.cli`, this file is `__main__`; plugins register their commands in
    # the importable `nngraft.cli` module, so dispatch through that one.
    from nngraft.cli import main as _main

    sys.exit(_main())
