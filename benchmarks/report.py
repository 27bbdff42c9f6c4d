"""Render the benchmark results (JSON under benchmarks/results/) as the "Grafting performance"
section of docs/benchmarks.md.

docs/benchmarks.md is shared with other sections (the demo's, remote execution's). Only the text
between the markers ``<!-- grafting-performance:begin -->`` and ``<!-- grafting-performance:end -->``
inside the ``## Grafting performance`` section is replaced; everything else — other sections and
the hand-written text of this section (e.g. "Known overheads") — is kept as it is. The file is
re-read right before writing and written atomically.

    python -m benchmarks.report            # re-render from benchmarks/results/
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Sequence

from .common import FLOAT_NOISE, MODELS, RESULTS, ROOT, fmt, replace_docs_section

HEADING = "## Grafting performance"
BEGIN = "<!-- grafting-performance:begin -->"
END = "<!-- grafting-performance:end -->"
BENCHMARKS = ("bench_vs_paper", "bench_overhead", "bench_grid", "bench_memory", "bench_scaling")
MODEL_LABEL = {"tiny": "tiny random Llama (8 layers, hidden 32)", "smollm2": "SmolLM2-135M-Instruct"}


def results_key(model: str, threads: int) -> str:
    """Folder (and key) of a run's results: ``smollm2`` for the standard 2 threads, else
    ``smollm2-1thread`` — a cross-check shown as an extra column of the summary only."""
    return model if threads == 2 else f"{model}-{threads}thread"


def column_label(key: str) -> str:
    model, _, threads = key.partition("-")
    n = threads.removesuffix("thread")
    return MODEL_LABEL.get(model, model) + (f", {n} thread{'' if n == '1' else 's'} (cross-check)" if threads else "")


def load_results(results: Path = RESULTS) -> dict[str, dict[str, dict[str, Any]]]:
    """``{key: {benchmark: record}}`` for every result file present (keys: see :func:`results_key`)."""
    out: dict[str, dict[str, dict[str, Any]]] = {}
    keys = list(MODELS) + sorted(p.name for p in results.glob("*-*thread") if p.is_dir())
    for key in keys:
        for bench in BENCHMARKS:
            path = results / key / f"{bench}.json"
            if path.is_file():
                out.setdefault(key, {})[bench] = json.loads(path.read_text())
    return out


def markdown_table(columns: Sequence[str], rows: Sequence[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(fmt(row.get(c)).replace("|", "\\|") for c in columns) + " |")
    return "\n".join(lines)


def _checks(record: dict[str, Any]) -> str:
    items = []
    for name, value in record.get("checks", {}).items():
        verdict = "float noise" if value <= FLOAT_NOISE else "**NOT float noise**"
        items.append(f"- max \\|Δ logits\\| {name}: {value:.2e} ({verdict})")
    return "\n".join(items)


def _verdict(met: Any) -> str:
    return {True: "met", False: "**not met**", None: "no verdict"}[met]


def _overhead_cell(record: dict[str, Any], row: dict[str, Any]) -> str:
    """``1.02 (met)``, or ``1.03 × empty trace (met)`` where the verdict is against the empty trace."""
    judged = record["config"]["judged_by"]
    text = f"{fmt(row[judged])}"
    if judged.startswith("× empty trace"):
        text += f" × empty trace ({fmt(row['× plain (median)'])} × plain)"
    return f"{text} ({_verdict(row['met'])})"


def summary(results: dict[str, dict[str, dict[str, Any]]]) -> str:
    """One line per target: the measured value and whether it is met, for each model."""
    models = list(results)
    lines = ["| # | measurement | target | " + " | ".join(column_label(m) for m in models) + " |",
             "|---|---|---|" + "---|" * len(models)]

    def ratio_cell(row: dict[str, Any], key: str) -> str:
        return f"{fmt(row[key])}× ({_verdict(row['met'])})"

    specs = [
        ("1", "one-pass vs paper method, 1 prompt × 20 tokens", "≥ 25×", "bench_vs_paper",
         lambda r: ratio_cell(r["rows"][0], "speed-up (median)")),
        ("1", "one-pass vs paper method, 32 prompts, per example", "≥ 100×", "bench_vs_paper",
         lambda r: ratio_cell(r["rows"][1], "speed-up (median)")),
    ]
    for i, label in enumerate(("MLPs of the last 4 layers @ last token", "all MLPs @ all positions",
                               "q, k, v, o (all layers) @ entity tokens")):
        specs.append(("2", f"grafted ÷ plain forward: {label}", "≤ 1.05 (tiny model: ≤ 1.05 × empty trace)",
                      "bench_overhead",
                      lambda r, label=label: (lambda row: _overhead_cell(r, row))(
                          next(x for x in r["rows"] if x["variant"] == label))))
    for i in range(2):
        specs.append(("3", f"32 specs in one run_grid call vs 32 traces (workload {i + 1})", "≥ 4× throughput", "bench_grid",
                      lambda r, i=i: f"{r['rows'][i]['workload'].split(' × ')[1]}: "
                                     + ratio_cell(r["rows"][i], "throughput ratio (median)")))
    specs.append(("3", "full grid throughput", "report", "bench_grid",
                  lambda r: f"{fmt(r['config']['full_grid_row']['rows/s'])} rows/s "
                            f"({len(r['config']['full_grid'])} specs)"))
    specs.append(("4", "memory a lazy-donor graft adds over P alone", "≤ grafted + 10% of size(P)", "bench_memory",
                  lambda r: (lambda row: f"{fmt(row['extra over P only MiB'])} MiB vs "
                             f"{row['target'].rsplit('= ', 1)[1]} ({_verdict(row['met'])})")(r["rows"][1])))
    specs.append(("5", "paper method ÷ one-pass at the longest prompt", "plot", "bench_scaling",
                  lambda r: f"{fmt(r['rows'][-1]['paper ÷ one-pass'])}× at {r['rows'][-1]['tokens']} tokens "
                            f"({r['rows'][-1]['paper: how']})"))
    def cell(model: str, bench: str, pick) -> str:
        record = results[model].get(bench)
        if record is None:
            return "not run" if model in MODELS else "—"
        try:
            return pick(record)
        except (KeyError, IndexError, StopIteration):
            return "—"

    for number, what, target, bench, pick in specs:
        lines.append(f"| {number} | {what} | {target} | "
                     + " | ".join(cell(m, bench, pick) for m in models) + " |")
    return "\n".join(lines)


def machine_block(results: dict[str, dict[str, dict[str, Any]]], run: dict[str, Any] | None) -> str:
    records = [r for per in results.values() for r in per.values()]
    if not records:
        return "_No results yet: run `python -m benchmarks.run_all`._"
    first = records[0]["machine"]
    loads = [r["machine"].get("load_average", [None])[0] for r in records]
    by_commit: dict[str, list[str]] = {}
    for key, per in results.items():
        for bench, record in per.items():
            by_commit.setdefault(record["machine"]["git_commit"], []).append(f"{key}/{bench}")
    commits = sorted(by_commit, key=lambda c: -len(by_commit[c]))
    commit_text = f"commit `{commits[0]}`" if len(commits) == 1 else "commits " + ", ".join(
        f"`{c}` ({'the rest' if i == 0 else ', '.join(by_commit[c])})" for i, c in enumerate(commits))
    dates = sorted(r["machine"]["date"] for r in records)
    date_text = dates[0] if dates[0] == dates[-1] else f"{dates[0]} to {dates[-1]}"
    lines = [
        f"- **Machine:** {first['cpu']}, {first['nproc']} cores (nproc), {first['memory_gib']} GiB RAM, "
        f"no GPU used; torch threads: {first['torch_threads']}; `OMP_WAIT_POLICY={first.get('omp_wait_policy')}`.",
        f"- **Versions:** Python {first['python']}, torch {first['torch']}, transformers "
        f"{first['transformers']}, nnsight {first['nnsight']}; nngraft at {commit_text}"
        f"{' (plus uncommitted work in the tree)' if run and run.get('dirty') else ''}.",
        f"- **Date:** {date_text} (each table's record has its own date and commit)"
        + (f"; the last `run_all` took {run['seconds'] / 60:.1f} min." if run else "."),
        f"- **Command:** `python -m benchmarks.run_all`"
        + (f" (last: `{run['command'].strip()}`)" if run and run["command"].strip() != "python -m benchmarks.run_all" else "")
        + "; each benchmark also runs alone: the command is in each table's caption.",
        f"- **Load:** the machine was shared with other jobs during the run (1-minute load average "
        f"{min(l for l in loads if l is not None):.1f}–{max(l for l in loads if l is not None):.1f} on "
        f"{first['nproc']} cores, sampled at the end of each benchmark), so absolute times are noisy. "
        "Every ratio is measured side by side in the same run, variants interleaved, and reported as "
        "the median of per-repetition ratios (with its range, and the ratio of the best times, which "
        "outside load can only inflate). A target's verdict uses the median.",
    ]
    return "\n".join(lines)


def model_block(record: dict[str, Any]) -> str:
    info = record["model"]
    label = {"tiny": "Tiny random Llama", "smollm2": "SmolLM2-135M-Instruct"}.get(info.get("name"), info.get("name"))
    return (f"{label}** ({info.get('model_type')}, {info.get('n_layers')} layers, hidden "
            f"{info.get('hidden_size')}, {info.get('n_parameters', 0) / 1e6:.3g}M parameters, "
            f"{info.get('dtype')}, attention `{info.get('attn_implementation')}`; F = {info.get('donor')}).")


def render(results: dict[str, dict[str, dict[str, Any]]], run: dict[str, Any] | None = None, *,
           docs_dir: Path = ROOT / "docs") -> str:
    """The generated part of the section (goes between the markers); plot links are relative to
    ``docs_dir``, the folder of the markdown file."""
    out = [BEGIN,
           "_Generated by `python -m benchmarks.run_all` from benchmarks/results/*.json — rerun it "
           "rather than editing this part by hand. Scripts: [benchmarks/](../benchmarks/README.md)._",
           "", machine_block(results, run), "", "### Targets at a glance", "", summary(results), ""]
    for key, per in results.items():
        if key not in MODELS and per:
            commands = "; ".join(f"`{r['command'].replace(str(ROOT) + os.sep, '')}`" for r in per.values())
            out += [f"Cross-check column \"{column_label(key)}\": the same scripts with one torch thread, run "
                    f"right after the main run ({commands}); their full tables are in "
                    f"benchmarks/results/{key}/.", ""]
    titles: dict[str, str] = {}
    for model, per in results.items():
        for bench, record in per.items():
            titles.setdefault(bench, record["title"])
    for bench in BENCHMARKS:
        if bench not in titles:
            continue
        out += [f"### {titles[bench]}", ""]
        for model in MODELS:
            record = results.get(model, {}).get(bench)
            if record is None:
                continue
            command = record["command"].replace(str(ROOT) + os.sep, "")
            out += [f"**{model_block(record)} Command: `{command}`", ""]
            out += [markdown_table(record["columns"], record["rows"]), ""]
            checks = _checks(record)
            if checks:
                out += [checks]
            for note in record.get("notes", []):
                out += [f"- {note}"]
            plot = record.get("config", {}).get("plot")
            if plot:
                # records hold the absolute path where the run wrote the figure; a figure that is
                # in this checkout's docs folder is linked by its name, so the link holds in any clone
                beside = Path(docs_dir) / Path(plot).name
                rel = beside.name if beside.is_file() else os.path.relpath(Path(plot).resolve(),
                                                                            Path(docs_dir).resolve())
                out += ["", f"![time vs prompt length, {model}]({Path(rel).as_posix()})"]
            out += [""]
    out += ["### GPU", "",
            "Not measured: this run had no GPU. The same scripts take `--model` and run on whatever "
            "device the models are on; GPU rows for a larger model are still to be added.", "", END]
    return "\n".join(out)


def update_docs(path: Path, generated: str) -> None:
    replace_docs_section(path, generated, BEGIN, END, HEADING)


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md")
    args = p.parse_args(argv)
    results = load_results(args.results)
    run_file = args.results / "run.json"
    run = json.loads(run_file.read_text()) if run_file.is_file() else None
    update_docs(args.docs, render(results, run, docs_dir=args.docs.parent))
    print(f"updated {args.docs}")


if __name__ == "__main__":
    main()
