#!/usr/bin/env python
"""Logit lens under grafts: at the last token, after every layer, how likely is the answer?

For P, F, FE (F's blocks at the first actor), LT (at the last token) and FE+LT, the hidden state
after each layer at the last token is read inside one nnsight trace per graft (``Grafter.trace``)
and decoded with P's final norm and LM head. Where the curve rises is where the answer appears in
the residual stream — e.g. whether it shows up earlier, or only at all, under FE+LT.

    python recipes/logit_lens.py            # SmolLM2-135M + the demo's F (as `nngraft demo`:
                                            # finetuned once, then reused from the cache)
    python recipes/logit_lens.py --tiny     # a tiny random pair on CPU, seconds (a smoke run)

Writes OUT/logit_lens.json (per graft and layer: mean target probability, mean log-probability,
top-1 and top-10 rate over the facts) and OUT/logit_lens.png (+ .svg).
The lens is P's readout for every row, so for F (whose own final norm and LM head differ) the
last point is P's reading of F's residual stream, not F's output; for FE, LT and FE+LT, which graft
blocks only, the last point is exactly the grafted model's output (tested).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Sequence

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

VARIANTS = ["p", "f", "fe", "lt", "fe_lt"]
LABELS = {"p": "P", "f": "F", "fe": "FE", "lt": "LT", "fe_lt": "FE+LT"}


def last_token_lens(g: Any, spec: Any, prompts: Sequence[str], spans: Sequence[dict], target_ids: Sequence[int],
                    batch_size: int = 32) -> dict[str, list[float]]:
    """Per layer, over the prompts: mean probability and log-probability of the target at the last
    token through P's final norm and LM head, and the top-1 / top-10 rates."""
    import nnsight
    import torch

    from nngraft.arch import get_module

    adapter, P = g.adapter, g.model
    norm = get_module(P, adapter.ln_final) if adapter.ln_final else torch.nn.Identity()
    head = get_module(P, adapter.lm_head)
    lm = g.model_envoy
    layers = [lm.get(f"{adapter.layers_path}.{i}") for i in range(g.n_layers)]
    logps = []
    for start in range(0, len(prompts), batch_size):
        chunk = slice(start, start + batch_size)
        with torch.no_grad():
            with g.trace(spec, prompts[chunk], spans=spans[chunk]):
                hidden = nnsight.save([])
                for layer in layers:
                    out = layer.output
                    hidden.append((out[0] if isinstance(out, tuple) else out)[:, -1])
            stacked = torch.stack([h.detach() for h in hidden], 1)  # (batch, layers, hidden)
            logps.append(torch.log_softmax(head(norm(stacked)).float(), -1))
    logp = torch.cat(logps)  # (prompts, layers, vocab)
    ids = torch.tensor(list(target_ids))[:, None, None].expand(-1, logp.shape[1], 1)
    chosen = logp.gather(2, ids)[..., 0]
    rank = (logp > chosen[..., None]).sum(-1)
    return {"prob": chosen.exp().mean(0).tolist(), "logprob": chosen.mean(0).tolist(),
            "top1": (rank < 1).float().mean(0).tolist(), "top10": (rank < 10).float().mean(0).tolist()}


def tiny_setup(args: argparse.Namespace) -> tuple[Any, Any, Any, list[Any], str]:
    from nngraft.study.data import make_facts, make_test_examples
    from nngraft.testing import tiny_pair

    P, F, tok = tiny_pair(args.tiny)
    facts = make_facts("fake_movies_fake_actors", args.facts or 4, seed=args.seed)
    return P, F, tok, make_test_examples(facts, args.template), f"tiny-{args.tiny}"


