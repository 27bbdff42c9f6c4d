"""Sweeps: model pair(s) × dataset × test templates × a grid of specs → results + manifest.

A sweep config is a small JSON file (``nngraft sweep CONFIG``)::

    {
      "name": "main-llama",
      "models": [{"name": "llama-3.2-1b", "recipient": "meta-llama/Llama-3.2-1B",
                  "donor": "runs/sft/llama-fmra", "dtype": "float32"}],
      "data": {"facts": "runs/sft/llama-fmra/facts.jsonl",
               "templates": ["sentence_1", "sentence_2", "sentence_3", "sentence_4"]},
      "grid": "main",
      "lm_head": ["never"],
      "batch_size": 64,
      "output": "runs/main-llama"
    }

Relative paths are relative to the config file. ``grid`` names a paper grid
(:data:`nngraft.study.grids.PAPER_GRIDS`); ``specs`` adds spec files. The baselines ``p`` (no
graft) and ``f`` (everything grafted, = running F) are always added, because recovery needs them.

Every (spec, example) unit becomes one row of ``results.jsonl``. Rows of many specs and examples
share batched forward passes (rows sorted by prompt length, then cut into batches of
``batch_size``; each batch is one nnsight trace). Batches are a fixed function of the units, so an
interrupted sweep that is rerun computes the missing rows in exactly the same batches and gives
bit-identical numbers. Each finished batch is appended with flush + fsync.

After the run, the sweep runs P and F directly (no nngraft in the path) on the first
``check_baselines`` examples and records in the manifest how far the ``p`` and ``f`` rows are
from them (``baseline_check``); a gap above tolerance is reported as an error-level warning.

Example:
    >>> cfg = SweepConfig.model_validate({"models": [{"name": "tiny", "tiny": "llama"}],
    ...     "data": {"examples": "examples.jsonl"}, "grid": "main"})
    >>> [s.name for s in resolve_specs(cfg)][:4]
    ['p', 'f', 'fe', 'lt']
"""

from __future__ import annotations

import datetime as _dt
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

from ..result import target_token_id
from ..spec import GraftSpec
from .examples import TestExample
from .metric_registry import stored_metrics
from .provenance import FINGERPRINT_VERSION, environment_versions
from .results import (FORMAT_VERSION, ResultsError, ResultsWriter, check_output, load_manifest, manifest_path,
                      output_lock, results_path, write_manifest)
from .evaluate import EvalStats, check_donors, check_spans, evaluate
from .examples import examples_hash
from .pairs import LoadedPair, grafter_for, load_pair
from .provenance import EXAMPLES_FILE, save_run_examples
from .sweep_config import F_SPEC, SweepConfig, SweepConfigError, load_data, resolve_specs, spec_role
# The sweep's pieces by their old address (nngraft.study.sweep.X), for scripts written before the split
from .evaluate import (baseline_inputs, baseline_rows, plan_batches, row_recovery)  # noqa: F401
from .examples import load_examples_jsonl, save_examples_jsonl  # noqa: F401
from .pairs import load_donor, merged_lora_model  # noqa: F401
from .sweep_config import DataConfig, ModelPair, TemplateConfig, load_sweep_config  # noqa: F401


# ---------------------------------------------------------------------------------------------
# Running
# ---------------------------------------------------------------------------------------------


def direct_probs(model: torch.nn.Module, tokenizer: Any, examples: Sequence[TestExample]) -> list[float]:
    """Target probability from a plain forward of ``model`` on each prompt alone (no nngraft
    graft path, no padding): the reference the ``p`` and ``f`` rows are checked against."""
    out = []
    device = next(model.parameters()).device
    for ex in examples:
        ids = tokenizer(ex.prompt, return_tensors="pt")["input_ids"].to(device)
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1].float()
        target = target_token_id(tokenizer, ex.prompt, ex.answer)
        out.append(float(torch.softmax(logits, -1)[target]))
    return out


