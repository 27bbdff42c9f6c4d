"""GPU check: exactness, timings and GPU memory of nngraft on a CUDA GPU, in one run of under 8
minutes, each step guarded and written to the output folder as soon as it finishes.

Steps (a failing step is recorded with its error; the next one still runs):

1. ``environment``: torch, transformers, nnsight versions; the GPUs.
2. ``exactness``: on every tiny architecture, the one-pass graft of "everything at FE+LT" and of
   "mlp at LT" against the literal per-token weight swap (tests/helpers/reference.py), P and F on the GPU,
   in float32 (within the suite's 2e-5 / 1e-4) and bfloat16 (within 2ε, ε = the bfloat16
   reference's own distance from the float32 one).
3. ``split``: the same, float32, with P's layers split over two devices the way ``device_map="auto"``
   splits them (accelerate's ``AlignDevicesHook`` on each placed module): over ``cuda:0`` and
   ``cuda:1`` when two GPUs are visible, else over ``cuda:0`` and the CPU (a real device boundary
   on one GPU); in ``--dry-run`` over two virtual GPUs (tests/helpers/virtual_devices.py).
4. ``timing-1B``, ``timing-8B``: random-weight models of the Llama-3.2-1B and Llama-3-8B shapes
   (built from their configs, nothing downloaded) in bfloat16: a plain pass (empty spec) and the
   grafts "LT MLPs" and "FE+LT" on 8 prompts of 64 tokens, timed in interleaved repetitions
   (CUDA-synchronized; ratio = median of per-repetition graft ÷ plain), a grid of 8 specs × 8
   prompts in one ``run_grid`` (rows per second), and ``torch.cuda.max_memory_allocated`` per
   variant. The 8B step is skipped when too little of the time budget is left.

Output folder (``--out``; ``$OUT`` on the lent GPU machine, whose files come back): ``gpu_check.jsonl``
(one record per step, appended as it finishes) and ``gpu_check.md`` (the docs/benchmarks.md "GPU check"
section, rewritten after each step; ``--publish FILE.jsonl`` puts a finished run's section into
docs/benchmarks.md).

``--dry-run``: the same steps on the CPU with tiny shapes (two architectures, tiny timing models),
for the test suite.

    python -m benchmarks.gpu_check --out DIR [--dry-run] [--budget SECONDS]
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Sequence

import torch

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- gpu-check:begin -->", "<!-- gpu-check:end -->"
HEADING = "## GPU check"
PROMPT = "Ada Lovelace stars in a movie alongside"
SPANS = {"first_actor": "Ada Lovelace"}
SHAPES = {  # published configs, shapes only (random weights)
    "1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
    "8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
DRY_SHAPES = {
    "tiny-a": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512, tie_word_embeddings=True),
    "tiny-b": dict(hidden_size=96, intermediate_size=192, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2, vocab_size=512, tie_word_embeddings=False),
}


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# ---------------------------------------------------------------------------------------------
# Exactness
# ---------------------------------------------------------------------------------------------


def _cases(arch: str):
    """(P, F, tokenizer, ids, {spec name: (spec, swaps table)}) for one tiny architecture."""
    from nngraft import GraftRule, GraftSpec, Last, Span
    from nngraft.arch import adapter_for
    from nngraft.testing import tiny_pair
    from tests.helpers.reference import component_swaps

    P, F, tok = tiny_pair(arch, n_layers=4)
    adapter = adapter_for(P)
    ids = tok(PROMPT)["input_ids"]
    from nngraft import Grafter

    span = set(Grafter(P, F, tok).tokenize([PROMPT], [SPANS])[0].spans["first_actor"])
    cases = {}
    for name, components, fe in (("everything FE+LT", ["everything"], True), ("mlp LT", ["mlp"], False)):
        positions = [Span(span="first_actor"), Last()] if fe else [Last()]
        spec = GraftSpec(rules=[GraftRule(components=components, positions=positions)])
        block, global_ = adapter.expand(components)
        swaps = [s for c in global_ for s in component_swaps(P, adapter, c, None)]
        swaps += [s for c in block for layer in range(adapter.n_layers(P.config))
                  for s in component_swaps(P, adapter, c, layer)]
        cases[name] = (spec, (lambda swaps, fe: lambda t: swaps if (t == len(ids) - 1 or (fe and t in span)) else [])(swaps, fe))
    return P, F, tok, ids, cases


def exactness(device: str, archs: Sequence[str]) -> list[dict[str, Any]]:
    from nngraft import Grafter
    from tests.helpers.reference import per_token_reference

    rows = []
    for arch in archs:
        P0, F0, tok, ids, cases = _cases(arch)
        for name, (spec, table) in cases.items():
            row: dict[str, Any] = {"arch": arch, "spec": name}
            refs, got = {}, {}
            for dtype in (torch.float32, torch.bfloat16):
                P, F = copy.deepcopy(P0).to(device, dtype), copy.deepcopy(F0).to(device, dtype)
                refs[dtype], _ = per_token_reference(P, F, ids, table)
                got[dtype] = Grafter(P, F, tok).run(spec, [PROMPT], [SPANS], all_logits=True).all_logits[0]
                row[str(dtype).removeprefix("torch.")] = float((got[dtype].float().cpu() - refs[dtype].float().cpu()).abs().max())
            eps = float((refs[torch.bfloat16].float().cpu() - refs[torch.float32].float().cpu()).abs().max())
            row["bf16_tolerance"] = 2 * eps
            row["ok_float32"] = bool(torch.allclose(got[torch.float32].cpu(), refs[torch.float32].cpu(), atol=2e-5, rtol=1e-4))
            row["ok_bfloat16"] = row["bfloat16"] <= 2 * eps
            rows.append(row)
    return rows


def split(devices: Sequence[str], archs: Sequence[str], virtual: bool) -> list[dict[str, Any]]:
    """Float32 exactness with P split over ``devices`` like device_map="auto" (see the docstring)."""
    from contextlib import nullcontext

    from accelerate.hooks import AlignDevicesHook, add_hook_to_module

    from nngraft import Grafter
    from nngraft.arch import adapter_for
    from tests.helpers.reference import per_token_reference
    from tests.helpers.virtual_devices import dispatch, split_map, virtual_devices

    rows = []
    for arch in archs:
        P0, F0, tok, ids, cases = _cases(arch)
        for name, (spec, table) in cases.items():
            expected, _ = per_token_reference(copy.deepcopy(P0), copy.deepcopy(F0), ids, table)
            P = copy.deepcopy(P0)
            adapter = adapter_for(P)
            device_map = split_map(P, adapter.layers_path, adapter.n_layers(P.config), 2)
            with virtual_devices() if virtual else nullcontext():
                if virtual:
                    dispatch(P, device_map)
                else:
                    for module_name, index in device_map.items():
                        module = P.get_submodule(module_name).to(devices[index])
                        add_hook_to_module(module, AlignDevicesHook(execution_device=torch.device(devices[index])),
                                           append=True)
                    add_hook_to_module(P, AlignDevicesHook(io_same_device=True), append=True)
                    P.hf_device_map = {k: devices[v] for k, v in device_map.items()}
                placed = sorted({str(p.device) for p in P.parameters()})
                got = Grafter(P, F0, tok).run(spec, [PROMPT], [SPANS], all_logits=True).all_logits[0].cpu()
            diff = float((got - expected).abs().max())
            rows.append({"arch": arch, "spec": name, "devices": placed, "float32": diff,
                         "ok_float32": bool(torch.allclose(got, expected, atol=2e-5, rtol=1e-4))})
    return rows


# ---------------------------------------------------------------------------------------------
# Timing and memory
# ---------------------------------------------------------------------------------------------


def _random_model(shape: dict, device: str, dtype: torch.dtype, seed: int) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(**shape, initializer_range=0.02)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa").eval()


def _prompts(tok: Any, n: int, tokens: int) -> tuple[list[str], list[dict[str, str]]]:
    """``n`` copies of a prompt of at least ``tokens`` tokens that holds the span."""
    filler = "In the city the quiet film follows an actor through one long night. "
    text = PROMPT
    while len(tok(text)["input_ids"]) < tokens:
        text = filler + text
    return [text] * n, [SPANS] * n


def timing(label: str, shape: dict, device: str, dtype: torch.dtype, reps: int) -> dict[str, Any]:
    from nngraft import GraftRule, GraftSpec, Grafter, Last, Span
    from nngraft.testing import tiny_tokenizer

    cuda = device.startswith("cuda")
    tok = tiny_tokenizer("llama")
    P = _random_model(shape, device, dtype, seed=0)
    F = copy.deepcopy(P)
    with torch.no_grad():
        for p in F.parameters():
            p.add_(0.01 * torch.randn_like(p))
    g = Grafter(P, F, tok)
    prompts, spans = _prompts(tok, 8, 64)
    specs = {"plain": GraftSpec(name="p", rules=[]),
             "LT MLPs": GraftSpec(name="lt_mlps", rules=[GraftRule(components=["mlp"], positions=[Last()])]),
             "FE+LT": GraftSpec(name="fe_lt", rules=[GraftRule(components=["all"],
                                                               positions=[Span(span="first_actor"), Last()])])}
    n_layers = shape["num_hidden_layers"]
    grid = [GraftSpec(name=f"mlp{i}", rules=[GraftRule(components=["mlp"], layers=[i % n_layers], positions=[Last()])])
            for i in range(8)]
    row: dict[str, Any] = {"shape": label, "dtype": str(dtype).removeprefix("torch."), "device": device,
                           "params": sum(p.numel() for p in P.parameters()), "prompts": len(prompts),
                           "tokens": len(tok(prompts[0])["input_ids"])}

    def once(fn: Callable[[], Any]) -> float:
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        return time.perf_counter() - start

    memory = {}
    for name, spec in specs.items():  # warm-up, and each variant's peak memory on its own
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        once(lambda: g.run(spec, prompts, spans))
        if cuda:
            memory[name] = torch.cuda.max_memory_allocated()
    times: dict[str, list[float]] = {name: [] for name in specs}
    order = list(specs)
    for rep in range(reps):  # interleaved, rotating order
        for name in order[rep % len(order):] + order[:rep % len(order)]:
            times[name].append(once(lambda: g.run(specs[name], prompts, spans)))
    for name in specs:
        row[f"{name} (ms)"] = 1000 * statistics.median(times[name])
    for name in ("LT MLPs", "FE+LT"):
        ratios = [a / b for a, b in zip(times[name], times["plain"])]
        row[f"{name} ÷ plain"] = statistics.median(ratios)
        row[f"{name} ÷ plain range"] = [min(ratios), max(ratios)]
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    grid_time = min(once(lambda: g.run_grid(grid, prompts, spans)) for _ in range(max(1, reps // 3)))
    if cuda:
        memory["grid"] = torch.cuda.max_memory_allocated()
    row["grid rows/s"] = len(grid) * len(prompts) / grid_time
    row["max_memory_allocated (GiB)"] = {k: v / 2**30 for k, v in memory.items()}
    del g, P, F
    if cuda:
        torch.cuda.empty_cache()
    return row


# ---------------------------------------------------------------------------------------------
# Running the steps, writing as they finish
# ---------------------------------------------------------------------------------------------


def environment() -> dict[str, Any]:
    import nnsight
    import transformers

    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {"torch": torch.__version__, "transformers": transformers.__version__,
            "nnsight": getattr(nnsight, "__version__", "?"), "python": sys.version.split()[0], "gpus": gpus,
            "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.2f} M"


def render(records: list[dict[str, Any]]) -> str:
    by_step = {r["step"]: r for r in records}
    env = by_step.get("environment", {}).get("result", {})
    gpus = ", ".join(env.get("gpus", [])) or "no GPU (dry run on the CPU)"
    lines = [BEGIN, f"_Generated by `benchmarks/gpu_check.sh` on {gpus} ({env.get('date', '?')}; torch "
             f"{env.get('torch', '?')}, transformers {env.get('transformers', '?')}, nnsight {env.get('nnsight', '?')})._", ""]
    for r in records:
        if r["step"] == "environment":
            continue
        head = f"**{r['step']}** ({r['seconds']:.0f} s): "
        if r["status"] != "ok":
            lines += [head + f"{r['status']}: {r.get('error', '')}", ""]
            continue
        result = r["result"]
        if r["step"] in ("exactness", "split"):
            ok = sum(x["ok_float32"] and x.get("ok_bfloat16", True) for x in result)
            lines += [head + f"{ok}/{len(result)} cases exact (float32 within 2e-5/1e-4"
                      + ("; bfloat16 within 2ε" if r["step"] == "exactness" else "") + ").", ""]
            cols = ["float32", "bfloat16", "bf16_tolerance"] if r["step"] == "exactness" else ["float32", "devices"]
            lines += ["| architecture | spec | " + " | ".join(cols) + " |", "| --- | --- |" + " ---: |" * len(cols)]
            for x in result:
                cells = [f"{x[c]:.1e}" if isinstance(x[c], float) else ", ".join(x[c]) for c in cols]
                lines.append(f"| {x['arch']} | {x['spec']} | " + " | ".join(cells) + " |")
            lines.append("")
        else:
            keys = [k for k in result if k.endswith("(ms)") or k.endswith("÷ plain") or k == "grid rows/s"]
            lines += [head + f"{result['shape']} shape ({_count(result['params'])} parameters), "
                      f"{result['dtype']}, {result['prompts']} prompts × {result['tokens']} tokens.", "",
                      "| " + " | ".join(keys) + " |", "|" + " ---: |" * len(keys),
                      "| " + " | ".join(f"{result[k]:.2f}" for k in keys) + " |", ""]
            if result.get("max_memory_allocated (GiB)"):
                mem = result["max_memory_allocated (GiB)"]
                lines += ["max_memory_allocated: " + ", ".join(f"{k} {v:.2f} GiB" for k, v in mem.items()), ""]
    lines.append(END)
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "gpu_check")
    p.add_argument("--dry-run", action="store_true", help="the same steps on the CPU with tiny shapes")
    p.add_argument("--budget", type=float, default=420.0, help="seconds; later timing steps are skipped past it")
    p.add_argument("--publish", type=Path, help="put a finished run's gpu_check.jsonl into docs/benchmarks.md")
    p.add_argument("--docs", type=Path, default=ROOT / "docs" / "benchmarks.md", help="the file --publish writes")
    args = p.parse_args(argv)
    if str(ROOT) not in sys.path:
        sys.path.insert(0, str(ROOT))
    if args.publish:
        from .common import replace_docs_section

        records = [json.loads(line) for line in args.publish.read_text().splitlines() if line.strip()]
        replace_docs_section(args.docs, render(records), BEGIN, END, HEADING)
        return 0
    gpus = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if not args.dry_run and not gpus:
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); use --dry-run on a CPU", file=sys.stderr)
        return 2
    from nngraft.testing import TINY_MODEL_TYPES

    device = "cpu" if args.dry_run else "cuda:0"
    archs = ["llama", "gpt2"] if args.dry_run else list(TINY_MODEL_TYPES)
    split_devices = ["cuda:0", "cuda:1"] if gpus > 1 else ["cuda:0", "cpu"]
    shapes = DRY_SHAPES if args.dry_run else SHAPES
    dtype = torch.float32 if args.dry_run else torch.bfloat16
    reps = 3 if args.dry_run else 10
    args.out.mkdir(parents=True, exist_ok=True)
    jsonl, md = args.out / "gpu_check.jsonl", args.out / "gpu_check.md"
    jsonl.write_text("")
    records: list[dict[str, Any]] = []
    start = time.monotonic()
    steps: list[tuple[str, Callable[[], Any], float]] = [
        ("environment", environment, 0.0),
        ("exactness", lambda: exactness(device, archs), 0.0),
        ("split", lambda: split(split_devices, archs, virtual=args.dry_run), 0.0),
    ]
    # each timing step needs about this much of the budget left (model build, warm-up, reps)
    for (label, shape), need in zip(shapes.items(), (60.0, 150.0)):
        steps.append((f"timing-{label}", (lambda label, shape: lambda: timing(label, shape, device, dtype, reps))(label, shape),
                      0.0 if args.dry_run else need))
    failed = 0
    for name, run, need in steps:
        began = time.monotonic()
        record: dict[str, Any] = {"step": name}
        left = args.budget - (began - start)
        if need and left < need:
            record.update(status="skipped", error=f"{left:.0f} s of the budget left, {need:.0f} s needed")
        else:
            try:
                record.update(status="ok", result=run())
            except Exception as error:  # noqa: BLE001 - one step's failure must not lose the others
                failed += 1
                record.update(status="failed", error=f"{type(error).__name__}: {error}",
                              traceback=traceback.format_exc(limit=8))
        record["seconds"] = time.monotonic() - began
        if record.get("status") == "ok" and name in ("exactness", "split"):
            bad = [x for x in record["result"] if not (x["ok_float32"] and x.get("ok_bfloat16", True))]
            if bad:
                record["status"] = "inexact"
                failed += 1
        records.append(record)
        with jsonl.open("a") as handle:
            handle.write(json.dumps(record) + "\n")
        md.write_text(render(records) + "\n")
        print(f"gpu_check: {name}: {record['status']} in {record['seconds']:.1f} s"
              + (f" ({record.get('error')})" if record.get("error") else ""), file=sys.stderr, flush=True)
    print(render(records))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
