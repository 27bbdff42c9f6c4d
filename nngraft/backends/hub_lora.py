"""Programs for a Hub LoRA donor: the adapter is attached on the server, only gates travel.

NDIF (nnsight 0.8) applies a PEFT adapter named in the request's environment (``peft=``) to its
copy of P before running the request, in place: every adapted module becomes PEFT's LoRA layer,
computing ``base_layer(x) + scale · lora_B(lora_A(x))``. Such a request carries no weights at all.
The adapter is then active everywhere, so the program *gates* it: for every adapted module it zeroes
``lora_A``'s output ``A·x`` (r numbers per token) at every cell the plan does not graft there, and
``B·0`` adds exactly nothing, so those cells compute P's own output. At grafted cells the module
computes ``W·x + scale·B·(A·x)``: F's output (equal to merged weights up to rounding).

Example:
    >>> from nngraft.backends.hub_lora import mask_shape
    >>> mask_shape(rows=2, seq_len=7, last_only=True)
    (2, 1)
"""

from __future__ import annotations

from typing import Any

import torch

from ..arch import Adapter, adapter_for, get_module
from ..errors import RemoteDonorError, RemoteUnsupportedError
from ..compile.plan import GraftPlan
from .payload import PayloadItem, PayloadReport, leaf_plan
from .traffic import Access, Traffic, dataflow

ADAPTER_NAME = "default"
"""The name PEFT gives the one adapter nnsight attaches (``lora_A.default``)."""


def adapted_modules(model: torch.nn.Module) -> dict[str, tuple[int, torch.dtype]]:
    """Module path → (rank, dtype of ``A·x``) for every module carrying an attached LoRA adapter."""
    found = {}
    for path, module in model.named_modules():
        lora_a = getattr(module, "lora_A", None)
        if isinstance(lora_a, torch.nn.ModuleDict) and ADAPTER_NAME in lora_a:
            inner = lora_a[ADAPTER_NAME]
            if not isinstance(inner, torch.nn.Linear):
                raise RemoteDonorError(f"{path}: the adapter's lora_A is a {type(inner).__name__}, not a Linear; "
                                       "only LoRA on linear layers can be grafted from the Hub")
            found[path] = (int(inner.out_features), inner.weight.dtype)
        elif getattr(module, "lora_embedding_A", None):
            raise RemoteDonorError(f"{path}: the adapter adapts an embedding; only LoRA on linear layers can be "
                                   "grafted from the Hub (pass the adapter folder as LoraDonor instead)")
    return found


def mask_shape(rows: int, seq_len: int, last_only: bool) -> tuple[int, int]:
    """The shape of a gate mask: rows × the token columns the module sees."""
    return (rows, 1 if last_only else seq_len)


def _forward_order(model: torch.nn.Module, paths: list[str]) -> list[str]:
    try:
        order = {path: i for i, path in enumerate(dataflow(model).fresh)}
    except Exception:  # noqa: BLE001 - a model a weightless forward cannot run: registration order
        order = {path: i for i, (path, _) in enumerate(model.named_modules())}
    return sorted(paths, key=lambda p: order.get(p, len(order)))


