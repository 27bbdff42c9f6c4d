"""The study's evaluation subcommands: ``nngraft run``, ``nngraft sweep`` and ``nngraft plot``.

Registered with :func:`nngraft.cli.registry.command` when :mod:`nngraft.study.commands` imports this
module. Exit codes (see :mod:`nngraft.cli`): 0 ok, 1 a failed baseline check, 2 a user error or bad
usage (one message, no traceback), 130 interrupted.
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path
from typing import Any, Sequence

from ..cli.registry import alert, command, console, out
from ..util.checks import positive_int_arg, seed_arg
# the results tables moved to .summary; importing them from here keeps working
from .summary import summary_json, summary_table, wide_console


# ---------------------------------------------------------------------------------------------
# run
# ---------------------------------------------------------------------------------------------


def add_model_data_args(p: argparse.ArgumentParser, *, named_donors: bool = False) -> None:
    """The model (--model/--donor or --tiny) and data (--data, or --facts/--dataset + --template)
    options shared by ``nngraft run`` and ``nngraft localize``; read back by :func:`pair_and_data`.
    ``named_donors``: ``--donor`` may be repeated as ``NAME=PATH`` for spec rules with
    ``"donor": NAME`` (``nngraft run``)."""
    who = p.add_argument_group("models (give --model and --donor, or --tiny)")
    who.add_argument("--model", help="recipient P: 'smollm2', a .gguf file, a local folder, a cached conversion "
                     "or a hub id (see nngraft models)")
    if named_donors:
        who.add_argument("--donor", action="append", default=[], metavar="F | NAME=PATH",
                         help="donor F: a local folder (a PEFT LoRA adapter folder is grafted as a LoraDonor), "
                              "a .safetensors file of P's architecture, a .gguf file or a hub id; repeat as NAME=PATH (e.g. hybrid=runs/hybrid) "
                              "for the donors that spec rules name with \"donor\": NAME")
    else:
        who.add_argument("--donor", help="donor F: a local folder (a PEFT LoRA adapter folder is grafted as a "
                         "LoraDonor), a .safetensors file of P's architecture, a .gguf file or a hub id")
    who.add_argument("--tiny", metavar="MODEL_TYPE", help="use nngraft.testing.tiny_pair(MODEL_TYPE) (CPU checks)")
    who.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16", "auto"],
                     help="dtype to load P and F in (default float32; auto: the checkpoint's own)")
    who.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    data = p.add_argument_group("data (give --data, or --facts/--dataset with --template)")
    data.add_argument("--data", metavar="EXAMPLES.jsonl", help="test examples: one {fact_id, template, "
                      "prompt, spans, answer} object per line")
    data.add_argument("--facts", metavar="FACTS.jsonl", help="facts to render through --template")
    data.add_argument("--dataset", help="a built-in dataset (e.g. fake_movies_real_actors), with --n")
    data.add_argument("--n", type=int, help="number of facts of --dataset")
    data.add_argument("--seed", type=seed_arg, default=0, help="seed of --dataset (default 0)")
    data.add_argument("--template", action="append", default=[], metavar="NAME | TEMPLATE | FILE",
                      help="test template: a name (sentence_1 … sentence_4, rmra), your own {field} string "
                      "ending where the answer begins (e.g. '{inventor} built the'), or a file of them (one per "
                      "line, or .json {name: template}); repeat for several")
    data.add_argument("--answer-field", default="second_actor",
                      help="fact field the prompts predict (default second_actor; e.g. device)")
    data.add_argument("--limit", type=int, help="use only the first N facts")


def _run_args(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = """examples:
  nngraft run --spec recipes/specs/fe_lt.json --model meta-llama/Llama-3.2-1B --donor runs/sft \\
              --facts runs/sft/facts.jsonl --template sentence_3
  nngraft run --spec recipes/specs/lt.json --tiny llama --data examples.jsonl -o runs/try
  nngraft run --spec hybrid_lt.json --model P --donor runs/sft --donor hybrid=runs/hybrid --data ex.jsonl
              (rules with "donor": "hybrid" graft from runs/hybrid, the others from runs/sft)
