"""Remote payload sizes: what one NDIF request carries for a Llama-3-8B-shaped model when it grafts
the MLPs of the last 4 layers (at the last token), for each way of sending the donor.

Two kinds of numbers, both written to benchmarks/results/payload_sizes.json and to the "Remote
payload sizes" section of docs/benchmarks.md:

- **from shapes** (``nngraft.backends.ndif.estimate_payload``): the bytes of the donor tensors each form
  sends, for the real Llama-3-8B shapes (hidden 4096, MLP 14336, 32 layers, vocab 128256). Exact
  arithmetic; no weights involved.
- **measured**: the real client path (``Grafter.remote`` → nnsight's ``RequestModel.serialize``,
  request checks, zstd) on a weightless (meta) Llama-3-8B built from that config, with a
  synthetic random LoRA adapter of rank 16 and 64, and with an empty spec (the fixed overhead: the
  model's envoy tree, the code, the inputs). The request is captured instead of sent; nothing runs.
  Random bf16 factors barely compress; real adapters compress a little better.

    python -m benchmarks.payload_sizes            # ~1 minute on a laptop CPU; no network
    python -m benchmarks.payload_sizes --no-docs  # do not touch docs/benchmarks.md
"""

from __future__ import annotations

import io
import json
import tempfile
import time
from pathlib import Path
from typing import Any, Sequence

import torch

from .common import docs_script_main

ROOT = Path(__file__).resolve().parent.parent
BEGIN, END = "<!-- remote-payload:begin -->", "<!-- remote-payload:end -->"
HEADING = "## Remote payload sizes"

LLAMA3_8B = dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=8192,
                 rope_theta=500000.0, rms_norm_eps=1e-5, tie_word_embeddings=False)
FORMS = [("dense F tensors, float32", "dense", torch.float32),
         ("dense F tensors, bfloat16", "dense", torch.bfloat16),
         ("dense ΔW = W_F − W_P, bfloat16", "delta", torch.bfloat16),
         ("ΔW at rank 256, bfloat16", "delta:256", torch.bfloat16),
         ("ΔW at rank 64, bfloat16", "delta:64", torch.bfloat16),
         ("ΔW at rank 16, bfloat16", "delta:16", torch.bfloat16),
         ("LoRA r=64 on gate/up/down, bfloat16", "lora:64", torch.bfloat16),
         ("LoRA r=16 on gate/up/down, bfloat16", "lora:16", torch.bfloat16),
         ("LoRA r=8 on gate/up/down, bfloat16", "lora:8", torch.bfloat16)]


def meta_llama3_8b() -> Any:
    from transformers import AutoModelForCausalLM, LlamaConfig

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(LlamaConfig(**LLAMA3_8B))


def spec():
    from nngraft import GraftRule, GraftSpec, Last

    return GraftSpec(name="lt_mlp_last4", rules=[GraftRule(components=["mlp"], layers="last:4", positions=[Last()])])


def synthetic_lora(model: Any, folder: Path, rank: int) -> Path:
    """A PEFT-format adapter folder with random A, B for the last 4 MLPs (what LoraDonor reads)."""
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(rank)
    tensors = {}
    n = model.config.num_hidden_layers
    for layer in range(n - 4, n):
        for proj in ("gate_proj", "up_proj", "down_proj"):
            module = getattr(model.model.layers[layer].mlp, proj)
            key = f"base_model.model.model.layers.{layer}.mlp.{proj}"
            tensors[f"{key}.lora_A.weight"] = (torch.randn(rank, module.in_features, generator=gen) / 64).to(torch.bfloat16)
            tensors[f"{key}.lora_B.weight"] = (torch.randn(module.out_features, rank, generator=gen) / 64).to(torch.bfloat16)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps({
        "peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["gate_proj", "up_proj", "down_proj"],
        "bias": "none", "use_dora": False, "use_rslora": False}))
    return folder


def capture_server(vocab: int):
    """A stand-in for NDIF that records the request and answers with zero logits."""
    seen: list[int] = []

    def serve(metadata: str, blob: bytes) -> bytes:
        from nnsight.schema.request import RequestModel

        seen.append(len(blob))
        buffer = io.BytesIO()
        torch.save({"logits": torch.zeros(1, 1, vocab)}, buffer)
        data = buffer.getvalue()
        if RequestModel.model_validate_json(metadata).compress:
            import zstandard

            data = zstandard.ZstdCompressor(level=3).compress(data)
        return data

    return serve


def measure(model: Any, donor: Any, the_spec: Any) -> dict[str, Any]:
    from nngraft import Grafter
    from nngraft.testing import tiny_tokenizer

    g = Grafter.remote(model, donor, tiny_tokenizer("gpt2"), execution=capture_server(model.config.vocab_size),
                      dtype=torch.bfloat16, max_payload_mb=10_000, verbose=False)
    start = time.perf_counter()
    g.run(the_spec, ["Zendaya Marlow stars in a movie alongside"])
    seconds = time.perf_counter() - start
    request = g.backend.requests[-1]
    return {"donor_bytes": request["donor_bytes"], "request_bytes": request["request_bytes"],
            "sent_bytes_zstd": request["sent_bytes"], "client_seconds": round(seconds, 2)}


