"""The core's subcommands: ``nngraft schema``, ``validate`` and ``models``.

Registered with :func:`nngraft.cli.registry.command` when :mod:`nngraft.cli` imports this module.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..util.checks import positive_int_arg
from .registry import alert, command, console, out


def _cmd_schema(args: argparse.Namespace) -> int:
    """Print the JSON Schema of graft specs."""
    from ..spec import spec_json_schema

    text = json.dumps(spec_json_schema(), indent=2)
    if args.output:
        from ..util.io import atomic_write_text, refuse_foreign_file

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
    from ..errors import GraftError
    from ..spec import GraftSpec

    failed = 0
    for path in args.specs:
        try:
            spec = GraftSpec.load(path)
            if args.model_type:
                from ..arch import adapter_for_model_type
                from ..compile.plan import rule_targets

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
    from ..donors.loading import cache_dir, cached_models

    found = cached_models()
    if args.json:
        print(json.dumps([{"name": m.name, "kind": m.kind, "path": str(m.path), "size_bytes": m.size_bytes}
                          for m in found], indent=2))
        return 0
    if not found:
        console.print(f"no models cached yet (nngraft cache: {cache_dir()}; 'smollm2' is converted there on "
                      "first use)")
        return 0
    if not out.is_terminal:  # a pipe or a file: whole names, one model a line, never cut to a width
        for m in found:
            print(f"{m.name}\t{m.kind}\t{m.size_bytes / 2**20:,.0f} MiB\t{m.path}")
        return 0
    from rich.table import Table

    table = Table("name (give as --model/--donor)", "kind", "size", "path", title="cached models",
                  title_justify="left")
    table.columns[0].overflow = table.columns[3].overflow = "fold"  # wrapped, never "…"
    for m in found:
        table.add_row(m.name, m.kind, f"{m.size_bytes / 2**20:,.0f} MiB", str(m.path))
    out.print(table)
    console.print(f"[dim]nngraft cache: {cache_dir()} ($NNGRAFT_CACHE); hub ids are used from the Hugging Face "
                  "cache without the network[/dim]")
    return 0


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
