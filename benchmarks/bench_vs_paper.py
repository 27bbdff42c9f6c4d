"""Benchmark 1 — one-pass graft vs the paper's method (and the best per-token variant).

Graft: F's MLPs (gate/up/down) in the last 4 layers, at the last token. Prompts: 20 tokens each
(the paper's ``sentence_4`` template with fake movie facts, filler words prepended to hit 20
exactly).

- one-pass: ``Grafter.run(spec, prompts, spans)`` end to end (tokenizing, compiling, one nnsight
  trace), for 1 prompt and for a batch of 32 prompts;
- paper method: ``benchmarks.baselines.paper_method`` (a deep copy of P per token), batch size 1
  as in the paper's code, so its time per example does not depend on the batch: it is measured
  on a few prompts of the batch (one per repetition) and compared per example;
- best per-token: ``benchmarks.baselines.per_token_inplace`` (in-place swap, no copy).

Repetition r times, side by side: one-pass on prompt r alone, one-pass on the 32-prompt batch,
the paper method on prompt r, the per-token variant on prompt r. Also reports the max |difference|
of the last-token logits between all of them (float noise when the graft is exact).

    python -m benchmarks.bench_vs_paper --model smollm2 --out benchmarks/results/smollm2/bench_vs_paper.json
"""

from __future__ import annotations

import gc
import time
from typing import Any, Sequence

import torch

from nngraft import GraftRule, GraftSpec, Last

from .baselines import graft_paths, paper_method, per_token_inplace
from .common import (FLOAT_NOISE, Result, load_models, log, max_abs_diff, median, paired_ratio, parse,
                     parser, prompts_of_length)

TARGET_SINGLE = 25.0
TARGET_BATCH = 100.0