The P and F baselines (specs p and f) are always run too, for reference and recovery."""
    p.add_argument("--spec", action="append", default=[], metavar="SPEC.json",
                   help="graft spec file, or the name of a built-in one (fe_lt, lt, fe, …: the files of "
                        "recipes/specs/); repeat for several")
    p.add_argument("--grid", action="append", default=[], metavar="NAME",
                   help="a named paper grid (main, components, layers, lm_head, selective, movie, relation, "
                        "hybrid; see docs/study.md); repeat for several. Give --spec and/or --grid")
    add_span_role_args(p)
    add_model_data_args(p, named_donors=True)
    p.add_argument("-o", "--output", help="write results.jsonl + manifest.json here (resumes if present)")
    p.add_argument("--batch-size", type=int, default=32,
                   help="rows (spec × prompt) per forward pass (default 32; lower it if memory runs out)")
    add_backend_arg(p)
    p.add_argument("--answer-logprob", action="store_true",
                   help="also score the whole answer by teacher forcing: an answer_logprob column in the "
                        "results and the table")
    p.add_argument("--json", action="store_true",
                   help="print the summary as JSON on stdout instead of tables (for scripts)")
    p.add_argument("--k", type=positive_int_arg, default=100, help="top-k shown in the table (default 100)")
    p.add_argument("--metric", action="append", default=[], metavar="NAME | MODULE:FUNCTION",
                   help="also store this metric in every row and show it in the table: a registered name "
                        "(see docs/study.md) or your own fn(logits, inputs) as module:function; repeat for several")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_backend_arg(p: argparse.ArgumentParser, *, default: str | None = "local") -> None:
    """``--backend``: where the forward passes run (``SweepConfig.backend``)."""
    p.add_argument("--backend", choices=["local", "ndif", "ndif-local"], default=default,
                   help="where the passes run: local (this process%s), ndif (P on NDIF, given as the Hub id "
                        "it hosts; F travels as tensors; needs NDIF_API_KEY), ndif-local (the NDIF request round "
                        "trip, served in this process: check a study before sending it)"
                        % (", the default" if default == "local" else "; default: the config's 'backend'"))


def add_span_role_args(p: argparse.ArgumentParser) -> None:
    """``--entity``, ``--title-span``, ``--relation-span``: the fields the built-in specs and grids
    graft at as FE, M and R (read back by :func:`span_role_args`)."""
    roles = p.add_argument_group("span names of the built-in specs and grids (your facts' fields)")
    roles.add_argument("--entity", metavar="FIELD",
                       help="the entity span FE of the built-in specs and grids (default first_actor; e.g. "
                            "drug for '{drug} is made by')")
    roles.add_argument("--title-span", metavar="FIELD", help="the span M of the movie grid (default movie_title)")
    roles.add_argument("--relation-span", metavar="FIELD",
                       help="the span R of the relation grid (default relation)")


def span_role_args(args: argparse.Namespace) -> dict[str, str]:
    """The ``--entity``/``--title-span``/``--relation-span`` values that were given, by role."""
    given = {"entity": args.entity, "title": args.title_span, "relation": args.relation_span}
    return {role: name for role, name in given.items() if name is not None}


_DONOR_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_.-]*")


def parse_donors(values: str | Sequence[str] | None) -> tuple[str | None, dict[str, str]]:
    """``--donor`` values → (F, {NAME: PATH}). A value is F's path or hub id, or ``NAME=PATH`` for a
    named donor (a value that exists as a local path is always F, even with an ``=`` in it).

    >>> parse_donors(["runs/sft", "hybrid=runs/hybrid"])
    ('runs/sft', {'hybrid': 'runs/hybrid'})
    """
    if values is None or isinstance(values, str):
        return values, {}
    default: str | None = None
    named: dict[str, str] = {}
    for value in values:
        name, eq, path = value.partition("=")
        if not eq or Path(value).exists():
            if default is not None:
                raise SystemExit(_usage(f"--donor given twice without a name ({default!r} and {value!r}): give "
                                        "F once, and each further donor as NAME=PATH (e.g. --donor hybrid=runs/hybrid)"))
            default = value
            continue
        if not _DONOR_NAME.fullmatch(name) or not path:
            raise SystemExit(_usage(f"--donor {value!r}: a named donor is NAME=PATH with a name such as 'hybrid' "
                                    "(letters, digits, _ . -) and a local path or hub id; F itself is --donor PATH"))
        if name == "default":
            raise SystemExit(_usage(f"--donor {value!r}: 'default' is the main donor F; give it as --donor PATH"))
        if name in named:
            raise SystemExit(_usage(f"--donor {name}= given twice ({named[name]!r} and {path!r}); each name "
                                    "names one donor"))
        named[name] = path
    return default, named


def check_named_donors(specs: Sequence[Any], named: dict[str, str]) -> None:
    """Raise :class:`~nngraft.errors.DonorMismatchError` if a spec's rule names a donor
    (``"donor": NAME``) that no ``--donor NAME=PATH`` gave (before any model is loaded)."""
    from ..errors import DonorMismatchError

    for spec in specs:
        missing = sorted({r.donor for r in spec.rules if r.donor not in (None, "default")} - set(named))
        if missing:
            given = ", ".join(["F (--donor PATH)"] + [f"{k}={v}" for k, v in named.items()])
            raise DonorMismatchError(
                f"spec {spec.name!r} grafts from donor(s) {', '.join(map(repr, missing))}, which this command "
                f"was not given (given: {given}); add " + " ".join(f"--donor {m}=PATH" for m in missing)
                + " (a finetuned copy of P: local folder or hub id), or leave the spec out")


def pair_and_data(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any]]:
    donor, named = parse_donors(args.donor)
    if args.tiny and (args.model or donor):
        raise SystemExit(_usage("give --tiny, or --model and --donor, not both"))
    if not args.tiny and not (args.model and donor):
        raise SystemExit(_usage("give --model and --donor (paths or hub ids), or --tiny MODEL_TYPE"))
    if args.tiny:
        pair = {"name": f"tiny-{args.tiny}", "tiny": args.tiny, "dtype": args.dtype, "device": args.device}
    else:
        pair = {"name": Path(donor).name or "model", "recipient": args.model, "donor": donor,
                "dtype": args.dtype, "device": args.device}
    if named:
        pair["donors"] = named
    sources = [x for x in ("data", "facts", "dataset") if getattr(args, x)]
    if len(sources) != 1:
        raise SystemExit(_usage("give exactly one of --data, --facts or --dataset"))
    if args.data:
        if args.template:
            raise SystemExit(_usage("--template applies to --facts/--dataset; --data already has prompts"))
        data: dict[str, Any] = {"examples": str(Path(args.data).resolve())}
    else:
        templates = [str(Path(t).resolve()) if "{" not in t and Path(t).is_file() else t for t in args.template]
        data = {"templates": templates, "answer_field": args.answer_field}
        if args.facts:
            data["facts"] = str(Path(args.facts).resolve())
        else:
            if args.n is None:
                raise SystemExit(_usage("--dataset needs --n"))
            data.update(dataset=args.dataset, n=args.n, seed=args.seed)
    if args.limit is not None:
        data["limit"] = args.limit
    return pair, data


def _validated(raw: dict[str, Any]) -> Any:
    from pydantic import ValidationError

    from ..spec import format_validation_error
    from .sweep_config import SweepConfig, SweepConfigError

    try:
        # the command line's own --metric module:function is the user's choice (a config file's is refused)
        return SweepConfig.model_validate(raw, context={"own_code": True})
    except ValidationError as error:
        raise SweepConfigError(format_validation_error(error, "(command line)").replace(
            "invalid graft spec", "invalid options")) from None


def _usage(message: str) -> int:
    alert(f"[red]usage error:[/red] {message}")
    return 2


def interrupted(results: Path, command_line: str) -> int:
    """After Ctrl-C: say how many rows are saved where, and the command that resumes; exit 130.

    Every finished batch is already on disk (appended with fsync) and the manifest records the
    interrupted run, so the partial file is readable with :func:`~.results.load_results`."""
    import warnings

    from .results import ResultsError, load_results, manifest_path

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # a cut-off last line is dropped on resume anyway
            saved = len(load_results(results))
    except ResultsError:
        saved = 0
    if saved:
        alert(f"[yellow]interrupted:[/yellow] {saved} rows are saved in {results} (manifest: "
                      f"{manifest_path(results)}).\nTo resume, run the same command again; rows already "
                      f"saved are skipped:\n  {command_line}")
    else:
        alert(f"[yellow]interrupted[/yellow] before any row was saved; to start again, run:\n"
                      f"  {command_line}")
    return 130


def spec_files(values: Sequence[str], folder: Path, roles: dict[str, str] | None = None) -> list[str]:
    """``--spec`` values as spec files: each a spec JSON file, or the name of a built-in spec
    (``fe_lt``, ``lt``, …: the files of recipes/specs/, :func:`nngraft.study.grids.paper_specs`
    with the span names ``roles``, e.g. ``{"entity": "drug"}``), which is then written into
    ``folder``. A file that exists wins over a name.

    Example:
        >>> import tempfile
        >>> with tempfile.TemporaryDirectory() as tmp:
        ...     [Path(f).name for f in spec_files(["lt"], Path(tmp))]
        ['lt.json']
    """
    from ..errors import SpecError
    from .grids import paper_specs

    builtin = paper_specs(**(roles or {}))
    files = []
    for value in values:
        path = Path(value).expanduser()
        if path.exists():
            files.append(str(path.resolve()))
        elif value in builtin:
            files.append(str(builtin[value].save(folder / f"{value}.json")))
        else:
            raise SpecError(f"--spec {value}: no spec file at {path.resolve()}, and no built-in spec has that "
                            f"name (built-in: {', '.join(list(builtin)[:5])}, … — the names of the files in "
                            "recipes/specs/, see docs/study.md)")
    return files


@command("run", _run_args, runs_models=True)
def cmd_run(args: argparse.Namespace) -> int:
    """Run graft specs on test examples and print mean target probability, top-k and recovery."""
    import tempfile

    from .results import load_results
    from .sweep import run_sweep

    from ..spec import GraftSpec

    if not args.spec and not args.grid:
        raise SystemExit(_usage("give --spec SPEC (a file or a built-in name such as fe_lt) and/or --grid NAME "
                                "(e.g. main)"))
    pair, data = pair_and_data(args)
    roles = span_role_args(args)
    with tempfile.TemporaryDirectory() as scratch, tempfile.TemporaryDirectory() as builtin:
        from .grids import grid_specs

        specs = spec_files(args.spec, Path(builtin), roles)
        check_named_donors([GraftSpec.load(s) for s in specs]
                           + [s for g in args.grid for s in grid_specs(g, **roles)], pair.get("donors", {}))
        output = Path(args.output) if args.output else Path(scratch)
        raw: dict[str, Any] = {"name": "run", "models": [pair], "data": data, "specs": specs, "spans": roles,
                               "batch_size": args.batch_size, "answer_logprob": args.answer_logprob,
                               "backend": args.backend, **({"metrics": args.metric} if args.metric else {})}
        if args.grid:
            raw["grid"] = list(args.grid)
        config = _validated(raw)
        try:
            outcome = run_sweep(config, output=output, show_progress=not args.no_progress, console=console)
        except KeyboardInterrupt:
            if not args.output:
                alert("[yellow]interrupted[/yellow]; nothing was kept (without -o DIR, results "
                              "live in a temporary folder). Run with -o DIR to keep partial results.")
                return 130
            from .results import results_path

            return interrupted(results_path(output), getattr(args, "command_line", "the same command"))
        rows = load_results(outcome.results)
        if args.json:
            import json

            print(json.dumps({"results": str(outcome.results) if args.output else None,
                              "manifest": str(outcome.manifest) if args.output else None,
                              "baseline_check": outcome.baseline_check,
                              "summary": summary_json(rows, k=args.k)}, indent=2, default=str))
        else:
            from .results import load_manifest

            wide_console(out, 200).print(summary_table(rows, k=args.k, title="nngraft run",
                                                       manifest=load_manifest(outcome.results)))
        if args.output:
            console.print(f"results: {outcome.results}\nmanifest: {outcome.manifest}")
    return 0 if all(r.get("ok", True) for r in outcome.baseline_check.values()) else 1


# ---------------------------------------------------------------------------------------------
# sweep
# ---------------------------------------------------------------------------------------------


def _sweep_args(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = """A sweep config is a JSON file; see docs/study.md and recipes/sweeps/*.json. Example:
  {"name": "main", "models": [{"name": "llama", "recipient": "meta-llama/Llama-3.2-1B",
                              "donor": "runs/sft/llama"}],
   "data": {"facts": "runs/sft/llama/facts.jsonl", "templates": ["sentence_3"]},
   "grid": "main", "output": "runs/main-llama"}
Rerunning the same command resumes: rows already in the results file are skipped."""
    p.add_argument("config", metavar="CONFIG.json", help="sweep config file")
    p.add_argument("-o", "--output", help="results directory (overrides the config's 'output')")
    p.add_argument("--plot", action="store_true", help="render the plots when the sweep is done")
    add_backend_arg(p, default=None)
    p.add_argument("--k", type=positive_int_arg, default=100, help="top-k shown in the table and plots (default 100)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_span_role_args(p)


@command("sweep", _sweep_args, runs_models=True)
def cmd_sweep(args: argparse.Namespace) -> int:
    """Run a sweep config (models × data × templates × spec grid), resumable, to results JSONL."""
    from .results import load_results
    from .sweep import run_sweep
    from .sweep_config import load_sweep_config

    config = load_sweep_config(args.config, **({"backend": args.backend} if args.backend else {}))
    roles = span_role_args(args)
    if roles:
        config = _validated({**config.model_dump(mode="json"), "base_dir": config.base_dir,
                             "spans": {**config.spans.model_dump(exclude_none=True), **roles}})
    try:
        outcome = run_sweep(config, output=args.output, show_progress=not args.no_progress, console=console)
    except KeyboardInterrupt:
        from .results import results_path

        out_dir = Path(args.output) if args.output else config.output_dir()
        return interrupted(results_path(out_dir), getattr(args, "command_line", "the same command"))
    from .results import load_manifest

    rows = load_results(outcome.results)
    wide_console(out, 200).print(summary_table(rows, k=args.k, title=f"nngraft sweep {config.name}",
                                               manifest=load_manifest(outcome.results)))
    for name, s in outcome.stats.items():
        console.print(f"{name}: {s.written} rows written, {s.skipped} already done, "
                      f"{s.seconds:.1f} s ({s.rows_per_second:.1f} rows/s)")
    console.print(f"results: {outcome.results}\nmanifest: {outcome.manifest}")
    if args.plot:
        from .plot import plot_results

        paths = plot_results(outcome.results, k=args.k)
        console.print(f"plots: {len(paths)} files in {paths[0].parent}")
    failed = [n for n, r in outcome.baseline_check.items() if not r.get("ok", True)]
    if failed:
        alert(f"[red]error:[/red] baseline check failed for {failed}: the p/f rows differ from "
                      "plain P/F forwards by more than the tolerance (see manifest.json baseline_check)")
        return 1
    return 0


# ---------------------------------------------------------------------------------------------
# plot
# ---------------------------------------------------------------------------------------------


def _plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("results", metavar="RESULTS", help="results.jsonl, or the directory holding it; or an "
                   "attribution.json of nngraft attribute (its heatmaps)")
    p.add_argument("-o", "--output", help="directory for the figures (default: plots/ beside the results)")
    p.add_argument("--k", type=positive_int_arg, default=100, help="top-k accuracy panel (default 100, the paper's k)")
    p.add_argument("--format", action="append", choices=["png", "svg", "pdf"],
                   help="figure format (repeat; default png and svg)")
    p.add_argument("--ci", choices=["bootstrap", "t"], default="bootstrap",
                   help="confidence intervals: percentile bootstrap over facts (default) or Student-t")
    p.add_argument("--specs", metavar="NAME,NAME,...",
                   help="one bar chart with just these specs, in this order (e.g. p,f,fe,lt,fe_lt,found; "
                        "'found': the spec nngraft localize found, run with nngraft run --spec OUT/spec.json)")
    p.add_argument("--metric", action="append", default=[], metavar="NAME",
                   help="also a bar-chart panel of this metric (a column of the results, e.g. logit_diff); repeat")


@command("plot", _plot_args)
def cmd_plot(args: argparse.Namespace) -> int:
    """Render bar charts and layer heatmaps (PNG + SVG) and aggregates.csv from a results file."""
    from .plot import plot_results

    source = Path(args.results)
    found = source if source.suffix == ".json" else source / "attribution.json"
    if found.name == "attribution.json" and found.is_file() and not (source / "results.jsonl").is_file():
        from .attribution_plot import plot_attribution

        data = json.loads(found.read_text())
        folder = Path(args.output) if args.output else found.parent
        paths = [plot_attribution(data, folder / f"attribution.{fmt}") for fmt in (args.format or ("png", "svg"))]
        for path in paths:
            out.print(str(path))
        console.print(f"wrote {len(paths)} files")
        return 0
    chosen = [n.strip() for n in args.specs.split(",") if n.strip()] if args.specs else None
    paths = plot_results(args.results, args.output, k=args.k, formats=args.format or ("png", "svg"),
                         method=args.ci, specs=chosen, metrics=args.metric)
    for path in paths:
        out.print(str(path))
    console.print(f"wrote {len(paths)} files")
    return 0