def check_baselines(pair: LoadedPair, specs: Sequence[GraftSpec], examples: Sequence[TestExample],
                    rows: dict[tuple[str, str, str], dict[str, Any]]) -> dict[str, Any]:
    """Compare the ``p`` / ``f`` rows with plain forwards of P / F (max |Δ prob|), and rows of a
    spec grafting everything from a named donor X at every position with plain forwards of X
    (reported as ``donor:X``)."""
    report: dict[str, Any] = {"n_examples": len(examples)}
    tolerance = 1e-4 if pair.identity["recipient"]["dtype"] == "float32" else 2e-2
    report["tolerance"] = tolerance
    ok = True
    checks = [("p", pair.recipient, lambda s: spec_role(s) == "p"), ("f", pair.donor, lambda s: spec_role(s) == "f")]
    for key, model in pair.donors.items():
        whole = GraftSpec(rules=[r.model_copy(update={"donor": key}) for r in F_SPEC.rules]).content_hash()
        checks.append((f"donor:{key}", model, lambda s, whole=whole: s.content_hash() == whole))
    for role, model, matches in checks:
        names = [s.name for s in specs if matches(s)]
        if not names or not examples:
            continue
        ref = direct_probs(model, pair.tokenizer, examples)
        diffs = [abs(rows[(pair.name, names[0], ex.key)]["prob"] - r) for ex, r in zip(examples, ref)
                 if (pair.name, names[0], ex.key) in rows]
        gap = max(diffs) if diffs else None
        report[role] = {"spec": names[0], "max_abs_prob_diff": gap}
        ok = ok and gap is not None and gap <= tolerance
    report["ok"] = ok
    return report


def _now() -> str:
    return _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")


def _check_resume(manifest: dict[str, Any], writer: ResultsWriter, specs: Sequence[GraftSpec],
                  examples: Sequence[TestExample], models: dict[str, dict[str, Any]],
                  answer_logprob: bool = False, metrics: Sequence[str] = ()) -> None:
    """Refuse to extend results that were made with other models, specs, prompts or metrics."""
    if manifest and manifest.get("format_version", FORMAT_VERSION) > FORMAT_VERSION:
        raise ResultsError(f"{writer.path} was written by a newer nngraft (format "
                           f"{manifest.get('format_version')}); upgrade to extend it")
    for name, identity in models.items():
        old = manifest.get("models", {}).get(name)
        if not old:
            rows = sum(1 for key in writer.done if key[0] == name)
            # rows made by a model nothing records: this run cannot tell whether it is the same one (a
            # manifest without that model's record is the user's own statement, as the message above advises)
            if rows and not manifest_path(writer.path).exists():
                raise ResultsError(
                    f"{writer.path} holds {rows} rows for model {name!r}, but there is no manifest beside it "
                    "(manifest.json records the models that made the rows), so nngraft cannot verify "
                    "that this run's model (its weights, config and dtype) is the one that made them; appending "
                    "would mix two models' rows under one name. Use a new output directory, or delete "
                    f"{writer.path} to start it anew")
            continue
        records = [(side, old.get(side)) for side in ("recipient", "donor")]
        records += [(f"donor {d!r}", old.get("donors", {}).get(d)) for d in identity.get("donors", {})]
        for what, before in records:
            version = (before or {}).get("fingerprint_version")
            if before is not None and version != FINGERPRINT_VERSION:
                written = ("an older nngraft, whose weight fingerprint covered only the first 64 values of "
                           "each tensor" if version is None else f"fingerprint_version {version}")
                raise ResultsError(
                    f"{writer.path} holds results for model {name!r} recorded by {written}; this nngraft "
                    f"hashes every byte of the weights (fingerprint_version {FINGERPRINT_VERSION}), so it "
                    f"cannot confirm that this run's {what} is the model that made those rows. Use a new "
                    f"output directory; or, if you are sure the models are the same, delete "
                    f"\"models\" → {name!r} from {manifest_path(writer.path)} and rerun to record them anew")
        for side in ("recipient", "donor"):
            for key in ("config_hash", "weights_fingerprint", "dtype"):
                if old.get(side, {}).get(key) != identity[side][key]:
                    raise ResultsError(
                        f"{writer.path} holds results for model {name!r} whose {side} {key} was "
                        f"{old.get(side, {}).get(key)!r}; this run's is {identity[side][key]!r}. "
                        "Use a new output directory (or another model name)")
        for donor, ident in identity.get("donors", {}).items():  # named donors, e.g. "hybrid"
            before = old.get("donors", {}).get(donor)
            for key in ("config_hash", "weights_fingerprint", "dtype"):
                if before is not None and before.get(key) != ident[key]:
                    raise ResultsError(
                        f"{writer.path} holds results for model {name!r} whose donor {donor!r} {key} was "
                        f"{before.get(key)!r}; this run's is {ident[key]!r}. "
                        "Use a new output directory (or another model name)")
    if writer.existing and answer_logprob != ("answer_logprob" in writer.existing[0]):
        raise ResultsError(f"{writer.path} was written with answer_logprob="
                           f"{not answer_logprob}; this run asks for {answer_logprob}. Rows must agree: "
                           "use a new output directory")
    if writer.existing and "kl_f_graft" not in writer.existing[0]:
        raise ResultsError(f"{writer.path} was written by an older nngraft, without the logit_diff and KL "
                           "columns this version writes to every row. Rows must agree: use a new output "
                           "directory")
    if writer.existing and metrics:
        before = [m.name for m in stored_metrics(writer.existing[0])
                  if m.fn is not None and not m.name.startswith("top_")]
        if set(before) != set(metrics):
            raise ResultsError(f"{writer.path} was written with the metrics {', '.join(before)}; this run asks for "
                               f"{', '.join(metrics)}. Rows must agree: use a new output directory, or the same "
                               "--metric options as before")
    spec_hash = {s.name: s.content_hash() for s in specs}
    prompts = {e.key: (e.prompt, e.answer) for e in examples}
    for row in writer.existing:
        h = spec_hash.get(row.get("spec"))
        if h is not None and row.get("spec_hash") != h:
            raise ResultsError(f"{writer.path} holds rows for spec {row['spec']!r} with hash "
                               f"{row.get('spec_hash')}, but this run's spec {row['spec']!r} has hash {h}: "
                               "the spec changed. Rename it, or use a new output directory")
        known = prompts.get(row.get("example"))
        if known is not None and (row.get("prompt"), row.get("answer")) != known:
            raise ResultsError(f"{writer.path} holds example {row['example']!r} with prompt "
                               f"{row.get('prompt')!r} → {row.get('answer')!r}; this run's is {known[0]!r} → "
                               f"{known[1]!r}. The data changed; use a new output directory")


