"""Benchmark 3 — many specs in one forward (per-row plans) vs one trace per spec.

K = 32 specs (the first 32 of the grid below) × N prompts (20 tokens, ``first_actor`` span):

- batched: ``Grafter.run_grid(specs, prompts, spans, batch_size=K*N)`` — one call; every (spec,
  prompt) pair is a row with its own graft cells, and rows of one prompt share its ungrafted
  prefix (one plain prefix pass per prompt, then the rows' suffixes on its KV cache; see
  nngraft/compile/schedule.py);
- one forward, no sharing: the same with ``share_prefix=False`` — all K×N rows in ONE forward pass
  of the full prompts (what packing alone gives);
- separate: ``Grafter.run(spec, prompts, spans)`` once per spec — K traces of N rows.

Throughput ratio = separate time / batched time (target ≥ 4× on CPU), with the max |difference|
of every row's logits between the ways (float noise: the same rows, differently computed).

(On CPU a forward of a 135M model is compute-bound, so packing rows alone saves only the
per-trace overhead; the shared prefix removes the work that is identical across rows. The script
also reports the token positions each way computes.)

Then the throughput of the full grid: every spec of the paper's grids that runs on a prompt with
a ``first_actor`` span — grids ``main``, ``components``, ``layers``, ``lm_head`` and ``selective``
of ``nngraft.study.grids`` (77 specs; the layer-group specs need ≥ 8 layers) — through
``run_grid`` with batch size 32 (the sweep's default), in (spec, prompt) rows per second.

    python -m benchmarks.bench_grid --model smollm2 --out benchmarks/results/smollm2/bench_grid.json
"""

from __future__ import annotations

import time
from typing import Any, Sequence

import torch

from .common import (FLOAT_NOISE, Result, interleaved, load_models, log, max_abs_diff, median, paired_ratio,
                     parse, parser, prompts_of_length)

TARGET = 4.0
FULL_GRIDS = ("main", "components", "layers", "lm_head", "selective")


def full_grid() -> list[Any]:
    """The specs of :data:`FULL_GRIDS`, in order, each once."""
    from nngraft.study.grids import grid_specs

    seen: dict[str, Any] = {}
    for name in FULL_GRIDS:
        for spec in grid_specs(name):
            seen.setdefault(spec.name, spec)
    return list(seen.values())


