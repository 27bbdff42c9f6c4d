"""Benchmark 5 — time vs prompt length: paper method, best per-token variant, one-pass graft.

One prompt per length (8 … 512 tokens; filler text ending in a movie sentence), graft: F's MLPs
in the last 4 layers at the last token. Per length, in interleaved repetitions: ``Grafter.run``
(one pass) and ``per_token_inplace`` (one-token forwards with a KV cache, in-place swap; on
SmolLM2 once at 256 and 512 tokens, where one run takes ~30 s).

The paper method (a deep copy of P per token) is run in full up to ``--paper-max`` tokens
(default: all lengths on the tiny model; 32 on SmolLM2, where 512 deep copies would take ~10 min).
Beyond that it is **estimated** as: best per-token time + L × (deep copy + load_state_dict time
per token, the median measured in the full runs) — the paper method is exactly the per-token loop
plus that per-token copy. The table and the plot mark estimated points; at the lengths where both
exist, the estimate is printed next to the measurement so the model can be checked.

Writes a PNG (``--plot``) of seconds vs tokens (log–log) and speed-up vs tokens.

    python -m benchmarks.bench_scaling --model smollm2 --plot docs/benchmark-scaling-smollm2.png
"""

from __future__ import annotations

import gc
import time
from pathlib import Path
from typing import Any, Sequence

from nngraft.util.io import atomic_save_figure

from .baselines import graft_paths, paper_method, per_token_inplace
from .bench_vs_paper import spec_last4_mlp
from .common import (FLOAT_NOISE, Result, load_models, log, max_abs_diff, median, parse, parser,
                     prompts_of_length)

LENGTHS = (8, 16, 32, 64, 128, 256, 512)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=None)
    p.add_argument("--paper-max", type=int, default=None,
                   help="longest prompt the paper method runs in full (longer: estimated)")
    p.add_argument("--plot", type=Path, default=None, help="write the plot here (PNG)")
    args = parse(p, argv)
    smollm2 = args.model == "smollm2"
    lengths = args.lengths or ((8, 16) if args.smoke else LENGTHS)
    paper_max = args.paper_max if args.paper_max is not None else (32 if smollm2 else max(lengths))
    reps = args.reps or (2 if smollm2 else 3)

    m = load_models(args.model)
    g = m.grafter
    spec = spec_last4_mlp()
    n_layers = g.n_layers
    paths = graft_paths(m.adapter, m.P.config, ["mlp"], range(n_layers - 4, n_layers))
    prompts = {L: prompts_of_length(m.tokenizer, 1, L, require_spans=False)[0] for L in lengths}
    g.run(spec, [prompts[lengths[0]].text])  # warm-up

    times: dict[int, dict[str, list[float]]] = {}
    phase: dict[int, dict[str, float]] = {}
    checks: dict[str, float] = {}
    worst_pt, worst_paper = 0.0, 0.0
    for L in lengths:
        text = prompts[L].text
        ids = list(m.tokenizer(text)["input_ids"])
        assert len(ids) == L, (len(ids), L)
        patches = {L - 1: paths}
        times[L] = {"one_pass": [], "per_token": [], "paper": []}
        for r in range(reps):
            # the paper method is slow and its cost (copies) steady: repeat it only where cheap
            run_paper = L <= paper_max and (r == 0 or (L <= 64 and not smollm2))
            run_per_token = r == 0 or not (smollm2 and L >= 256)  # ~30 s a run there: once
            order = ["one_pass"] + (["per_token"] if run_per_token else []) + (["paper"] if run_paper else [])
            order = order[r % len(order):] + order[:r % len(order)]
            out = {}
            for name in order:
                gc.collect()
                start = time.perf_counter()
                if name == "one_pass":
                    out[name] = g.run(spec, [text]).logits[0]
                elif name == "per_token":
                    out[name] = per_token_inplace(m.P, m.F, ids, patches)[-1]
                else:
                    stats: dict[str, float] = {}
                    out[name] = paper_method(m.P, m.F, ids, patches, stats=stats)[-1]
                    phase.setdefault(L, {"tokens": 0, "deepcopy": 0.0, "load_state_dict": 0.0, "forward": 0.0})
                    phase[L]["tokens"] += L
                    for key, value in stats.items():
                        phase[L][key] += value
                times[L][name].append(time.perf_counter() - start)
            if "per_token" in out:
                worst_pt = max(worst_pt, max_abs_diff(out["per_token"], out["one_pass"]))
            if "paper" in out:
                worst_paper = max(worst_paper, max_abs_diff(out["paper"], out["one_pass"]))
        log(f"bench_scaling[{args.model}] L={L}: one-pass {median(times[L]['one_pass']):.3f} s, "
            f"per-token {median(times[L]['per_token']):.3f} s"
            + (f", paper {median(times[L]['paper']):.2f} s" if times[L]["paper"] else ""))
    checks["best per-token vs one-pass (all lengths)"] = worst_pt
    if phase:
        checks[f"paper vs one-pass (lengths ≤ {paper_max})"] = worst_paper

    # the paper method's per-token copy cost, from the full runs
    copy_per_token = median([(v["deepcopy"] + v["load_state_dict"]) / v["tokens"] for v in phase.values()]) \
        if phase else float("nan")

    rows = []
    for L in lengths:
        one = median(times[L]["one_pass"])
        pt = median(times[L]["per_token"])
        estimate = pt + L * copy_per_token
        measured = median(times[L]["paper"]) if times[L]["paper"] else None
        paper = measured if measured is not None else estimate
        rows.append({
            "tokens": L,
            "one-pass s": one,
            "best per-token s": pt,
            "paper method s": paper,
            "paper: how": "measured" if measured is not None else "estimated",
            "paper estimate s": estimate,
            "paper ÷ one-pass": paper / one,
            "per-token ÷ one-pass": pt / one,
        })

    result = Result(
        benchmark="bench_scaling",
        title="5. Time vs prompt length (last-4-layer MLPs at the last token, 1 prompt)",
        model=m.info,
        columns=["tokens", "one-pass s", "best per-token s", "paper method s", "paper: how", "paper estimate s",
                 "paper ÷ one-pass", "per-token ÷ one-pass"],
        rows=rows,
        checks=checks,
        config={"lengths": list(lengths), "paper_max": paper_max, "reps": reps,
                "paper_copy_seconds_per_token": copy_per_token, "float_noise_threshold": FLOAT_NOISE},
        raw={"seconds": {str(L): t for L, t in times.items()}, "paper_phase_seconds": {str(L): v for L, v in phase.items()}},
    )
    result.notes.append(
        f"paper method estimate = best per-token time + tokens × {copy_per_token:.3g} s (median deep copy + "
        f"load_state_dict per token over the full runs, lengths ≤ {paper_max})")
    if args.plot is not None:
        plot(rows, args.plot, title=f"{m.info['name']} ({m.info['n_parameters'] / 1e6:.3g}M parameters), "
                                    f"CPU, {args.threads} threads; graft: last-4-layer MLPs at the last token")
        result.config["plot"] = str(args.plot)
    return result.finish(args, argv)