def spec_last4_mlp() -> GraftSpec:
    return GraftSpec(name="lt_mlp_last4", description="F's MLPs in the last 4 layers at the last token",
                     rules=[GraftRule(components=["mlp"], layers="last:4", positions=[Last()])])


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    args = parse(parser(__doc__.splitlines()[0], batch=True), argv)
    reps = args.reps or (3 if args.model == "smollm2" else 10)

    m = load_models(args.model)
    g = m.grafter
    spec = spec_last4_mlp()
    prompts = prompts_of_length(m.tokenizer, max(args.batch, reps), args.length)
    batch = prompts[:args.batch]
    texts, spans = [q.text for q in batch], [dict(q.spans) for q in batch]
    n_layers = g.n_layers
    paths = graft_paths(m.adapter, m.P.config, ["mlp"], range(n_layers - 4, n_layers))

    def ids_of(i: int) -> list[int]:
        return list(m.tokenizer(prompts[i].text)["input_ids"])

    def patches(ids: list[int]) -> dict[int, list[str]]:
        return {len(ids) - 1: paths}

    # warm up everything but the paper method (a deep copy has nothing to warm up)
    g.run(spec, texts[:1], spans[:1])
    g.run(spec, texts, spans)
    per_token_inplace(m.P, m.F, ids_of(0), patches(ids_of(0)))

    times: dict[str, list[float]] = {k: [] for k in ("one_pass_1", "one_pass_batch", "paper", "inplace")}
    stats: dict[str, float] = {}
    diffs: dict[str, float] = {}
    batch_logits = None

    def note(key: str, a: torch.Tensor, b: torch.Tensor) -> None:
        diffs[key] = max(diffs.get(key, 0.0), max_abs_diff(a, b))

    for r in range(reps):
        i = r % len(prompts)
        ids = ids_of(i)
        order = ["one_pass_1", "one_pass_batch", "paper", "inplace"]
        order = order[r % 4:] + order[:r % 4]
        outs: dict[str, torch.Tensor] = {}
        for name in order:
            gc.collect()
            start = time.perf_counter()
            if name == "one_pass_1":
                outs[name] = g.run(spec, [prompts[i].text], [dict(prompts[i].spans)]).logits[0]
            elif name == "one_pass_batch":
                batch_logits = g.run(spec, texts, spans).logits
            elif name == "paper":
                outs[name] = paper_method(m.P, m.F, ids, patches(ids), stats=stats)[-1]
            else:
                outs[name] = per_token_inplace(m.P, m.F, ids, patches(ids))[-1]
            times[name].append(time.perf_counter() - start)
        note("paper vs one-pass (1 prompt)", outs["paper"], outs["one_pass_1"])
        note("best per-token vs one-pass (1 prompt)", outs["inplace"], outs["one_pass_1"])
        note("paper vs best per-token", outs["paper"], outs["inplace"])
        if i < args.batch:
            note("paper vs one-pass (row of the batch)", outs["paper"], batch_logits[i])
        log(f"bench_vs_paper[{args.model}] rep {r + 1}/{reps}: paper {times['paper'][-1]:.2f} s, "
            f"one-pass {times['one_pass_1'][-1] * 1e3:.1f} ms")

    # the graft changes the output (otherwise "exact" would be vacuous)
    plain = g.run(GraftSpec(name="p"), texts[:1], spans[:1]).logits[0]
    graft_effect = max_abs_diff(g.run(spec, texts[:1], spans[:1]).logits[0], plain)

    n = args.batch
    per_example_batch = [t / n for t in times["one_pass_batch"]]
    single = paired_ratio(times["paper"], times["one_pass_1"])
    batched = paired_ratio(times["paper"], per_example_batch)
    inplace_single = paired_ratio(times["inplace"], times["one_pass_1"])
    inplace_batched = paired_ratio(times["inplace"], per_example_batch)

    def row(what: str, base: str, base_s: list[float], one_s: list[float], ratio: dict[str, float],
            target: float | None) -> dict[str, Any]:
        return {
            "comparison": what, "baseline": base,
            "baseline s/example": median(base_s), "one-pass s/example": median(one_s),
            "speed-up (median)": ratio["median"], "range": f"{ratio['min']:.3g}–{ratio['max']:.3g}",
            "speed-up (best times)": ratio["best"],
            "target": f"≥ {target:g}×" if target else "—",
            "met": (ratio["median"] >= target) if target else None,
        }

    result = Result(
        benchmark="bench_vs_paper",
        title="1. One-pass graft vs the paper's method (last-4-layer MLPs at the last token)",
        model=m.info,
        columns=["comparison", "baseline", "baseline s/example", "one-pass s/example", "speed-up (median)",
                 "range", "speed-up (best times)", "target", "met"],
        rows=[
            row(f"1 prompt × {args.length} tokens", "paper method (deepcopy per token)", times["paper"],
                times["one_pass_1"], single, TARGET_SINGLE),
            row(f"{n} prompts × {args.length} tokens, per example", "paper method (deepcopy per token)",
                times["paper"], per_example_batch, batched, TARGET_BATCH),
            row(f"1 prompt × {args.length} tokens", "best per-token (in-place swap)", times["inplace"],
                times["one_pass_1"], inplace_single, None),
            row(f"{n} prompts × {args.length} tokens, per example", "best per-token (in-place swap)",
                times["inplace"], per_example_batch, inplace_batched, None),
        ],
        checks=diffs,
        config={"length": args.length, "batch": n, "reps": reps, "spec": spec.model_dump(mode="json", by_alias=True),
                "graft_effect_max_abs_logit_change": graft_effect,
                "float_noise_threshold": FLOAT_NOISE},
        raw={"seconds": times, "paper_phase_seconds": stats},
    )
    total = sum(stats.values()) or 1.0
    result.notes.append(
        f"the paper method runs batch size 1, so its time per example is measured on {reps} of the "
        f"{n} prompts (prompt r in repetition r) and compared with the one-pass batch's time / {n}")
    result.notes.append(
        "paper method time split: " + ", ".join(f"{k} {100 * v / total:.0f}%" for k, v in stats.items()))
    result.notes.append(f"the graft moves the logits by up to {graft_effect:.3g} (so the checks are not vacuous)")
    return result.finish(args, argv)


if __name__ == "__main__":
    main()
