"""Benchmark 4 — peak memory of a graft with a lazily loaded donor vs a fully loaded F.

P and F are saved as ordinary Hugging Face safetensors folders in a temporary directory. Each
variant then runs in its own fresh Python process (so variants cannot pollute each other), which
imports torch/transformers/nngraft, notes its resident memory (the runtime baseline), loads P,
does its work on 32 prompts × 20 tokens, and reports its peak resident memory (``VmHWM``; see
:func:`_peak_rss_bytes` for why not ``getrusage``):

- ``P only``: a plain forward of P (no donor);
- ``lazy donor``: ``Grafter(P, F_folder)`` — a ``SafetensorsDonor`` that reads only the tensors
  the plan needs — grafting F's MLPs of the last 4 layers at the last token;
- ``F from_pretrained``: the same graft with F loaded with ``from_pretrained`` — which in
  transformers 5 memory-maps the safetensors file, so only the pages of the tensors the graft
  reads ever become resident: in practice this is lazy too;
- ``F materialized``: F loaded and every tensor copied into process memory — what "all of F in
  memory" costs (an F finetuned in the same process, loaded from a non-mmapped format, or moved
  to a GPU).

Target: size(P) + size(F's grafted tensors) + 10% (sizes = parameter bytes). Fixed costs
(the Python runtime, lazily imported code, kernel workspaces, activations) are the same in every
variant, so the target is checked on what the graft adds over running P alone:
peak(lazy donor) − peak(P only) ≤ size(grafted tensors) + 10% of size(P). "used" (peak RSS − RSS
right after the imports) is shown too. The logits of the two grafting variants must be identical
(same tensors, same computation).

    python -m benchmarks.bench_memory --model smollm2 --out benchmarks/results/smollm2/bench_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .common import (ROOT, Result, load_models, log, max_abs_diff, parse, parser, prompts_of_length)

SLACK = 1.10
MIN_MEANINGFUL = 64 * 2**20
"""Below this size of P, allocator and import noise (a few MiB) exceeds 10% of P: no verdict."""
VARIANTS = ("P only", "lazy donor", "F from_pretrained", "F materialized")
MIB = 2**20


def _rss_bytes() -> int:
    """Current resident set size of this process."""
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _peak_rss_bytes() -> int:
    """Peak resident memory of this process's own address space: ``VmHWM`` of /proc/self/status.

    Not ``getrusage().ru_maxrss``: Linux carries the parent's high-water mark into a child started
    with fork/vfork + exec (as ``subprocess`` does), so every worker reported the parent's 1.9 GB
    peak. ``ru_maxrss`` is used only where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def worker(variant: str, p_dir: str, f_dir: str, prompts_file: str, out: str, threads: int) -> None:
    """One variant in this (fresh) process; writes {baseline, peak, ...} JSON and logits to ``out``."""
    torch.set_num_threads(threads)
    import transformers  # noqa: F401  (import everything before the baseline)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from nngraft import Grafter

    from .bench_vs_paper import spec_last4_mlp
    from .baselines import plain_forward
    from nngraft.compile.tokens import pad_left

    prompts = json.loads(Path(prompts_file).read_text())
    baseline = _rss_bytes()
    steps: dict[str, dict[str, int]] = {}

    def step(name: str) -> None:
        steps[name] = {"rss": _rss_bytes(), "peak": _peak_rss_bytes()}

    start = time.perf_counter()
    P = AutoModelForCausalLM.from_pretrained(p_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(p_dir)
    step("P loaded")
    texts, spans = [q["text"] for q in prompts], [q["spans"] for q in prompts]
    if variant == "P only":
        g = Grafter(P, P, tokenizer)  # only to tokenize exactly as the grafting variants do
        step("Grafter built")
        batch = pad_left([t.ids for t in g.tokenize(texts, spans)], g.pad_id)
        logits = plain_forward(P, batch)
    else:
        donor: Any = f_dir
        if variant in ("F from_pretrained", "F materialized"):
            donor = AutoModelForCausalLM.from_pretrained(f_dir, dtype=torch.float32).eval()
            if variant == "F materialized":  # every tensor copied into process memory
                for param in donor.parameters():
                    param.data = param.data.clone()
            step("F loaded")
        g = Grafter(P, donor, tokenizer)
        step("Grafter built")
        logits = g.run(spec_last4_mlp(), texts, spans).logits
    step("forward done")
    seconds = time.perf_counter() - start
    torch.save(logits, out + ".logits.pt")
    Path(out).write_text(json.dumps({
        "variant": variant, "baseline_rss": baseline, "steps": steps,
        "peak_rss": _peak_rss_bytes(), "end_rss": _rss_bytes(), "seconds": seconds,
        "donor": type(g.donor).__name__,
    }))


def grafted_bytes(F: torch.nn.Module, paths: Sequence[str]) -> int:
    return sum(p.numel() * p.element_size() for path in paths for p in F.get_submodule(path).parameters())


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    p = parser(__doc__.splitlines()[0], batch=True)
    p.add_argument("--worker", nargs=5, metavar=("VARIANT", "P_DIR", "F_DIR", "PROMPTS", "OUT"),
                   help=argparse.SUPPRESS)
    args = parse(p, argv)
    if args.worker:
        worker(*args.worker, threads=args.threads)
        return {}
    reps = args.reps or 1

    from .baselines import graft_paths

    m = load_models(args.model)
    n_layers = m.grafter.n_layers
    paths = graft_paths(m.adapter, m.P.config, ["mlp"], range(n_layers - 4, n_layers))
    size_p = m.info["parameter_bytes"]
    size_graft = grafted_bytes(m.F, paths)
    prompts = prompts_of_length(m.tokenizer, args.batch, args.length)

    tmp = Path(tempfile.mkdtemp(prefix="nngraft-bench-memory-"))
    try:
        log(f"bench_memory[{args.model}]: saving P and F to {tmp}")
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        m.P.save_pretrained(tmp / "P")
        m.tokenizer.save_pretrained(tmp / "P")
        m.F.save_pretrained(tmp / "F")
        prompts_file = tmp / "prompts.json"
        prompts_file.write_text(json.dumps([{"text": q.text, "spans": dict(q.spans)} for q in prompts]))
        size_f_files = sum(f.stat().st_size for f in (tmp / "F").glob("*.safetensors"))
        info = m.info
        del m  # free the parent's copies before the workers run
        records: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
        for rep in range(reps):
            for variant in VARIANTS:
                out = tmp / f"{variant.replace(' ', '_')}-{rep}.json"
                env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
                proc = subprocess.run(
                    [sys.executable, "-m", "benchmarks.bench_memory", "--threads", str(args.threads),
                     "--worker", variant, str(tmp / "P"), str(tmp / "F"), str(prompts_file), str(out)],
                    cwd=ROOT, env=env, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise RuntimeError(f"memory worker {variant!r} failed:\n{proc.stderr[-3000:]}")
                record = json.loads(out.read_text())
                record["logits"] = torch.load(str(out) + ".logits.pt")
                records[variant].append(record)
                log(f"bench_memory[{args.model}] {variant}: peak {record['peak_rss'] / MIB:.0f} MiB "
                    f"(baseline {record['baseline_rss'] / MIB:.0f} MiB)")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    def used(variant: str) -> float:  # smallest over repetitions: memory noise only adds
        return min(r["peak_rss"] - r["baseline_rss"] for r in records[variant])

    extra_graft = used("lazy donor") - used("P only")
    budget = size_graft + (SLACK - 1) * size_p
    meaningful = size_p >= MIN_MEANINGFUL
    rows = []
    for variant in VARIANTS:
        first = records[variant][0]
        rows.append({
            "variant": variant,
            "donor": {"P only": "—", "lazy donor": "SafetensorsDonor (folder)",
                      "F from_pretrained": "ModelDonor (memory-mapped model)",
                      "F materialized": "ModelDonor (tensors in RAM)"}[variant],
            "runtime baseline MiB": first["baseline_rss"] / MIB,
            "peak RSS MiB": min(r["peak_rss"] for r in records[variant]) / MIB,
            "used MiB (peak − baseline)": used(variant) / MIB,
            "extra over P only MiB": (used(variant) - used("P only")) / MIB,
            "expected extra MiB": {"P only": 0.0, "lazy donor": size_graft / MIB,
                                   "F from_pretrained": size_graft / MIB, "F materialized": size_p / MIB}[variant],
            "target": (f"extra ≤ grafted + 10% of size(P) = {budget / MIB:.3g} MiB"
                       if variant == "lazy donor" else "—"),
            "met": (extra_graft <= budget) if variant == "lazy donor" and meaningful else None,
        })
    checks = {f"lazy donor vs {v}": max_abs_diff(records["lazy donor"][0]["logits"], records[v][0]["logits"])
              for v in ("F from_pretrained", "F materialized")}
    result = Result(
        benchmark="bench_memory",
        title="4. Peak memory: graft of the last 4 layers' MLPs, lazy donor vs all of F loaded",
        model=info,
        columns=["variant", "donor", "runtime baseline MiB", "peak RSS MiB", "used MiB (peak − baseline)",
                 "extra over P only MiB", "expected extra MiB", "target", "met"],
        rows=rows,
        checks=checks,
        config={"length": args.length, "batch": args.batch, "reps": reps, "size_P_bytes": size_p,
                "grafted_bytes": size_graft, "F_safetensors_bytes": size_f_files, "grafted_paths": paths},
        raw={v: [{k: x for k, x in r.items() if k != "logits"} for r in rs] for v, rs in records.items()},
    )
    result.notes.append(f"size(P) = {size_p / MIB:.1f} MiB of parameters; F's grafted tensors = "
                        f"{size_graft / MIB:.1f} MiB ({len(paths)} projections)")
    if not meaningful:
        result.notes.append(f"P is {size_p / MIB:.2g} MiB: below {MIN_MEANINGFUL // MIB} MiB the "
                            "allocator's and the importer's noise exceeds 10% of P, so no verdict")
    result.notes.append("each variant ran in a fresh process; 'used' counts everything the process "
                        "allocated after importing torch, transformers and nngraft (model, tokenizer, "
                        "activations, allocator slack)")
    return result.finish(args, argv)


if __name__ == "__main__":
    main()