def plot(rows: list[dict[str, Any]], path: Path, *, title: str) -> None:
    """Seconds vs tokens (log–log) and speed-up of one-pass vs tokens; estimated points hollow."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FixedLocator, LogLocator, NullFormatter, NullLocator, ScalarFormatter

    L = [r["tokens"] for r in rows]
    fig, (ax, bx) = plt.subplots(1, 2, figsize=(11, 4.2))
    ax.plot(L, [r["one-pass s"] for r in rows], "o-", color="tab:green", label="nngraft one-pass")
    ax.plot(L, [r["best per-token s"] for r in rows], "s-", color="tab:blue",
            label="best per-token (in-place swap)")
    meas = [(r["tokens"], r["paper method s"]) for r in rows if r["paper: how"] == "measured"]
    ax.plot(L, [r["paper estimate s"] for r in rows], "--", color="tab:red", alpha=0.6,
            label="paper method, estimated")
    if meas:
        ax.plot(*zip(*meas), "D", color="tab:red", label="paper method, measured")
    bx.plot(L, [r["paper ÷ one-pass"] for r in rows], "-", color="tab:red")
    for how, face in (("measured", "tab:red"), ("estimated", "white")):
        pts = [(r["tokens"], r["paper ÷ one-pass"]) for r in rows if r["paper: how"] == how]
        if pts:
            bx.plot(*zip(*pts), "D", color="tab:red", markerfacecolor=face, label=f"paper method ({how}) ÷ one-pass")
    bx.plot(L, [r["per-token ÷ one-pass"] for r in rows], "s-", color="tab:blue", label="best per-token ÷ one-pass")
    for axis, ylabel in ((ax, "seconds per prompt (median)"), (bx, "speed-up of one-pass (×)")):
        axis.set_xscale("log", base=2)
        axis.set_yscale("log")
        axis.set_xlabel("prompt length (tokens)")
        axis.set_ylabel(ylabel)
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
        axis.xaxis.set_major_locator(FixedLocator(L))
        axis.xaxis.set_minor_locator(NullLocator())
        axis.xaxis.set_major_formatter(ScalarFormatter())
    bx.yaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
    bx.yaxis.set_major_formatter(ScalarFormatter())
    bx.yaxis.set_minor_formatter(NullFormatter())
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        atomic_save_figure(fig, Path(path), dpi=110)  # never a half-written PNG
    finally:
        plt.close(fig)


if __name__ == "__main__":
    main()
