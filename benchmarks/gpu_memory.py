"""GPU memory of a graft, by accounting on meta tensors (nothing is downloaded or allocated).

For Llama-3 shapes (configs written out below, the published ones; the models are built on the
``meta`` device), the bytes a graft holds on the GPU:

- **P** in bfloat16: every parameter of P (tied parameters once);
- **grafted F**: F's tensors for exactly the modules the spec grafts, in P's dtype (what a lazy
  ``SafetensorsDonor`` reads and keeps: it reads only those, casts them to P's dtype and puts each
  on the device of the P module it replaces, and keeps them for the run);
- **activations** of one forward pass at ``--batch`` × ``--tokens`` (no KV cache: scoring runs
  keep none): the widest transient of one layer (its input, the normed input, q/k/v/o, the
  attention scores of one layer in float32, gate/up/act of the MLP), nngraft's scratch buffers
  (about one layer's widest activation, kept from pass to pass), the hidden states passed
  between layers and the last position's logits in float32.

Peak = P + grafted F + activations. For each spec the table also gives the largest model of the
Llama-3 family's proportions that fits one 80 GB card (80·10⁹ bytes, minus 2 GiB for the CUDA
context and allocator): solved from the bytes per parameter the spec costs at the 70B shape; and
how many such cards a ``device_map`` split needs (peak ÷ usable bytes per card, rounded up;
accelerate balances layers, so in practice one more card may be needed for an uneven split).

    python -m benchmarks.gpu_memory             # the table (markdown) on stdout
    python -m benchmarks.gpu_memory --json      # the numbers
"""

from __future__ import annotations

import argparse
import json
import math
from typing import Any

import torch

LLAMA3 = {  # config.json of the published checkpoints (shapes only)
    "Llama-3.2-1B": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True),
    "Llama-3-8B": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
    "Llama-3-70B": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, vocab_size=128256, tie_word_embeddings=False),
}
SPECS = {  # name -> the spec (components at all layers; positions do not change memory)
    "LT MLPs": {"components": ["mlp"], "positions": [{"last": True}]},
    "FE+LT": {"components": ["all"], "positions": [{"span": "first_actor"}, {"last": True}]},
    "everything": {"components": ["everything"], "positions": [{"last": True}]},
}
CARD_BYTES = 80e9
RESERVED_BYTES = 2 * 2**30  # CUDA context, cuBLAS workspace, allocator fragmentation
GIB = 2**30


def meta_model(config: Any) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)


def llama_config(shape: dict) -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(**shape)


def unique_bytes(tensors: list[torch.Tensor], dtype: torch.dtype) -> int:
    seen: dict[int, int] = {}
    for t in tensors:
        seen[id(t)] = t.numel() * dtype.itemsize
    return sum(seen.values())


def grafted_params(model: torch.nn.Module, components: list[str]) -> list[torch.Tensor]:
    """The parameters of the modules a rule with ``components`` at all layers grafts."""
    from nngraft.arch import adapter_for
    from nngraft.arch import get_module
    from nngraft.backends.payload import spec_modules
    from nngraft.spec import GraftSpec

    adapter = adapter_for(model)
    spec = GraftSpec.model_validate({"schema_version": "1", "name": "memory", "rules": [
        {"components": components, "layers": "all", "positions": [{"last": True}]}]})
    paths = [path for path, _, _ in spec_modules([spec], adapter, model.config)]
    return [p for path in paths for p in get_module(model, path).parameters()]


def activation_bytes(config: Any, batch: int, tokens: int, dtype: torch.dtype = torch.bfloat16) -> int:
    """Peak activations of one scoring forward pass (see the module docstring)."""
    h, m, v = config.hidden_size, config.intermediate_size, config.vocab_size
    heads, kv = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or h // heads
    cells, size = batch * tokens, dtype.itemsize
    attention = cells * (3 * h + 2 * kv * head_dim) * size + batch * heads * tokens * tokens * 4 * 2
    mlp = cells * (2 * h + 3 * m) * size
    layer = max(attention, mlp)
    scratch = cells * max(h, m) * size * 2  # gathered inputs + grouped outputs, kept between passes
    return layer + scratch + 2 * cells * h * size + batch * v * 4


def account(name: str, shape: dict, batch: int, tokens: int) -> dict[str, Any]:
    config = llama_config(shape)
    model = meta_model(config)
    params = list(model.parameters())
    n_params = sum(p.numel() for p in {id(p): p for p in params}.values())
    p_bytes = unique_bytes(params, torch.bfloat16)
    act = activation_bytes(config, batch, tokens)
    rows = {}
    for spec, rule in SPECS.items():
        f_bytes = unique_bytes(grafted_params(model, rule["components"]), torch.bfloat16)
        rows[spec] = {"P_bytes": p_bytes, "F_bytes": f_bytes, "activation_bytes": act,
                      "peak_bytes": p_bytes + f_bytes + act,
                      "fits_80GB": p_bytes + f_bytes + act <= CARD_BYTES - RESERVED_BYTES,
                      "gpus_80GB": math.ceil((p_bytes + f_bytes + act) / (CARD_BYTES - RESERVED_BYTES))}
    return {"model": name, "params": n_params, "specs": rows}


def largest_fitting(rows: dict[str, Any]) -> dict[str, float]:
    """Largest parameter count of the same proportions (bytes per parameter of the given row's
    weights, its activations held fixed) that fits one 80 GB card, per spec."""
    out = {}
    for spec, row in rows["specs"].items():
        per_param = (row["P_bytes"] + row["F_bytes"]) / rows["params"]
        out[spec] = (CARD_BYTES - RESERVED_BYTES - row["activation_bytes"]) / per_param
    return out


def table(batch: int = 32, tokens: int = 64) -> tuple[str, list[dict[str, Any]]]:
    results = [account(name, shape, batch, tokens) for name, shape in LLAMA3.items()]
    biggest = largest_fitting(results[-1])
    lines = [f"| model (bf16) | spec | P | grafted F | activations ({batch}×{tokens} tokens) | peak | one 80 GB GPU | 80 GB GPUs needed |",
             "| --- | --- | ---: | ---: | ---: | ---: | --- | ---: |"]
    for r in results:
        for spec, row in r["specs"].items():
            lines.append(f"| {r['model']} ({r['params'] / 1e9:.2f} B) | {spec} | {row['P_bytes'] / GIB:.1f} GiB | "
                         f"{row['F_bytes'] / GIB:.1f} GiB | {row['activation_bytes'] / GIB:.2f} GiB | "
                         f"{row['peak_bytes'] / GIB:.1f} GiB | {'fits' if row['fits_80GB'] else 'does not fit'} | {row['gpus_80GB']} |")
    lines += ["", "| spec | largest Llama-3-shaped model on one 80 GB GPU |", "| --- | ---: |"]
    lines += [f"| {spec} | {n / 1e9:.1f} B parameters |" for spec, n in biggest.items()]
    for r in results:
        r["largest_fitting_params"] = biggest
    return "\n".join(lines), results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--json", action="store_true", help="print the numbers as JSON")
    args = parser.parse_args(argv)
    text, results = table(args.batch, args.tokens)
    print(json.dumps(results, indent=1) if args.json else text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
