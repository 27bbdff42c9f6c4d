"""``nngraft localize``: search for a small graft set that recovers F's facts (docs/localize.md).

Registered with :func:`nngraft.cli.registry.command` when :mod:`nngraft.study.commands` imports this
module. Models and data are given as for ``nngraft run``. Exit codes (see :mod:`nngraft.cli`): 0 ok,
2 a user error or bad usage (one message, no traceback).
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..cli.registry import command, console, out


@dataclass
class _DataSource:
    """What :func:`nngraft.study.sweep_config.load_data` reads from a sweep config: the data section and
    how to resolve relative paths (here: against the current directory)."""

    data: Any

    @staticmethod
    def path(value: str) -> Path:
        return Path(value).expanduser()


def load_examples(data: dict[str, Any]) -> tuple[list[Any], dict[str, Any]]:
    """Test examples from a sweep config's ``data`` section (relative paths: the current folder)."""
    from pydantic import ValidationError

    from ..spec import format_validation_error
    from .sweep_config import DataConfig, SweepConfigError, load_data

    try:
        source = _DataSource(DataConfig.model_validate(data))
    except ValidationError as error:
        raise SweepConfigError(format_validation_error(error, "(options)").replace(
            "invalid graft spec", "invalid options")) from None
    return load_data(source)  # type: ignore[arg-type]


def load_inputs(pair: dict[str, Any], data: dict[str, Any]) -> tuple[Any, list[Any], dict[str, Any]]:
    """Load a model pair and test examples described as in a sweep config (``models[0]`` and
    ``data``): returns (:class:`~nngraft.study.pairs.LoadedPair`, examples, data source)."""
    from pydantic import ValidationError

    from ..spec import format_validation_error
    from .pairs import load_pair
    from .sweep_config import ModelPair, SweepConfigError

    try:
        model = ModelPair.model_validate(pair)
    except ValidationError as error:
        raise SweepConfigError(format_validation_error(error, "(options)").replace(
            "invalid graft spec", "invalid options")) from None
    examples, described = load_examples(data)
    return load_pair(model), examples, described


def run_localize(pair: dict[str, Any], data: dict[str, Any], *, output: str | Path, plot: bool = True,
                 show_progress: bool = True, console: Any = None, **options: Any) -> tuple[Any, dict[str, Path]]:
    """Load models and data, run :func:`~nngraft.study.localize.localize` with ``options`` and save
    its files in ``output`` (a new folder, or one localize wrote before: see
    :func:`~nngraft.study.results.output_folder`). Returns (result, {"spec", "result", "plot"} paths)."""
    from .results import output_folder

    with output_folder(output, "localize", flag="-o", ours=lambda folder: (folder / "localize.json").is_file()):
        return _run_localize(pair, data, output=Path(output), plot=plot, show_progress=show_progress,
                             console=console, **options)


