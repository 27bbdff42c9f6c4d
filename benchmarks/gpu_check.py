"""GPU check (CUDA only): exactness of the one-pass graft in float32 and bfloat16, and timing rows
with GPU columns. Run by benchmarks/gpu_check.sh, which also runs the sandbox harness on the GPU;
writes benchmarks/results/gpu_check.json and the "GPU check" section of docs/benchmarks.md.

1. **Exactness (core cases).** On every tiny architecture, on the GPU: the one-pass graft of
   "everything at FE+LT" and of "mlp at LT" against the literal per-token weight swap
   (tests/reference.py), in float32 (must hold at the suite's 2e-5 / 1e-4) and in bfloat16 (P and F
   in bfloat16; tolerance derived per case: both are bfloat16 roundings of one function, each within
   ε = max|reference bf16 − reference fp32| of the exact result, so they must agree within 2ε).
2. **Timing rows, GPU columns.** Plain forward of P, one-pass graft (LT, FE+LT) and a grid of 8 specs
   in one batch, tiny Llama and SmolLM2-135M, float32 and bfloat16: median of 20 runs after 3
   warm-ups, CUDA-synchronized.

    python -m benchmarks.gpu_check [--no-docs]     # needs a CUDA device; exits 2 without one
"""

from __future__ import annotations

import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .common import docs_script_args, publish

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
HEADING = "## GPU check"
PROMPT = "Ada Lovelace stars in a movie alongside"
SPANS = {"first_actor": "Ada Lovelace"}


def exactness(device: str) -> list[dict[str, Any]]:
    sys.path.insert(0, str(ROOT))
    from nngraft import GraftRule, GraftSpec, Grafter, Last, Span
    from nngraft.arch import adapter_for
    from nngraft.testing import TINY_MODEL_TYPES, tiny_pair
    from tests.reference import component_swaps, per_token_reference

    specs = {"everything FE+LT": (["everything"], True), "mlp LT": (["mlp"], False)}
    rows = []
    for arch in TINY_MODEL_TYPES:
        P0, F0, tok = tiny_pair(arch)
        adapter = adapter_for(P0)
        ids = tok(PROMPT)["input_ids"]
        g32 = Grafter(copy.deepcopy(P0).to(device), copy.deepcopy(F0).to(device), tok)
        span = set(g32.tokenize([PROMPT], [SPANS])[0].spans["first_actor"])
        for name, (components, fe) in specs.items():
            positions = [Span(span="first_actor"), Last()] if fe else [Last()]
            spec = GraftSpec(rules=[GraftRule(components=components, positions=positions)])
            block, global_ = adapter.expand(components)
            swaps = [s for c in global_ for s in component_swaps(P0, adapter, c, None)]
            swaps += [s for c in block for layer in range(adapter.n_layers(P0.config))
                      for s in component_swaps(P0, adapter, c, layer)]
            table = lambda t: swaps if (t == len(ids) - 1 or (fe and t in span)) else []  # noqa: E731
            result = {"arch": arch, "spec": name}
            refs = {}
            for dtype in (torch.float32, torch.bfloat16):
                P, F = copy.deepcopy(P0).to(device, dtype), copy.deepcopy(F0).to(device, dtype)
                refs[dtype], _ = per_token_reference(P, F, ids, table)
                got = Grafter(P, F, tok).run(spec, [PROMPT], [SPANS], all_logits=True).all_logits[0]
                result[str(dtype).removeprefix("torch.")] = float((got.float() - refs[dtype].float()).abs().max())
            eps = float((refs[torch.bfloat16].float() - refs[torch.float32].float()).abs().max())
            close32 = torch.allclose(Grafter(copy.deepcopy(P0).to(device), copy.deepcopy(F0).to(device), tok)
                                     .run(spec, [PROMPT], [SPANS], all_logits=True).all_logits[0],
                                     refs[torch.float32], atol=2e-5, rtol=1e-4)
            result.update(bf16_tolerance=2 * eps, ok_float32=bool(close32), ok_bfloat16=result["bfloat16"] <= 2 * eps)
            rows.append(result)
            print(json.dumps(result), file=sys.stderr)
    return rows