def build_hub_program(plan: GraftPlan, model: torch.nn.Module, adapter: Adapter, *, keep_last: bool,
                      describe: str = "Hub LoRA adapter") -> tuple[dict, PayloadReport]:
    """The gate program for ``plan`` on ``model`` (P with the adapter attached; weightless is
    fine): one op per adapted module, in forward order, and the report of what it carries (the
    masks only: no weights)."""
    from .functional import PROGRAM_VERSION

    adapted = adapted_modules(model)
    if not adapted:
        raise RemoteDonorError("the recipient has no LoRA adapter attached: a Hub LoRA donor needs the "
                               "wrapper built with peft=<adapter id>")
    if plan.derived:
        raise RemoteUnsupportedError(
            "parameter-level grafts (rules with \"weights\") of a Hub LoRA donor are not supported: the adapter's "
            "factors stay on the server. Pass the downloaded adapter as LoraDonor(folder) for them")
    leaves = leaf_plan(plan, adapter, model.config)
    grafts = {path: group for path, group in leaves.by_path()}
    for path, group in grafts.items():
        if any(g.donor != "default" for g in group):
            raise RemoteUnsupportedError("a Hub LoRA donor must be the only donor of a run (rules naming "
                                         "other donors are not supported with it)")
        if path not in adapted:
            continue  # the adapter does not change this module: F equals P there
        base = getattr(get_module(model, path), "base_layer", None)
        width = getattr(base, "out_features", None) or getattr(base, "nf", None)
        for g in group:
            if g.features is not None and (width is None or g.features.numel() != width):
                raise RemoteUnsupportedError(
                    f"{path} is one fused projection and the spec grafts only part of its output "
                    f"({'/'.join(g.components)}); an adapter's A·x feeds all of its outputs, so a Hub LoRA "
                    "donor cannot graft part of it. Graft q, k and v together, or pass the adapter folder "
                    "as LoraDonor(folder)")
            if g.token_axis != 1:
                raise RemoteUnsupportedError(f"{path}: a Hub LoRA gate needs tokens on axis 1")
    masks: list[torch.Tensor] = []
    index: dict[bytes, int] = {}
    ops = []
    report = PayloadReport(donor=describe, dtype="no weights")
    for path in _forward_order(model, list(adapted)):
        rank, dtype = adapted[path]
        last_only = keep_last and path == adapter.lm_head
        mask = torch.zeros(mask_shape(plan.batch_size, plan.seq_len, last_only), dtype=torch.bool)
        for g in grafts.get(path, ()):
            mask[g.rows, g.cols] = True
        key = bytes(mask.numpy().tobytes()) + bytes(str(mask.shape), "ascii")
        if key not in index:
            index[key] = len(masks)
            masks.append(mask)
        ops.append({"gate": True, "path": f"{path}.lora_A.{ADAPTER_NAME}", "mask": index[key], "rank": rank,
                    "dtype": str(dtype).removeprefix("torch.")})
        report.items.append(PayloadItem(path, "gate" if mask.any() else "off", "lora_A", 0))
    report.items.append(PayloadItem(f"gate masks ({len(masks)} distinct)", "send", "",
                                    sum(m.numel() * m.element_size() for m in masks)))
    return {"version": PROGRAM_VERSION, "ops": ops, "masks": masks}, report


def estimate_hub_traffic(model: torch.nn.Module, targets: list[str], rank: int, rows: int, tokens: int, *,
                         a_dtype: torch.dtype = torch.float32, dtype: torch.dtype = torch.bfloat16,
                         keep_last: bool = True) -> Traffic:
    """Sandbox traffic of one Hub LoRA request, from shapes (``model`` without the adapter, weightless
    is fine): every module whose name ends in one of ``targets`` is adapted, and its ``A·x``
    (``rank`` per token, in ``a_dtype``: PEFT holds a half-precision base model's adapter in float32)
    is read once and written back, whatever the spec grafts; then the logits (in ``dtype``) are read."""
    from .traffic import program_traffic

    adapter_paths = [path for path, module in model.named_modules()
                     if path.rsplit(".", 1)[-1] in targets and hasattr(module, "weight") and module.weight.ndim == 2]
    lm_head = adapter_for(model).lm_head
    traffic = Traffic()
    size = torch.empty((), dtype=a_dtype).element_size()
    for path in adapter_paths:
        cols = 1 if keep_last and path == lm_head else tokens
        traffic.accesses.append(Access(f"{path}.lora_A.{ADAPTER_NAME}.output", "read", rows * cols * rank * size))
    logits = program_traffic({"ops": []}, dataflow(model, keep_last=keep_last), rows, tokens, dtype)
    traffic.accesses += logits.accesses
    return traffic