def run() -> dict[str, Any]:
    from nngraft import GraftSpec
    from nngraft.donors.delta import LoraDonor
    from nngraft.backends.ndif import ShapeDonor, estimate_payload

    model = meta_llama3_8b()
    the_spec = spec()
    rows = []
    for label, form, dtype in FORMS:
        report = estimate_payload([the_spec], model, ShapeDonor.parse(form), dtype)
        rows.append({"donor": label, "form": form, "dtype": str(dtype).removeprefix("torch."),
                     "modules": len([i for i in report.items if i.mode != "skip"]),
                     "donor_bytes": report.total_bytes})
    whole = sum(p.numel() for p in model.parameters()) * 2
    measured = {}
    with tempfile.TemporaryDirectory() as tmp:
        for rank in (16, 64):
            measured[f"lora:{rank}"] = measure(model, LoraDonor(synthetic_lora(model, Path(tmp) / f"r{rank}", rank)),
                                               the_spec)
        empty = LoraDonor(synthetic_lora(model, Path(tmp) / "r1", 1))
        measured["empty spec"] = measure(model, empty, GraftSpec(name="nothing"))
    return {"model": "Llama-3-8B shapes (meta device, no weights)", "config": LLAMA3_8B,
            "spec": the_spec.model_dump(mode="json"), "whole_model_bf16_bytes": whole,
            "from_shapes": rows, "measured": measured,
            "versions": {"torch": torch.__version__, "nnsight": _version("nnsight"),
                         "transformers": _version("transformers")}}


def _version(name: str) -> str:
    from importlib.metadata import version

    return version(name)


def render(result: dict[str, Any]) -> str:
    from nngraft.backends.ndif import format_bytes

    whole = result["whole_model_bf16_bytes"]
    m = result["measured"]
    lines = [BEGIN, "",
             "What one remote request carries when it grafts the **MLPs of the last 4 layers** (gate, up, "
             "down: 12 matrices of 4096×14336) of a **Llama-3-8B-shaped** model, for each way of sending "
             "the donor (`python -m benchmarks.payload_sizes`; computed from shapes with "
             "`nngraft.backends.ndif.estimate_payload`, so exact for these shapes). For scale: the whole model in "
             f"bfloat16 is {format_bytes(whole)}.", "",
             "| donor sent as | modules | donor tensors per request | vs dense bf16 |",
             "| --- | ---: | ---: | ---: |"]
    dense = next(r["donor_bytes"] for r in result["from_shapes"] if r["form"] == "dense" and r["dtype"] == "bfloat16")
    for r in result["from_shapes"]:
        lines.append(f"| {r['donor']} | {r['modules']} | {format_bytes(r['donor_bytes'])} | "
                     f"{r['donor_bytes'] / dense:.2%} |")
    lines += ["", "Measured on the real client path (a weightless Llama-3-8B, synthetic random LoRA factors; the "
              "request is serialized by nnsight exactly as for NDIF, checked, compressed, then captured "
              "instead of sent):", "",
              "| request | donor tensors | serialized request | sent (zstd) |", "| --- | ---: | ---: | ---: |"]
    for name, row in m.items():
        label = "empty spec (fixed overhead)" if name == "empty spec" else f"LoRA r={name.split(':')[1]}"
        lines.append(f"| {label} | {format_bytes(row['donor_bytes'])} | {format_bytes(row['request_bytes'])} | "
                     f"{format_bytes(row['sent_bytes_zstd'])} |")
    lines += ["",
              "Reading it: a rank-r delta and a LoRA of rank r send the same shapes (r·(4096+14336) numbers per "
              "matrix), so they cost the same; what differs is fidelity — a LoRA *is* F exactly, a truncated "
              "delta of a full finetune is an approximation whose error nngraft reports per tensor "
              "(`DeltaDonor.report()`). Dense tensors (F's own or ΔW) are exact and cost the same. Each "
              "request carries the donor tensors again (one request per `batch_size` rows), and the fixed "
              "overhead above (nnsight's description of the model's module tree, the code, the inputs). "
              "nnsight compresses requests with zstd by default; even random bfloat16 factors shrink by about "
              "a fifth (their exponent bits are redundant), real weights by a similar amount or more.", "", END]
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    return docs_script_main(argv, __doc__.splitlines()[0], run, render, BEGIN, END, HEADING,
                            docs=ROOT / "docs" / "benchmarks.md",
                            results=ROOT / "benchmarks" / "results" / "payload_sizes.json")


if __name__ == "__main__":
    main()