@dataclass
class SweepOutcome:
    """Where a sweep wrote, and what it did per model."""

    output: Path
    results: Path
    manifest: Path
    stats: dict[str, EvalStats]
    baseline_check: dict[str, Any]

    def __repr__(self) -> str:
        written = {name: st.written for name, st in self.stats.items()}
        return f"SweepOutcome(results={str(self.results)!r}, rows written={written})"

    def _repr_html_(self) -> str:
        """In Jupyter: per model, rows written and skipped, time, and the baseline check."""
        from ..util.html import html_table

        rows = [[name, st.written, st.skipped, st.seconds,
                 {True: "ok", False: "FAILED"}.get((self.baseline_check.get(name) or {}).get("ok"), "not run")]
                for name, st in self.stats.items()]
        return html_table(["model", "rows written", "rows skipped", "seconds", "baseline check"], rows,
                          caption=f"sweep results in {self.results}")


def run_sweep(config: SweepConfig, *, output: str | Path | None = None, show_progress: bool = True,
              console: Any = None, on_loaded: Callable[[LoadedPair], None] | None = None) -> SweepOutcome:
    """Run a sweep, appending to ``output/results.jsonl`` (resuming if it exists) and keeping
    ``output/manifest.json`` current. See the module docstring. ``on_loaded`` sees each model pair
    once it is loaded, before any row is computed (``nngraft reproduce`` checks fingerprints there;
    an exception it raises stops the sweep)."""
    from rich.console import Console
    from rich.progress import (BarColumn, MofNCompleteColumn, ProgressColumn, TextColumn, TimeElapsedColumn,
                               TimeRemainingColumn)

    from ..util.progress import progress_bar
    from rich.text import Text

    console = console or Console(stderr=True)
    out_dir = Path(output) if output is not None else config.output_dir()
    specs = resolve_specs(config)
    examples, source = load_data(config)
    check_spans(specs, examples)
    check_donors(specs, config.models)
    results = check_output(results_path(out_dir))
    with output_lock(results.parent):
        writer = ResultsWriter(results)
        manifest = load_manifest(results)
        run_record = {"started": _now(), "rows_before": len(writer.existing)}
        recorded = False  # whether this run has written the manifest; a run refused before that leaves it as it was
        try:
            manifest.setdefault("format", "nngraft.results")
            manifest["format_version"] = FORMAT_VERSION
            manifest.setdefault("created", _now())
            manifest["versions"] = environment_versions()
            manifest["sweep"] = config.model_dump(mode="json")
            manifest.setdefault("specs", {})
            for s in specs:
                manifest["specs"][s.name] = {"hash": s.content_hash(), "role": spec_role(s),
                                             "spec": json.loads(s.to_json())}
            manifest["dataset"] = {**source, "hash": examples_hash(examples), "n_examples": len(examples),
                                   "examples_file": EXAMPLES_FILE,
                                   "n_facts": len({e.fact_id for e in examples}),
                                   "templates": sorted({e.template for e in examples})}
            manifest["ks"] = list(config.ks)
            manifest["seeds"] = {"data": config.data.seed if not config.data.examples else None,
                                 "bootstrap": 0, "tiny_models": 0 if any(m.tiny for m in config.models) else None}
            manifest["dtypes"] = {m.name: m.dtype for m in config.models}
            manifest["metrics"] = ("prob/logprob: softmax of the last-token logits in float32; rank: "
                                   "number of tokens with strictly higher log-prob (0-based); top_k: rank < k; "
                                   "logit_diff: target logit minus P's most likely other token's; "
                                   "kl_f_graft / kl_graft_p: KL(F||G) / KL(G||P) in nats over the next token")
            manifest.setdefault("models", {})
            manifest.setdefault("baseline_check", {})
            manifest.setdefault("runs", [])
            stats: dict[str, EvalStats] = {}

            class Rate(ProgressColumn):
                def render(self, task: Any) -> Text:
                    speed = task.finished_speed or task.speed
                    return Text(f"{speed:,.0f} ex/s" if speed else "– ex/s", style="cyan")

            for pair_cfg in config.models:
                console.print(f"[bold]{pair_cfg.name}[/bold]: loading models …")
                pair = load_pair(pair_cfg, config)
                if on_loaded is not None:
                    on_loaded(pair)
                _check_resume(manifest, writer, specs, examples, {pair.name: pair.identity}, config.answer_logprob,
                              config.metric_names())
                if not recorded:  # only a run the resume check accepted records its examples
                    save_run_examples(out_dir, examples)
                manifest["models"][pair.name] = pair.identity
                write_manifest(results, manifest)
                recorded = True
                grafter = grafter_for(pair, pair_cfg, config)
                total = len(specs) * len(examples)
                label = f"{pair.name}: {len(specs)} specs × {len(examples)} examples"
                with progress_bar(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), Rate(),
                                  TimeElapsedColumn(), TimeRemainingColumn(),
                                  console=console, disable=not show_progress) as bar:
                    already = sum(1 for k in writer.done if k[0] == pair.name)
                    if already:
                        bar.console.print(f"resuming: {already} of {total} rows already in {results}")
                    task = bar.add_task(label, total=total, completed=min(already, total), unit="rows")
                    stats[pair.name] = evaluate(
                        grafter, specs, examples, model=pair.name, writer=writer,
                        batch_size=config.batch_size, ks=config.ks, n_top=config.n_top,
                        answer_logprob=config.answer_logprob, metrics=config.metric_names(),
                        progress=lambda n: bar.advance(task, n))
                if config.check_baselines:
                    report = check_baselines(pair, specs, examples[: config.check_baselines], writer.done)
                    manifest["baseline_check"][pair.name] = report
                    if not report["ok"]:
                        console.print(f"[red]baseline check failed for {pair.name}[/red]: {report}")
                del grafter, pair
            run_record.update(finished=_now(), rows_written=sum(s.written for s in stats.values()),
                              rows_skipped=sum(s.skipped for s in stats.values()))
            return SweepOutcome(out_dir, results, manifest_path(results), stats, manifest["baseline_check"])
        finally:
            writer.close()
            if "finished" not in run_record:
                run_record.update(interrupted=_now(), rows_written=writer.written)
            if recorded:
                manifest.setdefault("runs", []).append(run_record)
                write_manifest(results, manifest)
