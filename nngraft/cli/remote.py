"""``nngraft payload``: how much a remote (NDIF) run of some specs would send, before sending it.

    nngraft payload recipes/specs/lt_mlp.json --model meta-llama/Meta-Llama-3.1-8B \\
        --donor dense --donor delta:16 --donor lora:16 --dtype bfloat16

``--model`` is a Hub id, a checkpoint folder or a ``config.json``: only the config is read (the
model is built on the meta device, without weights). Each ``--donor`` is a form (``dense``,
``delta``, ``delta:R``, ``lora:R[:module,module]``) or ``adapter:PATH`` for a real PEFT LoRA
adapter. The specs are checked against the model (components, layers) on the way.
"""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from ..util.checks import positive_int_arg, positive_number_arg
from .registry import command, console, out


def _meta_model(name: str) -> Any:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from ..util.inputs import loading_model
    from ..donors.loading import ModelLoadError, resolve_model

    path = Path(name)
    if path.name == "config.json" and path.is_file():
        location = str(path.parent)
    else:  # any model name (hub ids from the local cache; offline: an error naming what is cached)
        source = resolve_model(name)
        if source.kind == "adapter":
            raise ModelLoadError(f"{name} is a LoRA adapter; give its base model as --model and the "
                                 f"adapter as --donor adapter:{name}")
        location = source.location
    with loading_model("the recipient's config", name):
        config = AutoConfig.from_pretrained(location)
    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config)


def _donor(text: str) -> Any:
    from ..donors.delta import LoraDonor
    from ..backends.ndif import ShapeDonor

    if text.startswith("adapter:"):
        return LoraDonor(text[len("adapter:"):])
    return ShapeDonor.parse(text)


def _cmd_payload(args: argparse.Namespace) -> int:
    """Estimate the payload of a remote run (donor bytes per request) from shapes only."""
    import torch
    from rich.table import Table

    from ..backends.ndif import DEFAULT_MAX_PAYLOAD_MB, estimate_payload, format_bytes
    from ..backends.payload import spec_modules
    from ..backends.traffic import estimate_traffic
    from ..arch import adapter_for
    from ..spec import GraftSpec

    specs = [GraftSpec.load(p) for p in args.specs]
    try:
        donors = [_donor(d) for d in (args.donor or ["dense", "delta:16", "lora:16"])]
    except ValueError as error:
        from .registry import alert

        alert(f"[red]usage error:[/red] {error}")
        return 2
    model = _meta_model(args.model)
    dtype = getattr(torch, args.dtype)
    limit = int((args.limit_mb if args.limit_mb is not None else DEFAULT_MAX_PAYLOAD_MB) * 1e6)
    table = Table(title=f"{args.model}: {', '.join(s.name for s in specs)} ({args.dtype})")
    for column in ("donor", "modules sent", "skipped", "donor bytes", f"limit {format_bytes(limit)}",
                   "activation reads", "sandbox round trips", "sandbox bytes"):
        table.add_column(column, justify="left" if column == "donor" else "right")
    modules = spec_modules(specs, adapter_for(model), model.config)
    for donor in donors:
        report = estimate_payload(specs, model, donor, dtype, limit_bytes=limit)
        sent = [i for i in report.items if i.mode != "skip"]
        paths = list(dict.fromkeys(path for (path, _, _), item in zip(modules, report.items) if item.mode != "skip"))
        traffic = estimate_traffic(paths, model, args.rows, args.tokens, torch.bfloat16)
        table.add_row(report.donor, str(len(sent)), str(len(report.skipped)), format_bytes(report.total_bytes),
                      "[green]fits[/green]" if report.total_bytes <= limit else "[red]over[/red]",
                      str(traffic.reads), str(traffic.round_trips), format_bytes(traffic.bytes))
        if args.per_module:
            out.print(f"\n{report.donor}\n{report.table()}")
    out.print(table)
    out.print("Each request also carries the inputs and nnsight's description of the model (about 70 kB "
              "for Llama-3-8B; see docs/benchmarks.md), and is zstd-compressed on the way.")
    out.print(f"Activation traffic is per request of {args.rows} rows × {args.tokens} tokens with bfloat16 "
              "activations, on NDIF's sandboxed path (ordinary API keys), where every activation the "
              "request reads crosses a socket twice (NDIF writes each read back); see docs/remote.md.")
    return 0