def demo_setup(args: argparse.Namespace) -> tuple[Any, Any, Any, list[Any], str]:
    """P, the demo's F (finetuned on the demo's facts exactly as `nngraft demo` does, so it shares
    the demo's cache entry), the tokenizer and the test examples."""
    import torch

    from nngraft.study import demo
    from nngraft.donors.loading import load_model
    from nngraft.study.data import make_facts, make_test_examples

    options = demo.DemoOptions(facts=args.facts, seed=args.seed, device=args.device)
    device = ("cuda" if torch.cuda.is_available() else "cpu") if options.device == "auto" else options.device
    P, tok = load_model(options.model, device=device)
    facts = make_facts(demo.DATASET, options.facts, seed=options.seed)
    F, _, cached, folder = demo.finetune_demo_model(P, tok, facts, options)
    print(f"F: {'reused' if cached else 'finetuned and cached'} in {folder}", file=sys.stderr)
    return P, F, tok, make_test_examples(facts, args.template), demo.MODEL_LABEL


def plot(results: dict[str, dict[str, list[float]]], title: str, path: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from nngraft.util.io import atomic_save_figure

    fig, (ax_p, ax_top) = plt.subplots(1, 2, figsize=(11, 4), constrained_layout=True)
    styles = {"p": ("0.45", "--"), "f": ("black", "-"), "fe": ("tab:blue", "-"), "lt": ("tab:orange", "-"),
              "fe_lt": ("tab:green", "-")}
    for name, curves in results.items():
        color, line = styles[name]
        layers = range(len(curves["prob"]))
        ax_p.plot(layers, curves["prob"], line, color=color, marker="o", markersize=3, label=LABELS[name])
        ax_top.plot(layers, curves["top10"], line, color=color, marker="o", markersize=3, label=LABELS[name])
    ax_p.set(xlabel="layer (hidden state after it, at the last token)", ylabel="mean p(answer) through P's readout",
             yscale="log", title="target probability")
    ax_top.set(xlabel="layer", ylabel="share of facts with the answer in the top 10", ylim=(-0.03, 1.03),
               title="answer in the top 10")
    ax_p.legend(title="grafted", fontsize=8)
    fig.suptitle(title, fontsize=10)
    written = [atomic_save_figure(fig, path.with_suffix(suffix), dpi=130) for suffix in (".png", ".svg")]
    plt.close(fig)
    return written


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tiny", nargs="?", const="llama", metavar="MODEL_TYPE",
                   help="tiny random P/F pair of this model type (default llama): a smoke run")
    p.add_argument("--facts", type=int, help="number of facts (default: the demo's 24; --tiny: 4)")
    p.add_argument("--seed", type=int, default=0, help="dataset seed (default 0, the demo's)")
    p.add_argument("--template", default="sentence_3", help="test template (default the demo's sentence_3)")
    p.add_argument("--device", default="auto")
    p.add_argument("--out", default="nngraft-logit-lens", help="output folder")
    args = p.parse_args(argv)

    from nngraft import Grafter
    from nngraft.util.io import atomic_write_text
    from nngraft.result import target_token_id
    from nngraft.study.grids import paper_specs

    P, F, tok, examples, label = tiny_setup(args) if args.tiny else demo_setup(args)
    g = Grafter(P, F, tok)
    specs = paper_specs()
    prompts = [e.prompt for e in examples]
    spans = [e.spans for e in examples]
    targets = [target_token_id(tok, e.prompt, e.answer) for e in examples]
    results = {name: last_token_lens(g, specs[name], prompts, spans, targets) for name in VARIANTS}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    record = {"model": label, "template": args.template, "facts": len(examples), "lens": "P's final norm and LM head",
              "position": "last token", "variants": {LABELS[k]: v for k, v in results.items()}}
    atomic_write_text(out / "logit_lens.json", json.dumps(record, indent=1) + "\n")
    title = f"logit lens at the last token — {label}, {args.template}, {len(examples)} facts"
    written = plot(results, title, out / "logit_lens")
    for name, curves in results.items():
        best = max(range(len(curves["prob"])), key=lambda i: curves["prob"][i])
        print(f"{LABELS[name]:>6}: p(answer) after the last layer {curves['prob'][-1]:.4f}, "
              f"top-10 {curves['top10'][-1]:.2f}; highest after layer {best} ({curves['prob'][best]:.4f})")
    print(f"wrote {out / 'logit_lens.json'}, {', '.join(str(w) for w in written)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