def shared_prefix_bound(grafter: Any, specs: Sequence[Any], texts: list[str], spans: list[dict]) -> dict[str, Any]:
    """How much of a grid's work is the same across specs: in a causal model a row's hidden states
    equal P's at every position before its first grafted position, so one ungrafted pass per
    prompt plus, per row, only the columns from its first grafted position on (with the prefix's
    KV cache) computes every result. Returns token-positions of one plain pass of all rows vs the
    lower bound with such sharing (an analysis of the plan; what ``run_grid`` achieves is this
    minus padding, plus the scheduler's choices — see nngraft/compile/schedule.py)."""
    now = shared = 0
    for text, span in zip(texts, spans):
        plan = grafter.plan(list(specs), [text] * len(specs), [span] * len(specs))
        width = plan.seq_len
        first = [width] * len(specs)
        for graft in plan.modules:
            for row, col in zip(graft.rows.tolist(), graft.cols.tolist()):
                first[row] = min(first[row], col)
        now += len(specs) * width
        shared += width + sum(width - f for f in first)
    return {"token_positions_now": now, "token_positions_shared_prefix": shared, "ratio": now / shared}


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=20)
    p.add_argument("--k", type=int, default=32, help="specs per forward (default 32)")
    p.add_argument("--n", type=int, nargs="+", default=None, help="prompt counts N to try (default 1 4)")
    p.add_argument("--grid-prompts", type=int, default=None, help="prompts for the full-grid throughput")
    args = parse(p, argv)
    smollm2 = args.model == "smollm2"
    reps = args.reps or (3 if smollm2 else 10)
    ns = args.n or ([1] if args.smoke else [1, 4])
    k = 4 if args.smoke else args.k
    grid_prompts = args.grid_prompts or (1 if args.smoke else 2 if smollm2 else 16)

    m = load_models(args.model)
    g = m.grafter
    grid = full_grid()
    specs = grid[:k]
    if len(specs) < k:
        raise SystemExit(f"the grid has only {len(grid)} specs")
    prompts = prompts_of_length(m.tokenizer, max(max(ns), grid_prompts), args.length)

    rows, checks, raw = [], {}, {}
    for n in ns:
        texts = [q.text for q in prompts[:n]]
        spans = [dict(q.spans) for q in prompts[:n]]
        outs: dict[str, Any] = {}

        def batched() -> None:
            outs["batched"] = g.run_grid(specs, texts, spans, batch_size=k * n)

        def unshared() -> None:
            g.share_prefix = False
            try:
                outs["unshared"] = g.run_grid(specs, texts, spans, batch_size=k * n)
            finally:
                g.share_prefix = True

        def separate() -> None:
            outs["separate"] = {s.name: g.run(s, texts, spans) for s in specs}

        n_reps = reps if n == ns[0] or not smollm2 else max(1, reps - 1)
        log(f"bench_grid[{args.model}]: K={k} × N={n}, {n_reps} reps")
        times = interleaved({"batched": batched, "unshared": unshared, "separate": separate}, n_reps, warmup=1 if n == ns[0] else 0,
                            progress=lambda s: log(f"bench_grid[{args.model}] N={n} {s}"))
        raw[f"N={n}"] = times
        checks[f"K={k} × N={n}: batched vs separate"] = max(
            max_abs_diff(outs["batched"][s.name].logits, outs["separate"][s.name].logits) for s in specs)
        checks[f"K={k} × N={n}: one forward without sharing vs separate"] = max(
            max_abs_diff(outs["unshared"][s.name].logits, outs["separate"][s.name].logits) for s in specs)
        ratio = paired_ratio(times["separate"], times["batched"])
        unshared_ratio = paired_ratio(times["separate"], times["unshared"])
        rows.append({
            "workload": f"K={k} specs × N={n} prompt{'s' if n > 1 else ''} × {args.length} tokens",
            "run_grid (s)": median(times["batched"]),
            "one forward, no sharing (s)": median(times["unshared"]),
            f"{k} traces (s)": median(times["separate"]),
            "rows/s, run_grid": k * n / median(times["batched"]),
            "rows/s, separate": k * n / median(times["separate"]),
            "ratio without sharing (median)": unshared_ratio["median"],
            "throughput ratio (median)": ratio["median"],
            "range": f"{ratio['min']:.3g}–{ratio['max']:.3g}",
            "ratio (best times)": ratio["best"],
            "target": f"≥ {TARGET:g}×", "met": ratio["median"] >= TARGET,
        })

    # full grid throughput (one timed run after a warm-up on one prompt)
    texts = [q.text for q in prompts[:grid_prompts]]
    spans = [dict(q.spans) for q in prompts[:grid_prompts]]
    g.run_grid(grid, texts[:1], spans[:1], batch_size=32)
    log(f"bench_grid[{args.model}]: full grid, {len(grid)} specs × {grid_prompts} prompts")
    grid_times = []
    for _ in range(1 if args.smoke or smollm2 else 2):
        start = time.perf_counter()
        g.run_grid(grid, texts, spans, batch_size=32)
        grid_times.append(time.perf_counter() - start)
    sharing = {f"{k} specs": shared_prefix_bound(g, specs, texts[:1], spans[:1]),
               "full grid": shared_prefix_bound(g, grid, texts[:1], spans[:1])}
    raw["full_grid"] = grid_times
    units = len(grid) * grid_prompts
    grid_row = {
        "grid": f"{len(grid)} specs ({', '.join(FULL_GRIDS)}) × {grid_prompts} prompts × {args.length} tokens",
        "rows": units, "s (median)": median(grid_times),
        "rows/s": units / median(grid_times),
        "prompts/s (whole grid each)": grid_prompts / median(grid_times),
    }

    result = Result(
        benchmark="bench_grid",
        title="3. K specs in one run_grid call vs K separate traces",
        model=m.info,
        columns=["workload", "run_grid (s)", "one forward, no sharing (s)", f"{k} traces (s)", "rows/s, run_grid",
                 "rows/s, separate", "ratio without sharing (median)", "throughput ratio (median)", "range",
                 "ratio (best times)", "target", "met"],
        rows=rows,
        checks=checks,
        config={"length": args.length, "k": k, "ns": ns, "reps": reps, "specs": [s.name for s in specs],
                "full_grid": [s.name for s in grid], "full_grid_prompts": grid_prompts,
                "float_noise_threshold": FLOAT_NOISE, "full_grid_row": grid_row,
                "shared_prefix_bound": sharing},
        raw={"seconds": raw},
    )
    result.notes.append(
        f"full grid: {grid_row['grid']}: {grid_row['rows/s']:.3g} (spec, prompt) rows/s, i.e. "
        f"{grid_row['prompts/s (whole grid each)']:.3g} prompts/s through the whole grid "
        f"(median of {len(grid_times)} run(s), batch size 32)")
    for label, bound in sharing.items():
        result.notes.append(
            f"{label}: one plain pass of every row computes {bound['token_positions_now']} token-positions per "
            f"prompt; a row equals P before its first grafted position, so with the prompt's ungrafted prefix "
            f"shared the lower bound is {bound['token_positions_shared_prefix']} ({bound['ratio']:.3g}× fewer)")
    return result.finish(args, argv)


if __name__ == "__main__":
    main()
