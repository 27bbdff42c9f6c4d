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

    from ..util.io import loading_model
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
    for donor in donors:  # an adapter for modules this model lacks would "fit" with nothing sent
        check = getattr(donor, "check_against", None)
        if callable(check):
            check(model)
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

