"""``nngraft donor compress``: a full finetune as a LoRA adapter (truncated SVD of F − P), and what
that costs on the demo's FE+LT recovery (``--demo-out``); see docs/remote.md."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..cli.registry import command, console, out
from ..util.checks import positive_int_arg, positive_number_arg


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

    from ..util.progress import progress_bar
    from ..donors.compress import compress_donor, report_table
    from ..donors.loading import load_model
    from ..errors import ArgumentError

    if args.energy is not None and args.energy > 1:
        raise ArgumentError(f"nngraft donor compress: --energy should be a fraction in (0, 1], got {args.energy}")
    demo = _demo_output(args.demo_out) if args.demo_out is not None else None  # before minutes of SVD
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
    with progress_bar(console=console, transient=True, disable=args.quiet) as bar:
        task = bar.add_task("SVD of F − P per module", total=None, unit="modules")
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
    if demo is not None:
        from .compress_check import recovery_cost

        facts, template = demo
        rows = recovery_cost(P, F, tokenizer, {"this adapter": args.out}, facts, template)
        for row in rows:
            out.print(f"{row['donor']}: alone recovers {row['alone_recovery']:+.2f} of F; FE+LT graft recovery "
                      f"{row['graft_recovery']:+.2f} (mean p(target) {row['graft_prob']:.3f}; P {row['p_prob']:.3f})")
    return 0


def _demo_output(folder: Path) -> tuple[list, str]:
    """The facts and template of a `nngraft demo` output folder, or an ArgumentError saying what is missing."""
    import json

    from ..errors import ArgumentError
    from .data import load_facts

    what = f"nngraft donor compress: --demo-out {folder}"
    if not folder.is_dir():
        raise ArgumentError(f"{what}: no such folder; give the output folder of a `nngraft demo` run")
    try:
        template = json.loads((folder / "manifest.json").read_text())["demo"]["template"]
    except (OSError, ValueError, KeyError, TypeError):
        raise ArgumentError(f"{what}: not a `nngraft demo` output folder (its manifest.json, with the demo's "
                            "template, is missing or unreadable)") from None
    if not (folder / "facts.jsonl").is_file():
        raise ArgumentError(f"{what}: the demo's facts.jsonl is missing")
    return load_facts(folder / "facts.jsonl"), template


command("donor", _donor_args)(_cmd_donor)