def _payload_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("specs", nargs="+", help="spec JSON files (one request grafts all of them)")
    p.add_argument("--model", required=True, help="the recipient P: a hub id (read from the local Hugging Face "
                   "cache; only its config), a model folder, a config.json, 'smollm2' or a .gguf file")
    p.add_argument("--donor", action="append", default=None,
                   help="dense | delta | delta:R | lora:R[:mod,mod] | adapter:PATH (repeatable; "
                   "default: dense, delta:16, lora:16)")
    p.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"],
                   help="dtype the tensors travel in (default bfloat16)")
    p.add_argument("--limit-mb", type=positive_number_arg, default=None, help="payload limit to compare against")
    p.add_argument("--per-module", action="store_true", help="also print bytes per module")
    p.add_argument("--rows", type=positive_int_arg, default=64, help="rows per request, for activation traffic (default 64)")
    p.add_argument("--tokens", type=positive_int_arg, default=32, help="tokens per row, for activation traffic (default 32)")


command("payload", _payload_args)(_cmd_payload)


def _donor_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["compress"], help="compress: F − P as a LoRA adapter (truncated SVD)")
    p.add_argument("finetuned", help="F: a model folder, hub id (from the local cache), 'smollm2' or a .gguf file")
    p.add_argument("pretrained", help="P, the same way")
    p.add_argument("--out", required=True, type=Path, help="the adapter folder to write (new or empty)")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--rank", type=positive_int_arg, help="the rank of every module's factors")
    how.add_argument("--energy", type=positive_number_arg,
                     help="per module, the smallest rank keeping this fraction of ‖ΔW‖² (0 < E <= 1)")
    p.add_argument("--spec", action="append", default=None,
                   help="compress only the linear modules these spec JSON files graft (repeatable; default: "
                   "every linear layer but the LM head)")
    p.add_argument("--base-model", default=None, help="P's Hub id, recorded as the adapter's base model")
    p.add_argument("--demo-out", type=Path, default=None,
                   help="a `nngraft demo` output folder (its facts.jsonl and template): also report what the "
                   "approximation costs on the FE+LT graft's recovery there")
    p.add_argument("--per-module", action="store_true", help="one table row per module (default: the 5 worst)")


def _cmd_donor(args: argparse.Namespace) -> int:
    """Donor tools: `nngraft donor compress F P --out DIR --rank R` writes F − P as a LoRA adapter."""
    import json

    from rich.progress import Progress

    from ..donors.compress import compress_donor, report_table
    from ..donors.loading import load_model
    from ..errors import ArgumentError

    if args.energy is not None and args.energy > 1:
        raise ArgumentError(f"nngraft donor compress: --energy should be a fraction in (0, 1], got {args.energy}")
    F, _ = load_model(args.finetuned)
    P, tokenizer = load_model(args.pretrained)
    modules = None
    if args.spec:
        from ..arch import adapter_for
        from ..arch import get_module
        from ..arch import stores_weight_in_out
        from ..backends.payload import spec_modules
        from ..spec import GraftSpec

        import torch

        paths = dict.fromkeys(path for path, _, _ in spec_modules([GraftSpec.load(s) for s in args.spec],
                                                                  adapter_for(P), P.config))
        modules = [p for p in paths if isinstance(get_module(P, p), torch.nn.Linear)
                   or stores_weight_in_out(get_module(P, p))]
    with Progress(console=console, transient=True, disable=args.quiet) as bar:
        task = bar.add_task("SVD of F − P per module", total=None)
        report = compress_donor(F, P, args.out, rank=args.rank, energy=args.energy, modules=modules,
                                base_model=args.base_model, progress=lambda done, total: bar.update(task, completed=done,
                                                                                               total=total))
    out.print(report_table(report, per_module=args.per_module))
    total_bytes = sum(m.nbytes_bf16 for m in report.modules)
    out.print(f"{len(report.modules)} modules in {args.out} ({total_bytes / 1e6:.1f} MB of factors in bfloat16); "
              f"all together ‖ΔW − B·A‖/‖ΔW‖ = {report.total_rel_error:.3f}; worst {report.worst.path} "
              f"({report.worst.rel_error:.3f}). Nothing was uploaded.")
    if report.dropped:
        worst = max(report.dropped, key=lambda d: d[1])
        out.print(f"[yellow]A LoRA adapter cannot hold {len(report.dropped)} other changed tensors (norms, biases, "
                  f"embeddings, the LM head): they stay P's (largest change ‖ΔW‖/‖W_P‖ = {worst[1]:.3f}, "
                  f"{worst[0]}).[/yellow]")
    if args.demo_out is not None:
        from ..study.compress_check import recovery_cost
        from ..study.data import load_facts

        manifest = json.loads((args.demo_out / "manifest.json").read_text())
        facts = load_facts(args.demo_out / "facts.jsonl")
        rows = recovery_cost(P, F, tokenizer, {"this adapter": args.out}, facts, manifest["demo"]["template"])
        for row in rows:
            out.print(f"{row['donor']}: alone recovers {row['alone_recovery']:+.2f} of F; FE+LT graft recovery "
                      f"{row['graft_recovery']:+.2f} (mean p(target) {row['graft_prob']:.3f}; P {row['p_prob']:.3f})")
    return 0


command("donor", _donor_args)(_cmd_donor)