def _median_ms(fn, repeats: int = 20, warmup: int = 3) -> float:
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def timing(device: str) -> list[dict[str, Any]]:
    from nngraft import GraftRule, GraftSpec, Grafter, Last, Span

    from .common import load_models

    specs = {"LT": GraftSpec(rules=[GraftRule(components=["all"], positions=[Last()])]),
             "FE+LT": GraftSpec(rules=[GraftRule(components=["all"], positions=[Span(span="first_actor"), Last()])])}
    grid = [GraftSpec(name=f"l{i}", rules=[GraftRule(components=["mlp"], layers=[i], positions=[Last()])])
            for i in range(8)]
    prompts, spans = [PROMPT] * 8, [SPANS] * 8
    rows = []
    for name in ("tiny", "smollm2"):
        models = load_models(name)
        P0, F0, tok = models.P, models.F, models.tokenizer
        for dtype in (torch.float32, torch.bfloat16):
            P = copy.deepcopy(P0).to(device, dtype)  # the plain forward's own, never wrapped by nnsight
            g = Grafter(copy.deepcopy(P0).to(device, dtype), copy.deepcopy(F0).to(device, dtype), tok)
            batch = tok(prompts, return_tensors="pt", padding=True).to(device)
            row = {"model": name, "dtype": str(dtype).removeprefix("torch.")}
            with torch.no_grad():
                row["plain forward, 8 prompts (ms)"] = _median_ms(lambda: P(**batch))
            for label, spec in specs.items():
                row[f"{label} graft, 8 prompts (ms)"] = _median_ms(lambda: g.run(spec, prompts, spans))
            row["grid of 8 specs × 8 prompts (ms)"] = _median_ms(lambda: g.run_grid(grid, prompts, spans), repeats=5)
            rows.append(row)
            print(json.dumps(row), file=sys.stderr)
    return rows


def render(result: dict[str, Any]) -> str:
    ex, tm = result["exactness"], result["timing"]
    ok32 = sum(r["ok_float32"] for r in ex)
    ok16 = sum(r["ok_bfloat16"] for r in ex)
    lines = [BEGIN, f"_Generated by `benchmarks/gpu_check.sh` on {result['gpu']} ({result['date']}; torch "
             f"{result['torch']}, nngraft at `{result['commit']}`)._", "",
             f"**Exactness, one-pass vs per-token reference on the GPU:** float32 {ok32}/{len(ex)} cases within "
             f"2e-5/1e-4; bfloat16 {ok16}/{len(ex)} within the derived 2ε. Sandbox harness on the GPU "
             f"(tests/test_sandbox.py, P on CUDA, NDIF's autocast bracket): **{result['sandbox']}**.", "",
             "| architecture | spec | max diff fp32 | max diff bf16 | bf16 tolerance 2ε |",
             "| --- | --- | ---: | ---: | ---: |"]
    lines += [f"| {r['arch']} | {r['spec']} | {r['float32']:.1e} | {r['bfloat16']:.3f} | {r['bf16_tolerance']:.3f} |"
              for r in ex]
    if tm:
        keys = [k for k in tm[0] if k not in ("model", "dtype")]
        lines += ["", "| model | dtype | " + " | ".join(keys) + " |", "| --- | --- |" + " ---: |" * len(keys)]
        lines += [f"| {r['model']} | {r['dtype']} | " + " | ".join(f"{r[k]:.2f}" for k in keys) + " |" for r in tm]
    lines.append(END)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    import subprocess

    p = docs_script_args(__doc__.splitlines()[0], docs=ROOT / "docs" / "benchmarks.md",
                         results=ROOT / "benchmarks" / "results" / "gpu_check.json")
    p.add_argument("--sandbox", default="not run", help="the sandbox harness's pytest summary line")
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("gpu_check: no CUDA device here; nothing checked", file=sys.stderr)
        return 2
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, cwd=ROOT).stdout.strip()
    result = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "commit": commit or "unknown",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "sandbox": args.sandbox,
              "exactness": exactness("cuda"), "timing": timing("cuda")}
    publish(args, result, render(result), BEGIN, END, HEADING)
    failed = [r for r in result["exactness"] if not (r["ok_float32"] and r["ok_bfloat16"])]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