def _run_localize(pair: dict[str, Any], data: dict[str, Any], *, output: Path, plot: bool, show_progress: bool,
                  console: Any, **options: Any) -> tuple[Any, dict[str, Path]]:
    from ..grafter import Grafter
    from ..spec import ModelRef
    from .localize import compare_with_fe_lt, localize

    loaded, examples, source = load_inputs(pair, data)
    batch_size = options.pop("batch_size", None) or 32
    grafter = Grafter(loaded.recipient, loaded.graft_donor or loaded.donor, loaded.tokenizer, batch_size=batch_size)
    result = localize(grafter, examples, console=console, show_progress=show_progress, **options)
    result.comparison = compare_with_fe_lt(grafter, examples, result)
    ident = loaded.identity
    result.spec = result.spec.model_copy(update={
        "recipient": ModelRef(name=ident["recipient"]["source"]),
        "donor": ModelRef(name=ident["donor"]["source"])})
    result.models = {"name": loaded.name, **ident}
    result.data["source"] = source
    return result, result.save(output, plot=plot)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def add_search_args(p: argparse.ArgumentParser) -> None:
    """The search options (shared by ``nngraft localize`` and ``recipes/localize.py``)."""
    s = p.add_argument_group("search")
    s.add_argument("--target", type=float, default=0.9,
                   help="recovery to reach, in (0, 1]: (G − P) / (F − P) of the metric (default 0.9)")
    s.add_argument("--metric", default=None, metavar="NAME",
                   help="per-example metric: prob (target probability, default), logprob, top1, rank, or another "
                        "registered metric that needs no baselines (see docs/study.md)")
    s.add_argument("--targets", choices=["answer", "donor_top1"], default=None,
                   help="first token of each answer (default), or F's own greedy next token")
    s.add_argument("--span", action="append", metavar="NAME",
                   help="a span that is a position group (repeat; default: every span all prompts have)")
    s.add_argument("--no-globals", action="store_true",
                   help="do not search the embeddings, final norm and LM head")
    s.add_argument("--holdout", type=float, default=0.0, metavar="FRACTION",
                   help="facts kept out of the search, only to report the found set's recovery (default 0)")
    s.add_argument("--search-seed", type=int, default=0,
                   help="seed of the held-out split and of the bootstrap intervals (default 0)")
    s.add_argument("--min-gap", type=float, default=None,
                   help="smallest |F − P| of the metric for which recovery is defined (default 0.05)")
    s.add_argument("--spec-name", default="localized", help="name of the found spec (default localized)")
    s.add_argument("--screen", choices=["exhaustive", "attribution"], default="exhaustive",
                   help="exhaustive: the coarse-to-fine search (default); attribution: rank every unit by its "
                        "attribution score (one forward + one backward pass), verify the top ones with exact "
                        "grafts, then prune (docs/attribution.md)")
    s.add_argument("--screen-steps", type=int, default=1, metavar="K",
                   help="with --screen attribution: 1 for first-order scores (default), K > 1 for scores "
                        "integrated along P → F with K points")
    s.add_argument("--no-prune", action="store_true",
                   help="with --screen attribution: keep the smallest verified prefix of the ranking (exact "
                        "recovery, not 1-minimal; no knockout per unit: much faster)")


def search_options(args: argparse.Namespace) -> dict[str, Any]:
    """:func:`localize` keyword arguments from :func:`add_search_args`' options."""
    from .metrics import MIN_GAP

    return {"target": args.target, "metric": args.metric or "prob", "targets": args.targets or "answer",
            "spans": args.span, "include_globals": not args.no_globals, "holdout": args.holdout,
            "seed": args.search_seed, "min_gap": MIN_GAP if args.min_gap is None else args.min_gap,
            "name": args.spec_name, "screen": args.screen, "screen_steps": args.screen_steps, "screen_prune": not args.no_prune}


def _localize_args(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = """examples:
  nngraft localize --model meta-llama/Llama-3.2-1B --donor runs/sft --facts runs/sft/facts.jsonl \\
                   --template sentence_3 --target 0.9 --holdout 0.2 -o runs/localize-llama
  nngraft localize --tiny llama --dataset fake_movies_fake_actors --n 4 --template sentence_1 \\
                   --targets donor_top1 --metric logprob -o runs/localize-tiny
Writes OUTPUT/spec.json (the found spec), OUTPUT/localize.json (every step, the recovery curve,
forward passes) and OUTPUT/localize.png. See docs/localize.md."""
    from .run_commands import add_model_data_args

    add_model_data_args(p)
    add_search_args(p)
    p.add_argument("-o", "--output", help="output folder (default runs/localize-<model>)")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward pass (default 32)")
    p.add_argument("--no-plot", action="store_true", help="skip localize.png")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@command("localize", _localize_args, runs_models=True)
def cmd_localize(args: argparse.Namespace) -> int:
    """Search (position group × component × layer) for a small graft set reaching a recovery target."""
    from .run_commands import pair_and_data

    pair, data = pair_and_data(args)
    output = Path(args.output or f"runs/localize-{pair['name']}")
    result, paths = run_localize(pair, data, output=output, plot=not args.no_plot,
                                 show_progress=not args.no_progress, console=console,
                                 batch_size=args.batch_size, **search_options(args))
    out.print(result.summary(), highlight=False)
    for kind, path in paths.items():
        out.print(f"{kind}: {path}", highlight=False)
    return 0

